//! `husk vm`: the bare VMM as a process. Boots a kernel with the given devices and exits 0 when
//! the guest powers off, non-zero with one line naming the problem otherwise.

use std::path::PathBuf;

use anyhow::{anyhow, Result};
use clap::Args;
use husk_vmm::pause::VmControl;
use husk_vmm::{BlockConfig, Boot, Vm, VmConfig, VsockConfig};
use nix::sys::signal::{SigSet, Signal};

use crate::agent_vm::serial_output;
use crate::assets;

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
    #[arg(long, default_value_t = crate::agent_vm::GUEST_CID)]
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

pub fn run(args: VmArgs) -> Result<()> {
    let config = VmConfig {
        vcpus: args.vcpus,
        memory_mib: args.memory,
        boot: Boot::Linux {
            kernel: assets::kernel(args.kernel.as_deref())?,
            initramfs: Some(assets::initramfs(args.initramfs.as_deref())?),
            cmdline: args.cmdline,
        },
        serial: serial_output(Some(&args.console)),
        vsock: args.vsock.map(|uds_path| VsockConfig {
            guest_cid: args.cid,
            uds_path,
        }),
        blocks: disks(args.disk, args.disk_ro),
        shares: Vec::new(),
        kvm_device: args.kvm_device,
    };
    // Before any VMM thread exists, so that every one inherits the mask.
    let report_signal = block_report_signal()?;
    let vm = Vm::new(config).map_err(|e| anyhow!("{e}"))?;
    report_vcpus_on(report_signal, vm.control())?;
    vm.run().map(|_| ()).map_err(|e| anyhow!("{e}"))
}

/// Blocks SIGUSR2 in this thread (and so in the threads it starts): only the reporting
/// thread takes it, with `sigwait`.
fn block_report_signal() -> Result<SigSet> {
    let mut set = SigSet::empty();
    set.add(Signal::SIGUSR2);
    set.thread_block()?;
    Ok(set)
}

/// `kill -USR2 <pid>` prints one line per vCPU on stderr saying where it is (`VmControl::
/// vcpu_report`): for a guest that stopped answering, before it is killed.
fn report_vcpus_on(set: SigSet, control: VmControl) -> Result<()> {
    std::thread::Builder::new()
        .name("vcpu-report".into())
        .spawn(move || {
            while set.wait().is_ok() {
                match control.vcpu_report() {
                    Ok(lines) => lines.iter().for_each(|l| eprintln!("husk: {l}")),
                    Err(e) => eprintln!("husk: cannot report the vCPUs: {e}"),
                }
            }
        })?;
    Ok(())
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
