//! `husk bench …`: benchmarks that measure Husk next to a reference in the same run and print
//! ratios (absolute times differ too much between the host and the nested lab to mean anything).
//!
//! This module holds each benchmark's parameters and entry point; each benchmark has a file
//! of its own, and what they share is in `stats` (figures), `timing` (timed commands),
//! `setup` (the installed husk, the bundle, scratch directories) and `fleet` (containers of
//! one runtime driven through its command line); `leaks` is the soak's leak census. Nothing
//! outside `bench` uses it.

use std::path::PathBuf;

use anyhow::Result;

mod boot_vs_qemu;
mod density;
mod fleet;
mod leaks;
#[cfg(feature = "test-guest-benches")]
mod paged_pause;
mod pause_container;
#[cfg(feature = "test-guest-benches")]
mod raw_guest;
mod run_vs_runc;
mod setup;
#[cfg(feature = "test-guest-benches")]
mod snapshot_restore;
mod soak;
mod start_latency;
mod stats;
mod timing;
mod triple_faults;

/// `husk bench run`.
pub struct RunBench {
    /// `run`s of each runtime.
    pub runs: usize,
    /// `podman run --rm`s with each runtime (0 skips podman).
    pub podman_runs: usize,
}

/// `husk bench boot`.
pub struct BootBench {
    /// Boots of each kind.
    pub runs: usize,
    /// Guest memory in MiB for both VMMs.
    pub memory: u32,
    /// The reference VMM.
    pub qemu: PathBuf,
    /// Skip the memory scrub before each boot (see `boot_vs_qemu::scrub_freed_memory`).
    pub no_scrub: bool,
}

/// `husk bench restore`.
pub struct RestoreBench {
    /// Restores (and cold boots) for each vCPU count.
    pub runs: usize,
    /// Guest memory in MiB.
    pub memory: u32,
    /// MiB of guest memory the guest fills with a pattern before the snapshot.
    pub fill: u32,
    /// vCPU counts to measure; the first one's median is the last line.
    pub vcpus: Vec<u8>,
}

/// `husk bench pause` on the host.
pub struct PauseBench {
    /// MiB the guest dirties before the pauses; the last one's figures are the last two lines.
    pub fill: Vec<u32>,
    /// Lazy resumes per fill size.
    pub runs: usize,
}

/// `husk bench start`.
pub struct StartBench {
    /// create+start runs of each kind, one after another (the ratio lines use their p50s).
    pub sequential: usize,
    /// Containers of each kind created and started at once, one thread each (0 skips).
    pub concurrent: usize,
}

/// `husk bench density`.
pub struct DensityBench {
    /// Idle containers of each kind.
    pub count: usize,
}

/// `husk bench triple-faults`.
pub struct TripleFaultBench {
    /// Boots of each VMM.
    pub boots: usize,
    /// Boots running at once (one thread each, alternating the two VMMs).
    pub parallel: usize,
    /// vCPUs of each guest.
    pub vcpus: u8,
    /// Guest memory in MiB.
    pub memory: u32,
    /// The reference VMM.
    pub qemu: PathBuf,
}

/// `husk bench soak`.
pub struct SoakBench {
    /// Container lifecycles in all.
    pub cycles: usize,
    /// Cycles running at once (one thread each); leaks are checked after each such batch.
    pub parallel: usize,
}

/// Process start → agent ready, Husk against QEMU microvm booting the same kernel+initramfs.
pub fn boot(b: &BootBench) -> Result<()> {
    boot_vs_qemu::run(b)
}

/// `husk run` against `runc run` of the same busybox bundle, and `podman run` with each.
pub fn run(b: &RunBench) -> Result<()> {
    run_vs_runc::run(b)
}

/// A busybox container's monitor memory running, paused, resumed (in the lab).
pub fn pause_container() -> Result<()> {
    pause_container::run()
}

/// `create`+`start` until the process runs: template clone, cold boot, runc; p50/p99.
pub fn start(b: &StartBench) -> Result<()> {
    start_latency::run(b)
}

/// Memory of idle containers: the monitors' PSS and host memory, template clones vs cold.
pub fn density(b: &DensityBench) -> Result<()> {
    density::run(b)
}

/// Checked create/start/exec/pause/checkpoint/kill/delete cycles with leak checks (in the
/// lab); whether it found no failure and no leak.
pub fn soak(b: &SoakBench) -> Result<bool> {
    soak::run(b)
}

/// How often a booting guest triple-faults under Husk and under QEMU microvm, side by side.
pub fn triple_faults(b: &TripleFaultBench) -> Result<()> {
    triple_faults::run(b)
}

/// Snapshot restore to a running guest against a cold boot of the same raw test guest.
#[cfg(feature = "test-guest-benches")]
pub fn restore(b: &RestoreBench) -> Result<()> {
    snapshot_restore::run(b)
}

#[cfg(not(feature = "test-guest-benches"))]
pub fn restore(_: &RestoreBench) -> Result<()> {
    Err(without_test_guest("bench restore"))
}

/// Pause with page-out (compressed page file, RAM released) and lazy or eager resume.
#[cfg(feature = "test-guest-benches")]
pub fn pause(b: &PauseBench) -> Result<()> {
    paged_pause::run(b)
}

#[cfg(not(feature = "test-guest-benches"))]
pub fn pause(_: &PauseBench) -> Result<()> {
    Err(without_test_guest("bench pause (without --container)"))
}

/// The error of a host benchmark that runs the VMM's test guest, in a husk built without it.
#[cfg(not(feature = "test-guest-benches"))]
fn without_test_guest(bench: &str) -> anyhow::Error {
    anyhow::anyhow!(
        "{bench} runs the VMM's test guest, which this husk was built without; build it with `cargo build --release -p husk-runtime --features test-guest-benches`"
    )
}
