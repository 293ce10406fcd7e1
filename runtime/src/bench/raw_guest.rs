//! What the host benchmarks that run the VMM's raw test guest share: waiting on its memory.

use std::time::Duration;

use anyhow::Result;
use husk_vmm::testing::guests::Running;

/// How long the guest may take for anything (its fill is emulated instruction by instruction
/// where KVM is nested in an emulator).
const WAIT_LIMIT: Duration = Duration::from_secs(300);
pub const MIB: u64 = 1 << 20;

/// Waits (up to [`WAIT_LIMIT`]) until `done` holds for the guest's memory.
pub fn wait(
    vm: &Running,
    what: &str,
    done: impl Fn(&husk_vmm::memory::GuestMemory) -> bool,
) -> Result<()> {
    vm.wait_for(what, WAIT_LIMIT, done)
        .map_err(anyhow::Error::msg)
}
