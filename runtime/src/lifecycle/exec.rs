//! `exec`: runs another process in a running container. The caller talks to the guest agent
//! directly over the VM's vsock socket; detached, a small exec monitor (this process's `exec`
//! command line, re-run in its own session) holds the connection and exits with the process's
//! status.

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use husk_agent::client::Client;
use serde_json::{json, Value};

use super::create::{high_fd, write_pid_file};
use super::Container;
use crate::container::capabilities;
use crate::container::state::Status;
use crate::guest_port;
use crate::logging::Logger;
use crate::monitor::stdio::{self, HostStdio};

/// What `exec` runs, and how.
#[derive(Debug, Clone, Default)]
pub struct ExecOptions {
    /// AF_UNIX socket that receives the pty master with `tty`.
    pub console_socket: Option<PathBuf>,
    /// Working directory in the container.
    pub cwd: Option<String>,
    /// Environment variables added to the container process's.
    pub env: Vec<String>,
    /// Allocate a pseudo-TTY.
    pub tty: bool,
    /// `UID[:GID]`.
    pub user: Option<String>,
    /// Additional gids.
    pub additional_gids: Vec<u32>,
    /// An OCI process.json to run instead of `args`.
    pub process: Option<PathBuf>,
    /// Return once the process runs: a detached exec monitor (this process's command line
    /// run again, with `ready_fd`) holds its stdio.
    pub detach: bool,
    /// File to write the exec monitor's pid to.
    pub pid_file: Option<PathBuf>,
    /// Set no_new_privileges for the process.
    pub no_new_privs: bool,
    /// Capabilities added to the process.
    pub cap: Vec<String>,
    /// Allow exec in a paused container.
    pub ignore_paused: bool,
    /// Readiness pipe of a detached exec monitor.
    pub ready_fd: Option<i32>,
    /// Command and arguments.
    pub args: Vec<String>,
}

/// How long a running guest may take to accept an exec and start its process.
const START_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

impl Container {
    /// Runs another process in the running container; its exit code, or 0 once it runs when
    /// detached. Warnings go to `logger`.
    pub fn exec(&self, opts: &ExecOptions, logger: &Logger) -> Result<i32> {
        exec(self, opts, logger)
    }
}

fn exec(c: &Container, opts: &ExecOptions, logger: &Logger) -> Result<i32> {
    let st = &c.state;
    match st.status {
        Status::Stopped => bail!("cannot exec in a stopped container"),
        Status::Paused if !opts.ignore_paused => bail!("cannot exec in a paused container"),
        Status::Created => bail!("cannot exec in a container that has not been started"),
        _ => {}
    }
    let spec: Value = serde_json::from_slice(&std::fs::read(st.bundle.join("config.json"))?)?;
    let mut process = process(opts, &spec["process"])?;
    let unknown = capabilities::drop_unknown(&mut process);
    // A detached exec's monitor runs this again: the command it detached from has warned.
    if !unknown.is_empty() && opts.ready_fd.is_none() {
        logger.warn(&capabilities::warning(&unknown));
    }
    if opts.detach && opts.ready_fd.is_none() {
        return detach(c.store.root(), opts);
    }
    let uds = c.store.dir(&st.id).join("vsock.sock");
    // A running guest answers the handshake and the start at once; a wedged one must not hang
    // exec. A paused one answers once resumed (`--ignore-paused`), so it is waited for.
    let stream = match st.status {
        Status::Paused => guest_port::connect(&uds, husk_agent::AGENT_VSOCK_PORT)?,
        _ => guest_port::connect_timeout(&uds, husk_agent::AGENT_VSOCK_PORT, START_TIMEOUT)?,
    };
    let mut agent = Client::new(stream);
    agent
        .start_exec_in_container(st.guest_id(), &process)
        .context("starting the process in the guest")?;
    let host = match (&opts.console_socket, process["terminal"].as_bool()) {
        (Some(sock), Some(true)) => stdio::terminal(sock)?,
        _ => HostStdio::Inherited,
    };
    // A detached exec's monitor reports through the readiness pipe, not the caller's stdio.
    if matches!(host, HostStdio::Terminal(_)) && opts.ready_fd.is_some() {
        stdio::release_caller_stdio()?;
    }
    if let Some(fd) = opts.ready_fd {
        crate::monitor::notify(fd, "ok");
    }
    // The process itself may run and stay silent for as long as it likes.
    let rx = stdio::bridge(guest_port::without_timeouts(agent.into_inner())?, host)?;
    match rx.recv() {
        Ok(Ok(status)) => Ok(stdio::exit_code(&status)),
        Ok(Err(message)) => bail!("exec failed: {message}"),
        Err(_) => bail!("exec failed: lost the connection to the guest"),
    }
}

/// The process to run: `--process`, or the container's own process with the flags applied.
fn process(opts: &ExecOptions, base: &Value) -> Result<Value> {
    if let Some(p) = &opts.process {
        let text = std::fs::read(p).with_context(|| format!("reading {}", p.display()))?;
        return serde_json::from_slice(&text).with_context(|| format!("parsing {}", p.display()));
    }
    if opts.args.is_empty() {
        bail!("exec: no command given");
    }
    let mut p = base.clone();
    p["args"] = json!(opts.args);
    p["terminal"] = json!(opts.tty);
    if let Some(cwd) = &opts.cwd {
        p["cwd"] = json!(cwd);
    }
    let mut env: Vec<Value> = p["env"].as_array().cloned().unwrap_or_default();
    env.extend(opts.env.iter().map(|e| json!(e)));
    p["env"] = Value::Array(env);
    if let Some(user) = &opts.user {
        p["user"] = user_json(user, &opts.additional_gids)?;
    }
    if opts.no_new_privs {
        p["noNewPrivileges"] = json!(true);
    }
    for cap in &opts.cap {
        for set in ["bounding", "effective", "permitted"] {
            if let Some(list) = p["capabilities"][set].as_array_mut() {
                list.push(json!(cap));
            }
        }
    }
    Ok(p)
}

fn user_json(user: &str, additional: &[u32]) -> Result<Value> {
    let (uid, gid) = user.split_once(':').unwrap_or((user, "0"));
    let (Ok(uid), Ok(gid)) = (uid.parse::<u32>(), gid.parse::<u32>()) else {
        bail!("invalid --user {user:?}: want UID[:GID]");
    };
    let mut u = json!({ "uid": uid, "gid": gid });
    if !additional.is_empty() {
        u["additionalGids"] = json!(additional);
    }
    Ok(u)
}

/// Re-runs this exec as a session leader that holds the stdio; returns once it started.
fn detach(root: &Path, opts: &ExecOptions) -> Result<i32> {
    let (read, write) = nix::unistd::pipe()?;
    let write_fd = high_fd(write)?;
    let mut cmd = Command::new(std::env::current_exe()?);
    // Options must precede the container id, so --ready-fd goes right after "exec".
    cmd.arg("--root").arg(root).arg("exec");
    cmd.arg("--ready-fd").arg(write_fd.to_string());
    cmd.args(std::env::args().skip_while(|a| a != "exec").skip(1));
    // SAFETY: only async-signal-safe calls (setsid, fcntl) between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            libc::setsid();
            libc::fcntl(write_fd, libc::F_SETFD, 0);
            Ok(())
        });
    }
    let mut child = cmd.spawn().context("starting the exec monitor")?;
    // SAFETY: write_fd is ours; the child has its own copy.
    unsafe { libc::close(write_fd) };
    let mut line = String::new();
    BufReader::new(std::fs::File::from(read)).read_line(&mut line)?;
    if line.trim_end() != "ok" {
        let _ = child.wait();
        bail!("{}", line.trim_end());
    }
    if let Some(p) = &opts.pid_file {
        write_pid_file(p, child.id() as i32)?;
    }
    Ok(0)
}
