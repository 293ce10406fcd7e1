//! The little of 9P2000.L framing the device reads itself, before or instead of the p9 server:
//! the message header (to answer with the right tag when the server cannot), the open flags of
//! Tlopen (for read-only mode), what the device refuses outright (device nodes, names holding
//! a path), the Tgetattr that tells what a fid is, and the Rlerror reply.
//!
//! Every 9P message starts with `size[4] type[1] tag[2]`, little endian (9p.h in Linux).

use std::io::Read;

/// Bytes in the common header: size, type, tag.
pub(super) const HEADER_LEN: usize = 7;
/// Bytes in an Rlerror: the header plus `ecode[4]`.
pub(super) const RLERROR_LEN: usize = HEADER_LEN + 4;

/// Message types from include/net/9p/9p.h.
pub(super) mod msg {
    pub const RLERROR: u8 = 7;
    pub const TVERSION: u8 = 100;
    pub const TATTACH: u8 = 104;
    pub const TWALK: u8 = 110;
    pub const TCLUNK: u8 = 120;
    pub const TLOPEN: u8 = 12;
    pub const TLCREATE: u8 = 14;
    pub const TSYMLINK: u8 = 16;
    pub const TMKNOD: u8 = 18;
    pub const TRENAME: u8 = 20;
    pub const TGETATTR: u8 = 24;
    pub const TSETATTR: u8 = 26;
    pub const TXATTRCREATE: u8 = 32;
    pub const TLINK: u8 = 70;
    pub const TMKDIR: u8 = 72;
    pub const TRENAMEAT: u8 = 74;
    pub const TUNLINKAT: u8 = 76;
    pub const TWRITE: u8 = 118;
    pub const TREMOVE: u8 = 122;
}

/// Tlopen flags (P9_DOTL_* in 9p.h) that let an open change the file.
const P9_ACCMODE: u32 = 0o3;
const P9_CREATE: u32 = 0o100;
const P9_TRUNC: u32 = 0o1000;
const P9_APPEND: u32 = 0o2000;
/// Tsetattr `valid` bit: set the size.
const P9_SETATTR_SIZE: u32 = 0x8;

/// The header fields the device needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Header {
    pub ty: u8,
    pub tag: u16,
}

/// Reads the header of a request without consuming it (the server reads it again), or None if
/// the request is shorter than a header.
pub(super) fn peek_header<R: Read + Clone>(request: &R) -> Option<Header> {
    let mut buf = [0u8; HEADER_LEN];
    request.clone().read_exact(&mut buf).ok()?;
    Some(Header {
        ty: buf[4],
        tag: u16::from_le_bytes([buf[5], buf[6]]),
    })
}

/// Whether a read-only share must refuse this request: it creates, changes or removes
/// something, or it is a Tlopen that opens for writing or truncates. A Tlopen too short to
/// carry its flags is refused rather than guessed at.
pub(super) fn modifies_host<R: Read + Clone>(ty: u8, request: &R) -> bool {
    use msg::*;
    match ty {
        TLCREATE | TSYMLINK | TMKNOD | TRENAME | TSETATTR | TXATTRCREATE | TLINK | TMKDIR
        | TRENAMEAT | TUNLINKAT | TWRITE | TREMOVE => true,
        TLOPEN => lopen_flags(request).is_none_or(opens_for_writing),
        _ => false,
    }
}

/// The flags of a Tlopen: `header fid[4] flags[4]`.
fn lopen_flags<R: Read + Clone>(request: &R) -> Option<u32> {
    let mut buf = [0u8; HEADER_LEN + 8];
    request.clone().read_exact(&mut buf).ok()?;
    let flags: [u8; 4] = buf[HEADER_LEN + 4..].try_into().ok()?;
    Some(u32::from_le_bytes(flags))
}

fn opens_for_writing(flags: u32) -> bool {
    flags & P9_ACCMODE != 0 || flags & (P9_CREATE | P9_TRUNC | P9_APPEND) != 0
}

/// Whether a Tmknod (`header dfid[4] name[s] mode[4] ...`) makes a character or block device.
/// One too short to tell is treated as if it did.
pub(super) fn mknod_makes_device<R: Read + Clone>(request: &R) -> bool {
    let mut r = request.clone();
    let mode = skip(&mut r, HEADER_LEN + 4)
        .and_then(|()| string(&mut r))
        .and_then(|_| u32_le(&mut r));
    mode.is_none_or(|m| matches!(m & libc::S_IFMT, libc::S_IFCHR | libc::S_IFBLK))
}

/// Whether a request names anything but single path components: a Twalk name holding a `/`
/// (which would make the server resolve several components at once, following symlinks
/// among them), or a name to create, link, rename or remove that holds a `/` or is `.` or
/// `..` (which would reach past the directory fid it is relative to). A Linux guest sends
/// none of these. A request too short to tell counts.
pub(super) fn names_a_path<R: Read + Clone>(ty: u8, request: &R) -> bool {
    use msg::*;
    let mut r = request.clone();
    if skip(&mut r, HEADER_LEN).is_none() {
        return true;
    }
    let names = match ty {
        TWALK => return walk_names_a_path(&mut r),
        TLCREATE | TSYMLINK | TMKNOD | TMKDIR | TUNLINKAT => skip(&mut r, 4)
            .and_then(|()| string(&mut r))
            .map(|n| vec![n]),
        TRENAME | TLINK => skip(&mut r, 8)
            .and_then(|()| string(&mut r))
            .map(|n| vec![n]),
        TRENAMEAT => renameat_names(&mut r),
        _ => return false,
    };
    names.is_none_or(|names| names.iter().any(|n| !plain_name(n)))
}

/// Twalk after the header: `fid[4] newfid[4] nwname[2] nwname*wname[s]`.
fn walk_names_a_path(r: &mut impl Read) -> bool {
    let Some(count) = skip(r, 8).and_then(|()| u16_le(r)) else {
        return true;
    };
    (0..count).any(|_| string(r).is_none_or(|n| n.contains(&b'/')))
}

/// Trenameat after the header: `olddirfid[4] oldname[s] newdirfid[4] newname[s]`.
fn renameat_names(r: &mut impl Read) -> Option<Vec<Vec<u8>>> {
    skip(r, 4)?;
    let old = string(r)?;
    skip(r, 4)?;
    Some(vec![old, string(r)?])
}

fn plain_name(n: &[u8]) -> bool {
    !n.is_empty() && n != b"." && n != b".." && !n.contains(&b'/')
}

/// The fid of a request that opens the file it names: a Tlopen, or a Tsetattr that changes
/// the size (`header fid[4] valid[4] ...`; the server opens the file to truncate it).
pub(super) fn opened_fid<R: Read + Clone>(ty: u8, request: &R) -> Option<u32> {
    let mut r = request.clone();
    skip(&mut r, HEADER_LEN)?;
    let fid = u32_le(&mut r)?;
    match ty {
        msg::TLOPEN => Some(fid),
        msg::TSETATTR => (u32_le(&mut r)? & P9_SETATTR_SIZE != 0).then_some(fid),
        _ => None,
    }
}

/// A Tgetattr of `fid` asking for its mode (P9_GETATTR_MODE).
pub(super) fn tgetattr_mode(fid: u32) -> Vec<u8> {
    let mut m = ((HEADER_LEN + 12) as u32).to_le_bytes().to_vec();
    m.push(msg::TGETATTR);
    m.extend_from_slice(&u16::MAX.to_le_bytes());
    m.extend_from_slice(&fid.to_le_bytes());
    m.extend_from_slice(&1u64.to_le_bytes());
    m
}

/// The mode in an Rgetattr (`header valid[8] qid[13] mode[4] ...`); None for an Rlerror.
pub(super) fn rgetattr_mode(reply: &[u8]) -> Option<u32> {
    if reply.get(4) != Some(&(msg::TGETATTR + 1)) {
        return None;
    }
    let at = HEADER_LEN + 8 + 13;
    Some(u32::from_le_bytes(reply.get(at..at + 4)?.try_into().ok()?))
}

fn skip(r: &mut impl Read, n: usize) -> Option<()> {
    let mut buf = vec![0u8; n];
    r.read_exact(&mut buf).ok()
}

pub(super) fn u16_le(r: &mut impl Read) -> Option<u16> {
    let mut b = [0u8; 2];
    r.read_exact(&mut b).ok()?;
    Some(u16::from_le_bytes(b))
}

pub(super) fn u32_le(r: &mut impl Read) -> Option<u32> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b).ok()?;
    Some(u32::from_le_bytes(b))
}

/// A 9P string: `len[2]` then that many bytes.
pub(super) fn string(r: &mut impl Read) -> Option<Vec<u8>> {
    let mut s = vec![0u8; usize::from(u16_le(r)?)];
    r.read_exact(&mut s).ok()?;
    Some(s)
}

/// An Rlerror reply carrying `errno` for the request tagged `tag`.
pub(super) fn rlerror(tag: u16, errno: i32) -> [u8; RLERROR_LEN] {
    let mut out = [0u8; RLERROR_LEN];
    out[..4].copy_from_slice(&(RLERROR_LEN as u32).to_le_bytes());
    out[4] = msg::RLERROR;
    out[5..7].copy_from_slice(&tag.to_le_bytes());
    out[7..].copy_from_slice(&(errno as u32).to_le_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    fn lopen(flags: u32) -> Cursor<Vec<u8>> {
        let mut m = vec![19, 0, 0, 0, msg::TLOPEN, 1, 0, 5, 0, 0, 0];
        m.extend_from_slice(&flags.to_le_bytes());
        Cursor::new(m)
    }

    #[test]
    fn fs9p_header_is_peeked_not_consumed() {
        let c = Cursor::new(vec![11, 0, 0, 0, 120, 0x34, 0x12, 0, 0, 0, 0]);
        let h = peek_header(&c).unwrap();
        assert_eq!(
            h,
            Header {
                ty: 120,
                tag: 0x1234
            }
        );
        assert_eq!(c.position(), 0);
        assert_eq!(peek_header(&Cursor::new(vec![1, 2, 3])), None);
    }

    #[test]
    fn fs9p_read_only_filter_lets_plain_opens_through() {
        assert!(!modifies_host(msg::TLOPEN, &lopen(0)));
        assert!(!modifies_host(msg::TLOPEN, &lopen(0o200000))); // O_DIRECTORY
        assert!(modifies_host(msg::TLOPEN, &lopen(1)));
        assert!(modifies_host(msg::TLOPEN, &lopen(2)));
        assert!(modifies_host(msg::TLOPEN, &lopen(P9_TRUNC)));
        assert!(modifies_host(msg::TLOPEN, &Cursor::new(vec![0u8; 9])));
        assert!(modifies_host(msg::TWRITE, &Cursor::new(vec![])));
        assert!(!modifies_host(116, &Cursor::new(vec![]))); // Tread
    }

    fn request(ty: u8, body: &[u8]) -> Cursor<Vec<u8>> {
        let mut m = ((HEADER_LEN + body.len()) as u32).to_le_bytes().to_vec();
        m.extend_from_slice(&[ty, 1, 0]);
        m.extend_from_slice(body);
        Cursor::new(m)
    }

    fn name(s: &str) -> Vec<u8> {
        let mut b = (s.len() as u16).to_le_bytes().to_vec();
        b.extend_from_slice(s.as_bytes());
        b
    }

    #[test]
    fn fs9p_names_holding_a_path_are_spotted() {
        let walk = |names: &[&str]| {
            let mut b = vec![1, 0, 0, 0, 2, 0, 0, 0];
            b.extend_from_slice(&(names.len() as u16).to_le_bytes());
            names.iter().for_each(|n| b.extend(name(n)));
            request(msg::TWALK, &b)
        };
        assert!(!names_a_path(msg::TWALK, &walk(&["a", "..", "b"])));
        assert!(names_a_path(msg::TWALK, &walk(&["a", "../b"])));
        assert!(names_a_path(msg::TWALK, &request(msg::TWALK, &[1, 0])));
        let renameat = |from: &str, to: &str| {
            let mut b = vec![1, 0, 0, 0];
            b.extend(name(from));
            b.extend_from_slice(&[1, 0, 0, 0]);
            b.extend(name(to));
            request(msg::TRENAMEAT, &b)
        };
        assert!(!names_a_path(msg::TRENAMEAT, &renameat("a", "b")));
        assert!(names_a_path(msg::TRENAMEAT, &renameat("a", "..")));
        assert!(names_a_path(msg::TRENAMEAT, &renameat("x/a", "b")));
        let mut mkdir = vec![1, 0, 0, 0];
        mkdir.extend(name("."));
        assert!(names_a_path(msg::TMKDIR, &request(msg::TMKDIR, &mkdir)));
        assert!(!names_a_path(116, &request(116, &[]))); // Tread names nothing
    }

    #[test]
    fn fs9p_mknod_of_a_device_is_spotted() {
        let mknod = |mode: u32| {
            let mut b = vec![1, 0, 0, 0];
            b.extend(name("n"));
            b.extend_from_slice(&mode.to_le_bytes());
            b.extend_from_slice(&[0u8; 12]);
            request(msg::TMKNOD, &b)
        };
        assert!(mknod_makes_device(&mknod(libc::S_IFCHR | 0o666)));
        assert!(mknod_makes_device(&mknod(libc::S_IFBLK | 0o600)));
        assert!(!mknod_makes_device(&mknod(libc::S_IFIFO | 0o600)));
        assert!(mknod_makes_device(&request(msg::TMKNOD, &[1, 0, 0, 0])));
    }
}
