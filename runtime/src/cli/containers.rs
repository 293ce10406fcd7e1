//! The runc lifecycle commands: create, run, start, state, kill, delete, pause, resume, ps,
//! list and exec. Each parses its arguments into the library's options, calls
//! [`Container`](crate::lifecycle::Container) and prints what runc prints.

use std::path::{Path, PathBuf};

use anyhow::Result;
use clap::Args;

use crate::container::signal;
use crate::lifecycle::{Container, CreateOptions, ExecOptions, MonitorErrors};
use crate::logging::monitor_log::MAX_KEPT_ERRORS;
use crate::logging::{LogOptions, Logger};

/// A runc flag Husk accepts but cannot honour, and why: given with anything but its default,
/// the command fails with one line saying so (runc's flags that change nothing in a
/// micro-VM, such as `--no-pivot`, are simply accepted).
pub type Unsupported = (&'static str, &'static str);

const PRESERVE_FDS: Unsupported = (
    "--preserve-fds",
    "file descriptors cannot cross into the micro-VM",
);
pub const NO_LSM: &str = "the micro-VM's kernel has no SELinux or AppArmor";

/// Whether a string flag was given a value (an empty one is runc's default).
pub fn given(v: &Option<String>) -> bool {
    v.as_deref().is_some_and(|s| !s.is_empty())
}

/// The first of `flags` that is set.
pub fn first_set<const N: usize>(flags: [(bool, Unsupported); N]) -> Option<Unsupported> {
    flags
        .into_iter()
        .find_map(|(set, flag)| set.then_some(flag))
}

/// Options shared by `create` and `run`.
#[derive(clap::Args, Debug, Clone)]
pub struct CreateOpts {
    /// Path to the root of the bundle directory.
    #[arg(short, long, default_value = ".")]
    pub bundle: PathBuf,
    /// AF_UNIX socket that receives the pty master when process.terminal is set.
    #[arg(long)]
    pub console_socket: Option<PathBuf>,
    /// File to write the container's (monitor's) pid to.
    #[arg(long)]
    pub pid_file: Option<PathBuf>,
    /// Accepted for runc compatibility; the guest always has its own root.
    #[arg(long)]
    pub no_pivot: bool,
    /// Accepted for runc compatibility (the guest kernel's keyrings are the container's alone).
    #[arg(long)]
    pub no_new_keyring: bool,
    /// Extra fds beyond stdio: only 0, as they cannot cross into the micro-VM.
    #[arg(long, default_value_t = 0)]
    pub preserve_fds: u32,
    /// Cold-boot the micro-VM instead of cloning it from a template.
    #[arg(long)]
    pub no_template: bool,
    pub id: String,
}

impl CreateOpts {
    /// The first flag given that Husk cannot honour (see [`Unsupported`]).
    pub fn unsupported(&self) -> Option<Unsupported> {
        (self.preserve_fds > 0).then_some(PRESERVE_FDS)
    }

    /// The library's options; the monitor logs as `log` says.
    pub fn options(&self, log: &LogOptions) -> CreateOptions {
        CreateOptions {
            id: self.id.clone(),
            bundle: self.bundle.clone(),
            console_socket: self.console_socket.clone(),
            pid_file: self.pid_file.clone(),
            no_template: self.no_template,
            log: log.clone(),
        }
    }
}

#[derive(Args, Debug)]
pub struct RunOpts {
    #[command(flatten)]
    pub create: CreateOpts,
    /// Detach from the container's process.
    #[arg(short, long)]
    pub detach: bool,
    /// Do not delete the container after it exits.
    #[arg(long)]
    pub keep: bool,
    /// Accepted for runc compatibility (the monitor, not husk, waits for the container).
    #[arg(long)]
    pub no_subreaper: bool,
}

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
    /// Extra fds beyond stdio: only 0, as they cannot cross into the micro-VM.
    #[arg(long, default_value_t = 0)]
    pub preserve_fds: u32,
    /// Allow exec in a paused container.
    #[arg(long)]
    pub ignore_paused: bool,
    /// SELinux label: not supported (the guest has no SELinux).
    #[arg(long)]
    pub process_label: Option<String>,
    /// AppArmor profile: not supported (the guest has no AppArmor).
    #[arg(long)]
    pub apparmor: Option<String>,
    /// Sub-cgroup for the process: not supported.
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

impl ExecOpts {
    /// The first flag given that Husk cannot honour (see [`Unsupported`]).
    pub fn unsupported(&self) -> Option<Unsupported> {
        first_set([
            (self.preserve_fds > 0, PRESERVE_FDS),
            (given(&self.process_label), ("--process-label", NO_LSM)),
            (given(&self.apparmor), ("--apparmor", NO_LSM)),
            (
                given(&self.cgroup),
                ("--cgroup", "the process joins the container's cgroup"),
            ),
        ])
    }

    fn options(&self) -> ExecOptions {
        ExecOptions {
            console_socket: self.console_socket.clone(),
            cwd: self.cwd.clone(),
            env: self.env.clone(),
            tty: self.tty,
            user: self.user.clone(),
            additional_gids: self.additional_gids.clone(),
            process: self.process.clone(),
            detach: self.detach,
            pid_file: self.pid_file.clone(),
            no_new_privs: self.no_new_privs,
            cap: self.cap.clone(),
            ignore_paused: self.ignore_paused,
            ready_fd: self.ready_fd,
            args: self.args.clone(),
        }
    }
}

/// `husk create`.
pub fn create(root: &Path, opts: &CreateOpts, log: &LogOptions, logger: &Logger) -> Result<()> {
    Container::create(root, &opts.options(log), logger).map(drop)
}

/// `husk run`: create, start, and (unless detached) wait and delete; exits with the status.
pub fn run(root: &Path, opts: &RunOpts, log: &LogOptions, logger: &Logger) -> Result<i32> {
    let c = Container::create(root, &opts.create.options(log), logger)?;
    if let Err(e) = c.start() {
        if let Ok(Some(errors)) = Container::load(root, c.id()).and_then(|c| c.delete(true, logger))
        {
            report_deleted(logger, c.id(), &errors);
        }
        return Err(e);
    }
    Ok(follow(c, opts.detach, logger))
}

/// The end of `run` and `restore`: in the foreground, waits for the container and deletes
/// it, returning its exit code; detached, returns 0 at once.
pub fn follow(c: Container, detach: bool, logger: &Logger) -> i32 {
    if detach {
        return 0;
    }
    let id = c.id().to_string();
    let ended = c.wait_and_delete(logger);
    if let Some(errors) = &ended.monitor_errors {
        report_deleted(logger, &id, errors);
    }
    ended.code
}

/// "The monitor logged errors, see its log": one warning, in the log (stderr without
/// `--log`), never on stdout, which clients parse.
fn note_monitor_errors(logger: &Logger, id: &str, errors: &MonitorErrors) {
    logger.warn(&format!(
        "container {id}: its monitor logged {}; see {}",
        error_count(errors),
        errors.log.display()
    ));
}

/// After a delete: the note, and when the monitor's log went with the state directory, the
/// error lines themselves (with their own times), so that they outlive it.
fn report_deleted(logger: &Logger, id: &str, errors: &MonitorErrors) {
    if !errors.in_state_dir {
        return note_monitor_errors(logger, id, errors);
    }
    logger.warn(&format!(
        "container {id}: its monitor logged {}, copied below: its log {} goes with it",
        error_count(errors),
        errors.log.display()
    ));
    errors.entries.iter().for_each(|e| logger.entry(e));
}

fn error_count(errors: &MonitorErrors) -> String {
    match errors.entries.len() {
        1 => "1 error".to_string(),
        n if n >= MAX_KEPT_ERRORS => format!("{n} or more errors"),
        n => format!("{n} errors"),
    }
}

pub fn start(root: &Path, id: &str) -> Result<()> {
    Container::load(root, id)?.start()
}

/// `husk state`: runc's JSON on stdout, exactly; a note on the log if the monitor logged errors.
pub fn state(root: &Path, id: &str, logger: &Logger) -> Result<()> {
    let c = Container::load(root, id)?;
    println!("{}", serde_json::to_string_pretty(&c.state().oci_json())?);
    if let Some(errors) = c.monitor_errors() {
        note_monitor_errors(logger, id, &errors);
    }
    Ok(())
}

pub fn kill(root: &Path, id: &str, sig: &str, all: bool) -> Result<()> {
    let signal = signal::parse(sig)?;
    Container::load(root, id)?.kill(signal, all)
}

/// `husk delete`: what the monitor logged at error level is reported (see `report_deleted`).
/// With `force`, a container whose state cannot be read is still removed (see
/// [`Container::recover`]), with a warning that says why its state was unreadable.
pub fn delete(root: &Path, id: &str, force: bool, logger: &Logger) -> Result<()> {
    let c = match Container::load(root, id) {
        Ok(c) => c,
        Err(e) if force => match Container::recover(root, id) {
            Ok(c) => {
                logger.warn(&format!(
                    "container {id}: {e:#}; removing what is found of it"
                ));
                c
            }
            Err(_) => return Err(e),
        },
        Err(e) => return Err(e),
    };
    if let Some(errors) = c.delete(force, logger)? {
        report_deleted(logger, id, &errors);
    }
    Ok(())
}

/// `husk pause`: a container paused with its memory left in RAM gets a warning saying why.
pub fn pause(root: &Path, id: &str, logger: &Logger) -> Result<()> {
    if let Some(warning) = Container::load(root, id)?.pause()? {
        logger.warn(&format!("container {id}: {warning}"));
    }
    Ok(())
}

pub fn resume(root: &Path, id: &str) -> Result<()> {
    Container::load(root, id)?.resume()
}

pub fn ps(root: &Path, id: &str, json: bool) -> Result<()> {
    let pids = Container::load(root, id)?.processes()?;
    if json {
        println!("{}", serde_json::to_string(&pids)?);
    } else {
        println!("PID");
        pids.iter().for_each(|p| println!("{p}"));
    }
    Ok(())
}

pub fn list(root: &Path, json: bool, quiet: bool) -> Result<()> {
    let all = Container::list(root);
    if quiet {
        all.iter().for_each(|c| println!("{}", c.id()));
    } else if json {
        let v: Vec<_> = all.iter().map(|c| c.state().oci_json()).collect();
        println!("{}", serde_json::to_string(&v)?);
    } else {
        println!("ID\tPID\tSTATUS\tBUNDLE\tCREATED\tOWNER");
        for s in all.iter().map(Container::state) {
            let pid = s.oci_json()["pid"].clone();
            let b = s.bundle.display();
            println!("{}\t{pid}\t{}\t{b}\t{}\troot", s.id, s.status, s.created);
        }
    }
    Ok(())
}

/// `husk exec`: its exit code is the process's.
pub fn exec(root: &Path, opts: &ExecOpts, logger: &Logger) -> Result<i32> {
    Container::load(root, &opts.id)?.exec(&opts.options(), logger)
}
