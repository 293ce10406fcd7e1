//! The part of a VM's configuration a restore rebuilds the VM from: sizes and the devices.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::vm::{BlockConfig, Boot, ShareConfig, VmConfig, VsockConfig};

/// The configuration of the snapshotted VM, minus what a snapshot replaces (boot image, serial
/// output, KVM device node).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedConfig {
    /// Number of vCPUs.
    pub vcpus: u8,
    /// Guest RAM in MiB.
    pub memory_mib: u32,
    /// Block devices: backing path and read-only flag, in guest order.
    pub blocks: Vec<(PathBuf, bool)>,
    /// 9p shares: tag, host directory, read-only flag.
    pub shares: Vec<(String, PathBuf, bool)>,
    /// The vsock device: guest CID and host socket path.
    pub vsock: Option<(u32, PathBuf)>,
}

impl From<&VmConfig> for SavedConfig {
    fn from(cfg: &VmConfig) -> Self {
        Self {
            vcpus: cfg.vcpus,
            memory_mib: cfg.memory_mib,
            blocks: cfg
                .blocks
                .iter()
                .map(|b| (b.path.clone(), b.read_only))
                .collect(),
            shares: cfg
                .shares
                .iter()
                .map(|s| (s.tag.clone(), s.path.clone(), s.read_only))
                .collect(),
            vsock: cfg
                .vsock
                .as_ref()
                .map(|v| (v.guest_cid, v.uds_path.clone())),
        }
    }
}

impl SavedConfig {
    /// A `VmConfig` that builds the same devices in the same order. The boot entry is an
    /// empty raw image: a restore never loads a guest.
    pub fn to_vm_config(&self) -> VmConfig {
        let mut cfg = VmConfig::new(Boot::Raw {
            image: Vec::new(),
            load_addr: crate::boot::RAW_MIN_LOAD,
            entry: crate::boot::RAW_MIN_LOAD,
            mode: crate::CpuMode::Long,
        });
        cfg.vcpus = self.vcpus;
        cfg.memory_mib = self.memory_mib;
        cfg.blocks = self
            .blocks
            .iter()
            .map(|(path, read_only)| BlockConfig {
                path: path.clone(),
                read_only: *read_only,
            })
            .collect();
        cfg.shares = self
            .shares
            .iter()
            .map(|(tag, path, read_only)| ShareConfig {
                tag: tag.clone(),
                path: path.clone(),
                read_only: *read_only,
            })
            .collect();
        cfg.vsock = self.vsock.as_ref().map(|(cid, path)| VsockConfig {
            guest_cid: *cid,
            uds_path: path.clone(),
        });
        cfg
    }
}
