//! Just enough of the i8042 keyboard controller for Linux `reboot=k`: a write of 0xFE (pulse
//! the reset line) to the command port ends the VM with `VmExit::Reset`.
//!
//! The window covers ports 0x60..=0x64: offset 0 is the data port, offset 4 the
//! command/status port. There is no keyboard: the status register never reports data, so
//! Linux (booted with `i8042.noaux i8042.nomux i8042.dumbkbd`) finds nothing to read.

use std::sync::Arc;

use crate::bus::BusDevice;
use crate::stop::{StopState, VmExit};

/// First port of the window (data port).
pub const I8042_BASE: u64 = 0x60;
/// The window reaches the command port at 0x64.
pub const I8042_LEN: u64 = 5;
const COMMAND_OFFSET: u64 = 4;
const CMD_RESET_CPU: u8 = 0xfe;

/// The reset-only i8042.
pub struct I8042 {
    stop: Arc<StopState>,
}

impl I8042 {
    /// An i8042 that reports a reset to `stop`.
    pub fn new(stop: Arc<StopState>) -> Self {
        Self { stop }
    }
}

/// The reset-only controller has no state of its own: a snapshot records it as empty.
impl crate::persist::Persist for I8042 {
    fn save_state(&mut self) -> Result<Vec<u8>, String> {
        Ok(Vec::new())
    }

    fn restore_state(&mut self, state: &[u8]) -> Result<(), String> {
        if state.is_empty() {
            Ok(())
        } else {
            Err(format!("unexpected {} bytes of i8042 state", state.len()))
        }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        // Status 0: output buffer empty, input buffer empty (ready for commands).
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == COMMAND_OFFSET && data.first() == Some(&CMD_RESET_CPU) {
            self.stop.request(Ok(VmExit::Reset));
        }
    }
}
