//! `husk bench density`: what idle containers cost in memory, template clones against cold
//! boots, in one run.
//!
//! For each kind, `--count` containers of the busybox bundle running `sleep 600` are created
//! and started one after another; once all report `running` they idle for [`SETTLE`] (late
//! guest work such as the agent's first allocations lands before the reading). Then:
//! - PSS: the sum of `Pss` in /proc/PID/smaps_rollup over their monitors (the pid from
//!   `--pid-file`). PSS splits a shared page among the processes mapping it, so clones sharing
//!   the template's memory file through the page cache pay only their share of it.
//! - host memory: the drop of `MemAvailable` in /proc/meminfo from before the first create to
//!   the reading, divided by the count. It sees the memory the kernel cannot reclaim: the
//!   guests' written (anonymous) pages and the monitors' heaps, and what PSS does not (page
//!   tables, KVM's own memory, other kernel allocations). It does not see the page cache that
//!   holds the template's memory file: the kernel counts clean page cache as available (and the
//!   warm-up has read in what a clone touches of it before the first reading). The clones' PSS
//!   does hold their shares of it.
//!
//! An unmeasured warm-up clone comes first, so the template (built on first use) and its memory
//! file are in place before the first `MemAvailable` reading.

use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use super::fleet::{work_dir, Fleet, Runtime};
use super::stats::kib_field;
use super::DensityBench;

/// How long the containers idle after all of them run, before memory is read.
const SETTLE: Duration = Duration::from_secs(3);
/// How long a started container may take to be reported running.
const RUNNING_TIMEOUT: Duration = Duration::from_secs(60);

pub fn run(b: &DensityBench) -> Result<()> {
    if b.count == 0 {
        bail!("--count must be at least 1");
    }
    let (work, bundle) = work_dir("husk-bench-density-")?;
    let clones = Runtime::husk(work.path(), true)?;
    let cold = Runtime::husk(work.path(), false)?;
    eprintln!("warm-up: one template clone (builds the default template if there is none)");
    let mut warm = Fleet::new(&clones);
    warm.launch(&bundle, "warm-up")?;
    warm.teardown()?;
    let c = measure("template clones", &clones, &bundle, b.count)?;
    let k = measure("cold boots", &cold, &bundle, b.count)?;
    println!(
        "clones/cold pss ratio: {:.3}",
        c.pss_kib as f64 / k.pss_kib as f64
    );
    Ok(())
}

/// Memory of `count` idle containers of one kind.
struct Footprint {
    count: usize,
    /// Summed PSS of the monitors, KiB.
    pss_kib: u64,
    /// MemAvailable before minus after, KiB (negative if something else freed memory).
    available_drop_kib: i64,
}

impl std::fmt::Display for Footprint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mib = |kib: f64| kib / 1024.0;
        let n = self.count as f64;
        write!(
            f,
            "{} containers: monitors' PSS {:.1} MiB in all, {:.1} MiB each; host memory used {:.1} MiB per container (MemAvailable drop)",
            self.count,
            mib(self.pss_kib as f64),
            mib(self.pss_kib as f64 / n),
            mib(self.available_drop_kib as f64 / n),
        )
    }
}

/// Starts `count` idle containers, lets them settle, reads their memory and prints it under
/// `label` (before the teardown, so that a failed teardown does not lose it), tears them down.
fn measure(label: &str, rt: &Runtime, bundle: &Path, count: usize) -> Result<Footprint> {
    let before = mem_available_kib()?;
    let mut fleet = Fleet::new(rt);
    for i in 0..count {
        fleet.launch(bundle, &format!("idle-{i}"))?;
        eprintln!("{}: {} of {count} started", rt.name, i + 1);
    }
    for id in fleet.ids() {
        rt.wait_for(id, "running", RUNNING_TIMEOUT)?;
    }
    std::thread::sleep(SETTLE);
    let mut pss_kib = 0;
    for id in fleet.ids() {
        pss_kib += process_pss_kib(rt.pid(id)?)?;
    }
    let after = mem_available_kib()?;
    let footprint = Footprint {
        count,
        pss_kib,
        available_drop_kib: before as i64 - after as i64,
    };
    println!("{:<16} {footprint}", format!("{label}:"));
    fleet.teardown()?;
    Ok(footprint)
}

fn process_pss_kib(pid: i32) -> Result<u64> {
    let path = format!("/proc/{pid}/smaps_rollup");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    kib_field(&text, "Pss:").with_context(|| format!("no Pss line in {path}"))
}

fn mem_available_kib() -> Result<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").context("reading /proc/meminfo")?;
    kib_field(&text, "MemAvailable:").context("no MemAvailable line in /proc/meminfo")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn footprint_is_shown_per_container_in_mib() {
        let f = Footprint {
            count: 2,
            pss_kib: 4096,
            available_drop_kib: 10240,
        };
        assert_eq!(
            f.to_string(),
            "2 containers: monitors' PSS 4.0 MiB in all, 2.0 MiB each; host memory used 5.0 MiB per container (MemAvailable drop)"
        );
    }
}
