//! Starting a container's monitor from `create`: forked straight into `monitor::run` when the
//! caller is single-threaded, else a fresh `husk monitor` process.
//!
//! The fork spares the exec of the husk binary and its start-up, a large share of a clone's
//! create where every process start is slow (an emulated host such as the lab). Either way
//! the monitor is a child of the caller in a session of its own, and holds exactly the fds an
//! exec would have kept: close-on-exec ones are closed in the forked child too.

use std::ffi::OsString;
use std::os::unix::process::CommandExt;
use std::process::Command;

use anyhow::{Context, Result};
use nix::unistd::{fork, ForkResult};

use super::MonitorArgs;

/// Starts the monitor for `args`; returns its pid. `args.ready_fd` is close-on-exec in the
/// caller; the monitor gets its own copy, open.
pub fn start(args: MonitorArgs) -> Result<i32> {
    if !single_threaded() {
        return exec_monitor(&args);
    }
    // Nothing buffered may be written twice, once by each process.
    let _ = std::io::Write::flush(&mut std::io::stdout());
    // SAFETY: this process has one thread (checked above), so the child is a complete copy
    // and may go on running ordinary Rust code.
    match unsafe { fork() }.context("starting the monitor")? {
        ForkResult::Parent { child } => Ok(child.as_raw()),
        ForkResult::Child => {
            nix::unistd::setsid().ok();
            close_cloexec_fds(args.ready_fd);
            let code = super::run(args);
            std::process::exit(code)
        }
    }
}

/// Whether the calling process has a single thread (the only case where fork is safe).
fn single_threaded() -> bool {
    std::fs::read_dir("/proc/self/task").is_ok_and(|d| d.count() == 1)
}

/// Closes what an exec would have: every close-on-exec fd but `keep`.
fn close_cloexec_fds(keep: Option<i32>) {
    let Ok(dir) = std::fs::read_dir("/proc/self/fd") else {
        return;
    };
    // Collected first: the directory's own fd must stay open while it is read.
    let fds: Vec<i32> = dir
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    for fd in fds {
        if Some(fd) == keep {
            continue;
        }
        // SAFETY: F_GETFD only queries; close(2) of an fd nothing in this process uses again
        // (the forked child never returns into the frames that own them).
        unsafe {
            let flags = libc::fcntl(fd, libc::F_GETFD);
            if flags >= 0 && flags & libc::FD_CLOEXEC != 0 {
                libc::close(fd);
            }
        }
    }
}

/// `husk monitor …` as a new process.
fn exec_monitor(args: &MonitorArgs) -> Result<i32> {
    let mut cmd = Command::new(std::env::current_exe()?);
    cmd.args(monitor_argv(args));
    let ready_fd = args.ready_fd;
    // SAFETY: only async-signal-safe calls (setsid, fcntl) between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            libc::setsid();
            // Keep the readiness pipe open across exec (it was made close-on-exec).
            if let Some(fd) = ready_fd {
                libc::fcntl(fd, libc::F_SETFD, 0);
            }
            Ok(())
        });
    }
    let child = cmd.spawn().context("starting the monitor")?;
    Ok(child.id() as i32)
}

/// The command line (after the program's name) that runs the monitor for `args`.
pub fn monitor_argv(args: &MonitorArgs) -> Vec<OsString> {
    let mut argv: Vec<OsString> = vec!["--root".into(), args.root.clone().into()];
    if let Some(log) = &args.log.file {
        argv.extend(["--log".into(), log.clone().into()]);
    }
    argv.extend(["--log-format".into(), args.log.format.name().into()]);
    if args.log.debug {
        argv.push("--debug".into());
    }
    argv.extend([
        "monitor".into(),
        "--bundle".into(),
        args.bundle.clone().into(),
    ]);
    if let Some(fd) = args.ready_fd {
        argv.extend(["--ready-fd".into(), fd.to_string().into()]);
    }
    if let Some(s) = &args.console_socket {
        argv.extend(["--console-socket".into(), s.clone().into()]);
    }
    if let Some(t) = &args.template {
        argv.extend(["--template".into(), t.into()]);
    }
    if let Some(dir) = &args.restore {
        argv.extend(["--restore".into(), dir.clone().into()]);
    }
    argv.push(args.id.clone().into());
    argv
}
