//! Husk's runtime: the library under the `husk` command line. Each module uses only those
//! listed after it:
//!
//! - `cli`: the command line: clap types and one small file per group of commands.
//! - `bench`: `husk bench`, benchmarks that drive husk binaries, runc and the VMM (only `cli`
//!   uses it).
//! - `lifecycle`: a container's life as an API, [`lifecycle::Container`], acting through the
//!   container's monitor.
//! - `monitor`: the process that owns a container's VM: boot, clone or restore, control
//!   server, stdio, paging, cgroup, and how `create` starts it.
//! - `checkpoint_image`: the checkpoint image's format, written by the monitor and checked by
//!   restore.
//! - `container`: what a container is made of: bundle, guest plan, state directory, template
//!   choice, signal names, trace.
//! - `template`: templates as the runtime makes them (the default one, a template's guest).
//! - `boot_timing`, `bare_vm`: `husk boot` and `husk vm`.
//! - `agent_vm`: a VM running Husk's kernel and agent, driven from this process.
//! - `guest_port`: the host side of a guest vsock port.
//! - `assets`, `logging`: the guest kernel and initramfs on disk; runc-style log lines (the
//!   command's, and the monitor's bounded log).
pub mod cli;

pub mod bench;
pub mod lifecycle;
pub mod monitor;

pub mod checkpoint_image;
pub mod container;
pub mod image_key;
pub mod template;

pub mod agent_vm;
pub mod bare_vm;
pub mod boot_timing;
pub mod guest_port;

pub mod assets;
pub mod logging;
