//! The on-disk format of the state file: a fixed little-endian header, then the body.
//!
//! ```text
//! offset size
//!      0    8  magic "HUSKSNAP"
//!      8    4  format version (FORMAT_VERSION)
//!     12    4  CPU-feature fingerprint of the host that took it (cpu_fingerprint)
//!     16    8  body length in bytes
//!     24    4  CRC-32 (IEEE) of the body
//!     28       body: SnapshotBody, postcard-encoded
//! ```
//!
//! The body is postcard (see the comment in Cargo.toml): KVM structures go in as the raw
//! bytes kvm-bindings' serde support gives them, everything else field by field. Any change
//! to `SnapshotBody` or to what it contains changes the format: bump `FORMAT_VERSION`.

use std::path::Path;

use kvm_bindings::CpuId;
use serde::{Deserialize, Serialize};

use super::vcpu_state::VcpuState;
use super::vm_state::KvmVmState;
use crate::config::SavedConfig;
use crate::error::VmError;
use crate::memory_file::RegionLayout;
use crate::persist::DeviceState;

/// First bytes of every state file.
pub const MAGIC: [u8; 8] = *b"HUSKSNAP";
/// The format this build writes and the only one it reads.
pub const FORMAT_VERSION: u32 = 2;
/// Size of the fixed header.
pub const HEADER_LEN: usize = 28;

/// The fixed header, decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Format version.
    pub version: u32,
    /// CPU-feature fingerprint of the host that wrote the snapshot.
    pub cpu_fingerprint: u32,
    /// Length of the body.
    pub body_len: u64,
    /// CRC-32 of the body.
    pub body_crc: u32,
}

/// Everything in a snapshot but guest memory.
#[derive(Debug, Serialize, Deserialize)]
pub struct SnapshotBody {
    /// How to rebuild the VM and its devices.
    pub config: SavedConfig,
    /// Where each RAM region lies in the memory file.
    pub memory: Vec<RegionLayout>,
    /// Whether the VM had the in-kernel irqchip and PIT.
    pub irqchip: bool,
    /// Irqchip, PIT and clock.
    pub vm: KvmVmState,
    /// One entry per vCPU, in index order.
    pub vcpus: Vec<VcpuState>,
    /// Device states by device id.
    pub devices: Vec<DeviceState>,
    /// State the host's KVM could not read and that the snapshot therefore lacks.
    pub skipped: Vec<String>,
}

/// A fingerprint of the CPU features KVM offers guests on this host: CRC-32 over every
/// supported CPUID entry. A snapshot restored on a host with another fingerprint could find
/// features missing that the guest already uses, so restore refuses it.
pub fn cpu_fingerprint(cpuid: &CpuId) -> u32 {
    let mut entries: Vec<_> = cpuid.as_slice().to_vec();
    // KVM's order is stable, but sorting makes the fingerprint independent of it.
    entries.sort_by_key(|e| (e.function, e.index));
    let mut hasher = crc32fast::Hasher::new();
    for mut e in entries {
        without_apic_id(&mut e);
        for word in [e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx] {
            hasher.update(&word.to_le_bytes());
        }
    }
    hasher.finalize()
}

/// Clears the APIC id fields: some KVMs (PVM hosts) fill them with the id of the host
/// CPU the ioctl ran on, and every vCPU gets its own id anyway (`cpuid::for_vcpu`).
fn without_apic_id(e: &mut kvm_bindings::kvm_cpuid_entry2) {
    const LEAF_FEATURES: u32 = 1;
    const LEAF_TOPOLOGY: u32 = 0xb;
    const LEAF_TOPOLOGY_V2: u32 = 0x1f;
    const LEAF_AMD_EXT_APIC: u32 = 0x8000_001e;
    match e.function {
        LEAF_FEATURES => e.ebx &= 0x00ff_ffff,
        LEAF_TOPOLOGY | LEAF_TOPOLOGY_V2 => e.edx = 0,
        LEAF_AMD_EXT_APIC => e.eax = 0,
        _ => {}
    }
}

/// Encodes the body and puts the header in front of it.
pub fn encode(body: &SnapshotBody, cpu_fingerprint: u32) -> Result<Vec<u8>, String> {
    let body = postcard::to_stdvec(body).map_err(|e| e.to_string())?;
    let mut out = Vec::with_capacity(HEADER_LEN + body.len());
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&cpu_fingerprint.to_le_bytes());
    out.extend_from_slice(&(body.len() as u64).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
    out.extend_from_slice(&body);
    Ok(out)
}

/// Checks magic, version, length and checksum of the state file `bytes` read from `path`;
/// returns the header and the body bytes.
pub fn check<'a>(path: &Path, bytes: &'a [u8]) -> Result<(Header, &'a [u8]), VmError> {
    let format_err = |reason: &str| VmError::SnapshotFormat {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    };
    if bytes.len() < HEADER_LEN || bytes[..8] != MAGIC {
        return Err(format_err("not a Husk snapshot (bad magic)"));
    }
    let word = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap_or_default());
    let header = Header {
        version: word(8),
        cpu_fingerprint: word(12),
        body_len: u64::from_le_bytes(bytes[16..24].try_into().unwrap_or_default()),
        body_crc: word(24),
    };
    if header.version != FORMAT_VERSION {
        return Err(VmError::SnapshotVersion {
            path: path.to_path_buf(),
            found: header.version,
            expected: FORMAT_VERSION,
        });
    }
    let body = &bytes[HEADER_LEN..];
    if body.len() as u64 != header.body_len {
        return Err(format_err(&format!(
            "body is {} bytes, header says {}",
            body.len(),
            header.body_len
        )));
    }
    let crc = crc32fast::hash(body);
    if crc != header.body_crc {
        return Err(VmError::SnapshotChecksum {
            path: path.to_path_buf(),
            found: crc,
            expected: header.body_crc,
        });
    }
    Ok((header, body))
}

/// Reads, checks and decodes the state file at `path` (without the host checks a restore
/// adds): for tools and tests that inspect a snapshot.
pub fn read(path: &Path) -> Result<(Header, SnapshotBody), VmError> {
    let bytes = std::fs::read(path).map_err(|source| VmError::SnapshotIo {
        path: path.to_path_buf(),
        source,
    })?;
    let (header, body) = check(path, &bytes)?;
    Ok((header, decode(path, body)?))
}

/// Decodes a body that passed `check`.
pub fn decode(path: &Path, body: &[u8]) -> Result<SnapshotBody, VmError> {
    postcard::from_bytes(body).map_err(|e| VmError::SnapshotFormat {
        path: path.to_path_buf(),
        reason: format!("body does not decode: {e}"),
    })
}

#[cfg(test)]
mod tests;
