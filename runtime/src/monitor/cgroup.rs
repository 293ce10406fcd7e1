//! The monitor's host cgroup: the micro-VM is the container as far as the host is concerned, so
//! `linux.resources` limits go on the monitor (which owns guest RAM, the vCPU threads and the
//! device threads), under the spec's `cgroupsPath` (default `/husk/<id>`). cgroups v1 (these
//! hosts) and v2 (the lab) are both handled.

use std::fs;
use std::path::{Component, Path, PathBuf};

use anyhow::{bail, Context, Result};

use crate::container::bundle::Bundle;

const CGROUP_ROOT: &str = "/sys/fs/cgroup";
/// Host memory the VMM needs beyond guest RAM (its own heap, thread stacks, device buffers,
/// page tables). The limit covers both, so that the guest hits its own limit first.
const VMM_OVERHEAD_MIB: u64 = 64;
/// v1 hierarchies the limits go to (cpu may be co-mounted with cpuacct; the link works).
const V1_CONTROLLERS: [&str; 2] = ["memory", "cpu"];
/// The cgroup, below each hierarchy's root, that holds the containers' own by default.
const DEFAULT_PARENT: &str = "husk";

/// Limits taken from `linux.resources`.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Limits {
    /// Bytes, guest RAM plus the VMM's overhead.
    pub memory: Option<u64>,
    /// (quota, period) in microseconds.
    pub cpu: Option<(i64, u64)>,
}

impl Limits {
    /// Reads the limits from the spec; `vm_memory_mib` is the guest RAM they were sized to.
    pub fn from_spec(spec: &serde_json::Value, vm_memory_mib: u32) -> Limits {
        let res = &spec["linux"]["resources"];
        let memory = res["memory"]["limit"]
            .as_i64()
            .filter(|l| *l > 0)
            .map(|_| (u64::from(vm_memory_mib) + VMM_OVERHEAD_MIB) << 20);
        let period = res["cpu"]["period"]
            .as_u64()
            .filter(|p| *p > 0)
            .unwrap_or(100_000);
        let cpu = res["cpu"]["quota"]
            .as_i64()
            .filter(|q| *q > 0)
            .map(|q| (q, period));
        Limits { memory, cpu }
    }
}

/// The cgroup path relative to the hierarchy root: the spec's `cgroupsPath` or `/husk/<id>`.
pub fn relative_path(spec: &serde_json::Value, id: &str) -> Result<PathBuf> {
    let given = spec["linux"]["cgroupsPath"].as_str().unwrap_or("");
    if given.contains(':') {
        bail!("cgroupsPath {given:?}: systemd cgroup paths are not supported (use cgroupfs)");
    }
    let path = if given.is_empty() {
        PathBuf::from(DEFAULT_PARENT).join(id)
    } else {
        PathBuf::from(given.trim_start_matches('/'))
    };
    if path
        .components()
        .any(|c| !matches!(c, Component::Normal(_)))
    {
        bail!("cgroupsPath {given:?} must be a plain path without '..'");
    }
    Ok(path)
}

/// Where the containers' cgroups go by default: the [`DEFAULT_PARENT`] of the v2 hierarchy
/// and of each v1 one Husk uses (those that do not exist included).
pub fn default_parents() -> Vec<PathBuf> {
    let root = Path::new(CGROUP_ROOT);
    let v1 = V1_CONTROLLERS.iter().map(|c| root.join(c));
    std::iter::once(root.to_path_buf())
        .chain(v1)
        .map(|h| h.join(DEFAULT_PARENT))
        .collect()
}

/// The directories `setup` makes for `rel` on this host: one on v2, one per v1 hierarchy.
pub fn dirs_for(rel: &Path) -> Vec<PathBuf> {
    let root = Path::new(CGROUP_ROOT);
    if root.join("cgroup.controllers").exists() {
        return vec![root.join(rel)];
    }
    V1_CONTROLLERS
        .iter()
        .map(|ctrl| root.join(ctrl))
        .filter(|hierarchy| hierarchy.is_dir())
        .map(|hierarchy| hierarchy.join(rel))
        .collect()
}

/// Creates the cgroup, applies `limits` and moves `pid` into it. Returns the directories made
/// (one per v1 hierarchy, one on v2), for `remove`. On error nothing is left behind.
pub fn setup(rel: &Path, limits: &Limits, pid: u32) -> Result<Vec<PathBuf>> {
    let root = Path::new(CGROUP_ROOT);
    let mut made = Vec::new();
    let result = if root.join("cgroup.controllers").exists() {
        setup_v2(root, rel, limits, pid, &mut made)
    } else {
        setup_v1(root, rel, limits, pid, &mut made)
    };
    if let Err(e) = result {
        remove(&made);
        return Err(e);
    }
    Ok(made)
}

fn setup_v2(
    root: &Path,
    rel: &Path,
    limits: &Limits,
    pid: u32,
    made: &mut Vec<PathBuf>,
) -> Result<()> {
    let dir = root.join(rel);
    enable_v2_controllers(root, rel);
    create(&dir, made)?;
    if let Some(bytes) = limits.memory {
        write(&dir, "memory.max", &bytes.to_string())?;
    }
    if let Some((quota, period)) = limits.cpu {
        write(&dir, "cpu.max", &format!("{quota} {period}"))?;
    }
    write(&dir, "cgroup.procs", &pid.to_string())
}

/// Lets every ancestor of `rel` hand the memory and cpu controllers down. Best effort: a
/// controller the host lacks shows up as an error when its limit file is written.
fn enable_v2_controllers(root: &Path, rel: &Path) {
    let enable = |dir: &Path| {
        for ctrl in ["+memory", "+cpu"] {
            let _ = fs::write(dir.join("cgroup.subtree_control"), ctrl);
        }
    };
    let mut dir = root.to_path_buf();
    enable(&dir);
    for part in rel.parent().into_iter().flat_map(Path::components) {
        dir.push(part);
        let _ = fs::create_dir(&dir);
        enable(&dir);
    }
}

fn setup_v1(
    root: &Path,
    rel: &Path,
    limits: &Limits,
    pid: u32,
    made: &mut Vec<PathBuf>,
) -> Result<()> {
    for ctrl in V1_CONTROLLERS {
        let hierarchy = root.join(ctrl);
        if !hierarchy.is_dir() {
            continue;
        }
        let dir = hierarchy.join(rel);
        fs::create_dir_all(dir.parent().unwrap_or(&hierarchy))
            .with_context(|| format!("creating {}", dir.display()))?;
        create(&dir, made)?;
        match (ctrl, limits) {
            (
                "memory",
                Limits {
                    memory: Some(bytes),
                    ..
                },
            ) => write(&dir, "memory.limit_in_bytes", &bytes.to_string())?,
            (
                "cpu",
                Limits {
                    cpu: Some((quota, period)),
                    ..
                },
            ) => {
                write(&dir, "cpu.cfs_period_us", &period.to_string())?;
                write(&dir, "cpu.cfs_quota_us", &quota.to_string())?;
            }
            _ => {}
        }
        write(&dir, "cgroup.procs", &pid.to_string())?;
    }
    if made.is_empty() {
        bail!("no memory or cpu cgroup hierarchy under {CGROUP_ROOT}");
    }
    Ok(())
}

fn create(dir: &Path, made: &mut Vec<PathBuf>) -> Result<()> {
    match fs::create_dir(dir) {
        Ok(()) => {
            made.push(dir.to_path_buf());
            Ok(())
        }
        // Left by a monitor that was killed before `delete`: an empty one is reused, as runc
        // joins an existing cgroup.
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            let procs = fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
            if !procs.trim().is_empty() {
                bail!("cgroup {} is in use by another process", dir.display());
            }
            made.push(dir.to_path_buf());
            Ok(())
        }
        Err(e) => Err(e).with_context(|| format!("creating cgroup {}", dir.display())),
    }
}

fn write(dir: &Path, file: &str, value: &str) -> Result<()> {
    let path = dir.join(file);
    fs::write(&path, value).with_context(|| format!("writing {value:?} to {}", path.display()))
}

/// Moves `pid` from the cgroups in `dirs` back to each hierarchy's root (`rel` is their path
/// below it), so that they can be removed while it lives on.
pub fn leave(dirs: &[PathBuf], rel: &Path, pid: u32) {
    let depth = rel.components().count();
    for dir in dirs {
        if let Some(root) = dir.ancestors().nth(depth) {
            let _ = fs::write(root.join("cgroup.procs"), pid.to_string());
        }
    }
}

/// The cgroup directories process `pid` is in that `setup` could have made (its v2 cgroup,
/// or its v1 memory and cpu ones), leaving out hierarchy roots: where a monitor whose state
/// is lost lives.
pub fn of_process(pid: i32) -> Vec<PathBuf> {
    let text = fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
    let root = Path::new(CGROUP_ROOT);
    let v2 = root.join("cgroup.controllers").exists();
    let mut dirs = Vec::new();
    for line in text.lines() {
        let mut fields = line.splitn(3, ':');
        let (Some(_), Some(controllers), Some(path)) =
            (fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        let rel = path.trim_start_matches('/');
        if rel.is_empty() || rel.split('/').any(|c| c == "..") {
            continue;
        }
        if v2 && controllers.is_empty() {
            dirs.push(root.join(rel));
        }
        for ctrl in V1_CONTROLLERS {
            if !v2 && controllers.split(',').any(|c| c == ctrl) {
                dirs.push(root.join(ctrl).join(rel));
            }
        }
    }
    dirs.retain(|d| d.is_dir());
    dirs
}

/// Removes the cgroup directories (empty once the monitor is gone). A cgroup lingers for a
/// moment after its last process exits, so busy directories are retried briefly.
pub fn remove(dirs: &[PathBuf]) {
    for dir in dirs {
        // A cgroup whose last process just exited stays busy for a moment.
        for _ in 0..250 {
            match fs::remove_dir(dir) {
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                    std::thread::sleep(std::time::Duration::from_millis(20))
                }
                _ => break,
            }
        }
    }
}

/// The monitor's host cgroup while the container is being created: if creation fails, the
/// monitor steps back out and removes it, so a failed create leaves no cgroup behind.
pub(super) struct HostCgroup {
    dirs: Vec<PathBuf>,
    rel: PathBuf,
}

impl HostCgroup {
    pub(super) fn join(bundle: &Bundle, id: &str) -> Result<HostCgroup> {
        let rel = relative_path(&bundle.raw, id)?;
        let limits = Limits::from_spec(&bundle.raw, bundle.vm_size().1);
        let dirs = setup(&rel, &limits, std::process::id())?;
        Ok(HostCgroup { dirs, rel })
    }

    /// Creation succeeded: the directories stay (for `delete` to remove).
    pub(super) fn keep(mut self) -> Vec<PathBuf> {
        std::mem::take(&mut self.dirs)
    }
}

impl Drop for HostCgroup {
    fn drop(&mut self) {
        if !self.dirs.is_empty() {
            leave(&self.dirs, &self.rel, std::process::id());
            remove(&self.dirs);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn limits_cover_guest_ram_and_the_vmm() {
        let spec = json!({"linux": {"resources": {
            "memory": {"limit": 256u64 << 20},
            "cpu": {"quota": 150000, "period": 100000}
        }}});
        let l = Limits::from_spec(&spec, 256);
        assert_eq!(l.memory, Some((256 + VMM_OVERHEAD_MIB) << 20));
        assert_eq!(l.cpu, Some((150000, 100000)));
        assert_eq!(Limits::from_spec(&json!({}), 256), Limits::default());
    }

    #[test]
    fn paths_default_to_husk_id_and_refuse_escapes() {
        assert_eq!(
            relative_path(&json!({}), "c1").unwrap(),
            PathBuf::from("husk/c1")
        );
        let given = json!({"linux": {"cgroupsPath": "/libpod_parent/libpod-x"}});
        assert_eq!(
            relative_path(&given, "c1").unwrap(),
            PathBuf::from("libpod_parent/libpod-x")
        );
        for bad in ["/a/../b", "system.slice:libpod:x"] {
            let spec = json!({"linux": {"cgroupsPath": bad}});
            assert!(relative_path(&spec, "c1").is_err(), "{bad}");
        }
    }
}
