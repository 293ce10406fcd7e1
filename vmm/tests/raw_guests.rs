//! Hand-assembled test guests on the host's real /dev/kvm.
//!
//! What these tests found on a PVM host (kernel 6.18, no VMX/SVM):
//! - KVM API 12. Caps present: IRQCHIP, SPLIT_IRQCHIP, PIT2, PIT_STATE2, IRQFD, IOEVENTFD,
//!   IRQ_ROUTING, USER_MEMORY, SET_TSS_ADDR, SET_IDENTITY_MAP_ADDR, MP_STATE, IMMEDIATE_EXIT,
//!   TSC_DEADLINE_TIMER, ADJUST_CLOCK, KVMCLOCK_CTRL, XSAVE, XCRS, VCPU_EVENTS, DEBUGREGS,
//!   X2APIC_API, SIGNAL_MSI, EXT_CPUID, GET_MSR_FEATURES, COALESCED_MMIO; missing: TSC_CONTROL.
//!   Max vCPUs 1024. KVM_SET_TSS_ADDR, KVM_CREATE_IRQCHIP, KVM_CREATE_PIT2 and KVM_IRQFD all
//!   succeed; KVM_GET_SUPPORTED_CPUID returns 75 entries.
//! - A vCPU may start in 16-bit real mode, 32-bit protected mode (paging off) and 64-bit long
//!   mode on VMM-built identity page tables: the `*_mode_guest_prints_hello` tests run all three.
//! - With the in-kernel irqchip, HLT is handled inside KVM; a halted vCPU leaves KVM_RUN only
//!   when kicked (signal + immediate_exit), which `two_vcpus_both_run` exercises.
//!
//! `vmm/examples/kvm_probe.rs` prints the capability list again on any machine.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use husk_vmm::bus::BusDevice;
use husk_vmm::testing::guests::Asm;
use husk_vmm::{Boot, CpuMode, SerialOutput, Vm, VmBuilder, VmConfig, VmError, VmExit};

const LOAD: u64 = 0x10_0000;
const REAL_LOAD: u64 = 0x3_0000;

/// Fails (never skips) when the host has no KVM.
fn require_kvm() {
    assert!(
        Path::new("/dev/kvm").exists(),
        "/dev/kvm is missing: these tests need KVM on the host"
    );
}

fn raw_config(image: Vec<u8>, load: u64, mode: CpuMode) -> (VmConfig, Arc<Mutex<Vec<u8>>>) {
    let out = Arc::new(Mutex::new(Vec::new()));
    let mut cfg = VmConfig::new(Boot::Raw {
        image,
        load_addr: load,
        entry: load,
        mode,
    });
    cfg.serial = SerialOutput::Capture(out.clone());
    (cfg, out)
}

fn console(out: &Arc<Mutex<Vec<u8>>>) -> String {
    String::from_utf8_lossy(&out.lock().unwrap()).into_owned()
}

fn hello_image(mode: CpuMode) -> Vec<u8> {
    Asm::new(mode == CpuMode::Real)
        .print("hello\n")
        .reset()
        .spin()
        .finish()
}

fn run_hello(mode: CpuMode, load: u64) {
    require_kvm();
    let (cfg, out) = raw_config(hello_image(mode), load, mode);
    let exit = Vm::new(cfg).unwrap().run();
    assert_eq!(exit.unwrap(), VmExit::Reset);
    assert_eq!(console(&out), "hello\n");
}

#[test]
fn long_mode_guest_prints_hello_and_resets() {
    run_hello(CpuMode::Long, LOAD);
}

#[test]
fn protected_mode_guest_prints_hello() {
    run_hello(CpuMode::Protected, LOAD);
}

#[test]
fn real_mode_guest_prints_hello() {
    run_hello(CpuMode::Real, REAL_LOAD);
}

#[derive(Debug, PartialEq)]
enum Access {
    Read(u64, usize),
    Write(u64, Vec<u8>),
}

/// Records accesses and answers reads from a fixed pattern.
struct Recorder {
    log: Arc<Mutex<Vec<Access>>>,
    answer: Vec<u8>,
}

impl BusDevice for Recorder {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        self.log
            .lock()
            .unwrap()
            .push(Access::Read(offset, data.len()));
        data.copy_from_slice(&self.answer[..data.len()]);
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        self.log
            .lock()
            .unwrap()
            .push(Access::Write(offset, data.to_vec()));
    }
}

#[test]
fn guest_port_io_and_mmio_reach_bus_devices() {
    require_kvm();
    const PIO: u16 = 0x510;
    const MMIO: u64 = 0xd100_0000;
    let image = Asm::new(false)
        .mov_dx(PIO + 2)
        .bytes(&[0xb0, 0x5a, 0xee]) // mov al, 0x5a; out dx, al
        .bytes(&[0xec]) // in al, dx
        .mov_dx(0x3f8)
        .bytes(&[0xee]) // out dx, al: echo the PIO answer
        .mov_rbx(MMIO + 0x10)
        .bytes(&[0xb8, 0x78, 0x56, 0x34, 0x12]) // mov eax, 0x12345678
        .bytes(&[0x89, 0x03]) // mov [rbx], eax
        .bytes(&[0x8b, 0x03]) // mov eax, [rbx]
        .bytes(&[0xee, 0xc1, 0xe8, 0x08].repeat(4)) // 4x: out dx, al; shr eax, 8
        .reset()
        .spin()
        .finish();
    let (cfg, out) = raw_config(image, LOAD, CpuMode::Long);
    let pio_log = Arc::new(Mutex::new(Vec::new()));
    let mmio_log = Arc::new(Mutex::new(Vec::new()));
    let mut builder = VmBuilder::new(cfg).unwrap();
    let pio = Recorder {
        log: pio_log.clone(),
        answer: b"B".to_vec(),
    };
    let mmio = Recorder {
        log: mmio_log.clone(),
        answer: b"mmio".to_vec(),
    };
    builder
        .add_pio_device(PIO, 4, Arc::new(Mutex::new(pio)))
        .unwrap();
    builder
        .add_mmio_device(MMIO, 0x1000, Arc::new(Mutex::new(mmio)))
        .unwrap();
    let exit = builder.build().unwrap().run();
    assert_eq!(exit.unwrap(), VmExit::Reset);
    assert_eq!(console(&out), "Bmmio");
    assert_eq!(
        *pio_log.lock().unwrap(),
        [Access::Write(2, vec![0x5a]), Access::Read(2, 1)]
    );
    assert_eq!(
        *mmio_log.lock().unwrap(),
        [
            Access::Write(0x10, vec![0x78, 0x56, 0x34, 0x12]),
            Access::Read(0x10, 4)
        ]
    );
}

#[test]
fn triple_fault_is_an_error_with_console_tail() {
    require_kvm();
    // ud2 with an empty IDT: #UD -> #GP -> #DF -> shutdown.
    let image = Asm::new(false)
        .print("about to fault\n")
        .bytes(&[0x0f, 0x0b])
        .finish();
    let (cfg, _out) = raw_config(image, LOAD, CpuMode::Long);
    match Vm::new(cfg).unwrap().run() {
        Err(e @ VmError::TripleFault { .. }) => {
            assert!(e.to_string().starts_with("guest triple fault"), "{e}");
            assert!(!e.to_string().contains('\n'), "{e}");
            assert_eq!(e.console_tail(), Some("about to fault"));
        }
        other => panic!("expected a triple fault, got {other:?}"),
    }
}

#[test]
fn two_vcpus_both_run_and_the_parked_one_is_stopped() {
    require_kvm();
    const COUNTER: u64 = 0x20_0000;
    let image = Asm::new(false)
        .mov_rbx(COUNTER)
        .mov_dx(0x3f8)
        .bytes(&[0x89, 0xf8, 0x04, b'0', 0xee]) // mov eax, edi; add al, '0'; out dx, al
        // Count only after printing, so vCPU 0 cannot end the VM before vCPU 1's digit is out.
        .bytes(&[0xf0, 0xff, 0x03]) // lock inc dword [rbx]
        .bytes(&[0x85, 0xff, 0x75, 0x0b]) // test edi, edi; jnz park (+11)
        .bytes(&[0x83, 0x3b, 0x02, 0x75, 0xfb]) // wait: cmp dword [rbx], 2; jne wait
        .bytes(&[0xb0, b'\n', 0xee]) // mov al, '\n'; out dx, al
        .reset()
        .bytes(&[0xfa, 0xf4]) // park: cli; hlt (only a kick gets this vCPU out)
        .spin()
        .finish();
    let (mut cfg, out) = raw_config(image, LOAD, CpuMode::Long);
    cfg.vcpus = 2;
    let started = Instant::now();
    assert_eq!(Vm::new(cfg).unwrap().run().unwrap(), VmExit::Reset);
    assert!(started.elapsed() < Duration::from_secs(10));
    let text = console(&out);
    assert!(
        text.contains('0') && text.contains('1') && text.ends_with('\n'),
        "{text:?}"
    );
}

fn expect_err(cfg: VmConfig) -> String {
    match Vm::new(cfg) {
        Ok(_) => panic!("VM built from a bad configuration"),
        Err(e) => {
            let msg = e.to_string();
            assert!(!msg.contains('\n'), "multi-line error: {msg}");
            msg
        }
    }
}

#[test]
fn missing_kvm_device_is_a_one_line_error() {
    let (mut cfg, _) = raw_config(hello_image(CpuMode::Long), LOAD, CpuMode::Long);
    cfg.kvm_device = PathBuf::from("/nonexistent/kvm");
    let msg = expect_err(cfg);
    assert!(
        msg.contains("cannot open KVM device /nonexistent/kvm"),
        "{msg}"
    );
}

#[test]
fn too_little_memory_is_rejected() {
    let (mut cfg, _) = raw_config(hello_image(CpuMode::Long), LOAD, CpuMode::Long);
    cfg.memory_mib = 32;
    let msg = expect_err(cfg);
    assert!(
        msg.contains("memory 32 MiB is below the minimum of 64 MiB"),
        "{msg}"
    );
}

fn expect_panic(image: Vec<u8>) -> (VmError, Duration) {
    require_kvm();
    let (cfg, _out) = raw_config(image, LOAD, CpuMode::Long);
    let started = Instant::now();
    let err = Vm::new(cfg).unwrap().run().unwrap_err();
    (err, started.elapsed())
}

#[test]
fn kernel_panic_report_ends_the_vm() {
    let image = Asm::new(false)
        .print("booting\n[    1.5] Kernel panic - not syncing: VFS: Unable to mount root\n")
        .print("[    1.6] ---[ end Kernel panic - not syncing: VFS ]---\n")
        .spin()
        .finish();
    let (err, took) = expect_panic(image);
    assert_eq!(
        err.to_string(),
        "guest kernel panic: Kernel panic - not syncing: VFS: Unable to mount root"
    );
    assert!(err.console_tail().unwrap().starts_with("booting\n"));
    assert!(took < Duration::from_secs(1), "{took:?}");
}

#[test]
fn unfinished_panic_report_ends_the_vm_after_a_grace_period() {
    let image = Asm::new(false)
        .print("Kernel panic - not syncing: Attempted to kill init!\n")
        .spin()
        .finish();
    let (err, took) = expect_panic(image);
    assert!(matches!(err, VmError::GuestPanic { .. }), "{err}");
    assert!(took >= husk_vmm::serial::PANIC_GRACE, "{took:?}");
}

#[test]
fn serial_output_goes_to_a_file() {
    require_kvm();
    let dir = std::env::temp_dir().join(format!("husk-vmm-{}-serialfile", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("console.log");
    let (mut cfg, _) = raw_config(hello_image(CpuMode::Long), LOAD, CpuMode::Long);
    cfg.serial = SerialOutput::File(path.clone());
    assert_eq!(Vm::new(cfg).unwrap().run().unwrap(), VmExit::Reset);
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "hello\n");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_paused_vm_stops_counting_and_resumes() {
    require_kvm();
    const COUNTER: u64 = 0x20_0000;
    let image = Asm::new(false)
        .mov_rbx(COUNTER)
        .bytes(&[0xf0, 0xff, 0x03]) // count: lock inc dword [rbx]
        .bytes(&[0x83, 0x7b, 0x04, 0x00]) // cmp dword [rbx+4], 0 (the quit flag)
        .bytes(&[0x74, 0xf7]) // je count
        .reset()
        .spin()
        .finish();
    let (cfg, _out) = raw_config(image, LOAD, CpuMode::Long);
    let vm = Vm::new(cfg).unwrap();
    let control = vm.control();
    let mem = vm.memory().clone();
    let flag_mem = mem.clone();
    let counter = move || {
        use vm_memory::Bytes;
        mem.read_obj::<u32>(vm_memory::GuestAddress(COUNTER))
            .unwrap()
    };
    let runner = std::thread::spawn(move || vm.run());
    let wait_past = |n: u32| {
        let deadline = Instant::now() + Duration::from_secs(20);
        while counter() <= n {
            assert!(Instant::now() < deadline, "the guest is not counting");
            std::thread::sleep(Duration::from_millis(5));
        }
    };
    wait_past(0);
    control.pause().unwrap();
    assert!(control.is_paused());
    let frozen = counter();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(counter(), frozen, "a paused guest kept running");
    control.resume();
    wait_past(frozen);
    {
        use vm_memory::Bytes;
        flag_mem
            .write_obj(1u32, vm_memory::GuestAddress(COUNTER + 4))
            .unwrap();
    }
    assert_eq!(runner.join().unwrap().unwrap(), VmExit::Reset);
}

#[test]
fn the_vcpu_report_says_where_a_running_guest_is() {
    use husk_vmm::testing::guests::{self, Running};
    require_kvm();
    let image = guests::counting_guest();
    let image_len = image.len() as u64;
    let vm = Running::start(Vm::new(guests::long_mode_config(image)).unwrap());
    let n = vm.count_past(0).unwrap();
    let report = vm.control.vcpu_report().unwrap().join("\n");
    assert!(report.starts_with("vCPU 0: runnable rip=0x"), "{report}");
    assert!(report.contains("interrupts off"), "{report}");
    let rip = report
        .split_whitespace()
        .find_map(|w| w.strip_prefix("rip=0x"))
        .map(|hex| u64::from_str_radix(hex, 16).unwrap())
        .unwrap();
    assert!(
        (guests::LOAD..guests::LOAD + image_len).contains(&rip),
        "rip {rip:#x} is outside the guest's code: {report}"
    );
    // The report lets the guest run on.
    assert!(!vm.control.is_paused());
    vm.count_past(n + 1000).unwrap();
    vm.quit().unwrap();
}
