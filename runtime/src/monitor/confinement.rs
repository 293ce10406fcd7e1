//! The monitor confines itself once the VM is set up and the container created: from then on
//! it only runs the guest, serves its devices and answers control requests, so each of its
//! threads keeps only the capabilities and system calls that takes (see `husk_vmm::confine`
//! for the lists, and README.md for the kept capabilities). `HUSK_CONFINE=0` turns it off, for
//! finding out whether confinement is what breaks a container.
//!
//! A system call outside its thread's list kills the monitor after one line on its stderr,
//! the same as an error entry in its log and its kept errors, where `state` and `delete` find
//! it. `HUSK_SECCOMP=log` lets such calls through instead, logged by the host kernel
//! (SECCOMP_RET_LOG), for finding what a list lacks without losing the container.

use std::fs::File;
use std::os::fd::AsRawFd;

use anyhow::{Context, Result};
use husk_vmm::confine::{self, confine_process, Limits, LogTarget};
use husk_vmm::devices::virtio::fs9p::HOST_FDS_PER_SHARE;

use crate::container::trace::Trace;
use crate::logging::monitor_log::MonitorLog;
use crate::logging::LogFormat;

/// Set to 0 to leave the monitor unconfined.
pub const CONFINE_ENV: &str = "HUSK_CONFINE";

/// Set to `log` to let system calls outside the allow-lists through, logged.
pub const SECCOMP_ENV: &str = "HUSK_SECCOMP";

/// Fds the monitor holds besides its shares': vsock connections (256), the VM, its devices,
/// eventfds, the control socket and stdio, with room to spare.
const OTHER_FDS: u64 = 1024;

/// Confines every thread of the monitor unless `HUSK_CONFINE=0`. `shares` is the number of
/// 9p shares the guest has (each may hold `HOST_FDS_PER_SHARE` fds); a forbidden call's line
/// goes to `log` too.
pub(super) fn confine(shares: usize, log: &MonitorLog, trace: &Trace) -> Result<()> {
    if std::env::var_os(CONFINE_ENV).is_some_and(|v| v == "0") {
        trace.mark("not confined (HUSK_CONFINE=0)");
        return Ok(());
    }
    // Kept open until the handler has its own duplicates.
    let logs = log.last_words_logs();
    let limits = Limits {
        open_files: HOST_FDS_PER_SHARE * shares as u64 + OTHER_FDS,
        report_fd: libc::STDERR_FILENO,
        logs: log_targets(&logs),
        log_only: std::env::var_os(SECCOMP_ENV).is_some_and(|v| v == "log"),
    };
    confine_process(&limits).context("confining the monitor")?;
    trace.mark("confined");
    Ok(())
}

/// The confinement's view of the monitor's log files.
fn log_targets(logs: &[(File, LogFormat)]) -> Vec<LogTarget> {
    logs.iter()
        .map(|(f, format)| LogTarget {
            fd: f.as_raw_fd(),
            format: match format {
                LogFormat::Text => confine::LogFormat::Text,
                LogFormat::Json => confine::LogFormat::Json,
            },
        })
        .collect()
}

#[cfg(test)]
mod tests;
