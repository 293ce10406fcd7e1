//! OCI containers in the guest, agent side: the registry of containers and their lifecycle
//! (create, start, attach, wait, signal, exec, delete, ps).
//!
//! Each container's init is a helper process (`helper`) cloned into the requested
//! namespaces, which sets itself up and blocks on a sync socket until `StartContainer`, like
//! runc's exec fifo. The helper-side modules (`mounts`, `process`, `seccomp`, `pty`, `ns`)
//! run only in that fresh single-threaded process, never in the agent.

pub mod helper;
mod mounts;
mod ns;
mod process;
mod pty;
pub mod relay;
mod seccomp;
pub mod spawn;
mod sync;
mod syscalls;

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::mpsc::TryRecvError;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use husk_agent::proto::ExitStatus;
use oci_spec::runtime::{LinuxNamespaceType, Process, Spec};

use super::reaper::Reaper;
use relay::Relay;
use spawn::{spawn_helper, ChildFds};
use sync::{FromHelper, SyncSocket, ToHelper};

pub use pty::resize;

/// Errors in the helper are plain messages: they travel to the host as `Error{message}`.
pub type HelperResult<T> = Result<T, String>;

/// Where the host's shares are mounted (under /run/husk), after a spare helper was cloned.
const SHARES_PARENT: &str = "/run";
/// How long a helper may take to set up before the agent gives up on it.
const SETUP_TIMEOUT: Duration = Duration::from_secs(60);
/// How long `DeleteContainer` waits for killed processes to be reaped.
const KILL_TIMEOUT: Duration = Duration::from_secs(10);

/// All containers of this guest.
#[derive(Default)]
pub struct Containers {
    map: Mutex<HashMap<String, Arc<Container>>>,
    /// A helper cloned ahead of time and waiting for orders (see `prepare_spare`).
    spare: Mutex<Option<Spawned>>,
}

/// A helper cloned into its namespaces and exec'd, waiting for its orders.
struct Spawned {
    /// The namespaces it was cloned into (CLONE_NEW* flags).
    flags: libc::c_int,
    pid: i32,
    status: std::sync::mpsc::Receiver<ExitStatus>,
    /// The agent's ends of its stdio pipes; `None` with a terminal (the helper makes a pty).
    stdio: Option<Stdio>,
    sync: SyncSocket,
}

struct Container {
    init_pid: i32,
    spec: Spec,
    phase: Mutex<Phase>,
    /// The init's stdio until a connection first attaches to it.
    stdio: Mutex<Option<Stdio>>,
    /// The init's stdio from the first attach on (it outlives connections).
    relay: Mutex<Option<Arc<Relay>>>,
    exit: Arc<ExitCell>,
}

enum Phase {
    /// Waiting for start on this socket.
    Created(SyncSocket),
    Started,
}

/// The agent's ends of a process's stdio.
pub enum Stdio {
    Pipes {
        stdin: File,
        stdout: File,
        stderr: File,
    },
    Pty {
        master: File,
    },
}

/// A process's stdio as the agent forwards it.
pub struct Split {
    /// stdout and stderr (a terminal has only the first).
    pub outputs: [Option<File>; 2],
    /// Where input goes: the pipe, or the pty master.
    pub stdin: File,
    /// The pty master again, for resizes, with a terminal.
    pub pty: Option<File>,
}

impl Stdio {
    /// Separate handles for reading output, writing input and resizing.
    pub fn split(self) -> std::io::Result<Split> {
        Ok(match self {
            Stdio::Pipes {
                stdin,
                stdout,
                stderr,
            } => Split {
                outputs: [Some(stdout), Some(stderr)],
                stdin,
                pty: None,
            },
            Stdio::Pty { master } => Split {
                outputs: [Some(master.try_clone()?), None],
                pty: Some(master.try_clone()?),
                stdin: master,
            },
        })
    }
}

/// A container init's exit status, set once by its watcher thread.
#[derive(Default)]
pub struct ExitCell {
    status: Mutex<Option<ExitStatus>>,
    changed: Condvar,
}

impl ExitCell {
    fn set(&self, status: ExitStatus) {
        *lock(&self.status) = Some(status);
        self.changed.notify_all();
    }

    pub fn get(&self) -> Option<ExitStatus> {
        *lock(&self.status)
    }

    /// Blocks until the status is known.
    pub fn wait(&self) -> ExitStatus {
        self.wait_for(Duration::MAX).unwrap_or_default()
    }

    fn wait_for(&self, timeout: Duration) -> Option<ExitStatus> {
        let guard = lock(&self.status);
        let (guard, _) = self
            .changed
            .wait_timeout_while(guard, timeout, |s| s.is_none())
            .unwrap_or_else(|p| p.into_inner());
        *guard
    }
}

/// A process exec'd into a container, handed to the connection that streams it.
pub struct ExecStarted {
    pub pid: i32,
    pub status: std::sync::mpsc::Receiver<ExitStatus>,
    pub stdio: Stdio,
}

impl Containers {
    /// Creates container `id`; returns its init's pid once it waits for start.
    pub fn create(
        &self,
        reaper: &Reaper,
        id: &str,
        spec: serde_json::Value,
        rootfs: &str,
    ) -> HelperResult<i32> {
        // Held throughout, so two creates of one id cannot race.
        let mut map = lock(&self.map);
        if id.is_empty() || map.contains_key(id) {
            return Err(format!("container with id {id:?} already exists"));
        }
        let spec: Spec = serde_json::from_value(spec).map_err(|e| format!("config.json: {e}"))?;
        let process = spec
            .process()
            .as_ref()
            .ok_or("config.json has no process")?;
        let flags = ns::clone_flags(&spec)?;
        let terminal = process.terminal().unwrap_or(false);
        let order = ToHelper::Init {
            spec: Box::new(spec.clone()),
            rootfs: PathBuf::from(rootfs),
        };
        let spawned = match self.take_spare(flags, terminal) {
            Some(spare) => spare,
            None => spawn(reaper, flags, None, terminal)?,
        };
        let (helper, sync) = give_orders(reaper, spawned, &order)?;
        let exit = Arc::new(ExitCell::default());
        watch_exit(helper.pid, helper.status, exit.clone())?;
        map.insert(
            id.to_string(),
            Arc::new(Container {
                init_pid: helper.pid,
                spec,
                phase: Mutex::new(Phase::Created(sync)),
                stdio: Mutex::new(Some(helper.stdio)),
                relay: Mutex::new(None),
                exit,
            }),
        );
        Ok(helper.pid)
    }

    /// Clones a helper into the namespaces named (OCI names: "pid", "network", ...) and keeps
    /// it waiting for orders. A template prepares one before its snapshot: every clone then
    /// finds a helper already cloned and exec'd, and a create whose spec asks for exactly
    /// these namespaces (and no terminal) skips the slowest part of its set-up in the guest.
    pub fn prepare_spare(&self, reaper: &Reaper, namespaces: &[String]) -> HelperResult<()> {
        let flags = ns::flags_of(namespaces)?;
        // Shares are mounted under /run after the spare's mount namespace was copied: shared
        // propagation carries them into it (the helper turns it into a slave on orders).
        nix::mount::mount(
            None::<&str>,
            SHARES_PARENT,
            None::<&str>,
            nix::mount::MsFlags::MS_SHARED,
            None::<&str>,
        )
        .map_err(|e| format!("make {SHARES_PARENT} shared: {e}"))?;
        let spawned = spawn(reaper, flags, None, false)?;
        // A spare it replaces reads EOF on its sync socket and exits.
        *lock(&self.spare) = Some(spawned);
        Ok(())
    }

    /// The spare helper, if it fits a container with these namespaces and is still alive.
    fn take_spare(&self, flags: libc::c_int, terminal: bool) -> Option<Spawned> {
        let mut spare = lock(&self.spare);
        let fits = spare.as_ref().is_some_and(|s| {
            let alive = matches!(s.status.try_recv(), Err(TryRecvError::Empty));
            !terminal && s.flags == flags && alive
        });
        if fits {
            spare.take()
        } else {
            None
        }
    }

    /// Lets a created container's init exec its process.
    pub fn start(&self, id: &str) -> HelperResult<()> {
        let c = self.get(id)?;
        let sync = match std::mem::replace(&mut *lock(&c.phase), Phase::Started) {
            Phase::Created(sync) => sync,
            Phase::Started => return Err(format!("container {id} is not in created state")),
        };
        if c.exit.get().is_some() {
            return Err("cannot start a container that has stopped".into());
        }
        let outcome = sync
            .send(&ToHelper::Start, None)
            .map_err(|e| format!("starting container: {e}"))
            .and_then(|()| await_exec(&sync));
        if outcome.is_err() {
            kill_all(&c, libc::SIGKILL);
        }
        outcome
    }

    /// The relay of the init's stdio, started on the first attach; a later attach (after the
    /// first connection was lost, e.g. to a restore's transport reset) gets the same relay.
    pub fn attach(&self, id: &str) -> HelperResult<Arc<Relay>> {
        let c = self.get(id)?;
        let mut relay = lock(&c.relay);
        if let Some(r) = relay.as_ref() {
            return Ok(r.clone());
        }
        let stdio = lock(&c.stdio)
            .take()
            .ok_or_else(|| format!("stdio of container {id} is gone"))?;
        let started = Relay::start(stdio, c.exit.clone()).map_err(|e| format!("stdio: {e}"))?;
        *relay = Some(started.clone());
        Ok(started)
    }

    /// Blocks until container `id`'s init has exited.
    pub fn wait(&self, id: &str) -> HelperResult<ExitStatus> {
        Ok(self.get(id)?.exit.wait())
    }

    pub fn signal(&self, reaper: &Reaper, id: &str, signal: i32, all: bool) -> HelperResult<()> {
        let c = self.get(id)?;
        if c.exit.get().is_some() {
            return Err("container not running".into());
        }
        if all {
            kill_all(&c, signal);
            return Ok(());
        }
        reaper
            .signal(c.init_pid, signal)
            .map_err(|e| format!("signal {signal} to container {id}: {}", e.desc()))
    }

    pub fn processes(&self, id: &str) -> HelperResult<Vec<i32>> {
        let c = self.get(id)?;
        if c.exit.get().is_some() {
            return Ok(Vec::new());
        }
        Ok(ns::processes(c.init_pid, c.has(LinuxNamespaceType::Pid)))
    }

    /// Kills what is left and forgets the container. Its mounts live in its own mount
    /// namespace, which the kernel tears down with its last process.
    pub fn delete(&self, id: &str) -> HelperResult<()> {
        let c = lock(&self.map)
            .remove(id)
            .ok_or_else(|| format!("container {id} does not exist"))?;
        if c.exit.get().is_none() {
            kill_all(&c, libc::SIGKILL);
            if c.exit.wait_for(KILL_TIMEOUT).is_none() {
                return Err(format!("container {id}: init did not die after SIGKILL"));
            }
        }
        // Without a pid namespace, children may outlive init.
        if !c.has(LinuxNamespaceType::Pid) {
            for pid in ns::processes(c.init_pid, false) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
        Ok(())
    }

    /// Starts `process` (an OCI process object) inside container `id`.
    pub fn exec(
        &self,
        reaper: &Reaper,
        id: &str,
        process: serde_json::Value,
    ) -> HelperResult<ExecStarted> {
        let c = self.get(id)?;
        if c.exit.get().is_some() {
            return Err("cannot exec in a stopped container".into());
        }
        let process: Process =
            serde_json::from_value(process).map_err(|e| format!("process: {e}"))?;
        let pidns = match c.has(LinuxNamespaceType::Pid) {
            true => Some(
                File::open(format!("/proc/{}/ns/pid", c.init_pid))
                    .map_err(|e| format!("container {id} pid namespace: {e}"))?,
            ),
            false => None,
        };
        let terminal = process.terminal().unwrap_or(false);
        let order = ToHelper::Exec {
            init_pid: c.init_pid,
            namespaces: ns::requested(&c.spec).iter().map(|n| n.typ()).collect(),
            process: Box::new(process),
            seccomp: c.spec.linux().as_ref().and_then(|l| l.seccomp().clone()),
        };
        let (helper, sync) = launch(reaper, 0, pidns.as_ref(), terminal, &order)?;
        if let Err(e) = await_exec(&sync) {
            let _ = reaper.signal(helper.pid, libc::SIGKILL);
            return Err(e);
        }
        Ok(helper)
    }

    fn get(&self, id: &str) -> HelperResult<Arc<Container>> {
        lock(&self.map)
            .get(id)
            .cloned()
            .ok_or_else(|| format!("container {id} does not exist"))
    }
}

impl Container {
    fn has(&self, typ: LinuxNamespaceType) -> bool {
        ns::has(&self.spec, typ)
    }
}

/// Signals every process of the container (with a pid namespace, killing init is enough for
/// SIGKILL, but other signals must reach each process).
fn kill_all(c: &Container, signal: i32) {
    let Ok(sig) = nix::sys::signal::Signal::try_from(signal) else {
        return;
    };
    for pid in ns::processes(c.init_pid, c.has(LinuxNamespaceType::Pid)) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig);
    }
}

/// Clones a helper, gives it its orders and waits for `Ready`. On failure the helper is
/// killed and reaped, so nothing is left behind.
fn launch(
    reaper: &Reaper,
    flags: libc::c_int,
    pidns: Option<&File>,
    terminal: bool,
    order: &ToHelper,
) -> HelperResult<(ExecStarted, SyncSocket)> {
    let spawned = spawn(reaper, flags, pidns, terminal)?;
    give_orders(reaper, spawned, order)
}

/// Clones a helper into `flags` (and `pidns`) with fresh stdio; it waits for its orders.
fn spawn(
    reaper: &Reaper,
    flags: libc::c_int,
    pidns: Option<&File>,
    terminal: bool,
) -> HelperResult<Spawned> {
    let (ours, theirs) = sync::pair().map_err(|e| format!("socketpair: {e}"))?;
    let (child, agent_side) = stdio_pair(terminal).map_err(|e| format!("stdio: {e}"))?;
    let fds = ChildFds {
        stdin: child[0].as_raw_fd(),
        stdout: child[1].as_raw_fd(),
        stderr: child[2].as_raw_fd(),
        sync: theirs.raw(),
    };
    let (pid, status) =
        spawn_helper(reaper, flags, pidns, &fds).map_err(|e| format!("clone: {e}"))?;
    // The child has its copies; ours would keep pipes open and hide EOF.
    drop((child, theirs));
    Ok(Spawned {
        flags,
        pid,
        status,
        stdio: agent_side,
        sync: ours,
    })
}

/// Sends a spawned helper its orders and waits for `Ready`; kills it on failure.
fn give_orders(
    reaper: &Reaper,
    helper: Spawned,
    order: &ToHelper,
) -> HelperResult<(ExecStarted, SyncSocket)> {
    let Spawned {
        pid,
        status,
        stdio: agent_side,
        sync: ours,
        ..
    } = helper;
    let ready = ours
        .set_timeout(SETUP_TIMEOUT)
        .and_then(|()| ours.send(order, None))
        .map_err(|e| format!("sending orders: {e}"))
        .and_then(|()| await_ready(&ours));
    match ready {
        Ok(master) => {
            let stdio = match (agent_side, master) {
                (Some(pipes), _) => pipes,
                (None, Some(m)) => Stdio::Pty { master: m.into() },
                (None, None) => return fail(reaper, pid, &status, "no pty from helper".into()),
            };
            Ok((ExecStarted { pid, status, stdio }, ours))
        }
        Err(e) => fail(reaper, pid, &status, e),
    }
}

fn fail<T>(
    reaper: &Reaper,
    pid: i32,
    status: &std::sync::mpsc::Receiver<ExitStatus>,
    message: String,
) -> HelperResult<T> {
    let _ = reaper.signal(pid, libc::SIGKILL);
    // Wait for the reaper so the helper (and with it its namespaces) is gone on return.
    let _ = status.recv_timeout(KILL_TIMEOUT);
    Err(message)
}

/// The helper's `Ready` (with the pty master when there is one) or its error.
fn await_ready(sync: &SyncSocket) -> HelperResult<Option<OwnedFd>> {
    match sync.recv::<FromHelper>() {
        Ok(Some((FromHelper::Ready, fd))) => Ok(fd),
        Ok(Some((FromHelper::Error { message }, _))) => Err(message),
        Ok(None) => Err("container process exited during set-up".into()),
        Err(e) => Err(format!("waiting for container set-up: {e}")),
    }
}

/// After `Ready`: EOF means the exec happened (the socket is close-on-exec).
fn await_exec(sync: &SyncSocket) -> HelperResult<()> {
    match sync.recv::<FromHelper>() {
        Ok(None) => Ok(()),
        Ok(Some((FromHelper::Error { message }, _))) => Err(message),
        Ok(Some((other, _))) => Err(format!("unexpected {other:?} from container helper")),
        Err(e) => Err(format!("waiting for exec: {e}")),
    }
}

/// The child's stdio fds and, without a terminal, the agent's pipe ends. With a terminal the
/// child starts on /dev/null and opens the pty itself.
fn stdio_pair(terminal: bool) -> std::io::Result<([OwnedFd; 3], Option<Stdio>)> {
    if terminal {
        let null = || -> std::io::Result<OwnedFd> {
            Ok(std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/null")?
                .into())
        };
        return Ok(([null()?, null()?, null()?], None));
    }
    let cloexec = nix::fcntl::OFlag::O_CLOEXEC;
    let (in_r, in_w) = nix::unistd::pipe2(cloexec)?;
    let (out_r, out_w) = nix::unistd::pipe2(cloexec)?;
    let (err_r, err_w) = nix::unistd::pipe2(cloexec)?;
    let agent = Stdio::Pipes {
        stdin: in_w.into(),
        stdout: out_r.into(),
        stderr: err_r.into(),
    };
    Ok(([in_r, out_w, err_w], Some(agent)))
}

/// Records the init's exit status when the reaper delivers it.
fn watch_exit(
    pid: i32,
    status: std::sync::mpsc::Receiver<ExitStatus>,
    cell: Arc<ExitCell>,
) -> HelperResult<()> {
    std::thread::Builder::new()
        .name(format!("ctr-wait-{pid}"))
        .spawn(move || cell.set(status.recv().unwrap_or_default()))
        .map(drop)
        .map_err(|e| format!("exit watcher thread: {e}"))
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
