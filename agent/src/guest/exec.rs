//! Running one `Exec` request: spawn, pump output into frames, report the exit status.

use std::io::{self, Read};
use std::process::{ChildStdin, Command, Stdio};
use std::thread::{self, JoinHandle};

use husk_agent::proto::{ExecRequest, ExitStatus, FrameKind, Response, MAX_DATA_CHUNK};

use super::agent_state::AgentState;
use super::host_conn::{Running, Sender};
use super::lock::lock;

/// Starts `req`; output and the final `Exit` go to `out` from background threads. Returns the
/// child's stdin when `req.stdin` asked for a pipe.
pub fn start(
    req: &ExecRequest,
    state: &AgentState,
    out: &Sender,
    running: &Running,
) -> Result<Option<ChildStdin>, String> {
    let mut cmd = command(req, state)?;
    let (mut child, status_rx) = state
        .reaper
        .spawn(&mut cmd)
        .map_err(|e| format!("exec {:?}: {e}", req.argv[0]))?;
    let pid = child.id() as i32;
    *lock(running) = Some(pid);
    let pumps = [
        child
            .stdout
            .take()
            .map(|s| pump(s, FrameKind::Stdout, out.clone())),
        child
            .stderr
            .take()
            .map(|s| pump(s, FrameKind::Stderr, out.clone())),
    ];
    let status = move || status_rx.recv().unwrap_or_default();
    let waiter = spawn_waiter(pumps, status, out.clone(), Some(running.clone()));
    if let Err(e) = waiter {
        // Without a waiter nobody would report the exit: stop the child and fail the request.
        let _ = state.reaper.signal(pid, libc::SIGKILL);
        *lock(running) = None;
        return Err(format!("exec: starting waiter thread: {e}"));
    }
    Ok(child.stdin.take())
}

/// Reports `Exit` once the output is drained and the status is in, in that order, so the
/// host gets every byte before the status.
/// `status` blocks until the status is known (a closed reaper channel gives "unknown" rather
/// than a hang); `running`, if any, is cleared just before `Exit` goes out.
pub fn spawn_waiter(
    pumps: [Option<io::Result<JoinHandle<()>>>; 2],
    status: impl FnOnce() -> ExitStatus + Send + 'static,
    out: Sender,
    running: Option<Running>,
) -> io::Result<JoinHandle<()>> {
    thread::Builder::new()
        .name("exec-wait".into())
        .spawn(move || {
            for handle in pumps.into_iter().flatten() {
                let _ = handle.map(JoinHandle::join);
            }
            let status = status();
            if let Some(running) = running {
                *lock(&running) = None;
            }
            let _ = out.send(&Response::Exit(status).into());
        })
}

/// Builds the command: a fresh environment of `PATH` plus the request's entries.
fn command(req: &ExecRequest, state: &AgentState) -> Result<Command, String> {
    let (program, args) = req
        .argv
        .split_first()
        .ok_or_else(|| "exec: empty argv".to_string())?;
    let mut cmd = Command::new(program);
    cmd.args(args).env_clear().env("PATH", &state.default_path);
    for entry in &req.env {
        let (key, value) = entry
            .split_once('=')
            .filter(|(k, _)| !k.is_empty())
            .ok_or_else(|| format!("exec: env entry {entry:?} is not KEY=VALUE"))?;
        cmd.env(key, value);
    }
    if let Some(cwd) = &req.cwd {
        cmd.current_dir(cwd);
    }
    let stdin = if req.stdin {
        Stdio::piped()
    } else {
        Stdio::null()
    };
    cmd.stdin(stdin)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    Ok(cmd)
}

/// Copies a pipe into data frames on its own thread. Keeps draining after the connection
/// fails, so the child never blocks on a full pipe and can still exit.
pub fn pump(
    mut src: impl Read + Send + 'static,
    kind: FrameKind,
    out: Sender,
) -> io::Result<JoinHandle<()>> {
    thread::Builder::new()
        .name(format!("exec-{kind:?}"))
        .spawn(move || {
            let mut buf = vec![0u8; MAX_DATA_CHUNK];
            let mut connected = true;
            loop {
                match src.read(&mut buf) {
                    Ok(0) => return,
                    Ok(n) if connected => connected = out.send_data(kind, &buf[..n]).is_ok(),
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => return,
                }
            }
        })
}
