//! How a bundle reaches the guest: the rootfs and every bind-mount source become virtio-9p
//! shares served by the monitor itself (so templates and shared directories work together),
//! and the spec handed to the agent names the guest paths where they are mounted.
//!
//! Shares fill numbered slots, `share0` (the rootfs), `share1`, ...: a template has a fixed
//! number of them (virtio-mmio devices are found at boot), and a cold boot names its shares
//! the same way so that both paths look alike to the guest.
//!
//! A share exposes what was bound and no more (the monitor enforces it, see `ShareConfig`): a
//! directory bind shares the directory; a file bind shares a view of its directory holding
//! only the files bound from it (podman's hosts, hostname and resolv.conf, which live in one
//! directory, take one slot together); and a read-only bind that lies inside a writable
//! share stays read-only when the guest reaches it through that share.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use husk_templates::{slot_tag, SHARE_SLOTS};
use husk_vmm::ShareConfig;

use super::bundle::Bundle;
use super::state::{ContainerState, Status};

/// Where the agent finds the container's root filesystem.
pub const GUEST_ROOTFS: &str = "/run/husk/rootfs";
const GUEST_SHARES: &str = "/run/husk/shares";
/// 9p message size: the largest the VMM's server agrees to.
const MSIZE: u32 = 65560;

pub struct GuestPlan {
    pub shares: Vec<ShareConfig>,
    /// How the guest mounts each share, in order.
    mounts: Vec<husk_agent::proto::ShareMount>,
    /// config.json with bind sources rewritten to guest paths.
    pub spec: serde_json::Value,
}

impl GuestPlan {
    pub fn new(bundle: &Bundle) -> Result<GuestPlan> {
        let mut plan = GuestPlan {
            shares: Vec::new(),
            mounts: Vec::new(),
            spec: bundle.raw.clone(),
        };
        plan.add_share(canonical(&bundle.rootfs), GUEST_ROOTFS, false, None);
        if let Some(mounts) = plan.spec["mounts"].as_array_mut().map(std::mem::take) {
            let rewritten = mounts
                .into_iter()
                .enumerate()
                .map(|(i, m)| plan.rewrite_mount(i, m, &bundle.dir))
                .collect::<Result<Vec<_>>>()?;
            plan.spec["mounts"] = serde_json::Value::Array(rewritten);
        }
        plan.nest_read_only_binds();
        plan.localise_network_namespace();
        super::rootfs_lookup::resolve_into(&mut plan.spec, &bundle.spec, &bundle.rootfs);
        if plan.shares.len() > usize::from(SHARE_SLOTS) {
            bail!(
                "the bundle needs {} shared directories (the rootfs and {} bind-mount directories), but a micro-VM has {SHARE_SLOTS} share slots",
                plan.shares.len(),
                plan.shares.len() - 1
            );
        }
        Ok(plan)
    }

    /// Hands the guest what its `startContainer` hooks read on stdin (see
    /// `HOOK_STATE_ANNOTATION`): they run in the container, which the guest's init builds.
    pub fn add_hook_state(&mut self, state: &ContainerState) -> Result<()> {
        let has_hooks = self.spec["hooks"]["startContainer"]
            .as_array()
            .is_some_and(|h| !h.is_empty());
        if !has_hooks {
            return Ok(());
        }
        let json = serde_json::to_string(&state.hook_state(Status::Created))?;
        if !self.spec["annotations"].is_object() {
            self.spec["annotations"] = serde_json::json!({});
        }
        self.spec["annotations"][husk_agent::proto::HOOK_STATE_ANNOTATION] = json.into();
        Ok(())
    }

    /// A network namespace given by path (podman's `/run/netns/…`) lives on the host, which the
    /// guest cannot enter; the container gets a namespace of its own in the guest instead. It
    /// has loopback only: the micro-VM has no network device yet, so the host namespace's
    /// interfaces are not mirrored into it.
    fn localise_network_namespace(&mut self) {
        let Some(namespaces) = self.spec["linux"]["namespaces"].as_array_mut() else {
            return;
        };
        for ns in namespaces.iter_mut() {
            if ns["type"] == "network" {
                // No warning: the monitor's stderr is the container's.
                if let Some(obj) = ns.as_object_mut() {
                    obj.remove("path");
                }
            }
        }
    }

    /// What each of a template's `slots` share slots serves: the plan's shares first, then
    /// `placeholder` (read-only) for the unused ones.
    pub fn slot_shares(&self, slots: usize, placeholder: &Path) -> Vec<ShareConfig> {
        let unused =
            (self.shares.len()..).map(|i| ShareConfig::dir(&slot_tag(i), placeholder, true));
        self.shares
            .iter()
            .cloned()
            .chain(unused)
            .take(slots.max(self.shares.len()))
            .collect()
    }

    /// Shares the directory `host` (once per directory and mode: every share costs the guest
    /// a device and an interrupt line); returns the guest directory it is mounted on.
    fn share_dir(&mut self, host: PathBuf, read_only: bool) -> String {
        let same = |s: &ShareConfig| s.path == host && s.read_only == read_only && s.only.is_none();
        match self.shares.iter().position(same) {
            Some(i) => self.mounts[i].target.clone(),
            None => self.add_share(host, &self.next_guest_dir(), read_only, None),
        }
    }

    /// Shares the file `host` alone, in a view of its directory that holds the files bound
    /// from it in the same mode (or in the directory's own share if that directory is shared
    /// whole in that mode already); returns the file's guest path.
    fn share_file(&mut self, host: &Path, read_only: bool) -> String {
        let dir = host.parent().unwrap_or(Path::new("/")).to_path_buf();
        let name = host.file_name().map(OsString::from).unwrap_or_default();
        let same_dir = |s: &ShareConfig| s.path == dir && s.read_only == read_only;
        let guest = match self.shares.iter().position(same_dir) {
            Some(i) => {
                if let Some(only) = self.shares[i].only.as_mut().filter(|o| !o.contains(&name)) {
                    only.push(name.clone());
                }
                self.mounts[i].target.clone()
            }
            None => {
                let only = Some(vec![name.clone()]);
                self.add_share(dir, &self.next_guest_dir(), read_only, only)
            }
        };
        format!("{guest}/{}", Path::new(&name).display())
    }

    fn next_guest_dir(&self) -> String {
        format!("{GUEST_SHARES}/{}", self.shares.len())
    }

    /// Puts `host` in the next slot; returns `guest`.
    fn add_share(
        &mut self,
        host: PathBuf,
        guest: &str,
        read_only: bool,
        only: Option<Vec<OsString>>,
    ) -> String {
        let tag = slot_tag(self.shares.len());
        self.mounts.push(husk_agent::proto::ShareMount {
            tag: tag.clone(),
            target: guest.to_string(),
            read_only,
            msize: MSIZE,
            shared: host_mount_is_shared(&host),
        });
        self.shares.push(ShareConfig {
            only,
            ..ShareConfig::dir(&tag, &host, read_only)
        });
        guest.to_string()
    }

    /// Gives every writable directory share the read-only binds that lie inside it, so that
    /// the guest cannot write to them through it.
    fn nest_read_only_binds(&mut self) {
        let read_only: Vec<PathBuf> = self
            .shares
            .iter()
            .filter(|s| s.read_only)
            .flat_map(exposed_paths)
            .collect();
        for outer in self
            .shares
            .iter_mut()
            .filter(|s| !s.read_only && s.only.is_none())
        {
            let inside = read_only
                .iter()
                .filter_map(|p| p.strip_prefix(&outer.path).ok())
                .filter(|rel| !rel.as_os_str().is_empty());
            for rel in inside {
                if !outer.read_only_paths.iter().any(|p| p == rel) {
                    outer.read_only_paths.push(rel.to_path_buf());
                }
            }
        }
    }

    /// A bind mount's host source becomes a share. Sources are resolved first (symlinks
    /// followed), so that the share is the bound file or directory itself.
    fn rewrite_mount(
        &mut self,
        i: usize,
        mut m: serde_json::Value,
        bundle_dir: &Path,
    ) -> Result<serde_json::Value> {
        if !is_bind(&m) {
            return Ok(m);
        }
        let Some(source) = m["source"].as_str() else {
            bail!("mount {i}: bind mount without a source");
        };
        let given = bundle_dir.join(source);
        let host = std::fs::canonicalize(&given)
            .with_context(|| format!("bind mount source {}", given.display()))?;
        let meta = std::fs::metadata(&host)
            .with_context(|| format!("bind mount source {}", host.display()))?;
        let read_only = has_option(&m, "ro");
        let guest_source = if meta.is_dir() {
            self.share_dir(host, read_only)
        } else {
            self.share_file(&host, read_only)
        };
        m["source"] = serde_json::Value::String(guest_source);
        Ok(m)
    }

    /// The agent request that mounts every share on its guest directory.
    pub fn mount_request(&self) -> husk_agent::proto::Request {
        let shares = self.mounts.clone();
        husk_agent::proto::Request::MountShares { shares }
    }
}

/// Whether the host mount holding `dir` is shared: a runc container's bind of it would then
/// stay in touch with the host's (see `ShareMount::shared`). Not shared when unknown.
fn host_mount_is_shared(dir: &Path) -> bool {
    let Ok(mountinfo) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    husk_agent::mountinfo::holding_mount(&mountinfo, dir).is_some_and(|(_, shared)| shared)
}

/// The host paths a share lets the guest reach: its directory, or the files it lists.
fn exposed_paths(s: &ShareConfig) -> Vec<PathBuf> {
    match &s.only {
        None => vec![s.path.clone()],
        Some(names) => names.iter().map(|n| s.path.join(n)).collect(),
    }
}

/// `path` with symlinks resolved, for comparing shares; as given if it cannot be resolved
/// (the share then fails to open with a message naming it).
fn canonical(path: &Path) -> PathBuf {
    std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf())
}

fn is_bind(m: &serde_json::Value) -> bool {
    m["type"].as_str() == Some("bind") || has_option(m, "bind") || has_option(m, "rbind")
}

fn has_option(m: &serde_json::Value, opt: &str) -> bool {
    m["options"]
        .as_array()
        .is_some_and(|o| o.iter().any(|v| v.as_str() == Some(opt)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_host_network_namespace_becomes_the_guests_own() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("rootfs")).unwrap();
        let spec = json!({
            "ociVersion": "1.0.2",
            "process": {"args": ["true"], "cwd": "/", "user": {"uid": 0, "gid": 0}},
            "root": {"path": "rootfs"},
            "linux": {"namespaces": [
                {"type": "network", "path": "/run/netns/netns-x"},
                {"type": "pid"}
            ]}
        });
        std::fs::write(dir.path().join("config.json"), spec.to_string()).unwrap();
        let plan = GuestPlan::new(&Bundle::load(dir.path()).unwrap()).unwrap();
        assert_eq!(
            plan.spec["linux"]["namespaces"],
            json!([{"type": "network"}, {"type": "pid"}])
        );
    }

    #[test]
    fn binds_become_shares_once_per_directory() {
        let dir = tempfile::tempdir().unwrap();
        let b = dir.path();
        std::fs::create_dir_all(b.join("rootfs")).unwrap();
        std::fs::create_dir_all(b.join("data")).unwrap();
        std::fs::write(b.join("hosts"), "").unwrap();
        std::fs::write(b.join("hostname"), "").unwrap();
        let spec = json!({
            "ociVersion": "1.0.2",
            "process": {"args": ["sh"], "cwd": "/", "user": {"uid": 0, "gid": 0}},
            "root": {"path": "rootfs"},
            "mounts": [
                {"destination": "/proc", "type": "proc", "source": "proc"},
                {"destination": "/data", "type": "bind", "source": b.join("data"), "options": ["rbind", "ro"]},
                {"destination": "/etc/hosts", "type": "bind", "source": b.join("hosts"), "options": ["bind"]},
                {"destination": "/etc/hostname", "type": "bind", "source": "hostname", "options": ["bind"]}
            ]
        });
        std::fs::write(b.join("config.json"), spec.to_string()).unwrap();
        let plan = GuestPlan::new(&Bundle::load(b).unwrap()).unwrap();
        let m = &plan.spec["mounts"];
        assert_eq!(m[0]["source"], "proc");
        assert_eq!(m[1]["source"], "/run/husk/shares/1");
        assert_eq!(m[2]["source"], "/run/husk/shares/2/hosts");
        assert_eq!(m[3]["source"], "/run/husk/shares/2/hostname");
        let tags: Vec<_> = plan
            .shares
            .iter()
            .map(|s| (s.tag.as_str(), s.read_only))
            .collect();
        assert_eq!(
            tags,
            [("share0", false), ("share1", true), ("share2", false)]
        );
        let slots = plan.slot_shares(4, Path::new("/empty"));
        let dir = |s: &ShareConfig| (s.tag.clone(), s.path.clone(), s.read_only);
        assert_eq!(dir(&slots[0]), ("share0".into(), b.join("rootfs"), false));
        assert_eq!(dir(&slots[1]), ("share1".into(), b.join("data"), true));
        assert_eq!(
            dir(&slots[3]),
            ("share3".into(), PathBuf::from("/empty"), true)
        );
        assert_eq!(slots[2].only, Some(vec!["hosts".into(), "hostname".into()]));
        assert_eq!(slots.len(), 4);
    }

    /// A bundle as podman writes it: the rootfs, its userdata directory (whose hosts,
    /// hostname, resolv.conf and .containerenv are bound, next to files that are not), the
    /// shm directory, and the user's `-v /etc/localtime:/etc/localtime:ro`.
    fn podman_bundle(b: &Path) -> serde_json::Value {
        let userdata = b.join("userdata");
        std::fs::create_dir_all(b.join("rootfs/etc")).unwrap();
        std::fs::create_dir_all(userdata.join("shm")).unwrap();
        for f in [
            "hosts",
            "hostname",
            "resolv.conf",
            ".containerenv",
            "config.json",
            "secret",
        ] {
            std::fs::write(userdata.join(f), "").unwrap();
        }
        std::fs::create_dir_all(b.join("etc")).unwrap();
        std::fs::create_dir_all(b.join("zoneinfo")).unwrap();
        std::fs::write(b.join("zoneinfo/UTC"), "TZif").unwrap();
        std::fs::write(b.join("etc/shadow"), "root:x").unwrap();
        std::os::unix::fs::symlink(b.join("zoneinfo/UTC"), b.join("etc/localtime")).unwrap();
        let bind = |dest: &str, src: PathBuf, opts: &[&str]| json!({"destination": dest, "type": "bind", "source": src, "options": opts});
        json!({
            "ociVersion": "1.0.2",
            "process": {"args": ["sh"], "cwd": "/", "user": {"uid": 0, "gid": 0}},
            "root": {"path": "rootfs"},
            "mounts": [
                {"destination": "/proc", "type": "proc", "source": "proc"},
                {"destination": "/dev", "type": "tmpfs", "source": "tmpfs"},
                bind("/dev/shm", userdata.join("shm"), &["bind", "rprivate", "nosuid", "noexec", "nodev"]),
                bind("/etc/resolv.conf", userdata.join("resolv.conf"), &["bind", "rprivate"]),
                bind("/etc/hosts", userdata.join("hosts"), &["bind", "rprivate"]),
                bind("/etc/hostname", userdata.join("hostname"), &["bind", "rprivate"]),
                bind("/run/.containerenv", userdata.join(".containerenv"), &["bind", "rprivate"]),
                bind("/etc/localtime", b.join("etc/localtime"), &["bind", "ro"]),
            ]
        })
    }

    #[test]
    fn podman_file_binds_share_only_the_bound_files() {
        let dir = tempfile::tempdir().unwrap();
        let b = &canonical(dir.path());
        std::fs::write(b.join("config.json"), podman_bundle(b).to_string()).unwrap();
        let plan = GuestPlan::new(&Bundle::load(b).unwrap()).unwrap();
        let shares: Vec<_> = plan
            .shares
            .iter()
            .map(|s| (s.path.clone(), s.read_only, s.only.clone()))
            .collect();
        let names = |n: &[&str]| Some(n.iter().map(OsString::from).collect::<Vec<_>>());
        assert_eq!(
            shares,
            [
                (b.join("rootfs"), false, None),
                (b.join("userdata/shm"), false, None),
                (
                    b.join("userdata"),
                    false,
                    names(&["resolv.conf", "hosts", "hostname", ".containerenv"])
                ),
                // The link is followed: the zone file alone, not /etc (nor /etc/shadow).
                (b.join("zoneinfo"), true, names(&["UTC"])),
            ]
        );
        let m = &plan.spec["mounts"];
        assert_eq!(m[2]["source"], "/run/husk/shares/1");
        assert_eq!(m[3]["source"], "/run/husk/shares/2/resolv.conf");
        assert_eq!(m[6]["source"], "/run/husk/shares/2/.containerenv");
        assert_eq!(m[7]["source"], "/run/husk/shares/3/UTC");
        assert!(plan.shares.iter().all(|s| s.read_only_paths.is_empty()));
    }

    #[test]
    fn read_only_binds_inside_a_writable_share_are_listed_in_it() {
        let dir = tempfile::tempdir().unwrap();
        let b = &canonical(dir.path());
        for d in ["rootfs/etc", "vol/ro", "vol/rw"] {
            std::fs::create_dir_all(b.join(d)).unwrap();
        }
        std::fs::write(b.join("rootfs/etc/hosts"), "").unwrap();
        std::fs::write(b.join("vol/ro/f"), "").unwrap();
        let spec = json!({
            "ociVersion": "1.0.2",
            "process": {"args": ["sh"], "cwd": "/", "user": {"uid": 0, "gid": 0}},
            "root": {"path": "rootfs"},
            "mounts": [
                {"destination": "/vol", "type": "bind", "source": b.join("vol"), "options": ["rbind"]},
                {"destination": "/vol2", "type": "bind", "source": b.join("vol/ro"), "options": ["rbind", "ro"]},
                {"destination": "/vol3", "type": "bind", "source": b.join("vol/rw"), "options": ["rbind"]},
                {"destination": "/etc/hosts", "type": "bind", "source": b.join("rootfs/etc/hosts"), "options": ["bind", "ro"]}
            ]
        });
        std::fs::write(b.join("config.json"), spec.to_string()).unwrap();
        let plan = GuestPlan::new(&Bundle::load(b).unwrap()).unwrap();
        let nested: Vec<_> = plan
            .shares
            .iter()
            .map(|s| (s.path.clone(), s.read_only_paths.clone()))
            .collect();
        assert_eq!(
            nested,
            [
                (b.join("rootfs"), vec![PathBuf::from("etc/hosts")]),
                (b.join("vol"), vec![PathBuf::from("ro")]),
                (b.join("vol/ro"), vec![]),
                (b.join("vol/rw"), vec![]),
                (b.join("rootfs/etc"), vec![]),
            ]
        );
        assert_eq!(plan.shares[4].only, Some(vec![OsString::from("hosts")]));
    }

    #[test]
    fn more_directories_than_share_slots_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let b = dir.path();
        std::fs::create_dir_all(b.join("rootfs")).unwrap();
        let mounts: Vec<_> = (0..SHARE_SLOTS)
            .map(|i| {
                let src = b.join(format!("d{i}"));
                std::fs::create_dir_all(&src).unwrap();
                json!({"destination": format!("/d{i}"), "type": "bind", "source": src})
            })
            .collect();
        let spec = json!({
            "ociVersion": "1.0.2",
            "process": {"args": ["sh"], "cwd": "/", "user": {"uid": 0, "gid": 0}},
            "root": {"path": "rootfs"},
            "mounts": mounts
        });
        std::fs::write(b.join("config.json"), spec.to_string()).unwrap();
        let Err(e) = GuestPlan::new(&Bundle::load(b).unwrap()) else {
            panic!("accepted more directories than slots");
        };
        assert!(format!("{e:#}").contains("share slots"), "{e:#}");
    }

    #[test]
    fn a_missing_bind_source_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let b = dir.path();
        std::fs::create_dir_all(b.join("rootfs")).unwrap();
        let spec = json!({
            "ociVersion": "1.0.2",
            "process": {"args": ["sh"], "cwd": "/", "user": {"uid": 0, "gid": 0}},
            "root": {"path": "rootfs"},
            "mounts": [{"destination": "/x", "type": "bind", "source": "/nonexistent/src"}]
        });
        std::fs::write(b.join("config.json"), spec.to_string()).unwrap();
        let Err(e) = GuestPlan::new(&Bundle::load(b).unwrap()) else {
            panic!("accepted a missing bind source");
        };
        assert!(format!("{e:#}").contains("/nonexistent/src"), "{e:#}");
    }
}
