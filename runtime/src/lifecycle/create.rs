//! Creating a container: claim the id, choose where its VM comes from, start its monitor and
//! wait for the monitor to say the container is created (or why not).

use std::io::{BufRead, BufReader};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use super::{load_state, Container};
use crate::container::bundle::Bundle;
use crate::container::state::StateRoot;
use crate::container::template_choice;
use crate::container::trace::Trace;
use crate::logging::LogOptions;
use crate::monitor::{launch, MonitorArgs};

/// What `create` (and `restore`) needs besides the state directory.
#[derive(Debug, Clone)]
pub struct CreateOptions {
    pub id: String,
    /// The bundle directory.
    pub bundle: PathBuf,
    /// AF_UNIX socket that receives the pty master when process.terminal is set.
    pub console_socket: Option<PathBuf>,
    /// File to write the monitor's pid to.
    pub pid_file: Option<PathBuf>,
    /// Cold-boot the micro-VM instead of cloning it from a template.
    pub no_template: bool,
    /// Where and how the monitor logs: the caller's `--log`, `--log-format` and `--debug`.
    pub log: LogOptions,
}

/// Where a monitor gets its VM from.
pub enum VmSource {
    /// Cloned from this template, or cold-booted (`None`).
    Template(Option<String>),
    /// Restored from the checkpoint in this directory.
    Checkpoint(PathBuf),
}

impl Container {
    /// Claims the id, picks (and if need be builds) the template, starts the monitor, returns
    /// once the container is created. `debug` hears why a VM is cold-booted.
    pub fn create(root: &Path, opts: &CreateOptions, debug: &dyn Fn(&str)) -> Result<Container> {
        Container::create_from(root, opts, |bundle| {
            template_choice::choose(bundle, opts.no_template, debug).map(VmSource::Template)
        })
    }

    /// Claims the id and starts a monitor on the VM `source` gives (its pid is also written to
    /// the pid file). A failure leaves no state directory behind.
    pub fn create_from(
        root: &Path,
        opts: &CreateOptions,
        source: impl FnOnce(&Bundle) -> Result<VmSource>,
    ) -> Result<Container> {
        let bundle = Bundle::load(&opts.bundle)?;
        let store = StateRoot::new(root);
        store.create(&opts.id)?;
        let trace = Trace::start("create");
        let spawned = source(&bundle).and_then(|source| {
            trace.mark("VM source chosen");
            spawn_monitor(root, opts, &bundle.dir, &source)
        });
        trace.mark("monitor answered");
        match spawned {
            Ok(pid) => {
                if let Some(p) = &opts.pid_file {
                    write_pid_file(p, pid)?;
                }
                let state = load_state(&store, &opts.id)?;
                Ok(Container { store, state })
            }
            Err(e) => {
                let _ = store.remove(&opts.id);
                Err(e)
            }
        }
    }
}

/// Starts the monitor and reads its readiness line; its pid once it says "ok".
fn spawn_monitor(
    root: &Path,
    opts: &CreateOptions,
    bundle: &Path,
    source: &VmSource,
) -> Result<i32> {
    let (read, write) = nix::unistd::pipe()?;
    let write_fd = high_fd(write)?;
    let (template, restore) = match source {
        VmSource::Template(t) => (t.clone(), None),
        VmSource::Checkpoint(dir) => (None, Some(dir.clone())),
    };
    let args = MonitorArgs {
        root: root.to_path_buf(),
        id: opts.id.clone(),
        bundle: bundle.to_path_buf(),
        console_socket: opts.console_socket.clone(),
        ready_fd: Some(write_fd),
        template,
        restore,
        log: opts.log.clone(),
    };
    let pid = launch::start(args)?;
    // SAFETY: write_fd is ours; the child has its own copy now.
    unsafe { libc::close(write_fd) };
    let mut line = String::new();
    BufReader::new(std::fs::File::from(read)).read_line(&mut line)?;
    match line.trim_end() {
        "ok" => Ok(pid),
        msg => {
            let _ =
                nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::SIGKILL);
            let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid), None);
            if msg.is_empty() {
                bail!("the monitor died before the container was created");
            }
            bail!("{msg}")
        }
    }
}

/// Moves a pipe end above the fds podman passes with --preserve-fds, close-on-exec.
pub(super) fn high_fd(fd: OwnedFd) -> Result<i32> {
    // SAFETY: F_DUPFD_CLOEXEC duplicates a valid fd to the lowest free fd >= 100.
    let high = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 100) };
    if high < 0 {
        bail!("dup: {}", std::io::Error::last_os_error());
    }
    Ok(high)
}

pub(super) fn write_pid_file(path: &Path, pid: i32) -> Result<()> {
    let tmp = path.with_extension("husk-tmp");
    std::fs::write(&tmp, pid.to_string())?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing pid file {}", path.display()))
}
