//! `husk bench start`: `create` + `start` of the busybox bundle running `sleep 600`, until its
//! process runs, for three kinds in one run: Husk cloning the VM from the default template,
//! Husk cold-booting it (`HUSK_NO_TEMPLATE=1` on every husk command), and runc.
//!
//! One sample is the time from spawning `create --bundle B --pid-file P ID` until `start ID`
//! has returned (Husk's `start` returns once the agent has started the process). Teardown
//! (`kill ID KILL`, wait for `stopped`, `delete ID`) is not timed. The sequential runs cycle
//! through the kinds so that all three see the same machine conditions; the concurrent batches
//! (all containers of one kind created and started at once, one thread each) run one kind after
//! another. One unmeasured warm-up per kind comes first: it builds the default template if
//! there is none and brings the binaries and the bundle into the page cache.

use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Result};

use super::fleet::{work_dir, Fleet, Runtime};
use super::stats::{ms, Percentiles};
use super::StartBench;

pub fn run(b: &StartBench) -> Result<()> {
    if b.sequential == 0 {
        bail!("--sequential must be at least 1: the ratio lines compare its p50s");
    }
    let (work, bundle) = work_dir("husk-bench-start-")?;
    let kinds = [
        Runtime::husk(work.path(), true)?,
        Runtime::husk(work.path(), false)?,
        Runtime::runc(work.path())?,
    ];
    warm_up(&kinds, &bundle)?;
    let seq = sequential(&kinds, &bundle, b.sequential)?;
    let conc = concurrent(&kinds, &bundle, b.concurrent)?;
    let seq = report(
        &format!("sequential, {} of each", b.sequential),
        &kinds,
        &seq,
    );
    if b.concurrent > 0 {
        report(
            &format!("concurrent, {} at once", b.concurrent),
            &kinds,
            &conc,
        );
    }
    println!("ratios of the sequential p50s:");
    println!("template/cold start ratio: {:.3}", seq[0].p50 / seq[1].p50);
    println!("template/runc start ratio: {:.3}", seq[0].p50 / seq[2].p50);
    Ok(())
}

/// One unmeasured create+start+teardown per kind.
fn warm_up(kinds: &[Runtime], bundle: &Path) -> Result<()> {
    for rt in kinds {
        // The template kind's first create builds the default template if there is none.
        eprintln!("warm-up: {}", rt.name);
        let mut fleet = Fleet::new(rt);
        fleet.launch(bundle, "warm-up")?;
        fleet.teardown()?;
    }
    Ok(())
}

/// `n` rounds, each one create+start (then teardown) of every kind in turn.
fn sequential(kinds: &[Runtime], bundle: &Path, n: usize) -> Result<Vec<Vec<Duration>>> {
    let mut times = vec![Vec::with_capacity(n); kinds.len()];
    for i in 0..n {
        let mut line = format!("sequential {i}:");
        for (rt, t) in kinds.iter().zip(&mut times) {
            let mut fleet = Fleet::new(rt);
            t.push(fleet.launch(bundle, &format!("seq-{i}"))?);
            fleet.teardown()?;
            line += &format!(" {} {:.1} ms", rt.name, ms(t[i]));
        }
        eprintln!("{line}");
    }
    Ok(times)
}

/// For each kind, `n` containers created and started at once, then all torn down.
fn concurrent(kinds: &[Runtime], bundle: &Path, n: usize) -> Result<Vec<Vec<Duration>>> {
    if n == 0 {
        return Ok(Vec::new());
    }
    let ids: Vec<String> = (0..n).map(|i| format!("conc-{i}")).collect();
    let mut times = Vec::new();
    for rt in kinds {
        let mut fleet = Fleet::new(rt);
        let t = fleet.launch_all(bundle, &ids)?;
        fleet.teardown()?;
        let slowest = t.iter().max().copied().unwrap_or_default();
        eprintln!(
            "concurrent: {} x{n}, slowest {:.1} ms",
            rt.name,
            ms(slowest)
        );
        times.push(t);
    }
    Ok(times)
}

/// Prints p50/p99 of each kind under `title`; returns them in the order of `kinds`.
fn report(title: &str, kinds: &[Runtime], times: &[Vec<Duration>]) -> Vec<Percentiles> {
    println!("{title} (create+start until the process runs):");
    kinds
        .iter()
        .zip(times)
        .map(|(rt, t)| {
            let p = Percentiles::of(t);
            println!("  {:<14} {p}", rt.name);
            p
        })
        .collect()
}
