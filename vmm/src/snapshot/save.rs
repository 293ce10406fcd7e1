//! Taking a snapshot of a running VM through its `VmControl`.

use std::fs::{self, File};
use std::path::{Path, PathBuf};

use super::state_file::{self, SnapshotBody};
use super::{vcpu_state, vm_state, AfterSnapshot, SnapshotPaths};
use crate::error::VmError;
use crate::memory_file;
use crate::page_out::PageState;
use crate::pause::{VmControl, VmParts};
use crate::persist;

impl VmControl {
    /// Pauses the VM (if it is not paused already), writes a snapshot into `dir` (created if
    /// missing; an older snapshot there is replaced only once the new one is complete), then
    /// resumes or stays paused as `after` says. The VM must be running (`Vm::run`).
    pub fn snapshot(&self, dir: &Path, after: AfterSnapshot) -> Result<SnapshotPaths, VmError> {
        self.with_devices_held(after, |parts| {
            self.capture(parts)
                .and_then(|body| write_snapshot(parts, &body, dir))
        })
    }

    /// Pauses the VM (if it is not paused already) and holds its devices still while `f`
    /// reads its state and memory, then resumes or stays paused as `after` says. The VM must
    /// be running (`Vm::run`), with its memory in RAM.
    pub(super) fn with_devices_held<T>(
        &self,
        after: AfterSnapshot,
        f: impl FnOnce(&VmParts) -> Result<T, VmError>,
    ) -> Result<T, VmError> {
        let parts = self.parts()?;
        if self.is_stopping() {
            return Err(VmError::SnapshotState("the VM is stopping".into()));
        }
        if let PageState::PagedOut(p) = self.page_state() {
            return Err(VmError::SnapshotState(format!(
                "the VM's memory is paged out to {}; page it in first",
                p.display()
            )));
        }
        let was_paused = self.is_paused();
        if !was_paused {
            self.pause()?;
        }
        let result = persist::quiesce_all(&parts.devices).and_then(|()| {
            let result = f(&parts);
            persist::release_all(&parts.devices);
            result
        });
        if after == AfterSnapshot::Resume && !was_paused {
            self.resume();
        }
        result
    }

    /// Reads every piece of state but guest memory.
    pub(super) fn capture(&self, parts: &VmParts) -> Result<SnapshotBody, VmError> {
        let msr_indices = parts
            .kvm
            .get_msr_index_list()
            .map_err(VmError::kvm("get MSR index list"))?
            .as_slice()
            .to_vec();
        let irqchip = parts.irqchip;
        let per_vcpu = self.on_each_vcpu(parts.config.vcpus, move |index, fd| {
            vcpu_state::save(fd, index, &msr_indices, irqchip)
        })?;
        let mut skipped = Vec::new();
        let mut vcpus = Vec::with_capacity(per_vcpu.len());
        for saved in per_vcpu {
            let saved = saved?;
            skipped.extend(saved.skipped);
            vcpus.push(saved.state);
        }
        let vm = vm_state::save(&parts.vm_fd, irqchip, &mut skipped)?;
        if !skipped.is_empty() {
            log::info!("snapshot: KVM did not give {}", skipped.join("; "));
        }
        Ok(SnapshotBody {
            config: parts.config.clone(),
            memory: memory_file::layout(&parts.mem),
            irqchip,
            vm,
            vcpus,
            devices: persist::save_all(&parts.devices)?,
            skipped,
        })
    }
}

/// Writes both files under temporary names, makes them durable, then renames them into place,
/// the state file last: a crash leaves either the old snapshot or the new one.
fn write_snapshot(
    parts: &VmParts,
    body: &SnapshotBody,
    dir: &Path,
) -> Result<SnapshotPaths, VmError> {
    let io_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| VmError::SnapshotIo { path, source }
    };
    fs::create_dir_all(dir).map_err(io_err(dir))?;
    let paths = SnapshotPaths::in_dir(dir);
    let (mem_tmp, state_tmp) = (tmp_name(&paths.memory), tmp_name(&paths.state));
    let mem_file = File::create(&mem_tmp).map_err(io_err(&mem_tmp))?;
    memory_file::write(&parts.mem, &body.memory, &mem_file)
        .and_then(|()| mem_file.sync_all())
        .map_err(io_err(&mem_tmp))?;
    let fingerprint = state_file::cpu_fingerprint(&crate::cpuid::supported(&parts.kvm)?);
    let bytes =
        state_file::encode(body, fingerprint).map_err(|reason| VmError::SnapshotFormat {
            path: paths.state.clone(),
            reason,
        })?;
    write_durably(&state_tmp, &bytes).map_err(io_err(&state_tmp))?;
    fs::rename(&mem_tmp, &paths.memory).map_err(io_err(&paths.memory))?;
    fs::rename(&state_tmp, &paths.state).map_err(io_err(&paths.state))?;
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir))?;
    Ok(paths)
}

pub(super) fn write_durably(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut f = File::create(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

pub(super) fn tmp_name(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".tmp");
    PathBuf::from(name)
}
