//! How a bundle reaches the guest: the rootfs and every bind-mount source become virtio-9p
//! shares served by the monitor itself (so templates and shared directories work together),
//! and the spec handed to the agent names the guest paths where they are mounted.
//!
//! Shares fill numbered slots, `share0` (the rootfs), `share1`, ...: a template has a fixed
//! number of them (virtio-mmio devices are found at boot), and a cold boot names its shares
//! the same way so that both paths look alike to the guest.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use husk_templates::{slot_tag, SHARE_SLOTS};
use husk_vmm::ShareConfig;

use super::bundle::Bundle;

/// Where the agent finds the container's root filesystem.
pub const GUEST_ROOTFS: &str = "/run/husk/rootfs";
const GUEST_SHARES: &str = "/run/husk/shares";
/// 9p message size: the largest the VMM's server agrees to.
const MSIZE: u32 = 65560;

pub struct GuestPlan {
    pub shares: Vec<ShareConfig>,
    /// (tag, guest mount point, read-only) for each share, in order.
    mounts: Vec<(String, String, bool)>,
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
        plan.add_share(&bundle.rootfs, GUEST_ROOTFS, false);
        if let Some(mounts) = plan.spec["mounts"].as_array_mut().map(std::mem::take) {
            let rewritten = mounts
                .into_iter()
                .enumerate()
                .map(|(i, m)| plan.rewrite_mount(i, m, &bundle.dir))
                .collect::<Result<Vec<_>>>()?;
            plan.spec["mounts"] = serde_json::Value::Array(rewritten);
        }
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

    /// Host directory and read-only flag for each of a template's `slots` share slots: the
    /// plan's shares first, then `placeholder` (read-only) for the unused ones.
    pub fn slot_directories(&self, slots: usize, placeholder: &Path) -> Vec<(PathBuf, bool)> {
        let used = self.shares.iter().map(|s| (s.path.clone(), s.read_only));
        let unused = std::iter::repeat((placeholder.to_path_buf(), true));
        used.chain(unused)
            .take(slots.max(self.shares.len()))
            .collect()
    }

    /// Shares `host` (once per directory and mode: podman binds several files of one
    /// directory, and every share costs the guest a device and an interrupt line); returns the
    /// guest directory it is mounted on.
    fn share(&mut self, host: &Path, read_only: bool) -> String {
        let same = |s: &ShareConfig| s.path == host && s.read_only == read_only;
        if let Some(i) = self.shares.iter().position(same) {
            return self.mounts[i].1.clone();
        }
        let n = self.shares.len();
        let guest = format!("{GUEST_SHARES}/{n}");
        self.add_share(host, &guest, read_only);
        guest
    }

    /// Puts `host` in the next slot.
    fn add_share(&mut self, host: &Path, guest: &str, read_only: bool) {
        let tag = slot_tag(self.shares.len());
        self.shares.push(ShareConfig {
            tag: tag.clone(),
            path: host.to_path_buf(),
            read_only,
        });
        self.mounts.push((tag, guest.to_string(), read_only));
    }

    /// A bind mount's host source becomes a share; a file is reached through its directory.
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
        let host = bundle_dir.join(source);
        let meta = std::fs::metadata(&host)
            .with_context(|| format!("bind mount source {}", host.display()))?;
        let read_only = has_option(&m, "ro");
        let guest_source = if meta.is_dir() {
            self.share(&host, read_only)
        } else {
            let parent = host.parent().unwrap_or(Path::new("/"));
            let name = host.file_name().map(PathBuf::from).unwrap_or_default();
            format!("{}/{}", self.share(parent, read_only), name.display())
        };
        m["source"] = serde_json::Value::String(guest_source);
        Ok(m)
    }

    /// The agent request that mounts every share on its guest directory.
    pub fn mount_request(&self) -> husk_agent::proto::Request {
        let shares = self
            .mounts
            .iter()
            .map(|(tag, dir, ro)| husk_agent::proto::ShareMount {
                tag: tag.clone(),
                target: dir.clone(),
                read_only: *ro,
                msize: MSIZE,
            })
            .collect();
        husk_agent::proto::Request::MountShares { shares }
    }
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
        let slots = plan.slot_directories(4, Path::new("/empty"));
        assert_eq!(slots[0], (b.join("rootfs"), false));
        assert_eq!(slots[1], (b.join("data"), true));
        assert_eq!(slots[3], (PathBuf::from("/empty"), true));
        assert_eq!(slots.len(), 4);
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
