//! `husk bench pause`: paging a paused guest's memory out and back in, on the host's /dev/kvm.
//!
//! The guest is the VMM's marked counting guest ([`husk_vmm::testing::guests`]): vCPU 0 fills
//! `--fill` MiB of its RAM with a pattern (each page stamped with its own address), then it
//! counts in memory. For each fill size and each codec: pause + page-out latency (until the
//! page file is durable and the RAM released), compression ratio and throughput, this
//! process's Rss before and after (/proc/self/smaps_rollup: the benchmark process is the VM's
//! monitor here), and the time an eager page-in takes to bring every page back. Then
//! `--runs` lazy resumes with the default codec, each timed from the `page_in` call until the
//! guest's counter moved (its first instructions after the resume, observed through guest
//! memory, which faults through the pager too) and until the guest has read every filled page
//! again (each of those reads faults its page back in). Beside each, the same guest unpaused,
//! all of it in RAM, reads the same pages, timed from the request: the ratio of the two is what
//! lazy page-in costs a guest that needs its whole working set. Last, both codecs on 64 KiB
//! blocks of two inputs, the guest's pages and this executable's bytes (code and data, closer
//! to a real guest's page cache than the fill pattern): compression throughput, ratio and the
//! decompression time per block, which is what a lazily resumed guest waits for per fault.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use husk_vmm::pagefile::{Codec, PageFile};
use husk_vmm::testing::guests::{
    self as testguest, Running, COUNTER, FILLED, FILL_QWORDS, FILL_START, TOUCHED, TOUCH_REQUEST,
};
use husk_vmm::{PageInMode, Vm};

use super::raw_guest::{wait, MIB};
use super::stats::{ms, Percentiles};
use super::PauseBench;

/// Both codecs, the default last.
const CODECS: [Codec; 2] = [Codec::Zstd, Codec::Lz4];

pub fn run(b: &PauseBench) -> Result<()> {
    if b.runs == 0 || b.fill.is_empty() {
        bail!("--runs and --fill must not be empty");
    }
    let dir = super::setup::host_kvm_scratch("husk-bench-pause-", "page file")?;
    println!(
        "guest: raw long-mode counting guest, 1 vCPU, RAM = fill + {} MiB, page files in {}",
        FILL_START / MIB + 16,
        dir.path().display()
    );
    let mut last = None;
    for &fill in &b.fill {
        last = Some(one_size(dir.path(), fill, b.runs).with_context(|| format!("{fill} MiB"))?);
    }
    codec_blocks(dir.path())?;
    let (lazy, released) = last.expect("at least one fill size");
    println!("lazy resume ms: {lazy:.2}");
    println!("rss released: {released:.1}%");
    Ok(())
}

/// Boots the guest with `fill` MiB dirtied and measures it; returns (lazy resume median ms,
/// percentage of Rss released with the default codec).
fn one_size(dir: &Path, fill: u32, runs: usize) -> Result<(f64, f64)> {
    let vm = boot(fill)?;
    let mut released = 0.0;
    for codec in CODECS {
        released = page_out_in(&vm, dir, fill, codec)?;
    }
    let mut runs_of = LazyRuns::default();
    for i in 0..runs {
        let r = lazy_resume(&vm, dir).with_context(|| format!("lazy resume #{i}"))?;
        runs_of.push(
            r,
            resident_touch(&vm).with_context(|| format!("unpaused touch #{i}"))?,
        );
    }
    testguest::check_marked_fill(&vm.mem, u64::from(fill) * MIB).map_err(anyhow::Error::msg)?;
    let p = runs_of.print(fill);
    vm.quit().map_err(anyhow::Error::msg)?;
    Ok((p, released))
}

/// One lazy resume, each figure from the `page_in` call.
struct LazyResume {
    /// The `page_in` call alone.
    call: Duration,
    /// Until the guest's counter moved.
    first: Duration,
    /// Until the guest had read every filled page.
    touched: Duration,
}

/// The lazy resumes of one fill size, and the unpaused touches beside them.
#[derive(Default)]
struct LazyRuns {
    calls: Vec<Duration>,
    first: Vec<Duration>,
    touched: Vec<Duration>,
    resident: Vec<Duration>,
}

impl LazyRuns {
    fn push(&mut self, r: LazyResume, resident: Duration) {
        self.calls.push(r.call);
        self.first.push(r.first);
        self.touched.push(r.touched);
        self.resident.push(resident);
    }

    /// Prints the figures; returns the p50 until the guest counted.
    fn print(&self, fill: u32) -> f64 {
        let first = Percentiles::of(&self.first);
        let touched = Percentiles::of(&self.touched);
        let resident = Percentiles::of(&self.resident);
        let runs = self.first.len();
        println!(
            "{fill} MiB: lazy page-in + resume -> guest counting: {first} (page_in call alone: {}; {runs} runs; every byte checked afterwards)",
            Percentiles::of(&self.calls)
        );
        println!(
            "{fill} MiB: lazy page-in + resume -> guest has read all {fill} MiB again: {touched}; unpaused guest reading the same {fill} MiB: {resident}; ratio (p50) {:.2}",
            touched.p50 / resident.p50
        );
        first.p50
    }
}

fn boot(fill: u32) -> Result<Running> {
    let mut cfg = testguest::long_mode_config(testguest::marked_counting_guest());
    cfg.memory_mib = (FILL_START / MIB) as u32 + fill + 16;
    let vm = Vm::new(cfg).context("building the VM")?;
    testguest::write_u64(vm.memory(), FILL_QWORDS, u64::from(fill) * MIB / 8);
    let started = Instant::now();
    let vm = Running::start(vm);
    wait(&vm, "the fill", |m| testguest::read_u32(m, FILLED) == 1)?;
    println!(
        "{fill} MiB: guest dirtied {fill} MiB in {:.2} s",
        started.elapsed().as_secs_f64()
    );
    let n = vm.read(COUNTER);
    wait(&vm, "counting", |m| {
        testguest::read_u32(m, COUNTER) > n + 1000
    })?;
    Ok(vm)
}

/// Pause + page-out with `codec`, then an eager page-in and resume; prints the figures and
/// returns the percentage of the process's Rss the page-out released.
fn page_out_in(vm: &Running, dir: &Path, fill: u32, codec: Codec) -> Result<f64> {
    let path = dir.join(format!("{fill}-{}", codec.name()));
    let before = rss_kib()?;
    let t = Instant::now();
    vm.control.pause()?;
    let paused = t.elapsed();
    let r = vm.control.page_out_with(&path, None, codec)?;
    let total = t.elapsed();
    let after = rss_kib()?;
    let released = (before - after) as f64 * 100.0 / before as f64;
    let raw_mib = r.raw_bytes as f64 / MIB as f64;
    println!(
        "{fill} MiB {}: pause + page-out {:.1} ms (vCPUs stopped {:.2} ms, file written and durable {:.1} ms, RAM released {:.1} ms); {} pages stored, {raw_mib:.1} MiB -> {:.1} KiB (ratio {:.0}:1, {:.0} MiB/s)",
        codec.name(),
        ms(total),
        ms(paused),
        ms(r.write_time),
        ms(r.release_time),
        r.pages_stored,
        r.file_bytes as f64 / 1024.0,
        r.raw_bytes as f64 / r.file_bytes as f64,
        raw_mib / r.write_time.as_secs_f64(),
    );
    println!(
        "{fill} MiB {}: process Rss {before} KiB -> {after} KiB ({released:.1}% released)",
        codec.name()
    );
    let t = Instant::now();
    vm.control.page_in(&path, PageInMode::Eager)?;
    println!(
        "{fill} MiB {}: eager page-in, every page back: {:.1} ms; Rss then {} KiB",
        codec.name(),
        ms(t.elapsed()),
        rss_kib()?
    );
    resume_and_count(vm)?;
    Ok(released)
}

/// One pause, page-out (default codec) and lazy resume, the guest asked before the resume to
/// read its fill again.
fn lazy_resume(vm: &Running, dir: &Path) -> Result<LazyResume> {
    let path = dir.join("lazy");
    vm.control.pause()?;
    let at = vm.read(COUNTER);
    let request = vm.read(TOUCHED) + 1;
    vm.control.page_out(&path, None)?;
    let t = Instant::now();
    let call = vm.control.page_in(&path, PageInMode::Lazy)?.took;
    // Its page faults in through the pager as the guest's first store would.
    vm.write(TOUCH_REQUEST, request);
    vm.control.resume();
    wait(vm, "the resumed guest to count", |m| {
        testguest::read_u32(m, COUNTER) != at
    })?;
    let first = t.elapsed();
    wait(vm, "the resumed guest to read its fill", |m| {
        testguest::read_u32(m, TOUCHED) == request
    })?;
    Ok(LazyResume {
        call,
        first,
        touched: t.elapsed(),
    })
}

/// The time the running guest, its memory all resident, takes to read its fill once.
fn resident_touch(vm: &Running) -> Result<Duration> {
    let request = vm.read(TOUCHED) + 1;
    let t = Instant::now();
    vm.write(TOUCH_REQUEST, request);
    wait(vm, "the guest to read its fill", |m| {
        testguest::read_u32(m, TOUCHED) == request
    })?;
    Ok(t.elapsed())
}

fn resume_and_count(vm: &Running) -> Result<()> {
    let at = vm.read(COUNTER);
    vm.control.resume();
    wait(vm, "the guest to count", |m| {
        testguest::read_u32(m, COUNTER) > at + 1000
    })
}

/// Both codecs on 64 KiB blocks of the guest's page file contents and of this executable.
fn codec_blocks(dir: &Path) -> Result<()> {
    let exe = std::fs::read("/proc/self/exe").context("reading /proc/self/exe")?;
    let guest = guest_sample(&dir.join("lazy"))?;
    for (name, data) in [("guest pages", &guest), ("husk executable", &exe)] {
        for codec in CODECS {
            let m = measure_codec(codec, data)?;
            println!(
                "codec {} on {name} ({:.1} MiB in 64 KiB blocks): ratio {:.2}:1, compress {:.0} MiB/s, decompress {:.1} us per block ({:.0} MiB/s)",
                codec.name(),
                data.len() as f64 / MIB as f64,
                m.ratio,
                m.compress_mib_s,
                m.decompress_us,
                64.0 / 1024.0 / (m.decompress_us / 1e6),
            );
        }
    }
    Ok(())
}

/// Up to 16 MiB of decompressed guest pages from the last page file.
fn guest_sample(path: &Path) -> Result<Vec<u8>> {
    let file = PageFile::open(path)?;
    let (mut comp, mut raw, mut out) = (Vec::new(), Vec::new(), Vec::new());
    for b in &file.index().blocks {
        file.read_block(b, &mut comp, &mut raw)?;
        out.extend_from_slice(&raw);
        if out.len() >= 16 << 20 {
            break;
        }
    }
    Ok(out)
}

struct CodecFigures {
    ratio: f64,
    compress_mib_s: f64,
    decompress_us: f64,
}

fn measure_codec(codec: Codec, data: &[u8]) -> Result<CodecFigures> {
    let blocks: Vec<&[u8]> = data.chunks(64 << 10).collect();
    let t = Instant::now();
    let mut compressed = Vec::with_capacity(blocks.len());
    for block in &blocks {
        let mut out = Vec::new();
        codec
            .compress(block, &mut out)
            .map_err(anyhow::Error::msg)?;
        compressed.push(out);
    }
    let compress = t.elapsed();
    let mut buf = vec![0u8; 64 << 10];
    let t = Instant::now();
    for (block, comp) in blocks.iter().zip(&compressed) {
        codec
            .decompress(comp, &mut buf[..block.len()])
            .map_err(anyhow::Error::msg)?;
    }
    let decompress = t.elapsed();
    let packed: usize = compressed.iter().map(Vec::len).sum();
    Ok(CodecFigures {
        ratio: data.len() as f64 / packed as f64,
        compress_mib_s: data.len() as f64 / MIB as f64 / compress.as_secs_f64(),
        decompress_us: decompress.as_secs_f64() * 1e6 / blocks.len() as f64,
    })
}

/// This process's Rss in KiB, from /proc/self/smaps_rollup.
fn rss_kib() -> Result<i64> {
    let text = std::fs::read_to_string("/proc/self/smaps_rollup")
        .context("reading /proc/self/smaps_rollup")?;
    text.lines()
        .find(|l| l.starts_with("Rss:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|n| n.parse().ok())
        .context("no Rss line in /proc/self/smaps_rollup")
}
