//! `husk bench boot`: process start → agent ready, Husk against QEMU microvm booting the same
//! kernel and initramfs, interleaved so that both see the same machine conditions.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use super::setup::{installed_husk, Installed};
use super::stats::{ms, Stats};
use super::BootBench;

/// The line the agent writes on the serial console once it listens (QEMU's ready marker).
pub(super) const AGENT_READY_MARKER: &str = "husk-agent: ready";
const BOOT_TIMEOUT: Duration = Duration::from_secs(180);
/// Offset of the next QEMU's vsock context id above 3 (this process's QEMUs never share one).
static NEXT_CID: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

pub fn run(b: &BootBench) -> Result<()> {
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
        // Husk's guest probes a vsock device that QEMU's lacks, which costs it boot time.
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
        let booted = qemu_boot(&b.qemu, b.memory, &kernel, &initramfs, vsock);
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
/// not pay for the one before it. Under QEMU TCG (the lab) the first write to a page that a VM
/// ran code from is slow until TCG has dropped the translations of that page, so a boot is
/// slower after another than on fresh memory: whichever VMM boots next would pay for the
/// previous one's code (interleaved: each for the other's); on hardware there is no such
/// cost. Both VMMs get the same scrub, outside the timed span. 4 KiB pages, as the freed
/// memory is mostly small pages.
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
fn qemu_boot(
    qemu: &Path,
    memory: u32,
    kernel: &Path,
    initramfs: &Path,
    vsock: bool,
) -> Result<Duration> {
    let start = Instant::now();
    let mut child = Command::new(qemu)
        .args(qemu_args(1, memory, kernel, initramfs, vsock))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {}", qemu.display()))?;
    let ready = wait_for_line(&mut child, AGENT_READY_MARKER, start);
    let _ = child.kill();
    let _ = child.wait();
    ready
}

/// QEMU microvm's arguments for a boot of Husk's guest: KVM, no PCI, no ACPI, no reboot (a
/// guest reset ends QEMU), the serial console on stdout and Husk's kernel command line.
pub(super) fn qemu_args(
    vcpus: u8,
    memory: u32,
    kernel: &Path,
    initramfs: &Path,
    vsock: bool,
) -> Vec<String> {
    let mut args: Vec<String> = [
        "-M",
        "microvm,x-option-roms=off,rtc=off,acpi=off",
        "-enable-kvm",
        "-cpu",
        "host",
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
    args.extend(["-smp".into(), vcpus.to_string()]);
    args.extend(["-m".into(), memory.to_string()]);
    if vsock {
        // Same device set as Husk's guest where the host allows it. Each QEMU gets its own
        // context id so that several can run at once.
        let cid = 3 + NEXT_CID.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        args.extend([
            "-device".into(),
            format!("vhost-vsock-device,guest-cid={cid}"),
        ]);
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
