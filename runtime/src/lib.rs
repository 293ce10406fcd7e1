//! Husk's runtime: the library under the `husk` command line.
//!
//! Dependencies point down this list: `cli` uses everything; `bench` drives husk binaries and
//! the VMM; `lifecycle` (a container's life, through its monitor) uses `monitor`; `monitor`
//! (the process that owns a container's VM) uses `checkpoint_image`, `agent_vm` and
//! `container`; the rest are leaves.
pub mod agent_vm;
pub mod assets;
pub mod bare_vm;
pub mod bench;
pub mod boot_timing;
pub mod checkpoint_image;
pub mod cli;
pub mod container;
pub mod guest_port;
pub mod lifecycle;
pub mod logging;
pub mod monitor;
pub mod template;
