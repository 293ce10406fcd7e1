//! What happens on a forbidden system call: the filters answer SECCOMP_RET_TRAP, and this
//! SIGSYS handler writes `seccomp: forbidden syscall NR (NAME) in thread KIND` on the report fd,
//! the same as an error entry to each log it was given, and ends the process. Everything here
//! is async-signal-safe: fds duplicated at `install`, stack buffers, clock_gettime, write(2),
//! _exit(2).

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::OnceLock;

use super::fatal_line::{now_secs, Line, LogFormat};
use super::{current_kind, LogTarget};

/// Logs the line goes to at most, besides the report fd.
pub const MAX_LOGS: usize = 2;

/// Where the line goes: set once by `install`, read by the handler.
struct Targets {
    report: OwnedFd,
    logs: [Option<(OwnedFd, LogFormat)>; MAX_LOGS],
}

static TARGETS: OnceLock<Targets> = OnceLock::new();

/// The process's exit status after a forbidden call, as if SIGSYS had killed it.
pub(super) const EXIT_STATUS: i32 = 128 + libc::SIGSYS;

/// Offset of `si_syscall` in the kernel's `siginfo_t` for SIGSYS on x86_64 (signo, errno,
/// code and padding, then the `_sigsys` member: `_call_addr`, `_syscall`, `_arch`).
const SI_SYSCALL_OFFSET: usize = 24;

/// Duplicates `report_fd` and the logs' fds (so that the caller may close or reuse them) and
/// installs the handler.
pub(super) fn install(report_fd: i32, logs: &[LogTarget]) -> io::Result<()> {
    if logs.len() > MAX_LOGS {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} logs given, at most {MAX_LOGS} taken", logs.len()),
        ));
    }
    let mut targets = Targets {
        report: duplicate(report_fd)?,
        logs: Default::default(),
    };
    for (slot, log) in targets.logs.iter_mut().zip(logs) {
        *slot = Some((duplicate(log.fd)?, log.format));
    }
    if TARGETS.set(targets).is_err() {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            "the SIGSYS handler is installed already",
        ));
    }
    // SAFETY: a zeroed sigaction is valid; the handler is async-signal-safe.
    let rc = unsafe {
        let mut act: libc::sigaction = std::mem::zeroed();
        act.sa_sigaction = on_sigsys as *const () as usize;
        act.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut act.sa_mask);
        libc::sigaction(libc::SIGSYS, &act, std::ptr::null_mut())
    };
    match rc {
        0 => Ok(()),
        _ => Err(io::Error::last_os_error()),
    }
}

fn duplicate(fd: i32) -> io::Result<OwnedFd> {
    // SAFETY: F_DUPFD_CLOEXEC makes a new fd; a failure is reported.
    match unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 3) } {
        // SAFETY: the new fd is ours alone.
        dup if dup >= 0 => Ok(unsafe { OwnedFd::from_raw_fd(dup) }),
        _ => Err(io::Error::last_os_error()),
    }
}

extern "C" fn on_sigsys(_: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // SAFETY: the kernel passes a full siginfo_t for SIGSYS; the field is an int at this offset.
    let nr = unsafe {
        info.cast::<u8>()
            .add(SI_SYSCALL_OFFSET)
            .cast::<i32>()
            .read()
    };
    let mut msg = Line::default();
    msg.push(b"seccomp: forbidden syscall ");
    msg.push_number(i64::from(nr));
    if let Some(name) = syscall_name(nr.into()) {
        msg.push(b" (");
        msg.push(name.as_bytes());
        msg.push(b")");
    }
    msg.push(b" in thread ");
    msg.push(current_kind().map_or("unknown", |k| k.name()).as_bytes());
    write_out(msg.as_bytes());
    // SAFETY: _exit ends the process without running anything else.
    unsafe { libc::_exit(EXIT_STATUS) }
}

/// Reports a thread that could not confine itself, then ends the process: running on
/// unconfined would be worse.
pub(super) fn fatal(what: &str, errno: i32) -> ! {
    let mut msg = Line::default();
    msg.push(b"confinement: ");
    msg.push(what.as_bytes());
    msg.push(b": errno ");
    msg.push_number(errno.into());
    write_out(msg.as_bytes());
    // SAFETY: as in `on_sigsys`.
    unsafe { libc::_exit(EXIT_STATUS) }
}

/// Writes `msg` on the report fd (stderr before `install`) and as an error entry to each log.
fn write_out(msg: &[u8]) {
    let Some(targets) = TARGETS.get() else {
        write_line(libc::STDERR_FILENO, &Line::plain(msg));
        return;
    };
    write_line(targets.report.as_raw_fd(), &Line::plain(msg));
    let secs = now_secs();
    for (fd, format) in targets.logs.iter().flatten() {
        write_line(fd.as_raw_fd(), &Line::error_entry(*format, msg, secs));
    }
}

/// One write(2) per line: a log opened O_APPEND and shared with the logger (or other processes)
/// gets it whole.
fn write_line(fd: i32, line: &Line) {
    let bytes = line.as_bytes();
    // SAFETY: write(2) of our own buffer; a short or failed write is all we can accept.
    unsafe { libc::write(fd, bytes.as_ptr().cast(), bytes.len()) };
}

/// Names of the system calls a compromised VMM would reach for, and of those the allow-lists
/// leave out that ordinary code might still make; others are reported by number.
fn syscall_name(nr: libc::c_long) -> Option<&'static str> {
    Some(match nr {
        libc::SYS_execve => "execve",
        libc::SYS_execveat => "execveat",
        libc::SYS_fork => "fork",
        libc::SYS_vfork => "vfork",
        libc::SYS_clone => "clone",
        libc::SYS_clone3 => "clone3",
        libc::SYS_ptrace => "ptrace",
        libc::SYS_process_vm_readv => "process_vm_readv",
        libc::SYS_process_vm_writev => "process_vm_writev",
        libc::SYS_mount => "mount",
        libc::SYS_umount2 => "umount2",
        libc::SYS_pivot_root => "pivot_root",
        libc::SYS_chroot => "chroot",
        libc::SYS_unshare => "unshare",
        libc::SYS_setns => "setns",
        libc::SYS_socket => "socket",
        libc::SYS_connect => "connect",
        libc::SYS_bind => "bind",
        libc::SYS_listen => "listen",
        libc::SYS_open => "open",
        libc::SYS_openat => "openat",
        libc::SYS_openat2 => "openat2",
        libc::SYS_mknod => "mknod",
        libc::SYS_mknodat => "mknodat",
        libc::SYS_ioctl => "ioctl",
        libc::SYS_prctl => "prctl",
        libc::SYS_kill => "kill",
        libc::SYS_tgkill => "tgkill",
        libc::SYS_setuid => "setuid",
        libc::SYS_setgid => "setgid",
        libc::SYS_capset => "capset",
        libc::SYS_bpf => "bpf",
        libc::SYS_perf_event_open => "perf_event_open",
        libc::SYS_init_module => "init_module",
        libc::SYS_finit_module => "finit_module",
        libc::SYS_kexec_load => "kexec_load",
        libc::SYS_keyctl => "keyctl",
        libc::SYS_userfaultfd => "userfaultfd",
        libc::SYS_io_uring_setup => "io_uring_setup",
        libc::SYS_memfd_create => "memfd_create",
        libc::SYS_unlinkat => "unlinkat",
        libc::SYS_unlink => "unlink",
        libc::SYS_renameat => "renameat",
        libc::SYS_rename => "rename",
        libc::SYS_mkdirat => "mkdirat",
        libc::SYS_mkdir => "mkdir",
        libc::SYS_getdents64 => "getdents64",
        libc::SYS_sendmsg => "sendmsg",
        libc::SYS_sendto => "sendto",
        libc::SYS_recvfrom => "recvfrom",
        libc::SYS_recvmsg => "recvmsg",
        libc::SYS_accept4 => "accept4",
        libc::SYS_getrandom => "getrandom",
        libc::SYS_rt_sigaction => "rt_sigaction",
        libc::SYS_sched_getaffinity => "sched_getaffinity",
        libc::SYS_statx => "statx",
        libc::SYS_newfstatat => "newfstatat",
        libc::SYS_fsync => "fsync",
        libc::SYS_fdatasync => "fdatasync",
        libc::SYS_fallocate => "fallocate",
        libc::SYS_ftruncate => "ftruncate",
        libc::SYS_eventfd2 => "eventfd2",
        libc::SYS_epoll_create1 => "epoll_create1",
        libc::SYS_pread64 => "pread64",
        libc::SYS_pwrite64 => "pwrite64",
        _ => return None,
    })
}
