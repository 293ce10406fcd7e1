//! What a template was built from, and the content hash that says when it is out of date.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::file_id::{read_chunks, FileStamp};

/// Bumped whenever the way templates are built changes (e.g. what the guest does before the
/// snapshot, or a device's queue sizes, which a restore checks), so that older templates are
/// rebuilt. 2: vsock queues of 64; 3: back to 256.
const RECIPE_VERSION: u32 = 3;

/// How a template's guest is built.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Settings {
    pub vcpus: u8,
    pub memory_mib: u32,
    pub kernel: PathBuf,
    /// The initramfs holding the agent.
    pub initramfs: PathBuf,
    pub share_slots: u8,
}

/// A file of the template's recipe and its identity when the template was built: while that
/// still matches, its content hash is reused instead of re-reading tens of megabytes on every
/// `create`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Stamp {
    path: PathBuf,
    #[serde(flatten)]
    file: FileStamp,
}

impl Stamp {
    fn of(path: &Path) -> Result<Stamp> {
        Ok(Stamp {
            path: path.to_path_buf(),
            file: FileStamp::of(path)?,
        })
    }
}

/// `manifest.json` of a template.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub name: String,
    pub settings: Settings,
    /// SHA-256 over the recipe version, the settings, the kernel and the initramfs.
    pub hash: String,
    stamps: Vec<Stamp>,
    /// Seconds since the epoch when it was built.
    pub created: u64,
}

impl Manifest {
    /// The manifest a template built now from `settings` gets.
    pub fn new(name: &str, settings: &Settings) -> Result<Manifest> {
        Ok(Manifest {
            name: name.to_string(),
            settings: settings.clone(),
            hash: content_hash(settings)?,
            stamps: stamps(settings)?,
            created: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        })
    }

    /// True when a template built from `settings` now would be the same: same settings and,
    /// unless the files are untouched since, the same kernel and initramfs content.
    pub fn is_current(&self, settings: &Settings) -> Result<bool> {
        if &self.settings != settings {
            return Ok(false);
        }
        if stamps(settings)? == self.stamps {
            return Ok(true);
        }
        Ok(content_hash(settings)? == self.hash)
    }
}

fn stamps(settings: &Settings) -> Result<Vec<Stamp>> {
    [&settings.kernel, &settings.initramfs]
        .into_iter()
        .map(|p| Stamp::of(p))
        .collect()
}

fn content_hash(settings: &Settings) -> Result<String> {
    let mut h = Sha256::new();
    h.update(RECIPE_VERSION.to_le_bytes());
    h.update(serde_json::to_vec(settings)?);
    for path in [&settings.kernel, &settings.initramfs] {
        read_chunks(path, |bytes| h.update(bytes))
            .with_context(|| format!("reading {}", path.display()))?;
    }
    Ok(h.finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<String>())
}

/// Settings over a fake kernel and initramfs written into `dir` (for tests).
#[cfg(test)]
pub(crate) fn test_settings(dir: &Path) -> Settings {
    std::fs::write(dir.join("k"), b"kernel").unwrap();
    std::fs::write(dir.join("i"), b"initramfs").unwrap();
    Settings {
        vcpus: 1,
        memory_mib: 256,
        kernel: dir.join("k"),
        initramfs: dir.join("i"),
        share_slots: 8,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_changed_setting_or_input_makes_the_manifest_stale() {
        let dir = tempfile::tempdir().unwrap();
        let s = test_settings(dir.path());
        let m = Manifest::new("default", &s).unwrap();
        assert!(m.is_current(&s).unwrap());
        let bigger = Settings {
            memory_mib: 512,
            ..s.clone()
        };
        assert!(!m.is_current(&bigger).unwrap());
        // Same content rewritten (new mtime): still current.
        std::fs::write(&s.kernel, b"kernel").unwrap();
        assert!(m.is_current(&s).unwrap());
        std::fs::write(&s.initramfs, b"another agent").unwrap();
        assert!(!m.is_current(&s).unwrap());
    }
}
