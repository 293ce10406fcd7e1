//! The seccomp allow-list of each kind of thread, built with seccompiler. Anything not listed
//! traps (see `sigsys`). No list has execve, fork, ptrace, mount, namespaces, module or key
//! calls, sockets other than AF_UNIX, or clone without CLONE_THREAD.
//!
//! Each list is what the thread's code paths make once the VM is set up:
//! - every thread: memory (the allocator), futexes, signals it is sent (the vCPU kick, this
//!   module's own), time, exit, reading and writing fds it already holds;
//! - vCPU: KVM's ioctls (KVM_RUN, and the state reads a snapshot runs on the vCPU's thread);
//!   the device registers it writes reach eventfds and the console file;
//! - device workers (vsock, block): epoll, AF_UNIX sockets (the host side of vsock), reads
//!   and writes at offsets on the disk image;
//! - 9p: the file calls the p9 server makes on the guest's behalf (`p9::Server`);
//! - pager: userfaultfd's ioctls, reads of the page file and the template's memory;
//! - page-out: writing a page file (create, write, sync, rename) and giving RAM back;
//! - control: the union of what its requests do (page-out and page-in, checkpoints, state
//!   files, the agent's socket, pausing vCPUs with the kick signal), and starting the pager
//!   and page-out threads (which then narrow themselves);
//! - stdio: reads and writes, the pty's window size;
//! - monitor and VMM runner: the container's end (state file, the agent's poweroff, the page
//!   file's removal) and stopping the vCPUs and devices.

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

use super::ThreadKind;

type Rules = BTreeMap<i64, Vec<SeccompRule>>;

/// ioctl type bytes: KVM's and userfaultfd's.
const KVM_IOCTL_TYPE: u64 = 0xAE;
const UFFD_IOCTL_TYPE: u64 = 0xAA;
/// The `clone` flag every thread has and no process does.
const CLONE_THREAD: u64 = libc::CLONE_THREAD as u64;

/// The programs a thread of `kind` installs, in order.
/// `forbidden` is what a call outside the list gets: Trap, or Log to find what a list lacks.
pub(super) fn programs(
    kind: ThreadKind,
    forbidden: SeccompAction,
) -> Result<Vec<BpfProgram>, String> {
    let mut list = List::default();
    list.base();
    match kind {
        ThreadKind::Vcpu => list.vcpu(),
        ThreadKind::DeviceWorker => list.device_worker(),
        ThreadKind::Fs9p => list.fs9p(),
        ThreadKind::Pager => list.pager(),
        ThreadKind::PageOut => list.page_out(),
        ThreadKind::Control => list.control(),
        ThreadKind::Stdio => list.stdio(),
        ThreadKind::Monitor | ThreadKind::VmmRunner => list.ending(),
    }
    let mut programs = vec![compile(list.rules, forbidden, SeccompAction::Allow)?];
    if list.spawns_threads {
        // glibc starts threads with clone3, whose flags are behind a pointer a filter cannot
        // read; told ENOSYS it falls back to clone, whose flags the list checks.
        let clone3 = Rules::from([(libc::SYS_clone3, Vec::new())]);
        programs.push(compile(
            clone3,
            SeccompAction::Allow,
            SeccompAction::Errno(libc::ENOSYS as u32),
        )?);
    }
    Ok(programs)
}

fn compile(
    rules: Rules,
    mismatch: SeccompAction,
    matched: SeccompAction,
) -> Result<BpfProgram, String> {
    let filter = SeccompFilter::new(rules, mismatch, matched, TargetArch::x86_64)
        .map_err(|e| e.to_string())?;
    BpfProgram::try_from(filter).map_err(|e| e.to_string())
}

/// One kind's rules being put together.
#[derive(Default)]
struct List {
    rules: Rules,
    spawns_threads: bool,
}

fn cond(arg: u8, op: SeccompCmpOp, value: u64) -> SeccompCondition {
    SeccompCondition::new(arg, SeccompCmpArgLen::Dword, op, value).expect("argument index below 6")
}

impl List {
    fn allow(&mut self, calls: &[libc::c_long]) {
        for &nr in calls {
            // An empty rule list matches the call whatever its arguments.
            self.rules.insert(nr, Vec::new());
        }
    }

    /// Allows `nr` when one of `rules` matches (unless it is allowed outright already).
    fn allow_if(&mut self, nr: libc::c_long, rules: Vec<SeccompRule>) {
        match self.rules.get_mut(&nr) {
            Some(existing) if existing.is_empty() => {}
            Some(existing) => existing.extend(rules),
            None => {
                self.rules.insert(nr, rules);
            }
        }
    }

    fn rule(conditions: Vec<SeccompCondition>) -> SeccompRule {
        SeccompRule::new(conditions).expect("a rule with conditions")
    }

    /// ioctls whose request has type byte `ty` (KVM's, userfaultfd's).
    fn ioctl_type(&mut self, ty: u64) {
        let rule = Self::rule(vec![cond(1, SeccompCmpOp::MaskedEq(0xff00), ty << 8)]);
        self.allow_if(libc::SYS_ioctl, vec![rule]);
    }

    /// ioctls with exactly this request number.
    fn ioctl_request(&mut self, request: u64) {
        let rule = Self::rule(vec![cond(1, SeccompCmpOp::Eq, request)]);
        self.allow_if(libc::SYS_ioctl, vec![rule]);
    }

    fn base(&mut self) {
        self.allow(&[
            libc::SYS_read,
            libc::SYS_write,
            libc::SYS_readv,
            libc::SYS_writev,
            // std reads and writes sockets with recv and send.
            libc::SYS_recvfrom,
            libc::SYS_sendto,
            libc::SYS_close,
            libc::SYS_futex,
            libc::SYS_mmap,
            libc::SYS_munmap,
            libc::SYS_mprotect,
            libc::SYS_madvise,
            libc::SYS_mremap,
            libc::SYS_brk,
            libc::SYS_rt_sigreturn,
            libc::SYS_rt_sigprocmask,
            libc::SYS_sigaltstack,
            libc::SYS_restart_syscall,
            libc::SYS_exit,
            libc::SYS_exit_group,
            libc::SYS_clock_gettime,
            libc::SYS_clock_nanosleep,
            libc::SYS_nanosleep,
            libc::SYS_sched_yield,
            libc::SYS_getpid,
            libc::SYS_gettid,
            libc::SYS_getrandom,
            libc::SYS_fstat,
            libc::SYS_newfstatat,
            libc::SYS_statx,
            libc::SYS_lseek,
            libc::SYS_fcntl,
            libc::SYS_dup,
            libc::SYS_epoll_wait,
            libc::SYS_epoll_pwait,
            libc::SYS_epoll_ctl,
            libc::SYS_poll,
            libc::SYS_ppoll,
            libc::SYS_eventfd2,
        ]);
        // FIONBIO and FIOCLEX: std's set_nonblocking and fd duplication.
        self.ioctl_request(libc::FIONBIO);
        self.ioctl_request(libc::FIOCLEX);
    }

    fn vcpu(&mut self) {
        self.ioctl_type(KVM_IOCTL_TYPE);
    }

    /// AF_UNIX sockets: opening, connecting, accepting, options, messages.
    fn unix_sockets(&mut self) {
        let unix = Self::rule(vec![cond(0, SeccompCmpOp::Eq, libc::AF_UNIX as u64)]);
        self.allow_if(libc::SYS_socket, vec![unix]);
        self.allow(&[
            libc::SYS_connect,
            libc::SYS_accept,
            libc::SYS_accept4,
            libc::SYS_recvmsg,
            libc::SYS_sendmsg,
            libc::SYS_shutdown,
            libc::SYS_getsockopt,
            libc::SYS_setsockopt,
            libc::SYS_getsockname,
            libc::SYS_getpeername,
        ]);
    }

    /// Reads and writes at offsets, and syncing (disk images, page files).
    fn positioned_io(&mut self) {
        self.allow(&[
            libc::SYS_pread64,
            libc::SYS_pwrite64,
            libc::SYS_preadv,
            libc::SYS_pwritev,
            libc::SYS_fsync,
            libc::SYS_fdatasync,
            libc::SYS_fallocate,
            libc::SYS_ftruncate,
        ]);
    }

    /// Opening, making, moving and removing files (no device nodes, no symlinks).
    fn files(&mut self) {
        self.positioned_io();
        self.allow(&[
            libc::SYS_openat,
            libc::SYS_getdents64,
            libc::SYS_mkdirat,
            libc::SYS_unlinkat,
            libc::SYS_renameat,
            libc::SYS_renameat2,
            libc::SYS_linkat,
            libc::SYS_readlinkat,
            libc::SYS_fstatfs,
            libc::SYS_statfs,
            libc::SYS_flock,
            libc::SYS_access,
            libc::SYS_faccessat,
            libc::SYS_faccessat2,
            // glibc's rename, unlink and mkdir use the old calls on x86_64.
            libc::SYS_rename,
            libc::SYS_unlink,
            libc::SYS_mkdir,
            libc::SYS_rmdir,
        ]);
    }

    fn device_worker(&mut self) {
        self.unix_sockets();
        self.positioned_io();
        self.allow(&[libc::SYS_unlink, libc::SYS_unlinkat]);
    }

    fn fs9p(&mut self) {
        self.files();
        self.allow(&[
            libc::SYS_fchownat,
            libc::SYS_fchown,
            libc::SYS_fchmodat,
            libc::SYS_fchmod,
            libc::SYS_utimensat,
            libc::SYS_dup3,
        ]);
    }

    fn pager(&mut self) {
        self.ioctl_type(UFFD_IOCTL_TYPE);
        self.allow(&[libc::SYS_pread64, libc::SYS_preadv]);
    }

    fn page_out(&mut self) {
        self.files();
        // Holding the devices still and reading the VM's dirty state.
        self.ioctl_type(KVM_IOCTL_TYPE);
    }

    fn control(&mut self) {
        self.files();
        self.unix_sockets();
        self.ioctl_type(KVM_IOCTL_TYPE);
        self.ioctl_type(UFFD_IOCTL_TYPE);
        self.allow(&[libc::SYS_userfaultfd, libc::SYS_tgkill, libc::SYS_fchmod]);
        self.threads();
    }

    /// Starting threads (clone with CLONE_THREAD only), which narrow their own confinement
    /// as they start: prctl for their name and no_new_privs and capability drops, capget and
    /// capset (which can only lower what the thread has), and seccomp (which only adds).
    fn threads(&mut self) {
        self.spawns_threads = true;
        let thread = Self::rule(vec![cond(
            0,
            SeccompCmpOp::MaskedEq(CLONE_THREAD),
            CLONE_THREAD,
        )]);
        self.allow_if(libc::SYS_clone, vec![thread]);
        self.allow(&[
            libc::SYS_clone3,
            libc::SYS_set_robust_list,
            libc::SYS_rseq,
            libc::SYS_sched_getaffinity,
            libc::SYS_capget,
            libc::SYS_capset,
            libc::SYS_seccomp,
        ]);
        let prctls = [
            libc::PR_SET_NAME,
            libc::PR_SET_NO_NEW_PRIVS,
            libc::PR_CAPBSET_DROP,
            libc::PR_CAP_AMBIENT,
        ]
        .map(|op| Self::rule(vec![cond(0, SeccompCmpOp::Eq, op as u64)]));
        self.allow_if(libc::SYS_prctl, prctls.to_vec());
    }

    fn stdio(&mut self) {
        self.ioctl_request(libc::TIOCGWINSZ);
    }

    fn ending(&mut self) {
        self.files();
        self.unix_sockets();
        // Stopping the vCPUs: the kick signal, until each is out of KVM_RUN.
        self.allow(&[libc::SYS_tgkill, libc::SYS_unlink]);
    }
}
