//! Building and running a micro-VM.
//!
//! `VmBuilder` assembles a VM in order: check the inputs (so a bad input leaves nothing
//! behind), open KVM, map RAM, create the in-kernel interrupt controllers, add the legacy
//! devices, add virtio-mmio devices (each with a window, a GSI wired by irqfd and a kernel
//! command-line entry), load the guest, create the vCPUs. `Vm::run` starts one thread per
//! vCPU and returns when any of them (or a device) ends the VM.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::{
    kvm_mp_state, kvm_pit_config, kvm_userspace_memory_region, KVM_MP_STATE_RUNNABLE,
    KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{IoEventAddress, Kvm, VcpuFd, VmFd};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::signal::Killable;

use crate::boot::{self, EntryPoint};
use crate::bus::{Bus, SharedDevice};
use crate::config::{
    validate, Boot, SavedConfig, SerialOutput, ShareConfig, VmConfig, VsockConfig, DEFAULT_CMDLINE,
};
use crate::devices::virtio::vsock::VsockControl;
use crate::error::VmError;
use crate::i8042::{I8042, I8042_BASE, I8042_LEN};
use crate::memory::{
    self, GuestMemory, VIRTIO_IRQ_BASE, VIRTIO_IRQ_LAST, VIRTIO_MMIO_BASE, VIRTIO_MMIO_SIZE,
};
use crate::pause::{PauseGate, VmControl, VmParts};
use crate::persist::PersistDevice;
use crate::serial::{self, CaptureWriter, ConsoleLog, ConsoleWriter, SerialDevice};
use crate::stop::{kick_signal, StopState, VmExit};
use crate::vcpu::{self, Vcpu, VcpuShared};
use crate::{cpuid, mptable};

/// Where KVM puts its private TSS and identity map (Intel needs them below 4 GiB, off RAM).
const KVM_TSS_ADDR: usize = 0xfffb_d000;
/// Queue notify register of virtio-mmio (for ioeventfd).
const VIRTIO_MMIO_QUEUE_NOTIFY: u64 = 0x50;
/// How often `Vm::run` checks the panic grace timer while waiting.
const POLL_INTERVAL: Duration = Duration::from_millis(100);
/// How often a stopping VM re-kicks vCPU threads still inside KVM_RUN.
const KICK_INTERVAL: Duration = Duration::from_millis(5);

/// A VM ready to run.
pub struct Vm {
    // Field order is drop order: devices and vCPUs go before the VM fd and memory.
    vcpus: Vec<Vcpu>,
    shared: Arc<VcpuShared>,
    stop: Arc<StopState>,
    console: Arc<Mutex<ConsoleLog>>,
    vsock: Option<VsockControl>,
    /// The VM fd, KVM, memory and the devices a snapshot saves.
    pub(crate) parts: Arc<VmParts>,
}

impl Vm {
    /// Builds a VM from `cfg` with its vsock and block devices.
    pub fn new(cfg: VmConfig) -> Result<Vm, VmError> {
        let mut builder = VmBuilder::new(cfg)?;
        builder.add_configured_devices()?;
        builder.build()
    }

    /// Guest memory (for tests and snapshots).
    pub fn memory(&self) -> &Arc<GuestMemory> {
        &self.parts.mem
    }

    /// A handle that pauses, resumes and snapshots the vCPUs while `run` runs.
    pub fn control(&self) -> VmControl {
        VmControl::new(
            self.shared.gate.clone(),
            self.stop.clone(),
            Arc::downgrade(&self.parts),
        )
    }

    /// The vsock device's control handle (transport reset, CID change), if there is one.
    pub fn vsock_control(&self) -> Option<&VsockControl> {
        self.vsock.as_ref()
    }

    /// Runs the guest until it stops; returns how it ended.
    pub fn run(self) -> Result<VmExit, VmError> {
        vcpu::install_kick_handler()?;
        self.shared.gate.expect_threads(self.vcpus.len());
        let mut threads = Vec::with_capacity(self.vcpus.len());
        for (i, vcpu) in self.vcpus.into_iter().enumerate() {
            match std::thread::Builder::new()
                .name(format!("husk-vcpu{i}"))
                .spawn(move || vcpu.run())
            {
                Ok(handle) => threads.push(handle),
                Err(e) => {
                    self.stop
                        .request(Err(VmError::Host(format!("vCPU thread: {e}"))));
                    break;
                }
            }
        }
        wait_for_stop(&self.stop, &self.console);
        stop_threads(threads);
        drop(self.shared);
        self.stop
            .take()
            .unwrap_or_else(|| Err(VmError::Host("VM stopped without an outcome".into())))
    }
}

/// Waits until someone ends the VM, turning an unfinished panic report into the outcome once
/// its grace period runs out.
fn wait_for_stop(stop: &StopState, console: &Mutex<ConsoleLog>) {
    while !stop.wait(POLL_INTERVAL) {
        let log = console.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(first) = log.panic_overdue(Instant::now()) {
            stop.request(Err(serial::panic_error(first, &log)));
        }
    }
}

/// Kicks every vCPU thread until it leaves KVM_RUN, then joins them all.
fn stop_threads(threads: Vec<JoinHandle<()>>) {
    while threads.iter().any(|t| !t.is_finished()) {
        for t in threads.iter().filter(|t| !t.is_finished()) {
            // A thread that exits between the check and the kill is still joinable, so the
            // signal cannot reach a stranger.
            let _ = t.kill(kick_signal());
        }
        std::thread::sleep(KICK_INTERVAL);
    }
    for t in threads {
        if t.join().is_err() {
            log::error!("a vCPU thread panicked");
        }
    }
}

/// Files and sockets created while building; removed if the build fails.
#[derive(Default)]
struct Leftovers {
    paths: Vec<PathBuf>,
}

impl Leftovers {
    fn disarm(&mut self) {
        self.paths.clear();
    }
}

impl Drop for Leftovers {
    fn drop(&mut self) {
        for p in &self.paths {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Assembles a VM step by step; `Vm::new` is the usual entry.
pub struct VmBuilder {
    cfg: VmConfig,
    kvm: Kvm,
    vm_fd: Arc<VmFd>,
    mem: Arc<GuestMemory>,
    irqchip: bool,
    pio: Bus,
    mmio: Bus,
    stop: Arc<StopState>,
    console: Arc<Mutex<ConsoleLog>>,
    cmdline_devices: Vec<String>,
    virtio_count: u32,
    vsock: Option<VsockControl>,
    /// The devices a snapshot saves, by bus and address.
    persist: Vec<PersistDevice>,
    leftovers: Leftovers,
    /// The kernel and initramfs being copied into memory while the VM is set up.
    preload: Option<JoinHandle<Result<boot::LoadedLinux, VmError>>>,
}

type Preload = Option<JoinHandle<Result<boot::LoadedLinux, VmError>>>;

/// Starts copying a Linux guest's images into memory on another thread: under nested
/// virtualisation creating the VM and copying the images are each slow, so they overlap.
fn start_preload(cfg: &VmConfig, mem: &Arc<GuestMemory>) -> Result<Preload, VmError> {
    let Boot::Linux {
        kernel, initramfs, ..
    } = &cfg.boot
    else {
        return Ok(None);
    };
    let (mem, kernel, initramfs) = (mem.clone(), kernel.clone(), initramfs.clone());
    let handle = std::thread::Builder::new()
        .name("load-guest".into())
        .spawn(move || boot::load_linux_images(&mem, &kernel, initramfs.as_deref()))
        .map_err(|e| VmError::Host(format!("spawning the loader thread: {e}")))?;
    Ok(Some(handle))
}

/// Waits for the loader thread; a panic there is reported as a host error.
fn join_preload(preload: Preload) -> Option<Result<boot::LoadedLinux, VmError>> {
    preload.map(|h| {
        h.join()
            .unwrap_or_else(|_| Err(VmError::Host("the loader thread panicked".into())))
    })
}

impl VmBuilder {
    /// Checks `cfg`, opens KVM, maps RAM, creates interrupt controllers and legacy devices.
    pub fn new(cfg: VmConfig) -> Result<Self, VmError> {
        validate(&cfg)?;
        let mem = Arc::new(memory::create_guest_memory(cfg.memory_mib)?);
        let required = matches!(cfg.boot, Boot::Linux { .. });
        Self::with_memory(cfg, mem, IrqchipMode::Want { required })
    }

    /// Like `new`, with guest memory already mapped (a restored snapshot's) and the irqchip
    /// decision made by the caller.
    pub(crate) fn with_memory(
        cfg: VmConfig,
        mem: Arc<GuestMemory>,
        irqchip: IrqchipMode,
    ) -> Result<Self, VmError> {
        let mut preload = start_preload(&cfg, &mem)?;
        let vm = (|| {
            let kvm = open_kvm(&cfg.kvm_device)?;
            let vm_fd = kvm.create_vm().map_err(VmError::kvm("create VM"))?;
            register_memory(&vm_fd, &mem)?;
            let irqchip = match irqchip {
                IrqchipMode::Want { required } => create_irqchip(&vm_fd, required)?,
                IrqchipMode::Exactly(true) => create_irqchip(&vm_fd, true)?,
                IrqchipMode::Exactly(false) => false,
            };
            Ok((kvm, vm_fd, irqchip))
        })();
        let (kvm, vm_fd, irqchip) = match vm {
            Ok(v) => v,
            Err(e) => {
                // Leave no thread behind.
                let _ = join_preload(preload.take());
                return Err(e);
            }
        };
        let mut builder = Self {
            cfg,
            kvm,
            vm_fd: Arc::new(vm_fd),
            mem,
            irqchip,
            pio: Bus::new(),
            mmio: Bus::new(),
            stop: Arc::new(StopState::default()),
            console: Arc::new(Mutex::new(ConsoleLog::default())),
            cmdline_devices: Vec::new(),
            virtio_count: 0,
            vsock: None,
            persist: Vec::new(),
            leftovers: Leftovers::default(),
            preload,
        };
        if let Err(e) = builder.add_legacy_devices() {
            let _ = join_preload(builder.preload.take());
            return Err(e);
        }
        Ok(builder)
    }

    /// Guest memory, for devices that need it.
    pub fn memory(&self) -> &Arc<GuestMemory> {
        &self.mem
    }

    /// The stop state, for devices that can end the VM.
    pub fn stop_state(&self) -> &Arc<StopState> {
        &self.stop
    }

    /// Places a device on the port-I/O bus.
    pub fn add_pio_device(
        &mut self,
        base: u16,
        len: u16,
        dev: SharedDevice,
    ) -> Result<(), VmError> {
        self.pio
            .insert(base.into(), len.into(), dev)
            .map_err(|e| VmError::Config(e.to_string()))
    }

    /// Places a device on the MMIO bus.
    pub fn add_mmio_device(
        &mut self,
        base: u64,
        len: u64,
        dev: SharedDevice,
    ) -> Result<(), VmError> {
        self.mmio
            .insert(base, len, dev)
            .map_err(|e| VmError::Config(e.to_string()))
    }

    /// Adds a virtio device behind a new virtio-mmio window: picks the window and GSI, wires
    /// the interrupt as an irqfd and queue notifies as ioeventfds, and announces the device on
    /// the kernel command line. Returns the transport for callers that inspect it.
    pub fn add_virtio_device(
        &mut self,
        name: &'static str,
        device: Box<dyn crate::devices::virtio::VirtioDevice>,
    ) -> Result<Arc<Mutex<crate::devices::virtio::mmio::MmioTransport>>, VmError> {
        use crate::devices::virtio::{mmio::MmioTransport, Interrupt};
        let dev_err = |reason: String| VmError::Device { name, reason };
        let gsi = VIRTIO_IRQ_BASE + self.virtio_count;
        if gsi > VIRTIO_IRQ_LAST {
            return Err(dev_err("out of interrupt lines for virtio devices".into()));
        }
        let base = VIRTIO_MMIO_BASE + u64::from(self.virtio_count) * VIRTIO_MMIO_SIZE;
        let interrupt = Arc::new(Interrupt::new().map_err(|e| dev_err(e.to_string()))?);
        let transport = MmioTransport::new(device, self.mem.clone(), interrupt.clone())
            .map_err(|e| dev_err(e.to_string()))?;
        self.wire_virtio(&transport, base, gsi)
            .map_err(|e| dev_err(e.to_string()))?;
        let transport = Arc::new(Mutex::new(transport));
        self.add_mmio_device(base, VIRTIO_MMIO_SIZE, transport.clone())?;
        self.persist
            .push((format!("mmio@{base:#x}"), transport.clone()));
        self.cmdline_devices
            .push(format!("virtio_mmio.device=4K@{base:#x}:{gsi}"));
        self.virtio_count += 1;
        Ok(transport)
    }

    fn wire_virtio(
        &self,
        transport: &crate::devices::virtio::mmio::MmioTransport,
        base: u64,
        gsi: u32,
    ) -> Result<(), kvm_ioctls::Error> {
        if self.irqchip {
            self.vm_fd
                .register_irqfd(transport.interrupt().eventfd(), gsi)?;
        }
        let notify = IoEventAddress::Mmio(base + VIRTIO_MMIO_QUEUE_NOTIFY);
        for (i, fd) in transport.queue_notify_eventfds().iter().enumerate() {
            self.vm_fd.register_ioevent(fd, &notify, i as u32)?;
        }
        Ok(())
    }

    /// Adds the block and vsock devices named in the configuration.
    pub fn add_configured_devices(&mut self) -> Result<(), VmError> {
        use crate::devices::virtio::block::Block;
        for b in self.cfg.blocks.clone() {
            let dev = Block::new(&b.path, b.read_only).map_err(|e| VmError::Block {
                path: b.path.clone(),
                reason: e.to_string(),
            })?;
            self.add_virtio_device("virtio-blk", Box::new(dev))?;
        }
        for share in self.cfg.shares.clone() {
            self.add_share(&share)?;
        }
        if let Some(v) = self.cfg.vsock.clone() {
            self.add_vsock(&v)?;
        }
        Ok(())
    }

    fn add_share(&mut self, share: &ShareConfig) -> Result<(), VmError> {
        use crate::devices::virtio::fs9p::Fs9p;
        let dev = Fs9p::with_config(share).map_err(|e| VmError::Device {
            name: "virtio-9p",
            reason: e.to_string(),
        })?;
        self.add_virtio_device("virtio-9p", Box::new(dev))?;
        Ok(())
    }

    fn add_vsock(&mut self, v: &VsockConfig) -> Result<(), VmError> {
        use crate::devices::virtio::vsock::Vsock;
        // The device binds `uds_path` now and removes it when dropped, so a later build
        // failure (which drops the bus) leaves no socket behind.
        let dev = Vsock::new(v.guest_cid.into(), &v.uds_path).map_err(|e| VmError::Device {
            name: "virtio-vsock",
            reason: e.to_string(),
        })?;
        self.vsock = Some(dev.control());
        self.add_virtio_device("virtio-vsock", Box::new(dev))?;
        Ok(())
    }

    fn add_legacy_devices(&mut self) -> Result<(), VmError> {
        let out = self.console_output()?;
        let irq = EventFd::new(EFD_NONBLOCK).map_err(|e| VmError::Host(format!("eventfd: {e}")))?;
        if self.irqchip {
            self.vm_fd
                .register_irqfd(&irq, serial::COM1_IRQ)
                .map_err(VmError::kvm("register serial irqfd"))?;
        }
        let writer = ConsoleWriter::new(out, self.console.clone(), self.stop.clone());
        let uart = Arc::new(Mutex::new(SerialDevice::new(irq, writer)));
        self.add_pio_device(
            serial::COM1_BASE as u16,
            serial::COM1_LEN as u16,
            uart.clone(),
        )?;
        self.persist
            .push((format!("pio@{:#x}", serial::COM1_BASE), uart));
        let i8042 = Arc::new(Mutex::new(I8042::new(self.stop.clone())));
        self.add_pio_device(I8042_BASE as u16, I8042_LEN as u16, i8042.clone())?;
        self.persist.push((format!("pio@{I8042_BASE:#x}"), i8042));
        Ok(())
    }

    fn console_output(&mut self) -> Result<Box<dyn Write + Send>, VmError> {
        Ok(match &self.cfg.serial {
            SerialOutput::Stdout => Box::new(std::io::stdout()),
            SerialOutput::Sink => Box::new(std::io::sink()),
            SerialOutput::Capture(buf) => Box::new(CaptureWriter(buf.clone())),
            SerialOutput::File(path) => {
                let file = std::fs::File::create(path).map_err(|source| VmError::SerialOutput {
                    path: path.clone(),
                    source,
                })?;
                self.leftovers.paths.push(path.clone());
                Box::new(file)
            }
        })
    }

    /// Loads the guest and creates the vCPUs.
    pub fn build(mut self) -> Result<Vm, VmError> {
        boot::write_boot_tables(&self.mem)?;
        let (entry, code_base) = self.load_guest()?;
        self.finish(|builder, index, base_cpuid| {
            builder.create_vcpu(index, base_cpuid, &entry, code_base)
        })
    }

    /// Creates the vCPUs with `make_vcpu` and hands everything over to a `Vm`.
    pub(crate) fn finish(
        mut self,
        make_vcpu: impl Fn(&Self, u8, &kvm_bindings::CpuId) -> Result<VcpuFd, VmError>,
    ) -> Result<Vm, VmError> {
        let base_cpuid = cpuid::supported(&self.kvm)?;
        let shared = Arc::new(VcpuShared {
            pio: Arc::new(std::mem::take(&mut self.pio)),
            mmio: Arc::new(std::mem::take(&mut self.mmio)),
            stop: self.stop.clone(),
            console: self.console.clone(),
            gate: Arc::new(PauseGate::default()),
        });
        let mut vcpus = Vec::with_capacity(self.cfg.vcpus.into());
        for i in 0..self.cfg.vcpus {
            let fd = make_vcpu(&self, i, &base_cpuid)?;
            vcpus.push(Vcpu::new(fd, i, shared.clone()));
        }
        self.leftovers.disarm();
        let parts = VmParts {
            devices: std::mem::take(&mut self.persist),
            config: SavedConfig::from(&self.cfg),
            irqchip: self.irqchip,
            vm_fd: self.vm_fd,
            kvm: self.kvm,
            ram: Mutex::new(crate::pagefile::RamState::new(&self.mem)),
            mem: self.mem,
        };
        Ok(Vm {
            vcpus,
            shared,
            stop: self.stop,
            console: self.console,
            vsock: self.vsock,
            parts: Arc::new(parts),
        })
    }

    /// The KVM VM fd (restore sets the VM-wide state on it).
    pub(crate) fn vm_fd(&self) -> &VmFd {
        &self.vm_fd
    }

    /// Whether the in-kernel irqchip and PIT exist.
    pub(crate) fn has_irqchip(&self) -> bool {
        self.irqchip
    }

    /// The devices a snapshot saves, by id.
    pub(crate) fn persist_devices(&self) -> &[PersistDevice] {
        &self.persist
    }

    /// Creates vCPU `index` with its CPUID and nothing else (restore sets the rest).
    pub(crate) fn create_bare_vcpu(
        &self,
        index: u8,
        base_cpuid: &kvm_bindings::CpuId,
    ) -> Result<VcpuFd, VmError> {
        let fd = self
            .vm_fd
            .create_vcpu(index.into())
            .map_err(VmError::kvm("create vCPU"))?;
        fd.set_cpuid2(&cpuid::for_vcpu(base_cpuid, index, self.cfg.vcpus))
            .map_err(VmError::kvm("set CPUID"))?;
        Ok(fd)
    }

    /// Loads the kernel or raw image; returns the entry and the real-mode code base.
    fn load_guest(&mut self) -> Result<(EntryPoint, u64), VmError> {
        match &self.cfg.boot {
            Boot::Raw {
                image,
                load_addr,
                entry,
                mode,
            } => {
                boot::load_raw(&self.mem, image, *load_addr, *entry)?;
                let entry = EntryPoint {
                    addr: *entry,
                    mode: *mode,
                    boot_arg: None,
                };
                Ok((entry, *load_addr))
            }
            Boot::Linux {
                kernel,
                initramfs,
                cmdline,
            } => {
                let loaded = match join_preload(self.preload.take()) {
                    Some(loaded) => loaded?,
                    None => boot::load_linux_images(&self.mem, kernel, initramfs.as_deref())?,
                };
                mptable::write(&self.mem, self.cfg.vcpus)?;
                let cmdline = self.full_cmdline(cmdline);
                let image = boot::finish_linux(&self.mem, &loaded, &cmdline)?;
                Ok((image.entry, 0))
            }
        }
    }

    fn full_cmdline(&self, extra: &str) -> String {
        let mut parts = vec![DEFAULT_CMDLINE.to_string()];
        parts.extend(self.cmdline_devices.iter().cloned());
        if !extra.trim().is_empty() {
            parts.push(extra.trim().to_string());
        }
        parts.join(" ")
    }

    fn create_vcpu(
        &self,
        index: u8,
        base_cpuid: &kvm_bindings::CpuId,
        entry: &EntryPoint,
        code_base: u64,
    ) -> Result<VcpuFd, VmError> {
        let fd = self.create_bare_vcpu(index, base_cpuid)?;
        Vcpu::set_boot_msrs(&fd)?;
        let raw = matches!(self.cfg.boot, Boot::Raw { .. });
        if self.irqchip {
            set_lint(&fd)?;
        }
        if raw || index == 0 {
            let mut e = *entry;
            if raw {
                e.boot_arg = Some(index.into());
            }
            boot::setup_vcpu_mode(&fd, &e, code_base)?;
        }
        if raw && index > 0 && self.irqchip {
            // With an in-kernel LAPIC, APs wait for INIT/SIPI; raw guests start them directly.
            let runnable = kvm_mp_state {
                mp_state: KVM_MP_STATE_RUNNABLE,
            };
            fd.set_mp_state(runnable)
                .map_err(VmError::kvm("set MP state"))?;
        }
        Ok(fd)
    }
}

/// Whether a new VM gets the in-kernel irqchip and PIT.
#[derive(Debug, Clone, Copy)]
pub(crate) enum IrqchipMode {
    /// Create them if KVM can; fail only if `required`.
    Want {
        /// The guest cannot run without them.
        required: bool,
    },
    /// Exactly as the snapshot being restored had them.
    Exactly(bool),
}

pub(crate) fn open_kvm(path: &Path) -> Result<Kvm, VmError> {
    let open_err = |source| VmError::KvmOpen {
        path: path.to_path_buf(),
        source,
    };
    let c_path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|e| open_err(std::io::Error::new(std::io::ErrorKind::InvalidInput, e)))?;
    Kvm::new_with_path(c_path).map_err(|e| open_err(e.into()))
}

fn register_memory(vm_fd: &VmFd, mem: &GuestMemory) -> Result<(), VmError> {
    for (slot, region) in mem.iter().enumerate() {
        let host = mem
            .get_host_address(region.start_addr())
            .map_err(|e| VmError::Memory(e.to_string()))?;
        let region = kvm_userspace_memory_region {
            slot: slot as u32,
            flags: 0,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: host as u64,
        };
        // SAFETY: the host range is a live mapping owned by `mem`, which the `Vm` keeps (in an
        // Arc) at least as long as any vCPU can run; slots do not overlap.
        unsafe { vm_fd.set_user_memory_region(region) }
            .map_err(VmError::kvm("set memory region"))?;
    }
    Ok(())
}

/// Creates the in-kernel PIC, IOAPIC, LAPICs and PIT. Linux needs them; raw test guests can
/// live without (then HLT exits to us and ends the VM).
fn create_irqchip(vm_fd: &VmFd, required: bool) -> Result<bool, VmError> {
    let result = vm_fd
        .set_tss_address(KVM_TSS_ADDR)
        .and_then(|()| vm_fd.create_irq_chip())
        .and_then(|()| {
            let pit = kvm_pit_config {
                flags: KVM_PIT_SPEAKER_DUMMY,
                ..Default::default()
            };
            vm_fd.create_pit2(pit)
        });
    match result {
        Ok(()) => Ok(true),
        Err(e) if required => Err(VmError::Kvm {
            op: "create in-kernel irqchip and PIT",
            source: e,
        }),
        Err(e) => {
            log::warn!("no in-kernel irqchip ({e}); raw guest runs without interrupts");
            Ok(false)
        }
    }
}

/// The 32-bit local APIC register at byte offset `at` of KVM's register page.
pub(crate) fn lapic_reg(regs: &[std::os::raw::c_char; 1024], at: usize) -> u32 {
    u32::from_le_bytes(std::array::from_fn(|i| regs[at + i] as u8))
}

/// Wires LAPIC LINT0 to ExtINT (the PIC) and LINT1 to NMI, as firmware would.
fn set_lint(fd: &VcpuFd) -> Result<(), VmError> {
    const APIC_LVT0: usize = 0x350;
    const APIC_LVT1: usize = 0x360;
    const DELIVERY_EXTINT: u32 = 7 << 8;
    const DELIVERY_NMI: u32 = 4 << 8;
    let mut lapic = fd.get_lapic().map_err(VmError::kvm("get LAPIC"))?;
    let regs = &mut lapic.regs;
    let set = |regs: &mut [std::os::raw::c_char; 1024], at: usize, mode: u32| {
        let v = (lapic_reg(regs, at) & !0x700) | mode;
        for (i, b) in v.to_le_bytes().iter().enumerate() {
            regs[at + i] = *b as std::os::raw::c_char;
        }
    };
    set(regs, APIC_LVT0, DELIVERY_EXTINT);
    set(regs, APIC_LVT1, DELIVERY_NMI);
    fd.set_lapic(&lapic).map_err(VmError::kvm("set LAPIC"))
}
