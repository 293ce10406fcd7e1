//! `husk boot`: boot the default guest to a ready agent, report the time, power it off.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Args;

use crate::agent_vm::{serial_output, AgentVm, Options, AGENT_TIMEOUT, POWEROFF_TIMEOUT};
use crate::assets;

#[derive(Args, Debug, Clone)]
pub struct BootArgs {
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    pub vcpus: u8,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 256)]
    pub memory: u32,
    /// Guest kernel (vmlinux); default: the one built by guest-kernel/build.sh.
    #[arg(long)]
    pub kernel: Option<PathBuf>,
    /// Initramfs with the agent; default: the one built by agent/build-initramfs.sh.
    #[arg(long)]
    pub initramfs: Option<PathBuf>,
    /// Write the guest's serial console to this file ("-" for stdout).
    #[arg(long)]
    pub console: Option<PathBuf>,
    /// Run this shell command in the guest once the agent is ready, and print its output.
    #[arg(long)]
    pub exec: Option<String>,
    /// Extra kernel command-line words, after Husk's own.
    #[arg(long, default_value = "")]
    pub cmdline: String,
}

impl BootArgs {
    /// Resolves the assets and turns the flags into micro-VM options.
    pub fn options(&self) -> Result<Options> {
        Ok(Options {
            vcpus: self.vcpus,
            memory_mib: self.memory,
            kernel: assets::kernel(self.kernel.as_deref())?,
            initramfs: assets::initramfs(self.initramfs.as_deref())?,
            cmdline: self.cmdline.clone(),
            serial: serial_output(self.console.as_ref()),
            disks: Vec::new(),
            shares: Vec::new(),
            vsock_path: None,
        })
    }
}

pub fn run(args: &BootArgs, started: Instant) -> Result<()> {
    let mut vm = AgentVm::start(args.options()?)?;
    if std::env::var_os("HUSK_TRACE").is_some() {
        eprintln!("husk: VM built in {} ms", started.elapsed().as_millis());
    }
    let mut agent = vm.agent(AGENT_TIMEOUT).context("waiting for the agent")?;
    println!("agent ready in {} ms", started.elapsed().as_millis());
    if let Some(script) = &args.exec {
        let req = husk_agent::ExecRequest {
            argv: vec!["sh".into(), "-c".into(), script.clone()],
            ..Default::default()
        };
        let mut out = std::io::stdout();
        let mut err = std::io::stderr();
        agent.exec_streaming(&req, &mut out, &mut err)?;
    }
    agent.poweroff().context("asking the agent to power off")?;
    drop(agent);
    vm.wait_timeout(POWEROFF_TIMEOUT)
}
