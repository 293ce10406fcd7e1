//! Leases: one file per running clone, `<store>/.clones/<template>/<pid>`, so that `list`
//! can count clones and `rm` can refuse to remove a template in use. A clone that died
//! without removing its file is recognised by its pid being gone.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

/// A running clone's claim on a template; removed on drop.
#[derive(Debug)]
pub struct Lease {
    path: PathBuf,
}

impl Lease {
    /// Registers this process as a clone of the template whose leases live in `dir`.
    pub(crate) fn take(dir: &Path) -> Result<Lease> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let path = dir.join(std::process::id().to_string());
        std::fs::write(&path, b"").with_context(|| format!("writing {}", path.display()))?;
        Ok(Lease { path })
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// The pids holding a lease in `dir` that are still alive; stale files are removed.
pub(crate) fn holders(dir: &Path) -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut pids = Vec::new();
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        if alive(pid) {
            pids.push(pid);
        } else {
            let _ = std::fs::remove_file(entry.path());
        }
    }
    pids
}

/// Removes the lease file of clone `pid` from each of `dirs` if that process has ended (one
/// killed before it could drop its lease leaves the file behind). A pid that is alive again,
/// reused by another process, keeps its file.
pub(crate) fn remove_ended(dirs: impl Iterator<Item = PathBuf>, pid: i32) {
    if alive(pid) {
        return;
    }
    for dir in dirs {
        let _ = std::fs::remove_file(dir.join(pid.to_string()));
    }
}

fn alive(pid: i32) -> bool {
    // SAFETY: signal 0 only checks that the process exists; nothing is delivered.
    let r = unsafe { libc::kill(pid, 0) };
    r == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}
