//! `husk checkpoint` and `husk restore`, with runc's flags as podman and conmon pass them
//! (those that steer CRIU are accepted and have nothing to act on; those that would change
//! what happens are refused when given).

use std::path::{Path, PathBuf};

use anyhow::Result;

use super::containers::{first_set, follow, given, CreateOpts, Unsupported, NO_LSM};
use crate::lifecycle::{CheckpointOptions, Container, RestoreOptions};
use crate::logging::{LogOptions, Logger};

/// `husk checkpoint` (runc's flags; those about CRIU are accepted and ignored, those about
/// lazy migration refused).
#[derive(clap::Args, Debug, Clone)]
pub struct CheckpointOpts {
    /// Directory the checkpoint is written to.
    #[arg(long)]
    pub image_path: PathBuf,
    /// Accepted for runc compatibility (CRIU's logs would go there).
    #[arg(long)]
    pub work_path: Option<PathBuf>,
    /// Keep the container running after the checkpoint.
    #[arg(long)]
    pub leave_running: bool,
    /// A pre-dump: written like a checkpoint, and the container keeps running.
    #[arg(long)]
    pub pre_dump: bool,
    #[command(flatten)]
    pub criu: CriuFlags,
    /// Accepted for runc compatibility (incremental checkpoints are not kept).
    #[arg(long)]
    pub parent_path: Option<PathBuf>,
    /// CRIU's page server: not supported (the image is written to `--image-path`).
    #[arg(long)]
    pub page_server: Option<String>,
    /// Lazy migration's readiness fd: not supported.
    #[arg(long)]
    pub status_fd: Option<i32>,
    pub id: String,
}

impl CheckpointOpts {
    /// The first flag given that Husk cannot honour (see [`Unsupported`]).
    pub fn unsupported(&self) -> Option<Unsupported> {
        first_set([
            (
                given(&self.page_server),
                ("--page-server", "the image is written to --image-path"),
            ),
            (self.status_fd.is_some(), ("--status-fd", LAZY)),
        ])
        .or_else(|| self.criu.unsupported())
    }
}

/// `husk restore`: `create`'s options, plus the image and runc's restore flags.
#[derive(clap::Args, Debug, Clone)]
pub struct RestoreOpts {
    /// Directory of the checkpoint.
    #[arg(long)]
    pub image_path: PathBuf,
    /// Accepted for runc compatibility (CRIU's logs would go there).
    #[arg(long)]
    pub work_path: Option<PathBuf>,
    /// Return once the container runs, instead of waiting for it (and deleting it).
    #[arg(short, long)]
    pub detach: bool,
    #[command(flatten)]
    pub criu: CriuFlags,
    /// Close the established TCP connections: not supported (the guest keeps them).
    #[arg(long)]
    pub tcp_close: bool,
    /// Accepted for runc compatibility (the monitor, not husk, waits for the container).
    #[arg(long)]
    pub no_subreaper: bool,
    /// Not supported (the guest has no SELinux or AppArmor).
    #[arg(long)]
    pub lsm_profile: Option<String>,
    /// Not supported (the guest has no SELinux).
    #[arg(long)]
    pub lsm_mount_context: Option<String>,
    #[command(flatten)]
    pub create: CreateOpts,
}

impl RestoreOpts {
    /// The first flag given that Husk cannot honour (see [`Unsupported`]).
    pub fn unsupported(&self) -> Option<Unsupported> {
        first_set([
            (
                self.tcp_close,
                ("--tcp-close", "the guest keeps its connections"),
            ),
            (given(&self.lsm_profile), ("--lsm-profile", NO_LSM)),
            (
                given(&self.lsm_mount_context),
                ("--lsm-mount-context", NO_LSM),
            ),
        ])
        .or_else(|| self.criu.unsupported())
        .or_else(|| self.create.unsupported())
    }
}

/// Why lazy migration is refused.
const LAZY: &str = "images are complete; there is no lazy migration";

/// runc's flags that steer CRIU. A micro-VM's checkpoint holds every connection, lock and
/// socket of the guest anyway, so those change nothing here; only lazy pages, which would
/// change how the image is served, are refused.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct CriuFlags {
    #[arg(long, hide = true)]
    pub tcp_established: bool,
    #[arg(long, hide = true)]
    pub ext_unix_sk: bool,
    #[arg(long, hide = true)]
    pub shell_job: bool,
    #[arg(long, hide = true)]
    pub file_locks: bool,
    #[arg(long, hide = true)]
    pub lazy_pages: bool,
    #[arg(long, hide = true)]
    pub auto_dedup: bool,
    #[arg(long, hide = true)]
    pub manage_cgroups_mode: Option<String>,
    #[arg(long, hide = true)]
    pub empty_ns: Vec<String>,
    #[arg(long, hide = true)]
    pub tcp_skip_in_flight: bool,
    #[arg(long, hide = true)]
    pub link_remap: bool,
}

impl CriuFlags {
    fn unsupported(&self) -> Option<Unsupported> {
        self.lazy_pages.then_some(("--lazy-pages", LAZY))
    }
}

/// `husk checkpoint`: without `--leave-running` (or `--pre-dump`) the container is stopped
/// afterwards, as runc's is.
pub fn checkpoint(root: &Path, opts: &CheckpointOpts) -> Result<()> {
    let c = Container::load(root, &opts.id)?;
    c.checkpoint(&CheckpointOptions {
        image_path: opts.image_path.clone(),
        leave_running: opts.leave_running || opts.pre_dump,
    })
}

/// `husk restore`: returns once the container runs (with `--detach`), or waits for it like
/// `run`. The new monitor logs as `log` says.
pub fn restore(root: &Path, opts: &RestoreOpts, log: &LogOptions, logger: &Logger) -> Result<i32> {
    let c = Container::restore(
        root,
        &RestoreOptions {
            image_path: opts.image_path.clone(),
            create: opts.create.options(log),
        },
        logger,
    )?;
    Ok(follow(c, opts.detach, logger))
}
