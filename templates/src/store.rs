//! The store directory: finding, building, replacing, listing and removing templates.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use crate::lease::{self, Lease};
use crate::manifest::{Manifest, Settings};

const MANIFEST_FILE: &str = "manifest.json";
const SNAPSHOT_DIR: &str = "snapshot";
const PLACEHOLDER_DIR: &str = "empty";
const LEASES_DIR: &str = ".clones";
const LOCK_FILE: &str = ".lock";

/// Where a builder puts a new template's pieces (all inside a temporary directory).
pub struct BuildTarget<'a> {
    pub name: &'a str,
    pub settings: &'a Settings,
    /// Where the snapshot goes (`VmControl::snapshot` into it).
    pub snapshot_dir: PathBuf,
    /// An empty directory for every share slot of the guest being built.
    pub placeholder: PathBuf,
}

/// Boots a guest as `target.settings` say, lets it settle and snapshots it into
/// `target.snapshot_dir`, leaving nothing running.
pub type Builder<'a> = &'a dyn Fn(&BuildTarget) -> Result<()>;

/// A built template.
#[derive(Debug, Clone)]
pub struct Template {
    pub dir: PathBuf,
    pub manifest: Manifest,
}

impl Template {
    /// The VMM snapshot to restore.
    pub fn snapshot_dir(&self) -> PathBuf {
        self.dir.join(SNAPSHOT_DIR)
    }

    /// The empty directory unused share slots of a clone serve.
    pub fn placeholder(&self) -> PathBuf {
        self.dir.join(PLACEHOLDER_DIR)
    }
}

/// One line of `husk template list`.
#[derive(Debug, Clone)]
pub struct Listing {
    pub name: String,
    /// Bytes on disk (the memory file is sparse).
    pub size: u64,
    pub kernel: PathBuf,
    /// Seconds since the epoch when it was built.
    pub created: u64,
    pub clones: usize,
}

/// The template directory.
pub struct Store {
    root: PathBuf,
    kvm_device: PathBuf,
}

impl Store {
    /// The store at `root`, checking snapshots against `/dev/kvm`.
    pub fn new(root: &Path) -> Store {
        Store {
            root: root.to_path_buf(),
            kvm_device: PathBuf::from("/dev/kvm"),
        }
    }

    /// `$HUSK_TEMPLATES`, or [`crate::DEFAULT_DIR`].
    pub fn from_env() -> Store {
        let root = std::env::var_os("HUSK_TEMPLATES")
            .map_or_else(|| PathBuf::from(crate::DEFAULT_DIR), PathBuf::from);
        Store::new(&root)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The template `name`, if one is built.
    pub fn open(&self, name: &str) -> Result<Option<Template>> {
        // The name may come from a checkpoint image: it must not leave the store.
        check_name(name)?;
        let dir = self.root.join(name);
        let path = dir.join(MANIFEST_FILE);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        let manifest = serde_json::from_slice(&bytes)
            .with_context(|| format!("template manifest {}", path.display()))?;
        Ok(Some(Template { dir, manifest }))
    }

    /// The template `name` built from `settings`: the existing one when it is current and its
    /// snapshot passes the restore checks; otherwise built (again) with `build`. A template
    /// that the checks refuse is rebuilt once, with a warning on stderr.
    pub fn ensure(&self, name: &str, settings: &Settings, build: Builder) -> Result<Template> {
        let _lock = self.lock()?;
        match self.open(name) {
            Ok(Some(t)) if t.manifest.is_current(settings)? => {
                match husk_vmm::snapshot::check(&t.snapshot_dir(), &self.kvm_device) {
                    Ok(()) => return Ok(t),
                    Err(e) => {
                        eprintln!("husk: warning: template {name} is unusable ({e}); rebuilding it")
                    }
                }
            }
            Ok(_) => {}
            Err(e) => eprintln!("husk: warning: {e:#}; rebuilding template {name}"),
        }
        let t = self.build_locked(name, settings, build)?;
        husk_vmm::snapshot::check(&t.snapshot_dir(), &self.kvm_device)
            .with_context(|| format!("template {name} was just built but is refused"))?;
        Ok(t)
    }

    /// Builds the template `name` from `settings`, replacing any older one.
    pub fn build(&self, name: &str, settings: &Settings, build: Builder) -> Result<Template> {
        let _lock = self.lock()?;
        self.build_locked(name, settings, build)
    }

    fn build_locked(&self, name: &str, settings: &Settings, build: Builder) -> Result<Template> {
        check_name(name)?;
        let tmp = self
            .root
            .join(format!(".build-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        let result = self.build_in(&tmp, name, settings, build);
        if result.is_err() {
            let _ = std::fs::remove_dir_all(&tmp);
        }
        result
    }

    fn build_in(
        &self,
        tmp: &Path,
        name: &str,
        settings: &Settings,
        build: Builder,
    ) -> Result<Template> {
        let target = BuildTarget {
            name,
            settings,
            snapshot_dir: tmp.join(SNAPSHOT_DIR),
            placeholder: tmp.join(PLACEHOLDER_DIR),
        };
        std::fs::create_dir_all(&target.placeholder)
            .with_context(|| format!("creating {}", tmp.display()))?;
        build(&target).with_context(|| format!("building template {name}"))?;
        let manifest = Manifest::new(name, settings)?;
        std::fs::write(
            tmp.join(MANIFEST_FILE),
            serde_json::to_vec_pretty(&manifest)?,
        )?;
        let dir = self.root.join(name);
        self.replace(tmp, &dir)?;
        Ok(Template { dir, manifest })
    }

    /// Moves the finished build to `dir`, moving an older template out of the way first.
    /// Running clones keep the old files they mapped: they are unlinked, never rewritten.
    fn replace(&self, tmp: &Path, dir: &Path) -> Result<()> {
        let old = self.root.join(format!(".old-{}", std::process::id()));
        let had_old = dir.exists();
        if had_old {
            std::fs::rename(dir, &old).with_context(|| format!("moving {}", dir.display()))?;
        }
        std::fs::rename(tmp, dir).with_context(|| format!("installing {}", dir.display()))?;
        if had_old {
            let _ = std::fs::remove_dir_all(&old);
        }
        Ok(())
    }

    /// Every template, by name.
    pub fn list(&self) -> Result<Vec<Listing>> {
        let entries = match std::fs::read_dir(&self.root) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e).with_context(|| format!("reading {}", self.root.display())),
        };
        let mut names: Vec<String> = entries
            .flatten()
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|n| !n.starts_with('.'))
            .collect();
        names.sort();
        let mut out = Vec::new();
        for name in names {
            if let Some(t) = self.open(&name)? {
                out.push(Listing {
                    size: disk_usage(&t.dir),
                    kernel: t.manifest.settings.kernel.clone(),
                    created: t.manifest.created,
                    clones: self.clones(&name).len(),
                    name,
                });
            }
        }
        Ok(out)
    }

    /// Pids of the running clones of `name`.
    pub fn clones(&self, name: &str) -> Vec<i32> {
        lease::holders(&self.leases_dir(name))
    }

    /// Removes the template `name`; refused while clones of it run, unless `force`.
    pub fn remove(&self, name: &str, force: bool) -> Result<()> {
        check_name(name)?;
        let _lock = self.lock()?;
        let dir = self.root.join(name);
        if !dir.join(MANIFEST_FILE).exists() {
            bail!("no template named {name}");
        }
        let clones = self.clones(name);
        if !clones.is_empty() && !force {
            bail!(
                "template {name} has {} running clone(s) (pids {clones:?}); use --force to remove it anyway",
                clones.len()
            );
        }
        let old = self.root.join(format!(".old-{}", std::process::id()));
        std::fs::rename(&dir, &old).with_context(|| format!("removing {}", dir.display()))?;
        std::fs::remove_dir_all(&old).with_context(|| format!("removing {}", old.display()))?;
        if clones.is_empty() {
            let _ = std::fs::remove_dir_all(self.leases_dir(name));
        }
        Ok(())
    }

    /// Registers this process as a running clone of `template` until the lease is dropped.
    pub fn lease(&self, template: &Template) -> Result<Lease> {
        Lease::take(&self.leases_dir(&template.manifest.name))
    }

    /// Removes the leases of clone `pid`, which has ended without dropping them (it was
    /// killed). Nothing is removed while a process with that pid runs.
    pub fn release_ended_clone(&self, pid: i32) {
        lease::remove_ended(&self.root.join(LEASES_DIR), pid);
    }

    fn leases_dir(&self, name: &str) -> PathBuf {
        self.root.join(LEASES_DIR).join(name)
    }

    /// Serialises builds and removals across processes (the lock goes with the file).
    fn lock(&self) -> Result<File> {
        std::fs::create_dir_all(&self.root)
            .with_context(|| format!("creating the template store {}", self.root.display()))?;
        let path = self.root.join(LOCK_FILE);
        let file = File::create(&path).with_context(|| format!("opening {}", path.display()))?;
        // SAFETY: flock on a descriptor we own; it is released when the file is closed.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("locking {}", path.display()));
        }
        Ok(file)
    }
}

/// A template name is one plain path component.
fn check_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
    if !ok {
        bail!("bad template name {name:?} (letters, digits, '-', '_', '.'; not starting with '.')");
    }
    Ok(())
}

/// Bytes allocated under `dir` (sparse files count only what they hold).
fn disk_usage(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => disk_usage(&e.path()),
            Ok(m) => m.blocks() * 512,
            Err(_) => 0,
        })
        .sum()
}

#[cfg(test)]
mod tests;
