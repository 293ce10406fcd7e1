//! How a bundle reaches the guest: the rootfs and every bind-mount source become virtio-9p
//! shares served by the monitor itself (so templates and shared directories work together),
//! and the spec handed to the agent names the guest paths where they are mounted.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use husk_agent::client::Client;
use husk_vmm::ShareConfig;

use super::bundle::Bundle;

/// Where the agent finds the container's root filesystem.
pub const GUEST_ROOTFS: &str = "/run/husk/rootfs";
const ROOTFS_TAG: &str = "rootfs";
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
        plan.add_share(ROOTFS_TAG, &bundle.rootfs, GUEST_ROOTFS, false);
        if let Some(mounts) = plan.spec["mounts"].as_array_mut().map(std::mem::take) {
            let rewritten = mounts
                .into_iter()
                .enumerate()
                .map(|(i, m)| plan.rewrite_mount(i, m, &bundle.dir))
                .collect::<Result<Vec<_>>>()?;
            plan.spec["mounts"] = serde_json::Value::Array(rewritten);
        }
        Ok(plan)
    }

    fn add_share(&mut self, tag: &str, host: &Path, guest: &str, read_only: bool) {
        self.shares.push(ShareConfig {
            tag: tag.to_string(),
            path: host.to_path_buf(),
            read_only,
        });
        self.mounts
            .push((tag.to_string(), guest.to_string(), read_only));
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
        let tag = format!("bind{i}");
        let guest_dir = format!("{GUEST_SHARES}/{i}");
        let guest_source = if meta.is_dir() {
            self.add_share(&tag, &host, &guest_dir, read_only);
            guest_dir
        } else {
            let parent = host.parent().unwrap_or(Path::new("/"));
            let name = host.file_name().map(PathBuf::from).unwrap_or_default();
            self.add_share(&tag, parent, &guest_dir, read_only);
            format!("{guest_dir}/{}", name.display())
        };
        m["source"] = serde_json::Value::String(guest_source);
        Ok(m)
    }

    /// Mounts every share at its guest path (the agent runs busybox's mount).
    pub fn mount_shares<S: std::io::Read + std::io::Write>(
        &self,
        agent: &mut Client<S>,
    ) -> Result<()> {
        let mut script = String::from("set -e\n");
        for (tag, dir, ro) in &self.mounts {
            let ro = if *ro { ",ro" } else { "" };
            script += &format!(
                "mkdir -p {dir} && mount -t 9p -o trans=virtio,version=9p2000.L,msize={MSIZE}{ro} {tag} {dir}\n"
            );
        }
        let req = husk_agent::ExecRequest {
            argv: vec!["/bin/sh".into(), "-c".into(), script],
            ..Default::default()
        };
        let out = agent
            .exec(&req)
            .context("mounting the shares in the guest")?;
        if !out.status.success() {
            bail!(
                "mounting the shares in the guest failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
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
