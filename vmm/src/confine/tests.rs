use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use super::*;

/// Runs `child` in a forked child (confinement cannot be undone, and the test harness has
/// threads that never named a kind); returns its exit status and what it wrote on the pipe.
fn in_child(child: impl FnOnce(i32) -> i32) -> (i32, String) {
    let (read, write) = pipe();
    // SAFETY: the child only runs `child` and exits; glibc's fork handlers keep malloc usable.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0);
    if pid == 0 {
        drop(read);
        let code = child(write.as_raw_fd());
        // SAFETY: leave the child without running the harness's exit handlers.
        unsafe { libc::_exit(code) };
    }
    drop(write);
    let out = read_all(read);
    let mut status = 0;
    // SAFETY: waits for our own child.
    assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
    assert!(libc::WIFEXITED(status), "child status {status:#x}");
    (libc::WEXITSTATUS(status), out)
}

/// A pipe's read and write ends.
fn pipe() -> (OwnedFd, OwnedFd) {
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills the two fds.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: both fds are new and ours.
    unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
}

/// What was written on a pipe until every write end closed.
fn read_all(read: OwnedFd) -> String {
    let mut out = String::new();
    std::fs::File::from(read).read_to_string(&mut out).unwrap();
    out
}

/// Confines the (forked) process as a thread of `kind`; a failure ends it with status 1.
fn confine_as(kind: ThreadKind, report_fd: i32) {
    confine_with_logs(kind, report_fd, Vec::new());
}

/// As `confine_as`, with logs that get the SIGSYS handler's line as an error entry.
fn confine_with_logs(kind: ThreadKind, report_fd: i32, logs: Vec<LogTarget>) {
    thread_started(kind);
    let limits = Limits {
        open_files: 64,
        report_fd,
        logs,
        log_only: false,
    };
    if let Err(e) = confine_process(&limits) {
        eprintln!("{e}");
        // SAFETY: leave the forked child at once.
        unsafe { libc::_exit(1) };
    }
}

/// The lines of /proc/self/status that confinement sets.
fn status_field(name: &str) -> String {
    let status = std::fs::read_to_string("/proc/thread-self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with(name)).unwrap();
    line[name.len()..].trim().to_string()
}

#[test]
fn a_forbidden_call_ends_the_process_with_one_line_on_stderr_and_in_each_log() {
    let (text_read, text_write) = pipe();
    let (json_read, json_write) = pipe();
    let before = fatal_line::now_secs();
    let (code, out) = in_child(|fd| {
        let logs = vec![
            LogTarget {
                fd: text_write.as_raw_fd(),
                format: LogFormat::Text,
            },
            LogTarget {
                fd: json_write.as_raw_fd(),
                format: LogFormat::Json,
            },
        ];
        confine_with_logs(ThreadKind::Vcpu, fd, logs);
        // SAFETY: a plain socket(2); the filter should trap it.
        unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
        2
    });
    let after = fatal_line::now_secs();
    drop((text_write, json_write));
    let msg = format!(
        "seccomp: forbidden syscall {} (socket) in thread vcpu",
        libc::SYS_socket
    );
    assert_eq!(code, sigsys::EXIT_STATUS, "{out}");
    assert_eq!(out, format!("{msg}\n"));
    let text = read_all(text_read);
    let json = read_all(json_read);
    let stamped = |format, line: &str| {
        (before..=after).any(|secs| {
            fatal_line::Line::error_entry(format, msg.as_bytes(), secs).as_bytes()
                == line.as_bytes()
        })
    };
    assert!(text.starts_with("time=\""), "{text}");
    assert!(
        text.ends_with(&format!("Z\" level=error msg=\"{msg}\"\n")),
        "{text}"
    );
    assert!(stamped(LogFormat::Text, &text), "{text}");
    assert!(
        json.starts_with(&format!(
            "{{\"level\":\"error\",\"msg\":\"{msg}\",\"time\":\""
        )),
        "{json}"
    );
    assert!(json.ends_with("Z\"}\n"), "{json}");
    assert!(stamped(LogFormat::Json, &json), "{json}");
}

#[test]
fn an_entry_has_runc_s_time_stamp_and_an_escaped_message() {
    let cases = [
        (
            LogFormat::Text,
            "a",
            0,
            r#"time="1970-01-01T00:00:00Z" level=error msg="a""#,
        ),
        // A leap day, the last second of a day, and a century that is not a leap year.
        (
            LogFormat::Json,
            "a",
            951_868_799,
            r#"{"level":"error","msg":"a","time":"2000-02-29T23:59:59Z"}"#,
        ),
        (
            LogFormat::Json,
            "a",
            4_107_542_400,
            r#"{"level":"error","msg":"a","time":"2100-03-01T00:00:00Z"}"#,
        ),
        (
            LogFormat::Text,
            "b",
            1_709_294_706,
            r#"time="2024-03-01T12:05:06Z" level=error msg="b""#,
        ),
        (
            LogFormat::Json,
            "say \"hi\"\\\n\u{1}",
            0,
            r#"{"level":"error","msg":"say \"hi\"\\\n\u0001","time":"1970-01-01T00:00:00Z"}"#,
        ),
    ];
    for (format, msg, secs, want) in cases {
        let line = fatal_line::Line::error_entry(format, msg.as_bytes(), secs);
        assert_eq!(
            String::from_utf8(line.as_bytes().to_vec()).unwrap(),
            format!("{want}\n")
        );
    }
}

#[test]
fn a_confined_thread_has_no_new_privs_a_filter_and_its_kind_s_capabilities() {
    let (code, out) = in_child(|fd| {
        confine_as(ThreadKind::Fs9p, fd);
        let fields = [
            "NoNewPrivs:",
            "Seccomp:",
            "CapEff:",
            "CapBnd:",
            "CapInh:",
            "CapAmb:",
        ]
        .map(status_field);
        let mut f = unsafe { std::fs::File::from_raw_fd(fd) };
        std::io::Write::write_all(&mut f, fields.join(" ").as_bytes()).unwrap();
        std::mem::forget(f);
        0
    });
    assert_eq!(code, 0, "{out}");
    let fields: Vec<&str> = out.split(' ').collect();
    assert_eq!(&fields[..2], ["1", "2"], "{out}");
    let root = unsafe { libc::geteuid() } == 0;
    let want = match root {
        true => capability_mask(kept_capabilities(ThreadKind::Fs9p)),
        false => 0,
    };
    let eff = u64::from_str_radix(fields[2], 16).unwrap();
    assert_eq!(eff, want, "{out}");
    if root {
        assert_eq!(u64::from_str_radix(fields[3], 16).unwrap(), want, "{out}");
    }
    assert_eq!(
        fields[4..],
        ["0000000000000000", "0000000000000000"],
        "{out}"
    );
}

#[test]
fn a_thread_started_after_confinement_narrows_to_its_kind() {
    let (code, out) = in_child(|fd| {
        confine_as(ThreadKind::Control, fd);
        let pager = std::thread::spawn(|| {
            thread_started(ThreadKind::Pager);
            // SAFETY: openat(2) of a path; a pager may not open files.
            unsafe { libc::openat(libc::AT_FDCWD, c"/".as_ptr(), libc::O_RDONLY) };
        });
        let _ = pager.join();
        3
    });
    assert_eq!(code, sigsys::EXIT_STATUS, "{out}");
    assert_eq!(
        out,
        format!(
            "seccomp: forbidden syscall {} (openat) in thread pager\n",
            libc::SYS_openat
        )
    );
}

#[test]
fn a_thread_s_setup_runs_unconfined_while_the_process_confines_itself() {
    let (code, out) = in_child(|fd| {
        let (started_tx, started_rx) = std::sync::mpsc::channel();
        let worker = std::thread::spawn(move || {
            let socket = thread_started_after(ThreadKind::Fs9p, || {
                started_tx.send(()).unwrap();
                while !is_confined() {
                    std::thread::sleep(Duration::from_millis(1));
                }
                // Long enough for the confinement signal to have been sent.
                std::thread::sleep(Duration::from_millis(100));
                // SAFETY: a plain socket(2), which a 9p worker's filter traps.
                unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) }
            });
            format!("{} {}", socket >= 0, status_field("Seccomp:"))
        });
        started_rx.recv().unwrap();
        confine_as(ThreadKind::Monitor, fd);
        let seen = worker.join().unwrap();
        let mut f = unsafe { std::fs::File::from_raw_fd(fd) };
        std::io::Write::write_all(&mut f, seen.as_bytes()).unwrap();
        std::mem::forget(f);
        0
    });
    // The socket was made before the filter came, and the filter came right after.
    assert_eq!((code, out.as_str()), (0, "true 2"));
}

#[test]
fn every_kind_s_allow_list_compiles() {
    for kind in ALL_KINDS {
        let programs = allow_lists::programs(kind, seccompiler::SeccompAction::Trap).unwrap();
        assert!(!programs.is_empty(), "{kind:?}");
    }
}
