//! Mounting the host's virtio 9p shares (the container's rootfs and bind-mount sources).

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use nix::mount::MsFlags;

use husk_agent::proto::ShareMount;

use super::lock::lock;

/// The guest directories of the shares whose host mount is not shared, for containers to
/// make private in their namespaces (see `private_targets`).
static PRIVATE: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

/// Mounts every share in order; the first failure ends it with a message naming the share.
pub fn mount(shares: &[ShareMount]) -> Result<(), String> {
    shares.iter().try_for_each(mount_one)?;
    let private = shares.iter().filter(|s| !s.shared);
    *lock(&PRIVATE) = private.map(|s| PathBuf::from(&s.target)).collect();
    Ok(())
}

/// The shares a container's namespace must make private before anything else: under a
/// template's shared `/run` every share arrives in a spare helper's namespace as shared,
/// whatever the host's mount is.
pub fn private_targets() -> Vec<PathBuf> {
    lock(&PRIVATE).clone()
}

fn mount_one(share: &ShareMount) -> Result<(), String> {
    let target = Path::new(&share.target);
    std::fs::create_dir_all(target)
        .map_err(|e| format!("creating mount point {}: {e}", share.target))?;
    let mut flags = MsFlags::empty();
    if share.read_only {
        flags |= MsFlags::MS_RDONLY;
    }
    let data = format!("trans=virtio,version=9p2000.L,msize={}", share.msize);
    let what = |e| format!("mounting share {} on {}: {e}", share.tag, share.target);
    nix::mount::mount(
        Some(share.tag.as_str()),
        target,
        Some("9p"),
        flags,
        Some(data.as_str()),
    )
    .map_err(what)?;
    let propagation = match share.shared {
        true => MsFlags::MS_SHARED,
        false => MsFlags::MS_PRIVATE,
    };
    nix::mount::mount(
        None::<&str>,
        target,
        None::<&str>,
        propagation,
        None::<&str>,
    )
    .map_err(what)
}
