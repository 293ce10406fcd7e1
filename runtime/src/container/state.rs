//! The state directory: one directory per container under `--root`, holding `state.json`
//! (written atomically: a temp file renamed over the old one, so a reader never sees half).

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

/// The OCI version Husk reports, as runc does.
pub const OCI_VERSION: &str = "1.0.2-dev";
const STATE_FILE: &str = "state.json";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Creating,
    Created,
    Running,
    Paused,
    Stopped,
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = serde_json::to_value(self).map_err(|_| std::fmt::Error)?;
        f.write_str(s.as_str().unwrap_or("unknown"))
    }
}

/// What Husk remembers about a container between commands.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ContainerState {
    pub id: String,
    pub bundle: PathBuf,
    pub rootfs: PathBuf,
    /// RFC 3339 with nanoseconds, as runc prints it.
    pub created: String,
    pub status: Status,
    /// The monitor process: the container's pid as the host sees it.
    pub pid: i32,
    /// The monitor's start time (field 22 of /proc/PID/stat), to tell it from a reused pid.
    pub pid_start_time: u64,
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
    /// The monitor's host cgroup directories, removed by `delete`.
    #[serde(default)]
    pub cgroup_dirs: Vec<PathBuf>,
    /// Where a pause pages the guest's memory out to; removed by `delete` (a monitor killed
    /// while paused cannot remove it itself).
    #[serde(default)]
    pub page_file: Option<PathBuf>,
    /// The container's id inside the guest, when it differs from `id`: a container restored
    /// under a new id keeps the one its agent knows it by.
    #[serde(default)]
    pub guest_id: Option<String>,
    /// Where the monitor writes its log (the `--log` file `create` was given, or one in the
    /// state directory); `None` for a container whose monitor predates it.
    #[serde(default)]
    pub monitor_log: Option<PathBuf>,
}

impl ContainerState {
    /// The id the guest agent knows the container by.
    pub fn guest_id(&self) -> &str {
        self.guest_id.as_deref().unwrap_or(&self.id)
    }

    /// runc's `state` output.
    pub fn oci_json(&self) -> serde_json::Value {
        let pid = if self.status == Status::Stopped {
            0
        } else {
            self.pid
        };
        let mut v = serde_json::json!({
            "ociVersion": OCI_VERSION,
            "id": self.id,
            "pid": pid,
            "status": self.status,
            "bundle": self.bundle,
            "rootfs": self.rootfs,
            "created": self.created,
            "owner": "",
        });
        if !self.annotations.is_empty() {
            v["annotations"] = serde_json::to_value(&self.annotations).unwrap_or_default();
        }
        v
    }
}

/// The `--root` directory.
pub struct StateRoot {
    root: PathBuf,
}

impl StateRoot {
    pub fn new(root: &Path) -> StateRoot {
        StateRoot {
            root: root.to_path_buf(),
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn dir(&self, id: &str) -> PathBuf {
        self.root.join(id)
    }

    /// Claims `id`: fails the way runc does if it is taken.
    pub fn create(&self, id: &str) -> Result<PathBuf> {
        validate_id(id)?;
        fs::create_dir_all(&self.root)
            .with_context(|| format!("creating root {}", self.root.display()))?;
        let dir = self.dir(id);
        match fs::create_dir(&dir) {
            Ok(()) => Ok(dir),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                bail!("container with given ID already exists")
            }
            Err(e) => Err(e).with_context(|| format!("creating {}", dir.display())),
        }
    }

    pub fn save(&self, state: &ContainerState) -> Result<()> {
        let dir = self.dir(&state.id);
        let tmp = dir.join(format!(".{STATE_FILE}.tmp"));
        let mut f = fs::File::create(&tmp)?;
        f.write_all(&serde_json::to_vec_pretty(state)?)?;
        f.sync_all()?;
        fs::rename(&tmp, dir.join(STATE_FILE))?;
        Ok(())
    }

    pub fn load(&self, id: &str) -> Result<ContainerState> {
        validate_id(id)?;
        let path = self.dir(id).join(STATE_FILE);
        let data = match fs::read(&path) {
            Ok(d) => d,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                bail!("container does not exist")
            }
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        serde_json::from_slice(&data).with_context(|| format!("corrupt {}", path.display()))
    }

    /// Every container with a readable state, sorted by id.
    pub fn list(&self) -> Vec<ContainerState> {
        let Ok(entries) = fs::read_dir(&self.root) else {
            return Vec::new();
        };
        let mut all: Vec<ContainerState> = entries
            .flatten()
            .filter_map(|e| self.load(&e.file_name().to_string_lossy()).ok())
            .collect();
        all.sort_by(|a, b| a.id.cmp(&b.id));
        all
    }

    pub fn remove(&self, id: &str) -> Result<()> {
        let dir = self.dir(id);
        match fs::remove_dir_all(&dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(e).with_context(|| format!("removing {}", dir.display()))
            }
            _ => Ok(()),
        }
    }
}

/// runc's rule: ids are non-empty, at most 1024 chars of `[A-Za-z0-9_+.-]`, and not `.`/`..`.
pub fn validate_id(id: &str) -> Result<()> {
    let ok_char = |c: char| c.is_ascii_alphanumeric() || "_+-.".contains(c);
    if id.is_empty() || id.len() > 1024 || id == "." || id == ".." || !id.chars().all(ok_char) {
        bail!("invalid container id format: {id}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(id: &str) -> ContainerState {
        ContainerState {
            id: id.into(),
            bundle: "/b".into(),
            rootfs: "/b/rootfs".into(),
            created: "2026-01-01T00:00:00.000000001Z".into(),
            status: Status::Created,
            pid: 42,
            pid_start_time: 7,
            annotations: BTreeMap::new(),
            cgroup_dirs: Vec::new(),
            page_file: None,
            guest_id: None,
            monitor_log: None,
        }
    }

    #[test]
    fn create_save_load_list_remove() {
        let root = tempfile::tempdir().unwrap();
        let store = StateRoot::new(root.path());
        store.create("b").unwrap();
        store.save(&state("b")).unwrap();
        store.create("a").unwrap();
        store.save(&state("a")).unwrap();
        let err = store.create("a").unwrap_err().to_string();
        assert_eq!(err, "container with given ID already exists");
        assert_eq!(store.load("a").unwrap().pid, 42);
        let ids: Vec<String> = store.list().into_iter().map(|s| s.id).collect();
        assert_eq!(ids, ["a", "b"]);
        store.remove("a").unwrap();
        let err = store.load("a").unwrap_err().to_string();
        assert_eq!(err, "container does not exist");
    }

    #[test]
    fn bad_ids_are_refused() {
        for id in ["", ".", "..", "a/b", "a b"] {
            assert!(validate_id(id).is_err(), "{id:?}");
        }
        validate_id("podman-abc_1.2+3").unwrap();
    }

    #[test]
    fn oci_json_matches_runc() {
        let mut s = state("x");
        let v = s.oci_json();
        assert_eq!(v["status"], "created");
        assert_eq!(v["pid"], 42);
        assert_eq!(v["ociVersion"], OCI_VERSION);
        s.status = Status::Stopped;
        assert_eq!(s.oci_json()["pid"], 0);
    }
}
