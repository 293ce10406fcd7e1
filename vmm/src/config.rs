//! What a VM is built from: [`VmConfig`] and the device configurations it holds, the checks
//! run on them before anything is created, and [`SavedConfig`], the part of a configuration a
//! snapshot keeps to rebuild the VM from.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use crate::boot::{CpuMode, RAW_MIN_LOAD};
use crate::error::VmError;
use crate::{memory, mptable};

/// Kernel parameters every Husk guest gets, before the per-device and caller parts.
/// `noreplace-smp`: a 1-vCPU guest would otherwise rewrite every LOCK prefix of its kernel at
/// boot, one `text_poke` (and TLB flush) each, a noticeable share of a boot's CPU time; the
/// LOCK prefixes it would remove cost next to nothing on one vCPU.
/// `8250.nr_uarts=1`: there is only COM1, and probing the three other legacy ports costs VM exits.
pub const DEFAULT_CMDLINE: &str =
    "console=ttyS0 reboot=k panic=0 quiet no_timer_check noreplace-smp 8250.nr_uarts=1";

/// Everything needed to build a VM.
#[derive(Debug, Clone)]
pub struct VmConfig {
    /// Number of vCPUs (1..=254).
    pub vcpus: u8,
    /// Guest RAM in MiB (at least 64).
    pub memory_mib: u32,
    /// What the guest runs.
    pub boot: Boot,
    /// Where the serial console goes.
    pub serial: SerialOutput,
    /// An optional virtio-vsock device.
    pub vsock: Option<VsockConfig>,
    /// virtio-blk devices, in guest order (vda, vdb, ...).
    pub blocks: Vec<BlockConfig>,
    /// Host directories shared over virtio-9p, each under its mount tag.
    pub shares: Vec<ShareConfig>,
    /// The KVM device node (`/dev/kvm`; tests point it elsewhere).
    pub kvm_device: PathBuf,
}

impl VmConfig {
    /// One vCPU, 64 MiB, serial discarded, no devices, `/dev/kvm`.
    pub fn new(boot: Boot) -> Self {
        Self {
            vcpus: 1,
            memory_mib: memory::MIN_MEMORY_MIB,
            boot,
            serial: SerialOutput::Sink,
            vsock: None,
            blocks: Vec::new(),
            shares: Vec::new(),
            kvm_device: PathBuf::from("/dev/kvm"),
        }
    }
}

/// What the guest runs.
#[derive(Debug, Clone)]
pub enum Boot {
    /// An uncompressed `vmlinux` with a PVH entry note.
    Linux {
        /// The vmlinux ELF.
        kernel: PathBuf,
        /// An initramfs handed to the kernel as the PVH module.
        initramfs: Option<PathBuf>,
        /// Appended to `DEFAULT_CMDLINE` and the virtio device entries.
        cmdline: String,
    },
    /// A flat binary (test guests). Every vCPU starts at `entry` in `mode`, with RDI (or EDI,
    /// DI) = its index; there is no INIT/SIPI protocol.
    Raw {
        /// The bytes to load.
        image: Vec<u8>,
        /// Guest-physical load address (at least `boot::RAW_MIN_LOAD`).
        load_addr: u64,
        /// First instruction, inside the image.
        entry: u64,
        /// The CPU mode at `entry`.
        mode: CpuMode,
    },
}

/// Where the serial console goes.
#[derive(Debug, Clone)]
pub enum SerialOutput {
    /// This process's stdout.
    Stdout,
    /// A file, created or truncated.
    File(PathBuf),
    /// An in-memory buffer (tests).
    Capture(Arc<Mutex<Vec<u8>>>),
    /// Nowhere (the console log for error reports is still kept).
    Sink,
}

/// A virtio-vsock device whose host side is a unix socket.
#[derive(Debug, Clone)]
pub struct VsockConfig {
    /// The guest's context id (at least 3).
    pub guest_cid: u32,
    /// Host-side unix socket path.
    pub uds_path: PathBuf,
}

/// A virtio-blk device backed by a file.
#[derive(Debug, Clone)]
pub struct BlockConfig {
    /// Backing file or block device.
    pub path: PathBuf,
    /// Expose the device read-only.
    pub read_only: bool,
}

/// A host directory the guest mounts with `mount -t 9p -o trans=virtio <tag> <dir>`.
///
/// The server sees the share through a mount namespace of its own, built from these fields:
/// every mount in it is `nodev,nosuid` (and read-only for a read-only share), so the guest
/// never opens a host device node and the kernel enforces the read-only flag.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ShareConfig {
    /// The mount tag the guest names it by.
    pub tag: String,
    /// The host directory.
    pub path: PathBuf,
    /// Refuse every write from the guest.
    pub read_only: bool,
    /// Expose only these entries of `path` (single names, no `/`): the share is then a
    /// directory holding just them, not their siblings. `None` exposes all of `path`.
    pub only: Option<Vec<OsString>>,
    /// Paths relative to `path` served read-only even when the share is writable: the
    /// sources of read-only binds that lie inside this one. They must contain no symlink.
    pub read_only_paths: Vec<PathBuf>,
}

impl ShareConfig {
    /// All of `path` under `tag`.
    pub fn dir(tag: &str, path: &Path, read_only: bool) -> Self {
        Self {
            tag: tag.to_string(),
            path: path.to_path_buf(),
            read_only,
            ..Self::default()
        }
    }
}

/// Rejects bad inputs before anything is created.
pub(crate) fn validate(cfg: &VmConfig) -> Result<(), VmError> {
    if cfg.vcpus == 0 || cfg.vcpus > mptable::MAX_VCPUS {
        return Err(VmError::Config(format!(
            "vCPU count {} is outside 1..={}",
            cfg.vcpus,
            mptable::MAX_VCPUS
        )));
    }
    if cfg.memory_mib < memory::MIN_MEMORY_MIB {
        return Err(VmError::Config(format!(
            "memory {} MiB is below the minimum of {} MiB",
            cfg.memory_mib,
            memory::MIN_MEMORY_MIB
        )));
    }
    if !cfg.kvm_device.exists() {
        return Err(VmError::KvmOpen {
            path: cfg.kvm_device.clone(),
            source: std::io::Error::from(std::io::ErrorKind::NotFound),
        });
    }
    if let Boot::Linux {
        kernel, initramfs, ..
    } = &cfg.boot
    {
        check_readable(kernel).map_err(|source| VmError::KernelRead {
            path: kernel.clone(),
            source,
        })?;
        if let Some(p) = initramfs {
            check_readable(p).map_err(|source| VmError::InitramfsRead {
                path: p.clone(),
                source,
            })?;
        }
    }
    for b in &cfg.blocks {
        check_readable(&b.path).map_err(|e| VmError::Block {
            path: b.path.clone(),
            reason: e.to_string(),
        })?;
    }
    if let Some(v) = &cfg.vsock {
        if v.guest_cid < 3 {
            return Err(VmError::Config(format!(
                "vsock guest CID {} must be at least 3",
                v.guest_cid
            )));
        }
    }
    Ok(())
}

fn check_readable(path: &Path) -> std::io::Result<()> {
    std::fs::File::open(path).map(drop)
}

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
    /// 9p shares: tag, host directory, read-only flag. A share's `only` and
    /// `read_only_paths` are not kept: a restore that serves them passes its shares again
    /// (`RestoreOverrides::shares`, as every clone and checkpoint restore of the runtime does).
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
            load_addr: RAW_MIN_LOAD,
            entry: RAW_MIN_LOAD,
            mode: CpuMode::Long,
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
            .map(|(tag, path, read_only)| ShareConfig::dir(tag, path, *read_only))
            .collect();
        cfg.vsock = self.vsock.as_ref().map(|(cid, path)| VsockConfig {
            guest_cid: *cid,
            uds_path: path.clone(),
        });
        cfg
    }
}
