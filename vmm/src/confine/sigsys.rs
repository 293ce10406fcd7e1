//! What happens on a forbidden system call: the filters answer SECCOMP_RET_TRAP, and this
//! SIGSYS handler writes `seccomp: forbidden syscall NR (NAME) in thread KIND` on the report fd
//! and ends the process. Everything here is async-signal-safe: a stack buffer, write(2),
//! _exit(2).

use std::io;
use std::sync::atomic::{AtomicI32, Ordering};

use super::current_kind;

/// The fd the line goes to; -1 until `install`.
static REPORT_FD: AtomicI32 = AtomicI32::new(-1);

/// The process's exit status after a forbidden call, as if SIGSYS had killed it.
pub(super) const EXIT_STATUS: i32 = 128 + libc::SIGSYS;

/// Offset of `si_syscall` in the kernel's `siginfo_t` for SIGSYS on x86_64 (signo, errno,
/// code and padding, then the `_sigsys` member: `_call_addr`, `_syscall`, `_arch`).
const SI_SYSCALL_OFFSET: usize = 24;

/// Duplicates `fd` (so that the caller may close or reuse it) and installs the handler.
pub(super) fn install(fd: i32) -> io::Result<()> {
    // SAFETY: F_DUPFD_CLOEXEC makes a new fd; a failure is reported.
    let dup = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 3) };
    if dup < 0 {
        return Err(io::Error::last_os_error());
    }
    REPORT_FD.store(dup, Ordering::SeqCst);
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

extern "C" fn on_sigsys(_: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // SAFETY: the kernel passes a full siginfo_t for SIGSYS; the field is an int at this offset.
    let nr = unsafe {
        info.cast::<u8>()
            .add(SI_SYSCALL_OFFSET)
            .cast::<i32>()
            .read()
    };
    let mut line = Line::default();
    line.push(b"seccomp: forbidden syscall ");
    line.push_number(i64::from(nr));
    if let Some(name) = syscall_name(nr.into()) {
        line.push(b" (");
        line.push(name.as_bytes());
        line.push(b")");
    }
    line.push(b" in thread ");
    line.push(current_kind().map_or("unknown", |k| k.name()).as_bytes());
    line.push(b"\n");
    line.write_out();
    // SAFETY: _exit ends the process without running anything else.
    unsafe { libc::_exit(EXIT_STATUS) }
}

/// Reports a thread that could not confine itself, then ends the process: running on
/// unconfined would be worse.
pub(super) fn fatal(what: &str, errno: i32) -> ! {
    let mut line = Line::default();
    line.push(b"confinement: ");
    line.push(what.as_bytes());
    line.push(b": errno ");
    line.push_number(errno.into());
    line.push(b"\n");
    line.write_out();
    // SAFETY: as in `on_sigsys`.
    unsafe { libc::_exit(EXIT_STATUS) }
}

/// A line built on the stack.
struct Line {
    buf: [u8; 160],
    len: usize,
}

impl Default for Line {
    fn default() -> Self {
        Line {
            buf: [0; 160],
            len: 0,
        }
    }
}

impl Line {
    fn push(&mut self, bytes: &[u8]) {
        let n = bytes.len().min(self.buf.len() - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&bytes[..n]);
        self.len += n;
    }

    fn push_number(&mut self, n: i64) {
        let mut digits = [0u8; 20];
        let mut i = digits.len();
        let mut v = n.unsigned_abs();
        loop {
            i -= 1;
            digits[i] = b'0' + (v % 10) as u8;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        if n < 0 {
            self.push(b"-");
        }
        self.push(&digits[i..]);
    }

    fn write_out(&self) {
        let fd = match REPORT_FD.load(Ordering::SeqCst) {
            -1 => libc::STDERR_FILENO,
            fd => fd,
        };
        // SAFETY: write(2) of our own buffer; a short or failed write is all we can accept.
        unsafe { libc::write(fd, self.buf.as_ptr().cast(), self.len) };
    }
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
