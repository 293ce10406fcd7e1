//! The monitor's control socket (`<state dir>/monitor.sock`): one JSON request per connection,
//! one JSON reply. `husk start|kill|pause|resume|ps` talk to the monitor through it.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

pub const SOCKET: &str = "monitor.sock";

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    Start,
    Kill {
        signal: i32,
        all: bool,
    },
    Pause,
    Resume,
    Ps,
    /// Write a checkpoint image into `dir`; the container stops afterwards unless
    /// `leave_running`.
    Checkpoint {
        dir: std::path::PathBuf,
        leave_running: bool,
    },
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Reply {
    Ok,
    /// Done, with something the caller should hear (a pause whose page-out failed).
    Warning {
        message: String,
    },
    Pids {
        pids: Vec<i32>,
    },
    Error {
        message: String,
    },
}

/// Sends `req` to the monitor of the container whose state directory is `dir`.
pub fn call(dir: &Path, req: &Request) -> Result<Reply> {
    call_timeout(dir, req, CALL_TIMEOUT)
}

/// How long a command waits for the monitor's reply (a pause that pages a large guest out
/// to a slow disk is the longest): a monitor that stopped answering must not hang the CLI.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(300);

/// `call`, giving up after `timeout` without a reply.
pub fn call_timeout(dir: &Path, req: &Request, timeout: Duration) -> Result<Reply> {
    let path = dir.join(SOCKET);
    let mut stream = UnixStream::connect(&path).context("container not running")?;
    stream.set_read_timeout(Some(timeout))?;
    let mut line = serde_json::to_vec(req)?;
    line.push(b'\n');
    stream.write_all(&line)?;
    let mut reply = String::new();
    BufReader::new(stream)
        .read_line(&mut reply)
        .context("waiting for the container's monitor")?;
    if reply.is_empty() {
        bail!("the container's monitor closed the connection");
    }
    match serde_json::from_str(&reply)? {
        Reply::Error { message } => bail!("{message}"),
        r => Ok(r),
    }
}

/// The pid of the monitor serving the control socket in `dir` (the peer's credentials,
/// which the kernel took when the monitor listened), if one answers there.
pub fn monitor_pid(dir: &Path) -> Option<i32> {
    use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};
    let stream = UnixStream::connect(dir.join(SOCKET)).ok()?;
    let pid = getsockopt(&stream, PeerCredentials).ok()?.pid();
    (pid > 0).then_some(pid)
}

/// Reads one request from a monitor-side connection.
pub fn read_request(stream: &UnixStream) -> Result<Request> {
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line)?;
    Ok(serde_json::from_str(&line)?)
}

pub fn write_reply(mut stream: &UnixStream, reply: &Reply) -> Result<()> {
    let mut line = serde_json::to_vec(reply)?;
    line.push(b'\n');
    stream.write_all(&line)?;
    Ok(())
}
