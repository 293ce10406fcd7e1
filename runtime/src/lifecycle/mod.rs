//! A container's life as a library: [`Container`] is a handle on one container of a state
//! directory (`root`), made by [`Container::create`] or [`Container::restore`] or found again
//! by [`Container::load`], with a method for each runc verb. Every method acts through the
//! container's monitor (see `monitor`): its control socket, or its process.
//!
//! `create` is in `create`, `exec` in `exec`, `checkpoint` and `restore` in `checkpointing`, and
//! the OCI hooks the host runs (and when) in `hooks`.

mod checkpointing;
mod create;
mod exec;
mod hooks;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Result};

pub use self::checkpointing::{CheckpointOptions, RestoreOptions};
pub use self::create::{CreateOptions, VmSource};
pub use self::exec::ExecOptions;
use self::hooks::HostHook;
use crate::container::state::{validate_id, ContainerState, StateRoot, Status};
use crate::container::trace::Trace;
use crate::container::{monitor_alive, process_start_time};
use crate::logging::{monitor_log, Entry, Logger};
use crate::monitor::cgroup;
use crate::monitor::control::{self, Reply, Request};
use crate::monitor::paging::{self, PauseConfig};

/// One container: its state directory and the state it held when the handle was made.
pub struct Container {
    store: StateRoot,
    state: ContainerState,
}

/// The errors a container's monitor logged (see `logging::monitor_log`).
pub struct MonitorErrors {
    /// The monitor's whole log.
    pub log: PathBuf,
    /// The log is in the state directory, so `delete` removes it.
    pub in_state_dir: bool,
    /// The first error lines (at most [`monitor_log::MAX_KEPT_ERRORS`], and the one a seccomp
    /// kill writes), oldest first.
    pub entries: Vec<Entry>,
}

/// How a container waited for by [`Container::wait_and_delete`] ended.
pub struct Ended {
    /// Its exit code (128 + signal if killed).
    pub code: i32,
    /// What its monitor logged at error level, read before its state directory went.
    pub monitor_errors: Option<MonitorErrors>,
}

impl Container {
    /// The container `id` under `root`, its status corrected if its monitor has died.
    pub fn load(root: &Path, id: &str) -> Result<Container> {
        let store = StateRoot::new(root);
        let state = load_state(&store, id)?;
        Ok(Container { store, state })
    }

    /// A container whose state file is damaged or missing, rebuilt from what the host shows
    /// of it: its monitor is the process serving its control socket, with that process's
    /// cgroup and page file. Enough for [`Container::delete`] with `force`.
    pub fn recover(root: &Path, id: &str) -> Result<Container> {
        validate_id(id)?;
        let store = StateRoot::new(root);
        let dir = store.dir(id);
        if !dir.is_dir() {
            bail!("container does not exist");
        }
        let mut state = ContainerState::unknown(id);
        if let Some(pid) = control::monitor_pid(&dir) {
            state.status = Status::Running;
            state.pid = pid;
            state.pid_start_time = process_start_time(pid).unwrap_or(0);
            state.cgroup_dirs = cgroup::of_process(pid);
            state.page_file = PauseConfig::load()
                .ok()
                .map(|c| paging::page_file(&c.page_dir, id, pid));
        }
        Ok(Container { store, state })
    }

    /// Every container under `root` whose state can be read.
    pub fn list(root: &Path) -> Vec<Container> {
        StateRoot::new(root)
            .list()
            .into_iter()
            .filter_map(|s| Container::load(root, &s.id).ok())
            .collect()
    }

    /// Its state (runc's JSON is [`ContainerState::oci_json`]).
    pub fn state(&self) -> &ContainerState {
        &self.state
    }

    pub fn id(&self) -> &str {
        &self.state.id
    }

    /// Starts the process of a created container and runs its poststart hooks; returns once
    /// it runs. A failing poststart hook stops the container and fails the start, as the
    /// spec says.
    pub fn start(&self) -> Result<()> {
        let trace = Trace::start("start");
        match self.state.status {
            Status::Created => {}
            Status::Stopped => bail!("cannot start a container that has stopped"),
            Status::Creating => bail!("cannot start a container in the creating state"),
            _ => bail!("cannot start an already running container"),
        }
        trace.mark("state read");
        self.call(&Request::Start)?;
        trace.mark("started");
        if let Err(e) = hooks::run(&self.state, HostHook::Poststart) {
            let kill = Request::Kill {
                signal: libc::SIGKILL,
                all: true,
            };
            let _ = self.call(&kill);
            return Err(e);
        }
        Ok(())
    }

    /// Sends `signal` to the container's process, or with `all` to every process of it.
    pub fn kill(&self, signal: i32, all: bool) -> Result<()> {
        if self.state.status == Status::Stopped {
            bail!("container not running");
        }
        self.call(&Request::Kill { signal, all })?;
        Ok(())
    }

    /// Suspends every process of a running container. Returns a warning when the container
    /// is paused but not as configured (its memory could not be paged out).
    pub fn pause(&self) -> Result<Option<String>> {
        let reply = match self.state.status {
            Status::Running => self.call(&Request::Pause)?,
            Status::Paused => bail!("container already paused"),
            _ => bail!("container not running"),
        };
        Ok(match reply {
            Reply::Warning { message } => Some(message),
            _ => None,
        })
    }

    /// Resumes a paused container.
    pub fn resume(&self) -> Result<()> {
        match self.state.status {
            Status::Paused => self.call(&Request::Resume)?,
            _ => bail!("container not paused"),
        };
        Ok(())
    }

    /// The container's processes (guest pids).
    pub fn processes(&self) -> Result<Vec<i32>> {
        if self.state.status == Status::Stopped {
            bail!("container not running");
        }
        let Reply::Pids { pids } = self.call(&Request::Ps)? else {
            bail!("unexpected reply from the monitor");
        };
        Ok(pids)
    }

    /// The errors its monitor logged, if it logged any.
    pub fn monitor_errors(&self) -> Option<MonitorErrors> {
        let dir = self.store.dir(&self.state.id);
        let entries = monitor_log::read_errors(&dir);
        if entries.is_empty() {
            return None;
        }
        let log = self.state.monitor_log.clone();
        let log = log.unwrap_or_else(|| dir.join(monitor_log::LOG_FILE));
        Some(MonitorErrors {
            in_state_dir: log.starts_with(&dir),
            log,
            entries,
        })
    }

    /// Deletes the container and everything it holds; a running or paused one only with
    /// `force` (it is killed first). Then runs its poststop hooks, whose failure is a warning
    /// on `logger`. Returns the errors its monitor logged, read once the monitor is gone and
    /// before they go with the state directory.
    pub fn delete(self, force: bool, logger: &Logger) -> Result<Option<MonitorErrors>> {
        let st = &self.state;
        match st.status {
            // The monitor may still be tearing its VM down; it must be gone (and out of the
            // container's cgroup) before the cgroup can be removed.
            Status::Stopped => finish_monitor(st),
            Status::Created => self.stop_monitor(),
            // No control socket yet: the monitor (if one has recorded itself) is killed. A
            // `create` still at work finds the id gone and fails.
            Status::Creating if force => kill_monitor(st),
            _ if force => self.stop_monitor(),
            s => bail!("cannot delete container {} that is not stopped: {s}", st.id),
        }
        // The monitor is gone: what it recorded last is everything it held (a monitor
        // killed while creating may have recorded more since this handle was made).
        let st = self.store.load(&st.id).unwrap_or_else(|_| st.clone());
        let errors = self.monitor_errors();
        self.store.remove(&st.id)?;
        release_monitor_remains(&st);
        if let Err(e) = hooks::run(&st, HostHook::Poststop) {
            logger.warn(&format!("container {}: {e:#}", st.id));
        }
        Ok(errors)
    }

    /// Waits for the container's monitor, a child of this process (it made the container),
    /// and deletes the container (poststop hooks' failures are warnings on `logger`).
    pub fn wait_and_delete(self, logger: &Logger) -> Ended {
        let code = wait_pid(self.state.pid);
        let deleted =
            Container::load(self.store.root(), &self.state.id).and_then(|c| c.delete(true, logger));
        Ended {
            code,
            monitor_errors: deleted.ok().flatten(),
        }
    }

    fn call(&self, req: &Request) -> Result<Reply> {
        control::call(&self.store.dir(&self.state.id), req)
    }

    /// Kills the container and, failing a clean end within a few seconds, its monitor.
    fn stop_monitor(&self) {
        let dir = self.store.dir(&self.state.id);
        let _ = control::call_timeout(
            &dir,
            &Request::Kill {
                signal: libc::SIGKILL,
                all: true,
            },
            Duration::from_secs(10),
        );
        finish_monitor(&self.state);
    }
}

/// Loads a container's state, correcting it if its monitor (or, before there is one, the
/// `create` making it) has died: nothing of it runs any more, so it is stopped.
fn load_state(store: &StateRoot, id: &str) -> Result<ContainerState> {
    let mut st = store.load(id)?;
    if st.status != Status::Stopped && !st.owner_alive() {
        st.status = Status::Stopped;
    }
    Ok(st)
}

/// Gives the monitor up to 10 s to exit on its own, then kills it.
fn finish_monitor(st: &ContainerState) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while monitor_alive(st) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    kill_monitor(st);
}

/// Kills the monitor (if it still runs) and waits until it is gone.
fn kill_monitor(st: &ContainerState) {
    if monitor_alive(st) {
        // SAFETY: plain kill(2) of the monitor whose identity monitor_alive just checked.
        unsafe { libc::kill(st.pid, libc::SIGKILL) };
        while monitor_alive(st) {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// Removes what a monitor that is gone may have left outside the state directory: its
/// cgroup, its page file and, when it was killed, its template lease.
fn release_monitor_remains(st: &ContainerState) {
    cgroup::remove(&st.cgroup_dirs);
    if let Some(f) = &st.page_file {
        paging::remove_page_file(f);
    }
    if st.pid > 0 {
        husk_templates::Store::from_env().release_ended_clone(st.pid);
    }
}

/// Waits for our child monitor and maps its end to an exit code.
fn wait_pid(pid: i32) -> i32 {
    use nix::sys::wait::{waitpid, WaitStatus};
    loop {
        match waitpid(nix::unistd::Pid::from_raw(pid), None) {
            Ok(WaitStatus::Exited(_, code)) => return code,
            Ok(WaitStatus::Signaled(_, sig, _)) => return 128 + sig as i32,
            Ok(_) => continue,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(_) => return 255,
        }
    }
}
