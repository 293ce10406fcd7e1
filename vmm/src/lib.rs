//! The Husk micro-VM monitor: one KVM micro-VM per container.
//!
//! Start with [`VmConfig`] and [`Vm::new`], then [`Vm::run`]. [`VmBuilder`] exposes the steps
//! for callers that add their own devices.
pub mod boot;
pub mod bus;
pub mod cpuid;
pub mod devices;
pub mod error;
pub mod i8042;
pub mod memory;
pub mod mptable;
pub mod pagefile;
pub mod pause;
mod report;
pub mod serial;
pub mod snapshot;
pub mod stop;
pub mod testguest;
pub mod vcpu;
pub mod vm;

pub use boot::CpuMode;
pub use error::VmError;
pub use pagefile::{Codec, PageInMode, PageOutReport, PageState};
pub use pause::VmControl;
pub use stop::VmExit;
pub use vm::{BlockConfig, Boot, SerialOutput, ShareConfig, Vm, VmBuilder, VmConfig, VsockConfig};
