//! Creating a container: claim the id, choose where its VM comes from, start its monitor and
//! wait for the monitor to say the container is created (or why not).

use std::io::Read;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nix::poll::{PollFd, PollFlags};

use super::{hooks, load_state, Container};
use crate::agent_vm::AGENT_TIMEOUT;
use crate::container::bundle::Bundle;
use crate::container::capabilities;
use crate::container::state::{ContainerState, StateRoot};
use crate::container::stuck_process::thread_states;
use crate::container::template_choice;
use crate::container::trace::Trace;
use crate::logging::monitor_log::LogMark;
use crate::logging::{LogOptions, Logger};
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
    /// once the container is created. `logger` hears (at debug level) why a VM is cold-booted.
    pub fn create(root: &Path, opts: &CreateOptions, logger: &Logger) -> Result<Container> {
        let debug = |msg: &str| logger.debug(msg);
        Container::create_from(root, opts, logger, |bundle| {
            template_choice::choose(bundle, opts.no_template, &debug).map(VmSource::Template)
        })
    }

    /// Claims the id and starts a monitor on the VM `source` gives (its pid is also written to
    /// the pid file). A failure leaves no state directory behind. What the bundle asks for and
    /// the container goes without is a warning on `logger`.
    pub fn create_from(
        root: &Path,
        opts: &CreateOptions,
        logger: &Logger,
        source: impl FnOnce(&Bundle) -> Result<VmSource>,
    ) -> Result<Container> {
        let bundle = Bundle::load(&opts.bundle)?;
        if !bundle.unknown_caps.is_empty() {
            logger.warn(&capabilities::warning(&bundle.unknown_caps));
        }
        let store = StateRoot::new(root);
        // A `create` killed from here on leaves a container that `state` reports and
        // `delete` removes.
        store.claim(&ContainerState::creating(&opts.id, &bundle))?;
        let mark = LogMark::before_start(&opts.log, &store.dir(&opts.id));
        let trace = Trace::start("create");
        let spawned = source(&bundle).and_then(|source| {
            trace.mark("VM source chosen");
            let restored = matches!(source, VmSource::Checkpoint(_));
            spawn_monitor(root, opts, &bundle.dir, &source).map(|pid| (pid, restored))
        });
        trace.mark("monitor answered");
        let (pid, restored) = match spawned {
            Ok(spawned) => spawned,
            Err(e) => {
                let e = with_monitor_log(e, &mark);
                let _ = store.remove(&opts.id);
                return Err(e);
            }
        };
        let c = Container {
            state: load_state(&store, &opts.id)?,
            store,
        };
        if let Err(e) = hooks::run_create(&c.state, restored) {
            // The spec's step 12 and 13: the container is destroyed, then poststop runs.
            c.delete(true, logger)?;
            return Err(e);
        }
        trace.mark("create hooks run");
        if let Some(p) = &opts.pid_file {
            write_pid_file(p, pid)?;
        }
        Ok(c)
    }
}

/// `e` followed by what the monitor logged meanwhile (its warnings say why a VM ended or a
/// device failed, which its one-line answer may not), read before its state directory goes.
fn with_monitor_log(e: anyhow::Error, mark: &LogMark) -> anyhow::Error {
    match mark.logged_since() {
        Some(lines) => anyhow::anyhow!(
            "{e:#}\nits monitor logged (in {}):\n{lines}",
            mark.path().display()
        ),
        None => e,
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
    let answer = read_answer(read, pid);
    match answer.as_deref() {
        Ok("ok") => Ok(pid),
        _ => {
            end_monitor(pid);
            match answer {
                Ok(msg) if msg.is_empty() => {
                    bail!("the monitor died before the container was created")
                }
                Ok(msg) => bail!("{msg}"),
                Err(e) => Err(e),
            }
        }
    }
}

/// How long `create` waits for the monitor's answer. Every step the monitor waits on the guest
/// for is bounded by the agent's timeout; this is longer, so that a monitor stuck where nothing
/// times out is reported (with where its threads are) instead of hanging its caller.
const MONITOR_ANSWER_TIMEOUT: Duration = Duration::from_secs(AGENT_TIMEOUT.as_secs() + 30);

/// The monitor's readiness line ("ok" or why not; empty if it died first), or an error naming
/// where its threads were when it did not answer in time.
fn read_answer(read: OwnedFd, pid: i32) -> Result<String> {
    let deadline = Instant::now() + MONITOR_ANSWER_TIMEOUT;
    let mut pipe = std::fs::File::from(read);
    let mut answer = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            bail!(
                "the monitor (pid {pid}) did not answer within {} s; its threads: {}",
                MONITOR_ANSWER_TIMEOUT.as_secs(),
                thread_states(pid)
            );
        }
        let ms = left.as_millis().min(1000) as u16;
        let mut fds = [PollFd::new(pipe.as_fd(), PollFlags::POLLIN)];
        match nix::poll::poll(&mut fds, ms) {
            Ok(0) | Err(nix::errno::Errno::EINTR) => continue,
            Ok(_) => {}
            Err(e) => bail!("waiting for the monitor: {e}"),
        }
        let mut buf = [0u8; 4096];
        let n = pipe.read(&mut buf)?;
        answer.extend_from_slice(&buf[..n]);
        if n == 0 || answer.contains(&b'\n') {
            let line = String::from_utf8_lossy(&answer);
            return Ok(line.lines().next().unwrap_or("").to_owned());
        }
    }
}

/// Kills a monitor that failed or got stuck, and reaps it unless it cannot die at once (a
/// thread stuck in the kernel): the caller's error matters more than the zombie.
fn end_monitor(pid: i32) {
    let pid = nix::unistd::Pid::from_raw(pid);
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::SIGKILL);
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        match nix::sys::wait::waitpid(pid, Some(nix::sys::wait::WaitPidFlag::WNOHANG)) {
            Ok(nix::sys::wait::WaitStatus::StillAlive) => {
                std::thread::sleep(Duration::from_millis(10))
            }
            _ => return,
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
