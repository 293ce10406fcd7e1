//! Snapshots of a paused VM and restores from them.
//!
//! A snapshot is a directory with two files:
//! - `state`: a fixed header (magic, format version, CPU-feature fingerprint, body length and
//!   CRC-32) and a postcard body ([`state_file::SnapshotBody`]): the VM's configuration, the memory
//!   layout, every vCPU's registers, the in-kernel irqchip, PIT and clock, and each device's
//!   state (see [`crate::persist::Persist`]);
//! - `memory`: guest RAM, raw, one region after another, each at a page-aligned offset, so that
//!   a restore maps it `MAP_PRIVATE` instead of reading it: clones of one snapshot share every
//!   page they have not written through the page cache, and the file never changes.
//!
//! Taking one ([`crate::VmControl::snapshot`]) pauses the vCPUs, holds every device worker
//! between two requests, reads the vCPU state on each vCPU's own thread, writes both files
//! (under temporary names, renamed when complete) and resumes if asked. Restoring
//! ([`crate::Vm::restore`]) checks the header against this build and host, maps the memory,
//! rebuilds the devices from the saved configuration (with the caller's overrides) and sets
//! the saved state before any vCPU runs.
//!
//! What is not preserved: host connections of virtio-vsock (the clone gets a transport reset
//! and drops them), 9p fids (the guest must remount; its old fids are unknown to the new
//! server), the console log kept for error reports, and devices a caller placed on the buses
//! by hand (`VmBuilder::add_pio_device` / `add_mmio_device`), which are not `Persist`.
//! State the host's KVM cannot read is left out and listed in the body's `skipped`; a restore
//! refuses state the restoring KVM does not accept.

pub mod checkpoint;
mod restore;
mod save;
pub mod state_file;
mod vcpu_state;
mod vm_state;

use std::path::{Path, PathBuf};

use crate::config::SerialOutput;

pub use checkpoint::{CheckpointPaths, PAGES_FILE};
pub use restore::check;

/// Name of the state file inside a snapshot directory.
pub const STATE_FILE: &str = "state";
/// Name of the guest memory file inside a snapshot directory.
pub const MEMORY_FILE: &str = "memory";

/// What to do after a snapshot is written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum AfterSnapshot {
    /// Let the guest run on (unless it was paused before the snapshot).
    #[default]
    Resume,
    /// Leave the VM paused (e.g. to stop it and keep only the snapshot).
    StayPaused,
}

/// The two files of a snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotPaths {
    /// The header and state body.
    pub state: PathBuf,
    /// Guest RAM.
    pub memory: PathBuf,
}

impl SnapshotPaths {
    /// The files `state` and `memory` in `dir`.
    pub fn in_dir(dir: &Path) -> Self {
        Self {
            state: dir.join(STATE_FILE),
            memory: dir.join(MEMORY_FILE),
        }
    }
}

/// What a restored VM does differently from the snapshotted one.
#[derive(Debug, Clone)]
pub struct RestoreOverrides {
    /// Where the clone's serial console goes.
    pub serial: SerialOutput,
    /// A new vsock context id and host socket path: every clone of a snapshot running at
    /// the same time needs its own. `None` keeps the saved ones (only one clone can then
    /// run, as the socket path must not exist).
    pub vsock: Option<(u32, PathBuf)>,
    /// New host directories for the snapshot's 9p shares, one per share in the saved order
    /// (their tags are ignored). The guest knows its shares by tag, which stays; a clone
    /// serves its own directories under them (the guest mounts them after the restore, as
    /// 9p fids are not preserved). `None` keeps the saved directories.
    pub shares: Option<Vec<crate::config::ShareConfig>>,
    /// The KVM device node.
    pub kvm_device: PathBuf,
}

impl Default for RestoreOverrides {
    fn default() -> Self {
        Self {
            serial: SerialOutput::Sink,
            vsock: None,
            shares: None,
            kvm_device: PathBuf::from("/dev/kvm"),
        }
    }
}
