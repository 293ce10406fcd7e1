//! A micro-VM running the Husk guest kernel and agent, driven from this process (as opposed to
//! the VMM's bare `Vm`, which knows nothing of the agent).
//!
//! The VMM runs on its own thread; the caller talks to the guest agent over the VM's vsock
//! Unix socket. Used by the monitor, template builds and `husk boot`.

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use husk_agent::client::Client;
use husk_vmm::confine::ThreadKind;
use husk_vmm::snapshot::RestoreOverrides;
use husk_vmm::{
    BlockConfig, Boot, SerialOutput, ShareConfig, Vm, VmConfig, VmControl, VmError, VsockConfig,
};

/// How long a guest may take to reach its agent. Generous: a nested, emulated host (the lab)
/// runs guests many times slower than hardware.
pub const AGENT_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a guest may take to power off once the agent has acknowledged.
pub const POWEROFF_TIMEOUT: Duration = Duration::from_secs(30);

/// The guest's vsock context id; every VM has its own socket, so one id serves all.
pub const GUEST_CID: u32 = 3;

/// Maps `--console` to where the serial output goes.
pub fn serial_output(console: Option<&PathBuf>) -> SerialOutput {
    match console {
        None => SerialOutput::Sink,
        Some(p) if p.as_os_str() == "-" => SerialOutput::Stdout,
        Some(p) => SerialOutput::File(p.clone()),
    }
}

/// What to boot and with which resources.
#[derive(Clone, Debug)]
pub struct BootOptions {
    pub vcpus: u8,
    pub memory_mib: u32,
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
    pub cmdline: String,
    pub serial: SerialOutput,
    pub disks: Vec<BlockConfig>,
    pub shares: Vec<ShareConfig>,
    /// Where the vsock socket goes; a private temp dir when `None`.
    pub vsock_path: Option<PathBuf>,
}

/// What a clone gets of its own (see [`AgentVm::restore`]).
#[derive(Clone, Debug)]
pub struct OwnDevices {
    pub serial: SerialOutput,
    pub vsock_path: PathBuf,
    /// What each share slot of the snapshot serves, in order (the tags stay the snapshot's).
    pub shares: Vec<ShareConfig>,
}

impl OwnDevices {
    fn overrides(self) -> (RestoreOverrides, PathBuf) {
        let overrides = RestoreOverrides {
            serial: self.serial,
            vsock: Some((GUEST_CID, self.vsock_path.clone())),
            shares: Some(self.shares),
            kvm_device: PathBuf::from("/dev/kvm"),
        };
        (overrides, self.vsock_path)
    }
}

/// A running micro-VM. Dropping it without `wait` leaves the VMM thread to end with the guest.
pub struct AgentVm {
    uds: PathBuf,
    control: VmControl,
    thread: Option<JoinHandle<Result<()>>>,
    /// Set until the agent has said it listens (cold boots only).
    ready: Option<crate::guest_port::ReadySignal>,
    // Holds the socket directory, if we made it; removed on drop so nothing is left behind.
    _dir: Option<tempfile::TempDir>,
}

impl AgentVm {
    /// Builds the VM (bad input fails here, synchronously) and starts its vCPUs.
    pub fn start(opts: BootOptions) -> Result<AgentVm> {
        let (dir, uds) = match &opts.vsock_path {
            Some(p) => (None, p.clone()),
            None => {
                let dir = tempfile::Builder::new()
                    .prefix("husk-vm-")
                    .tempdir()
                    .context("creating the VM's socket directory")?;
                let uds = dir.path().join("vsock.sock");
                (Some(dir), uds)
            }
        };
        let ready = crate::guest_port::ReadySignal::bind(&uds, husk_agent::READY_VSOCK_PORT)?;
        let config = vm_config(opts, &uds);
        let mut vm = Self::spawn(move || Vm::new(config), uds, dir)?;
        vm.ready = Some(ready);
        Ok(vm)
    }

    /// Clones a VM from the snapshot in `snapshot_dir` (a template): memory mapped
    /// copy-on-write, vCPUs and devices where the snapshot left them, with this VM's own
    /// console, vsock socket and share directories (one per share of the snapshot). The
    /// agent already listens; the guest learns of its new host side by a transport reset.
    pub fn restore(snapshot_dir: &Path, opts: OwnDevices) -> Result<AgentVm> {
        let (overrides, uds) = opts.overrides();
        let dir = snapshot_dir.to_path_buf();
        Self::spawn(move || Vm::restore(&dir, overrides), uds, None)
    }

    /// Brings back the VM checkpointed into `dir` (see `VmControl::checkpoint`), with this
    /// VM's own console, vsock socket and share directories; its memory comes back lazily,
    /// against `base` (the template's memory file; `None`: zero).
    pub fn restore_checkpoint(
        dir: &Path,
        base: Option<&Path>,
        opts: OwnDevices,
    ) -> Result<AgentVm> {
        let (overrides, uds) = opts.overrides();
        let dir = dir.to_path_buf();
        let base = base.map(Path::to_path_buf);
        let restore = move || Vm::restore_checkpoint(&dir, base.as_deref(), overrides);
        Self::spawn(restore, uds, None)
    }

    /// Builds the VM on its own thread with `build` and runs it there.
    fn spawn(
        build: impl FnOnce() -> Result<Vm, VmError> + Send + 'static,
        uds: PathBuf,
        dir: Option<tempfile::TempDir>,
    ) -> Result<AgentVm> {
        let (built_tx, built_rx) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("vmm".into())
            .spawn(move || {
                husk_vmm::confine::thread_started(ThreadKind::VmmRunner);
                run_vm(build, built_tx)
            })?;
        match built_rx.recv() {
            Ok(Ok(control)) => Ok(AgentVm {
                uds,
                control,
                thread: Some(thread),
                ready: None,
                _dir: dir,
            }),
            Ok(Err(e)) => {
                let _ = thread.join();
                Err(e)
            }
            Err(_) => Err(join_error(thread)),
        }
    }

    /// Pauses and resumes the vCPUs.
    pub fn control(&self) -> &VmControl {
        &self.control
    }

    /// The VM's vsock Unix socket (Firecracker's `CONNECT <port>` convention).
    pub fn vsock_path(&self) -> &Path {
        &self.uds
    }

    /// True while the VMM thread runs.
    pub fn is_running(&self) -> bool {
        self.thread.as_ref().is_some_and(|t| !t.is_finished())
    }

    /// Waits for the agent to answer a ping and returns a client connected to it.
    pub fn agent(&mut self, timeout: Duration) -> Result<Client<UnixStream>> {
        let port = husk_agent::AGENT_VSOCK_PORT;
        let start = std::time::Instant::now();
        let connected = {
            let alive = || self.is_running();
            let ready = match &self.ready {
                Some(signal) => signal.wait(timeout, &alive),
                None => Ok(()),
            };
            ready.and_then(|()| crate::guest_port::connect_retry(&self.uds, port, timeout, &alive))
        };
        self.ready = None;
        let stream = match connected {
            Ok(s) => s,
            Err(e) if !self.is_running() => return Err(self.wait().err().unwrap_or(e)),
            Err(e) if start.elapsed() >= timeout => return Err(self.with_vcpu_report(e)),
            Err(e) => return Err(e),
        };
        let mut client = Client::new(stream);
        client.ping().context("agent ping")?;
        Ok(client)
    }

    /// Adds where the vCPUs are to the error of a guest that runs but never answered.
    pub(crate) fn with_vcpu_report(&self, e: anyhow::Error) -> anyhow::Error {
        match self.control.vcpu_report() {
            Ok(lines) => anyhow!("{e:#} (the VM still runs; {})", lines.join("; ")),
            // The VM ended between the caller's check and the report.
            Err(r) => anyhow!("{e:#} (no vCPU report: {r})"),
        }
    }

    /// Like [`Self::agent`], for a VM just restored from a snapshot: the VMM closes host
    /// connections made while it resets the guest's transport, so a closed connection is
    /// retried until `timeout`.
    pub fn clone_agent(&mut self, timeout: Duration) -> Result<Client<UnixStream>> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            match self.agent(timeout) {
                Err(_) if self.is_running() && std::time::Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                other => return other,
            }
        }
    }

    /// Waits up to `timeout` for the guest to stop after a poweroff; past it the VM is abandoned
    /// to the end of this process (its threads die with it), so a guest that ignores the
    /// poweroff cannot hang the caller.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Result<()> {
        let deadline = std::time::Instant::now() + timeout;
        while self.is_running() {
            if std::time::Instant::now() >= deadline {
                anyhow::bail!("the guest did not power off within {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        self.wait()
    }

    /// Waits for the guest to stop; an error carries the VMM's reason (panic, triple fault…).
    pub fn wait(&mut self) -> Result<()> {
        match self.thread.take() {
            Some(t) => t.join().map_err(|_| anyhow!("the VMM thread panicked"))?,
            None => Ok(()),
        }
    }
}

fn vm_config(opts: BootOptions, uds: &Path) -> VmConfig {
    VmConfig {
        vcpus: opts.vcpus,
        memory_mib: opts.memory_mib,
        boot: Boot::Linux {
            kernel: opts.kernel,
            initramfs: Some(opts.initramfs),
            cmdline: opts.cmdline,
        },
        serial: opts.serial,
        vsock: Some(VsockConfig {
            guest_cid: GUEST_CID,
            uds_path: uds.to_path_buf(),
        }),
        blocks: opts.disks,
        shares: opts.shares,
        kvm_device: PathBuf::from("/dev/kvm"),
    }
}

/// Thread body: report the build result first, then run the guest to its end.
fn run_vm(
    build: impl FnOnce() -> Result<Vm, VmError>,
    built: mpsc::Sender<Result<VmControl>>,
) -> Result<()> {
    let vm = match build() {
        Ok(vm) => vm,
        Err(e) => {
            let _ = built.send(Err(anyhow!("{e}")));
            return Ok(());
        }
    };
    let _ = built.send(Ok(vm.control()));
    vm.run().map(|_| ()).map_err(|e| anyhow!("{e}"))
}

fn join_error(thread: JoinHandle<Result<()>>) -> anyhow::Error {
    match thread.join() {
        Ok(Err(e)) => e,
        _ => anyhow!("the VMM thread ended before the VM was built"),
    }
}
