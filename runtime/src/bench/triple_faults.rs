//! `husk bench triple-faults`: how often a booting guest triple-faults under Husk and under
//! QEMU microvm, booting the same kernel and initramfs side by side on the same KVM. In the
//! lab both run on KVM inside QEMU's emulated SVM; a rate that QEMU's own guests share is the
//! lab's, one that only Husk's guests show is Husk's.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use anyhow::Result;

use super::boot_vs_qemu::{qemu_args, AGENT_READY_MARKER};
use super::setup::{installed_husk, Installed};
use super::TripleFaultBench;

const BOOT_TIMEOUT: Duration = Duration::from_secs(180);

/// How a boot ended.
enum Outcome {
    Ready,
    /// Husk: the VMM's `KVM_EXIT_SHUTDOWN` report. QEMU: it ended before the agent was ready
    /// without a kernel panic on the console; with `-no-reboot` a guest reset ends QEMU, and
    /// nothing in Husk's guest resets it before then.
    TripleFault,
    Other(String),
}

#[derive(Default)]
struct Tally {
    boots: usize,
    triple_faults: usize,
    other: usize,
}

impl Tally {
    fn add(&mut self, outcome: &Outcome) {
        self.boots += 1;
        match outcome {
            Outcome::Ready => {}
            Outcome::TripleFault => self.triple_faults += 1,
            Outcome::Other(_) => self.other += 1,
        }
    }
}

pub fn run(b: &TripleFaultBench) -> Result<()> {
    let work = tempfile::Builder::new()
        .prefix("husk-bench-triple-faults-")
        .tempdir()?;
    let installed = installed_husk(work.path())?;
    let vsock = Path::new("/dev/vhost-vsock").exists();
    let tallies = Mutex::new((Tally::default(), Tally::default()));
    let parallel = b.parallel.max(1);
    // Each worker alternates the two VMMs so that both see the same load.
    std::thread::scope(|s| {
        for w in 0..parallel {
            let (installed, tallies) = (&installed, &tallies);
            s.spawn(move || {
                for i in (w..b.boots).step_by(parallel) {
                    let h = husk_boot(&installed.husk, b);
                    report("husk", i, &h);
                    let q = qemu_boot(installed, b, vsock);
                    report("qemu", i, &q);
                    let mut t = tallies.lock().unwrap();
                    t.0.add(&h);
                    t.1.add(&q);
                    // A running tally: the lab may die before the last line.
                    if t.0.boots % 10 == 0 {
                        eprintln!(
                            "after {} boots each: triple faults husk {}, qemu {}",
                            t.0.boots, t.0.triple_faults, t.1.triple_faults
                        );
                    }
                }
            });
        }
    });
    let (husk, qemu) = tallies.into_inner().unwrap();
    for (name, t) in [("husk", &husk), ("qemu microvm", &qemu)] {
        println!(
            "{name}: {} boots of {} vCPUs, {} triple faults, {} other failures",
            t.boots, b.vcpus, t.triple_faults, t.other
        );
    }
    println!(
        "triple faults: husk {}/{}, qemu {}/{}",
        husk.triple_faults, husk.boots, qemu.triple_faults, qemu.boots
    );
    Ok(())
}

fn report(vmm: &str, i: usize, outcome: &Outcome) {
    match outcome {
        Outcome::Ready => {}
        Outcome::TripleFault => eprintln!("boot {i}: {vmm}: guest triple fault"),
        Outcome::Other(why) => eprintln!("boot {i}: {vmm}: {why}"),
    }
}

/// `husk boot` to the agent's answer and power-off.
fn husk_boot(exe: &Path, b: &TripleFaultBench) -> Outcome {
    let out = Command::new(exe)
        .args(["boot", "--vcpus", &b.vcpus.to_string()])
        .args(["--memory", &b.memory.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output();
    match out {
        Ok(out) if out.status.success() => Outcome::Ready,
        Ok(out) => {
            let err = String::from_utf8_lossy(&out.stderr);
            if err.contains("guest triple fault") {
                Outcome::TripleFault
            } else {
                Outcome::Other(format!("husk boot: {}: {}", out.status, err.trim()))
            }
        }
        Err(e) => Outcome::Other(format!("starting husk boot: {e}")),
    }
}

/// QEMU microvm until the agent's ready marker (then killed), or until it ends by itself.
fn qemu_boot(installed: &Installed, b: &TripleFaultBench, vsock: bool) -> Outcome {
    let args = qemu_args(
        b.vcpus,
        b.memory,
        &installed.kernel,
        &installed.initramfs,
        vsock,
    );
    let child = Command::new(&b.qemu)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => return Outcome::Other(format!("starting {}: {e}", b.qemu.display())),
    };
    let stdout = child.stdout.take().expect("piped stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut panicked = false;
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if line.contains(AGENT_READY_MARKER) {
                let _ = tx.send(Console::Ready);
            }
            panicked |= line.contains("Kernel panic");
        }
        let _ = tx.send(Console::Closed { panicked });
    });
    let console = rx.recv_timeout(BOOT_TIMEOUT);
    let _ = child.kill();
    let Ok(out) = child.wait_with_output() else {
        return Outcome::Other("qemu: could not be waited for".into());
    };
    let stderr = String::from_utf8_lossy(&out.stderr);
    match console {
        Ok(Console::Ready) => Outcome::Ready,
        // A clean exit with nothing on stderr: the guest reset it.
        Ok(Console::Closed { panicked: false }) if out.status.success() && stderr.is_empty() => {
            Outcome::TripleFault
        }
        Ok(Console::Closed { panicked }) => Outcome::Other(format!(
            "qemu ended ({}{}): {}",
            out.status,
            if panicked { ", kernel panic" } else { "" },
            stderr.trim()
        )),
        Err(_) => Outcome::Other(format!("qemu: no ready marker in {BOOT_TIMEOUT:?}")),
    }
}

/// What QEMU's serial console showed.
enum Console {
    Ready,
    Closed { panicked: bool },
}
