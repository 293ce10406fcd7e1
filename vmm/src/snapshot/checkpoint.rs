//! Checkpoints: a running VM written out so that a later process can bring it back with
//! its memory served lazily.
//!
//! A checkpoint directory holds the snapshot's `state` file (the same format as a snapshot's)
//! and, instead of a raw memory file, a page file `pages` (see [`crate::pagefile`]) with every
//! guest page that differs from a base: the template's memory file a clone was made from, or
//! zero for a cold-booted VM. The page file records the base's path for diagnosis only: a
//! restore ([`crate::Vm::restore_checkpoint`]) is handed the base by its caller, maps it (or
//! anonymous memory) and serves each chunk of RAM on the guest's first touch through
//! userfaultfd.

use std::fs::File;
use std::path::{Path, PathBuf};

use super::save::{tmp_name, write_durably};
use super::{state_file, AfterSnapshot, STATE_FILE};
use crate::error::VmError;
use crate::pagefile::PageOutReport;
use crate::pause::VmControl;
use crate::{cpuid, page_out};

/// Name of the page file inside a checkpoint directory.
pub const PAGES_FILE: &str = "pages";

/// The two files of a checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckpointPaths {
    /// The header and state body (as in a snapshot).
    pub state: PathBuf,
    /// Guest RAM that differs from the base, compressed.
    pub pages: PathBuf,
}

impl CheckpointPaths {
    /// The files `state` and `pages` in `dir`.
    pub fn in_dir(dir: &Path) -> Self {
        Self {
            state: dir.join(STATE_FILE),
            pages: dir.join(PAGES_FILE),
        }
    }
}

impl VmControl {
    /// Writes a checkpoint of the running VM into `dir` (created if missing): its state file
    /// and the page file of every page differing from `base` (the memory file the VM was
    /// cloned from; `None`: zero). The RAM stays; the VM resumes or stays paused as `after`
    /// says. Returns what the page file holds.
    pub fn checkpoint(
        &self,
        dir: &Path,
        base: Option<&Path>,
        after: AfterSnapshot,
    ) -> Result<PageOutReport, VmError> {
        self.with_devices_held(after, |parts| {
            let body = self.capture(parts)?;
            let io_err = |path: &Path| {
                let path = path.to_path_buf();
                move |source| VmError::SnapshotIo { path, source }
            };
            std::fs::create_dir_all(dir).map_err(io_err(dir))?;
            let paths = CheckpointPaths::in_dir(dir);
            let fingerprint = state_file::cpu_fingerprint(&cpuid::supported(&parts.kvm)?);
            let bytes = state_file::encode(&body, fingerprint).map_err(|reason| {
                VmError::SnapshotFormat {
                    path: paths.state.clone(),
                    reason,
                }
            })?;
            let state_tmp = tmp_name(&paths.state);
            write_durably(&state_tmp, &bytes).map_err(io_err(&state_tmp))?;
            let report = page_out::write_keeping_ram(parts, &paths.pages, base);
            let report = report.inspect_err(|_| {
                let _ = std::fs::remove_file(&state_tmp);
            })?;
            std::fs::rename(&state_tmp, &paths.state).map_err(io_err(&paths.state))?;
            File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(io_err(dir))?;
            Ok(report)
        })
    }
}
