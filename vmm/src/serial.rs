//! The 16550 UART at 0x3f8 (vm-superio) and the console log behind it.
//!
//! The log keeps the last lines for error reports and watches for a guest kernel panic:
//! once "---[ end Kernel panic" arrives (or `PANIC_GRACE` after the first panic line, checked
//! by `Vm::run`) the VM ends with `VmError::GuestPanic`.

use std::collections::VecDeque;
use std::io::{self, Write};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vm_superio::serial::SerialState;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::bus::BusDevice;
use crate::error::VmError;
use crate::stop::{Outcome, StopState, VmExit};

/// First port of COM1.
pub const COM1_BASE: u64 = 0x3f8;
/// Number of UART registers.
pub const COM1_LEN: u64 = 8;
/// Legacy IRQ line of COM1.
pub const COM1_IRQ: u32 = 4;
/// How long to wait for the end of a panic report before giving up on it.
pub const PANIC_GRACE: Duration = Duration::from_secs(1);
/// How many console lines an error report carries.
const TAIL_LINES: usize = 30;
const PANIC_START: &str = "Kernel panic - not syncing";
const PANIC_END: &str = "---[ end Kernel panic";
/// What Linux prints when asked to power off (e.g. `reboot(RB_POWER_OFF)` from the agent).
const POWER_DOWN: &str = "reboot: Power down";

/// The last console lines and the panic watch.
#[derive(Default)]
pub struct ConsoleLog {
    lines: VecDeque<String>,
    partial: Vec<u8>,
    panic_line: Option<(String, Instant)>,
}

impl ConsoleLog {
    /// The last lines (and an unterminated one), newline-separated.
    pub fn tail(&self) -> String {
        let mut out: Vec<String> = self.lines.iter().cloned().collect();
        if !self.partial.is_empty() {
            out.push(String::from_utf8_lossy(&self.partial).into_owned());
        }
        out.join("\n")
    }

    /// The panic line, if its grace period has run out by `now`.
    pub fn panic_overdue(&self, now: Instant) -> Option<String> {
        let (line, seen) = self.panic_line.as_ref()?;
        (now.duration_since(*seen) >= PANIC_GRACE).then(|| line.clone())
    }

    /// Feeds console bytes; returns how the VM ends if a line just told us (a finished panic
    /// report, or Linux's power-off message: without ACPI it then halts forever).
    fn feed(&mut self, bytes: &[u8]) -> Option<Outcome> {
        let mut ended = None;
        for &b in bytes {
            if b != b'\n' {
                self.partial.push(b);
                continue;
            }
            let line = String::from_utf8_lossy(&self.partial)
                .trim_end()
                .to_string();
            self.partial.clear();
            if self.lines.len() == TAIL_LINES {
                self.lines.pop_front();
            }
            self.lines.push_back(line.clone());
            // Watched after storing, so a panic report's tail includes its last line.
            if ended.is_none() {
                ended = self.watch(&line);
            }
        }
        ended
    }

    fn watch(&mut self, line: &str) -> Option<Outcome> {
        if self.panic_line.is_none() && line.contains(POWER_DOWN) {
            return Some(Ok(VmExit::PowerOff));
        }
        if self.panic_line.is_none() {
            if let Some(at) = line.find(PANIC_START) {
                self.panic_line = Some((line[at..].to_string(), Instant::now()));
            }
        }
        match &self.panic_line {
            Some((first, _)) if line.contains(PANIC_END) => {
                Some(Err(panic_error(first.clone(), self)))
            }
            _ => None,
        }
    }
}

/// The error for a guest panic whose report is in `log`.
pub fn panic_error(first_line: String, log: &ConsoleLog) -> VmError {
    VmError::GuestPanic {
        first_line,
        console_tail: log.tail(),
    }
}

/// Where console bytes go, besides the log.
pub struct ConsoleWriter {
    out: Box<dyn Write + Send>,
    log: Arc<Mutex<ConsoleLog>>,
    stop: Arc<StopState>,
}

impl ConsoleWriter {
    /// A writer to `out` that also feeds `log` and ends the VM on a finished panic report.
    pub fn new(
        out: Box<dyn Write + Send>,
        log: Arc<Mutex<ConsoleLog>>,
        stop: Arc<StopState>,
    ) -> Self {
        Self { out, log, stop }
    }
}

impl Write for ConsoleWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut log = self.log.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(outcome) = log.feed(buf) {
            self.stop.request(outcome);
        }
        drop(log);
        // A broken console (closed stdout) must not stop the guest.
        let _ = self.out.write_all(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

/// An in-memory console sink for tests and `SerialOutput::Capture`.
pub struct CaptureWriter(pub Arc<Mutex<Vec<u8>>>);

impl Write for CaptureWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Raises the UART interrupt through an eventfd registered as a KVM irqfd.
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// The UART as a port-I/O bus device.
pub struct SerialDevice {
    uart: Serial<IrqTrigger, vm_superio::serial::NoEvents, ConsoleWriter>,
}

impl SerialDevice {
    /// A UART that raises `irq` and writes to `out`.
    pub fn new(irq: EventFd, out: ConsoleWriter) -> Self {
        Self {
            uart: Serial::new(IrqTrigger(irq), out),
        }
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if let Some(first) = data.first_mut() {
            *first = self.uart.read(offset as u8);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let Some(&value) = data.first() {
            if let Err(e) = self.uart.write(offset as u8, value) {
                log::warn!("serial write failed: {e:?}");
            }
        }
    }
}

/// The 16550 registers and receive FIFO: vm-superio's `SerialState`, which has no serde
/// support of its own, serialized through serde's remote derive.
#[derive(serde::Serialize, serde::Deserialize)]
#[serde(remote = "SerialState")]
struct UartState {
    baud_divisor_low: u8,
    baud_divisor_high: u8,
    interrupt_enable: u8,
    interrupt_identification: u8,
    line_control: u8,
    line_status: u8,
    modem_control: u8,
    modem_status: u8,
    scratch: u8,
    in_buffer: Vec<u8>,
}

/// The saved form of the UART.
#[derive(serde::Serialize, serde::Deserialize)]
struct SavedUart(#[serde(with = "UartState")] SerialState);

impl crate::persist::Persist for SerialDevice {
    fn save_state(&mut self) -> Result<Vec<u8>, String> {
        crate::persist::encode_state(&SavedUart(self.uart.state()))
    }

    /// vm-superio restores a UART only by building a new one, which takes the output by
    /// value: the current output moves over, a sink stands in for it meanwhile.
    fn restore_state(&mut self, state: &[u8]) -> Result<(), String> {
        let SavedUart(saved) = crate::persist::decode_state(state)?;
        let irq = self
            .uart
            .interrupt_evt()
            .0
            .try_clone()
            .map_err(|e| format!("cloning the UART eventfd: {e}"))?;
        let writer = self.uart.writer_mut();
        let stand_in = ConsoleWriter::new(
            Box::new(io::sink()),
            writer.log.clone(),
            writer.stop.clone(),
        );
        let out = std::mem::replace(writer, stand_in);
        self.uart = Serial::from_state(&saved, IrqTrigger(irq), vm_superio::serial::NoEvents, out)
            .map_err(|e| format!("rebuilding the UART: {e:?}"))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn panic_report_ends_vm_once_complete() {
        let stop = Arc::new(StopState::default());
        let log = Arc::new(Mutex::new(ConsoleLog::default()));
        let cap = Arc::new(Mutex::new(Vec::new()));
        let mut w = ConsoleWriter::new(
            Box::new(CaptureWriter(cap.clone())),
            log.clone(),
            stop.clone(),
        );
        w.write_all(b"boot\n[ 1.0] Kernel panic - not syncing: VFS: no root\n")
            .unwrap();
        assert!(!stop.is_stopping());
        assert!(log
            .lock()
            .unwrap()
            .panic_overdue(Instant::now() + PANIC_GRACE)
            .is_some());
        w.write_all(b"[ 1.1] ---[ end Kernel panic - not syncing: VFS ]---\n")
            .unwrap();
        match stop.take() {
            Some(Err(VmError::GuestPanic {
                first_line,
                console_tail,
            })) => {
                assert_eq!(first_line, "Kernel panic - not syncing: VFS: no root");
                assert!(console_tail.starts_with("boot\n"));
                assert!(console_tail.ends_with("VFS ]---"), "{console_tail}");
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(cap.lock().unwrap().starts_with(b"boot\n["));
    }

    #[test]
    fn power_down_message_is_a_clean_exit() {
        let mut log = ConsoleLog::default();
        assert!(log.feed(b"[ 2.0] reboot: Power d").is_none());
        assert!(matches!(log.feed(b"own\n"), Some(Ok(VmExit::PowerOff))));
    }
}
