//! `husk exec`: runs another process in a running container. The caller talks to the guest
//! agent directly over the VM's vsock socket; with `--detach` a small exec monitor (this same
//! command, re-run in its own session) holds the connection and exits with the process's status.

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use husk_agent::client::Client;
use serde_json::{json, Value};

use super::state::{Status, Store};
use super::stdio::{self, HostStdio};
use crate::vsock;

#[derive(clap::Args, Debug, Clone)]
pub struct ExecOpts {
    /// AF_UNIX socket that receives the pty master with --tty.
    #[arg(long)]
    pub console_socket: Option<PathBuf>,
    /// Working directory in the container.
    #[arg(long)]
    pub cwd: Option<String>,
    /// Set an environment variable (repeatable).
    #[arg(short, long)]
    pub env: Vec<String>,
    /// Allocate a pseudo-TTY.
    #[arg(short, long)]
    pub tty: bool,
    /// UID[:GID].
    #[arg(short, long)]
    pub user: Option<String>,
    /// Additional gids (repeatable).
    #[arg(short = 'g', long)]
    pub additional_gids: Vec<u32>,
    /// An OCI process.json to run instead of the arguments.
    #[arg(short, long)]
    pub process: Option<PathBuf>,
    /// Detach from the process.
    #[arg(short, long)]
    pub detach: bool,
    /// File to write the exec's (monitor's) pid to.
    #[arg(long)]
    pub pid_file: Option<PathBuf>,
    /// Set no_new_privileges for the process.
    #[arg(long)]
    pub no_new_privs: bool,
    /// Add a capability to the process (repeatable).
    #[arg(short, long)]
    pub cap: Vec<String>,
    /// Accepted for runc compatibility.
    #[arg(long, default_value_t = 0)]
    pub preserve_fds: u32,
    /// Allow exec in a paused container.
    #[arg(long)]
    pub ignore_paused: bool,
    /// Accepted for runc compatibility.
    #[arg(long)]
    pub process_label: Option<String>,
    /// Accepted for runc compatibility.
    #[arg(long)]
    pub apparmor: Option<String>,
    /// Accepted for runc compatibility.
    #[arg(long)]
    pub cgroup: Option<String>,
    /// (internal) Readiness pipe of a detached exec monitor.
    #[arg(long, hide = true)]
    pub ready_fd: Option<i32>,
    pub id: String,
    /// Command and arguments.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub args: Vec<String>,
}

/// How long a running guest may take to accept an exec and start its process.
const START_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

pub fn exec(root: &Path, opts: &ExecOpts) -> Result<i32> {
    let store = Store::new(root);
    let st = super::commands::load(&store, &opts.id)?;
    match st.status {
        Status::Stopped => bail!("cannot exec in a stopped container"),
        Status::Paused if !opts.ignore_paused => bail!("cannot exec in a paused container"),
        Status::Created => bail!("cannot exec in a container that has not been started"),
        _ => {}
    }
    let spec: Value = serde_json::from_slice(&std::fs::read(st.bundle.join("config.json"))?)?;
    let process = process(opts, &spec["process"])?;
    if opts.detach && opts.ready_fd.is_none() {
        return detach(root, opts);
    }
    let uds = store.dir(&opts.id).join("vsock.sock");
    // A running guest answers the handshake and the start at once; a wedged one must not hang
    // exec. A paused one answers once resumed (`--ignore-paused`), so it is waited for.
    let stream = match st.status {
        Status::Paused => vsock::connect(&uds, husk_agent::AGENT_VSOCK_PORT)?,
        _ => vsock::connect_timeout(&uds, husk_agent::AGENT_VSOCK_PORT, START_TIMEOUT)?,
    };
    let mut agent = Client::new(stream);
    agent
        .start_exec_in_container(st.guest_id(), &process)
        .context("starting the process in the guest")?;
    let host = match (&opts.console_socket, process["terminal"].as_bool()) {
        (Some(sock), Some(true)) => stdio::terminal(sock)?,
        _ => HostStdio::Inherited,
    };
    if let Some(fd) = opts.ready_fd {
        super::monitor::notify(fd, "ok");
    }
    // The process itself may run and stay silent for as long as it likes.
    let rx = stdio::bridge(vsock::without_timeouts(agent.into_inner())?, host)?;
    match rx.recv() {
        Ok(Ok(status)) => Ok(stdio::exit_code(&status)),
        Ok(Err(message)) => bail!("exec failed: {message}"),
        Err(_) => bail!("exec failed: lost the connection to the guest"),
    }
}

/// The process to run: `--process`, or the container's own process with the flags applied.
fn process(opts: &ExecOpts, base: &Value) -> Result<Value> {
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
fn detach(root: &Path, opts: &ExecOpts) -> Result<i32> {
    let (read, write) = nix::unistd::pipe()?;
    let write_fd = super::commands::high_fd(write)?;
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
        super::commands::write_pid_file(p, child.id() as i32)?;
    }
    Ok(0)
}
