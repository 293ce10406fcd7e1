//! Mounting the host's virtio 9p shares (the container's rootfs and bind-mount sources).

use std::path::Path;

use nix::mount::MsFlags;

use husk_agent::proto::ShareMount;

/// Mounts every share in order; the first failure ends it with a message naming the share.
pub fn mount(shares: &[ShareMount]) -> Result<(), String> {
    shares.iter().try_for_each(mount_one)
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
    nix::mount::mount(
        Some(share.tag.as_str()),
        target,
        Some("9p"),
        flags,
        Some(data.as_str()),
    )
    .map_err(|e| format!("mounting share {} on {}: {e}", share.tag, share.target))
}
