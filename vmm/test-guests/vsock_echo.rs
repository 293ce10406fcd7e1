//! A bare-metal test guest: a virtio-mmio (version 2) driver for virtio-vsock.
//!
//! Built by `vmm/build.rs` with plain `rustc` for the host target (only `core` is needed),
//! linked by `guest.ld` at 1 MiB and flattened to a raw image that the tests boot with
//! `Boot::Raw { mode: CpuMode::Long, .. }` on the VMM's identity page tables.
//!
//! The test patches `PARAMS` in the image (found by its magic) to pick what the guest does:
//! - `MODE_ECHO`: full driver init, connect to host CID 2 port `port`, send `PAYLOAD`, expect
//!   it echoed back, shut down, wait for the device's RST; prints "vsock echo ok".
//! - `MODE_ECHO_IRQ`: the same, but the guest sleeps in `hlt` and learns of completions from
//!   real interrupts (IOAPIC pin `irq` -> LAPIC -> IDT vector `IRQ_VECTOR`).
//! - `MODE_REGS`: the register protocol alone (feature negotiation, queue registers, config
//!   space); prints "register protocol ok".
//!
//! Every failure prints "FAIL: <what>" and resets, so the host sees why in the serial text. In the
//! polling modes the guest runs with interrupts off and finds completions by reading
//! InterruptStatus, acking it, and only then looking at the used rings, as an interrupt handler
//! would.
//!
//! Everything that the device also touches is accessed with volatile loads and stores, field by
//! field, so the device never races a wide copy. `build.rs` compiles this file without SSE: on
//! the PVM host every guest instruction goes through KVM's emulator, which has no SSE
//! arithmetic (the `xorps` LLVM uses to zero a struct stops the VM with an emulation failure).

#![no_std]
#![no_main]

use core::ptr::{addr_of, addr_of_mut, read_volatile, write_volatile};
use core::sync::atomic::{compiler_fence, Ordering};

// The VMM starts us in long mode with paging on but no stack: take one from the linker script
// and call into Rust. `guest_main` never returns.
core::arch::global_asm!(
    ".section .text.entry, \"ax\"",
    ".global _start",
    "_start:",
    "    lea rsp, [rip + __stack_top]",
    "    call guest_main",
    "2:  jmp 2b",
    // The interrupt entry: save the registers the C ABI lets `irq_handler` clobber (nine
    // pushes on the 40-byte frame keep the stack 16-byte aligned at the call), return by iretq.
    ".global irq_entry",
    "irq_entry:",
    "    push rax",
    "    push rcx",
    "    push rdx",
    "    push rsi",
    "    push rdi",
    "    push r8",
    "    push r9",
    "    push r10",
    "    push r11",
    "    call irq_handler",
    "    pop r11",
    "    pop r10",
    "    pop r9",
    "    pop r8",
    "    pop rdi",
    "    pop rsi",
    "    pop rdx",
    "    pop rcx",
    "    pop rax",
    "    iretq",
);

const MODE_ECHO: u32 = 1;
const MODE_REGS: u32 = 2;
const MODE_ECHO_IRQ: u32 = 3;

/// Parameters the host test patches into the image before booting it.
#[repr(C)]
struct Params {
    /// "HUSKPRM\0": lets the test find this struct in the flat image.
    magic: [u8; 8],
    /// `MODE_ECHO` or `MODE_REGS`.
    mode: u32,
    /// Host port to connect to (the VMM forwards it to `<uds_path>_<port>`).
    port: u32,
    /// The CID the test configured; config space must report it.
    cid: u32,
    /// The device's IOAPIC pin (GSI), for `MODE_ECHO_IRQ`.
    irq: u32,
}

#[no_mangle]
#[used]
static PARAMS: Params = Params {
    magic: *b"HUSKPRM\0",
    mode: 0,
    port: 0,
    cid: 0,
    irq: 0,
};

/// What the echo test sends; the host test expects exactly these bytes.
const PAYLOAD: &[u8] = b"ping through a real virtqueue";
/// The guest's own port for the connection.
const GUEST_PORT: u32 = 49152;

// ---- serial and reset -----------------------------------------------------------------------

fn outb(port: u16, v: u8) {
    // SAFETY: port I/O to COM1 and the i8042; the VMM emulates both, nothing else is touched.
    unsafe { core::arch::asm!("out dx, al", in("dx") port, in("al") v, options(nostack)) };
}

fn print(s: &[u8]) {
    for &b in s {
        outb(0x3f8, b);
    }
}

fn print_dec(mut v: u64) {
    let mut buf = [0u8; 20];
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    print(&buf[i..]);
}

fn print_hex(v: u64) {
    print(b"0x");
    let mut started = false;
    for shift in (0..16).rev() {
        let nib = ((v >> (shift * 4)) & 0xf) as u8;
        if nib != 0 || started || shift == 0 {
            started = true;
            outb(
                0x3f8,
                if nib < 10 {
                    b'0' + nib
                } else {
                    b'a' + nib - 10
                },
            );
        }
    }
}

/// Pulses the i8042 reset line: the VMM ends the run with `VmExit::Reset`.
fn reset() -> ! {
    outb(0x64, 0xfe);
    loop {
        core::hint::spin_loop();
    }
}

fn fail(what: &[u8]) -> ! {
    print(b"FAIL: ");
    print(what);
    print(b"\n");
    reset()
}

fn fail_val(what: &[u8], v: u64) -> ! {
    print(b"FAIL: ");
    print(what);
    print(b" ");
    print_hex(v);
    print(b"\n");
    reset()
}

fn check(ok: bool, what: &[u8]) {
    if !ok {
        fail(what);
    }
}

// ---- virtio-mmio registers (virtio 1.2, 4.2.2) ----------------------------------------------

const MMIO_BASE: u64 = 0xd000_0000;
const MMIO_WINDOW: u64 = 0x1000;
const MAX_WINDOWS: u64 = 16;

const MAGIC: u64 = 0x000;
const VERSION: u64 = 0x004;
const DEVICE_ID: u64 = 0x008;
const DEVICE_FEATURES: u64 = 0x010;
const DEVICE_FEATURES_SEL: u64 = 0x014;
const DRIVER_FEATURES: u64 = 0x020;
const DRIVER_FEATURES_SEL: u64 = 0x024;
const QUEUE_SEL: u64 = 0x030;
const QUEUE_NUM_MAX: u64 = 0x034;
const QUEUE_NUM: u64 = 0x038;
const QUEUE_READY: u64 = 0x044;
const QUEUE_NOTIFY: u64 = 0x050;
const INTERRUPT_STATUS: u64 = 0x060;
const INTERRUPT_ACK: u64 = 0x064;
const STATUS: u64 = 0x070;
const QUEUE_DESC_LOW: u64 = 0x080;
const QUEUE_AVAIL_LOW: u64 = 0x090;
const QUEUE_USED_LOW: u64 = 0x0a0;
const CONFIG_GENERATION: u64 = 0x0fc;
const CONFIG: u64 = 0x100;

const MMIO_MAGIC: u32 = 0x7472_6976;
const DEVICE_ID_VSOCK: u32 = 19;

const ACKNOWLEDGE: u32 = 1;
const DRIVER: u32 = 2;
const DRIVER_OK: u32 = 4;
const FEATURES_OK: u32 = 8;
const DEVICE_NEEDS_RESET: u32 = 64;

/// VIRTIO_F_VERSION_1 is feature bit 32: bit 0 of feature word 1.
const VERSION_1_HI: u32 = 1;
const INT_USED_RING: u32 = 1;
const INT_CONFIG: u32 = 2;

#[derive(Clone, Copy)]
struct Mmio(u64);

impl Mmio {
    fn read(self, off: u64) -> u32 {
        // SAFETY: `self.0` is a virtio-mmio window the VMM maps (or an unclaimed address, which
        // reads as all ones); the page tables identity-map it.
        unsafe { read_volatile((self.0 + off) as *const u32) }
    }
    fn write(self, off: u64, v: u32) {
        // SAFETY: as in `read`.
        unsafe { write_volatile((self.0 + off) as *mut u32, v) }
    }
    fn read8(self, off: u64) -> u8 {
        // SAFETY: as in `read`; byte reads are allowed in the config space.
        unsafe { read_volatile((self.0 + off) as *const u8) }
    }
    fn set_status(self, bits: u32) {
        self.write(STATUS, self.read(STATUS) | bits);
    }
    /// Writes a 64-bit address as its Low register and the High register 4 bytes after it.
    fn write64(self, low: u64, v: u64) {
        self.write(low, v as u32);
        self.write(low + 4, (v >> 32) as u32);
    }
    fn device_features(self) -> u64 {
        self.write(DEVICE_FEATURES_SEL, 1);
        let hi = self.read(DEVICE_FEATURES);
        self.write(DEVICE_FEATURES_SEL, 0);
        let lo = self.read(DEVICE_FEATURES);
        (u64::from(hi) << 32) | u64::from(lo)
    }
    fn set_driver_features(self, f: u64) {
        self.write(DRIVER_FEATURES_SEL, 1);
        self.write(DRIVER_FEATURES, (f >> 32) as u32);
        self.write(DRIVER_FEATURES_SEL, 0);
        self.write(DRIVER_FEATURES, f as u32);
    }
    /// The 64-bit guest_cid in the vsock config space, read as two 32-bit halves.
    fn config_cid(self) -> u64 {
        let lo = self.read(CONFIG);
        let hi = self.read(CONFIG + 4);
        (u64::from(hi) << 32) | u64::from(lo)
    }
}

/// Scans the virtio-mmio windows for the vsock device.
fn find_vsock() -> Mmio {
    for i in 0..MAX_WINDOWS {
        let dev = Mmio(MMIO_BASE + i * MMIO_WINDOW);
        let magic = dev.read(MAGIC);
        if magic != MMIO_MAGIC {
            // Windows are contiguous: the first empty one ends the list.
            break;
        }
        let version = dev.read(VERSION);
        if version != 2 {
            fail_val(b"virtio-mmio version is not 2:", version.into());
        }
        if dev.read(DEVICE_ID) == DEVICE_ID_VSOCK {
            return dev;
        }
    }
    fail(b"no virtio-vsock device found")
}

/// Reset, ACKNOWLEDGE, DRIVER: the start of every initialisation (virtio 1.2, 3.1.1).
fn begin_init(dev: Mmio) {
    dev.write(STATUS, 0);
    check(dev.read(STATUS) == 0, b"status not 0 after reset");
    dev.set_status(ACKNOWLEDGE);
    dev.set_status(DRIVER);
    check(
        dev.read(STATUS) == ACKNOWLEDGE | DRIVER,
        b"status not ACKNOWLEDGE|DRIVER",
    );
}

// ---- split virtqueues (virtio 1.2, 2.7) -----------------------------------------------------

const QSZ: usize = 8;
const NUM_QUEUES: usize = 3;
const RXQ: usize = 0;
const TXQ: usize = 1;
const EVQ: usize = 2;
const DESC_F_WRITE: u16 = 2;

#[repr(C)]
#[derive(Clone, Copy)]
struct Desc {
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
}

#[repr(C)]
struct Avail {
    flags: u16,
    idx: u16,
    ring: [u16; QSZ],
    used_event: u16,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct UsedElem {
    id: u32,
    len: u32,
}

#[repr(C, align(4))]
struct Used {
    flags: u16,
    idx: u16,
    ring: [UsedElem; QSZ],
    avail_event: u16,
}

/// One queue's rings in one page (the descriptor table needs 16-byte alignment, the avail
/// ring 2, the used ring 4).
#[repr(C, align(4096))]
struct Vq {
    desc: [Desc; QSZ],
    avail: Avail,
    used: Used,
}

const HDR: usize = 44;
const BUF_DATA: usize = 256;
const BUF_SIZE: usize = HDR + BUF_DATA;
const RX_BUFS: usize = 4;

#[repr(C, align(16))]
struct Buf([u8; BUF_SIZE]);

/// Driver memory the device reads and writes. It lives in .bss, which the image does not
/// contain: fresh guest RAM is zero, which is all the rings need to start with.
#[repr(C)]
struct Mem {
    vqs: [Vq; NUM_QUEUES],
    rx: [Buf; RX_BUFS],
    tx: Buf,
    event: [u8; 8],
}

static mut MEM: Mem = Mem {
    vqs: [const {
        Vq {
            desc: [Desc {
                addr: 0,
                len: 0,
                flags: 0,
                next: 0,
            }; QSZ],
            avail: Avail {
                flags: 0,
                idx: 0,
                ring: [0; QSZ],
                used_event: 0,
            },
            used: Used {
                flags: 0,
                idx: 0,
                ring: [UsedElem { id: 0, len: 0 }; QSZ],
                avail_event: 0,
            },
        }
    }; NUM_QUEUES],
    rx: [const { Buf([0; BUF_SIZE]) }; RX_BUFS],
    tx: Buf([0; BUF_SIZE]),
    event: [0; 8],
};

fn vq(q: usize) -> *mut Vq {
    // SAFETY: only a raw pointer is formed; all accesses through it are volatile, and the guest
    // is single-threaded.
    unsafe { addr_of_mut!(MEM.vqs[q]) }
}

fn rx_buf(i: usize) -> *mut u8 {
    // SAFETY: as in `vq`.
    unsafe { addr_of_mut!(MEM.rx[i].0) as *mut u8 }
}

fn tx_buf() -> *mut u8 {
    // SAFETY: as in `vq`.
    unsafe { addr_of_mut!(MEM.tx.0) as *mut u8 }
}

fn event_buf() -> *mut u8 {
    // SAFETY: as in `vq`.
    unsafe { addr_of_mut!(MEM.event) as *mut u8 }
}

/// The driver's side of the queues: what it made available and what it has consumed.
struct Driver {
    dev: Mmio,
    avail_idx: [u16; NUM_QUEUES],
    /// Next used-ring entry to consume.
    used_seen: [u16; NUM_QUEUES],
    /// The used index as read right after the last InterruptStatus acknowledgement: entries
    /// below it are known to the driver "by interrupt".
    used_covered: [u16; NUM_QUEUES],
    /// Times InterruptStatus showed a used-ring notification.
    interrupts: u32,
    /// Sleep until a real interrupt instead of polling InterruptStatus.
    use_irq: bool,
}

/// Polls of InterruptStatus before a wait gives up (each is a VM exit, tens of µs).
const WAIT_POLLS: u32 = 200_000;

impl Driver {
    /// Tells the device where queue `q` lives and makes it ready.
    fn setup_queue(&mut self, q: usize) {
        let dev = self.dev;
        dev.write(QUEUE_SEL, q as u32);
        check(dev.read(QUEUE_READY) == 0, b"queue ready before setup");
        let max = dev.read(QUEUE_NUM_MAX);
        if (max as usize) < QSZ {
            fail_val(b"QueueNumMax too small:", max.into());
        }
        dev.write(QUEUE_NUM, QSZ as u32);
        let v = vq(q);
        // SAFETY: `v` points into MEM; only addresses are taken here.
        let (desc, avail, used) = unsafe {
            (
                addr_of!((*v).desc) as u64,
                addr_of!((*v).avail) as u64,
                addr_of!((*v).used) as u64,
            )
        };
        dev.write64(QUEUE_DESC_LOW, desc);
        dev.write64(QUEUE_AVAIL_LOW, avail);
        dev.write64(QUEUE_USED_LOW, used);
        dev.write(QUEUE_READY, 1);
        check(dev.read(QUEUE_READY) == 1, b"QueueReady did not stick");
    }

    /// Puts buffer `[addr, addr+len)` in descriptor `slot` of queue `q` and makes it
    /// available; notifies the device.
    fn post(&mut self, q: usize, slot: usize, addr: *mut u8, len: usize, flags: u16) {
        let v = vq(q);
        let idx = self.avail_idx[q];
        // SAFETY: `v` points into MEM and `slot`, `idx % QSZ` are in bounds; the device only
        // reads these fields after the avail index below is published.
        unsafe {
            // Field by field, so each store is one plain naturally sized write.
            let d = addr_of_mut!((*v).desc[slot]);
            write_volatile(addr_of_mut!((*d).addr), addr as u64);
            write_volatile(addr_of_mut!((*d).len), len as u32);
            write_volatile(addr_of_mut!((*d).flags), flags);
            write_volatile(addr_of_mut!((*d).next), 0);
            write_volatile(
                addr_of_mut!((*v).avail.ring[idx as usize % QSZ]),
                slot as u16,
            );
            // The ring entry must be visible before the index that publishes it. x86 keeps
            // stores in order; this stops the compiler from reordering them.
            compiler_fence(Ordering::SeqCst);
            write_volatile(addr_of_mut!((*v).avail.idx), idx.wrapping_add(1));
        }
        self.avail_idx[q] = idx.wrapping_add(1);
        compiler_fence(Ordering::SeqCst);
        self.dev.write(QUEUE_NOTIFY, q as u32);
    }

    fn used_idx(&self, q: usize) -> u16 {
        // SAFETY: `vq(q)` points into MEM; the device writes this field, hence volatile.
        unsafe { read_volatile(addr_of!((*vq(q)).used.idx)) }
    }

    /// What an interrupt handler does: read InterruptStatus, acknowledge it, then note how far
    /// every used ring has got (the device fills used entries before it raises the status).
    fn poll_interrupt(&mut self) {
        let isr = self.dev.read(INTERRUPT_STATUS);
        if isr & INT_CONFIG != 0 {
            fail(b"unexpected configuration-change interrupt");
        }
        if isr & INT_USED_RING == 0 {
            return;
        }
        self.dev.write(INTERRUPT_ACK, isr);
        self.interrupts += 1;
        compiler_fence(Ordering::SeqCst);
        for q in 0..NUM_QUEUES {
            self.used_covered[q] = self.used_idx(q);
        }
    }

    /// Sleeps until the interrupt handler has run (it reads and acks InterruptStatus), then
    /// notes how far every used ring has got.
    fn wait_interrupt(&mut self) {
        let before = irq_count();
        // SAFETY: `sti; hlt` sleeps until an interrupt (sti's one-instruction shadow means one
        // cannot slip in between); the handler saves every register it uses. Interrupts are off
        // again before we touch state the handler shares.
        unsafe { core::arch::asm!("sti", "hlt", "cli", options(nomem, nostack)) };
        if irq_count() != before {
            self.interrupts += 1;
            compiler_fence(Ordering::SeqCst);
            for q in 0..NUM_QUEUES {
                self.used_covered[q] = self.used_idx(q);
            }
        }
    }

    /// Waits for the next used entry of queue `q` that an interrupt announced; returns
    /// `(descriptor id, length written)`.
    fn wait_used(&mut self, q: usize, what: &[u8]) -> (usize, usize) {
        let mut polls = 0;
        while self.used_covered[q] == self.used_seen[q] {
            if self.use_irq {
                self.wait_interrupt();
            } else {
                self.poll_interrupt();
            }
            polls += 1;
            if polls == WAIT_POLLS {
                let why: &[u8] = if self.used_idx(q) != self.used_seen[q] {
                    b"used ring advanced but InterruptStatus never said so"
                } else {
                    b"timed out waiting for the device"
                };
                print(b"FAIL: ");
                print(what);
                print(b": ");
                print(why);
                print(b"\n");
                reset();
            }
        }
        let v = vq(q);
        let i = self.used_seen[q] as usize % QSZ;
        self.used_seen[q] = self.used_seen[q].wrapping_add(1);
        // SAFETY: `v` points into MEM, `i` is in bounds; the entry is complete because the
        // device published it (used idx) before raising InterruptStatus.
        let (id, len) = unsafe {
            let e = addr_of!((*v).used.ring[i]);
            (
                read_volatile(addr_of!((*e).id)),
                read_volatile(addr_of!((*e).len)),
            )
        };
        (id as usize, len as usize)
    }
}

// ---- real interrupts: IOAPIC -> LAPIC -> IDT -----------------------------------------------

const IRQ_VECTOR: usize = 0x30;
const SPURIOUS_VECTOR: u32 = 0xff;
const LAPIC_BASE: u64 = 0xfee0_0000;
const LAPIC_TPR: u64 = 0x80;
const LAPIC_EOI: u64 = 0xb0;
const LAPIC_SVR: u64 = 0xf0;
const LAPIC_LVT0: u64 = 0x350;
const IOAPIC_BASE: u64 = 0xfec0_0000;

/// The vsock window the interrupt handler reads and acks.
static mut IRQ_DEV: u64 = 0;
/// Interrupts the handler saw with a used-ring bit in InterruptStatus.
static mut IRQ_COUNT: u32 = 0;
/// 16-byte long-mode gate descriptors, up to `IRQ_VECTOR`.
static mut IDT: [[u64; 2]; IRQ_VECTOR + 1] = [[0; 2]; IRQ_VECTOR + 1];

extern "C" {
    /// The assembly entry in the stub above.
    fn irq_entry();
}

fn irq_count() -> u32 {
    // SAFETY: a plain static the handler updates; volatile because it changes behind us.
    unsafe { read_volatile(addr_of!(IRQ_COUNT)) }
}

fn mmio_write(addr: u64, v: u32) {
    // SAFETY: LAPIC and IOAPIC registers, emulated by KVM's in-kernel irqchip and
    // identity-mapped like all of the low 4 GiB.
    unsafe { write_volatile(addr as *mut u32, v) }
}

/// Called from `irq_entry` with interrupts off: the driver's interrupt handler.
#[no_mangle]
extern "C" fn irq_handler() {
    // SAFETY: set before interrupts were enabled, never changed after.
    let dev = Mmio(unsafe { read_volatile(addr_of!(IRQ_DEV)) });
    let isr = dev.read(INTERRUPT_STATUS);
    if isr != 0 {
        dev.write(INTERRUPT_ACK, isr);
    }
    if isr & INT_USED_RING != 0 {
        // SAFETY: the main flow only reads IRQ_COUNT; the guest has one vCPU.
        unsafe { write_volatile(addr_of_mut!(IRQ_COUNT), irq_count() + 1) };
    }
    mmio_write(LAPIC_BASE + LAPIC_EOI, 0);
}

/// Routes IOAPIC pin `gsi` to `IRQ_VECTOR` on this CPU and installs the handler. Interrupts
/// stay disabled (IF=0) except inside `wait_interrupt`.
fn setup_interrupts(gsi: u32) {
    if !(1..24).contains(&gsi) {
        fail_val(b"bad IOAPIC pin", gsi.into());
    }
    // The legacy PICs would deliver the same line as ExtINT with an unprogrammed vector:
    // mask them all, and LINT0 too.
    outb(0x21, 0xff);
    outb(0xa1, 0xff);
    let handler = irq_entry as *const () as u64;
    // Present, DPL 0, 64-bit interrupt gate (IF cleared on entry), code selector 0x08.
    let low =
        (handler & 0xffff) | (0x08 << 16) | (0x8e00u64 << 32) | ((handler >> 16) & 0xffff) << 48;
    // SAFETY: IDT is only written here, before any interrupt can arrive; `lidt` gets its exact
    // size and address (identity-mapped, so linear = physical).
    unsafe {
        let idt = addr_of_mut!(IDT);
        write_volatile(addr_of_mut!((*idt)[IRQ_VECTOR][0]), low);
        write_volatile(addr_of_mut!((*idt)[IRQ_VECTOR][1]), handler >> 32);
        let mut desc = [0u8; 10];
        let limit = core::mem::size_of::<[[u64; 2]; IRQ_VECTOR + 1]>() - 1;
        desc[..2].copy_from_slice(&(limit as u16).to_le_bytes());
        desc[2..].copy_from_slice(&(idt as u64).to_le_bytes());
        core::arch::asm!("lidt [{}]", in(reg) desc.as_ptr(), options(readonly, nostack));
    }
    mmio_write(LAPIC_BASE + LAPIC_TPR, 0);
    mmio_write(LAPIC_BASE + LAPIC_LVT0, 1 << 16);
    mmio_write(LAPIC_BASE + LAPIC_SVR, 0x100 | SPURIOUS_VECTOR);
    // Redirection entry: fixed delivery, physical destination APIC 0, edge, unmasked.
    let select = 0x10 + 2 * gsi;
    mmio_write(IOAPIC_BASE, select + 1);
    mmio_write(IOAPIC_BASE + 0x10, 0);
    mmio_write(IOAPIC_BASE, select);
    mmio_write(IOAPIC_BASE + 0x10, IRQ_VECTOR as u32);
}

// ---- vsock packets (virtio 1.2, 5.10.6) -----------------------------------------------------

const HOST_CID: u64 = 2;
const TYPE_STREAM: u16 = 1;
const OP_REQUEST: u16 = 1;
const OP_RESPONSE: u16 = 2;
const OP_RST: u16 = 3;
const OP_SHUTDOWN: u16 = 4;
const OP_RW: u16 = 5;
const OP_CREDIT_UPDATE: u16 = 6;
const SHUTDOWN_BOTH: u32 = 3;
/// Receive buffer space we advertise to the host.
const BUF_ALLOC: u32 = (RX_BUFS * BUF_DATA) as u32;

/// `struct virtio_vsock_hdr`, little endian, packed to 44 bytes.
#[derive(Clone, Copy)]
struct Hdr {
    src_cid: u64,
    dst_cid: u64,
    src_port: u32,
    dst_port: u32,
    len: u32,
    type_: u16,
    op: u16,
    flags: u32,
    buf_alloc: u32,
    fwd_cnt: u32,
}

/// Byte-wise volatile access: the header is unaligned-friendly and the device writes rx
/// buffers behind the compiler's back.
fn put(p: *mut u8, off: usize, bytes: &[u8]) {
    for (i, b) in bytes.iter().enumerate() {
        // SAFETY: callers pass a buffer of BUF_SIZE bytes and offsets within it.
        unsafe { write_volatile(p.add(off + i), *b) };
    }
}

fn get<const N: usize>(p: *const u8, off: usize) -> [u8; N] {
    let mut out = [0u8; N];
    for (i, b) in out.iter_mut().enumerate() {
        // SAFETY: as in `put`.
        *b = unsafe { read_volatile(p.add(off + i)) };
    }
    out
}

impl Hdr {
    fn write(&self, p: *mut u8) {
        put(p, 0, &self.src_cid.to_le_bytes());
        put(p, 8, &self.dst_cid.to_le_bytes());
        put(p, 16, &self.src_port.to_le_bytes());
        put(p, 20, &self.dst_port.to_le_bytes());
        put(p, 24, &self.len.to_le_bytes());
        put(p, 28, &self.type_.to_le_bytes());
        put(p, 30, &self.op.to_le_bytes());
        put(p, 32, &self.flags.to_le_bytes());
        put(p, 36, &self.buf_alloc.to_le_bytes());
        put(p, 40, &self.fwd_cnt.to_le_bytes());
    }
    fn read(p: *const u8) -> Hdr {
        Hdr {
            src_cid: u64::from_le_bytes(get(p, 0)),
            dst_cid: u64::from_le_bytes(get(p, 8)),
            src_port: u32::from_le_bytes(get(p, 16)),
            dst_port: u32::from_le_bytes(get(p, 20)),
            len: u32::from_le_bytes(get(p, 24)),
            type_: u16::from_le_bytes(get(p, 28)),
            op: u16::from_le_bytes(get(p, 30)),
            flags: u32::from_le_bytes(get(p, 32)),
            buf_alloc: u32::from_le_bytes(get(p, 36)),
            fwd_cnt: u32::from_le_bytes(get(p, 40)),
        }
    }
}

/// One stream connection from the guest to a host port.
struct Conn {
    drv: Driver,
    cid: u64,
    port: u32,
    /// Payload bytes received (our fwd_cnt: we consume data as soon as it arrives).
    fwd_cnt: u32,
}

impl Conn {
    fn send(&mut self, op: u16, flags: u32, payload: &[u8]) {
        let p = tx_buf();
        Hdr {
            src_cid: self.cid,
            dst_cid: HOST_CID,
            src_port: GUEST_PORT,
            dst_port: self.port,
            len: payload.len() as u32,
            type_: TYPE_STREAM,
            op,
            flags,
            buf_alloc: BUF_ALLOC,
            fwd_cnt: self.fwd_cnt,
        }
        .write(p);
        put(p, HDR, payload);
        // Header and payload in one read-only descriptor; the device accepts either layout.
        self.drv.post(TXQ, 0, p, HDR + payload.len(), 0);
        let (id, _) = self.drv.wait_used(TXQ, b"tx completion");
        check(id == 0, b"tx used entry names the wrong descriptor");
    }

    /// Waits for the next packet on rx, checks its addressing and returns its header and the
    /// rx buffer index (still owned by the driver until `repost`).
    fn recv(&mut self) -> (Hdr, usize) {
        let (id, len) = self.drv.wait_used(RXQ, b"rx packet");
        if id >= RX_BUFS {
            fail_val(b"rx used entry names an unknown descriptor:", id as u64);
        }
        let h = Hdr::read(rx_buf(id));
        if len < HDR || len != HDR + h.len as usize || h.len as usize > BUF_DATA {
            fail_val(b"rx used length does not match the header:", len as u64);
        }
        check(h.src_cid == HOST_CID, b"rx packet not from CID 2");
        check(h.dst_cid == self.cid, b"rx packet not for our CID");
        check(h.src_port == self.port, b"rx packet from the wrong port");
        check(h.dst_port == GUEST_PORT, b"rx packet for the wrong port");
        check(h.type_ == TYPE_STREAM, b"rx packet not a stream packet");
        (h, id)
    }

    fn repost(&mut self, id: usize) {
        self.drv.post(RXQ, id, rx_buf(id), BUF_SIZE, DESC_F_WRITE);
    }
}

// ---- the two test programs ------------------------------------------------------------------

/// Full initialisation (virtio 1.2, 3.1.1) of the vsock device with its three queues.
fn init_device(dev: Mmio) -> Driver {
    begin_init(dev);
    let offered = dev.device_features();
    check(
        (offered >> 32) as u32 & VERSION_1_HI != 0,
        b"device does not offer VIRTIO_F_VERSION_1",
    );
    dev.set_driver_features(1 << 32);
    dev.set_status(FEATURES_OK);
    check(
        dev.read(STATUS) & FEATURES_OK != 0,
        b"FEATURES_OK refused for VERSION_1",
    );
    let mut drv = Driver {
        dev,
        avail_idx: [0; NUM_QUEUES],
        used_seen: [0; NUM_QUEUES],
        used_covered: [0; NUM_QUEUES],
        interrupts: 0,
        use_irq: false,
    };
    for q in 0..NUM_QUEUES {
        drv.setup_queue(q);
    }
    dev.set_status(DRIVER_OK);
    let status = dev.read(STATUS);
    if status & DEVICE_NEEDS_RESET != 0 || status & DRIVER_OK == 0 {
        fail_val(b"device did not start, status", status.into());
    }
    drv
}

fn echo(params: &Params, use_irq: bool) -> ! {
    let dev = find_vsock();
    let mut drv = init_device(dev);
    if use_irq {
        // SAFETY: single-threaded; the handler only runs once interrupts are enabled below.
        unsafe { write_volatile(addr_of_mut!(IRQ_DEV), dev.0) };
        setup_interrupts(params.irq);
        drv.use_irq = true;
    }
    let cid = dev.config_cid();
    check(
        cid == u64::from(params.cid),
        b"config guest_cid is not the configured CID",
    );
    for i in 0..RX_BUFS {
        drv.post(RXQ, i, rx_buf(i), BUF_SIZE, DESC_F_WRITE);
    }
    drv.post(EVQ, 0, event_buf(), 8, DESC_F_WRITE);
    let mut conn = Conn {
        drv,
        cid,
        port: params.port,
        fwd_cnt: 0,
    };

    conn.send(OP_REQUEST, 0, &[]);
    let (h, id) = conn.recv();
    match h.op {
        OP_RESPONSE => {}
        OP_RST => fail(b"connection refused (RST): is the host listening?"),
        op => fail_val(b"expected RESPONSE, got op", op.into()),
    }
    conn.repost(id);

    conn.send(OP_RW, 0, PAYLOAD);
    let mut got = 0;
    while got < PAYLOAD.len() {
        let (h, id) = conn.recv();
        match h.op {
            OP_RW => {
                let n = h.len as usize;
                if got + n > PAYLOAD.len() {
                    fail(b"echo longer than the payload");
                }
                let data: *const u8 = rx_buf(id);
                for i in 0..n {
                    // SAFETY: `data` is an rx buffer of BUF_SIZE bytes; `recv` checked
                    // HDR + n <= BUF_SIZE.
                    let b = unsafe { read_volatile(data.add(HDR + i)) };
                    if b != PAYLOAD[got + i] {
                        fail_val(b"echo differs at byte", (got + i) as u64);
                    }
                }
                got += n;
                conn.fwd_cnt = conn.fwd_cnt.wrapping_add(n as u32);
            }
            OP_CREDIT_UPDATE => {}
            OP_RST => fail(b"connection reset before the echo arrived"),
            op => fail_val(b"unexpected op while reading the echo:", op.into()),
        }
        conn.repost(id);
    }

    // Close both directions; once the host side is drained the device forgets the connection
    // and answers with RST.
    conn.send(OP_SHUTDOWN, SHUTDOWN_BOTH, &[]);
    loop {
        let (h, id) = conn.recv();
        conn.repost(id);
        match h.op {
            OP_RST => break,
            OP_CREDIT_UPDATE | OP_SHUTDOWN => {}
            op => fail_val(b"unexpected op after SHUTDOWN:", op.into()),
        }
    }
    if use_irq {
        print(b"interrupts delivered: ");
        print_dec(irq_count().into());
        print(b"\n");
    }
    print(b"interrupts seen: ");
    print_dec(conn.drv.interrupts.into());
    print(b"\nvsock echo ok\n");
    reset()
}

fn registers(params: &Params) -> ! {
    let dev = find_vsock();
    check(dev.read(STATUS) == 0, b"status not 0 at boot");

    // Queue registers are only writable between FEATURES_OK and DRIVER_OK.
    begin_init(dev);
    dev.write(QUEUE_SEL, 0);
    dev.write(QUEUE_READY, 1);
    check(
        dev.read(QUEUE_READY) == 0,
        b"QueueReady accepted before FEATURES_OK",
    );

    // A driver that does not accept VERSION_1 must be refused.
    let offered = dev.device_features();
    print(b"device features ");
    print_hex(offered);
    print(b"\n");
    check(
        (offered >> 32) as u32 & VERSION_1_HI != 0,
        b"device does not offer VIRTIO_F_VERSION_1",
    );
    dev.set_driver_features(0);
    dev.set_status(FEATURES_OK);
    check(
        dev.read(STATUS) & FEATURES_OK == 0,
        b"FEATURES_OK stuck without VERSION_1",
    );
    print(b"features without VERSION_1 refused\n");

    // Nor may it accept a feature the device did not offer.
    begin_init(dev);
    let unoffered = (!offered).trailing_zeros();
    dev.set_driver_features((1 << 32) | (1u64 << unoffered));
    dev.set_status(FEATURES_OK);
    check(
        dev.read(STATUS) & FEATURES_OK == 0,
        b"FEATURES_OK stuck with a feature the device did not offer",
    );
    print(b"unoffered feature refused\n");

    // VERSION_1 alone is accepted.
    begin_init(dev);
    dev.set_driver_features(1 << 32);
    dev.set_status(FEATURES_OK);
    check(
        dev.read(STATUS) == ACKNOWLEDGE | DRIVER | FEATURES_OK,
        b"FEATURES_OK refused for VERSION_1",
    );
    print(b"VERSION_1 accepted\n");

    // Queue registers.
    for q in 0..NUM_QUEUES as u32 {
        dev.write(QUEUE_SEL, q);
        print(b"queue ");
        print_dec(q.into());
        print(b" max ");
        print_dec(dev.read(QUEUE_NUM_MAX).into());
        print(b"\n");
    }
    dev.write(QUEUE_SEL, NUM_QUEUES as u32);
    check(
        dev.read(QUEUE_NUM_MAX) == 0,
        b"QueueNumMax not 0 for a queue that does not exist",
    );
    let mut drv = Driver {
        dev,
        avail_idx: [0; NUM_QUEUES],
        used_seen: [0; NUM_QUEUES],
        used_covered: [0; NUM_QUEUES],
        interrupts: 0,
        use_irq: false,
    };
    drv.setup_queue(1);
    dev.write(QUEUE_SEL, 0);
    check(dev.read(QUEUE_READY) == 0, b"QueueReady leaked to queue 0");
    dev.write(QUEUE_SEL, 1);
    dev.write(QUEUE_READY, 0);
    check(
        dev.read(QUEUE_READY) == 0,
        b"QueueReady could not be cleared",
    );
    dev.write(QUEUE_READY, 1);
    print(b"queue setup read back\n");

    // Config space: 32-bit halves, single bytes, and the generation counter.
    let cid = dev.config_cid();
    let mut bytes = [0u8; 8];
    for (i, b) in bytes.iter_mut().enumerate() {
        *b = dev.read8(CONFIG + i as u64);
    }
    check(
        u64::from_le_bytes(bytes) == cid,
        b"config byte reads disagree with 32-bit reads",
    );
    check(
        cid == u64::from(params.cid),
        b"config guest_cid is not the configured CID",
    );
    let generation = dev.read(CONFIG_GENERATION);
    check(
        dev.read(CONFIG_GENERATION) == generation,
        b"config generation changed on its own",
    );
    print(b"guest_cid ");
    print_dec(cid);
    print(b"\n");

    // Nothing has been used, so no interrupt may be pending.
    check(
        dev.read(INTERRUPT_STATUS) == 0,
        b"InterruptStatus set before DRIVER_OK",
    );

    // Reset forgets the queue setup.
    dev.write(STATUS, 0);
    check(dev.read(STATUS) == 0, b"status not 0 after reset");
    dev.write(QUEUE_SEL, 1);
    check(dev.read(QUEUE_READY) == 0, b"QueueReady survived a reset");
    print(b"register protocol ok\n");
    reset()
}

#[no_mangle]
extern "C" fn guest_main() -> ! {
    // SAFETY: PARAMS is a plain static; volatile reads stop the compiler from using the zeroes
    // it was compiled with instead of what the test patched in.
    let params = unsafe {
        Params {
            magic: [0; 8],
            mode: read_volatile(addr_of!(PARAMS.mode)),
            port: read_volatile(addr_of!(PARAMS.port)),
            cid: read_volatile(addr_of!(PARAMS.cid)),
            irq: read_volatile(addr_of!(PARAMS.irq)),
        }
    };
    match params.mode {
        MODE_ECHO => echo(&params, false),
        MODE_ECHO_IRQ => echo(&params, true),
        MODE_REGS => registers(&params),
        m => fail_val(b"unknown mode", m.into()),
    }
}

/// The precompiled `core` for this (unwinding) target refers to the personality routine even
/// though `panic=abort` means it is never called; give the linker something to resolve.
#[no_mangle]
extern "C" fn rust_eh_personality() {}

#[panic_handler]
fn panic(_: &core::panic::PanicInfo) -> ! {
    fail(b"guest panicked")
}
