use std::time::{Duration, SystemTime};

use husk_vmm::confine::{thread_started, ThreadKind};
use log::{Level, Log, Record};

use super::*;
use crate::logging::monitor_log::{read_errors, LOG_FILE, MAX_KEPT_ERRORS};
use crate::logging::LogOptions;

/// Confines a forked child as the monitor's main thread, with `logger`'s files as its logs, and
/// makes a call the main thread may not make; returns the child's exit status.
fn killed_by_seccomp(logger: &MonitorLog) -> i32 {
    let quiet = File::options().write(true).open("/dev/null").unwrap();
    // SAFETY: the child only confines itself and exits; glibc's fork handlers keep malloc usable.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0);
    if pid == 0 {
        thread_started(ThreadKind::Monitor);
        let logs = logger.last_words_logs();
        let limits = Limits {
            open_files: 64,
            report_fd: quiet.as_raw_fd(),
            logs: log_targets(&logs),
            log_only: false,
        };
        let code = match confine_process(&limits) {
            // SAFETY: a plain socket(2): the main thread may only open AF_UNIX ones.
            Ok(()) => unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) }.min(2),
            Err(_) => 1,
        };
        // SAFETY: leave the child without running the harness's exit handlers.
        unsafe { libc::_exit(code) };
    }
    let mut status = 0;
    // SAFETY: waits for our own child.
    assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
    assert!(libc::WIFEXITED(status), "child status {status:#x}");
    libc::WEXITSTATUS(status)
}

/// The seccomp kill's entry comes after all the errors the logger keeps: `state` and `delete`
/// still see it, and so does the log's reader.
#[test]
fn a_seccomp_kill_is_the_last_entry_of_the_log_and_of_the_kept_errors() {
    let dir = tempfile::tempdir().unwrap();
    let opts = LogOptions {
        file: None,
        format: LogFormat::Text,
        debug: false,
    };
    let logger = MonitorLog::open(&opts, dir.path());
    for i in 0..MAX_KEPT_ERRORS {
        logger.log(
            &Record::builder()
                .level(Level::Error)
                .args(format_args!("virtio-9p: worker {i} failed"))
                .build(),
        );
    }
    assert_eq!(killed_by_seccomp(&logger), 128 + libc::SIGSYS);
    let msg = format!(
        "seccomp: forbidden syscall {} (socket) in thread monitor",
        libc::SYS_socket
    );
    let kept = read_errors(dir.path());
    assert_eq!(kept.len(), MAX_KEPT_ERRORS + 1, "{kept:?}");
    let last = kept.last().unwrap();
    assert_eq!((last.level.as_str(), last.msg.as_str()), ("error", &*msg));
    let stamped = humantime::parse_rfc3339(&last.time).unwrap();
    let age = SystemTime::now()
        .duration_since(stamped)
        .unwrap_or_default();
    assert!(age < Duration::from_secs(60), "{}", last.time);
    let log = std::fs::read_to_string(dir.path().join(LOG_FILE)).unwrap();
    let lines: Vec<&str> = log.lines().collect();
    assert_eq!(lines.len(), MAX_KEPT_ERRORS + 1, "{log}");
    assert_eq!(
        lines[MAX_KEPT_ERRORS],
        format!("time=\"{}\" level=error msg=\"{msg}\"", last.time)
    );
}
