//! The container's filesystem view, built inside its own mount namespace by the init helper:
//! the spec's mounts under the rootfs, /dev like runc's, `pivot_root`, then masked and
//! read-only paths. Everything happens in the new namespace, so nothing is left in the
//! agent's when the container goes away.

use std::fs;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sys::stat::{makedev, mknod, Mode, SFlag};
use nix::unistd::{chdir, pivot_root};
use oci_spec::runtime::{LinuxDevice, LinuxDeviceType, Mount, Spec};

use super::HelperResult;

/// Prepares the rootfs and makes it `/`.
pub fn setup_rootfs(spec: &Spec, rootfs: &Path) -> HelperResult<()> {
    let linux = spec.linux().as_ref();
    let propagation = linux
        .and_then(|l| l.rootfs_propagation().as_deref())
        .unwrap_or("rslave");
    // Stop our mounts from propagating back into the agent's namespace.
    let (prop, _) = parse_options(&[propagation.to_string()]);
    sys(
        mount(None::<&str>, "/", None::<&str>, prop, None::<&str>),
        "make / private",
    )?;
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

fn is_dev_tmpfs(m: &Mount) -> bool {
    m.destination() == Path::new("/dev") && m.typ().as_deref() == Some("tmpfs")
}

/// Mounts one spec entry at its destination under `rootfs`, creating the mount point if it
/// is missing. The mount is tried first: the mount point usually exists, and every lookup in
/// the rootfs is a round trip over 9p to the host.
fn mount_one(rootfs: &Path, m: &Mount) -> HelperResult<()> {
    let dest = in_root(rootfs, m.destination());
    let typ = m.typ().as_deref().unwrap_or("none");
    let (flags, data) = parse_options(m.options().as_deref().unwrap_or_default());
    let is_bind = flags.contains(MsFlags::MS_BIND) || typ == "bind";
    let source = m.source().clone().unwrap_or_else(|| PathBuf::from(typ));
    let what = format!(
        "mount {} on {}",
        source.display(),
        m.destination().display()
    );
    let data = (!data.is_empty()).then_some(data.as_str());
    let propagation = flags & propagation_flags();
    let flags = flags - propagation;
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
    if !propagation.is_empty() {
        sys(
            mount(None::<&str>, &dest, None::<&str>, propagation, None::<&str>),
            &what,
        )?;
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

fn propagation_flags() -> MsFlags {
    MsFlags::MS_SHARED | MsFlags::MS_SLAVE | MsFlags::MS_PRIVATE | MsFlags::MS_UNBINDABLE
}

/// Splits mount options into flags and the filesystem's data string.
pub fn parse_options(options: &[String]) -> (MsFlags, String) {
    let mut flags = MsFlags::empty();
    let mut data = Vec::new();
    for opt in options {
        let (set, clear) = match opt.as_str() {
            "ro" => (MsFlags::MS_RDONLY, MsFlags::empty()),
            "rw" => (MsFlags::empty(), MsFlags::MS_RDONLY),
            "nosuid" => (MsFlags::MS_NOSUID, MsFlags::empty()),
            "suid" => (MsFlags::empty(), MsFlags::MS_NOSUID),
            "nodev" => (MsFlags::MS_NODEV, MsFlags::empty()),
            "dev" => (MsFlags::empty(), MsFlags::MS_NODEV),
            "noexec" => (MsFlags::MS_NOEXEC, MsFlags::empty()),
            "exec" => (MsFlags::empty(), MsFlags::MS_NOEXEC),
            "sync" => (MsFlags::MS_SYNCHRONOUS, MsFlags::empty()),
            "async" => (MsFlags::empty(), MsFlags::MS_SYNCHRONOUS),
            "dirsync" => (MsFlags::MS_DIRSYNC, MsFlags::empty()),
            "remount" => (MsFlags::MS_REMOUNT, MsFlags::empty()),
            "mand" => (MsFlags::MS_MANDLOCK, MsFlags::empty()),
            "nomand" => (MsFlags::empty(), MsFlags::MS_MANDLOCK),
            "atime" => (MsFlags::empty(), MsFlags::MS_NOATIME),
            "noatime" => (MsFlags::MS_NOATIME, MsFlags::empty()),
            "diratime" => (MsFlags::empty(), MsFlags::MS_NODIRATIME),
            "nodiratime" => (MsFlags::MS_NODIRATIME, MsFlags::empty()),
            "relatime" => (MsFlags::MS_RELATIME, MsFlags::empty()),
            "norelatime" => (MsFlags::empty(), MsFlags::MS_RELATIME),
            "strictatime" => (MsFlags::MS_STRICTATIME, MsFlags::empty()),
            "nostrictatime" => (MsFlags::empty(), MsFlags::MS_STRICTATIME),
            "lazytime" => (MsFlags::MS_LAZYTIME, MsFlags::empty()),
            "nolazytime" => (MsFlags::empty(), MsFlags::MS_LAZYTIME),
            "bind" => (MsFlags::MS_BIND, MsFlags::empty()),
            "rbind" => (MsFlags::MS_BIND | MsFlags::MS_REC, MsFlags::empty()),
            "private" => (MsFlags::MS_PRIVATE, MsFlags::empty()),
            "rprivate" => (MsFlags::MS_PRIVATE | MsFlags::MS_REC, MsFlags::empty()),
            "shared" => (MsFlags::MS_SHARED, MsFlags::empty()),
            "rshared" => (MsFlags::MS_SHARED | MsFlags::MS_REC, MsFlags::empty()),
            "slave" => (MsFlags::MS_SLAVE, MsFlags::empty()),
            "rslave" => (MsFlags::MS_SLAVE | MsFlags::MS_REC, MsFlags::empty()),
            "unbindable" => (MsFlags::MS_UNBINDABLE, MsFlags::empty()),
            "runbindable" => (MsFlags::MS_UNBINDABLE | MsFlags::MS_REC, MsFlags::empty()),
            // runc extensions with no meaning here.
            "tmpcopyup" | "idmap" | "ridmap" => continue,
            other => {
                data.push(other);
                continue;
            }
        };
        flags = (flags | set) - clear;
    }
    (flags, data.join(","))
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
