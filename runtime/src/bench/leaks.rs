//! What `husk bench soak` watches for leaks: a census of everything a container may leave
//! behind on the host, taken before the soak and after each batch, and the items there are
//! more of than at the baseline.
//!
//! Counted: husk processes (monitors, exec monitors), the soak's mounts, cgroups under Husk's
//! default cgroup parents, entries under the state root (state directories, sockets, files),
//! page files, template leases, and the soak process's own open fds.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::monitor::{cgroup, paging::PauseConfig};

/// Where the census looks.
pub(crate) struct Watched {
    /// The `--root` the soak's containers live under.
    pub state_root: PathBuf,
    /// Where paused containers' page files go.
    pub page_dir: PathBuf,
    /// The template store (its `.clones/` holds the leases).
    pub template_store: PathBuf,
}

impl Watched {
    /// The places husk run with `state_root` (and this environment) uses.
    pub fn husk_with(state_root: PathBuf) -> Result<Watched> {
        Ok(Watched {
            state_root,
            page_dir: PauseConfig::load()?.page_dir,
            template_store: husk_templates::Store::from_env().root().to_path_buf(),
        })
    }
}

/// One kind of thing and one thing of that kind (`("mount", "/x tmpfs tmpfs")`).
type Key = (&'static str, String);

/// How many of each thing there are at one moment.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct Census {
    counts: BTreeMap<Key, usize>,
}

impl Census {
    /// Counts everything `w` names.
    pub fn take(w: &Watched) -> Result<Census> {
        let mut c = Census::default();
        c.add_all("husk process", husk_processes());
        c.add_all("mount", mounts()?);
        for parent in cgroup::default_parents() {
            c.add_all("cgroup", cgroups(&parent));
        }
        c.add_all("state root entry", tree(&w.state_root));
        c.add_all("page file", entries(&w.page_dir));
        c.add_all("template lease", tree(&w.template_store.join(".clones")));
        c.add_all("open fd of the soak", own_fds());
        Ok(c)
    }

    pub fn add(&mut self, kind: &'static str, item: String) {
        *self.counts.entry((kind, item)).or_default() += 1;
    }

    fn add_all(&mut self, kind: &'static str, items: Vec<String>) {
        items.into_iter().for_each(|i| self.add(kind, i));
    }

    fn count(&self, key: &Key) -> usize {
        self.counts.get(key).copied().unwrap_or(0)
    }
}

/// Something there is more of than at the baseline.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Leak {
    pub kind: &'static str,
    pub item: String,
    /// How many more than at the baseline.
    pub extra: usize,
}

impl std::fmt::Display for Leak {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.kind, self.item)?;
        if self.extra > 1 {
            write!(f, " ({} more than before the soak)", self.extra)?;
        }
        Ok(())
    }
}

/// The baseline, and what has been reported as leaked since, so that a leak that stays is
/// reported (and counted) once, and again only if it grows.
pub(crate) struct LeakWatch {
    baseline: Census,
    reported: BTreeMap<Key, usize>,
}

impl LeakWatch {
    pub fn new(baseline: Census) -> LeakWatch {
        LeakWatch {
            baseline,
            reported: BTreeMap::new(),
        }
    }

    /// What `now` holds more of than the baseline and than any earlier report said.
    pub fn new_leaks(&mut self, now: &Census) -> Vec<Leak> {
        let mut leaks = Vec::new();
        for (key, &n) in &now.counts {
            let extra = n.saturating_sub(self.baseline.count(key));
            let known = self.reported.get(key).copied().unwrap_or(0);
            if extra > known {
                self.reported.insert(key.clone(), extra);
                leaks.push(Leak {
                    kind: key.0,
                    item: key.1.clone(),
                    extra,
                });
            }
        }
        leaks
    }
}

/// Processes (other than this one) running a binary named `husk`: `pid N: <cmdline>`.
fn husk_processes() -> Vec<String> {
    let me = std::process::id().to_string();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|name| name.bytes().all(|b| b.is_ascii_digit()) && *name != me)
        .filter(|pid| runs_husk(pid))
        .map(|pid| {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            format!("pid {pid}: {}", cmdline.trim_end())
        })
        .collect()
}

/// Whether /proc/PID/exe is a file named `husk` (the kernel marks a replaced one deleted).
fn runs_husk(pid: &str) -> bool {
    std::fs::read_link(format!("/proc/{pid}/exe")).is_ok_and(|exe| {
        let exe = exe.to_string_lossy();
        let exe = exe.strip_suffix(" (deleted)").unwrap_or(&exe);
        Path::new(exe).file_name().is_some_and(|n| n == "husk")
    })
}

/// This process's mounts, one `<mount point> <type> <source>` each.
fn mounts() -> Result<Vec<String>> {
    let text =
        std::fs::read_to_string("/proc/self/mountinfo").context("reading /proc/self/mountinfo")?;
    Ok(text.lines().filter_map(mount_item).collect())
}

/// `<mount point> <type> <source>` of one mountinfo line (mount ids change across remounts,
/// so they are left out).
fn mount_item(line: &str) -> Option<String> {
    let (head, tail) = line.split_once(" - ")?;
    let mount_point = head.split_whitespace().nth(4)?;
    let mut tail = tail.split_whitespace();
    let (fstype, source) = (tail.next()?, tail.next()?);
    Some(format!("{mount_point} {fstype} {source}"))
}

/// Every path below `dir` (not `dir` itself), directories marked with a trailing `/` and
/// sockets with a trailing `=`; empty when `dir` does not exist.
fn tree(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out
}

fn walk(base: &Path, dir: &Path, out: &mut Vec<String>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let rel = path.strip_prefix(base).unwrap_or(&path).display();
        let Ok(ty) = entry.file_type() else { continue };
        if ty.is_dir() {
            out.push(format!("{rel}/"));
            walk(base, &path, out);
        } else if std::os::unix::fs::FileTypeExt::is_socket(&ty) {
            out.push(format!("{rel}="));
        } else {
            out.push(rel.to_string());
        }
    }
}

/// The cgroups below `parent` (its directories; the files in them are the kernel's), each
/// with the pids still in it, if any.
fn cgroups(parent: &Path) -> Vec<String> {
    tree(parent)
        .into_iter()
        .filter(|p| p.ends_with('/'))
        .map(|rel| {
            let procs = std::fs::read_to_string(parent.join(&rel).join("cgroup.procs"));
            match procs
                .unwrap_or_default()
                .split_whitespace()
                .collect::<Vec<_>>()
            {
                pids if pids.is_empty() => format!("{}/{rel}", parent.display()),
                pids => format!("{}/{rel} (pids {})", parent.display(), pids.join(" ")),
            }
        })
        .collect()
}

/// The names in `dir`; empty when it does not exist.
fn entries(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| dir.join(e.file_name()).display().to_string())
                .collect()
        })
        .unwrap_or_default()
}

/// What each of this process's fds refers to (`socket:[123]`, a path, …).
fn own_fds() -> Vec<String> {
    let Ok(dir) = std::fs::read_dir("/proc/self/fd") else {
        return Vec::new();
    };
    // Collected before the links are read: the directory's own fd is among them.
    let fds: Vec<PathBuf> = dir.flatten().map(|e| e.path()).collect();
    fds.iter()
        .filter_map(|fd| std::fs::read_link(fd).ok())
        .map(|target| target.display().to_string())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn census(items: &[(&'static str, &str)]) -> Census {
        let mut c = Census::default();
        items.iter().for_each(|(k, i)| c.add(k, i.to_string()));
        c
    }

    fn shown(leaks: &[Leak]) -> Vec<String> {
        leaks.iter().map(Leak::to_string).collect()
    }

    #[test]
    fn only_what_outgrows_the_baseline_leaks_and_each_leak_is_reported_once() {
        let baseline = census(&[
            ("mount", "/ overlay overlay"),
            ("fd", "/dev/null"),
            ("fd", "/dev/null"),
            ("husk process", "pid 7: husk monitor"),
        ]);
        let mut watch = LeakWatch::new(baseline);
        // Gone since the baseline is no leak; a new item and a third /dev/null are.
        let now = census(&[
            ("mount", "/ overlay overlay"),
            ("mount", "/run/x tmpfs tmpfs"),
            ("fd", "/dev/null"),
            ("fd", "/dev/null"),
            ("fd", "/dev/null"),
        ]);
        assert_eq!(
            shown(&watch.new_leaks(&now)),
            ["fd: /dev/null", "mount: /run/x tmpfs tmpfs"]
        );
        // Still there: already reported.
        assert!(watch.new_leaks(&now).is_empty());
        // Grown again, and something new.
        let later = census(&[
            ("mount", "/run/x tmpfs tmpfs"),
            ("fd", "/dev/null"),
            ("fd", "/dev/null"),
            ("fd", "/dev/null"),
            ("fd", "/dev/null"),
            ("cgroup", "c1/"),
        ]);
        assert_eq!(
            shown(&watch.new_leaks(&later)),
            ["cgroup: c1/", "fd: /dev/null (2 more than before the soak)"]
        );
    }

    #[test]
    fn nothing_leaks_against_itself() {
        let c = census(&[("mount", "/ overlay overlay"), ("fd", "pipe:[5]")]);
        assert!(LeakWatch::new(c.clone()).new_leaks(&c).is_empty());
    }

    #[test]
    fn a_mount_is_its_point_type_and_source() {
        let line =
            "36 35 98:0 /mnt1 /mnt/parent rw,noatime master:1 - ext3 /dev/root rw,errors=continue";
        assert_eq!(
            mount_item(line).as_deref(),
            Some("/mnt/parent ext3 /dev/root")
        );
        let optional_fields = "25 1 0:22 / /run rw shared:5 master:2 - tmpfs tmpfs rw";
        assert_eq!(
            mount_item(optional_fields).as_deref(),
            Some("/run tmpfs tmpfs")
        );
        assert_eq!(mount_item("garbage"), None);
    }

    #[test]
    fn cgroups_are_directories_with_the_pids_left_in_them() {
        let dir = tempfile::tempdir().unwrap();
        for (cgroup, procs) in [("c1", "12\n13\n"), ("c2", "")] {
            std::fs::create_dir(dir.path().join(cgroup)).unwrap();
            std::fs::write(dir.path().join(cgroup).join("cgroup.procs"), procs).unwrap();
        }
        let mut found = cgroups(dir.path());
        found.sort();
        let d = dir.path().display();
        assert_eq!(found, [format!("{d}/c1/ (pids 12 13)"), format!("{d}/c2/")]);
    }

    #[test]
    fn a_tree_lists_paths_below_with_their_kind() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("c1")).unwrap();
        std::fs::write(dir.path().join("c1/state.json"), "{}").unwrap();
        let _sock = std::os::unix::net::UnixListener::bind(dir.path().join("c1/m.sock")).unwrap();
        let mut t = tree(dir.path());
        t.sort();
        assert_eq!(t, ["c1/", "c1/m.sock=", "c1/state.json"]);
        assert!(tree(&dir.path().join("missing")).is_empty());
    }
}
