//! The capabilities each kind of thread keeps, and the raw system calls that confine the
//! calling thread. `confine_thread` runs inside a signal handler, so it allocates nothing
//! and makes only system calls (the `caps` crate names the capabilities but allocates, so it
//! is not used to apply them).

use std::io;
use std::path::Path;

use caps::Capability;
use seccompiler::BpfProgram;

use super::ThreadKind;

/// What the 9p server needs to act on the host's files for the guest, whose root expects to
/// own its rootfs: chown (CAP_CHOWN), open and list files whatever their mode
/// (CAP_DAC_OVERRIDE), chmod, utimes and unlink in sticky directories on files the monitor
/// does not own (CAP_FOWNER), and keep set-id bits while doing so (CAP_FSETID).
/// Not CAP_MKNOD: the server creates no device nodes (the worker refuses a Tmknod of one, and
/// host device nodes must never be opened for the guest). Not CAP_SYS_ADMIN nor
/// CAP_SYS_CHROOT: the worker builds its share's mount namespace and pivots into it before it
/// can be confined, and no worker starts afterwards.
const FS9P: &[Capability] = &[
    Capability::CAP_CHOWN,
    Capability::CAP_DAC_OVERRIDE,
    Capability::CAP_FOWNER,
    Capability::CAP_FSETID,
];

/// What the control thread needs on a host without `/dev/userfaultfd` (Linux before 6.1): a
/// lazy resume creates a userfaultfd that also takes the faults KVM raises for the vCPUs (not
/// user-mode only), which the userfaultfd(2) call allows without `vm.unprivileged_userfaultfd`
/// only with CAP_SYS_PTRACE. Where `/dev/userfaultfd` exists the userfaultfd crate opens that
/// instead (root's own 0600 node), and the control thread keeps nothing. Its seccomp
/// allow-list has neither ptrace nor process_vm_readv/writev.
const CONTROL_WITHOUT_DEV_USERFAULTFD: &[Capability] = &[Capability::CAP_SYS_PTRACE];

/// The capabilities a kind of thread keeps once confined; every other one leaves all five
/// sets. The control thread keeps CAP_SYS_PTRACE only without `/dev/userfaultfd`. Threads not
/// listed here keep none: vCPUs, vsock and block workers, stdio relays, the
/// pager (its userfaultfd is open already), page-out (page files are the monitor's own), the
/// VMM runner and the monitor's main thread (the state directory is its own).
pub fn kept_capabilities(kind: ThreadKind) -> &'static [Capability] {
    match kind {
        ThreadKind::Fs9p => FS9P,
        ThreadKind::Control if !Path::new("/dev/userfaultfd").exists() => {
            CONTROL_WITHOUT_DEV_USERFAULTFD
        }
        _ => &[],
    }
}

/// The bit mask of `caps`, as capget(2) and capset(2) use it.
pub fn capability_mask(caps: &[Capability]) -> u64 {
    caps.iter().fold(0, |m, c| m | c.bitmask())
}

const CAP_SETPCAP: u32 = 8;
/// Capability numbers go up to 63 in the 64-bit sets; the kernel refuses those it lacks.
const CAP_SLOTS: u32 = 64;
const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

fn check(rc: libc::c_long) -> io::Result<()> {
    match rc {
        0 => Ok(()),
        _ => Err(io::Error::last_os_error()),
    }
}

/// The calling thread's effective and permitted sets.
fn capget() -> io::Result<(u64, u64)> {
    let mut header = CapHeader {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let mut data = [CapData::default(); 2];
    // SAFETY: header and a two-element data array, as version 3 requires.
    check(unsafe { libc::syscall(libc::SYS_capget, &mut header, data.as_mut_ptr()) })?;
    let join = |lo: u32, hi: u32| u64::from(lo) | (u64::from(hi) << 32);
    Ok((
        join(data[0].effective, data[1].effective),
        join(data[0].permitted, data[1].permitted),
    ))
}

/// Sets the calling thread's effective and permitted sets to `keep`, inheritable to none.
fn capset(keep: u64) -> io::Result<()> {
    let mut header = CapHeader {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let half = |shift: u32| CapData {
        effective: (keep >> shift) as u32,
        permitted: (keep >> shift) as u32,
        inheritable: 0,
    };
    let data = [half(0), half(32)];
    // SAFETY: as in `capget`; the kernel only reads `data`.
    check(unsafe { libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()) })
}

fn prctl(op: libc::c_int, arg: libc::c_ulong) -> libc::c_long {
    // SAFETY: the operations used here take integer arguments only.
    libc::c_long::from(unsafe { libc::prctl(op, arg, 0, 0, 0) })
}

/// Sets no_new_privs, keeps only `keep` (of what the thread has) in every capability set and
/// installs `programs`, on the calling thread. Async-signal-safe.
pub(super) fn confine_thread(keep: u64, programs: &[BpfProgram]) -> io::Result<()> {
    check(prctl(libc::PR_SET_NO_NEW_PRIVS, 1))?;
    let (effective, permitted) = capget()?;
    let keep = keep & permitted;
    // Without CAP_SETPCAP (an unprivileged VMM) the bounding set cannot shrink; no_new_privs
    // already stops an exec from gaining anything through it.
    if effective & (1 << CAP_SETPCAP) != 0 {
        for cap in (0..CAP_SLOTS).filter(|c| keep & (1 << c) == 0) {
            if prctl(libc::PR_CAPBSET_DROP, cap.into()) != 0 {
                let e = io::Error::last_os_error();
                if e.raw_os_error() != Some(libc::EINVAL) {
                    return Err(e);
                }
            }
        }
    }
    // SAFETY: integer arguments only.
    let rc = unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        )
    };
    check(rc.into())?;
    capset(keep)?;
    for prog in programs {
        let fprog = libc::sock_fprog {
            len: prog.len() as u16,
            filter: prog.as_ptr() as *mut libc::sock_filter,
        };
        // SAFETY: `fprog` points at a live, correctly sized BPF program; the kernel copies it.
        check(unsafe {
            libc::syscall(
                libc::SYS_seccomp,
                libc::SECCOMP_SET_MODE_FILTER,
                0,
                &fprog as *const libc::sock_fprog,
            )
        })?;
    }
    Ok(())
}

/// The process's rlimits once confined:
/// - RLIMIT_CORE 0: a core dump of the monitor would hold the guest's memory (the
///   container's secrets) and be as large as it;
/// - RLIMIT_NOFILE `open_files` (never above the current hard limit): the fds the caps on
///   guest-driven resources allow, so that a compromised thread cannot exhaust the host's.
///
/// Not RLIMIT_NPROC: it counts every process of the uid host-wide and the kernel does not
/// apply it to root; the seccomp allow-lists forbid new processes instead.
pub(super) fn set_rlimits(open_files: u64) -> io::Result<()> {
    let set = |resource, value: u64| {
        let lim = libc::rlimit {
            rlim_cur: value,
            rlim_max: value,
        };
        // SAFETY: setrlimit reads the struct we own.
        match unsafe { libc::setrlimit(resource, &lim) } {
            0 => Ok(()),
            _ => Err(io::Error::last_os_error()),
        }
    };
    set(libc::RLIMIT_CORE, 0)?;
    let mut cur = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes the struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut cur) } != 0 {
        return Err(io::Error::last_os_error());
    }
    set(libc::RLIMIT_NOFILE, open_files.min(cur.rlim_max))
}

/// Settles what glibc's malloc would otherwise look up on the host later, from whatever
/// thread happens to need it, by opening a file: a confined thread (a vCPU) is killed for
/// that. It counts the CPUs (`/sys/devices/system/cpu/online`) when a thread first needs a
/// new arena, so the arena limit is set here, to glibc's own default of 8 per CPU; and it
/// reads `/proc/sys/vm/overcommit_memory` when it first shrinks a thread arena's heap, so
/// heaps are never shrunk (the trim threshold is above a heap's 64 MiB): their free pages
/// stay with the monitor, whose large buffers are mmap'ed and unmapped on their own anyway.
pub(super) fn settle_malloc() {
    #[cfg(target_env = "gnu")]
    {
        // SAFETY: sysconf reads a system value; mallopt sets malloc tunables.
        unsafe {
            let cpus = libc::sysconf(libc::_SC_NPROCESSORS_ONLN).clamp(1, 1 << 16) as i32;
            libc::mallopt(libc::M_ARENA_MAX, 8 * cpus);
            libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
        }
    }
}
