//! The monitor: one process per container that owns its micro-VM. It clones the guest from a
//! template (or boots it, or restores it from a checkpoint image), has the agent create the
//! container, bridges stdio, answers control requests, and exits with the container's status
//! (the code, or 128 + signal) once the process is gone and the VM is off.
//!
//! Its parts: `launch` (how `create` starts it), `control` (its socket and protocol), `stdio`,
//! `paging` (a paused guest's memory on disk), `cgroup` (the container's host cgroup).

pub mod cgroup;
pub mod control;
pub mod launch;
pub mod paging;
pub mod stdio;

use std::fs::File;
use std::io::Write;
use std::os::fd::{FromRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use husk_agent::client::Client;
use husk_agent::proto::{Request as AgentRequest, Response};
use husk_templates::{Lease, Template};

use self::control::{Reply, Request};
use self::paging::{PauseConfig, PausePaging};
use self::stdio::HostStdio;
use crate::agent_vm::{AgentVm, BootOptions, OwnDevices, AGENT_TIMEOUT, POWEROFF_TIMEOUT};
use crate::checkpoint_image::{self, ImageManifest};
use crate::container::bundle::Bundle;
use crate::container::guest_plan::{GuestPlan, GUEST_ROOTFS};
use crate::container::state::{ContainerState, StateRoot, Status};
use crate::container::trace::Trace;
use crate::{assets, guest_port};

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
}

/// Runs the container to its end; returns the monitor's exit code.
pub fn run(args: MonitorArgs) -> i32 {
    let mut ready = args.ready_fd.map(|fd| {
        // SAFETY: `create` passed us this fd for our exclusive use.
        unsafe { File::from_raw_fd(fd) }
    });
    let store = StateRoot::new(&args.root);
    let started = match start(&args, &store) {
        Ok(s) => s,
        Err(e) => {
            let hint = console_hint(&store.dir(&args.id).join("console.log"));
            report(&mut ready, &format!("{e:#}{hint}"));
            return 1;
        }
    };
    report(&mut ready, "ok");
    drop(ready);
    finish(started, &store)
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

/// Boots, creates the container, saves the "created" state and starts the control server.
fn start(args: &MonitorArgs, store: &StateRoot) -> Result<Started> {
    let trace = Trace::start("monitor");
    let bundle = Bundle::load(&args.bundle)?;
    let plan = GuestPlan::new(&bundle)?;
    let dir = store.dir(&args.id);
    // Before the VM exists, so that guest RAM and every VMM thread are charged to it.
    trace.mark("bundle loaded");
    let cgroup = HostCgroup::join(&bundle, &args.id)?;
    trace.mark("cgroup joined");
    let pause_config = PauseConfig::load()?;
    let manifest = args
        .restore
        .as_deref()
        .map(ImageManifest::read)
        .transpose()?;
    let (mut vm, clone) = match (&args.restore, &args.template) {
        (Some(image), _) => restore_vm(image, manifest.as_ref(), &dir, &plan)?,
        (None, Some(name)) => clone_vm(name, &dir, &plan)?,
        (None, None) => (AgentVm::start(options(&bundle, &dir, &plan)?)?, None),
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
        (Some(sock), true) => stdio::terminal(sock)?,
        _ => HostStdio::Inherited,
    };
    let attach = attach?.attach_stdio(&guest_id)?;
    let exit = stdio::bridge(attach.into_inner(), host)?;
    trace.mark("stdio attached");
    let base = template.as_ref().map(checkpoint_image::template_memory);
    let pager = PausePaging::new(pause_config, vm.control().clone(), base, &args.id);
    let mut initial = initial_state(args, &bundle)?;
    if restored {
        initial.status = Status::Running;
    }
    if guest_id != args.id {
        initial.guest_id = Some(guest_id);
    }
    initial.cgroup_dirs = cgroup.keep();
    initial.page_file = Some(pager.file().to_path_buf());
    let state = Arc::new(Mutex::new(initial));
    store.save(&state.lock().unwrap())?;
    trace.mark("state saved");
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
    Ok(Started {
        vm,
        _lease: lease,
        pager,
        state,
        exit,
    })
}

/// Has the guest agent make a clone unique, mount the shares and create the container, as
/// the VM's origin requires. Returns the opening of a second agent connection, for stdio: it
/// is opened while the guest works, and its failure is the caller's to report.
fn prepare_guest(
    vm: &mut AgentVm,
    args: &MonitorArgs,
    plan: &GuestPlan,
    cloned: bool,
    trace: &Trace,
) -> Result<Result<Client<UnixStream>>> {
    let restored = args.restore.is_some();
    let mut agent = match cloned || restored {
        true => vm.clone_agent(AGENT_TIMEOUT),
        false => vm.agent(AGENT_TIMEOUT),
    }
    .context("waiting for the guest agent")?;
    trace.mark("agent answering");
    let (what, requests) = guest_requests(args, plan, cloned)?;
    // A guest that stops answering fails the create instead of hanging it.
    agent.get_ref().set_read_timeout(Some(AGENT_TIMEOUT))?;
    agent
        .send_all(requests)
        .context("talking to the guest agent")?;
    // The stdio connection is opened while the guest works through those requests.
    let attach = vm.agent(AGENT_TIMEOUT);
    check_replies(&mut agent, &what)?;
    trace.mark("guest prepared, container created");
    Ok(attach)
}

/// The requests that prepare the guest, each with what it does (for an error).
fn guest_requests(
    args: &MonitorArgs,
    plan: &GuestPlan,
    cloned: bool,
) -> Result<(Vec<&'static str>, Vec<AgentRequest>)> {
    let restored = args.restore.is_some();
    // A clone is made unique; a restored guest also needs the clock set (it stood still since
    // the checkpoint), but has its shares mounted and its container running already.
    let mut steps = Vec::new();
    if cloned || restored {
        steps.push(("making the clone unique", unique_request()?));
    }
    if !restored {
        steps.push(("mounting the shares in the guest", plan.mount_request()));
        let create = AgentRequest::CreateContainer {
            id: args.id.clone(),
            spec: plan.spec.clone(),
            rootfs: GUEST_ROOTFS.into(),
        };
        steps.push(("", create));
    }
    Ok(steps.into_iter().unzip())
}

struct Cloned {
    /// Marks this monitor as a running clone of the template (the template stays meanwhile).
    lease: Lease,
    template: Template,
}

/// Restores the VM from template `name`, with this container's console, vsock socket and
/// directories in the template's share slots.
fn clone_vm(name: &str, dir: &Path, plan: &GuestPlan) -> Result<(AgentVm, Option<Cloned>)> {
    let (template, lease) = open_template(name)?;
    let opts = own_devices(dir, template_shares(&template, plan));
    let vm = AgentVm::restore(&template.snapshot_dir(), opts)
        .with_context(|| format!("cloning template {name}"))?;
    Ok((vm, Some(Cloned { lease, template })))
}

/// Brings back the checkpoint in `image` with this container's console, vsock socket and
/// (possibly new) bundle's directories; the pages are relative to the template's memory, which
/// must be the one the checkpoint was taken against.
fn restore_vm(
    image: &Path,
    manifest: Option<&ImageManifest>,
    dir: &Path,
    plan: &GuestPlan,
) -> Result<(AgentVm, Option<Cloned>)> {
    let manifest = manifest.context("restoring without the checkpoint's manifest")?;
    let (shares, cloned) = match &manifest.template {
        Some(t) => {
            let (template, lease) = open_template(&t.name)?;
            checkpoint_image::check_template(t, &template)?;
            let shares = template_shares(&template, plan);
            (shares, Some(Cloned { lease, template }))
        }
        None => {
            let shares = plan.shares.iter().map(|s| (s.path.clone(), s.read_only));
            (shares.collect(), None)
        }
    };
    let vm = AgentVm::restore_checkpoint(image, own_devices(dir, shares))
        .with_context(|| format!("restoring the checkpoint in {}", image.display()))?;
    Ok((vm, cloned))
}

fn open_template(name: &str) -> Result<(Template, Lease)> {
    let templates = husk_templates::Store::from_env();
    let Some(template) = templates.open(name)? else {
        anyhow::bail!("template {name} does not exist");
    };
    let lease = templates.lease(&template)?;
    Ok((template, lease))
}

/// The container's directories in the template's share slots.
fn template_shares(template: &Template, plan: &GuestPlan) -> Vec<(PathBuf, bool)> {
    let slots = usize::from(template.manifest.settings.share_slots);
    plan.slot_directories(slots, &template.placeholder())
}

/// This container's console, vsock socket and share directories for a restored VM.
fn own_devices(dir: &Path, shares: Vec<(PathBuf, bool)>) -> OwnDevices {
    OwnDevices {
        serial: husk_vmm::SerialOutput::File(dir.join("console.log")),
        vsock_path: dir.join("vsock.sock"),
        shares,
    }
}

/// Bytes of host randomness a clone's pool is reseeded with.
const CLONE_ENTROPY: usize = 64;

/// `CloneInit`: the host's wall clock and fresh entropy for a clone or a restored guest.
fn unique_request() -> Result<AgentRequest> {
    let mut entropy = [0u8; CLONE_ENTROPY];
    getrandom(&mut entropy)?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .context("the host clock is before 1970")?;
    Ok(AgentRequest::CloneInit {
        time_ns: now.as_nanos() as u64,
        entropy: entropy.to_vec(),
    })
}

/// Reads the replies to the requests sent with `send_all`, one per entry of `steps` (what
/// each request does); the first refused step is the error, named by its description (an
/// empty one, the create's, leaves the agent's message alone, as runc's would be).
fn check_replies(agent: &mut Client<UnixStream>, steps: &[&'static str]) -> Result<()> {
    let replies = agent
        .replies(steps.len())
        .context("talking to the guest agent")?;
    for (what, reply) in steps.iter().zip(replies) {
        match reply {
            Err(e) if what.is_empty() => return Err(anyhow::anyhow!("{e}")),
            Err(e) => return Err(anyhow::Error::new(e).context(*what)),
            Ok(Response::Ok | Response::Created { .. }) => {}
            Ok(other) => bail!("{what}: unexpected reply {other:?} from the guest agent"),
        }
    }
    Ok(())
}

fn getrandom(buf: &mut [u8]) -> Result<()> {
    let mut filled = 0;
    while filled < buf.len() {
        // SAFETY: writes at most `buf.len() - filled` bytes into the rest of `buf`.
        let n =
            unsafe { libc::getrandom(buf[filled..].as_mut_ptr().cast(), buf.len() - filled, 0) };
        if n < 0 {
            let err = std::io::Error::last_os_error();
            if err.kind() != std::io::ErrorKind::Interrupted {
                return Err(err).context("getrandom");
            }
            continue;
        }
        filled += n as usize;
    }
    Ok(())
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
        eprintln!("husk: {e:#}");
    }
    s.pager.remove_file();
    stdio::exit_code(&status)
}

fn vm_agent(vm: &AgentVm) -> Result<Client<UnixStream>> {
    // A wedged guest must not block the monitor's exit on the poweroff reply.
    agent_at(vm.vsock_path(), Duration::from_secs(10))
}

/// A connection to the guest agent whose replies are awaited for at most `timeout`.
fn agent_at(uds: &Path, timeout: Duration) -> Result<Client<UnixStream>> {
    let stream = guest_port::connect_timeout(uds, husk_agent::AGENT_VSOCK_PORT, timeout)?;
    Ok(Client::new(stream))
}

/// A cold boot sized from `linux.resources` (see `Bundle::vm_size`).
fn options(bundle: &Bundle, dir: &Path, plan: &GuestPlan) -> Result<BootOptions> {
    let (vcpus, memory_mib) = bundle.vm_size();
    Ok(BootOptions {
        vcpus,
        memory_mib,
        kernel: assets::kernel(None)?,
        initramfs: assets::initramfs(None)?,
        cmdline: String::new(),
        serial: husk_vmm::SerialOutput::File(dir.join("console.log")),
        disks: Vec::new(),
        shares: plan.shares.clone(),
        vsock_path: Some(dir.join("vsock.sock")),
    })
}

fn initial_state(args: &MonitorArgs, bundle: &Bundle) -> Result<ContainerState> {
    let pid = std::process::id() as i32;
    let annotations = bundle.spec.annotations().clone().unwrap_or_default();
    Ok(ContainerState {
        id: args.id.clone(),
        bundle: bundle.dir.clone(),
        rootfs: bundle.rootfs.clone(),
        created: humantime::format_rfc3339_nanos(std::time::SystemTime::now()).to_string(),
        status: Status::Created,
        pid,
        pid_start_time: crate::container::process_start_time(pid).unwrap_or(0),
        annotations: annotations.into_iter().collect(),
        cgroup_dirs: Vec::new(),
        page_file: None,
        guest_id: None,
    })
}

/// The monitor's host cgroup while the container is being created: if creation fails, the
/// monitor steps back out and removes it, so a failed create leaves no cgroup behind.
struct HostCgroup {
    dirs: Vec<PathBuf>,
    rel: PathBuf,
}

impl HostCgroup {
    fn join(bundle: &Bundle, id: &str) -> Result<HostCgroup> {
        let rel = cgroup::relative_path(&bundle.raw, id)?;
        let limits = cgroup::Limits::from_spec(&bundle.raw, bundle.vm_size().1);
        let dirs = cgroup::setup(&rel, &limits, std::process::id())?;
        Ok(HostCgroup { dirs, rel })
    }

    /// Creation succeeded: the directories stay (for `delete` to remove).
    fn keep(mut self) -> Vec<PathBuf> {
        std::mem::take(&mut self.dirs)
    }
}

impl Drop for HostCgroup {
    fn drop(&mut self) {
        if !self.dirs.is_empty() {
            cgroup::leave(&self.dirs, &self.rel, std::process::id());
            cgroup::remove(&self.dirs);
        }
    }
}

/// How long a control request waits for the guest agent (starting the process is the
/// slowest request, quick even on a slow, nested host; this only catches a wedged guest).
const CONTROL_AGENT_TIMEOUT: Duration = Duration::from_secs(30);

/// What the control server needs to act on the container.
struct Control {
    uds: PathBuf,
    vm: husk_vmm::VmControl,
    state: Arc<Mutex<ContainerState>>,
    root: PathBuf,
    pager: Arc<PausePaging>,
    /// The template the VM was cloned from (a checkpoint's pages are relative to it).
    template: Option<Template>,
    /// Set by a checkpoint that ends the container: the VM stops once the reply is out.
    stop_after_reply: AtomicBool,
}

/// Serves `monitor.sock` on a thread: each request gets a fresh agent connection.
fn serve_control(dir: &Path, ctx: Control) -> Result<()> {
    let path = dir.join(control::SOCKET);
    let _ = std::fs::remove_file(&path);
    let listener =
        UnixListener::bind(&path).with_context(|| format!("binding {}", path.display()))?;
    std::thread::Builder::new()
        .name("control".into())
        .spawn(move || {
            for conn in listener.incoming().flatten() {
                let reply = match control::read_request(&conn) {
                    Ok(req) => ctx.handle(req).unwrap_or_else(|e| Reply::Error {
                        message: format!("{e:#}"),
                    }),
                    Err(e) => Reply::Error {
                        message: format!("bad request: {e:#}"),
                    },
                };
                let _ = control::write_reply(&conn, &reply);
                if ctx.stop_after_reply.swap(false, Ordering::SeqCst) {
                    ctx.vm.stop();
                }
            }
        })?;
    Ok(())
}

impl Control {
    fn handle(&self, req: Request) -> Result<Reply> {
        let id = self.state.lock().unwrap().guest_id().to_string();
        match req {
            Request::Start => {
                self.agent()?.start_container(&id)?;
                self.set(Status::Running)?;
            }
            Request::Kill { signal, all } => self.agent()?.signal_container(&id, signal, all)?,
            // Pausing freezes the whole VM: no guest code runs until resume.
            // `paused` may page the memory out (see paging.rs). The container is paused
            // either way: a failed page-out leaves its memory in RAM, and says why.
            Request::Pause => {
                self.vm.pause()?;
                self.set(Status::Paused)?;
                if let Err(e) = self.pager.paused() {
                    eprintln!("husk: {e:#}");
                }
            }
            // A page file that cannot be read back leaves the container paused.
            Request::Resume => {
                self.pager.resuming()?;
                self.vm.resume();
                self.set(Status::Running)?;
            }
            Request::Checkpoint { dir, leave_running } => {
                self.checkpoint(&dir, leave_running)?;
                if !leave_running {
                    self.set(Status::Stopped)?;
                    self.stop_after_reply.store(true, Ordering::SeqCst);
                }
            }
            Request::Ps => {
                return Ok(Reply::Pids {
                    pids: self.agent()?.list_processes(&id)?,
                })
            }
        }
        Ok(Reply::Ok)
    }

    /// Writes the checkpoint image into `dir`: the VM's state and pages, then the manifest.
    /// Without `leave_running` the VM stays paused (the caller stops it); on an error
    /// whatever was written is removed and the container runs on.
    fn checkpoint(&self, dir: &Path, leave_running: bool) -> Result<()> {
        use husk_vmm::snapshot::AfterSnapshot;
        let after = match leave_running {
            true => AfterSnapshot::Resume,
            false => AfterSnapshot::StayPaused,
        };
        let was_paused = self.vm.is_paused();
        let written = self
            .vm
            .checkpoint(dir, self.pager.base(), after)
            .map_err(|e| anyhow::anyhow!("{e}"))
            .and_then(|_| {
                let st = self.state.lock().unwrap().clone();
                let template = self.template.as_ref().map(checkpoint_image::template_ref);
                ImageManifest::new(dir, st.guest_id(), &st.bundle, template.transpose()?)?
                    .write(dir)
            });
        if let Err(e) = written {
            checkpoint_image::remove_image(dir);
            if !was_paused && self.vm.is_paused() {
                self.vm.resume();
            }
            return Err(e.context(format!("checkpointing into {}", dir.display())));
        }
        Ok(())
    }

    /// The agent for one request of a CLI command: a guest that stopped answering becomes
    /// an error well within the CLI's own wait ([`control::CALL_TIMEOUT`]).
    fn agent(&self) -> Result<Client<UnixStream>> {
        agent_at(&self.uds, CONTROL_AGENT_TIMEOUT)
    }

    fn set(&self, status: Status) -> Result<()> {
        let mut st = self.state.lock().unwrap();
        st.status = status;
        StateRoot::new(&self.root).save(&st)
    }
}
