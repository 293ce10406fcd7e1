//! Where the guest kernel and the agent's initramfs are found.
//!
//! Order: an explicit path, then `$HUSK_KERNEL` / `$HUSK_INITRAMFS`, then `<dir of the husk
//! binary>/../husk/` (the build scripts put them in `target/husk/`), then `/usr/share/husk/`.

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};

pub const KERNEL_FILE: &str = "vmlinux";
pub const INITRAMFS_FILE: &str = "initramfs.cpio";

/// The guest kernel to boot.
pub fn kernel(explicit: Option<&Path>) -> Result<PathBuf> {
    find(
        explicit,
        "HUSK_KERNEL",
        KERNEL_FILE,
        "guest-kernel/build.sh",
    )
}

/// The initramfs holding the agent.
pub fn initramfs(explicit: Option<&Path>) -> Result<PathBuf> {
    find(
        explicit,
        "HUSK_INITRAMFS",
        INITRAMFS_FILE,
        "agent/build-initramfs.sh",
    )
}

fn find(explicit: Option<&Path>, var: &str, file: &str, builder: &str) -> Result<PathBuf> {
    if let Some(p) = explicit {
        return Ok(p.to_path_buf());
    }
    if let Some(p) = std::env::var_os(var) {
        return Ok(PathBuf::from(p));
    }
    let candidates = default_dirs().into_iter().map(|d| d.join(file));
    let tried: Vec<PathBuf> = candidates.collect();
    if let Some(found) = tried.iter().find(|p| p.is_file()) {
        return Ok(found.clone());
    }
    let list: Vec<String> = tried.iter().map(|p| p.display().to_string()).collect();
    bail!(
        "no guest {file} found (looked in {}; set {var} or run {builder})",
        list.join(", ")
    )
}

fn default_dirs() -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    if let Ok(exe) = std::env::current_exe() {
        if let Some(bin_dir) = exe.parent() {
            dirs.push(bin_dir.join("../husk"));
        }
    }
    dirs.push(PathBuf::from("/usr/share/husk"));
    dirs
}
