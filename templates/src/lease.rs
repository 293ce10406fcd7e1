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

/// Removes the lease files of `pid` from every template's directory under `all` (the
/// directory of the templates' lease directories), unless a process with that pid runs.
pub(crate) fn remove_ended(all: &Path, pid: i32) {
    if alive(pid) {
        return;
    }
    let Ok(entries) = std::fs::read_dir(all) else {
        return;
    };
    for dir in entries.flatten() {
        let _ = std::fs::remove_file(dir.path().join(pid.to_string()));
    }
}

/// Whether `pid` runs. A zombie does not: a killed clone stays one until its parent (or
/// init) reaps it, and holds nothing of the template meanwhile.
fn alive(pid: i32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // The state (field 3) follows the command name, which may itself hold ')'.
    stat.rfind(')')
        .and_then(|i| stat[i + 1..].split_whitespace().next())
        .is_some_and(|state| state != "Z")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_an_ended_clones_leases_are_removed() {
        let all = tempfile::tempdir().unwrap();
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let ended = child.id() as i32;
        child.wait().unwrap();
        let me = std::process::id() as i32;
        for template in ["a", "b"] {
            let dir = all.path().join(template);
            std::fs::create_dir_all(&dir).unwrap();
            for pid in [ended, me] {
                std::fs::write(dir.join(pid.to_string()), b"").unwrap();
            }
        }
        remove_ended(all.path(), ended);
        remove_ended(all.path(), me);
        for template in ["a", "b"] {
            let dir = all.path().join(template);
            assert!(!dir.join(ended.to_string()).exists());
            assert!(dir.join(me.to_string()).exists());
        }
    }
}
