//! Templates as the runtime makes them: their settings, the default template (built on first
//! use), and how a template's guest is built: boot the default guest with every device a
//! clone may need, wait for the agent, let it settle, snapshot it.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use husk_templates::{slot_tag, BuildTarget, Settings, Store, Template, DEFAULT_NAME, SHARE_SLOTS};
use husk_vmm::snapshot::AfterSnapshot;
use husk_vmm::{SerialOutput, ShareConfig};

use crate::agent_vm::{AgentVm, BootOptions};
use crate::agent_vm::{AGENT_TIMEOUT, POWEROFF_TIMEOUT};
use crate::assets;

/// vCPUs of the default template (and of a container whose spec asks for no CPU quota).
pub const DEFAULT_VCPUS: u8 = 1;
/// Memory of the default template (and of a container whose spec sets no memory limit).
pub const DEFAULT_MEMORY_MIB: u32 = 256;
/// How long the booted guest idles before the snapshot: late boot work (deferred probes,
/// the agent's first allocations) then lands in the template instead of in every clone.
const SETTLE: Duration = Duration::from_millis(500);

/// The settings of a template of this size with the default (or given) kernel and agent.
pub fn settings(vcpus: u8, memory_mib: u32, kernel: Option<PathBuf>) -> Result<Settings> {
    Ok(Settings {
        vcpus,
        memory_mib,
        kernel: assets::kernel(kernel.as_deref())?,
        initramfs: assets::initramfs(None)?,
        share_slots: SHARE_SLOTS,
    })
}

/// The default template, built first if missing or out of date. The build reports progress
/// only to a terminal: callers such as podman or tests read `create`'s stderr.
pub fn ensure_default(store: &Store) -> Result<Template> {
    use std::io::IsTerminal;
    let settings = settings(DEFAULT_VCPUS, DEFAULT_MEMORY_MIB, None)?;
    let verbose = std::io::stderr().is_terminal();
    store.ensure(DEFAULT_NAME, &settings, &|t| build_guest(t, verbose))
}

/// Progress of a build on stderr, one line per step with the time it took.
struct Progress {
    name: String,
    started: Instant,
    verbose: bool,
}

impl Progress {
    fn step(&self, what: &str) {
        if !self.verbose {
            return;
        }
        eprintln!(
            "husk: template {}: {what} ({:.1} s)",
            self.name,
            self.started.elapsed().as_secs_f64()
        );
    }
}

/// The builder the store calls: boots, settles, snapshots paused, stops the VM; with
/// `verbose`, one line per step on stderr.
pub fn build_guest(target: &BuildTarget, verbose: bool) -> Result<()> {
    let s = target.settings;
    let progress = Progress {
        name: target.name.to_string(),
        started: Instant::now(),
        verbose,
    };
    progress.step("booting the guest");
    let shares = (0..usize::from(s.share_slots))
        .map(|i| ShareConfig::dir(&slot_tag(i), &target.placeholder, true))
        .collect();
    let console = target.snapshot_dir.with_file_name("console.log");
    let mut vm = AgentVm::start(BootOptions {
        vcpus: s.vcpus,
        memory_mib: s.memory_mib,
        kernel: s.kernel.clone(),
        initramfs: s.initramfs.clone(),
        cmdline: String::new(),
        serial: SerialOutput::File(console),
        disks: Vec::new(),
        shares,
        vsock_path: None,
    })?;
    let result = settle_and_snapshot(&mut vm, target, &progress);
    vm.control().stop();
    let stopped = vm.wait_timeout(POWEROFF_TIMEOUT);
    result?;
    stopped?;
    progress.step("done");
    Ok(())
}

fn settle_and_snapshot(vm: &mut AgentVm, target: &BuildTarget, progress: &Progress) -> Result<()> {
    let mut agent = vm.agent(AGENT_TIMEOUT).context("waiting for the agent")?;
    progress.step("agent ready, settling");
    let sync = husk_agent::ExecRequest {
        argv: vec!["sync".into()],
        ..Default::default()
    };
    agent.exec(&sync).context("sync in the guest")?;
    agent
        .prepare_spare(&SPARE_NAMESPACES)
        .context("preparing a spare container helper")?;
    if std::env::var_os(TICK_ENV).is_some() {
        agent.exec(&tick()).context("starting the console ticker")?;
    }
    // No host connection may be open in the snapshot: a clone could not answer it.
    drop(agent);
    std::thread::sleep(SETTLE);
    progress.step("snapshotting");
    let paths = vm
        .control()
        .snapshot(&target.snapshot_dir, AfterSnapshot::StayPaused)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    if let Ok((_, body)) = husk_vmm::snapshot::state_file::read(&paths.state) {
        if !body.skipped.is_empty() {
            progress.step(&format!("KVM did not give {}", body.skipped.join("; ")));
        }
    }
    Ok(())
}

/// The namespaces of the helper a template keeps ready for its clones' first container:
/// those of `runc spec`, of `examples/busybox` and of podman on cgroup v1 hosts.
const SPARE_NAMESPACES: [&str; 5] = ["pid", "network", "ipc", "uts", "mount"];

/// Debugging clones: with this variable set, the template's guest prints `tick <uptime>`
/// on its console every second, so a clone's console shows whether it runs and keeps time.
const TICK_ENV: &str = "HUSK_TEMPLATE_TICK";

fn tick() -> husk_agent::ExecRequest {
    let script = "(while :; do echo tick $(cut -d' ' -f1 /proc/uptime) $(date +%s); sleep 1; done) </dev/null >/dev/console 2>&1 &";
    husk_agent::ExecRequest {
        argv: vec!["sh".into(), "-c".into(), script.into()],
        ..Default::default()
    }
}
