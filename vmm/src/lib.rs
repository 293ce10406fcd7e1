//! The Husk micro-VM monitor: one KVM micro-VM per container.
//!
//! Start with [`VmConfig`] and [`Vm::new`], then [`Vm::run`]. [`VmBuilder`] exposes the steps
//! for callers that add their own devices.
//!
//! Modules, from the bottom up (each imports only from those before it):
//! - foundations: [`confine`] (seccomp, capabilities and rlimits of a confined VMM), [`error`], [`stop`], [`bus`], [`memory`], `memory_file`, [`cpuid`], [`boot`],
//!   [`mptable`], [`persist`] (device state for snapshots), [`config`];
//! - devices: [`serial`], [`i8042`], [`devices`] (virtio);
//! - [`pagefile`]: page files and the mappings of guest RAM they are written from and read into;
//! - [`pause`] ([`VmControl`], the parts of a VM it reaches) and [`vcpu`] (the vCPU threads);
//! - [`vm`]: building and running a VM ([`Vm`], [`VmBuilder`]); `report`: what the vCPUs of a
//!   VM that hangs are doing;
//! - [`page_out`]: paging a paused VM's memory out to a page file and back in;
//! - [`snapshot`]: snapshots and checkpoints, taken and restored;
//! - `testing` (feature `test-guest`): test guests and benchmark helpers;
//! - `fuzzing` (feature `fuzzing`): the fuzz targets' ways into the devices.
pub mod boot;
pub mod bus;
pub mod config;
pub mod confine;
pub mod cpuid;
pub mod devices;
pub mod error;
#[cfg(feature = "fuzzing")]
pub mod fuzzing;
pub mod i8042;
pub mod memory;
pub(crate) mod memory_file;
pub mod mptable;
pub mod page_out;
pub mod pagefile;
pub mod pause;
pub mod persist;
mod report;
pub mod serial;
pub mod snapshot;
pub mod stop;
#[cfg(feature = "test-guest")]
pub mod testing;
pub mod vcpu;
pub mod vm;

pub use boot::CpuMode;
pub use config::{BlockConfig, Boot, SerialOutput, ShareConfig, VmConfig, VsockConfig};
pub use error::VmError;
pub use page_out::PageState;
pub use pagefile::{Codec, PageInMode, PageOutReport};
pub use pause::VmControl;
pub use stop::VmExit;
pub use vm::{Vm, VmBuilder};
