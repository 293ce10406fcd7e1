//! Husk's runtime: the `husk` command line and the library under it.
pub mod assets;
pub mod bench;
pub mod boot;
pub mod microvm;
pub mod vm;
pub mod vsock;
pub mod container;
pub mod logging;
