//! Turning a helper into the OCI `process`: limits, terminal, identity, capabilities,
//! no_new_privs, seccomp, umask, cwd, and finally `execve`. Shared by a container's init and
//! by processes exec'd into it. Runs in the single-threaded helper.

use std::convert::Infallible;
use std::ffi::CString;
use std::fs;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use caps::{CapSet, CapsHashSet};
use nix::sys::resource::{setrlimit, Resource};
use nix::sys::stat::{umask, Mode};
use nix::unistd::{chdir, setgroups, setresgid, setresuid, Gid, Uid};
use oci_spec::runtime::{Capabilities, LinuxCapabilities, LinuxSeccomp, Process};
use seccompiler::BpfProgram;

use super::{pty, seccomp, HelperResult};

/// `PATH` used to find the program when the process's environment has none.
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// A process ready to exec, everything checked.
pub struct Prepared {
    path: CString,
    argv: Vec<CString>,
    env: Vec<CString>,
    /// Filters to install right before `execve` (with no_new_privs they need no privilege).
    late_seccomp: Vec<BpfProgram>,
    /// The pty master for the agent, when the process has a terminal.
    pub master: Option<OwnedFd>,
}

/// Applies everything but the final seccomp filters and `execve`, in runc's order.
/// `found`: where the host found `args[0]` on PATH (see `EXEC_PATH_ANNOTATION`), if it did.
pub fn prepare(
    process: &Process,
    profile: Option<&LinuxSeccomp>,
    found: Option<&Path>,
) -> HelperResult<Prepared> {
    let args = process.args().as_deref().unwrap_or_default();
    if args.is_empty() {
        return Err("args must not be empty".into());
    }
    let programs = profile
        .map(seccomp::compile)
        .transpose()?
        .unwrap_or_default();
    set_oom_score_adj(process.oom_score_adj())?;
    set_rlimits(process)?;
    let master = match process.terminal().unwrap_or(false) {
        true => Some(pty::attach_new(process)?),
        false => None,
    };
    let nnp = process.no_new_privileges().unwrap_or(false);
    // Without no_new_privs, installing a filter needs CAP_SYS_ADMIN: do it while we have it.
    let early = !nnp && !programs.is_empty();
    if early {
        seccomp::install(&programs)?;
    }
    let env = with_home(
        process.env().as_deref().unwrap_or_default(),
        process.user().uid(),
    );
    set_identity(process)?;
    if nnp {
        nix::sys::prctl::set_no_new_privs().map_err(|e| format!("set no_new_privs: {e}"))?;
    }
    let mask = process.user().umask().unwrap_or(0o022);
    umask(Mode::from_bits_truncate(mask as libc::mode_t));
    enter_cwd(process.cwd())?;
    let path = match found {
        Some(path) if !args[0].contains('/') => path.to_path_buf(),
        _ => lookup(&args[0], &env)?,
    };
    Ok(Prepared {
        path: cstring(path.as_os_str().as_bytes())?,
        argv: cstrings(args)?,
        env: cstrings(&env)?,
        late_seccomp: if early { Vec::new() } else { programs },
        master,
    })
}

/// Changes to the process's `cwd`, failing with runc's message.
fn enter_cwd(cwd: &Path) -> HelperResult<()> {
    chdir(cwd).map_err(|e| {
        format!(
            "chdir to cwd ({:?}) set in config.json failed: {}",
            cwd.display().to_string(),
            e.desc().to_lowercase()
        )
    })
}

fn cstrings(strings: &[String]) -> HelperResult<Vec<CString>> {
    strings.iter().map(|s| cstring(s.as_bytes())).collect()
}

/// Adds `HOME` as runc does when the spec leaves it out: the user's home from the container's
/// /etc/passwd, else `/`. Read before the identity change, while /etc/passwd is surely readable.
fn with_home(env: &[String], uid: u32) -> Vec<String> {
    let mut env = env.to_vec();
    if !env.iter().any(|e| e.starts_with("HOME=")) {
        env.push(format!(
            "HOME={}",
            home_of(uid).unwrap_or_else(|| "/".into())
        ));
    }
    env
}

fn home_of(uid: u32) -> Option<String> {
    husk_agent::passwd::home_of(&fs::read_to_string("/etc/passwd").ok()?, uid)
}

impl Prepared {
    /// The process's environment (with the `HOME` it gets).
    pub fn env(&self) -> Vec<String> {
        let text = |c: &CString| c.to_string_lossy().into_owned();
        self.env.iter().map(text).collect()
    }
}

/// Installs the remaining filters and execs; returns only on failure.
pub fn exec(p: Prepared) -> HelperResult<Infallible> {
    seccomp::install(&p.late_seccomp)?;
    reset_signals();
    let Err(e) = nix::unistd::execve(&p.path, &p.argv, &p.env);
    Err(format!(
        "exec: {:?}: {}",
        p.path.to_string_lossy(),
        e.desc().to_lowercase()
    ))
}

fn cstring(bytes: &[u8]) -> HelperResult<CString> {
    CString::new(bytes).map_err(|_| "argument or environment entry contains a NUL byte".into())
}

/// The helper is a Rust program, which ignores SIGPIPE; the container process must start
/// with default dispositions and an empty mask, as if forked by a shell.
fn reset_signals() {
    use nix::sys::signal::{signal, sigprocmask, SigHandler, SigSet, SigmaskHow, Signal};
    for sig in Signal::iterator() {
        if !matches!(sig, Signal::SIGKILL | Signal::SIGSTOP) {
            // SAFETY: setting the default disposition installs no Rust handler.
            let _ = unsafe { signal(sig, SigHandler::SigDfl) };
        }
    }
    let _ = sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None);
}

fn set_oom_score_adj(adj: Option<i32>) -> HelperResult<()> {
    let Some(adj) = adj else { return Ok(()) };
    fs::write("/proc/self/oom_score_adj", adj.to_string())
        .map_err(|e| format!("set oom_score_adj to {adj}: {e}"))
}

fn set_rlimits(process: &Process) -> HelperResult<()> {
    for limit in process.rlimits().as_deref().unwrap_or_default() {
        let name = serde_json::to_value(limit.typ())
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default();
        let resource = rlimit_resource(&name).ok_or_else(|| format!("unknown rlimit {name}"))?;
        setrlimit(resource, limit.soft(), limit.hard())
            .map_err(|e| format!("error setting rlimit type {name}: {}", e.desc()))?;
    }
    Ok(())
}

fn rlimit_resource(name: &str) -> Option<Resource> {
    Some(match name {
        "RLIMIT_AS" => Resource::RLIMIT_AS,
        "RLIMIT_CORE" => Resource::RLIMIT_CORE,
        "RLIMIT_CPU" => Resource::RLIMIT_CPU,
        "RLIMIT_DATA" => Resource::RLIMIT_DATA,
        "RLIMIT_FSIZE" => Resource::RLIMIT_FSIZE,
        "RLIMIT_LOCKS" => Resource::RLIMIT_LOCKS,
        "RLIMIT_MEMLOCK" => Resource::RLIMIT_MEMLOCK,
        "RLIMIT_MSGQUEUE" => Resource::RLIMIT_MSGQUEUE,
        "RLIMIT_NICE" => Resource::RLIMIT_NICE,
        "RLIMIT_NOFILE" => Resource::RLIMIT_NOFILE,
        "RLIMIT_NPROC" => Resource::RLIMIT_NPROC,
        "RLIMIT_RSS" => Resource::RLIMIT_RSS,
        "RLIMIT_RTPRIO" => Resource::RLIMIT_RTPRIO,
        "RLIMIT_RTTIME" => Resource::RLIMIT_RTTIME,
        "RLIMIT_SIGPENDING" => Resource::RLIMIT_SIGPENDING,
        "RLIMIT_STACK" => Resource::RLIMIT_STACK,
        _ => return None,
    })
}

/// Switches to the spec's user and groups, keeping exactly the spec's capabilities. With no
/// `capabilities` object the kernel's rules apply: root keeps all, other users lose all.
fn set_identity(process: &Process) -> HelperResult<()> {
    let user = process.user();
    let caps = process.capabilities().as_ref();
    if let Some(c) = caps {
        // Dropping from the bounding set needs CAP_SETPCAP, which we lose with setuid.
        set_bounding(c.bounding().as_ref())?;
        nix::sys::prctl::set_keepcaps(true).map_err(|e| format!("keepcaps: {e}"))?;
    }
    let groups: Vec<Gid> = user
        .additional_gids()
        .as_deref()
        .unwrap_or_default()
        .iter()
        .map(|&g| Gid::from_raw(g))
        .collect();
    let (uid, gid) = (Uid::from_raw(user.uid()), Gid::from_raw(user.gid()));
    let fail = |what: &str, e: nix::Error| format!("unable to set user: {what}: {}", e.desc());
    setgroups(&groups).map_err(|e| fail("setgroups", e))?;
    setresgid(gid, gid, gid).map_err(|e| fail(&format!("setgid {gid}"), e))?;
    setresuid(uid, uid, uid).map_err(|e| fail(&format!("setuid {uid}"), e))?;
    if let Some(c) = caps {
        nix::sys::prctl::set_keepcaps(false).map_err(|e| format!("keepcaps: {e}"))?;
        set_process_caps(c)?;
    }
    Ok(())
}

fn set_bounding(wanted: Option<&Capabilities>) -> HelperResult<()> {
    let wanted = to_caps(wanted);
    let current = caps::read(None, CapSet::Bounding).map_err(|e| format!("capabilities: {e}"))?;
    for cap in current.difference(&wanted) {
        caps::drop(None, CapSet::Bounding, *cap)
            .map_err(|e| format!("drop bounding capability {cap}: {e}"))?;
    }
    Ok(())
}

/// Order matters for capset(2), which checks effective against permitted on every call:
/// shrink effective first (root still has all of it), then permitted, then inheritable
/// (bounded by permitted), then ambient (needs both).
fn set_process_caps(c: &LinuxCapabilities) -> HelperResult<()> {
    let sets = [
        (CapSet::Effective, c.effective()),
        (CapSet::Permitted, c.permitted()),
        (CapSet::Inheritable, c.inheritable()),
    ];
    for (set, wanted) in sets {
        let wanted = to_caps(wanted.as_ref());
        caps::set(None, set, &wanted).map_err(|e| format!("set {set:?} capabilities: {e}"))?;
    }
    set_ambient(&to_caps(c.ambient().as_ref()))
}

/// The kernel raises an ambient capability only if it is also permitted and inheritable;
/// runc's default spec lists ambient caps without inheritable ones, and runc ignores each
/// refused raise, so specs written for runc run here the same way.
fn set_ambient(wanted: &CapsHashSet) -> HelperResult<()> {
    caps::clear(None, CapSet::Ambient).map_err(|e| format!("clear ambient capabilities: {e}"))?;
    for cap in wanted {
        let _ = caps::raise(None, CapSet::Ambient, *cap);
    }
    Ok(())
}

/// The named capabilities this kernel has. Like runc, the others are left out rather than
/// failing the container (the runtime has warned about the names it does not know).
fn to_caps(set: Option<&Capabilities>) -> CapsHashSet {
    let supported = caps::runtime::thread_all_supported();
    set.into_iter()
        .flatten()
        .filter_map(|cap| {
            let name = serde_json::to_value(cap).ok()?;
            caps::Capability::from_str(name.as_str()?).ok()
        })
        .filter(|cap| supported.contains(cap))
        .collect()
}

/// Finds the program like Go's `exec.LookPath` does for runc, with runc's messages.
fn lookup(arg0: &str, env: &[String]) -> HelperResult<PathBuf> {
    if arg0.contains('/') {
        return match fs::metadata(arg0) {
            Ok(m) if is_executable(&m) => Ok(PathBuf::from(arg0)),
            Ok(_) => Err(format!("exec: {arg0:?}: permission denied")),
            Err(e) => Err(format!("exec: {arg0:?}: stat {arg0}: {}", io_desc(&e))),
        };
    }
    let path = env
        .iter()
        .find_map(|e| e.strip_prefix("PATH="))
        .unwrap_or(DEFAULT_PATH);
    path.split(':')
        .map(|dir| Path::new(if dir.is_empty() { "." } else { dir }).join(arg0))
        .find(|p| fs::metadata(p).is_ok_and(|m| m.is_file() && is_executable(&m)))
        .ok_or_else(|| format!("exec: {arg0:?}: executable file not found in $PATH"))
}

fn is_executable(meta: &fs::Metadata) -> bool {
    !meta.is_dir() && meta.permissions().mode() & 0o111 != 0
}

fn io_desc(e: &std::io::Error) -> String {
    match e.raw_os_error() {
        Some(code) => nix::errno::Errno::from_raw(code).desc().to_lowercase(),
        None => e.to_string(),
    }
}
