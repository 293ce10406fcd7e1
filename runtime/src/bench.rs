//! `husk bench …`: benchmarks that measure Husk next to a reference in the same run and print
//! ratios (absolute times differ too much between the host and the nested lab to mean anything).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};

use crate::assets;

#[derive(Subcommand, Debug)]
pub enum BenchCmd {
    /// Process start → agent ready, Husk against QEMU microvm booting the same kernel+initramfs.
    Boot(BootBench),
    /// `husk run` against `runc run` of the same busybox bundle, and `podman run` with each.
    Run(RunBench),
    /// Snapshot restore to a running guest against a cold boot of the same raw test guest.
    Restore(crate::bench_restore::RestoreBench),
    /// Pause with page-out (compressed page file, RAM released) and lazy or eager resume.
    Pause(crate::bench_pause::PauseBench),
    /// `create`+`start` until the process runs: template clone, cold boot, runc; p50/p99.
    Start(crate::bench_start::StartBench),
    /// Memory of idle containers: the monitors' PSS and host memory, template clones vs cold.
    Density(crate::bench_density::DensityBench),
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

/// The line the agent writes on the serial console once it listens (QEMU's ready marker).
const AGENT_READY_MARKER: &str = "husk-agent: ready";
const BOOT_TIMEOUT: Duration = Duration::from_secs(180);

pub fn run(cmd: BenchCmd) -> Result<()> {
    match cmd {
        BenchCmd::Boot(b) => boot(&b),
        BenchCmd::Run(b) => crate::bench_run::run(&b.runs, &b.podman_runs),
        BenchCmd::Restore(b) => crate::bench_restore::run(&b),
        BenchCmd::Pause(b) => crate::bench_pause::run(&b),
        BenchCmd::Start(b) => crate::bench_start::run(&b),
        BenchCmd::Density(b) => crate::bench_density::run(&b),
    }
}

fn boot(b: &BootBench) -> Result<()> {
    let work = tempfile::Builder::new()
        .prefix("husk-bench-boot-")
        .tempdir()?;
    // QEMU boots the same installed copies of the kernel and initramfs.
    let Installed {
        husk: exe,
        kernel,
        initramfs,
    } = installed_husk(work.path())?;
    let vsock = Path::new("/dev/vhost-vsock").exists();
    if vsock {
        eprintln!("qemu microvm: serial and vhost-vsock, the devices Husk's guest has");
    } else {
        // Husk's guest probes a vsock device that QEMU's lacks (about 15 ms in the lab).
        eprintln!("qemu microvm: serial only (no /dev/vhost-vsock here; Husk's guest has vsock)");
    }
    let mut husk = Vec::new();
    let mut qemu = Vec::new();
    // Interleaved so that both see the same machine conditions.
    // Twice the guest memory covers all a boot of either VMM wrote (guest RAM and its own).
    let scrub_mib = if b.no_scrub { 0 } else { 2 * b.memory as usize };
    for i in 0..b.runs {
        scrub_freed_memory(scrub_mib)?;
        husk.push(husk_boot(&exe, b.memory).with_context(|| format!("husk boot #{i}"))?);
        scrub_freed_memory(scrub_mib)?;
        let booted = qemu_boot(b, &kernel, &initramfs, vsock);
        qemu.push(booted.with_context(|| format!("qemu boot #{i}"))?);
        eprintln!(
            "run {i}: husk {:.1} ms, qemu {:.1} ms",
            ms(husk[i]),
            ms(qemu[i])
        );
    }
    let h = Stats::of(&husk);
    let q = Stats::of(&qemu);
    println!("husk boot→agent ready:  {h}");
    println!("qemu microvm boot→ready: {q}");
    println!("husk/qemu boot ratio: {:.3}", h.median / q.median);
    Ok(())
}

/// Writes every byte of `mib` MiB of fresh memory, then frees it, so that the next boot does
/// not pay for the one before it. In the lab (QEMU TCG) the first write to a page that a VM
/// ran code from is slow until TCG has dropped the translations of that page: after one boot,
/// writing 400 MiB took 3234 ms instead of 1498, and a fresh lab's first boot is ~40% quicker
/// than the ones after it. Whichever VMM boots next would pay for the previous one's code
/// (interleaved: each for the other's); on hardware there is no such cost. Both VMMs get the
/// same scrub, outside the timed span. 4 KiB pages, as the freed memory is mostly small pages.
fn scrub_freed_memory(mib: usize) -> Result<()> {
    use nix::sys::mman::{madvise, mmap_anonymous, munmap, MapFlags, MmapAdvise, ProtFlags};
    let Some(len) = std::num::NonZeroUsize::new(mib << 20) else {
        return Ok(());
    };
    let prot = ProtFlags::PROT_READ | ProtFlags::PROT_WRITE;
    // SAFETY: a fresh private anonymous mapping, written only through `addr` and unmapped here.
    unsafe {
        let addr = mmap_anonymous(None, len, prot, MapFlags::MAP_PRIVATE)
            .context("mapping memory to scrub")?;
        let _ = madvise(addr, len.get(), MmapAdvise::MADV_NOHUGEPAGE);
        std::ptr::write_bytes(addr.as_ptr().cast::<u8>(), 0x5a, len.get());
        munmap(addr, len.get()).context("unmapping the scrubbed memory")?;
    }
    Ok(())
}

/// Times `husk boot` from spawn to the agent's ready marker on its serial console (the point
/// QEMU is timed to), then lets it finish: its exit status says the agent also answered a ping
/// and powered the guest off.
fn husk_boot(exe: &Path, memory: u32) -> Result<Duration> {
    let start = Instant::now();
    let mut child = Command::new(exe)
        .args(["boot", "--memory", &memory.to_string(), "--console", "-"])
        .stdout(Stdio::piped())
        .spawn()?;
    let ready = wait_for_line(&mut child, AGENT_READY_MARKER, start);
    let status = child.wait()?;
    // The exit status says more than a missing line (a signal, an error code).
    if !status.success() {
        bail!("husk boot exited with {status}");
    }
    ready
}

/// Times QEMU microvm (KVM, no PCI, no ACPI, same kernel command line) to the agent's marker.
fn qemu_boot(b: &BootBench, kernel: &Path, initramfs: &Path, vsock: bool) -> Result<Duration> {
    let start = Instant::now();
    let mut child = Command::new(&b.qemu)
        .args(qemu_args(b.memory, kernel, initramfs, vsock))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {}", b.qemu.display()))?;
    let ready = wait_for_line(&mut child, AGENT_READY_MARKER, start);
    let _ = child.kill();
    let _ = child.wait();
    ready
}

fn qemu_args(memory: u32, kernel: &Path, initramfs: &Path, vsock: bool) -> Vec<String> {
    let mut args: Vec<String> = [
        "-M",
        "microvm,x-option-roms=off,rtc=off,acpi=off",
        "-enable-kvm",
        "-cpu",
        "host",
        "-smp",
        "1",
        "-nodefaults",
        "-no-user-config",
        "-nographic",
        "-no-reboot",
        "-serial",
        "stdio",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(["-m".into(), memory.to_string()]);
    if vsock {
        // Same device set as Husk's guest where the host allows it.
        args.extend(["-device".into(), "vhost-vsock-device,guest-cid=3".into()]);
    }
    args.extend(["-kernel".into(), kernel.display().to_string()]);
    args.extend(["-initrd".into(), initramfs.display().to_string()]);
    let cmdline = husk_vmm::config::DEFAULT_CMDLINE.replace("reboot=k", "reboot=t");
    args.extend(["-append".into(), cmdline]);
    args
}

/// Reads the child's stdout until a line contains `needle`; returns the time since `start`.
fn wait_for_line(child: &mut Child, needle: &str, start: Instant) -> Result<Duration> {
    let stdout = child.stdout.take().context("no stdout")?;
    let (tx, rx) = std::sync::mpsc::channel();
    let needle = needle.to_string();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if line.contains(&needle) {
                let _ = tx.send(start.elapsed());
                // Keep draining so the child never blocks on a full pipe.
            }
        }
    });
    rx.recv_timeout(BOOT_TIMEOUT)
        .context("the ready marker never arrived")
}

/// For the benchmarks that run raw test guests on the host's /dev/kvm: fails unless there is
/// one, then makes their scratch directory (`prefix`…, `what` it holds, for the error).
pub fn host_kvm_scratch(prefix: &str, what: &str) -> Result<tempfile::TempDir> {
    if !Path::new("/dev/kvm").exists() {
        bail!("/dev/kvm is missing: this benchmark runs on the host's KVM");
    }
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir()
        .with_context(|| format!("creating the {what} directory"))
}

/// The husk binary, kernel and initramfs the benchmarks run (see [`installed_husk`]).
pub struct Installed {
    pub husk: PathBuf,
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
}

/// Copies this husk binary, the guest kernel and the initramfs to `work/install` (the layout
/// `assets` looks in) unless already there: the benchmarks run husk as an installed binary on
/// local storage, as runc and QEMU are. Run straight from a lab's checkout, every exec would
/// re-read the binary over the checkout's 9p share (cache=mmap keeps no pages between opens):
/// about 200 ms per husk process there, which says nothing about Husk.
pub fn installed_husk(work: &Path) -> Result<Installed> {
    let install = work.join("install");
    let assets_dir = install.join("husk");
    let to = Installed {
        husk: install.join("bin").join("husk"),
        kernel: assets_dir.join(assets::KERNEL_FILE),
        initramfs: assets_dir.join(assets::INITRAMFS_FILE),
    };
    if to.husk.exists() {
        return Ok(to);
    }
    let copies = [
        (std::env::current_exe()?, &to.husk),
        (assets::kernel(None)?, &to.kernel),
        (assets::initramfs(None)?, &to.initramfs),
    ];
    for (from, dest) in copies {
        if let Some(d) = dest.parent() {
            std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
        }
        std::fs::copy(&from, dest)
            .with_context(|| format!("copying {} to {}", from.display(), dest.display()))?;
    }
    eprintln!("husk under test: {} (an installed copy)", to.husk.display());
    Ok(to)
}

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// min / median / max of a sample, in milliseconds.
pub struct Stats {
    pub min: f64,
    pub median: f64,
    pub max: f64,
}

impl Stats {
    pub fn of(samples: &[Duration]) -> Stats {
        let mut v: Vec<f64> = samples.iter().map(|d| ms(*d)).collect();
        v.sort_by(f64::total_cmp);
        let n = v.len();
        let median = if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        };
        Stats {
            min: v[0],
            median,
            max: v[n - 1],
        }
    }
}

impl std::fmt::Display for Stats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "min {:.1} ms, median {:.1} ms, max {:.1} ms",
            self.min, self.median, self.max
        )
    }
}

/// p50 and p99 (nearest rank) of a sample, in milliseconds.
pub struct Percentiles {
    pub p50: f64,
    pub p99: f64,
}

impl Percentiles {
    pub fn of(samples: &[Duration]) -> Self {
        let mut v: Vec<f64> = samples.iter().map(|d| ms(*d)).collect();
        v.sort_by(f64::total_cmp);
        let rank = (v.len() as f64 * 0.99).ceil() as usize;
        Self {
            p50: Stats::of(samples).median,
            p99: v[rank.clamp(1, v.len()) - 1],
        }
    }
}

impl std::fmt::Display for Percentiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "p50 {:.2} ms, p99 {:.2} ms", self.p50, self.p99)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_of_odd_and_even_samples() {
        let d = |ms| Duration::from_millis(ms);
        let s = Stats::of(&[d(30), d(10), d(20)]);
        assert_eq!((s.min, s.median, s.max), (10.0, 20.0, 30.0));
        let s = Stats::of(&[d(40), d(10), d(20), d(30)]);
        assert_eq!(s.median, 25.0);
    }

    #[test]
    fn p99_is_the_nearest_rank() {
        let d: Vec<Duration> = (1..=20).map(Duration::from_millis).collect();
        let p = Percentiles::of(&d);
        assert_eq!((p.p50, p.p99), (10.5, 20.0));
    }
}
