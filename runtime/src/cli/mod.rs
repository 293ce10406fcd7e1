//! `husk`'s command line, runc-compatible where runc has the command: the top-level clap types
//! here, and a file per group of commands that parses their arguments, calls the library and
//! prints: `containers` (the lifecycle commands), `checkpoints` (checkpoint and restore),
//! `oci_info` (features and spec), and Husk's own `guest_tools` (boot and vm),
//! `template_cmd` and `benchmarks`. `deferred` keeps clap from building the arguments of
//! subcommands not run.

mod benchmarks;
mod checkpoints;
mod containers;
mod deferred;
mod guest_tools;
mod oci_info;
mod template_cmd;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use clap::{Args, Parser, Subcommand};

use self::checkpoints::{CheckpointOpts, RestoreOpts};
use self::containers::{CreateOpts, ExecOpts, RunOpts, Unsupported};
pub use self::deferred::Deferred;
use crate::logging::{LogFormat, LogOptions, Logger};
use crate::monitor::{self, MonitorArgs};

#[derive(Parser, Debug)]
#[command(name = "husk", version, about = "OCI containers in KVM micro-VMs")]
struct Cli {
    /// Root directory for container state (should be on tmpfs).
    #[arg(long, global = true, default_value = "/run/husk")]
    root: PathBuf,
    /// Log file (default: stderr).
    #[arg(long, global = true)]
    log: Option<PathBuf>,
    /// Log format.
    #[arg(long, global = true, value_enum, default_value = "text")]
    log_format: LogFormat,
    /// Debug logging.
    #[arg(long, global = true)]
    debug: bool,
    /// systemd cgroup driver (not supported).
    #[arg(long, global = true)]
    systemd_cgroup: bool,
    /// Accepted for runc compatibility (checkpoints are Husk's own).
    #[arg(long, global = true, hide = true)]
    criu: Option<String>,
    /// Accepted for runc compatibility (it relaxes cgroup and mount checks runc makes as a
    /// non-root user; Husk has none of them to relax).
    #[arg(long, global = true, hide = true)]
    rootless: Option<String>,
    #[command(subcommand)]
    command: Command,
}

/// The subcommands. Those with more than a few arguments take them through `Deferred`, so that
/// clap builds only the arguments of the subcommand being run.
#[derive(Subcommand, Debug)]
enum Command {
    /// Create a container (its micro-VM boots; the process waits for `start`).
    Create(Deferred<CreateOpts>),
    /// Start the process of a created container.
    Start { id: String },
    /// Create and start a container, and wait for it unless detached.
    Run(Deferred<RunOpts>),
    /// Output the state of a container (runc's JSON).
    State { id: String },
    /// Send a signal (default SIGTERM) to the container's process.
    Kill {
        /// Signal every process of the container.
        #[arg(short, long)]
        all: bool,
        id: String,
        #[arg(default_value = "SIGTERM")]
        signal: String,
    },
    /// Delete a container and everything it holds.
    Delete {
        /// Kill it first if it still runs.
        #[arg(short, long)]
        force: bool,
        id: String,
    },
    /// Suspend every process of the container.
    Pause { id: String },
    /// Resume a paused container.
    Resume { id: String },
    /// List the container's processes (guest pids).
    Ps {
        #[arg(short, long, default_value = "table")]
        format: String,
        id: String,
    },
    /// List containers.
    List {
        #[arg(short, long, default_value = "table")]
        format: String,
        #[arg(short, long)]
        quiet: bool,
    },
    /// Run a new process inside a running container.
    Exec(Deferred<ExecOpts>),
    /// Write the container's whole micro-VM to a directory (and stop it, unless told not to).
    Checkpoint(Deferred<CheckpointOpts>),
    /// Bring a checkpointed container back, running, in a new micro-VM monitor.
    Restore(Deferred<RestoreOpts>),
    /// Print the features Husk honours (runc's JSON).
    Features,
    /// Write a default config.json for a bundle.
    Spec {
        /// Where to write config.json.
        #[arg(short, long, default_value = ".")]
        bundle: PathBuf,
    },
    /// Boot the default guest to a ready agent, report the time, and power it off.
    Boot(Deferred<guest_tools::BootArgs>),
    /// Run the bare VMM until the guest powers off.
    Vm(Deferred<guest_tools::VmArgs>),
    /// Templates: warmed guest snapshots every container's micro-VM is cloned from.
    #[command(subcommand)]
    Template(Deferred<template_cmd::TemplateCmd>),
    /// Benchmarks against a reference measured in the same run.
    #[command(subcommand)]
    Bench(Deferred<benchmarks::BenchCmd>),
    /// (internal) The per-container monitor started by `create`.
    #[command(hide = true)]
    Monitor(Deferred<MonitorOpts>),
}

#[derive(Args, Debug)]
struct MonitorOpts {
    #[arg(long)]
    bundle: PathBuf,
    #[arg(long)]
    console_socket: Option<PathBuf>,
    #[arg(long)]
    ready_fd: Option<i32>,
    /// Clone the VM from this template instead of booting it.
    #[arg(long)]
    template: Option<String>,
    /// Restore the VM from this checkpoint instead of booting it.
    #[arg(long)]
    restore: Option<PathBuf>,
    id: String,
}

impl MonitorOpts {
    fn into_args(self, root: PathBuf, log: LogOptions) -> MonitorArgs {
        MonitorArgs {
            root,
            log,
            id: self.id,
            bundle: self.bundle,
            console_socket: self.console_socket,
            ready_fd: self.ready_fd,
            template: self.template,
            restore: self.restore,
        }
    }
}

/// `husk`: parses the command line, runs the command, and turns its end into an exit code.
pub fn main() -> ExitCode {
    let started = Instant::now();
    let cli = Cli::parse();
    let logger = match Logger::new(cli.log.as_deref(), cli.log_format, cli.debug) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("husk: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    // Before anything is created: a refused command leaves nothing behind.
    if let Some((flag, why)) = unsupported(&cli) {
        logger.error(&format!("{flag} is not supported by husk: {why}"));
        return ExitCode::FAILURE;
    }
    match dispatch(cli, started, &logger) {
        Ok(code) => ExitCode::from(code as u8),
        Err((prefix, e)) => {
            logger.error(&format!("{prefix}{e:#}"));
            ExitCode::FAILURE
        }
    }
}

/// The first flag on the command line that Husk accepts but cannot honour, and why.
fn unsupported(cli: &Cli) -> Option<Unsupported> {
    match &cli.command {
        _ if cli.systemd_cgroup => Some(("--systemd-cgroup", "Husk manages cgroupfs cgroups")),
        Command::Create(Deferred(o)) => o.unsupported(),
        Command::Run(Deferred(o)) => o.create.unsupported(),
        Command::Exec(Deferred(o)) => o.unsupported(),
        Command::Checkpoint(Deferred(o)) => o.unsupported(),
        Command::Restore(Deferred(o)) => o.unsupported(),
        _ => None,
    }
}

type Failure = (&'static str, anyhow::Error);

fn dispatch(cli: Cli, started: Instant, logger: &Logger) -> Result<i32, Failure> {
    let root = cli.root;
    // Absolute: the monitor hands it on to processes that may run elsewhere.
    let log = LogOptions {
        file: cli.log.map(|f| std::path::absolute(&f).unwrap_or(f)),
        format: cli.log_format,
        debug: cli.debug,
    };
    let plain = |r: anyhow::Result<()>| r.map(|()| 0).map_err(|e| ("", e));
    match cli.command {
        Command::Create(Deferred(opts)) => containers::create(&root, &opts, &log, logger)
            .map(|()| 0)
            .map_err(|e| ("husk create failed: ", e)),
        Command::Run(Deferred(opts)) => {
            containers::run(&root, &opts, &log, logger).map_err(|e| ("husk run failed: ", e))
        }
        Command::Start { id } => plain(containers::start(&root, &id)),
        Command::State { id } => plain(containers::state(&root, &id, logger)),
        Command::Kill { all, id, signal } => plain(containers::kill(&root, &id, &signal, all)),
        Command::Delete { force, id } => plain(containers::delete(&root, &id, force, logger)),
        Command::Pause { id } => plain(containers::pause(&root, &id, logger)),
        Command::Resume { id } => plain(containers::resume(&root, &id)),
        Command::Ps { format, id } => plain(containers::ps(&root, &id, format == "json")),
        Command::List { format, quiet } => plain(containers::list(&root, format == "json", quiet)),
        Command::Exec(Deferred(opts)) => {
            containers::exec(&root, &opts, logger).map_err(|e| ("", e))
        }
        Command::Checkpoint(Deferred(opts)) => checkpoints::checkpoint(&root, &opts)
            .map(|()| 0)
            .map_err(|e| ("husk checkpoint failed: ", e)),
        Command::Restore(Deferred(opts)) => checkpoints::restore(&root, &opts, &log, logger)
            .map_err(|e| ("husk restore failed: ", e)),
        Command::Features => plain(oci_info::features()),
        Command::Spec { bundle } => plain(oci_info::spec(&bundle)),
        Command::Monitor(Deferred(opts)) => Ok(monitor::run(opts.into_args(root, log))),
        Command::Boot(Deferred(args)) => own_command(guest_tools::boot(&args, started).map(|()| 0)),
        Command::Vm(Deferred(args)) => own_command(guest_tools::vm(args).map(|()| 0)),
        Command::Bench(Deferred(cmd)) => own_command(benchmarks::run(cmd)),
        Command::Template(Deferred(cmd)) => own_command(template_cmd::run(cmd).map(|()| 0)),
    }
}

/// Husk's own commands report errors as `husk: <message>` on one line; `Ok` holds the exit code.
fn own_command(r: anyhow::Result<i32>) -> Result<i32, Failure> {
    match r {
        Ok(code) => Ok(code),
        Err(e) => {
            eprintln!("husk: {e:#}");
            Ok(1)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        // Builds every (deferred) subcommand and runs clap's own checks on it.
        Cli::command().debug_assert();
    }

    #[test]
    fn deferred_subcommand_takes_global_and_own_flags() {
        let argv = [
            "husk",
            "--root",
            "/r",
            "run",
            "--log-format",
            "json",
            "-d",
            "-b",
            "/b",
            "c1",
        ];
        let cli = Cli::try_parse_from(argv).unwrap();
        assert_eq!(cli.root, PathBuf::from("/r"));
        assert_eq!(cli.log_format, LogFormat::Json);
        let Command::Run(Deferred(run)) = cli.command else {
            panic!("parsed as {:?}", cli.command)
        };
        assert!(run.detach);
        assert_eq!(run.create.bundle, PathBuf::from("/b"));
        assert_eq!(run.create.id, "c1");
    }

    #[test]
    fn an_execed_monitor_gets_the_log_flags_of_create() {
        let args = MonitorArgs {
            root: "/r".into(),
            id: "c1".into(),
            bundle: "/b".into(),
            console_socket: None,
            ready_fd: Some(101),
            template: Some("default".into()),
            restore: None,
            log: LogOptions {
                file: Some("/var/log/oci-log".into()),
                format: LogFormat::Json,
                debug: true,
            },
        };
        let argv = std::iter::once("husk".into()).chain(monitor::launch::monitor_argv(&args));
        let cli = Cli::try_parse_from(argv).unwrap();
        assert_eq!(
            cli.log.as_deref(),
            Some(std::path::Path::new("/var/log/oci-log"))
        );
        assert_eq!(cli.log_format, LogFormat::Json);
        assert!(cli.debug);
        let Command::Monitor(Deferred(opts)) = cli.command else {
            panic!("parsed as {:?}", cli.command)
        };
        assert_eq!((opts.id.as_str(), opts.ready_fd), ("c1", Some(101)));
        assert_eq!(opts.template.as_deref(), Some("default"));
    }

    /// The flag `unsupported` names for this command line, if any.
    fn refused(argv: &[&str]) -> Option<&'static str> {
        let cli = Cli::try_parse_from(std::iter::once("husk").chain(argv.iter().copied()));
        unsupported(&cli.unwrap()).map(|(flag, _)| flag)
    }

    #[test]
    fn flags_that_cannot_be_honoured_are_refused_only_when_given() {
        let image = ["--image-path", "/i"];
        let cases: &[(&[&str], Option<&str>)] = &[
            (&["create", "--preserve-fds", "0", "--no-pivot", "c"], None),
            (
                &["create", "--preserve-fds", "2", "c"],
                Some("--preserve-fds"),
            ),
            (&["run", "--preserve-fds=1", "c"], Some("--preserve-fds")),
            (
                &[
                    "exec",
                    "--preserve-fds",
                    "0",
                    "--process-label",
                    "",
                    "c",
                    "true",
                ],
                None,
            ),
            (
                &["exec", "--apparmor", "p", "c", "true"],
                Some("--apparmor"),
            ),
            (
                &["exec", "--process-label", "l", "c", "true"],
                Some("--process-label"),
            ),
            (&["exec", "--cgroup", "sub", "c", "true"], Some("--cgroup")),
            (
                &[
                    "checkpoint",
                    image[0],
                    image[1],
                    "--work-path",
                    "/w",
                    "--tcp-established",
                    "c",
                ],
                None,
            ),
            (
                &["checkpoint", image[0], image[1], "--status-fd", "3", "c"],
                Some("--status-fd"),
            ),
            (
                &[
                    "checkpoint",
                    image[0],
                    image[1],
                    "--page-server",
                    "h:1",
                    "c",
                ],
                Some("--page-server"),
            ),
            (
                &["checkpoint", image[0], image[1], "--lazy-pages", "c"],
                Some("--lazy-pages"),
            ),
            (
                &["restore", image[0], image[1], "-d", "--file-locks", "c"],
                None,
            ),
            (
                &["restore", image[0], image[1], "--tcp-close", "c"],
                Some("--tcp-close"),
            ),
            (
                &["restore", image[0], image[1], "--lsm-profile", "p", "c"],
                Some("--lsm-profile"),
            ),
            (
                &["restore", image[0], image[1], "--preserve-fds", "1", "c"],
                Some("--preserve-fds"),
            ),
            (
                &["--systemd-cgroup", "create", "c"],
                Some("--systemd-cgroup"),
            ),
            (&["kill", "c", "KILL"], None),
        ];
        for (argv, want) in cases {
            assert_eq!(refused(argv), *want, "{argv:?}");
        }
    }

    #[test]
    fn deferred_subcommand_keeps_its_own_help_text() {
        let mut cli = Cli::command();
        cli.build();
        let run = cli.find_subcommand("run").unwrap();
        let about = run.get_about().map(|a| a.to_string());
        assert_eq!(
            about.as_deref(),
            Some("Create and start a container, and wait for it unless detached")
        );
    }
}
