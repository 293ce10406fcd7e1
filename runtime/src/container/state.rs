//! The state directory: one directory per container under `--root`, holding `state.json`
//! (written atomically: a temp file renamed over the old one, so a reader never sees half).

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use oci_spec::runtime::Hooks;
use serde::{Deserialize, Serialize};

use super::bundle::Bundle;
use super::{monitor_alive, process_start_time};

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
    /// While the container is being created and no monitor has recorded itself yet (`pid`
    /// 0): the `create` that claimed the id, which tells a creation under way from one
    /// abandoned by a killed `create`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub creator: Option<Creator>,
    /// The bundle's hooks as `create` read them: later edits of config.json change nothing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hooks: Option<Hooks>,
}

/// The `create` process that claimed a container's id.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Creator {
    pub pid: i32,
    /// As [`ContainerState::pid_start_time`].
    pub start_time: u64,
}

impl ContainerState {
    /// The state `create` records as it claims the id: being created by this process, no
    /// monitor yet.
    pub fn creating(id: &str, bundle: &Bundle) -> ContainerState {
        let pid = std::process::id() as i32;
        let annotations = bundle.spec.annotations().clone().unwrap_or_default();
        ContainerState {
            bundle: bundle.dir.clone(),
            rootfs: bundle.rootfs.clone(),
            created: humantime::format_rfc3339_nanos(std::time::SystemTime::now()).to_string(),
            status: Status::Creating,
            annotations: annotations.into_iter().collect(),
            creator: process_start_time(pid).map(|start_time| Creator { pid, start_time }),
            hooks: bundle.spec.hooks().clone(),
            ..ContainerState::unknown(id)
        }
    }

    /// A stopped container `id` of which nothing is known (its state file is lost).
    pub fn unknown(id: &str) -> ContainerState {
        ContainerState {
            id: id.to_string(),
            bundle: PathBuf::new(),
            rootfs: PathBuf::new(),
            created: String::new(),
            status: Status::Stopped,
            pid: 0,
            pid_start_time: 0,
            annotations: BTreeMap::new(),
            cgroup_dirs: Vec::new(),
            page_file: None,
            guest_id: None,
            monitor_log: None,
            creator: None,
            hooks: None,
        }
    }

    /// Whether the process the container depends on still runs: its monitor, or while no
    /// monitor has recorded itself, the `create` that claimed it.
    pub fn owner_alive(&self) -> bool {
        match (self.pid, self.creator) {
            (0, Some(c)) => process_start_time(c.pid) == Some(c.start_time),
            _ => monitor_alive(self),
        }
    }

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

/// The state an OCI hook reads on its stdin, as runc gives it: no `rootfs`, `created` or
/// `owner`, and `pid` only while something runs.
#[derive(Serialize)]
pub struct HookState<'a> {
    #[serde(rename = "ociVersion")]
    pub oci_version: &'a str,
    pub id: &'a str,
    pub status: Status,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pid: Option<i32>,
    pub bundle: &'a Path,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: &'a BTreeMap<String, String>,
}

impl ContainerState {
    /// What its hooks read on stdin while the container is `status`.
    pub fn hook_state(&self, status: Status) -> HookState<'_> {
        HookState {
            oci_version: OCI_VERSION,
            id: &self.id,
            status,
            pid: (status != Status::Stopped && self.pid > 0).then_some(self.pid),
            bundle: &self.bundle,
            annotations: &self.annotations,
        }
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

    /// Claims the id of `state` and records it there, atomically: the state directory
    /// appears with its state file in it, so that no reader (nor a `create` killed midway)
    /// ever leaves one without the other. Fails the way runc does if the id is taken.
    pub fn claim(&self, state: &ContainerState) -> Result<PathBuf> {
        let taken = || anyhow::anyhow!("container with given ID already exists");
        validate_id(&state.id)?;
        let dir = self.dir(&state.id);
        if dir.exists() {
            return Err(taken());
        }
        fs::create_dir_all(&self.root)
            .with_context(|| format!("creating root {}", self.root.display()))?;
        // '@' is never in an id: `list` and `load` pass this directory by.
        let tmp = self.root.join(format!("claim@{}", std::process::id()));
        let _ = fs::remove_dir_all(&tmp);
        let claimed = fs::create_dir(&tmp)
            .and_then(|()| write_state(&tmp, state))
            .with_context(|| format!("creating {}", tmp.display()))
            .and_then(|()| match fs::rename(&tmp, &dir) {
                Ok(()) => Ok(dir),
                Err(e) if matches!(e.raw_os_error(), Some(libc::ENOTEMPTY | libc::EEXIST)) => {
                    Err(taken())
                }
                Err(e) => Err(e).with_context(|| format!("creating {}", dir.display())),
            });
        if claimed.is_err() {
            let _ = fs::remove_dir_all(&tmp);
        }
        claimed
    }

    pub fn save(&self, state: &ContainerState) -> Result<()> {
        Ok(write_state(&self.dir(&state.id), state)?)
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
        serde_json::from_slice(&data)
            .with_context(|| format!("the state file {} is damaged", path.display()))
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

/// Writes `state` into `dir` atomically (a temp file renamed over the old one).
fn write_state(dir: &Path, state: &ContainerState) -> std::io::Result<()> {
    let tmp = dir.join(format!(".{STATE_FILE}.tmp"));
    let mut f = fs::File::create(&tmp)?;
    f.write_all(&serde_json::to_vec_pretty(state)?)?;
    f.sync_all()?;
    fs::rename(&tmp, dir.join(STATE_FILE))
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
            bundle: "/b".into(),
            rootfs: "/b/rootfs".into(),
            created: "2026-01-01T00:00:00.000000001Z".into(),
            status: Status::Created,
            pid: 42,
            pid_start_time: 7,
            ..ContainerState::unknown(id)
        }
    }

    #[test]
    fn create_save_load_list_remove() {
        let root = tempfile::tempdir().unwrap();
        let store = StateRoot::new(root.path());
        store.claim(&state("b")).unwrap();
        store.claim(&state("a")).unwrap();
        let err = store.claim(&state("a")).unwrap_err().to_string();
        assert_eq!(err, "container with given ID already exists");
        let entries = fs::read_dir(root.path()).unwrap().count();
        assert_eq!(entries, 2, "a claim left its temporary directory");
        assert_eq!(store.load("a").unwrap().pid, 42);
        let ids: Vec<String> = store.list().into_iter().map(|s| s.id).collect();
        assert_eq!(ids, ["a", "b"]);
        store.remove("a").unwrap();
        let err = store.load("a").unwrap_err().to_string();
        assert_eq!(err, "container does not exist");
    }

    #[test]
    fn a_creation_lives_while_its_creator_and_then_its_monitor_runs() {
        let me = std::process::id() as i32;
        let start_time = process_start_time(me).unwrap();
        let mut s = state("x");
        s.status = Status::Creating;
        s.pid = 0;
        s.creator = Some(Creator {
            pid: me,
            start_time,
        });
        assert!(s.owner_alive());
        // A later process with the creator's pid is not the creator.
        s.creator = Some(Creator {
            pid: me,
            start_time: start_time + 1,
        });
        assert!(!s.owner_alive());
        // Once a monitor has recorded itself, it is what counts.
        s.pid = me;
        s.pid_start_time = start_time;
        assert!(s.owner_alive());
        s.pid_start_time = start_time + 1;
        assert!(!s.owner_alive());
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

    #[test]
    fn hook_state_is_runcs() {
        let mut s = state("x");
        s.annotations.insert("a".into(), "b".into());
        let json = |s: &ContainerState, status| serde_json::to_string(&s.hook_state(status));
        assert_eq!(
            json(&s, Status::Creating).unwrap(),
            r#"{"ociVersion":"1.0.2-dev","id":"x","status":"creating","pid":42,"bundle":"/b","annotations":{"a":"b"}}"#
        );
        s.annotations.clear();
        assert_eq!(
            json(&s, Status::Stopped).unwrap(),
            r#"{"ociVersion":"1.0.2-dev","id":"x","status":"stopped","bundle":"/b"}"#
        );
    }
}
