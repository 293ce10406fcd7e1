//! The little of 9P2000.L framing the device reads itself, before or instead of the p9 server:
//! the message header (to answer with the right tag when the server cannot), the open flags of
//! Tlopen (for read-only mode) and the Rlerror reply.
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
}
