//! `husk bench …`: the benchmarks' arguments, handed to `bench`.

use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, Subcommand};

use crate::bench::{
    self, BootBench, DensityBench, PauseBench, RestoreBench, RunBench, SoakBench, StartBench,
    TripleFaultBench,
};

#[derive(Subcommand, Debug)]
pub enum BenchCmd {
    /// Process start → agent ready, Husk against QEMU microvm booting the same kernel+initramfs.
    Boot(BootBenchArgs),
    /// `husk run` against `runc run` of the same busybox bundle, and `podman run` with each.
    Run(RunBenchArgs),
    /// Snapshot restore to a running guest against a cold boot of the same raw test guest.
    Restore(RestoreBenchArgs),
    /// Pause with page-out (compressed page file, RAM released) and lazy or eager resume.
    Pause(PauseBenchArgs),
    /// `create`+`start` until the process runs: template clone, cold boot, runc; p50/p99.
    Start(StartBenchArgs),
    /// Memory of idle containers: the monitors' PSS and host memory, template clones vs cold.
    Density(DensityBenchArgs),
    /// Checked create/start/exec/pause/checkpoint/kill/delete cycles with leak checks; exits
    /// non-zero on any failure or leak.
    Soak(SoakBenchArgs),
    /// How often a booting guest triple-faults under Husk and under QEMU microvm booting the
    /// same kernel+initramfs side by side (in the lab: whose failure a triple fault is).
    TripleFaults(TripleFaultBenchArgs),
}

#[derive(Args, Debug)]
pub struct RunBenchArgs {
    /// `run`s of each runtime.
    #[arg(long, default_value_t = 20)]
    pub runs: usize,
    /// `podman run --rm`s with each runtime (0 skips podman).
    #[arg(long, default_value_t = 10)]
    pub podman_runs: usize,
}

#[derive(Args, Debug)]
pub struct BootBenchArgs {
    /// Boots of each kind.
    #[arg(long, default_value_t = 10)]
    pub runs: usize,
    /// Guest memory in MiB for both VMMs.
    #[arg(long, default_value_t = 256)]
    pub memory: u32,
    /// The reference VMM.
    #[arg(long, default_value = "qemu-system-x86_64")]
    pub qemu: PathBuf,
    /// Skip the memory scrub before each boot (see [`scrub_freed_memory`]).
    #[arg(long)]
    pub no_scrub: bool,
}

#[derive(Args, Debug)]
pub struct RestoreBenchArgs {
    /// Restores (and cold boots) for each vCPU count.
    #[arg(long, default_value_t = 20)]
    pub runs: usize,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 256)]
    pub memory: u32,
    /// MiB of guest memory the guest fills with a pattern before the snapshot.
    #[arg(long, default_value_t = 64)]
    pub fill: u32,
    /// vCPU counts to measure, comma-separated; the first one's median is the last line.
    #[arg(long, value_delimiter = ',', default_value = "1,2")]
    pub vcpus: Vec<u8>,
}

#[derive(Args, Debug)]
pub struct PauseBenchArgs {
    /// MiB the guest dirties before the pauses, comma-separated; the last one's figures are
    /// the last two lines.
    #[arg(long, value_delimiter = ',', default_value = "64,256")]
    pub fill: Vec<u32>,
    /// Lazy resumes per fill size.
    #[arg(long, default_value_t = 9)]
    pub runs: usize,
    /// Instead (in the lab): a busybox container's monitor memory running, paused, resumed.
    #[arg(long)]
    pub container: bool,
}

#[derive(Args, Debug)]
pub struct StartBenchArgs {
    /// create+start runs of each kind, one after another (the ratio lines use their p50s).
    #[arg(long, default_value_t = 50)]
    pub sequential: usize,
    /// Containers of each kind created and started at once, one thread each (0 skips).
    #[arg(long, default_value_t = 20)]
    pub concurrent: usize,
}

#[derive(Args, Debug)]
pub struct DensityBenchArgs {
    /// Idle containers of each kind.
    #[arg(long, default_value_t = 20)]
    pub count: usize,
}

#[derive(Args, Debug)]
pub struct SoakBenchArgs {
    /// Container lifecycles in all.
    #[arg(long, default_value_t = 500)]
    pub cycles: usize,
    /// Cycles running at once (one thread each); leaks are checked after each such batch.
    #[arg(long, default_value_t = 4)]
    pub parallel: usize,
}

#[derive(Args, Debug)]
pub struct TripleFaultBenchArgs {
    /// Boots of each VMM.
    #[arg(long, default_value_t = 200)]
    pub boots: usize,
    /// Boots running at once (one thread each, alternating the two VMMs).
    #[arg(long, default_value_t = 2)]
    pub parallel: usize,
    /// vCPUs of each guest.
    #[arg(long, default_value_t = 1)]
    pub vcpus: u8,
    /// Guest memory in MiB for both VMMs.
    #[arg(long, default_value_t = 256)]
    pub memory: u32,
    /// The reference VMM.
    #[arg(long, default_value = "qemu-system-x86_64")]
    pub qemu: PathBuf,
}

/// `husk bench …`: its exit code (the benchmarks that only measure fail only when they
/// cannot; the soak also when it finds a failure or a leak).
pub fn run(cmd: BenchCmd) -> Result<i32> {
    let measured = match cmd {
        BenchCmd::Boot(b) => bench::boot(&BootBench {
            runs: b.runs,
            memory: b.memory,
            qemu: b.qemu,
            no_scrub: b.no_scrub,
        }),
        BenchCmd::Run(b) => bench::run(&RunBench {
            runs: b.runs,
            podman_runs: b.podman_runs,
        }),
        BenchCmd::Restore(b) => bench::restore(&RestoreBench {
            runs: b.runs,
            memory: b.memory,
            fill: b.fill,
            vcpus: b.vcpus,
        }),
        BenchCmd::Pause(b) if b.container => bench::pause_container(),
        BenchCmd::Pause(b) => bench::pause(&PauseBench {
            fill: b.fill,
            runs: b.runs,
        }),
        BenchCmd::Start(b) => bench::start(&StartBench {
            sequential: b.sequential,
            concurrent: b.concurrent,
        }),
        BenchCmd::TripleFaults(b) => bench::triple_faults(&TripleFaultBench {
            boots: b.boots,
            parallel: b.parallel,
            vcpus: b.vcpus,
            memory: b.memory,
            qemu: b.qemu,
        }),
        BenchCmd::Density(b) => bench::density(&DensityBench { count: b.count }),
        BenchCmd::Soak(b) => {
            let clean = bench::soak(&SoakBench {
                cycles: b.cycles,
                parallel: b.parallel,
            })?;
            return Ok(if clean { 0 } else { 1 });
        }
    };
    measured.map(|()| 0)
}
