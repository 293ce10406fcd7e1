//! OCI containers in the guest, agent side: the registry of containers and their lifecycle
//! (create, start, attach, wait, signal, exec, delete, ps).
//!
//! Each container's init is a helper process (`helper`) cloned into the requested
//! namespaces, which sets itself up and blocks on a sync socket until `StartContainer`, like
//! runc's exec fifo. The helper-side modules (`mounts`, `process`, `seccomp`, `pty`, `ns`)
//! run only in that fresh single-threaded process, never in the agent; `spawn` and
//! `handshake` start helpers, `process_io` and `relay` carry their stdio, `exit_cell` keeps the
//! init's exit status, `early_signals` holds a signal sent while the init is still starting.

mod early_signals;
mod exit_cell;
mod handshake;
pub mod helper;
mod mounts;
mod ns;
mod process;
mod process_io;
mod pty;
pub mod relay;
mod seccomp;
pub mod spawn;
mod sync_socket;
mod syscalls;

use std::collections::HashMap;
use std::fs::File;
use std::path::PathBuf;
use std::sync::mpsc::TryRecvError;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use husk_agent::proto::ExitStatus;
use oci_spec::runtime::{LinuxNamespaceType, Process, Spec};

use super::lock::lock;
use super::reaper::Reaper;
use exit_cell::watch_exit;
use handshake::{await_exec, give_orders, launch, spawn_idle, Spawned};
use relay::Relay;
use sync_socket::{SyncSocket, ToHelper};

pub use exit_cell::ExitCell;
pub use process_io::{Split, Stdio};
pub use pty::resize;

/// Errors in the helper are plain messages: they travel to the host as `Error{message}`.
pub type HelperResult<T> = Result<T, String>;

/// Where the host's shares are mounted (under /run/husk), after a spare helper was cloned.
const SHARES_PARENT: &str = "/run";
/// How long `DeleteContainer` waits for killed processes to be reaped.
const KILL_TIMEOUT: Duration = Duration::from_secs(10);

/// All containers of this guest.
#[derive(Default)]
pub struct Containers {
    map: Mutex<HashMap<String, Arc<Container>>>,
    /// A helper cloned ahead of time and waiting for orders (see `prepare_spare`).
    spare: Mutex<Option<Spawned>>,
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
    /// Signals held until the init handles them (see `early_signals`).
    held: Arc<early_signals::Held>,
}

enum Phase {
    /// Waiting for start on this socket.
    Created(SyncSocket),
    /// Told to start at this time.
    Started(Instant),
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
            private_shares: super::shares::private_targets(),
        };
        let spawned = match self.take_spare(flags, terminal) {
            Some(spare) => spare,
            None => spawn_idle(reaper, flags, None, terminal)?,
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
                held: Arc::default(),
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
        let spawned = spawn_idle(reaper, flags, None, false)?;
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
        let started = Phase::Started(Instant::now());
        let sync = match std::mem::replace(&mut *lock(&c.phase), started) {
            Phase::Created(sync) => sync,
            Phase::Started(_) => return Err(format!("container {id} is not in created state")),
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

    /// Signals the init (or with `all` every process of the container). A signal the init
    /// would drop right after start is held for it instead (see `early_signals`).
    pub fn signal(
        &self,
        reaper: &Arc<Reaper>,
        id: &str,
        signal: i32,
        all: bool,
    ) -> HelperResult<()> {
        let c = self.get(id)?;
        if c.exit.get().is_some() {
            return Err("container not running".into());
        }
        if all {
            kill_all(&c, signal);
            return Ok(());
        }
        let started = match *lock(&c.phase) {
            Phase::Started(at) if c.has(LinuxNamespaceType::Pid) => Some(at),
            _ => None,
        };
        let sent = match started {
            Some(at) => early_signals::send(reaper, c.init_pid, signal, at, &c.exit, &c.held),
            None => reaper.signal(c.init_pid, signal),
        };
        sent.map_err(|e| format!("signal {signal} to container {id}: {}", e.desc()))
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
