//! `husk boot` and `husk vm`: a guest booted by hand, with the agent (timed to its answer) or
//! on the bare VMM.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Result;
use clap::Args;
use husk_vmm::{BlockConfig, Boot, VmConfig, VsockConfig};

use crate::agent_vm::{serial_output, BootOptions, GUEST_CID};
use crate::{assets, bare_vm, boot_timing};

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
    pub fn options(&self) -> Result<BootOptions> {
        Ok(BootOptions {
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

/// `husk boot`.
pub fn boot(args: &BootArgs, started: Instant) -> Result<()> {
    boot_timing::run(args.options()?, args.exec.as_deref(), started)
}

#[derive(Args, Debug)]
pub struct VmArgs {
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    vcpus: u8,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 256)]
    memory: u32,
    /// Guest kernel (vmlinux ELF); default: the built one.
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// Initramfs; default: the agent's.
    #[arg(long)]
    initramfs: Option<PathBuf>,
    /// Extra kernel command line.
    #[arg(long, default_value = "")]
    cmdline: String,
    /// Serial console: a file, or "-" for stdout (default).
    #[arg(long, default_value = "-")]
    console: PathBuf,
    /// Unix socket for the vsock device's host side.
    #[arg(long)]
    vsock: Option<PathBuf>,
    /// Guest vsock context id.
    #[arg(long, default_value_t = GUEST_CID)]
    cid: u32,
    /// A virtio-blk disk backed by this file (repeatable).
    #[arg(long)]
    disk: Vec<PathBuf>,
    /// A read-only virtio-blk disk backed by this file (repeatable; after the --disk ones).
    #[arg(long)]
    disk_ro: Vec<PathBuf>,
    /// The KVM device (for tests of a missing /dev/kvm).
    #[arg(long, default_value = "/dev/kvm", hide = true)]
    kvm_device: PathBuf,
}

impl VmArgs {
    /// The VM these flags describe, with the default assets where none are given.
    pub fn config(self) -> Result<VmConfig> {
        Ok(VmConfig {
            vcpus: self.vcpus,
            memory_mib: self.memory,
            boot: Boot::Linux {
                kernel: assets::kernel(self.kernel.as_deref())?,
                initramfs: Some(assets::initramfs(self.initramfs.as_deref())?),
                cmdline: self.cmdline,
            },
            serial: serial_output(Some(&self.console)),
            vsock: self.vsock.map(|uds_path| VsockConfig {
                guest_cid: self.cid,
                uds_path,
            }),
            blocks: disks(self.disk, self.disk_ro),
            shares: Vec::new(),
            kvm_device: self.kvm_device,
        })
    }
}

/// `husk vm`.
pub fn vm(args: VmArgs) -> Result<()> {
    bare_vm::run(args.config()?)
}

fn disks(rw: Vec<PathBuf>, ro: Vec<PathBuf>) -> Vec<BlockConfig> {
    let rw = rw.into_iter().map(|path| BlockConfig {
        path,
        read_only: false,
    });
    let ro = ro.into_iter().map(|path| BlockConfig {
        path,
        read_only: true,
    });
    rw.chain(ro).collect()
}
