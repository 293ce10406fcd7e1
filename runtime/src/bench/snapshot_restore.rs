//! `husk bench restore`: snapshot restore to a running guest, against a cold boot of the same
//! guest measured in the same run, on the host's /dev/kvm.
//!
//! The guest is the VMM's hand-assembled counting guest ([`husk_vmm::testing::guests`]), booted with
//! `Boot::Raw`: vCPU 0 first fills `--fill` MiB of its RAM with a pattern (so the snapshot's
//! memory file holds that much data), then every vCPU counts in memory. One snapshot per vCPU
//! count is taken while it counts and restored `--runs` times; each time is measured from the
//! call to `Vm::restore` until the guest's counter has moved (its first instructions after the
//! restore, observed through guest memory; this includes starting the vCPU threads). The cold
//! boot runs the same image (no fill) from `Vm::new` until the guest's first store (its
//! "started" marker), observed the same way. Cold boots and restores alternate so that both see
//! the same machine conditions; one unmeasured warm-up of each comes first.
//!
//! Afterwards two clones of the first snapshot run side by side and the guest-RAM mappings'
//! Rss/Pss come from /proc/self/smaps: the memory file is mapped `MAP_PRIVATE`, so a clone
//! holds only the pages it wrote, and pages both clones read are shared through the page cache.

use std::ops::Range;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use husk_vmm::snapshot::{AfterSnapshot, RestoreOverrides, SnapshotPaths};
use husk_vmm::testing::guests::{
    self as testguest, Running, COUNTER, FILLED, FILL_QWORDS, FILL_START, STARTED,
};
use husk_vmm::Vm;

use super::raw_guest::{wait, MIB};
use super::stats::{ms, Percentiles};
use super::RestoreBench;

pub fn run(b: &RestoreBench) -> Result<()> {
    if b.runs == 0 || b.vcpus.is_empty() {
        bail!("--runs and --vcpus must not be empty");
    }
    let fill_end = FILL_START + u64::from(b.fill) * MIB;
    if fill_end > u64::from(b.memory) * MIB {
        bail!(
            "--fill {} MiB does not fit above {} MiB in {} MiB of guest memory",
            b.fill,
            FILL_START / MIB,
            b.memory
        );
    }
    let dir = super::setup::host_kvm_scratch("husk-bench-restore-", "snapshot")?;
    println!(
        "guest: raw long-mode counting guest, {} MiB RAM, vCPU 0 fills {} MiB with a pattern first",
        b.memory, b.fill
    );
    let mut first_median = None;
    let mut first_snapshot = None;
    for &vcpus in &b.vcpus {
        let snap = dir.path().join(format!("{vcpus}-vcpu"));
        let median = one_vcpu_count(&snap, vcpus, b)?;
        first_median.get_or_insert(median);
        first_snapshot.get_or_insert(snap);
    }
    let snap = first_snapshot.expect("at least one vCPU count");
    memory_sharing(&snap, b.fill)?;
    println!(
        "restore ms: {:.2}",
        first_median.expect("at least one vCPU count")
    );
    Ok(())
}

/// Snapshots the guest with `vcpus` vCPUs into `snap`, times its restores against cold boots
/// and prints them; returns the restores' p50.
fn one_vcpu_count(snap: &Path, vcpus: u8, b: &RestoreBench) -> Result<f64> {
    take_snapshot(snap, vcpus, b)?;
    let mut restores = Vec::with_capacity(b.runs);
    let mut restore_calls = Vec::with_capacity(b.runs);
    let mut colds = Vec::with_capacity(b.runs);
    // One unmeasured restore and cold boot first: the snapshot's writeback and the source
    // VM's teardown are still settling.
    restore_once(snap).context("warm-up restore")?;
    cold_once(vcpus, b.memory).context("warm-up cold boot")?;
    for i in 0..b.runs {
        let (call, running) =
            restore_once(snap).with_context(|| format!("restore #{i} ({vcpus} vCPU)"))?;
        restore_calls.push(call);
        restores.push(running);
        colds.push(
            cold_once(vcpus, b.memory).with_context(|| format!("cold boot #{i} ({vcpus} vCPU)"))?,
        );
    }
    let r = Percentiles::of(&restores);
    let call = Percentiles::of(&restore_calls);
    let c = Percentiles::of(&colds);
    println!(
        "{vcpus} vCPU / {} MiB restore -> guest running: {r} (Vm::restore alone: {call}; {} runs after a warm-up)",
        b.memory, b.runs
    );
    println!(
        "{vcpus} vCPU / {} MiB cold boot -> first guest store: {c}",
        b.memory
    );
    println!(
        "{vcpus} vCPU restore/cold-boot ratio (p50): {:.3}",
        r.p50 / c.p50
    );
    Ok(r.p50)
}

/// Boots the guest, lets vCPU 0 fill its memory, and snapshots it paused into `dir` while all
/// vCPUs count; prints what the snapshot holds and what the source VM's RAM costs.
fn take_snapshot(dir: &Path, vcpus: u8, b: &RestoreBench) -> Result<()> {
    let vm = Vm::new(config(vcpus, b.memory)).context("building the source VM")?;
    testguest::write_u64(vm.memory(), FILL_QWORDS, u64::from(b.fill) * MIB / 8);
    let started = Instant::now();
    let source = Running::start(vm);
    wait(&source, "the fill", |m| testguest::read_u32(m, FILLED) == 1)?;
    let filled = started.elapsed();
    let count = source.read(COUNTER);
    wait(&source, "counting", |m| {
        testguest::read_u32(m, COUNTER) > count + 1000
    })?;
    let t = Instant::now();
    source
        .control
        .snapshot(dir, AfterSnapshot::StayPaused)
        .context("taking the snapshot")?;
    let took = t.elapsed();
    let held = mapping_usage(&testguest::host_ranges(&source.mem))?;
    source.quit().map_err(anyhow::Error::msg)?;

    let paths = SnapshotPaths::in_dir(dir);
    let memory = std::fs::metadata(&paths.memory)?;
    let state = std::fs::metadata(&paths.state)?;
    println!(
        "{vcpus} vCPU snapshot: guest filled {} MiB in {:.2} s; snapshot written in {:.1} ms: memory file {} MiB ({} MiB data, the rest holes), state {:.1} KiB",
        b.fill,
        filled.as_secs_f64(),
        ms(took),
        memory.len() / MIB,
        memory.blocks() * 512 / MIB,
        state.len() as f64 / 1024.0
    );
    println!("{vcpus} vCPU source VM (anonymous RAM) held: {held}");
    Ok(())
}

fn config(vcpus: u8, memory_mib: u32) -> husk_vmm::VmConfig {
    let mut cfg = testguest::long_mode_config(testguest::counting_guest());
    cfg.vcpus = vcpus;
    cfg.memory_mib = memory_mib;
    cfg
}

/// One restore: (the `Vm::restore` call alone, restore until the guest's counter moved).
fn restore_once(snap: &Path) -> Result<(Duration, Duration)> {
    let start = Instant::now();
    let vm = Vm::restore(snap, RestoreOverrides::default())?;
    let call = start.elapsed();
    let count = testguest::read_u32(vm.memory(), COUNTER);
    let clone = Running::start(vm);
    wait(&clone, "the restored guest to count", |m| {
        testguest::read_u32(m, COUNTER) != count
    })?;
    let running = start.elapsed();
    clone.quit().map_err(anyhow::Error::msg)?;
    Ok((call, running))
}

/// One cold boot of the same guest (no fill) until its first store.
fn cold_once(vcpus: u8, memory_mib: u32) -> Result<Duration> {
    let start = Instant::now();
    let vm = Vm::new(config(vcpus, memory_mib))?;
    let cold = Running::start(vm);
    wait(&cold, "the guest's first store", |m| {
        testguest::read_u32(m, STARTED) == 1
    })?;
    let took = start.elapsed();
    cold.quit().map_err(anyhow::Error::msg)?;
    Ok(took)
}

/// Restores two clones of `snap`, prints their guest-RAM mappings right after the restore and
/// again after each has read the whole filled range.
fn memory_sharing(snap: &Path, fill_mib: u32) -> Result<()> {
    let before = rollup()?;
    let a = Running::start(Vm::restore(snap, RestoreOverrides::default())?);
    let count = a.read(COUNTER);
    wait(&a, "clone A to count", |m| {
        testguest::read_u32(m, COUNTER) != count
    })?;
    let after = rollup()?;
    let a_ranges = testguest::host_ranges(&a.mem);
    println!(
        "restored VM, guest running: guest-RAM mapping {}; whole process: Rss {:+} KiB, Pss {:+} KiB (smaps_rollup delta)",
        mapping_usage(&a_ranges)?,
        after.rss - before.rss,
        after.pss - before.pss
    );
    let b = Running::start(Vm::restore(snap, RestoreOverrides::default())?);
    let count = b.read(COUNTER);
    wait(&b, "clone B to count", |m| {
        testguest::read_u32(m, COUNTER) != count
    })?;
    let len = u64::from(fill_mib) * MIB;
    for (name, clone) in [("A", &a), ("B", &b)] {
        let found = testguest::read_pattern(&clone.mem, FILL_START, len);
        if found != len / 8 {
            bail!("clone {name} sees {found} of {} pattern qwords", len / 8);
        }
    }
    let b_ranges = testguest::host_ranges(&b.mem);
    println!(
        "two clones after each read all {fill_mib} MiB of the pattern: A {}; B {}",
        mapping_usage(&a_ranges)?,
        mapping_usage(&b_ranges)?
    );
    a.quit().map_err(anyhow::Error::msg)?;
    b.quit().map_err(anyhow::Error::msg)?;
    Ok(())
}

/// Memory of some mappings, from /proc/self/smaps, in KiB.
#[derive(Debug, Default, PartialEq)]
struct Usage {
    rss: u64,
    pss: u64,
    shared_clean: u64,
    private_clean: u64,
    private_dirty: u64,
}

impl std::fmt::Display for Usage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Rss {} KiB, Pss {} KiB (shared clean {} KiB, private clean {} KiB, private dirty {} KiB)",
            self.rss, self.pss, self.shared_clean, self.private_clean, self.private_dirty
        )
    }
}

/// What the mappings of this process that overlap `ranges` hold.
fn mapping_usage(ranges: &[Range<usize>]) -> Result<Usage> {
    let smaps = std::fs::read_to_string("/proc/self/smaps").context("reading /proc/self/smaps")?;
    Ok(usage_in(&smaps, ranges))
}

fn usage_in(smaps: &str, ranges: &[Range<usize>]) -> Usage {
    let mut usage = Usage::default();
    let mut inside = false;
    for line in smaps.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if let Some((start, end)) = first.split_once('-') {
            if let (Ok(start), Ok(end)) = (
                usize::from_str_radix(start, 16),
                usize::from_str_radix(end, 16),
            ) {
                inside = ranges.iter().any(|r| start < r.end && r.start < end);
                continue;
            }
        }
        if !inside {
            continue;
        }
        let field = match first {
            "Rss:" => &mut usage.rss,
            "Pss:" => &mut usage.pss,
            "Shared_Clean:" => &mut usage.shared_clean,
            "Private_Clean:" => &mut usage.private_clean,
            "Private_Dirty:" => &mut usage.private_dirty,
            _ => continue,
        };
        *field += kib(line);
    }
    usage
}

/// The whole process's Rss and Pss from /proc/self/smaps_rollup, in KiB.
struct Rollup {
    rss: i64,
    pss: i64,
}

fn rollup() -> Result<Rollup> {
    let text = std::fs::read_to_string("/proc/self/smaps_rollup")
        .context("reading /proc/self/smaps_rollup")?;
    let get = |name: &str| {
        text.lines()
            .find(|l| l.split_whitespace().next() == Some(name))
            .map(|l| kib(l) as i64)
            .unwrap_or(0)
    };
    Ok(Rollup {
        rss: get("Rss:"),
        pss: get("Pss:"),
    })
}

/// The number in a `Name:   123 kB` line.
fn kib(line: &str) -> u64 {
    line.split_whitespace()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smaps_usage_counts_only_overlapping_mappings() {
        let smaps = "\
7f0000000000-7f0000100000 rw-p 00000000 fd:01 12 /tmp/s/memory
Size:               1024 kB
Rss:                  64 kB
Pss:                  32 kB
Shared_Clean:         56 kB
Private_Clean:         0 kB
Private_Dirty:         8 kB
VmFlags: rd wr mr mw me ac
7f0000100000-7f0000200000 rw-p 00000000 00:00 0
Rss:                 512 kB
Pss:                 512 kB
Private_Dirty:       512 kB
";
        let mapped = 0x7f00_0000_0000..0x7f00_0010_0000;
        let u = usage_in(smaps, std::slice::from_ref(&mapped));
        assert_eq!(
            u,
            Usage {
                rss: 64,
                pss: 32,
                shared_clean: 56,
                private_clean: 0,
                private_dirty: 8
            }
        );
    }
}
