//! A Rust test guest drives the VMM's virtio-mmio transport and vsock device on the host's
//! real /dev/kvm: `test-guests/vsock_echo.rs`, a bare-metal virtio-mmio (version 2) driver that
//! `build.rs` compiles with plain rustc and flattens into a raw long-mode image.
//!
//! - `vsock_echo_through_real_virtqueues`: the guest initialises the device, connects to a host
//!   Unix listener through the VMM's vsock forwarding, sends a payload, checks the echo and
//!   shuts the connection down; completions are found through InterruptStatus/InterruptACK.
//! - `vsock_echo_with_interrupt_delivery`: the same with real interrupts: the guest programs
//!   the IOAPIC, LAPIC and an IDT, sleeps in `hlt`, and its handler reads and acks
//!   InterruptStatus (the VMM's irqfd on the device's GSI is what wakes it).
//! - `virtio_mmio_register_protocol`: feature negotiation (refused without VERSION_1 or with
//!   an unoffered feature), queue register readback, config-space guest_cid, reset.

use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use husk_vmm::{
    BlockConfig, Boot, CpuMode, SerialOutput, Vm, VmConfig, VmError, VmExit, VsockConfig,
};

mod guest {
    include!(concat!(env!("OUT_DIR"), "/vsock_echo.rs"));
}

/// Guest modes (`MODE_*` in the guest).
const MODE_ECHO: u32 = 1;
const MODE_REGS: u32 = 2;
const MODE_ECHO_IRQ: u32 = 3;
/// What the guest sends (`PAYLOAD` in the guest).
const PAYLOAD: &[u8] = b"ping through a real virtqueue";
/// Upper bound for one guest run; the guests take well under a second when things work.
const RUN_LIMIT: Duration = Duration::from_secs(60);

/// Fails (never skips) when the host has no KVM.
fn require_kvm() {
    assert!(
        Path::new("/dev/kvm").exists(),
        "/dev/kvm is missing: these tests boot guests on the host's KVM"
    );
}

/// The guest image with its `PARAMS` block (found by its magic) set for this run.
fn guest_image(mode: u32, port: u32, cid: u32, irq: u32) -> Vec<u8> {
    let mut image = guest::IMAGE.to_vec();
    let magic = b"HUSKPRM\0";
    let hits: Vec<usize> = image
        .windows(magic.len())
        .enumerate()
        .filter(|(_, w)| w == magic)
        .map(|(i, _)| i)
        .collect();
    assert_eq!(hits.len(), 1, "PARAMS magic must occur once in the guest");
    assert!(
        image.windows(PAYLOAD.len()).any(|w| w == PAYLOAD),
        "the guest's PAYLOAD differs from this test's"
    );
    let at = hits[0] + magic.len();
    for (i, v) in [mode, port, cid, irq].into_iter().enumerate() {
        image[at + 4 * i..at + 4 * i + 4].copy_from_slice(&v.to_le_bytes());
    }
    image
}

fn config(image: Vec<u8>) -> (VmConfig, Arc<Mutex<Vec<u8>>>) {
    let out = Arc::new(Mutex::new(Vec::new()));
    let mut cfg = VmConfig::new(Boot::Raw {
        image,
        load_addr: guest::LOAD_ADDR,
        entry: guest::ENTRY,
        mode: CpuMode::Long,
    });
    cfg.serial = SerialOutput::Capture(out.clone());
    (cfg, out)
}

fn console(out: &Arc<Mutex<Vec<u8>>>) -> String {
    String::from_utf8_lossy(&out.lock().unwrap()).into_owned()
}

/// Builds and runs the VM on its own thread; fails the test if it is not done in `RUN_LIMIT`.
fn run_bounded(cfg: VmConfig, out: &Arc<Mutex<Vec<u8>>>) -> (Result<VmExit, VmError>, Duration) {
    let started = Instant::now();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(Vm::new(cfg).and_then(Vm::run));
    });
    match rx.recv_timeout(RUN_LIMIT) {
        Ok(result) => (result, started.elapsed()),
        Err(_) => panic!(
            "the guest did not finish within {RUN_LIMIT:?}; serial so far: {:?}",
            console(out)
        ),
    }
}

/// A per-test scratch directory, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("husk-vmm-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// What the host side of the echo saw.
#[derive(Debug)]
struct EchoReport {
    received: Vec<u8>,
    saw_eof: bool,
}

/// Accepts one connection on `listener`, echoes the first `PAYLOAD.len()` bytes back, then
/// reads to end of file (the guest's SHUTDOWN). Never blocks past `RUN_LIMIT`.
fn echo_server(listener: UnixListener) -> JoinHandle<Result<EchoReport, String>> {
    std::thread::spawn(move || {
        let deadline = Instant::now() + RUN_LIMIT;
        listener.set_nonblocking(true).map_err(|e| e.to_string())?;
        let mut stream = loop {
            match listener.accept() {
                Ok((s, _)) => break s,
                Err(e) if e.kind() == ErrorKind::WouldBlock && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) => return Err(format!("no connection from the guest: {e}")),
            }
        };
        stream.set_nonblocking(false).map_err(|e| e.to_string())?;
        stream
            .set_read_timeout(Some(RUN_LIMIT))
            .map_err(|e| e.to_string())?;
        let mut received = Vec::new();
        let mut buf = [0u8; 256];
        let mut echoed = false;
        let saw_eof = loop {
            match stream.read(&mut buf) {
                Ok(0) => break true,
                Ok(n) => received.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                // The VM went away without a shutdown: report what arrived.
                Err(_) => break false,
            }
            if !echoed && received.len() >= PAYLOAD.len() {
                echoed = true;
                stream.write_all(&received).map_err(|e| e.to_string())?;
            }
        };
        Ok(EchoReport { received, saw_eof })
    })
}

/// Runs the echo guest against a host echo server; returns the serial text.
fn run_echo(mode: u32, name: &str) -> String {
    require_kvm();
    const CID: u32 = 7;
    const PORT: u32 = 5123;
    let dir = TempDir::new(name);
    let uds_path = dir.0.join("vsock");
    let listener = UnixListener::bind(dir.0.join(format!("vsock_{PORT}"))).unwrap();
    let server = echo_server(listener);
    // vsock is the only device: window 0, the first virtio interrupt line.
    let irq = husk_vmm::memory::VIRTIO_IRQ_BASE;
    let (mut cfg, out) = config(guest_image(mode, PORT, CID, irq));
    cfg.vsock = Some(VsockConfig {
        guest_cid: CID,
        uds_path: uds_path.clone(),
    });
    let (exit, took) = run_bounded(cfg, &out);
    let text = console(&out);
    assert_eq!(exit.unwrap(), VmExit::Reset, "serial: {text:?}");
    assert!(text.ends_with("vsock echo ok\n"), "serial: {text:?}");
    // Each of the guest's three sends (REQUEST, RW, SHUTDOWN) waits for an interrupt that
    // comes after it.
    let interrupts = count_after(&text, "interrupts seen: ");
    assert!(interrupts >= 3, "{interrupts} interrupts for {text:?}");
    let report = server.join().unwrap().unwrap();
    assert_eq!(report.received, PAYLOAD, "{report:?}");
    assert!(
        report.saw_eof,
        "the guest's SHUTDOWN did not reach the host"
    );
    assert!(!uds_path.exists(), "the VM left its vsock socket behind");
    eprintln!("{name}: guest ran in {took:?} ({interrupts} interrupts)");
    text
}

fn count_after(text: &str, prefix: &str) -> u32 {
    text.lines()
        .find_map(|l| l.strip_prefix(prefix))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no {prefix:?} in {text:?}"))
}

#[test]
fn vsock_echo_through_real_virtqueues() {
    run_echo(MODE_ECHO, "vsock-echo");
}

#[test]
fn vsock_echo_with_interrupt_delivery() {
    let text = run_echo(MODE_ECHO_IRQ, "vsock-echo-irq");
    // The guest wakes from `hlt` only for its vector and counts a wakeup only when the handler
    // found a used-ring interrupt; two deliveries can share one wakeup, hence `>=`.
    let delivered = count_after(&text, "interrupts delivered: ");
    let seen = count_after(&text, "interrupts seen: ");
    assert!(delivered >= seen, "{text:?}");
}

#[test]
fn virtio_mmio_register_protocol() {
    require_kvm();
    const CID: u32 = 42;
    let dir = TempDir::new("virtio-regs");
    // A block device first puts vsock in the second window, so the guest has to scan.
    let disk = dir.0.join("disk.img");
    std::fs::write(&disk, vec![0u8; 4096]).unwrap();
    let (mut cfg, out) = config(guest_image(MODE_REGS, 0, CID, 0));
    cfg.blocks.push(BlockConfig {
        path: disk,
        read_only: true,
    });
    cfg.vsock = Some(VsockConfig {
        guest_cid: CID,
        uds_path: dir.0.join("vsock"),
    });
    let (exit, took) = run_bounded(cfg, &out);
    let text = console(&out);
    assert_eq!(exit.unwrap(), VmExit::Reset, "serial: {text:?}");
    assert_eq!(
        text,
        "device features 0x100000000\n\
         features without VERSION_1 refused\n\
         unoffered feature refused\n\
         VERSION_1 accepted\n\
         queue 0 max 256\n\
         queue 1 max 256\n\
         queue 2 max 256\n\
         queue setup read back\n\
         guest_cid 42\n\
         register protocol ok\n"
    );
    eprintln!("register guest ran in {took:?}");
}
