//! Building a running-ready VM from a snapshot.

use std::path::Path;
use std::sync::Arc;

use super::checkpoint::CheckpointPaths;
use super::state_file::{self, SnapshotBody};
use super::{vcpu_state, vm_state, RestoreOverrides, SnapshotPaths};
use crate::config::{validate, ShareConfig, VmConfig, VsockConfig};
use crate::error::VmError;
use crate::memory::{create_guest_memory, GuestMemory};
use crate::pagefile::{PageFile, Pager};
use crate::vm::{open_kvm, IrqchipMode, Vm, VmBuilder};
use crate::{cpuid, memory_file, page_out, persist};

impl Vm {
    /// Restores the snapshot in `dir` (see [`Vm::restore_from`]).
    pub fn restore(dir: &Path, overrides: RestoreOverrides) -> Result<Vm, VmError> {
        Self::restore_from(&SnapshotPaths::in_dir(dir), overrides)
    }

    /// Builds a VM from a snapshot: guest memory is the memory file mapped copy-on-write, the
    /// devices are rebuilt from the saved configuration with `overrides`, and every vCPU,
    /// interrupt controller, timer and device continues where the snapshot left it once
    /// [`Vm::run`] is called. Refuses, with one error line, a snapshot of another format
    /// version, from a host with other CPU features, with a damaged state file or with a
    /// memory file of the wrong size.
    pub fn restore_from(paths: &SnapshotPaths, overrides: RestoreOverrides) -> Result<Vm, VmError> {
        let body = read_checked(&paths.state, &overrides)?;
        let cfg = restored_config(&body, overrides)?;
        let mem = Arc::new(memory_file::map(&paths.memory, &body.memory)?);
        build(&body, cfg, mem, |_| Ok(None))
    }

    /// Brings back the checkpoint in `dir` (see [`super::checkpoint`]): guest memory is
    /// `base`, the memory file the caller knows the checkpoint was written against (the
    /// template's, mapped copy-on-write; `None`: zero), and each
    /// chunk the page file holds comes back on the guest's first touch of it. Refuses, with
    /// one error line, what [`Vm::restore_from`] refuses and a damaged page file (its blocks
    /// are checked as they are read; check them all first with `PageFile::verify` when the
    /// file's integrity is in doubt).
    pub fn restore_checkpoint(
        dir: &Path,
        base: Option<&Path>,
        overrides: RestoreOverrides,
    ) -> Result<Vm, VmError> {
        let paths = CheckpointPaths::in_dir(dir);
        let body = read_checked(&paths.state, &overrides)?;
        let pages = PageFile::open(&paths.pages)?;
        let cfg = restored_config(&body, overrides)?;
        let mem = match base {
            Some(base) => memory_file::map(base, &body.memory)?,
            None => anonymous_memory(&cfg, &body)?,
        };
        let mem = Arc::new(mem);
        build(&body, cfg, mem, move |b| {
            page_out::start_lazy_restore(b.memory(), pages, base, b.stop_state().clone()).map(Some)
        })
    }
}

/// Builds the restored VM on `mem` and sets the saved state. `before_devices` runs once the
/// memory is mapped and before any device could touch it (it may start a lazy pager).
fn build(
    body: &SnapshotBody,
    cfg: VmConfig,
    mem: Arc<GuestMemory>,
    before_devices: impl FnOnce(&VmBuilder) -> Result<Option<Pager>, VmError>,
) -> Result<Vm, VmError> {
    let mut builder = VmBuilder::with_memory(cfg, mem, IrqchipMode::Exactly(body.irqchip))?;
    let pager = before_devices(&builder)?;
    builder.add_configured_devices()?;
    if builder.has_irqchip() != body.irqchip {
        return Err(VmError::SnapshotUnsupported("in-kernel irqchip".into()));
    }
    // Interrupt controllers before the devices: a device worker may raise an interrupt
    // as soon as it is activated.
    vm_state::restore(builder.vm_fd(), &body.vm)?;
    persist::restore_all(builder.persist_devices(), &body.devices)?;
    let vm = builder.finish(|b, index, cpuid| {
        let fd = b.create_bare_vcpu(index, cpuid)?;
        // The vCPU has never run and has no thread yet: nothing is in flight, so its state
        // is set here rather than on its thread, and a refusal fails the restore at once.
        vcpu_state::restore(&fd, &body.vcpus[usize::from(index)])?;
        Ok(fd)
    })?;
    if let Some(pager) = pager {
        page_out::adopt_pager(&vm.parts, pager);
    }
    // Only now, with every LAPIC restored, may the reset's interrupt be raised.
    if let Some(vsock) = vm.vsock_control() {
        vsock
            .reset_transport()
            .map_err(|e| VmError::Host(format!("queueing the vsock transport reset: {e}")))?;
    }
    Ok(vm)
}

/// Fresh anonymous RAM for a cold-booted VM's checkpoint; its layout must be the saved one.
fn anonymous_memory(cfg: &VmConfig, body: &SnapshotBody) -> Result<GuestMemory, VmError> {
    let mem = create_guest_memory(cfg.memory_mib)?;
    if memory_file::layout(&mem) != body.memory {
        return Err(VmError::SnapshotState(format!(
            "the checkpoint's RAM layout {:x?} is not that of {} MiB",
            body.memory, cfg.memory_mib
        )));
    }
    Ok(mem)
}

/// Checks the snapshot in `dir` as a restore would (format version, checksum, this host's CPU
/// features, memory file size) without building a VM: cheap enough to run before every clone.
pub fn check(dir: &Path, kvm_device: &Path) -> Result<(), VmError> {
    let paths = SnapshotPaths::in_dir(dir);
    let overrides = RestoreOverrides {
        kvm_device: kvm_device.to_path_buf(),
        ..Default::default()
    };
    let body = read_checked(&paths.state, &overrides)?;
    memory_file::check_size(&paths.memory, &body.memory)
}

/// Reads the state file and checks it against this build and this host.
fn read_checked(state: &Path, overrides: &RestoreOverrides) -> Result<SnapshotBody, VmError> {
    let (header, body) = state_file::read(state)?;
    let kvm = open_kvm(&overrides.kvm_device)?;
    let host = state_file::cpu_fingerprint(&cpuid::supported(&kvm)?);
    if header.cpu_fingerprint != host {
        return Err(VmError::SnapshotCpu {
            path: state.to_path_buf(),
            found: header.cpu_fingerprint,
            host,
        });
    }
    if body.vcpus.len() != usize::from(body.config.vcpus) {
        return Err(VmError::SnapshotFormat {
            path: state.to_path_buf(),
            reason: format!(
                "{} vCPU states for {} vCPUs",
                body.vcpus.len(),
                body.config.vcpus
            ),
        });
    }
    Ok(body)
}

/// The saved configuration with the caller's overrides.
fn restored_config(body: &SnapshotBody, overrides: RestoreOverrides) -> Result<VmConfig, VmError> {
    let mut cfg = body.config.to_vm_config();
    cfg.serial = overrides.serial;
    cfg.kvm_device = overrides.kvm_device;
    if let Some((guest_cid, uds_path)) = overrides.vsock {
        if cfg.vsock.is_none() {
            return Err(VmError::Config(
                "a vsock override was given but the snapshot has no vsock device".into(),
            ));
        }
        cfg.vsock = Some(VsockConfig {
            guest_cid,
            uds_path,
        });
    }
    if let Some(shares) = overrides.shares {
        replace_shares(&mut cfg, shares)?;
    }
    validate(&cfg)?;
    Ok(cfg)
}

/// Points the saved shares at new host directories; the count must match, as the guest found
/// its virtio devices at boot, and the tags stay the saved ones.
fn replace_shares(cfg: &mut VmConfig, shares: Vec<ShareConfig>) -> Result<(), VmError> {
    if shares.len() != cfg.shares.len() {
        return Err(VmError::Config(format!(
            "{} share directories given for a snapshot with {} shares",
            shares.len(),
            cfg.shares.len()
        )));
    }
    for (share, new) in cfg.shares.iter_mut().zip(shares) {
        *share = ShareConfig {
            tag: std::mem::take(&mut share.tag),
            ..new
        };
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_clone_share_keeps_the_saved_tag_and_takes_everything_else() {
        let mut cfg = crate::config::SavedConfig {
            vcpus: 1,
            memory_mib: 64,
            blocks: Vec::new(),
            shares: vec![("share0".into(), "/placeholder".into(), true)],
            vsock: None,
        }
        .to_vm_config();
        let mine = ShareConfig {
            only: Some(vec!["hosts".into()]),
            read_only_paths: vec!["etc/hosts".into()],
            ..ShareConfig::dir("ignored", Path::new("/srv/userdata"), false)
        };
        replace_shares(&mut cfg, vec![mine.clone()]).unwrap();
        let expected = ShareConfig {
            tag: "share0".into(),
            ..mine
        };
        assert_eq!(cfg.shares, [expected]);
        assert!(replace_shares(&mut cfg, Vec::new()).is_err());
    }
}
