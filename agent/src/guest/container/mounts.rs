//! The container's filesystem view, built inside its own mount namespace by the init helper:
//! the spec's mounts under the rootfs, /dev like runc's, `pivot_root`, then masked and
//! read-only paths. Everything happens in the new namespace, so nothing is left in the
//! agent's when the container goes away.

use std::fs;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sys::stat::{makedev, mknod, Mode, SFlag};
use nix::unistd::{chdir, pivot_root};
use oci_spec::runtime::{LinuxDevice, LinuxDeviceType, Mount, Spec};

use super::HelperResult;

/// Prepares the rootfs and makes it `/`, with runc's propagation steps: `/` as
/// `linux.rootfsPropagation` says (default `rslave`), then the mount holding the rootfs made
/// private if it is shared, so that neither the rootfs bind nor any mount under it reaches
/// the agent's namespace. `private_shares` (shares of directories whose host mount is
/// private) are made private first, as a runc container's copies of such mounts are.
pub fn setup_rootfs(spec: &Spec, rootfs: &Path, private_shares: &[PathBuf]) -> HelperResult<()> {
    for share in private_shares {
        sys(
            mount(
                None::<&str>,
                share,
                None::<&str>,
                MsFlags::MS_PRIVATE,
                None::<&str>,
            ),
            &format!("make {} private", share.display()),
        )?;
    }
    let linux = spec.linux().as_ref();
    let root_propagation = match linux.and_then(|l| l.rootfs_propagation().as_deref()) {
        None => MsFlags::MS_SLAVE | MsFlags::MS_REC,
        Some(p) => propagation_flag(p)
            .ok_or_else(|| format!("rootfsPropagation {p:?} is not a propagation type"))?,
    };
    sys(
        mount(
            None::<&str>,
            "/",
            None::<&str>,
            root_propagation,
            None::<&str>,
        ),
        "set propagation of /",
    )?;
    private_if_shared(rootfs)?;
    // pivot_root needs the new root to be a mount point.
    sys(
        mount(
            Some(rootfs),
            rootfs,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None::<&str>,
        ),
        &format!("bind rootfs {}", rootfs.display()),
    )?;
    let mounts = spec.mounts().as_deref().unwrap_or_default();
    for m in mounts {
        mount_one(rootfs, m)?;
    }
    if mounts.iter().any(is_dev_tmpfs) {
        populate_dev(
            rootfs,
            linux
                .and_then(|l| l.devices().as_deref())
                .unwrap_or_default(),
        )?;
    }
    enter_root(rootfs)
}

/// Makes the mount that holds `path` private when it is shared (runc's
/// `rootfsParentMountPrivate`): a mount attached under a shared mount propagates to its peers,
/// which here include the agent's. A slave or private mount is left as it is.
fn private_if_shared(path: &Path) -> HelperResult<()> {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| format!("read /proc/self/mountinfo: {e}"))?;
    let Some((point, shared)) = husk_agent::mountinfo::holding_mount(&mountinfo, path) else {
        return Err(format!("no mount holds {}", path.display()));
    };
    if !shared {
        return Ok(());
    }
    sys(
        mount(
            None::<&str>,
            point.as_path(),
            None::<&str>,
            MsFlags::MS_PRIVATE,
            None::<&str>,
        ),
        &format!("make {} private", point.display()),
    )
}

fn is_dev_tmpfs(m: &Mount) -> bool {
    m.destination() == Path::new("/dev") && m.typ().as_deref() == Some("tmpfs")
}

/// Mounts one spec entry at its destination under `rootfs`, creating the mount point if it
/// is missing. The mount is tried first: the mount point usually exists, and every lookup in
/// the rootfs is a round trip over 9p to the host.
fn mount_one(rootfs: &Path, m: &Mount) -> HelperResult<()> {
    let dest = in_root(rootfs, m.destination());
    let typ = m.typ().as_deref().unwrap_or("none");
    let opts = parse_options(m.options().as_deref().unwrap_or_default())?;
    let flags = opts.flags;
    let is_bind = flags.contains(MsFlags::MS_BIND) || typ == "bind";
    let source = m.source().clone().unwrap_or_else(|| PathBuf::from(typ));
    let what = format!(
        "mount {} on {}",
        source.display(),
        m.destination().display()
    );
    let data = (!opts.data.is_empty()).then_some(opts.data.as_str());
    // Opened before the mount covers it: the tmpfs is then filled from here.
    let covered = match opts.copy_up && typ == "tmpfs" {
        true => fs::File::open(&dest).ok(),
        false => None,
    };
    let attempt = || -> nix::Result<()> {
        if is_bind {
            bind(&source, &dest, flags)
        } else {
            // The spec says "cgroup"; the guest offers the unified hierarchy.
            let (source, fstype) = match typ {
                "cgroup" => (Path::new("cgroup2"), "cgroup2"),
                _ => (source.as_path(), typ),
            };
            mount(Some(source), &dest, Some(fstype), flags, data)
        }
    };
    match attempt() {
        Err(nix::errno::Errno::ENOENT) => {
            make_mount_point(&dest, is_bind.then_some(source.as_path()))?;
            sys(attempt(), &what)?;
        }
        other => sys(other, &what)?,
    }
    if let Some(dir) = covered {
        let from = PathBuf::from(format!("/proc/self/fd/{}", dir.as_raw_fd()));
        copy_tree(&from, &dest).map_err(|e| format!("{what}: tmpcopyup: {e}"))?;
    }
    // In the order given, as runc applies them: "rshared" then "unbindable" is not the
    // same as the reverse.
    for propagation in opts.propagation {
        sys(
            mount(None::<&str>, &dest, None::<&str>, propagation, None::<&str>),
            &what,
        )?;
    }
    Ok(())
}

/// Copies the contents of directory `from` into `to` (which exists): directories, files,
/// symlinks and special files, with their modes and owners.
fn copy_tree(from: &Path, to: &Path) -> std::io::Result<()> {
    for entry in fs::read_dir(from)? {
        let entry = entry?;
        let (src, dst) = (entry.path(), to.join(entry.file_name()));
        let meta = fs::symlink_metadata(&src)?;
        let kind = meta.file_type();
        if kind.is_dir() {
            fs::create_dir(&dst)?;
            copy_tree(&src, &dst)?;
        } else if kind.is_file() {
            fs::copy(&src, &dst)?;
        } else if kind.is_symlink() {
            symlink(fs::read_link(&src)?, &dst)?;
        } else {
            let mode = Mode::from_bits_truncate(meta.mode());
            let kind = SFlag::from_bits_truncate(meta.mode() & SFlag::S_IFMT.bits());
            mknod(&dst, kind, mode, meta.rdev()).map_err(std::io::Error::from)?;
        }
        // Owner first: chown clears the set-id bits the mode then restores.
        std::os::unix::fs::lchown(&dst, Some(meta.uid()), Some(meta.gid()))?;
        if !kind.is_symlink() {
            fs::set_permissions(&dst, meta.permissions())?;
        }
    }
    Ok(())
}

/// Binds `source` on `dest`; flags beyond bind/rec need a second, remounting call.
fn bind(source: &Path, dest: &Path, flags: MsFlags) -> nix::Result<()> {
    let rec = flags & MsFlags::MS_REC;
    mount(
        Some(source),
        dest,
        None::<&str>,
        MsFlags::MS_BIND | rec,
        None::<&str>,
    )?;
    let extra = flags - MsFlags::MS_BIND - MsFlags::MS_REC;
    if !extra.is_empty() {
        let flags = extra | MsFlags::MS_BIND | MsFlags::MS_REMOUNT | rec;
        mount(None::<&str>, dest, None::<&str>, flags, None::<&str>)?;
    }
    Ok(())
}

/// Creates `dest` as a directory, or as an empty file when binding a non-directory.
fn make_mount_point(dest: &Path, bind_source: Option<&Path>) -> HelperResult<()> {
    let file = bind_source.is_some_and(|s| s.exists() && !s.is_dir());
    let made = if file {
        if let Some(parent) = dest.parent() {
            fs::create_dir_all(parent).map_err(|e| format!("mkdir {}: {e}", parent.display()))?;
        }
        match dest.exists() {
            true => Ok(()),
            false => fs::File::create(dest).map(drop),
        }
    } else {
        fs::create_dir_all(dest)
    };
    made.map_err(|e| format!("create mount point {}: {e}", dest.display()))
}

/// Joins a container path under `rootfs`, dropping `..` so it cannot climb out lexically.
/// (Symlinks inside the rootfs are followed: the guest VM is the security boundary.)
pub fn in_root(rootfs: &Path, path: &Path) -> PathBuf {
    let mut out = rootfs.to_path_buf();
    for c in path.components() {
        if let Component::Normal(part) = c {
            out.push(part);
        }
    }
    out
}

/// A mount's options as `mount(2)` takes them.
#[derive(Debug, PartialEq)]
pub struct MountOptions {
    pub flags: MsFlags,
    /// Propagation changes, each a separate `mount(2)` call after the mount.
    pub propagation: Vec<MsFlags>,
    /// The filesystem's own options (`mode=755`, ...).
    pub data: String,
    /// runc's `tmpcopyup`: a tmpfs starts with a copy of what the directory it covers held.
    pub copy_up: bool,
}

/// The flags of a propagation type (`rshared`, `slave`, ...), as in `rootfsPropagation`.
fn propagation_flag(name: &str) -> Option<MsFlags> {
    let (kind, rec) = match name.strip_prefix('r') {
        Some(rest) if rest != "o" && rest != "w" => (rest, MsFlags::MS_REC),
        _ => (name, MsFlags::empty()),
    };
    let kind = match kind {
        "private" => MsFlags::MS_PRIVATE,
        "shared" => MsFlags::MS_SHARED,
        "slave" => MsFlags::MS_SLAVE,
        "unbindable" => MsFlags::MS_UNBINDABLE,
        _ => return None,
    };
    Some(kind | rec)
}

/// The flag an option sets, and the one it clears.
fn flag_option(opt: &str) -> Option<(MsFlags, MsFlags)> {
    let none = MsFlags::empty();
    Some(match opt {
        "ro" => (MsFlags::MS_RDONLY, none),
        "rw" => (none, MsFlags::MS_RDONLY),
        "nosuid" => (MsFlags::MS_NOSUID, none),
        "suid" => (none, MsFlags::MS_NOSUID),
        "nodev" => (MsFlags::MS_NODEV, none),
        "dev" => (none, MsFlags::MS_NODEV),
        "noexec" => (MsFlags::MS_NOEXEC, none),
        "exec" => (none, MsFlags::MS_NOEXEC),
        "sync" => (MsFlags::MS_SYNCHRONOUS, none),
        "async" => (none, MsFlags::MS_SYNCHRONOUS),
        "dirsync" => (MsFlags::MS_DIRSYNC, none),
        "remount" => (MsFlags::MS_REMOUNT, none),
        "mand" => (MsFlags::MS_MANDLOCK, none),
        "nomand" => (none, MsFlags::MS_MANDLOCK),
        "atime" => (none, MsFlags::MS_NOATIME),
        "noatime" => (MsFlags::MS_NOATIME, none),
        "diratime" => (none, MsFlags::MS_NODIRATIME),
        "nodiratime" => (MsFlags::MS_NODIRATIME, none),
        "relatime" => (MsFlags::MS_RELATIME, none),
        "norelatime" => (none, MsFlags::MS_RELATIME),
        "strictatime" => (MsFlags::MS_STRICTATIME, none),
        "nostrictatime" => (none, MsFlags::MS_STRICTATIME),
        "lazytime" => (MsFlags::MS_LAZYTIME, none),
        "nolazytime" => (none, MsFlags::MS_LAZYTIME),
        "bind" => (MsFlags::MS_BIND, none),
        "rbind" => (MsFlags::MS_BIND | MsFlags::MS_REC, none),
        _ => return None,
    })
}

/// Splits mount options into flags, propagation changes and the filesystem's data string.
/// runc's extensions that would change what the container sees if skipped are refused.
pub fn parse_options(options: &[String]) -> HelperResult<MountOptions> {
    let mut out = MountOptions {
        flags: MsFlags::empty(),
        propagation: Vec::new(),
        data: String::new(),
        copy_up: false,
    };
    let mut data = Vec::new();
    for opt in options {
        if let Some((set, clear)) = flag_option(opt) {
            out.flags = (out.flags | set) - clear;
        } else if let Some(p) = propagation_flag(opt) {
            out.propagation.push(p);
        } else if opt == "tmpcopyup" {
            out.copy_up = true;
        } else if matches!(opt.as_str(), "idmap" | "ridmap") {
            return Err(format!("mount option {opt:?} is not supported"));
        } else {
            data.push(opt.as_str());
        }
    }
    out.data = data.join(",");
    Ok(out)
}

/// The device nodes runc creates in a tmpfs /dev: (name, major, minor).
const DEFAULT_DEVICES: &[(&str, u64, u64)] = &[
    ("null", 1, 3),
    ("zero", 1, 5),
    ("full", 1, 7),
    ("random", 1, 8),
    ("urandom", 1, 9),
    ("tty", 5, 0),
];

const DEV_LINKS: &[(&str, &str)] = &[
    ("/proc/self/fd", "fd"),
    ("/proc/self/fd/0", "stdin"),
    ("/proc/self/fd/1", "stdout"),
    ("/proc/self/fd/2", "stderr"),
    ("pts/ptmx", "ptmx"),
];

/// Fills a fresh tmpfs /dev: default nodes, the spec's devices, and the usual symlinks.
fn populate_dev(rootfs: &Path, devices: &[LinuxDevice]) -> HelperResult<()> {
    let dev = rootfs.join("dev");
    for &(name, major, minor) in DEFAULT_DEVICES {
        make_node(&dev.join(name), SFlag::S_IFCHR, major, minor, 0o666)?;
    }
    for d in devices {
        let kind = match d.typ() {
            LinuxDeviceType::B => SFlag::S_IFBLK,
            LinuxDeviceType::P => SFlag::S_IFIFO,
            _ => SFlag::S_IFCHR,
        };
        let path = in_root(rootfs, d.path());
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).map_err(|e| format!("mkdir {}: {e}", parent.display()))?;
        }
        let mode = d.file_mode().unwrap_or(0o666);
        make_node(&path, kind, d.major() as u64, d.minor() as u64, mode)?;
    }
    for &(target, name) in DEV_LINKS {
        let link = dev.join(name);
        let _ = fs::remove_file(&link);
        symlink(target, &link).map_err(|e| format!("symlink {}: {e}", link.display()))?;
    }
    for dir in ["pts", "shm"] {
        let _ = fs::create_dir_all(dev.join(dir));
    }
    Ok(())
}

fn make_node(path: &Path, kind: SFlag, major: u64, minor: u64, mode: u32) -> HelperResult<()> {
    let _ = fs::remove_file(path);
    sys(
        mknod(
            path,
            kind,
            Mode::from_bits_truncate(mode),
            makedev(major, minor),
        ),
        &format!("mknod {}", path.display()),
    )?;
    // mknod is subject to the umask; set the exact mode asked for.
    fs::set_permissions(path, fs::Permissions::from_mode(mode & 0o7777))
        .map_err(|e| format!("chmod {}: {e}", path.display()))
}

/// Set (to anything) in the agent's environment to take the no-pivot path even where
/// `pivot_root` works, so host tests cover what the guest's initramfs root needs.
pub const NO_PIVOT_ENV: &str = "HUSK_AGENT_NO_PIVOT";

/// `pivot_root` into `rootfs` with the old root stacked underneath, then detach the old root.
/// The guest's root is the initramfs, which `pivot_root` refuses (EINVAL); there, like
/// `runc --no-pivot`, move the rootfs mount over `/` and chroot into it.
fn enter_root(rootfs: &Path) -> HelperResult<()> {
    // Both ways in refuse a shared root (and a move onto one would reach the agent's).
    private_if_shared(Path::new("/"))?;
    sys(chdir(rootfs), "chdir to rootfs")?;
    let pivoted = match std::env::var_os(NO_PIVOT_ENV) {
        Some(_) => Err(nix::errno::Errno::EINVAL),
        None => pivot_root(".", "."),
    };
    match pivoted {
        Err(nix::errno::Errno::EINVAL) => return move_root(rootfs),
        other => sys(other, "pivot_root")?,
    }
    // The old root is now mounted over the new one at "/": make it private before detaching,
    // so the unmount does not propagate to the agent's namespace.
    sys(
        mount(
            None::<&str>,
            ".",
            None::<&str>,
            MsFlags::MS_SLAVE | MsFlags::MS_REC,
            None::<&str>,
        ),
        "make old root slave",
    )?;
    sys(umount2(".", MntFlags::MNT_DETACH), "unmount old root")?;
    sys(chdir("/"), "chdir /")
}

/// The no-pivot way in: the old root stays underneath, unreachable without CAP_SYS_CHROOT
/// tricks; the VM around the container is the security boundary that matters here.
fn move_root(rootfs: &Path) -> HelperResult<()> {
    sys(
        mount(
            Some(rootfs),
            "/",
            None::<&str>,
            MsFlags::MS_MOVE,
            None::<&str>,
        ),
        "move rootfs to /",
    )?;
    sys(nix::unistd::chroot("."), "chroot into rootfs")?;
    sys(chdir("/"), "chdir /")
}

/// Hides each path: /dev/null over files, an empty read-only tmpfs over directories.
pub fn mask_paths(paths: &[String]) -> HelperResult<()> {
    for p in paths {
        let Ok(meta) = fs::metadata(p) else { continue };
        let what = format!("mask {p}");
        if meta.is_dir() {
            sys(
                mount(
                    Some("tmpfs"),
                    p.as_str(),
                    Some("tmpfs"),
                    MsFlags::MS_RDONLY,
                    None::<&str>,
                ),
                &what,
            )?;
        } else {
            sys(
                bind(Path::new("/dev/null"), Path::new(p), MsFlags::empty()),
                &what,
            )?;
        }
    }
    Ok(())
}

/// Makes each existing path a read-only bind of itself.
pub fn readonly_paths(paths: &[String]) -> HelperResult<()> {
    for p in paths {
        if fs::symlink_metadata(p).is_err() {
            continue;
        }
        let flags = MsFlags::MS_REC | MsFlags::MS_RDONLY;
        sys(
            bind(Path::new(p), Path::new(p), flags),
            &format!("read-only {p}"),
        )?;
    }
    Ok(())
}

/// Remounts `/` read-only (`root.readonly`).
pub fn readonly_root() -> HelperResult<()> {
    let flags = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY;
    sys(
        mount(None::<&str>, "/", None::<&str>, flags, None::<&str>),
        "remount / read-only",
    )
}

fn sys<T>(r: nix::Result<T>, what: &str) -> HelperResult<T> {
    r.map_err(|e| format!("{what}: {}", e.desc()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(list: &[&str]) -> HelperResult<MountOptions> {
        parse_options(&list.iter().map(|s| s.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn propagation_is_kept_apart_from_the_mount_flags_in_order() {
        let o = opts(&["bind", "rprivate", "ro", "unbindable", "mode=755"]).unwrap();
        // "bind" stays non-recursive: the "r" of "rprivate" belongs to the propagation.
        assert_eq!(o.flags, MsFlags::MS_BIND | MsFlags::MS_RDONLY);
        assert_eq!(
            o.propagation,
            [
                MsFlags::MS_PRIVATE | MsFlags::MS_REC,
                MsFlags::MS_UNBINDABLE
            ]
        );
        assert_eq!(o.data, "mode=755");
        let o = opts(&["rbind", "rw", "rshared", "rslave", "runbindable"]).unwrap();
        assert_eq!(o.flags, MsFlags::MS_BIND | MsFlags::MS_REC);
        let rec = |f: MsFlags| f | MsFlags::MS_REC;
        let kinds = [
            MsFlags::MS_SHARED,
            MsFlags::MS_SLAVE,
            MsFlags::MS_UNBINDABLE,
        ];
        assert_eq!(o.propagation, kinds.map(rec));
    }

    #[test]
    fn root_propagation_names_are_checked() {
        assert_eq!(propagation_flag("slave"), Some(MsFlags::MS_SLAVE));
        assert_eq!(
            propagation_flag("rshared"),
            Some(MsFlags::MS_SHARED | MsFlags::MS_REC)
        );
        for bad in ["ro", "rw", "rbind", "", "r", "sharedx"] {
            assert_eq!(propagation_flag(bad), None, "{bad}");
        }
    }

    #[test]
    fn copy_up_is_an_option_and_idmapped_mounts_are_refused() {
        let o = opts(&["nosuid", "tmpcopyup", "size=1m"]).unwrap();
        assert!(o.copy_up);
        assert_eq!((o.flags, o.data.as_str()), (MsFlags::MS_NOSUID, "size=1m"));
        for opt in ["idmap", "ridmap"] {
            let e = opts(&["rbind", opt]).unwrap_err();
            assert!(e.contains("not supported") && e.contains(opt), "{e}");
        }
    }
}
