//! What a share's server thread sees of the host: a mount namespace of its own, in which the
//! kernel enforces what the share exposes.
//!
//! The thread unshares its mount namespace (`CLONE_NEWNS`, which implies `CLONE_FS` and is
//! allowed in a multi-threaded process) and makes every mount in it private, so nothing it
//! does reaches the host's namespace, and nothing is left when the thread ends. Then:
//!
//! - every mount is made `nodev,nosuid`, and read-only for a read-only share: the server can
//!   neither open a device node in the share (from an image, or planted by anyone) nor write
//!   through a read-only share, whatever the guest sends;
//! - each of `read_only_paths` (a read-only bind nested in a writable share) gets a read-only
//!   bind mount of itself, so the outer share cannot write to it either;
//! - a share with `only` is a fresh read-only tmpfs holding a bind mount of each listed file
//!   and nothing else: the siblings of a bound file are not in the view at all, and the
//!   guest's writes to a bound file reach the host inode at once.
//!
//! Everything is done on file descriptors (the new mount API), so a path replaced on the host
//! while the view is built cannot redirect a mount. The view then becomes the namespace's
//! root (`pivot_root`) and the copies of the host's other mounts are dropped, so that the
//! thread neither sees them nor keeps their filesystems busy while the VM runs (where the
//! host's root cannot be pivoted away from, an initramfs, the thread chroots into the view
//! and keeps them).

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{unshare, CloneFlags};
use nix::unistd::{chroot, fchdir, pivot_root};
use rustix::fs::{fstat, openat, openat2, FileType, Mode, OFlags, ResolveFlags, CWD};
use rustix::mount::{
    fsconfig_create, fsconfig_set_string, fsmount, fsopen, move_mount, open_tree, FsMountFlags,
    FsOpenFlags, MountAttrFlags, MoveMountFlags, OpenTreeFlags,
};

use crate::config::ShareConfig;

/// `AT_RECURSIVE` (linux/fcntl.h): mount_setattr applies to the whole tree below the mount.
const AT_RECURSIVE: libc::c_int = 0x8000;

/// struct mount_attr (linux/mount.h), the argument of mount_setattr(2).
#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

/// Moves the calling thread into a private mount namespace whose root is the view of
/// `share`. `pinned` is the share's directory as opened when the device was created: the
/// view is refused if `share.path` no longer names it.
pub(super) fn enter(share: &ShareConfig, pinned: &File) -> io::Result<()> {
    unshare(CloneFlags::CLONE_NEWNS)?;
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )?;
    let mut attrs = MountAttrFlags::MOUNT_ATTR_NODEV | MountAttrFlags::MOUNT_ATTR_NOSUID;
    if share.read_only {
        attrs |= MountAttrFlags::MOUNT_ATTR_RDONLY;
    }
    // The whole namespace, not just the share: the thread needs nothing else of it, and a
    // mount below the share is covered too. Bind mounts made later copy these flags.
    let root = openat(CWD, "/", dir_path_flags(), Mode::empty())?;
    set_attrs(root.as_fd(), attrs, true)?;
    let dir = reopen(&share.path, pinned)?;
    for inner in &share.read_only_paths {
        read_only_bind(dir.as_fd(), inner)?;
    }
    let view = match &share.only {
        None => whole(dir)?,
        Some(names) => files_only(dir, names)?,
    };
    make_root(view)
}

/// A bind mount of `dir` and everything mounted below it, over `dir`: the view of a whole
/// directory, as a mount of its own that can become the root.
fn whole(dir: OwnedFd) -> io::Result<OwnedFd> {
    let tree = clone_tree(dir.as_fd(), true)?;
    attach(tree.as_fd(), dir.as_fd(), OsStr::new(""))?;
    Ok(tree)
}

/// Makes `view` the thread's root: the namespace's root if it can be, dropping the rest.
fn make_root(view: OwnedFd) -> io::Result<()> {
    fchdir(&view)?;
    // With both arguments ".", the old root ends up stacked on the view, and unmounting "."
    // removes it and every mount below it (pivot_root(2), notes). The other threads of the
    // process have their roots elsewhere and are not moved.
    match pivot_root(".", ".") {
        Ok(()) => umount2(".", MntFlags::MNT_DETACH)?,
        Err(e) => log::debug!("virtio-9p: cannot pivot into the share's view ({e}); chrooting"),
    }
    chroot(".")?;
    Ok(())
}

/// `path` opened in this namespace (a descriptor opened before the unshare names the host's
/// mounts, which this namespace may not mount on), checked to be the `pinned` directory.
fn reopen(path: &Path, pinned: &File) -> io::Result<OwnedFd> {
    let dir = openat(CWD, path, dir_path_flags(), Mode::empty())?;
    let (now, then) = (fstat(&dir)?, pinned.metadata()?);
    if (now.st_dev, now.st_ino) != (then.dev(), then.ino()) {
        return Err(io::Error::other(format!(
            "{} was replaced after the share was created",
            path.display()
        )));
    }
    Ok(dir)
}

/// Covers `dir/inner` with a read-only bind mount of itself. `inner` is resolved beneath
/// `dir` without following any symlink, so it is the place the outer share reaches.
fn read_only_bind(dir: BorrowedFd<'_>, inner: &Path) -> io::Result<()> {
    let resolve = ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS;
    // Without O_NOFOLLOW: RESOLVE_NO_SYMLINKS then refuses a symlink as the last component
    // too, where O_PATH | O_NOFOLLOW would open the link itself.
    let flags = OFlags::PATH | OFlags::CLOEXEC;
    let target = openat2(dir, inner, flags, Mode::empty(), resolve).map_err(|e| {
        io::Error::new(
            io::Error::from(e).kind(),
            format!("read-only path {} in the share: {e}", inner.display()),
        )
    })?;
    let tree = clone_tree(target.as_fd(), true)?;
    attach(tree.as_fd(), target.as_fd(), OsStr::new(""))?;
    set_attrs(tree.as_fd(), MountAttrFlags::MOUNT_ATTR_RDONLY, true)
}

/// A read-only tmpfs over `dir` holding a bind mount of each of `names` (files of `dir`);
/// returns its root.
fn files_only(dir: OwnedFd, names: &[OsString]) -> io::Result<OwnedFd> {
    let files = names
        .iter()
        .map(|n| bound_file(dir.as_fd(), n))
        .collect::<io::Result<Vec<_>>>()?;
    let fs = fsopen("tmpfs", FsOpenFlags::FSOPEN_CLOEXEC)?;
    fsconfig_set_string(fs.as_fd(), "mode", "0755")?;
    fsconfig_set_string(fs.as_fd(), "size", "64k")?;
    fsconfig_create(fs.as_fd())?;
    let attrs = MountAttrFlags::MOUNT_ATTR_NODEV
        | MountAttrFlags::MOUNT_ATTR_NOSUID
        | MountAttrFlags::MOUNT_ATTR_NOEXEC;
    let view = fsmount(fs.as_fd(), FsMountFlags::FSMOUNT_CLOEXEC, attrs)?;
    // Attached (in this namespace only) so that binds can be made inside it.
    attach(view.as_fd(), dir.as_fd(), OsStr::new(""))?;
    for (name, file) in names.iter().zip(files) {
        drop(openat(
            view.as_fd(),
            name,
            OFlags::CREATE | OFlags::EXCL | OFlags::WRONLY | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o600),
        )?);
        attach(file.as_fd(), view.as_fd(), name)?;
    }
    // The tmpfs alone: the file binds keep the share's own mode.
    set_attrs(view.as_fd(), MountAttrFlags::MOUNT_ATTR_RDONLY, false)?;
    Ok(view)
}

/// A detached bind mount of the file `name` of `dir`, which must be one name of a
/// non-directory, non-symlink entry.
fn bound_file(dir: BorrowedFd<'_>, name: &OsString) -> io::Result<OwnedFd> {
    let bad = |why: &str| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("cannot share {}: {why}", PathBuf::from(name).display()),
        )
    };
    let plain = Path::new(name).components().count() == 1
        && !name.is_empty()
        && name != ".."
        && name != ".";
    if !plain {
        return Err(bad("not a single file name"));
    }
    let file = openat(
        dir,
        name,
        OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    let kind = FileType::from_raw_mode(fstat(&file)?.st_mode);
    if matches!(kind, FileType::Directory | FileType::Symlink) {
        return Err(bad("a directory or a symlink"));
    }
    clone_tree(file.as_fd(), false)
}

/// A detached bind mount of what `at` is (with the mounts below it if `recursive`).
fn clone_tree(at: BorrowedFd<'_>, recursive: bool) -> io::Result<OwnedFd> {
    let mut flags = OpenTreeFlags::OPEN_TREE_CLONE
        | OpenTreeFlags::OPEN_TREE_CLOEXEC
        | OpenTreeFlags::AT_EMPTY_PATH;
    if recursive {
        flags |= OpenTreeFlags::AT_RECURSIVE;
    }
    Ok(open_tree(at, "", flags)?)
}

fn dir_path_flags() -> OFlags {
    OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC
}

/// Mounts the detached tree `tree` on `to/name` (on `to` itself when `name` is empty).
fn attach(tree: BorrowedFd<'_>, to: BorrowedFd<'_>, name: &OsStr) -> io::Result<()> {
    let mut flags = MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH;
    if name.is_empty() {
        flags |= MoveMountFlags::MOVE_MOUNT_T_EMPTY_PATH;
    }
    Ok(move_mount(tree, "", to, name, flags)?)
}

/// Adds `attrs` to the mount `mnt` is the root of (and every mount below it if `recursive`).
fn set_attrs(mnt: BorrowedFd<'_>, attrs: MountAttrFlags, recursive: bool) -> io::Result<()> {
    let attr = MountAttr {
        attr_set: u64::from(attrs.bits()),
        attr_clr: 0,
        propagation: 0,
        userns_fd: 0,
    };
    let flags = libc::AT_EMPTY_PATH | if recursive { AT_RECURSIVE } else { 0 };
    // SAFETY: mount_setattr(2) reads the empty NUL-terminated path and `size_of` bytes of
    // `attr`, both alive for the call; it writes no memory of ours.
    let r = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            mnt.as_raw_fd(),
            c"".as_ptr(),
            flags,
            &attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::testutil::TestDir;

    /// The mount points of the namespace a thread has after entering `share`'s view, as
    /// that thread sees them, each with its access options, sorted.
    fn mounts_seen_from(share: ShareConfig) -> Vec<String> {
        std::thread::spawn(move || {
            // Opened before the proc mount leaves the thread's view; files opened in it later
            // describe the thread as it is then.
            let me = File::open("/proc/thread-self").unwrap();
            enter(&share, &File::open(&share.path).unwrap()).unwrap();
            let info = openat(&me, "mountinfo", OFlags::RDONLY, Mode::empty()).unwrap();
            let info = std::io::read_to_string(File::from(info)).unwrap();
            let mut points: Vec<String> = info
                .lines()
                .map(|l| {
                    // mountinfo(5): field 5 is the mount point, 6 the mount's own options.
                    let f: Vec<&str> = l.split(' ').collect();
                    let mut opts: Vec<&str> = f[5]
                        .split(',')
                        .filter(|o| ["ro", "rw", "nodev", "nosuid"].contains(o))
                        .collect();
                    opts.sort();
                    format!("{} {}", f[4], opts.join(","))
                })
                .collect();
            points.sort();
            points
        })
        .join()
        .unwrap()
    }

    #[test]
    fn fs9p_view_namespace_holds_the_share_and_nothing_else_nodev_nosuid() {
        let dir = TestDir::new("fs9p-view");
        std::fs::create_dir(dir.path().join("ro")).unwrap();
        for f in ["a", "b", "c"] {
            std::fs::write(dir.path().join(f), "").unwrap();
        }
        let whole = ShareConfig::dir("t", dir.path(), false);
        assert_eq!(mounts_seen_from(whole.clone()), ["/ nodev,nosuid,rw"]);
        let nested = ShareConfig {
            read_only_paths: vec![PathBuf::from("ro")],
            ..whole.clone()
        };
        assert_eq!(
            mounts_seen_from(nested),
            ["/ nodev,nosuid,rw", "/ro nodev,nosuid,ro"]
        );
        let files = ShareConfig {
            only: Some(vec!["a".into(), "c".into()]),
            ..whole.clone()
        };
        assert_eq!(
            mounts_seen_from(files.clone()),
            [
                "/ nodev,nosuid,ro",
                "/a nodev,nosuid,rw",
                "/c nodev,nosuid,rw"
            ]
        );
        let read_only = ShareConfig {
            read_only: true,
            ..files
        };
        assert_eq!(
            mounts_seen_from(read_only),
            [
                "/ nodev,nosuid,ro",
                "/a nodev,nosuid,ro",
                "/c nodev,nosuid,ro"
            ]
        );
    }
}
