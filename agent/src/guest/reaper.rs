//! Child reaping for PID 1 without stealing exec children's exit statuses.
//!
//! One thread owns every `wait`. It first *peeks* at a zombie with `waitid(WNOWAIT)` (which
//! leaves it unreaped), then takes the registry lock and only then reaps that one pid. Spawning
//! holds the same lock from `fork` until the pid is registered, so:
//! - an exec child is always registered before it can be reaped, and its status is handed to
//!   the thread that started it through a channel;
//! - the child std reaps itself when `exec` fails inside `spawn` cannot be stolen from std (the
//!   reaper waits for the lock, then finds it gone: `ECHILD`);
//! - anything else (orphans re-parented to PID 1) is reaped and dropped.
//!
//! Nobody may call `Child::wait`: the reaper owns the statuses.

use std::collections::HashMap;
use std::io;
use std::process::{Child, Command};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitid, waitpid, Id, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

use husk_agent::proto::ExitStatus;

use super::lock::lock;

#[derive(Default)]
struct Registry {
    waiting: HashMap<i32, SyncSender<ExitStatus>>,
    /// Bumped on each spawn, so an idle reaper (no children: `ECHILD`) knows to look again.
    generation: u64,
}

#[derive(Default)]
pub struct Reaper {
    registry: Mutex<Registry>,
    spawned: Condvar,
}

impl Reaper {
    /// Spawns `cmd` and returns the child (for its pipes) and where its status will arrive.
    pub fn spawn(&self, cmd: &mut Command) -> io::Result<(Child, Receiver<ExitStatus>)> {
        let mut reg = self.lock();
        let child = cmd.spawn()?;
        let (tx, rx) = sync_channel(1);
        // Child ids are pids, which always fit in i32.
        reg.waiting.insert(child.id() as i32, tx);
        reg.generation += 1;
        self.spawned.notify_all();
        Ok((child, rx))
    }

    /// Like `spawn` for children created by other means (container helpers are cloned into
    /// new namespaces): `fork` runs under the registry lock and returns the new child's pid.
    pub fn spawn_with(
        &self,
        fork: impl FnOnce() -> io::Result<i32>,
    ) -> io::Result<(i32, Receiver<ExitStatus>)> {
        let mut reg = self.lock();
        let pid = fork()?;
        let (tx, rx) = sync_channel(1);
        reg.waiting.insert(pid, tx);
        reg.generation += 1;
        self.spawned.notify_all();
        Ok((pid, rx))
    }

    /// Signals `pid` only while it is a registered, unreaped child, so a recycled pid is never
    /// hit.
    pub fn signal(&self, pid: i32, signal: i32) -> nix::Result<()> {
        let reg = self.lock();
        if !reg.waiting.contains_key(&pid) {
            return Err(Errno::ESRCH);
        }
        kill(Pid::from_raw(pid), Signal::try_from(signal)?)
    }

    /// The reaper loop; run it on a dedicated thread.
    pub fn run(&self) -> ! {
        loop {
            let generation = self.lock().generation;
            match waitid(Id::All, WaitPidFlag::WEXITED | WaitPidFlag::WNOWAIT) {
                Ok(status) => match status.pid() {
                    Some(pid) => self.reap(pid),
                    None => continue,
                },
                Err(Errno::EINTR) => continue,
                Err(Errno::ECHILD) => self.idle(generation),
                Err(e) => {
                    eprintln!("husk-agent: waitid: {e}");
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
    }

    /// Reaps the zombie `pid` that `waitid` peeked at, under the lock.
    fn reap(&self, pid: Pid) {
        let mut reg = self.lock();
        let status = match waitpid(pid, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(_, code)) => ExitStatus {
                code: Some(code),
                signal: None,
            },
            Ok(WaitStatus::Signaled(_, sig, _)) => ExitStatus {
                code: None,
                signal: Some(sig as i32),
            },
            // Already reaped by std inside a failed spawn, or not a final status.
            _ => return,
        };
        if let Some(tx) = reg.waiting.remove(&pid.as_raw()) {
            // The receiver may be gone if its connection died; the status is then unwanted.
            let _ = tx.send(status);
        }
    }

    /// No children at all: sleep until something is spawned (orphans only come from our own
    /// children). The timeout is a safety net.
    fn idle(&self, seen: u64) {
        let reg = self.lock();
        let _unused = self
            .spawned
            .wait_timeout_while(reg, Duration::from_secs(1), |r| r.generation == seen);
    }

    fn lock(&self) -> MutexGuard<'_, Registry> {
        // A panic while holding the lock leaves the map consistent (single inserts/removes).
        lock(&self.registry)
    }
}
