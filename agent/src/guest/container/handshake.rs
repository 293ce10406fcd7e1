//! The agent's side of starting a helper: clone it with fresh stdio and a sync socket, send its
//! orders, await its `Ready` and then its exec. A failed helper is killed and reaped.

use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::mpsc::Receiver;
use std::time::Duration;

use husk_agent::proto::ExitStatus;

use super::process_io::{stdio_pair, Stdio};
use super::spawn::{spawn_helper, ChildFds};
use super::sync_socket::{self, FromHelper, SyncSocket, ToHelper};
use super::{ExecStarted, HelperResult, KILL_TIMEOUT};
use crate::guest::reaper::Reaper;

/// How long a helper may take to set up before the agent gives up on it.
const SETUP_TIMEOUT: Duration = Duration::from_secs(60);

/// A helper cloned into its namespaces and exec'd, waiting for its orders.
pub struct Spawned {
    /// The namespaces it was cloned into (CLONE_NEW* flags).
    pub flags: libc::c_int,
    pid: i32,
    pub status: Receiver<ExitStatus>,
    /// The agent's ends of its stdio pipes; `None` with a terminal (the helper makes a pty).
    stdio: Option<Stdio>,
    sync: SyncSocket,
}

/// Clones a helper, gives it its orders and waits for `Ready`. On failure the helper is
/// killed and reaped, so nothing is left behind.
pub fn launch(
    reaper: &Reaper,
    flags: libc::c_int,
    pidns: Option<&File>,
    terminal: bool,
    order: &ToHelper,
) -> HelperResult<(ExecStarted, SyncSocket)> {
    let spawned = spawn_idle(reaper, flags, pidns, terminal)?;
    give_orders(reaper, spawned, order)
}

/// Clones a helper into `flags` (and `pidns`) with fresh stdio; it waits for its orders.
pub fn spawn_idle(
    reaper: &Reaper,
    flags: libc::c_int,
    pidns: Option<&File>,
    terminal: bool,
) -> HelperResult<Spawned> {
    let (ours, theirs) = sync_socket::pair().map_err(|e| format!("socketpair: {e}"))?;
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
pub fn give_orders(
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
    status: &Receiver<ExitStatus>,
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
pub fn await_exec(sync: &SyncSocket) -> HelperResult<()> {
    match sync.recv::<FromHelper>() {
        Ok(None) => Ok(()),
        Ok(Some((FromHelper::Error { message }, _))) => Err(message),
        Ok(Some((other, _))) => Err(format!("unexpected {other:?} from container helper")),
        Err(e) => Err(format!("waiting for exec: {e}")),
    }
}
