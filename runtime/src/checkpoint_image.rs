//! The checkpoint image: a container's whole micro-VM written to a directory, as `checkpoint`
//! writes it (through its monitor) and `restore` and the monitor read it back.
//!
//! The image directory holds the VMM's checkpoint (`state`: vCPU, interrupt-controller,
//! clock and device state, including the 9p fids of the rootfs and bind mounts; `pages`: the
//! guest pages that differ from the template's memory file, or from zero for a cold-booted
//! container, lz4-compressed) and `manifest.json`, written last, which names the container,
//! its bundle and template and carries each file's size and SHA-256. `manifest.hmac` holds the
//! HMAC-SHA256 of the manifest's exact bytes under the host's image key (see
//! [`crate::image_key`]), so the MAC covers every file. A restore checks all of it before
//! anything is created: the MAC before the manifest is even parsed, then every file. It opens
//! no host path the image names: the template, and so its memory file, comes from the
//! template store by name, and the pages' base is that memory file, not the path the page
//! file records. Then it maps the template's memory (or anonymous memory) and pages the rest
//! in lazily. CRIU is not involved; its flags are accepted and have nothing to act on.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use husk_templates::FileStamp;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::image_key::ImageKey;

/// The manifest's own format; bump on any incompatible change.
pub const MANIFEST_FORMAT: u32 = 2;
/// The manifest's name in the image directory.
pub const MANIFEST_FILE: &str = "manifest.json";
/// The manifest's MAC (lowercase hex) under the host's image key.
pub const MAC_FILE: &str = "manifest.hmac";
/// CRIU's inventory file: podman refuses to restore from a directory without one, so a
/// complete image carries this small marker beside the manifest (it holds no state).
pub const INVENTORY_FILE: &str = "inventory.img";

/// `manifest.json`: what a restore needs besides the VMM's files.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageManifest {
    pub format: u32,
    pub id: String,
    pub bundle: PathBuf,
    /// The template the VM was cloned from; `None`: cold-booted (pages are against zero).
    pub template: Option<TemplateRef>,
    /// The VMM's files with their sizes and digests.
    pub files: Vec<FileSum>,
}

/// The template a checkpoint's pages are relative to, and how to tell it was rebuilt since.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TemplateRef {
    pub name: String,
    /// The template's content hash (its manifest's).
    pub hash: String,
    /// Its memory file's identity: a rebuilt template has another file at the same path.
    pub memory: FileStamp,
}

/// One file of the image and its SHA-256 (lowercase hex).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileSum {
    pub name: String,
    pub size: u64,
    pub sha256: String,
}

impl FileSum {
    fn of(dir: &Path, name: &str) -> Result<FileSum> {
        let path = dir.join(name);
        let mut hasher = Sha256::new();
        let size = husk_templates::read_chunks(&path, |bytes| hasher.update(bytes))
            .with_context(|| format!("checkpoint file {} is missing", path.display()))?;
        Ok(FileSum {
            name: name.to_string(),
            size,
            sha256: hex(&hasher.finalize()),
        })
    }

    /// Refuses the file in `dir` unless it is the one this entry describes.
    fn check(&self, dir: &Path) -> Result<()> {
        if !vmm_files().contains(&self.name.as_str()) {
            bail!(
                "checkpoint manifest in {} names a file {:?} that no image has",
                dir.display(),
                self.name
            );
        }
        let found = FileSum::of(dir, &self.name)?;
        let path = dir.join(&self.name);
        if found.size < self.size {
            bail!(
                "checkpoint file {} is damaged: truncated to {} of {} bytes",
                path.display(),
                found.size,
                self.size
            );
        }
        if found != *self {
            bail!(
                "checkpoint file {} is damaged ({} bytes, sha256 {}; the manifest says {} bytes, sha256 {})",
                path.display(),
                found.size,
                found.sha256,
                self.size,
                self.sha256
            );
        }
        Ok(())
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The VMM's files in an image directory.
fn vmm_files() -> [&'static str; 2] {
    [
        husk_vmm::snapshot::STATE_FILE,
        husk_vmm::snapshot::PAGES_FILE,
    ]
}

impl ImageManifest {
    /// The manifest of the VMM checkpoint just written into `dir`.
    pub fn new(
        dir: &Path,
        id: &str,
        bundle: &Path,
        template: Option<TemplateRef>,
    ) -> Result<ImageManifest> {
        let files = vmm_files()
            .iter()
            .map(|name| FileSum::of(dir, name))
            .collect::<Result<_>>()?;
        Ok(ImageManifest {
            format: MANIFEST_FORMAT,
            id: id.to_string(),
            bundle: bundle.to_path_buf(),
            template,
            files,
        })
    }

    /// Writes it into `dir` last, durably, under the host's image key (created on first
    /// use): an image with a manifest is complete. The inventory marker follows, for podman,
    /// which looks for it before it restores.
    pub fn write(&self, dir: &Path) -> Result<()> {
        self.write_with(dir, &ImageKey::load_or_create(&ImageKey::default_path())?)
    }

    /// [`ImageManifest::write`] under `key`.
    pub fn write_with(&self, dir: &Path, key: &ImageKey) -> Result<()> {
        let bytes = serde_json::to_vec_pretty(self)?;
        write_durably(dir, MAC_FILE, hex(&key.mac(&bytes)).as_bytes())?;
        write_durably(dir, MANIFEST_FILE, &bytes)?;
        let note = "a husk micro-VM checkpoint: see manifest.json (CRIU was not used)\n";
        write_durably(dir, INVENTORY_FILE, note.as_bytes())
    }

    /// Reads the manifest of the image in `dir`, authenticates it under the host's image key
    /// and checks every file against it.
    pub fn read_checked(dir: &Path) -> Result<ImageManifest> {
        Self::read_checked_with(dir, &ImageKey::load(&ImageKey::default_path())?)
    }

    /// [`ImageManifest::read_checked`] under `key`.
    pub fn read_checked_with(dir: &Path, key: &ImageKey) -> Result<ImageManifest> {
        let bytes = read_manifest_bytes(dir)?;
        let tag = std::fs::read(dir.join(MAC_FILE)).with_context(|| {
            format!(
                "checkpoint {} has no {MAC_FILE}: it is not authenticated",
                dir.display()
            )
        })?;
        let authentic = std::str::from_utf8(&tag)
            .ok()
            .and_then(|t| unhex(t.trim()))
            .is_some_and(|t| key.verify(&bytes, &t));
        if !authentic {
            bail!(
                "checkpoint {} was not made on this host or its manifest was altered (its HMAC does not match this host's image key)",
                dir.display()
            );
        }
        let m = Self::parse(dir, &bytes)?;
        for want in &m.files {
            want.check(dir)?;
        }
        Ok(m)
    }

    /// Reads the manifest of the image in `dir` (checking its format, neither its MAC nor the
    /// files: for inspection only).
    pub fn read(dir: &Path) -> Result<ImageManifest> {
        Self::parse(dir, &read_manifest_bytes(dir)?)
    }

    /// The manifest `bytes` of the image in `dir`, decoded, in this husk's format.
    pub fn parse(dir: &Path, bytes: &[u8]) -> Result<ImageManifest> {
        let m: ImageManifest = serde_json::from_slice(bytes).with_context(|| {
            format!(
                "checkpoint manifest {} is damaged",
                dir.join(MANIFEST_FILE).display()
            )
        })?;
        if m.format != MANIFEST_FORMAT {
            bail!(
                "checkpoint {} has format {}; this husk reads format {MANIFEST_FORMAT}",
                dir.display(),
                m.format
            );
        }
        Ok(m)
    }
}

fn read_manifest_bytes(dir: &Path) -> Result<Vec<u8>> {
    std::fs::read(dir.join(MANIFEST_FILE))
        .with_context(|| format!("{} is not a checkpoint image", dir.display()))
}

/// The bytes of lowercase or uppercase hex `text`; `None` if it is not hex.
fn unhex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

/// Writes `name` in `dir` through a temporary file, synced, so it is there whole or not at all.
fn write_durably(dir: &Path, name: &str, bytes: &[u8]) -> Result<()> {
    let path = dir.join(name);
    let tmp = dir.join(format!(".{name}.tmp"));
    let mut f = std::fs::File::create(&tmp)?;
    std::io::Write::write_all(&mut f, bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, &path).with_context(|| format!("writing {}", path.display()))
}

/// What a checkpoint of a clone of `template` records of it.
pub fn template_ref(template: &husk_templates::Template) -> Result<TemplateRef> {
    Ok(TemplateRef {
        name: template.manifest.name.clone(),
        hash: template.manifest.hash.clone(),
        memory: FileStamp::of(&template_memory(template))?,
    })
}

/// Refuses a template that is not the one the checkpoint's pages were written against.
pub fn check_template(saved: &TemplateRef, template: &husk_templates::Template) -> Result<()> {
    let now = template_ref(template)?;
    if &now != saved {
        bail!(
            "template {} was rebuilt since the checkpoint was taken; the checkpoint cannot be restored",
            saved.name
        );
    }
    Ok(())
}

/// The template's memory file: what a clone's pages (paged out or checkpointed) are relative to.
pub fn template_memory(template: &husk_templates::Template) -> PathBuf {
    husk_vmm::snapshot::SnapshotPaths::in_dir(&template.snapshot_dir()).memory
}

/// Removes what a failed checkpoint may have written into `dir`, leaving anything else.
pub fn remove_image(dir: &Path) {
    for name in vmm_files()
        .iter()
        .chain(&[MANIFEST_FILE, MAC_FILE, INVENTORY_FILE])
    {
        let _ = std::fs::remove_file(dir.join(name));
        let _ = std::fs::remove_file(dir.join(format!("{name}.tmp")));
        let _ = std::fs::remove_file(dir.join(format!(".{name}.tmp")));
    }
    // Only if it is empty: the caller may have made it, or may keep other files there.
    let _ = std::fs::remove_dir(dir);
}

#[cfg(test)]
mod tests;
