//! `husk checkpoint` and `husk restore`, with runc's flags as podman and conmon pass them
//! (those that steer CRIU are accepted and have nothing to act on).

use std::path::{Path, PathBuf};

use anyhow::Result;

use super::containers::{follow, CreateOpts};
use crate::lifecycle::{CheckpointOptions, Container, RestoreOptions};
use crate::logging::{LogOptions, Logger};

/// `husk checkpoint` (runc's flags; those about CRIU are accepted and ignored).
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
    /// Accepted for runc compatibility.
    #[arg(long)]
    pub page_server: Option<String>,
    /// Accepted for runc compatibility.
    #[arg(long)]
    pub status_fd: Option<i32>,
    pub id: String,
}

/// `husk restore`: `create`'s options, plus the image and runc's restore flags.
#[derive(clap::Args, Debug, Clone)]
pub struct RestoreOpts {
    /// Directory of the checkpoint.
    #[arg(long)]
    pub image_path: PathBuf,
    /// Accepted for runc compatibility.
    #[arg(long)]
    pub work_path: Option<PathBuf>,
    /// Return once the container runs, instead of waiting for it (and deleting it).
    #[arg(short, long)]
    pub detach: bool,
    #[command(flatten)]
    pub criu: CriuFlags,
    /// Accepted for runc compatibility.
    #[arg(long)]
    pub tcp_close: bool,
    /// Accepted for runc compatibility.
    #[arg(long)]
    pub no_subreaper: bool,
    /// Accepted for runc compatibility.
    #[arg(long)]
    pub lsm_profile: Option<String>,
    /// Accepted for runc compatibility.
    #[arg(long)]
    pub lsm_mount_context: Option<String>,
    #[command(flatten)]
    pub create: CreateOpts,
}

/// runc's flags that steer CRIU. A micro-VM's checkpoint holds every connection, lock and
/// socket of the guest anyway, so none of them changes anything here.
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
