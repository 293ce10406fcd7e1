//! virtio-9p driven through the MMIO transport and a real split queue, with hand-encoded
//! 9P2000.L messages, over a temp directory.

use std::fs;

use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::bus::BusDevice;
use crate::devices::virtio::mmio::MmioTransport;
use crate::devices::virtio::testutil::{
    assert_rss_growth, driver_init, flood_here, guest_memory, notify, read32, rss_kib, transport,
    Alloc, Buf, GuestQueue, TestDir,
};

// Message types (include/net/9p/9p.h).
const RLERROR: u8 = 7;
const TLOPEN: u8 = 12;
const TLCREATE: u8 = 14;
const TGETATTR: u8 = 24;
const TREADDIR: u8 = 40;
const TVERSION: u8 = 100;
const TATTACH: u8 = 104;
const TWALK: u8 = 110;
const TREAD: u8 = 116;
const TWRITE: u8 = 118;
const TCLUNK: u8 = 120;

const P9_RDONLY: u32 = 0;
const P9_RDWR: u32 = 2;
const P9_TRUNC: u32 = 0o1000;
const P9_DIRECTORY: u32 = 0o200000;
const ROOT_FID: u32 = 1;
const NOFID: u32 = u32::MAX;
const MSIZE: u32 = 8192;

/// A 9P message body under construction.
#[derive(Default)]
struct Body(Vec<u8>);

impl Body {
    fn u16(mut self, v: u16) -> Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn u32(mut self, v: u32) -> Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn u64(mut self, v: u64) -> Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn str(self, s: &str) -> Self {
        let mut b = self.u16(s.len() as u16);
        b.0.extend_from_slice(s.as_bytes());
        b
    }
    fn bytes(mut self, d: &[u8]) -> Self {
        self.0.extend_from_slice(d);
        self
    }
}

/// A decoded reply.
#[derive(Debug)]
struct Reply {
    ty: u8,
    tag: u16,
    body: Vec<u8>,
}

impl Reply {
    fn errno(&self) -> Option<u32> {
        (self.ty == RLERROR).then(|| le32(&self.body[..4]))
    }

    /// Asserts the reply answers a request of type `t` and returns its body.
    fn expect(self, t: u8) -> Vec<u8> {
        assert_eq!(
            self.ty,
            t + 1,
            "unexpected reply {self:?} (errno {:?})",
            self.errno()
        );
        self.body
    }
}

fn le32(b: &[u8]) -> u32 {
    u32::from_le_bytes(b[..4].try_into().unwrap())
}

fn le64(b: &[u8]) -> u64 {
    u64::from_le_bytes(b[..8].try_into().unwrap())
}

/// A guest 9p client: one queue, one request at a time.
struct Guest {
    mem: Arc<GuestMemoryMmap>,
    t: MmioTransport,
    q: GuestQueue,
    alloc: Alloc,
    next_tag: u16,
    irq: Arc<Interrupt>,
}

impl Guest {
    fn new(dir: &Path, read_only: bool) -> Self {
        Self::serving(&ShareConfig::dir("share", dir, read_only))
    }

    fn serving(share: &ShareConfig) -> Self {
        let mem = guest_memory();
        let dev = Fs9p::with_config(share).unwrap();
        let (mut t, irq) = transport(Box::new(dev), &mem);
        let q = GuestQueue::new(&mem, 0x1_0000, 64);
        driver_init(&mut t, &[&q]);
        Self {
            mem,
            t,
            q,
            alloc: Alloc::new(),
            next_tag: 1,
            irq,
        }
    }

    /// A guest that negotiated the protocol and attached the share's root as ROOT_FID.
    fn attached(dir: &Path, read_only: bool) -> (Self, Vec<u8>) {
        Self::attached_to(&ShareConfig::dir("share", dir, read_only))
    }

    /// A guest attached to the root of `share` as ROOT_FID.
    fn attached_to(share: &ShareConfig) -> (Self, Vec<u8>) {
        let mut g = Self::serving(share);
        g.call(TVERSION, Body::default().u32(MSIZE).str("9P2000.L"))
            .expect(TVERSION);
        let attach = Body::default()
            .u32(ROOT_FID)
            .u32(NOFID)
            .str("root")
            .str("")
            .u32(0);
        let qid = g.call(TATTACH, attach).expect(TATTACH);
        (g, qid)
    }

    fn frame(&mut self, ty: u8, body: &Body) -> (Vec<u8>, u16) {
        let tag = self.next_tag;
        self.next_tag += 1;
        let mut m = ((7 + body.0.len()) as u32).to_le_bytes().to_vec();
        m.push(ty);
        m.extend_from_slice(&tag.to_le_bytes());
        m.extend_from_slice(&body.0);
        (m, tag)
    }

    /// Sends a request with MSIZE bytes for the reply.
    fn call(&mut self, ty: u8, body: Body) -> Reply {
        let (m, _) = self.frame(ty, &body);
        let (raw, used) = self.exchange(&m, &[m.len()], &[MSIZE]);
        parse(&raw[..used as usize])
    }

    /// Places `request` in readable descriptors of the sizes in `out_split` and offers
    /// writable descriptors of the sizes in `in_split`. Returns the bytes written back, in
    /// order, and the used length.
    fn exchange(
        &mut self,
        request: &[u8],
        out_split: &[usize],
        in_split: &[u32],
    ) -> (Vec<u8>, u32) {
        let mut bufs: Vec<Buf> = Vec::new();
        let mut rest = request;
        for &n in out_split {
            let (part, tail) = rest.split_at(n);
            let a = self.alloc.take(n as u64);
            self.mem.write_slice(part, GuestAddress(a)).unwrap();
            bufs.push((a, n as u32, false));
            rest = tail;
        }
        assert!(rest.is_empty(), "out_split must cover the request");
        for &n in in_split {
            bufs.push((self.alloc.take(u64::from(n)), n, true));
        }
        let head = self.q.add_chain(&bufs);
        notify(&mut self.t, 0);
        let (used_head, used) = self.q.wait_used();
        assert_eq!(used_head, head);
        (self.gather(&bufs), used)
    }

    fn gather(&self, bufs: &[Buf]) -> Vec<u8> {
        let mut out = Vec::new();
        for &(addr, len, _) in bufs.iter().filter(|b| b.2) {
            let mut part = vec![0u8; len as usize];
            self.mem.read_slice(&mut part, GuestAddress(addr)).unwrap();
            out.extend_from_slice(&part);
        }
        out
    }

    fn walk(&mut self, fid: u32, newfid: u32, names: &[&str]) -> Reply {
        let mut b = Body::default().u32(fid).u32(newfid).u16(names.len() as u16);
        for n in names {
            b = b.str(n);
        }
        self.call(TWALK, b)
    }

    fn lopen(&mut self, fid: u32, flags: u32) -> Reply {
        self.call(TLOPEN, Body::default().u32(fid).u32(flags))
    }

    fn read(&mut self, fid: u32, offset: u64, count: u32) -> Vec<u8> {
        let body = self
            .call(TREAD, Body::default().u32(fid).u64(offset).u32(count))
            .expect(TREAD);
        let n = le32(&body) as usize;
        body[4..4 + n].to_vec()
    }

    fn lcreate(&mut self, dirfid: u32, name: &str, flags: u32) -> Reply {
        let b = Body::default()
            .u32(dirfid)
            .str(name)
            .u32(flags)
            .u32(0o644)
            .u32(0);
        self.call(TLCREATE, b)
    }
}

fn parse(raw: &[u8]) -> Reply {
    assert!(raw.len() >= 7, "short reply {raw:?}");
    let size = le32(raw) as usize;
    assert_eq!(size, raw.len(), "size field disagrees with the used length");
    Reply {
        ty: raw[4],
        tag: u16::from_le_bytes([raw[5], raw[6]]),
        body: raw[7..].to_vec(),
    }
}

/// The names in an Rreaddir body: `count[4]` then entries `qid[13] offset[8] type[1] name[s]`.
fn dirent_names(body: &[u8]) -> Vec<String> {
    let data = &body[4..4 + le32(body) as usize];
    let mut names = Vec::new();
    let mut at = 0;
    while at < data.len() {
        let name_at = at + 13 + 8 + 1;
        let len = usize::from(u16::from_le_bytes([data[name_at], data[name_at + 1]]));
        let name = &data[name_at + 2..name_at + 2 + len];
        names.push(String::from_utf8(name.to_vec()).unwrap());
        at = name_at + 2 + len;
    }
    names.sort();
    names
}

fn host_listing(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    names
}

#[test]
fn fs9p_new_rejects_bad_dirs_and_tags() {
    let dir = TestDir::new("fs9p-new");
    let missing = dir.path().join("missing");
    let e = Fs9p::new("t", &missing, false).err().unwrap().to_string();
    assert!(
        e.contains(missing.to_str().unwrap()) && !e.contains('\n'),
        "{e}"
    );
    let file = dir.path().join("file");
    fs::write(&file, b"x").unwrap();
    let e = Fs9p::new("t", &file, false).err().unwrap().to_string();
    assert!(e.contains(file.to_str().unwrap()), "{e}");
    assert!(e.contains("Not a directory"), "{e}");
    for tag in ["", "a b", &"x".repeat(MAX_TAG_LEN + 1)] {
        assert!(matches!(
            Fs9p::new(tag, dir.path(), false),
            Err(Error::Tag { .. })
        ));
    }
    assert!(Fs9p::new(&"x".repeat(MAX_TAG_LEN), dir.path(), false).is_ok());
}

#[test]
fn fs9p_transport_shows_device_9_and_its_tag() {
    let dir = TestDir::new("fs9p-cfg");
    let mem = guest_memory();
    let (mut t, _irq) = transport(
        Box::new(Fs9p::new("hostshare", dir.path(), false).unwrap()),
        &mem,
    );
    assert_eq!(read32(&mut t, 0x008), TYPE_9P);
    let q = GuestQueue::new(&mem, 0x1_0000, 64);
    let features = driver_init(&mut t, &[&q]);
    assert_ne!(features & (1 << VIRTIO_9P_MOUNT_TAG), 0);
    let mut cfg = [0u8; 11];
    t.read(0x100, &mut cfg);
    assert_eq!(&cfg[..2], &9u16.to_le_bytes());
    assert_eq!(&cfg[2..], b"hostshare");
}

#[test]
fn fs9p_version_negotiates_9p2000l_and_caps_msize() {
    let dir = TestDir::new("fs9p-version");
    let mut g = Guest::new(dir.path(), false);
    let r = g.call(TVERSION, Body::default().u32(1 << 20).str("9P2000.L"));
    assert_eq!(r.tag, 1);
    let body = r.expect(TVERSION);
    assert_eq!(le32(&body), MAX_MSIZE);
    assert_eq!(&body[4..], b"\x08\x009P2000.L");
    // A dialect the server does not speak is answered with "unknown" (9P2000 section version).
    let body = g
        .call(TVERSION, Body::default().u32(MSIZE).str("9P2000"))
        .expect(TVERSION);
    assert_eq!(le32(&body), MSIZE);
    assert_eq!(&body[4..], b"\x07\x00unknown");
}

#[test]
fn fs9p_reads_a_host_file_across_split_descriptors() {
    let dir = TestDir::new("fs9p-read");
    let content: Vec<u8> = (0..3000u32).map(|i| (i % 251) as u8).collect();
    fs::write(dir.path().join("hello.bin"), &content).unwrap();
    let (mut g, _) = Guest::attached(dir.path(), false);
    assert_ne!(g.irq.status() & crate::devices::virtio::INT_USED_RING, 0);
    g.walk(ROOT_FID, 2, &["hello.bin"]).expect(TWALK);
    g.lopen(2, P9_RDONLY).expect(TLOPEN);
    assert_eq!(g.read(2, 0, 4096), content);
    assert_eq!(g.read(2, 2990, 100), &content[2990..]);
    // The same Tread split over three readable descriptors, its reply over three writable ones.
    let (m, tag) = g.frame(TREAD, &Body::default().u32(2).u64(0).u32(3000));
    let (raw, used) = g.exchange(&m, &[3, 9, m.len() - 12], &[5, 1000, 3000]);
    assert_eq!(used, 11 + 3000);
    let r = parse(&raw[..used as usize]);
    assert_eq!(r.tag, tag);
    assert_eq!(&r.expect(TREAD)[4..], &content[..]);
    g.call(TCLUNK, Body::default().u32(2)).expect(TCLUNK);
    assert_eq!(g.lopen(2, P9_RDONLY).errno(), Some(libc::EBADF as u32));
}

#[test]
fn fs9p_created_file_appears_on_the_host() {
    let dir = TestDir::new("fs9p-create");
    let (mut g, _) = Guest::attached(dir.path(), false);
    // Tlcreate turns the fid into the new file, so it works on a clone of the root.
    g.walk(ROOT_FID, 2, &[]).expect(TWALK);
    g.lcreate(2, "new.txt", P9_RDWR).expect(TLCREATE);
    let data = b"written by the guest";
    let w = Body::default()
        .u32(2)
        .u64(0)
        .u32(data.len() as u32)
        .bytes(data);
    assert_eq!(le32(&g.call(TWRITE, w).expect(TWRITE)), data.len() as u32);
    g.call(TCLUNK, Body::default().u32(2)).expect(TCLUNK);
    assert_eq!(fs::read(dir.path().join("new.txt")).unwrap(), data);
    // Rgetattr: valid[8] qid[13] mode[4] uid[4] gid[4] nlink[8] rdev[8] size[8] ...
    g.walk(ROOT_FID, 3, &["new.txt"]).expect(TWALK);
    let attr = g
        .call(TGETATTR, Body::default().u32(3).u64(0x7ff))
        .expect(TGETATTR);
    assert_eq!(le64(&attr[49..]), data.len() as u64);
    assert_eq!(le32(&attr[21..]) & 0o7777, 0o644);
}

#[test]
fn fs9p_readdir_lists_the_host_directory() {
    let dir = TestDir::new("fs9p-readdir");
    fs::write(dir.path().join("a"), b"").unwrap();
    fs::create_dir(dir.path().join("sub")).unwrap();
    let (mut g, _) = Guest::attached(dir.path(), false);
    g.walk(ROOT_FID, 2, &[]).expect(TWALK);
    g.lopen(2, P9_RDONLY | P9_DIRECTORY).expect(TLOPEN);
    let body = g
        .call(TREADDIR, Body::default().u32(2).u64(0).u32(4096))
        .expect(TREADDIR);
    assert_eq!(dirent_names(&body), [".", "..", "a", "sub"]);
}

#[test]
fn fs9p_read_only_refuses_changes_with_erofs() {
    let dir = TestDir::new("fs9p-ro");
    fs::write(dir.path().join("keep"), b"original").unwrap();
    let before = host_listing(dir.path());
    let (mut g, _) = Guest::attached(dir.path(), true);
    g.walk(ROOT_FID, 2, &[]).expect(TWALK);
    let erofs = Some(libc::EROFS as u32);
    assert_eq!(g.lcreate(2, "new.txt", P9_RDWR).errno(), erofs);
    // Opening for writing or truncating is refused too; reading still works.
    g.walk(ROOT_FID, 3, &["keep"]).expect(TWALK);
    assert_eq!(g.lopen(3, P9_RDWR).errno(), erofs);
    assert_eq!(g.lopen(3, P9_RDONLY | P9_TRUNC).errno(), erofs);
    g.lopen(3, P9_RDONLY).expect(TLOPEN);
    let w = Body::default().u32(3).u64(0).u32(1).bytes(b"X");
    assert_eq!(g.call(TWRITE, w).errno(), erofs);
    assert_eq!(g.read(3, 0, 100), b"original");
    assert_eq!(host_listing(dir.path()), before);
    assert_eq!(fs::read(dir.path().join("keep")).unwrap(), b"original");
}

#[test]
fn fs9p_reply_larger_than_the_buffer_is_an_error() {
    let dir = TestDir::new("fs9p-small");
    fs::write(dir.path().join("big"), vec![7u8; 4000]).unwrap();
    let (mut g, _) = Guest::attached(dir.path(), false);
    g.walk(ROOT_FID, 2, &["big"]).expect(TWALK);
    g.lopen(2, P9_RDONLY).expect(TLOPEN);
    let (m, tag) = g.frame(TREAD, &Body::default().u32(2).u64(0).u32(4000));
    let (raw, used) = g.exchange(&m, &[m.len()], &[64]);
    let r = parse(&raw[..used as usize]);
    assert_eq!((r.tag, r.errno()), (tag, Some(libc::EMSGSIZE as u32)));
    // Not even room for an Rlerror: nothing is written, nothing breaks.
    let (m, _) = g.frame(TREAD, &Body::default().u32(2).u64(0).u32(4000));
    assert_eq!(g.exchange(&m, &[m.len()], &[4]).1, 0);
    // A request cut short (its size field claims the count the guest never supplied) gets an
    // Rlerror for its tag, and one shorter than a header is dropped, without a panic.
    let (m, tag) = g.frame(TREAD, &Body::default().u32(2).u64(0).u32(10));
    let cut = &m[..m.len() - 4];
    let (raw, used) = g.exchange(cut, &[cut.len()], &[MSIZE]);
    let r = parse(&raw[..used as usize]);
    assert_eq!((r.tag, r.errno()), (tag, Some(libc::EINVAL as u32)));
    assert_eq!(g.exchange(&[1, 0, 0], &[3], &[MSIZE]).1, 0);
    // The device still works.
    assert_eq!(g.read(2, 0, 10), [7u8; 10]);
}

#[test]
fn fs9p_dotdot_and_symlinks_stay_inside_the_share() {
    let base = TestDir::new("fs9p-escape");
    let share = base.path().join("share");
    fs::create_dir(&share).unwrap();
    fs::write(base.path().join("outside"), b"secret").unwrap();
    fs::write(share.join("inside"), b"ok").unwrap();
    std::os::unix::fs::symlink(base.path(), share.join("link")).unwrap();
    let (mut g, root_qid) = Guest::attached(&share, false);
    // `..` from the root is the root: same qid (type, version, path).
    let wqids = g.walk(ROOT_FID, 2, &["..", ".."]).expect(TWALK);
    assert_eq!(u16::from_le_bytes([wqids[0], wqids[1]]), 2);
    assert_eq!(&wqids[2 + 13..2 + 26], &root_qid[..]);
    g.walk(2, 3, &["inside"]).expect(TWALK);
    // A name holding a path is refused before the server resolves it.
    let einval = Some(libc::EINVAL as u32);
    assert_eq!(g.walk(ROOT_FID, 4, &["../outside"]).errno(), einval);
    // A partial walk answers the qids it got through and does not create the fid.
    let partial = g.walk(ROOT_FID, 4, &["..", "outside"]).expect(TWALK);
    assert_eq!(u16::from_le_bytes([partial[0], partial[1]]), 1);
    assert_eq!(g.walk(ROOT_FID, 4, &["link/outside"]).errno(), einval);
    // Walked one name at a time, the link is not followed: the walk stops at it.
    let stopped = g.walk(ROOT_FID, 4, &["link", "outside"]).expect(TWALK);
    assert_eq!(u16::from_le_bytes([stopped[0], stopped[1]]), 1);
}

/// Sends requests through one request and one reply buffer, reused, so that a flood does not
/// run the test's guest memory out.
struct Reusing {
    request: u64,
    reply: u64,
}

impl Reusing {
    fn new(g: &mut Guest) -> Self {
        let request = g.alloc.take(u64::from(MSIZE));
        let reply = g.alloc.take(u64::from(MSIZE));
        Self { request, reply }
    }

    fn call(&self, g: &mut Guest, ty: u8, body: Body) -> Reply {
        let (m, _) = g.frame(ty, &body);
        g.mem.write_slice(&m, GuestAddress(self.request)).unwrap();
        let bufs = [
            (self.request, m.len() as u32, false),
            (self.reply, MSIZE, true),
        ];
        let head = g.q.add_chain(&bufs);
        notify(&mut g.t, 0);
        let (used_head, used) = g.q.wait_used();
        assert_eq!(used_head, head);
        parse(&g.gather(&bufs)[..used as usize])
    }

    fn walk(&self, g: &mut Guest, fid: u32, newfid: u32, names: &[&str]) -> Reply {
        let mut b = Body::default().u32(fid).u32(newfid).u16(names.len() as u16);
        for n in names {
            b = b.str(n);
        }
        self.call(g, TWALK, b)
    }
}

/// A guest clones fids until it is refused, well past `MAX_FIDS`: exactly the cap is granted
/// (the root fid counts), the rest get EMFILE, and a clunk makes room for one more.
#[test]
fn fs9p_flood_of_fids_gets_emfile() {
    if !flood_here(module_path!(), "fs9p_flood_of_fids_gets_emfile") {
        return;
    }
    let dir = TestDir::new("9p-fids");
    let (mut g, _) = Guest::attached(dir.path(), false);
    let io = Reusing::new(&mut g);
    let before = rss_kib();
    let mut granted = 1;
    for newfid in 2..(fids::MAX_FIDS as u32 + 2000) {
        match io.walk(&mut g, ROOT_FID, newfid, &[]).errno() {
            None => granted += 1,
            Some(e) => assert_eq!(e, libc::EMFILE as u32),
        }
    }
    assert_rss_growth("9p fids (MAX_FIDS + 2000 Twalks to new fids)", before, 16);
    assert_eq!(granted, fids::MAX_FIDS);
    let extra = fids::MAX_FIDS as u32 + 5000;
    assert!(io.walk(&mut g, ROOT_FID, extra, &[]).errno().is_some());
    io.call(&mut g, TCLUNK, Body::default().u32(2))
        .expect(TCLUNK);
    io.walk(&mut g, ROOT_FID, extra, &[]).expect(TWALK);
}

/// A guest walks a fid ever deeper down a directory chain (it may make one as deep as it likes
/// in a writable share): the fid's recorded path stops at `MAX_FID_PATH_DEPTH` (or at
/// `MAX_FID_PATH_BYTES` with long names), and a walk with more names than 9P allows is refused
/// before the server stats any of them.
#[test]
fn fs9p_flood_of_deep_walks_is_cut_off() {
    if !flood_here(module_path!(), "fs9p_flood_of_deep_walks_is_cut_off") {
        return;
    }
    let dir = TestDir::new("9p-deep");
    let deep: PathBuf = std::iter::repeat_n("d", fids::MAX_FID_PATH_DEPTH + 40).collect();
    std::fs::create_dir_all(dir.path().join(deep)).unwrap();
    let long = "n".repeat(200);
    directory_chain(
        dir.path(),
        &long,
        fids::MAX_FID_PATH_BYTES / (long.len() + 1) + 2,
    );
    let (mut g, _) = Guest::attached(dir.path(), false);
    let io = Reusing::new(&mut g);
    io.walk(&mut g, ROOT_FID, 2, &[]).expect(TWALK);
    let before = rss_kib();
    let names = ["d"; 16];
    let mut deepest = 0;
    for _ in 0..10_000 {
        match io.walk(&mut g, 2, 2, &names).errno() {
            None => deepest += names.len(),
            Some(e) => assert_eq!(e, libc::ENAMETOOLONG as u32),
        }
    }
    assert_rss_growth("9p 10000 walks 16 deeper each", before, 8);
    assert_eq!(deepest, fids::MAX_FID_PATH_DEPTH);
    // Long names reach the byte cap long before the depth cap.
    io.walk(&mut g, ROOT_FID, 3, &[]).expect(TWALK);
    let mut depth = 0;
    while io.walk(&mut g, 3, 3, &[long.as_str()]).errno().is_none() {
        depth += 1;
    }
    assert_eq!(depth, fids::MAX_FID_PATH_BYTES / (long.len() + 1));
    let too_many = ["."; 17];
    assert_eq!(
        io.walk(&mut g, ROOT_FID, 4, &too_many).errno(),
        Some(libc::EINVAL as u32)
    );
}

/// Makes `levels` nested directories named `name` under `base`, one `mkdirat` at a time: the
/// whole chain may be longer than a path the host accepts at once.
fn directory_chain(base: &Path, name: &str, levels: usize) {
    use nix::fcntl::{openat, OFlag};
    use nix::sys::stat::{mkdirat, Mode};
    let mut fd = std::fs::File::open(base).unwrap().into();
    for _ in 0..levels {
        mkdirat(&fd, name, Mode::from_bits_truncate(0o755)).unwrap();
        fd = openat(
            &fd,
            name,
            OFlag::O_DIRECTORY | OFlag::O_RDONLY,
            Mode::empty(),
        )
        .unwrap();
    }
}

/// A guest floods Twalks whose chains carry 3 GiB of readable bytes after the message (every
/// descriptor of an indirect table aliasing one 16 MiB stretch of guest memory): the device reads no more than an
/// msize of each, so memory stays flat and the walks are answered as usual.
#[test]
fn fs9p_flood_of_oversized_chains_reads_an_msize() {
    if !flood_here(
        module_path!(),
        "fs9p_flood_of_oversized_chains_reads_an_msize",
    ) {
        return;
    }
    let dir = TestDir::new("9p-big");
    let (mut g, _) = Guest::attached(dir.path(), false);
    let (m, _) = g.frame(TWALK, &Body::default().u32(ROOT_FID).u32(2).u16(0));
    let request = g.alloc.take(m.len() as u64);
    g.mem.write_slice(&m, GuestAddress(request)).unwrap();
    let reply = g.alloc.take(u64::from(MSIZE));
    let mut bufs: Vec<Buf> = vec![(request, m.len() as u32, false)];
    bufs.extend(std::iter::repeat_n((1 << 20, 16 << 20, false), 192));
    bufs.push((reply, MSIZE, true));
    let table = g.alloc.take(16 * bufs.len() as u64);
    let before = rss_kib();
    for _ in 0..20 {
        let head = g.q.add_indirect_chain(table, &bufs);
        notify(&mut g.t, 0);
        let (used_head, used) = g.q.wait_used();
        assert_eq!(used_head, head);
        parse(&g.gather(&bufs)[..used as usize]).expect(TWALK);
        g.call(TCLUNK, Body::default().u32(2)).expect(TCLUNK);
    }
    assert_rss_growth("9p 20 Twalks of 3 GiB chains", before, 8);
}

mod attacks;
