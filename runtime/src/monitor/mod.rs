//! The monitor: one process per container that owns its micro-VM. It clones the guest from a
//! template (or boots it, or restores it from a checkpoint image), has the agent create the
//! container, bridges stdio, answers control requests, and exits with the container's status
//! (the code, or 128 + signal) once the process is gone and the VM is off.
//!
//! Its parts: `launch` (how `create` starts it), `guest_setup` (the VM and the guest made
//! ready), `control` (its socket's protocol) and `control_server` (the monitor's side of it),
//! `stdio`, `paging` (a paused guest's memory on disk), `cgroup` (the container's host cgroup),
//! `confinement` (what the monitor may do once the VM is set up). What goes wrong in the VM or
//! the monitor is logged through `logging::monitor_log`.

pub mod cgroup;
mod confinement;
pub mod control;
mod control_server;
mod guest_setup;
pub mod launch;
pub mod paging;
pub mod stdio;

use std::fs::File;
use std::io::Write;
use std::os::fd::{FromRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use husk_agent::client::Client;
use husk_templates::Lease;

use self::cgroup::HostCgroup;
use self::control_server::{serve_control, Control};
use self::guest_setup::{clone_vm, cold_boot_options, prepare_guest, restore_vm};
use self::paging::{PauseConfig, PausePaging};
use self::stdio::HostStdio;
use crate::agent_vm::{AgentVm, POWEROFF_TIMEOUT};
use crate::checkpoint_image::{self, ImageManifest};
use crate::container::bundle::Bundle;
use crate::container::guest_plan::GuestPlan;
use crate::container::state::{ContainerState, StateRoot, Status};
use crate::container::trace::Trace;
use crate::guest_port;
use crate::logging::monitor_log::{self, MonitorLog};
use crate::logging::LogOptions;

/// What `husk create` hands the monitor.
pub struct MonitorArgs {
    pub root: PathBuf,
    pub id: String,
    pub bundle: PathBuf,
    pub console_socket: Option<PathBuf>,
    /// A pipe on which to say "ok" (or the error) once the container is created.
    pub ready_fd: Option<RawFd>,
    /// The template to clone the VM from; cold boot when `None`.
    pub template: Option<String>,
    /// Restore the VM (and its running container) from this checkpoint instead.
    pub restore: Option<PathBuf>,
    /// Where and how the monitor logs (`create`'s global flags).
    pub log: LogOptions,
}

/// Runs the container to its end; returns the monitor's exit code.
pub fn run(args: MonitorArgs) -> i32 {
    husk_vmm::confine::thread_started(husk_vmm::confine::ThreadKind::Monitor);
    let mut ready = args.ready_fd.map(|fd| {
        // SAFETY: `create` passed us this fd for our exclusive use.
        unsafe { File::from_raw_fd(fd) }
    });
    let store = StateRoot::new(&args.root);
    // First, so that the VMM's warnings from the very start are seen.
    let log = monitor_log::install(&args.log, &store.dir(&args.id));
    let started = match record_self(&store, &args.id).and_then(|()| start(&args, &store, log)) {
        Ok(s) => s,
        Err(e) => {
            let hint = console_hint(&store.dir(&args.id).join("console.log"));
            report(&mut ready, &format!("{e:#}{hint}"));
            log::logger().flush();
            return 1;
        }
    };
    report(&mut ready, "ok");
    drop(ready);
    let code = finish(started, &store);
    // A line still being counted as a repeat is written now.
    log::logger().flush();
    code
}

/// The guest console lines that explain a failed start (a panic in the kernel or the agent),
/// as a suffix for the error; empty when there are none. The console log goes away with the
/// state directory, so this is the only place they survive.
fn console_hint(log: &Path) -> String {
    let Ok(text) = std::fs::read_to_string(log) else {
        return String::new();
    };
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("panic") || (l.contains("husk-agent:") && !l.contains("ready")))
        .collect();
    if lines.is_empty() {
        return String::new();
    }
    let tail = &lines[lines.len().saturating_sub(4)..];
    format!(" (guest console: {})", tail.join(" | "))
}

/// Writes one readiness line on a pipe given by fd number, and closes it.
pub fn notify(fd: RawFd, msg: &str) {
    // SAFETY: the parent passed us this fd for our exclusive use; we own it from here.
    let mut f = unsafe { File::from_raw_fd(fd) };
    let _ = writeln!(f, "{msg}");
}

fn report(ready: &mut Option<File>, msg: &str) {
    match ready {
        Some(f) => {
            let _ = writeln!(f, "{msg}");
        }
        None if msg != "ok" => eprintln!("{msg}"),
        None => {}
    }
}

struct Started {
    vm: AgentVm,
    /// Marks this monitor as a running clone of its template (dropped at exit).
    _lease: Option<Lease>,
    pager: Arc<PausePaging>,
    state: Arc<Mutex<ContainerState>>,
    exit: std::sync::mpsc::Receiver<stdio::Outcome>,
}

/// Boots, creates the container, saves the "created" state (with `log`, where the monitor
/// logs) and starts the control server.
fn start(args: &MonitorArgs, store: &StateRoot, log: &MonitorLog) -> Result<Started> {
    let trace = Trace::start("monitor");
    let bundle = Bundle::load(&args.bundle)?;
    let mut plan = GuestPlan::new(&bundle)?;
    plan.add_hook_state(&initial_state(args, &bundle))?;
    let dir = store.dir(&args.id);
    // Before the VM exists, so that guest RAM and every VMM thread are charged to it.
    trace.mark("bundle loaded");
    // Recorded before they are made: a monitor killed at any point leaves none unknown.
    let cgroup_dirs = cgroup::dirs_for(&cgroup::relative_path(&bundle.raw, &args.id)?);
    record_creating(store, &args.id, |st| st.cgroup_dirs = cgroup_dirs)?;
    let cgroup = HostCgroup::join(&bundle, &args.id)?;
    trace.mark("cgroup joined");
    let pause_config = PauseConfig::load()?;
    let manifest = args
        .restore
        .as_deref()
        .map(ImageManifest::read_checked)
        .transpose()?;
    let (mut vm, clone) = match (&args.restore, &args.template) {
        (Some(image), _) => restore_vm(image, manifest.as_ref(), &dir, &plan)?,
        (None, Some(name)) => clone_vm(name, &dir, &plan)?,
        (None, None) => (
            AgentVm::start(cold_boot_options(&bundle, &dir, &plan)?)?,
            None,
        ),
    };
    trace.mark(if clone.is_some() {
        "VM restored"
    } else {
        "VM started"
    });
    let (lease, template) = clone.map(|c| (c.lease, c.template)).unzip();
    let restored = args.restore.is_some();
    // A restored container keeps the id its guest agent knows it by.
    let guest_id = manifest.map_or_else(|| args.id.clone(), |m| m.id);
    let attach = prepare_guest(&mut vm, args, &plan, lease.is_some(), &trace)?;
    let host = match (&args.console_socket, terminal(&bundle)) {
        (Some(sock), true) => {
            let pty = stdio::terminal(sock)?;
            // From here on, failures reach `create` over the readiness pipe or go to the log.
            stdio::release_caller_stdio()?;
            pty
        }
        _ => HostStdio::Inherited,
    };
    let attach = attach?.attach_stdio(&guest_id)?;
    let exit = stdio::bridge(attach.into_inner(), host)?;
    trace.mark("stdio attached");
    let base = template.as_ref().map(checkpoint_image::template_memory);
    let pager = PausePaging::new(pause_config, vm.control().clone(), base, &args.id);
    let mut initial = initial_state(args, &bundle);
    if restored {
        initial.status = Status::Running;
    }
    if guest_id != args.id {
        initial.guest_id = Some(guest_id);
    }
    initial.cgroup_dirs = cgroup.keep();
    initial.page_file = Some(pager.file().to_path_buf());
    initial.monitor_log = Some(log.path());
    let state = Arc::new(Mutex::new(initial));
    store.save(&state.lock().unwrap())?;
    trace.mark("state saved");
    // A clone serves a directory in every share slot of its template, used or not.
    let slots = template
        .as_ref()
        .map_or(0, |t| t.manifest.settings.share_slots.into());
    let ctx = Control {
        uds: vm.vsock_path().to_path_buf(),
        vm: vm.control().clone(),
        state: state.clone(),
        root: args.root.clone(),
        pager: Arc::new(pager),
        template,
        stop_after_reply: AtomicBool::new(false),
    };
    let pager = ctx.pager.clone();
    serve_control(&dir, ctx)?;
    confinement::confine(plan.shares.len().max(slots), log, &trace)?;
    Ok(Started {
        vm,
        _lease: lease,
        pager,
        state,
        exit,
    })
}

/// Records this process as the monitor of the container `create` claimed, before anything
/// else: from here on `state` knows it runs and `delete` can kill it. Fails if the container
/// was deleted meanwhile (a killed `create`'s, removed by `delete --force`).
fn record_self(store: &StateRoot, id: &str) -> Result<()> {
    let pid = std::process::id() as i32;
    record_creating(store, id, |st| {
        st.pid = pid;
        st.pid_start_time = crate::container::process_start_time(pid).unwrap_or(0);
        st.creator = None;
    })
}

/// Updates the state of the container being created, so that what the monitor holds is
/// known to `delete` should the monitor be killed before the container is created.
fn record_creating(
    store: &StateRoot,
    id: &str,
    update: impl FnOnce(&mut ContainerState),
) -> Result<()> {
    let mut st = store
        .load(id)
        .with_context(|| format!("container {id} is no longer being created"))?;
    update(&mut st);
    store.save(&st)
}

fn terminal(bundle: &Bundle) -> bool {
    bundle.raw["process"]["terminal"].as_bool().unwrap_or(false)
}

/// Waits for the process to end, records it, powers the guest off.
fn finish(mut s: Started, store: &StateRoot) -> i32 {
    let killed = husk_agent::ExitStatus {
        code: None,
        signal: Some(libc::SIGKILL),
    };
    let status = match s.exit.recv() {
        Ok(Ok(status)) => status,
        Ok(Err(message)) => {
            eprintln!("{message}");
            killed
        }
        Err(_) => killed,
    };
    {
        let mut st = s.state.lock().unwrap();
        st.status = Status::Stopped;
        let _ = store.save(&st);
    }
    if let Ok(mut agent) = vm_agent(&s.vm) {
        let _ = agent.poweroff();
    }
    // The container's status is recorded: a guest slow to power off must not keep the
    // monitor (and the caller waiting on it) alive; the VM ends with this process.
    if let Err(e) = s.vm.wait_timeout(POWEROFF_TIMEOUT) {
        log::error!("the VM ended with an error: {e:#}");
    }
    s.pager.remove_file();
    stdio::exit_code(&status)
}

fn vm_agent(vm: &AgentVm) -> Result<Client<UnixStream>> {
    // A wedged guest must not block the monitor's exit on the poweroff reply.
    agent_at(vm.vsock_path(), Duration::from_secs(10))
}

fn initial_state(args: &MonitorArgs, bundle: &Bundle) -> ContainerState {
    let pid = std::process::id() as i32;
    ContainerState {
        status: Status::Created,
        pid,
        pid_start_time: crate::container::process_start_time(pid).unwrap_or(0),
        creator: None,
        ..ContainerState::creating(&args.id, bundle)
    }
}

/// A connection to the guest agent whose replies are awaited for at most `timeout`.
fn agent_at(uds: &Path, timeout: Duration) -> Result<Client<UnixStream>> {
    let stream = guest_port::connect_timeout(uds, husk_agent::AGENT_VSOCK_PORT, timeout)?;
    Ok(Client::new(stream))
}
