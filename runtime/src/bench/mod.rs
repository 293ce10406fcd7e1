//! `husk bench …`: benchmarks that measure Husk next to a reference in the same run and print
//! ratios (absolute times differ too much between the host and the nested lab to mean anything).
//!
//! This module holds the command's arguments and picks the benchmark; each benchmark has a
//! file of its own, and what they share is in `stats` (figures), `timing` (timed commands),
//! `setup` (the installed husk, the bundle, scratch directories) and `fleet` (containers of
//! one runtime driven through its command line). Nothing outside `bench` uses it.

use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, Subcommand};

mod boot_vs_qemu;
mod density;
mod fleet;
#[cfg(feature = "test-guest-benches")]
mod page_out;
mod pause_container;
#[cfg(feature = "test-guest-benches")]
mod raw_guest;
mod run_vs_runc;
mod setup;
#[cfg(feature = "test-guest-benches")]
mod snapshot_restore;
mod start_latency;
mod stats;
mod timing;

#[derive(Subcommand, Debug)]
pub enum BenchCmd {
    /// Process start → agent ready, Husk against QEMU microvm booting the same kernel+initramfs.
    Boot(BootBench),
    /// `husk run` against `runc run` of the same busybox bundle, and `podman run` with each.
    Run(RunBench),
    /// Snapshot restore to a running guest against a cold boot of the same raw test guest.
    Restore(RestoreBench),
    /// Pause with page-out (compressed page file, RAM released) and lazy or eager resume.
    Pause(PauseBench),
    /// `create`+`start` until the process runs: template clone, cold boot, runc; p50/p99.
    Start(StartBench),
    /// Memory of idle containers: the monitors' PSS and host memory, template clones vs cold.
    Density(DensityBench),
}

#[derive(Args, Debug)]
pub struct RunBench {
    /// `run`s of each runtime.
    #[arg(long, default_value_t = 20)]
    runs: usize,
    /// `podman run --rm`s with each runtime (0 skips podman).
    #[arg(long, default_value_t = 10)]
    podman_runs: usize,
}

#[derive(Args, Debug)]
pub struct BootBench {
    /// Boots of each kind.
    #[arg(long, default_value_t = 10)]
    runs: usize,
    /// Guest memory in MiB for both VMMs.
    #[arg(long, default_value_t = 256)]
    memory: u32,
    /// The reference VMM.
    #[arg(long, default_value = "qemu-system-x86_64")]
    qemu: PathBuf,
    /// Skip the memory scrub before each boot (see [`scrub_freed_memory`]).
    #[arg(long)]
    no_scrub: bool,
}

#[derive(Args, Debug)]
pub struct RestoreBench {
    /// Restores (and cold boots) for each vCPU count.
    #[arg(long, default_value_t = 20)]
    runs: usize,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 256)]
    memory: u32,
    /// MiB of guest memory the guest fills with a pattern before the snapshot.
    #[arg(long, default_value_t = 64)]
    fill: u32,
    /// vCPU counts to measure, comma-separated; the first one's median is the last line.
    #[arg(long, value_delimiter = ',', default_value = "1,2")]
    vcpus: Vec<u8>,
}

#[derive(Args, Debug)]
pub struct PauseBench {
    /// MiB the guest dirties before the pauses, comma-separated; the last one's figures are
    /// the last two lines.
    #[arg(long, value_delimiter = ',', default_value = "64,256")]
    fill: Vec<u32>,
    /// Lazy resumes per fill size.
    #[arg(long, default_value_t = 9)]
    runs: usize,
    /// Instead (in the lab): a busybox container's monitor memory running, paused, resumed.
    #[arg(long)]
    container: bool,
}

#[derive(Args, Debug)]
pub struct StartBench {
    /// create+start runs of each kind, one after another (the ratio lines use their p50s).
    #[arg(long, default_value_t = 50)]
    sequential: usize,
    /// Containers of each kind created and started at once, one thread each (0 skips).
    #[arg(long, default_value_t = 20)]
    concurrent: usize,
}

#[derive(Args, Debug)]
pub struct DensityBench {
    /// Idle containers of each kind.
    #[arg(long, default_value_t = 20)]
    count: usize,
}

pub fn run(cmd: BenchCmd) -> Result<()> {
    match cmd {
        BenchCmd::Boot(b) => boot_vs_qemu::run(&b),
        BenchCmd::Run(b) => run_vs_runc::run(&b.runs, &b.podman_runs),
        BenchCmd::Restore(b) => restore(&b),
        BenchCmd::Pause(b) if b.container => pause_container::run(),
        BenchCmd::Pause(b) => pause(&b),
        BenchCmd::Start(b) => start_latency::run(&b),
        BenchCmd::Density(b) => density::run(&b),
    }
}

#[cfg(feature = "test-guest-benches")]
fn restore(b: &RestoreBench) -> Result<()> {
    snapshot_restore::run(b)
}

#[cfg(not(feature = "test-guest-benches"))]
fn restore(_: &RestoreBench) -> Result<()> {
    Err(without_test_guest("husk bench restore"))
}

#[cfg(feature = "test-guest-benches")]
fn pause(b: &PauseBench) -> Result<()> {
    page_out::run(b)
}

#[cfg(not(feature = "test-guest-benches"))]
fn pause(_: &PauseBench) -> Result<()> {
    Err(without_test_guest(
        "husk bench pause (on the host; --container is built in)",
    ))
}

/// The error of a host benchmark that runs the VMM's test guest, in a husk built without it.
#[cfg(not(feature = "test-guest-benches"))]
fn without_test_guest(bench: &str) -> anyhow::Error {
    anyhow::anyhow!(
        "{bench}: this husk was built without the benchmarks on the VMM's test guest; build them with `cargo build --release -p husk-runtime --features test-guest-benches`"
    )
}
