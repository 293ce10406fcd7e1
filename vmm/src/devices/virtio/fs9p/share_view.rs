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
//! while the view is built cannot redirect a mount. The thread finally chroots into the view.

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use nix::mount::{mount, MsFlags};
use nix::sched::{unshare, CloneFlags};
use rustix::fs::{openat, openat2, Mode, OFlags, ResolveFlags, CWD};
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

/// Moves the calling thread into a private mount namespace holding the view of `share`, and
/// returns the view's root (a directory in that namespace). `pinned` is the share's
/// directory as opened when the device was created: the view is refused if `share.path` no
/// longer names it.
pub(super) fn enter(share: &ShareConfig, pinned: &File) -> io::Result<OwnedFd> {
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
    match &share.only {
        None => Ok(dir),
        Some(names) => files_only(dir, names),
    }
}

/// `path` opened in this namespace (a descriptor opened before the unshare names the host's
/// mounts, which this namespace may not mount on), checked to be the `pinned` directory.
fn reopen(path: &Path, pinned: &File) -> io::Result<OwnedFd> {
    let dir = openat(CWD, path, dir_path_flags(), Mode::empty())?;
    let (now, then) = (File::from(dir.try_clone()?).metadata()?, pinned.metadata()?);
    if (now.dev(), now.ino()) != (then.dev(), then.ino()) {
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
    let tree = open_tree(
        target.as_fd(),
        "",
        OpenTreeFlags::OPEN_TREE_CLONE
            | OpenTreeFlags::OPEN_TREE_CLOEXEC
            | OpenTreeFlags::AT_RECURSIVE
            | OpenTreeFlags::AT_EMPTY_PATH,
    )?;
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
    let kind = File::from(file.try_clone()?).metadata()?.file_type();
    if kind.is_dir() || kind.is_symlink() {
        return Err(bad("a directory or a symlink"));
    }
    Ok(open_tree(
        file.as_fd(),
        "",
        OpenTreeFlags::OPEN_TREE_CLONE
            | OpenTreeFlags::OPEN_TREE_CLOEXEC
            | OpenTreeFlags::AT_EMPTY_PATH,
    )?)
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
