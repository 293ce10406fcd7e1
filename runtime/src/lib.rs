//! Husk's runtime: the `husk` command line and the library under it.
pub mod assets;
pub mod bench;
pub mod bench_density;
pub mod bench_pause;
pub mod bench_pause_container;
pub mod bench_restore;
pub mod bench_run;
pub mod bench_start;
pub mod boot;
pub mod cli;
pub mod container;
pub mod logging;
pub mod microvm;
pub mod template;
pub mod vm;
pub mod vsock;
