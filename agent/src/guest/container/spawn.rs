//! Starting container helpers: the agent clones a child straight into the new namespaces and
//! re-executes itself as `husk-agent container-helper FD`.
//!
//! The agent is multi-threaded, so between `clone` and `execve` the child may only make
//! async-signal-safe calls: everything it needs (paths, argv, fds) is prepared beforehand, and
//! all real set-up happens in the freshly exec'd, single-threaded helper.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{IntoRawFd, RawFd};
use std::sync::mpsc::Receiver;

use husk_agent::proto::ExitStatus;

use crate::guest::reaper::Reaper;

/// The argument that selects helper mode in `main`.
pub const HELPER_ARG: &str = "container-helper";

/// What the child starts with: its stdio and its end of the sync socket.
pub struct ChildFds {
    pub stdin: RawFd,
    pub stdout: RawFd,
    pub stderr: RawFd,
    pub sync: RawFd,
}

/// Clones a helper with `flags` (CLONE_NEW*), optionally inside the pid namespace `pidns`
/// (which only a fresh thread can enter), registers it with the reaper and returns its pid.
pub fn spawn_helper(
    reaper: &Reaper,
    flags: libc::c_int,
    pidns: Option<&File>,
    fds: &ChildFds,
) -> io::Result<(i32, Receiver<ExitStatus>)> {
    let exe = CString::new("/proc/self/exe").map_err(io::Error::other)?;
    let argv_owned = [
        CString::new("husk-agent").map_err(io::Error::other)?,
        CString::new(HELPER_ARG).map_err(io::Error::other)?,
        CString::new(fds.sync.to_string()).map_err(io::Error::other)?,
    ];
    let argv: Vec<*const libc::c_char> = argv_owned
        .iter()
        .map(|a| a.as_ptr())
        .chain(std::iter::once(std::ptr::null()))
        .collect();
    let child = ChildExec {
        exe: &exe,
        argv: &argv,
        fds,
    };
    reaper.spawn_with(|| match pidns {
        None => child.clone_exec(flags),
        // setns(CLONE_NEWPID) changes only the calling thread's children's namespace, so do
        // it on a throwaway thread rather than touching the agent's own threads.
        Some(ns) => std::thread::scope(|s| {
            s.spawn(|| {
                nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWPID)?;
                child.clone_exec(flags)
            })
            .join()
            .map_err(|_| io::Error::other("helper spawn thread panicked"))?
        }),
    })
}

/// Everything the cloned child touches, prepared before `clone`.
struct ChildExec<'a> {
    exe: &'a CString,
    argv: &'a [*const libc::c_char],
    fds: &'a ChildFds,
}

// SAFETY: the raw pointers point into CStrings owned by `spawn_helper`, which outlive every
// use (the scoped thread is joined before they drop), and are only read.
unsafe impl Sync for ChildExec<'_> {}

impl ChildExec<'_> {
    fn clone_exec(&self, flags: libc::c_int) -> io::Result<i32> {
        // SAFETY: a raw clone without CLONE_VM and with a NULL stack behaves like fork(): the
        // child gets a copy-on-write copy of this thread's stack. It then only calls
        // async-signal-safe functions (see `exec_child`) and never returns.
        let pid = unsafe {
            libc::syscall(
                libc::SYS_clone,
                (flags | libc::SIGCHLD) as libc::c_ulong,
                0usize,
                0usize,
                0usize,
                0usize,
            )
        };
        match pid {
            -1 => Err(io::Error::last_os_error()),
            0 => self.exec_child(),
            pid => Ok(pid as i32),
        }
    }

    /// In the child: move the fds into place and exec the helper.
    fn exec_child(&self) -> ! {
        let f = self.fds;
        // SAFETY: dup2, fcntl, execv and _exit are async-signal-safe and get valid fds and
        // NUL-terminated strings prepared before the clone. The sources are all >= 3 (the
        // agent keeps 0-2 open), so no dup2 clobbers a source still needed.
        unsafe {
            if libc::dup2(f.stdin, 0) < 0 || libc::dup2(f.stdout, 1) < 0 {
                libc::_exit(126);
            }
            if libc::dup2(f.stderr, 2) < 0 || libc::fcntl(f.sync, libc::F_SETFD, 0) < 0 {
                libc::_exit(126);
            }
            libc::execv(self.exe.as_ptr(), self.argv.as_ptr());
            libc::_exit(127)
        }
    }
}

/// Makes sure fds 0-2 are open (on /dev/null if need be), so that fds the agent creates are
/// never 0-2 and `exec_child` can move them without clobbering.
pub fn ensure_std_fds() {
    for fd in 0..=2 {
        // SAFETY: F_GETFD only queries the fd.
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } >= 0 {
            continue;
        }
        let Ok(null) = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/null")
        else {
            continue;
        };
        // The lowest free fd may be `fd` itself: then keeping it open is all there is to do.
        let raw = null.into_raw_fd();
        if raw != fd {
            // SAFETY: dup2 onto a closed standard fd, then close the temporary we own.
            unsafe {
                libc::dup2(raw, fd);
                libc::close(raw);
            }
        }
    }
}
