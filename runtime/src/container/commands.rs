//! The runc-compatible lifecycle commands: create, start, run, state, kill, delete, list, ps,
//! pause, resume, exec, features, spec.

use std::io::{BufRead, BufReader};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use super::bundle::Bundle;
use super::control::{self, Reply, Request};
use super::monitor::MonitorArgs;
use super::state::{ContainerState, Status, Store};
use super::{launch, monitor_alive, signal, template_choice};

/// Options shared by `create` and `run`.
#[derive(clap::Args, Debug, Clone)]
pub struct CreateOpts {
    /// Path to the root of the bundle directory.
    #[arg(short, long, default_value = ".")]
    pub bundle: PathBuf,
    /// AF_UNIX socket that receives the pty master when process.terminal is set.
    #[arg(long)]
    pub console_socket: Option<PathBuf>,
    /// File to write the container's (monitor's) pid to.
    #[arg(long)]
    pub pid_file: Option<PathBuf>,
    /// Accepted for runc compatibility; the guest always has its own root.
    #[arg(long)]
    pub no_pivot: bool,
    /// Accepted for runc compatibility.
    #[arg(long)]
    pub no_new_keyring: bool,
    /// Extra fds beyond stdio: accepted, but they cannot cross into the VM.
    #[arg(long, default_value_t = 0)]
    pub preserve_fds: u32,
    /// Cold-boot the micro-VM instead of cloning it from a template.
    #[arg(long)]
    pub no_template: bool,
    pub id: String,
}

/// Where a monitor gets its VM from.
pub enum VmSource {
    /// Cloned from this template, or cold-booted (`None`).
    Template(Option<String>),
    /// Restored from the checkpoint in this directory.
    Checkpoint(PathBuf),
}

/// `husk create`: claims the id, picks (and if need be builds) the template, starts the
/// monitor, returns once the container is created. `debug` hears why a VM is cold-booted.
pub fn create(root: &Path, opts: &CreateOpts, debug: &dyn Fn(&str)) -> Result<i32> {
    create_with(root, opts, |bundle| {
        template_choice::choose(bundle, opts.no_template, debug).map(VmSource::Template)
    })
}

/// Claims the id and starts a monitor on the VM `source` gives; returns the monitor's pid
/// (also written to `--pid-file`). A failure leaves no state directory behind.
pub fn create_with(
    root: &Path,
    opts: &CreateOpts,
    source: impl FnOnce(&Bundle) -> Result<VmSource>,
) -> Result<i32> {
    let bundle = Bundle::load(&opts.bundle)?;
    let store = Store::new(root);
    store.create(&opts.id)?;
    let trace = super::trace::Trace::start("create");
    let spawned = source(&bundle).and_then(|source| {
        trace.mark("VM source chosen");
        spawn_monitor(root, opts, &bundle.dir, &source)
    });
    trace.mark("monitor answered");
    match spawned {
        Ok(pid) => {
            if let Some(p) = &opts.pid_file {
                write_pid_file(p, pid)?;
            }
            Ok(pid)
        }
        Err(e) => {
            let _ = store.remove(&opts.id);
            Err(e)
        }
    }
}

fn spawn_monitor(root: &Path, opts: &CreateOpts, bundle: &Path, source: &VmSource) -> Result<i32> {
    let (read, write) = nix::unistd::pipe()?;
    let write_fd = high_fd(write)?;
    let (template, restore) = match source {
        VmSource::Template(t) => (t.clone(), None),
        VmSource::Checkpoint(dir) => (None, Some(dir.clone())),
    };
    let args = MonitorArgs {
        root: root.to_path_buf(),
        id: opts.id.clone(),
        bundle: bundle.to_path_buf(),
        console_socket: opts.console_socket.clone(),
        ready_fd: Some(write_fd),
        template,
        restore,
    };
    let pid = launch::start(args)?;
    // SAFETY: write_fd is ours; the child has its own copy now.
    unsafe { libc::close(write_fd) };
    let mut line = String::new();
    BufReader::new(std::fs::File::from(read)).read_line(&mut line)?;
    match line.trim_end() {
        "ok" => Ok(pid),
        msg => {
            let _ =
                nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::SIGKILL);
            let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid), None);
            if msg.is_empty() {
                bail!("the monitor died before the container was created");
            }
            bail!("{msg}")
        }
    }
}

/// Moves a pipe end above the fds podman passes with --preserve-fds, close-on-exec.
pub fn high_fd(fd: OwnedFd) -> Result<i32> {
    // SAFETY: F_DUPFD_CLOEXEC duplicates a valid fd to the lowest free fd >= 100.
    let high = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 100) };
    if high < 0 {
        bail!("dup: {}", std::io::Error::last_os_error());
    }
    Ok(high)
}

pub fn write_pid_file(path: &Path, pid: i32) -> Result<()> {
    let tmp = path.with_extension("husk-tmp");
    std::fs::write(&tmp, pid.to_string())?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing pid file {}", path.display()))
}

/// Loads a container's state, correcting it if its monitor has died.
pub fn load(store: &Store, id: &str) -> Result<ContainerState> {
    let mut st = store.load(id)?;
    if st.status != Status::Stopped && !monitor_alive(&st) {
        st.status = Status::Stopped;
    }
    Ok(st)
}

pub fn start(root: &Path, id: &str) -> Result<()> {
    let trace = super::trace::Trace::start("start");
    let store = Store::new(root);
    let st = load(&store, id)?;
    match st.status {
        Status::Created => {}
        Status::Stopped => bail!("cannot start a container that has stopped"),
        _ => bail!("cannot start an already running container"),
    }
    trace.mark("state read");
    control::call(&store.dir(id), &Request::Start)?;
    trace.mark("started");
    Ok(())
}

/// `husk run`: create, start, and (unless detached) wait and delete; exits with the status.
pub fn run(root: &Path, opts: &CreateOpts, detach: bool, debug: &dyn Fn(&str)) -> Result<i32> {
    let pid = create(root, opts, debug)?;
    if let Err(e) = start(root, &opts.id) {
        let _ = delete(root, &opts.id, true);
        return Err(e);
    }
    Ok(follow(root, &opts.id, pid, detach))
}

/// The end of `run` and `restore`: in the foreground, waits for the container's monitor
/// `pid` and deletes the container, returning its exit code; detached, returns 0 at once.
pub fn follow(root: &Path, id: &str, pid: i32, detach: bool) -> i32 {
    if detach {
        return 0;
    }
    let code = wait_pid(pid);
    let _ = delete(root, id, true);
    code
}

/// Waits for our child monitor and maps its end to an exit code.
fn wait_pid(pid: i32) -> i32 {
    use nix::sys::wait::{waitpid, WaitStatus};
    loop {
        match waitpid(nix::unistd::Pid::from_raw(pid), None) {
            Ok(WaitStatus::Exited(_, code)) => return code,
            Ok(WaitStatus::Signaled(_, sig, _)) => return 128 + sig as i32,
            Ok(_) => continue,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(_) => return 255,
        }
    }
}

pub fn state(root: &Path, id: &str) -> Result<()> {
    let st = load(&Store::new(root), id)?;
    println!("{}", serde_json::to_string_pretty(&st.oci_json())?);
    Ok(())
}

pub fn kill(root: &Path, id: &str, sig: &str, all: bool) -> Result<()> {
    let store = Store::new(root);
    let signal = signal::parse(sig)?;
    let st = load(&store, id)?;
    if st.status == Status::Stopped {
        bail!("container not running");
    }
    control::call(&store.dir(id), &Request::Kill { signal, all })?;
    Ok(())
}

pub fn delete(root: &Path, id: &str, force: bool) -> Result<()> {
    let store = Store::new(root);
    let st = load(&store, id)?;
    match st.status {
        // The monitor may still be tearing its VM down; it must be gone (and out of the
        // container's cgroup) before the cgroup can be removed.
        Status::Stopped => finish_monitor(&st),
        Status::Created => stop_monitor(&store, &st),
        _ if force => stop_monitor(&store, &st),
        s => bail!("cannot delete container {id} that is not stopped: {s}"),
    }
    store.remove(id)?;
    super::cgroup::remove(&st.cgroup_dirs);
    if let Some(f) = &st.page_file {
        super::paging::remove_page_file(f);
    }
    Ok(())
}

/// Kills the container and, failing a clean end within a few seconds, its monitor.
fn stop_monitor(store: &Store, st: &ContainerState) {
    let dir = store.dir(&st.id);
    let _ = control::call_timeout(
        &dir,
        &Request::Kill {
            signal: libc::SIGKILL,
            all: true,
        },
        Duration::from_secs(10),
    );
    finish_monitor(st);
}

/// Gives the monitor up to 10 s to exit on its own, then kills it.
pub fn finish_monitor(st: &ContainerState) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while monitor_alive(st) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    if monitor_alive(st) {
        // SAFETY: plain kill(2) of the monitor whose identity monitor_alive just checked.
        unsafe { libc::kill(st.pid, libc::SIGKILL) };
        while monitor_alive(st) {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

pub fn pause(root: &Path, id: &str, pause: bool) -> Result<()> {
    let store = Store::new(root);
    let st = load(&store, id)?;
    match (st.status, pause) {
        (Status::Running, true) => control::call(&store.dir(id), &Request::Pause)?,
        (Status::Paused, false) => control::call(&store.dir(id), &Request::Resume)?,
        (Status::Paused, true) => bail!("container already paused"),
        (_, true) => bail!("container not running"),
        (_, false) => bail!("container not paused"),
    };
    Ok(())
}

pub fn ps(root: &Path, id: &str, json: bool) -> Result<()> {
    let store = Store::new(root);
    let st = load(&store, id)?;
    if st.status == Status::Stopped {
        bail!("container not running");
    }
    let Reply::Pids { pids } = control::call(&store.dir(id), &Request::Ps)? else {
        bail!("unexpected reply from the monitor");
    };
    if json {
        println!("{}", serde_json::to_string(&pids)?);
    } else {
        println!("PID");
        pids.iter().for_each(|p| println!("{p}"));
    }
    Ok(())
}

pub fn list(root: &Path, json: bool, quiet: bool) -> Result<()> {
    let store = Store::new(root);
    let all: Vec<ContainerState> = store
        .list()
        .into_iter()
        .filter_map(|s| load(&store, &s.id).ok())
        .collect();
    if quiet {
        all.iter().for_each(|s| println!("{}", s.id));
    } else if json {
        let v: Vec<_> = all.iter().map(|s| s.oci_json()).collect();
        println!("{}", serde_json::to_string(&v)?);
    } else {
        println!("ID\tPID\tSTATUS\tBUNDLE\tCREATED\tOWNER");
        for s in &all {
            let pid = s.oci_json()["pid"].clone();
            let b = s.bundle.display();
            println!("{}\t{pid}\t{}\t{b}\t{}\troot", s.id, s.status, s.created);
        }
    }
    Ok(())
}

/// runc's `features` JSON, listing only what Husk honours.
pub fn features() -> Result<()> {
    let caps: Vec<String> = caps_all();
    let v = serde_json::json!({
        "ociVersionMin": "1.0.0",
        "ociVersionMax": super::state::OCI_VERSION,
        "hooks": [],
        "mountOptions": ["bind", "rbind", "ro", "rw", "nosuid", "nodev", "noexec", "relatime",
            "strictatime", "noatime", "private", "rprivate", "slave", "rslave", "shared",
            "rshared", "mode", "size", "newinstance", "ptmxmode", "gid", "uid"],
        "linux": {
            "namespaces": ["cgroup", "ipc", "mount", "network", "pid", "uts"],
            "capabilities": caps,
            "cgroup": { "v1": false, "v2": true, "systemd": false, "systemdUser": false },
            "seccomp": {
                "enabled": true,
                "actions": ["SCMP_ACT_ALLOW", "SCMP_ACT_ERRNO", "SCMP_ACT_KILL",
                    "SCMP_ACT_KILL_PROCESS", "SCMP_ACT_KILL_THREAD", "SCMP_ACT_LOG",
                    "SCMP_ACT_TRAP"],
                "operators": ["SCMP_CMP_EQ", "SCMP_CMP_NE", "SCMP_CMP_LT", "SCMP_CMP_LE",
                    "SCMP_CMP_GT", "SCMP_CMP_GE", "SCMP_CMP_MASKED_EQ"],
                "archs": ["SCMP_ARCH_X86_64"]
            },
            "apparmor": { "enabled": false },
            "selinux": { "enabled": false }
        },
        "annotations": { "io.husk.isolation": "kvm-microvm" }
    });
    println!("{}", serde_json::to_string_pretty(&v)?);
    Ok(())
}

fn caps_all() -> Vec<String> {
    (0..=40)
        .filter_map(|n| cap_name(n).map(String::from))
        .collect()
}

fn cap_name(n: u32) -> Option<&'static str> {
    const NAMES: [&str; 41] = [
        "CAP_CHOWN",
        "CAP_DAC_OVERRIDE",
        "CAP_DAC_READ_SEARCH",
        "CAP_FOWNER",
        "CAP_FSETID",
        "CAP_KILL",
        "CAP_SETGID",
        "CAP_SETUID",
        "CAP_SETPCAP",
        "CAP_LINUX_IMMUTABLE",
        "CAP_NET_BIND_SERVICE",
        "CAP_NET_BROADCAST",
        "CAP_NET_ADMIN",
        "CAP_NET_RAW",
        "CAP_IPC_LOCK",
        "CAP_IPC_OWNER",
        "CAP_SYS_MODULE",
        "CAP_SYS_RAWIO",
        "CAP_SYS_CHROOT",
        "CAP_SYS_PTRACE",
        "CAP_SYS_PACCT",
        "CAP_SYS_ADMIN",
        "CAP_SYS_BOOT",
        "CAP_SYS_NICE",
        "CAP_SYS_RESOURCE",
        "CAP_SYS_TIME",
        "CAP_SYS_TTY_CONFIG",
        "CAP_MKNOD",
        "CAP_LEASE",
        "CAP_AUDIT_WRITE",
        "CAP_AUDIT_CONTROL",
        "CAP_SETFCAP",
        "CAP_MAC_OVERRIDE",
        "CAP_MAC_ADMIN",
        "CAP_SYSLOG",
        "CAP_WAKE_ALARM",
        "CAP_BLOCK_SUSPEND",
        "CAP_AUDIT_READ",
        "CAP_PERFMON",
        "CAP_BPF",
        "CAP_CHECKPOINT_RESTORE",
    ];
    NAMES.get(n as usize).copied()
}

/// Writes runc's default config.json into `bundle`, refusing to overwrite one.
pub fn spec(bundle: &Path) -> Result<()> {
    let path = bundle.join("config.json");
    if path.exists() {
        bail!("File {} exists. Remove it first", path.display());
    }
    let spec = oci_spec::runtime::Spec::default();
    std::fs::write(&path, serde_json::to_string_pretty(&spec)?)
        .with_context(|| format!("writing {}", path.display()))
}
