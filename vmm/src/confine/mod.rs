//! Confining a VMM process once its VM is set up: every thread sets no_new_privs, drops the
//! capabilities its kind does not need (bounding, effective, permitted, inheritable and ambient
//! sets) and installs its kind's seccomp allow-list; the process gets rlimits.
//!
//! All of that is per thread in Linux (seccomp without TSYNC, capabilities, no_new_privs), and
//! each kind of thread gets its own filter, so each thread must do it itself. Every long-lived
//! thread names its kind when it starts ([`thread_started`]); [`confine_process`] then asks
//! each of them, with a real-time signal, to confine itself, and waits until all have. The
//! signal handler makes only raw system calls on data prepared beforehand (see `privileges`).
//! A thread started later (the pager of a lazy resume, a delayed page-out) inherits its parent's
//! confinement and narrows it to its own kind as it starts.
//!
//! A system call outside a thread's allow-list traps: the SIGSYS handler writes one line,
//! `seccomp: forbidden syscall NR (NAME) in thread KIND`, on the report fd (the monitor's
//! stderr unless told otherwise), the same as an error entry in logrus's format to each log
//! it was given (the monitor's log and its kept errors), and ends the process with status
//! 128 + SIGSYS.
//!
//! Device workers start when the guest driver activates a device; once confined a VMM refuses
//! that (a guest resetting a device after setup loses it) rather than give every vCPU thread the
//! right to start threads with a device worker's system calls.

mod allow_lists;
mod fatal_line;
mod privileges;
mod sigsys;

use std::cell::Cell;
use std::collections::HashMap;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use seccompiler::BpfProgram;

pub use fatal_line::LogFormat;
pub use privileges::{capability_mask, kept_capabilities};
pub use sigsys::MAX_LOGS;

/// The kinds of thread of a VMM process; each has its own allow-list and capabilities.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum ThreadKind {
    /// The process's main thread, which waits for the container's end and records it.
    Monitor,
    /// The thread that builds the VM, starts the vCPUs and stops them at the end.
    VmmRunner,
    /// A vCPU: KVM_RUN and the device registers its exits reach.
    Vcpu,
    /// A vsock or block device worker.
    DeviceWorker,
    /// A virtio-9p worker: serves host files to the guest.
    Fs9p,
    /// The lazy page-in thread (userfaultfd).
    Pager,
    /// A delayed page-out of a paused VM.
    PageOut,
    /// The control socket's server: start, kill, pause, resume, checkpoint.
    Control,
    /// A stdio relay between the host and the guest process.
    Stdio,
}

/// Every kind, in `repr` order.
pub const ALL_KINDS: [ThreadKind; 9] = [
    ThreadKind::Monitor,
    ThreadKind::VmmRunner,
    ThreadKind::Vcpu,
    ThreadKind::DeviceWorker,
    ThreadKind::Fs9p,
    ThreadKind::Pager,
    ThreadKind::PageOut,
    ThreadKind::Control,
    ThreadKind::Stdio,
];

impl ThreadKind {
    /// The name in reports and in the documentation.
    pub const fn name(self) -> &'static str {
        match self {
            ThreadKind::Monitor => "monitor",
            ThreadKind::VmmRunner => "vmm",
            ThreadKind::Vcpu => "vcpu",
            ThreadKind::DeviceWorker => "device",
            ThreadKind::Fs9p => "9p",
            ThreadKind::Pager => "pager",
            ThreadKind::PageOut => "page-out",
            ThreadKind::Control => "control",
            ThreadKind::Stdio => "stdio",
        }
    }
}

/// Why a process could not be confined.
#[derive(Debug, thiserror::Error)]
pub enum ConfineError {
    /// An allow-list did not compile.
    #[error("seccomp filter for {kind} threads: {reason}")]
    Filter { kind: &'static str, reason: String },
    /// A thread of the process never said what kind it is.
    #[error("thread {tid} ({name}) has no confinement kind")]
    UnknownThread { tid: i32, name: String },
    /// A thread did not confine itself.
    #[error("{failed} of {asked} threads could not confine themselves: {source}")]
    Thread {
        failed: usize,
        asked: usize,
        source: std::io::Error,
    },
    /// Threads did not answer in time.
    #[error("only {done} of {asked} threads confined themselves in time")]
    Timeout { done: usize, asked: usize },
    /// A host call failed.
    #[error("{what}: {source}")]
    Host {
        what: &'static str,
        source: std::io::Error,
    },
    /// The process was confined already.
    #[error("the process is confined already")]
    Again,
}

/// What to confine a process with.
#[derive(Debug, Clone)]
pub struct Limits {
    /// RLIMIT_NOFILE (soft and hard), lowered to the current hard limit if that is lower.
    pub open_files: u64,
    /// Where the SIGSYS handler writes its line (duplicated, so the caller may close it).
    pub report_fd: RawFd,
    /// Logs (at most [`MAX_LOGS`]) that get the line too, as an error entry (duplicated too).
    pub logs: Vec<LogTarget>,
    /// Let forbidden calls through and have the kernel log them (SECCOMP_RET_LOG, seen in the
    /// audit log or under strace), to find what an allow-list lacks. Never for production.
    pub log_only: bool,
}

/// A log open for appending, and the format of its lines.
#[derive(Debug, Clone, Copy)]
pub struct LogTarget {
    pub fd: RawFd,
    pub format: LogFormat,
}

/// What each thread applies to itself: built before any thread is asked, never changed.
struct Plan {
    /// Per kind, in `repr` order: the capability mask kept and the seccomp programs.
    kinds: Vec<(u64, Vec<BpfProgram>)>,
}

static PLAN: OnceLock<Plan> = OnceLock::new();
static CONFINED: AtomicBool = AtomicBool::new(false);
/// Threads that have confined themselves since `confine_process` asked.
static DONE: AtomicUsize = AtomicUsize::new(0);
/// Threads that failed to, and the first errno.
static FAILED: AtomicUsize = AtomicUsize::new(0);
static FIRST_ERRNO: AtomicI32 = AtomicI32::new(0);
/// Thread ids with their kind, as they started.
static KINDS: Mutex<Option<HashMap<i32, ThreadKind>>> = Mutex::new(None);

/// How long `confine_process` waits for threads to name their kind and to confine themselves.
const THREAD_WAIT: Duration = Duration::from_secs(5);

thread_local! {
    static KIND: Cell<Option<ThreadKind>> = const { Cell::new(None) };
    static SELF_CONFINED: Cell<bool> = const { Cell::new(false) };
}

/// Offset from SIGRTMIN of the signal that asks a thread to confine itself (the vCPU kick
/// uses offset 0).
const CONFINE_SIGNAL_OFFSET: i32 = 1;

fn confine_signal() -> i32 {
    libc::SIGRTMIN() + CONFINE_SIGNAL_OFFSET
}

/// Called by each long-lived thread as it starts: records its kind, and confines it at once
/// if the process is confined already (its parent's confinement is inherited; this narrows
/// it to the thread's own kind).
pub fn thread_started(kind: ThreadKind) {
    record_kind(kind);
    confine_if_process_is();
}

fn record_kind(kind: ThreadKind) {
    KIND.with(|k| k.set(Some(kind)));
    // SAFETY: gettid has no preconditions.
    let tid = unsafe { libc::gettid() };
    KINDS
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get_or_insert_with(HashMap::new)
        .insert(tid, kind);
}

fn confine_if_process_is() {
    if CONFINED.load(Ordering::SeqCst) {
        // The confinement signal may be on its way too (`confine_process` lists every thread
        // with a kind). Run inside this confinement half-way, its handler would apply it again,
        // with system calls the new filter forbids; blocked until then, it finds it done.
        if let Err(e) = with_confine_signal_blocked(confine_current_thread) {
            sigsys::fatal("cannot confine a new thread", e.raw_os_error().unwrap_or(0));
        }
    }
}

/// [`thread_started`] for a thread that must first do what its confinement forbids (a 9p
/// worker builds its mount namespace, which takes CAP_SYS_ADMIN and `unshare`, `mount_setattr`
/// and `pivot_root`): `setup` runs with the confinement signal blocked, so a `confine_process`
/// started meanwhile waits for it (up to its thread wait) instead of confining the thread half-way
/// through; if the process was confined by then, the thread confines itself right after.
pub fn thread_started_after<T>(kind: ThreadKind, setup: impl FnOnce() -> T) -> T {
    with_confine_signal_blocked(|| {
        record_kind(kind);
        let done = setup();
        confine_if_process_is();
        done
    })
}

/// Runs `f` with the confinement signal blocked in the calling thread.
fn with_confine_signal_blocked<T>(f: impl FnOnce() -> T) -> T {
    // SAFETY: sigset_t is plain data, initialised by sigemptyset; pthread_sigmask changes
    // only this thread's mask, and the old mask is put back.
    unsafe {
        let mut block: libc::sigset_t = std::mem::zeroed();
        let mut old: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut block);
        libc::sigaddset(&mut block, confine_signal());
        libc::pthread_sigmask(libc::SIG_BLOCK, &block, &mut old);
        let result = f();
        libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut());
        result
    }
}

/// True once `confine_process` has started: no new kind of work (device workers) may start.
pub fn is_confined() -> bool {
    CONFINED.load(Ordering::SeqCst)
}

/// Confines every thread of the process (each must have called [`thread_started`]), the
/// calling thread last, and sets the process's rlimits.
pub fn confine_process(limits: &Limits) -> Result<(), ConfineError> {
    if CONFINED.load(Ordering::SeqCst) {
        return Err(ConfineError::Again);
    }
    let plan = build_plan(limits.log_only)?;
    if PLAN.set(plan).is_err() {
        return Err(ConfineError::Again);
    }
    privileges::settle_malloc();
    privileges::set_rlimits(limits.open_files).map_err(|source| ConfineError::Host {
        what: "setting rlimits",
        source,
    })?;
    sigsys::install(limits.report_fd, &limits.logs).map_err(|source| ConfineError::Host {
        what: "installing the SIGSYS handler",
        source,
    })?;
    install_confine_handler()?;
    // From here a thread that starts confines itself; one listed below may have done so
    // already, and then just acknowledges the signal.
    CONFINED.store(true, Ordering::SeqCst);
    let threads = known_threads()?;
    let asked = ask_threads(&threads);
    wait_for(&asked)?;
    confine_current_thread().map_err(|source| ConfineError::Thread {
        failed: 1,
        asked: asked.len() + 1,
        source,
    })
}

fn build_plan(log_only: bool) -> Result<Plan, ConfineError> {
    let forbidden = match log_only {
        true => seccompiler::SeccompAction::Log,
        false => seccompiler::SeccompAction::Trap,
    };
    let mut kinds = Vec::with_capacity(ALL_KINDS.len());
    for kind in ALL_KINDS {
        let programs = allow_lists::programs(kind, forbidden.clone()).map_err(|reason| {
            ConfineError::Filter {
                kind: kind.name(),
                reason,
            }
        })?;
        kinds.push((capability_mask(kept_capabilities(kind)), programs));
    }
    Ok(Plan { kinds })
}

/// Every other thread of the process with its kind; waits briefly for threads just spawned
/// to name theirs.
fn known_threads() -> Result<Vec<i32>, ConfineError> {
    let deadline = Instant::now() + THREAD_WAIT;
    // SAFETY: gettid has no preconditions.
    let me = unsafe { libc::gettid() };
    loop {
        let tids = task_ids().map_err(|source| ConfineError::Host {
            what: "listing /proc/self/task",
            source,
        })?;
        let others: Vec<i32> = tids.into_iter().filter(|t| *t != me).collect();
        let unknown = {
            let kinds = KINDS.lock().unwrap_or_else(|p| p.into_inner());
            others
                .iter()
                .copied()
                .find(|t| !kinds.as_ref().is_some_and(|k| k.contains_key(t)))
        };
        match unknown {
            None => return Ok(others),
            Some(tid) if Instant::now() >= deadline => {
                let name = std::fs::read_to_string(format!("/proc/self/task/{tid}/comm"))
                    .unwrap_or_default();
                return Err(ConfineError::UnknownThread {
                    tid,
                    name: name.trim().to_string(),
                });
            }
            Some(_) => std::thread::sleep(Duration::from_millis(5)),
        }
    }
}

fn task_ids() -> std::io::Result<Vec<i32>> {
    let mut tids = Vec::new();
    for entry in std::fs::read_dir("/proc/self/task")? {
        if let Some(tid) = entry?.file_name().to_str().and_then(|s| s.parse().ok()) {
            tids.push(tid);
        }
    }
    Ok(tids)
}

fn install_confine_handler() -> Result<(), ConfineError> {
    // SAFETY: a zeroed sigaction is valid; the handler only makes raw system calls and reads
    // data that no longer changes (see `on_confine_signal`).
    let rc = unsafe {
        let mut act: libc::sigaction = std::mem::zeroed();
        act.sa_sigaction = on_confine_signal as *const () as usize;
        act.sa_flags = libc::SA_SIGINFO | libc::SA_RESTART;
        libc::sigemptyset(&mut act.sa_mask);
        libc::sigaction(confine_signal(), &act, std::ptr::null_mut())
    };
    if rc != 0 {
        return Err(ConfineError::Host {
            what: "installing the confinement signal handler",
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// Signals every thread in `tids`; returns those reached (a thread that ended meanwhile is
/// not waited for).
fn ask_threads(tids: &[i32]) -> Vec<i32> {
    // SAFETY: getpid has no preconditions.
    let pid = unsafe { libc::getpid() };
    let mut asked = Vec::with_capacity(tids.len());
    for &tid in tids {
        // SAFETY: tgkill only sends a signal, whose handler is installed.
        let rc = unsafe { libc::syscall(libc::SYS_tgkill, pid, tid, confine_signal()) };
        if rc == 0 {
            asked.push(tid);
        }
    }
    asked
}

/// Waits until every thread in `asked` has confined itself or ended. A thread that ended
/// after confining itself counts twice, which can end the wait while another still has the
/// signal pending: that one confines itself as soon as it next runs.
fn wait_for(asked: &[i32]) -> Result<(), ConfineError> {
    let deadline = Instant::now() + THREAD_WAIT;
    loop {
        let failed = FAILED.load(Ordering::SeqCst);
        if failed > 0 {
            return Err(ConfineError::Thread {
                failed,
                asked: asked.len(),
                source: std::io::Error::from_raw_os_error(FIRST_ERRNO.load(Ordering::SeqCst)),
            });
        }
        let done = DONE.load(Ordering::SeqCst);
        let ended = asked
            .iter()
            .filter(|t| !std::path::Path::new(&format!("/proc/self/task/{t}")).exists())
            .count();
        if done + ended >= asked.len() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(ConfineError::Timeout {
                done,
                asked: asked.len(),
            });
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

extern "C" fn on_confine_signal(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // SAFETY: errno is thread-local; the interrupted code must see it unchanged.
    let saved_errno = unsafe { *libc::__errno_location() };
    match confine_current_thread() {
        Ok(()) => {
            DONE.fetch_add(1, Ordering::SeqCst);
        }
        Err(e) => {
            let _ = FIRST_ERRNO.compare_exchange(
                0,
                e.raw_os_error().unwrap_or(libc::EINVAL),
                Ordering::SeqCst,
                Ordering::SeqCst,
            );
            FAILED.fetch_add(1, Ordering::SeqCst);
        }
    }
    // SAFETY: as above.
    unsafe { *libc::__errno_location() = saved_errno };
}

/// Applies the calling thread's kind's plan to it, once. Async-signal-safe: thread-locals
/// with constant initialisers, a `OnceLock` set before any thread is asked, raw system calls.
fn confine_current_thread() -> std::io::Result<()> {
    if SELF_CONFINED.with(Cell::get) {
        return Ok(());
    }
    let Some(plan) = PLAN.get() else {
        return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
    };
    let Some(kind) = KIND.with(Cell::get) else {
        return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
    };
    let (keep, programs) = &plan.kinds[kind as usize];
    privileges::confine_thread(*keep, programs)?;
    SELF_CONFINED.with(|c| c.set(true));
    Ok(())
}

/// The calling thread's kind, if it named one.
pub(crate) fn current_kind() -> Option<ThreadKind> {
    KIND.with(Cell::get)
}

#[cfg(test)]
mod tests;
