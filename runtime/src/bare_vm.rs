//! `husk vm`: the bare VMM as a process. Boots a kernel with the given devices and exits 0 when
//! the guest powers off, non-zero with one line naming the problem otherwise.

use anyhow::{anyhow, Result};
use husk_vmm::pause::VmControl;
use husk_vmm::{Vm, VmConfig};
use nix::sys::signal::{SigSet, Signal};

/// Runs a VM of `config` until the guest powers off; SIGUSR2 reports where its vCPUs are.
pub fn run(config: VmConfig) -> Result<()> {
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
