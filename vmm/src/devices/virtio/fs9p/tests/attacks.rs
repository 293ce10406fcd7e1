//! A hostile guest kernel against the share: each test sends what a compromised guest could,
//! and checks both the reply and the host.

use std::ffi::OsString;
use std::os::unix::fs::FileTypeExt;

use nix::sys::stat::{makedev, mknod, Mode as NodeMode, SFlag};

use super::*;

const TSYMLINK: u8 = 16;
const TMKNOD: u8 = 18;
const TSETATTR: u8 = 26;
const TRENAMEAT: u8 = 74;
const TUNLINKAT: u8 = 76;
const TMKDIR: u8 = 72;
const TLINK: u8 = 70;
/// Tsetattr `valid` bit for the size (P9_SETATTR_SIZE).
const SETATTR_SIZE: u32 = 0x8;

fn errno(e: i32) -> Option<u32> {
    Some(e as u32)
}

impl Guest {
    fn renameat(&mut self, from_dir: u32, from: &str, to_dir: u32, to: &str) -> Reply {
        let b = Body::default().u32(from_dir).str(from).u32(to_dir).str(to);
        self.call(TRENAMEAT, b)
    }

    fn unlinkat(&mut self, dir: u32, name: &str) -> Reply {
        self.call(TUNLINKAT, Body::default().u32(dir).str(name).u32(0))
    }

    fn mknod(&mut self, dir: u32, name: &str, mode: u32, major: u32, minor: u32) -> Reply {
        let b = Body::default()
            .u32(dir)
            .str(name)
            .u32(mode)
            .u32(major)
            .u32(minor)
            .u32(0);
        self.call(TMKNOD, b)
    }

    fn write(&mut self, fid: u32, data: &[u8]) -> Reply {
        let b = Body::default()
            .u32(fid)
            .u64(0)
            .u32(data.len() as u32)
            .bytes(data);
        self.call(TWRITE, b)
    }

    /// Tsetattr of the size to 0: `fid valid mode uid gid size atime_sec atime_nsec
    /// mtime_sec mtime_nsec`.
    fn truncate(&mut self, fid: u32) -> Reply {
        let mut b = Body::default().u32(fid).u32(SETATTR_SIZE);
        b = (0..3).fold(b, |b, _| b.u32(0));
        b = (0..5).fold(b, |b, _| b.u64(0));
        self.call(TSETATTR, b)
    }

    fn list(&mut self, dir: u32, fid: u32) -> Vec<String> {
        self.walk(dir, fid, &[]).expect(TWALK);
        self.lopen(fid, P9_RDONLY | P9_DIRECTORY).expect(TLOPEN);
        let body = self
            .call(TREADDIR, Body::default().u32(fid).u64(0).u32(4096))
            .expect(TREADDIR);
        self.call(TCLUNK, Body::default().u32(fid)).expect(TCLUNK);
        dirent_names(&body)
    }
}

fn file_share(dir: &Path, names: &[&str], read_only: bool) -> ShareConfig {
    ShareConfig {
        only: Some(names.iter().map(OsString::from).collect()),
        ..ShareConfig::dir("share", dir, read_only)
    }
}

#[test]
fn fs9p_file_share_serves_the_bound_files_and_not_their_siblings() {
    let dir = TestDir::new("fs9p-only");
    let etc = dir.path();
    fs::write(etc.join("localtime"), b"UTC").unwrap();
    fs::write(etc.join("hosts"), b"127.0.0.1 localhost\n").unwrap();
    fs::write(etc.join("shadow"), b"root:secret").unwrap();
    fs::create_dir(etc.join("ssh")).unwrap();
    let (mut g, root_qid) = Guest::attached_to(&file_share(etc, &["localtime", "hosts"], false));
    assert_eq!(g.list(ROOT_FID, 9), [".", "..", "hosts", "localtime"]);
    let enoent = errno(libc::ENOENT);
    assert_eq!(g.walk(ROOT_FID, 2, &["shadow"]).errno(), enoent);
    assert_eq!(g.walk(ROOT_FID, 2, &["ssh"]).errno(), enoent);
    // `..` from the root is the root, and the siblings are not behind it either.
    let up = g.walk(ROOT_FID, 2, &["..", ".."]).expect(TWALK);
    assert_eq!(&up[2 + 13..2 + 26], &root_qid[..]);
    assert_eq!(g.walk(2, 3, &["shadow"]).errno(), enoent);
    // The bound file is the host's: a write reaches it at once.
    g.walk(ROOT_FID, 4, &["hosts"]).expect(TWALK);
    g.lopen(4, P9_RDWR | P9_TRUNC).expect(TLOPEN);
    g.write(4, b"10.0.0.1 db\n").expect(TWRITE);
    assert_eq!(fs::read(etc.join("hosts")).unwrap(), b"10.0.0.1 db\n");
    g.walk(ROOT_FID, 5, &["localtime"]).expect(TWALK);
    g.lopen(5, P9_RDONLY).expect(TLOPEN);
    assert_eq!(g.read(5, 0, 100), b"UTC");
    // Nothing can be added beside them, and they cannot be moved or removed.
    g.walk(ROOT_FID, 6, &[]).expect(TWALK);
    assert_eq!(g.lcreate(6, "shadow", P9_RDWR).errno(), errno(libc::EROFS));
    assert!(g
        .renameat(ROOT_FID, "hosts", ROOT_FID, "moved")
        .errno()
        .is_some());
    assert!(g.unlinkat(ROOT_FID, "localtime").errno().is_some());
    assert_eq!(fs::read(etc.join("shadow")).unwrap(), b"root:secret");
    assert_eq!(host_listing(etc), ["hosts", "localtime", "shadow", "ssh"]);
}

#[test]
fn fs9p_read_only_file_share_refuses_writes_in_the_kernel() {
    let dir = TestDir::new("fs9p-only-ro");
    fs::write(dir.path().join("resolv.conf"), b"nameserver 1.1.1.1\n").unwrap();
    let (mut g, _) = Guest::attached_to(&file_share(dir.path(), &["resolv.conf"], true));
    g.walk(ROOT_FID, 2, &["resolv.conf"]).expect(TWALK);
    assert_eq!(g.lopen(2, P9_RDWR).errno(), errno(libc::EROFS));
    assert_eq!(g.truncate(2).errno(), errno(libc::EROFS));
    assert_eq!(
        fs::read(dir.path().join("resolv.conf")).unwrap(),
        b"nameserver 1.1.1.1\n"
    );
}

#[test]
fn fs9p_symlinks_out_of_the_share_lead_nowhere() {
    let base = TestDir::new("fs9p-links");
    let share = base.path().join("share");
    fs::create_dir(&share).unwrap();
    fs::write(base.path().join("outside"), b"secret").unwrap();
    // As an image or the host could leave them: the guest cannot make symlinks (below).
    let links = [
        ("abs", base.path().join("outside")),
        ("absdir", base.path().to_path_buf()),
        ("rel", PathBuf::from("../outside")),
        ("fd", PathBuf::from("/proc/self/fd/0")),
        ("procroot", PathBuf::from("/proc/self/root")),
    ];
    for (name, target) in &links {
        std::os::unix::fs::symlink(target, share.join(name)).unwrap();
    }
    let (mut g, _) = Guest::attached(&share, false);
    let mut fid = 10;
    for (name, _) in &links {
        fid += 2;
        // The walk stops at the link itself; the link is never opened or walked through.
        g.walk(ROOT_FID, fid, &[name]).expect(TWALK);
        assert_eq!(
            g.lopen(fid, P9_RDONLY).errno(),
            errno(libc::EPERM),
            "{name}"
        );
        assert_eq!(g.walk(fid, fid + 1, &["x"]).errno(), errno(libc::ENOTDIR));
        let through = format!("{name}/outside");
        assert_eq!(
            g.walk(ROOT_FID, fid + 1, &[&through]).errno(),
            errno(libc::EINVAL)
        );
        // Nothing can be created or moved through a link to a directory either.
        assert!(
            g.lcreate(fid, "planted", P9_RDWR).errno().is_some(),
            "{name}"
        );
    }
    assert!(!base.path().join("planted").exists());
    let symlink = Body::default()
        .u32(ROOT_FID)
        .str("mine")
        .str("/etc/shadow")
        .u32(0);
    assert!(g.call(TSYMLINK, symlink).errno().is_some());
    assert!(fs::symlink_metadata(share.join("mine")).is_err());
}

#[test]
fn fs9p_rename_out_of_the_share_is_refused() {
    let base = TestDir::new("fs9p-rename");
    let share = base.path().join("share");
    fs::create_dir(&share).unwrap();
    fs::write(share.join("data"), b"d").unwrap();
    std::os::unix::fs::symlink(base.path(), share.join("up")).unwrap();
    let (mut g, _) = Guest::attached(&share, false);
    let einval = errno(libc::EINVAL);
    assert_eq!(
        g.renameat(ROOT_FID, "data", ROOT_FID, "../data").errno(),
        einval
    );
    assert_eq!(g.renameat(ROOT_FID, "data", ROOT_FID, "..").errno(), einval);
    assert_eq!(
        g.renameat(ROOT_FID, "data", ROOT_FID, "up/x").errno(),
        einval
    );
    // A link to a directory outside as the target directory.
    g.walk(ROOT_FID, 2, &["up"]).expect(TWALK);
    assert!(g.renameat(ROOT_FID, "data", 2, "data").errno().is_some());
    // `..` of the root as the target directory is the root itself.
    g.walk(ROOT_FID, 3, &[".."]).expect(TWALK);
    g.renameat(ROOT_FID, "data", 3, "kept").expect(TRENAMEAT);
    assert_eq!(host_listing(&share), ["kept", "up"]);
    assert_eq!(host_listing(base.path()), ["share"]);
    let mkdir = Body::default()
        .u32(ROOT_FID)
        .str("../made")
        .u32(0o755)
        .u32(0);
    assert_eq!(g.call(TMKDIR, mkdir).errno(), einval);
    assert_eq!(g.unlinkat(ROOT_FID, "../share").errno(), einval);
    assert!(share.exists());
}

#[test]
fn fs9p_read_only_bind_inside_a_writable_share_stays_read_only() {
    let dir = TestDir::new("fs9p-nested");
    let outer = dir.path();
    fs::create_dir(outer.join("vol")).unwrap();
    fs::write(outer.join("vol/data"), b"ro").unwrap();
    fs::write(outer.join("hosts"), b"ro file").unwrap();
    fs::write(outer.join("free"), b"").unwrap();
    let share = ShareConfig {
        read_only_paths: vec![PathBuf::from("vol"), PathBuf::from("hosts")],
        ..ShareConfig::dir("share", outer, false)
    };
    let (mut g, _) = Guest::attached_to(&share);
    let erofs = errno(libc::EROFS);
    g.walk(ROOT_FID, 2, &["vol"]).expect(TWALK);
    assert_eq!(g.lcreate(2, "new", P9_RDWR).errno(), erofs);
    g.walk(ROOT_FID, 3, &["vol", "data"]).expect(TWALK);
    assert_eq!(g.lopen(3, P9_RDWR).errno(), erofs);
    g.walk(ROOT_FID, 4, &["hosts"]).expect(TWALK);
    assert_eq!(g.lopen(4, P9_RDWR | P9_TRUNC).errno(), erofs);
    assert!(g.unlinkat(2, "data").errno().is_some());
    assert!(g
        .renameat(ROOT_FID, "hosts", ROOT_FID, "h2")
        .errno()
        .is_some());
    // A hard link in the writable part would be a writable name for the read-only file.
    let link = Body::default().u32(ROOT_FID).u32(4).str("writable-hosts");
    assert_eq!(g.call(TLINK, link).errno(), errno(libc::EXDEV));
    g.walk(ROOT_FID, 6, &["vol", "data"]).expect(TWALK);
    let link = Body::default().u32(ROOT_FID).u32(6).str("writable-data");
    assert_eq!(g.call(TLINK, link).errno(), errno(libc::EXDEV));
    // The rest of the outer share is writable.
    g.walk(ROOT_FID, 5, &["free"]).expect(TWALK);
    g.lopen(5, P9_RDWR).expect(TLOPEN);
    g.write(5, b"ok").expect(TWRITE);
    assert_eq!(fs::read(outer.join("free")).unwrap(), b"ok");
    assert_eq!(fs::read(outer.join("vol/data")).unwrap(), b"ro");
    assert_eq!(fs::read(outer.join("hosts")).unwrap(), b"ro file");
    assert_eq!(host_listing(&outer.join("vol")), ["data"]);
    assert_eq!(host_listing(outer), ["free", "hosts", "vol"]);
}

#[test]
fn fs9p_a_nested_path_through_a_symlink_is_refused() {
    let base = TestDir::new("fs9p-nested-link");
    let outer = base.path().join("outer");
    fs::create_dir_all(base.path().join("elsewhere")).unwrap();
    fs::create_dir(&outer).unwrap();
    std::os::unix::fs::symlink(base.path().join("elsewhere"), outer.join("vol")).unwrap();
    let share = ShareConfig {
        read_only_paths: vec![PathBuf::from("vol")],
        ..ShareConfig::dir("share", &outer, false)
    };
    let mem = guest_memory();
    let dev = Fs9p::with_config(&share).unwrap();
    let (mut t, _irq) = transport(Box::new(dev), &mem);
    let q = GuestQueue::new(&mem, 0x1_0000, 64);
    // Activation fails (the worker cannot build the view) rather than serve `vol` writable.
    driver_init(&mut t, &[&q]);
    let needs_reset = crate::devices::virtio::status::DEVICE_NEEDS_RESET;
    assert_ne!(read32(&mut t, 0x70) & needs_reset, 0);
}

#[test]
fn fs9p_host_device_fifo_and_socket_in_the_share_are_not_opened() {
    let dir = TestDir::new("fs9p-dev");
    let share = dir.path();
    // /dev/null's numbers: harmless if the test were to fail.
    let dev = makedev(1, 3);
    mknod(
        &share.join("null"),
        SFlag::S_IFCHR,
        NodeMode::from_bits_truncate(0o666),
        dev,
    )
    .unwrap();
    nix::unistd::mkfifo(&share.join("fifo"), NodeMode::from_bits_truncate(0o666)).unwrap();
    let _sock = std::os::unix::net::UnixListener::bind(share.join("sock")).unwrap();
    let (mut g, _) = Guest::attached(share, false);
    let eperm = errno(libc::EPERM);
    for (fid, name) in [(2, "null"), (3, "fifo"), (4, "sock")] {
        g.walk(ROOT_FID, fid, &[name]).expect(TWALK);
        // A FIFO would block the worker here (and the call time out) were it opened.
        assert_eq!(g.lopen(fid, P9_RDONLY).errno(), eperm, "{name}");
        assert_eq!(g.lopen(fid, P9_RDWR).errno(), eperm, "{name}");
    }
    // Tsetattr of the size opens the file to truncate it: refused the same way.
    for fid in [2, 3, 4] {
        assert_eq!(g.truncate(fid).errno(), eperm);
    }
}

#[test]
fn fs9p_guest_cannot_make_a_device_node_and_open_it() {
    let dir = TestDir::new("fs9p-mknod");
    let (mut g, _) = Guest::attached(dir.path(), false);
    let chr = libc::S_IFCHR | 0o666;
    assert_eq!(
        g.mknod(ROOT_FID, "null", chr, 1, 3).errno(),
        errno(libc::EPERM)
    );
    let blk = libc::S_IFBLK | 0o666;
    assert_eq!(
        g.mknod(ROOT_FID, "sda", blk, 8, 0).errno(),
        errno(libc::EPERM)
    );
    assert_eq!(g.walk(ROOT_FID, 2, &["null"]).errno(), errno(libc::ENOENT));
    assert_eq!(g.walk(ROOT_FID, 2, &["sda"]).errno(), errno(libc::ENOENT));
    // The p9 server makes no nodes of any kind, FIFOs included.
    let fifo = libc::S_IFIFO | 0o666;
    assert!(g.mknod(ROOT_FID, "fifo", fifo, 0, 0).errno().is_some());
    assert!(host_listing(dir.path()).is_empty());
}

#[test]
fn fs9p_share_views_leave_no_mount_on_the_host() {
    let mountinfo = || fs::read_to_string("/proc/self/mountinfo").unwrap();
    let before = mountinfo();
    let dir = TestDir::new("fs9p-mounts");
    fs::create_dir(dir.path().join("vol")).unwrap();
    fs::write(dir.path().join("hosts"), b"").unwrap();
    let nested = ShareConfig {
        read_only_paths: vec![PathBuf::from("vol")],
        ..ShareConfig::dir("share", dir.path(), false)
    };
    let (mut a, _) = Guest::attached_to(&nested);
    let (mut b, _) = Guest::attached_to(&file_share(dir.path(), &["hosts"], true));
    a.walk(ROOT_FID, 2, &["vol"]).expect(TWALK);
    b.walk(ROOT_FID, 2, &["hosts"]).expect(TWALK);
    assert_eq!(mountinfo(), before, "a view's mounts reached the host");
    drop((a, b));
    assert_eq!(mountinfo(), before);
    let kind = fs::symlink_metadata(dir.path().join("hosts"))
        .unwrap()
        .file_type();
    assert!(kind.is_file() && !kind.is_fifo());
}

#[test]
fn fs9p_restore_does_not_reopen_a_fifo_left_at_a_saved_path() {
    use super::super::fids::{FidTable, SavedFid};
    let dir = TestDir::new("fs9p-replay");
    let saved = |name: &str| SavedFid {
        path: vec![name.to_string()],
        open_flags: Some(P9_RDONLY),
    };
    let mut table = FidTable {
        version: Some((MSIZE, "9P2000.L".to_string())),
        fids: [(1, saved("was-a-file")), (2, saved("still-a-file"))].into(),
    };
    // The directory the restored VM serves holds a FIFO where the open file was.
    nix::unistd::mkfifo(
        &dir.path().join("was-a-file"),
        NodeMode::from_bits_truncate(0o666),
    )
    .unwrap();
    fs::write(dir.path().join("still-a-file"), b"").unwrap();
    let root = dir.path().to_path_buf();
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut server = p9::Server::new(root, Default::default(), Default::default()).unwrap();
        super::super::worker::replay(&mut server, &mut table);
        let _ = done_tx.send(table);
    });
    // Opening the FIFO would block the replay until a writer came.
    let table = done_rx
        .recv_timeout(std::time::Duration::from_secs(5))
        .expect("the replay blocked");
    assert_eq!(table.fids.keys().copied().collect::<Vec<_>>(), [2]);
}
