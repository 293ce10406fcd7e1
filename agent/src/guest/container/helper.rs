//! `husk-agent container-helper FD`: the freshly exec'd, single-threaded process that becomes
//! a container's init (or a process exec'd into it). It reads its orders from the sync
//! socket, sets itself up, reports `Ready`, and execs; any failure is reported as `Error`.

use std::convert::Infallible;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use oci_spec::runtime::{LinuxNamespaceType, LinuxSeccomp, Process, Spec};

use super::sync_socket::{FromHelper, SyncSocket, ToHelper};
use super::{mounts, ns, process, HelperResult};

/// Entry point from `main`.
pub fn main(fd: &str) -> ExitCode {
    let Ok(fd) = fd.parse::<i32>() else {
        eprintln!("husk-agent: container-helper: bad fd {fd:?}");
        return ExitCode::from(2);
    };
    // SAFETY: the agent passed us this socket's number and nothing else here owns it.
    let sync = unsafe { SyncSocket::from_raw(fd) };
    // Inherited without close-on-exec; set it again so a successful exec closes it, which is
    // how the agent learns the exec happened.
    // SAFETY: F_SETFD on an fd we own.
    unsafe { libc::fcntl(sync.raw(), libc::F_SETFD, libc::FD_CLOEXEC) };
    let result = match sync.recv::<ToHelper>() {
        Ok(Some((
            ToHelper::Init {
                spec,
                rootfs,
                private_shares,
            },
            _,
        ))) => init(&sync, &spec, &rootfs, &private_shares),
        Ok(Some((
            ToHelper::Exec {
                init_pid,
                namespaces,
                process,
                seccomp,
            },
            _,
        ))) => exec(&sync, init_pid, &namespaces, &process, seccomp.as_ref()),
        Ok(Some((ToHelper::Start, _))) => Err("start before set-up".into()),
        Ok(None) => return ExitCode::FAILURE,
        Err(e) => Err(format!("reading orders: {e}")),
    };
    let Err(message) = result;
    let _ = sync.send(&FromHelper::Error { message }, None);
    ExitCode::FAILURE
}

/// Becomes the container's init: namespaces, filesystem, process set-up, wait for start.
fn init(
    sync: &SyncSocket,
    spec: &Spec,
    rootfs: &Path,
    private_shares: &[PathBuf],
) -> HelperResult<Infallible> {
    let process = spec
        .process()
        .as_ref()
        .ok_or("config.json has no process")?;
    nix::unistd::setsid().map_err(|e| format!("setsid: {e}"))?;
    ns::join_paths(spec)?;
    if ns::has(spec, LinuxNamespaceType::Network) {
        ns::loopback_up()?;
    }
    ns::set_names(spec)?;
    let own_mounts = ns::has(spec, LinuxNamespaceType::Mount);
    if own_mounts {
        mounts::setup_rootfs(spec, rootfs, private_shares)?;
    } else {
        // Without a mount namespace any mount would land in the agent's: just chroot.
        nix::unistd::chroot(rootfs).map_err(|e| format!("chroot {}: {e}", rootfs.display()))?;
        nix::unistd::chdir("/").map_err(|e| format!("chdir /: {e}"))?;
    }
    // runc creates a missing cwd rather than failing.
    let _ = std::fs::create_dir_all(process.cwd());
    ns::set_sysctls(spec)?;
    if own_mounts {
        finish_mounts(spec)?;
    }
    let seccomp = spec.linux().as_ref().and_then(|l| l.seccomp().as_ref());
    let found = spec
        .annotations()
        .as_ref()
        .and_then(|a| a.get(husk_agent::proto::EXEC_PATH_ANNOTATION));
    let prepared = process::prepare(process, seccomp, found.map(Path::new))?;
    report_ready(sync, prepared.master.as_ref())?;
    match sync.recv::<ToHelper>() {
        Ok(Some((ToHelper::Start, _))) => {
            start_container_hooks(spec, &prepared)?;
            process::exec(prepared)
        }
        // The agent deleted us (or died) before start.
        _ => std::process::exit(1),
    }
}

/// The spec's `startContainer` hooks, run as runc's init runs them: in the container, as its
/// user, in its cwd, with the process's environment unless a hook has its own; the state
/// (from the host, see `HOOK_STATE_ANNOTATION`) says `created`, with this process's pid.
fn start_container_hooks(spec: &Spec, prepared: &process::Prepared) -> HelperResult<()> {
    let hooks = spec
        .hooks()
        .as_ref()
        .and_then(|h| h.start_container().as_deref());
    let Some(hooks) = hooks.filter(|h| !h.is_empty()) else {
        return Ok(());
    };
    let given = spec
        .annotations()
        .as_ref()
        .and_then(|a| a.get(husk_agent::proto::HOOK_STATE_ANNOTATION));
    let mut state: serde_json::Value = given
        .and_then(|s| serde_json::from_str(s).ok())
        .unwrap_or_else(|| serde_json::json!({}));
    state["status"] = "created".into();
    state["pid"] = std::process::id().into();
    let state = serde_json::to_vec(&state).map_err(|e| e.to_string())?;
    let env = prepared.env();
    let ctx = husk_agent::oci_hook::HookContext {
        state: &state,
        default_env: Some(&env),
        cwd: None,
    };
    husk_agent::oci_hook::run_all("startContainer", hooks, &ctx)
}

/// Masked and read-only paths, then the read-only root: after sysctls, which write to
/// /proc/sys before it turns read-only.
fn finish_mounts(spec: &Spec) -> HelperResult<()> {
    if let Some(linux) = spec.linux() {
        mounts::mask_paths(linux.masked_paths().as_deref().unwrap_or_default())?;
        mounts::readonly_paths(linux.readonly_paths().as_deref().unwrap_or_default())?;
    }
    if spec
        .root()
        .as_ref()
        .and_then(|r| r.readonly())
        .unwrap_or(false)
    {
        mounts::readonly_root()?;
    }
    Ok(())
}

/// Joins a running container and execs `process` in it.
fn exec(
    sync: &SyncSocket,
    init_pid: i32,
    namespaces: &[LinuxNamespaceType],
    process: &Process,
    seccomp: Option<&LinuxSeccomp>,
) -> HelperResult<Infallible> {
    ns::join_container(init_pid, namespaces)?;
    let prepared = process::prepare(process, seccomp, None)?;
    report_ready(sync, prepared.master.as_ref())?;
    process::exec(prepared)
}

fn report_ready(sync: &SyncSocket, master: Option<&std::os::fd::OwnedFd>) -> HelperResult<()> {
    sync.send(&FromHelper::Ready, master.map(|m| m.as_raw_fd()))
        .map_err(|e| format!("reporting ready: {e}"))
}
