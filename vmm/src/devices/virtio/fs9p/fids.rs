//! The fids the guest holds, as paths: what a snapshot records of a share so that a restored
//! server can open them again.
//!
//! The p9 server keeps its fids private (open file descriptors, no paths), so the device
//! follows them itself: every request that makes, moves, opens or drops a fid is read again
//! after the server answered it successfully, and the table updated (path components from
//! the share root, and the open flags). A restore replays the table into the new server as
//! ordinary requests: Tversion with the saved msize, then for each fid Tattach, Twalk to its
//! path and Tlopen with its flags (never creating or truncating). The guest's mount and its
//! open files then go on working, against the restored VM's directory for the share.

use std::collections::BTreeMap;
use std::io::{Cursor, Read};

use serde::{Deserialize, Serialize};

use super::wire::{self, msg, HEADER_LEN};

/// "No fid" in Tattach's afid.
const NOFID: u32 = u32::MAX;
/// Tlopen/Tlcreate flags a reopen must not repeat (P9_DOTL_CREATE, _EXCL, _TRUNC).
const REOPEN_MASK: u32 = !(0o100 | 0o200 | 0o1000);
/// Most fids a guest may hold on one share. The p9 server keeps one or two host file
/// descriptors per fid and this table a path, so without a cap a guest could exhaust the
/// monitor's descriptors and grow its memory and snapshots at will. Linux holds a fid per
/// open file, mapped file and directory in use (with cache=none, its default, unused
/// dentries drop theirs), so a container at the default RLIMIT_NOFILE of 1024 stays well
/// below 4096; beyond it Tattach and Twalk to a new fid get EMFILE.
pub(super) const MAX_FIDS: usize = 4096;
/// Most path components a fid may reach. Walks through a symlink (a name like `l/.` with
/// `l -> .`) would otherwise lengthen a fid's recorded path forever; 256 directories deep is
/// far beyond real trees. Deeper walks get ENAMETOOLONG.
pub(super) const MAX_FID_PATH_DEPTH: usize = 256;
/// Most bytes of names (plus a separator each) on a fid's path: Linux's PATH_MAX, the
/// longest path the guest could name at once. With `MAX_FID_PATH_DEPTH` this keeps the whole
/// table within about 12 KiB per fid, 48 MiB at `MAX_FIDS`. Longer walks get ENAMETOOLONG.
pub(super) const MAX_FID_PATH_BYTES: usize = 4096;
/// Most names in one Twalk (MAXWELEM of 9P; Linux never sends more). More would make the
/// server stat and answer thousands of names from one request.
const MAX_WALK_NAMES: u16 = 16;

/// One fid: where it points and how it is open.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct SavedFid {
    /// Path components from the share root.
    pub(super) path: Vec<String>,
    /// The flags of its Tlopen or Tlcreate; `None` while it is only walked to.
    pub(super) open_flags: Option<u32>,
}

/// Every fid the guest holds on one share, and the session's msize.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct FidTable {
    /// The msize and version string of the guest's Tversion; `None` before it.
    pub(super) version: Option<(u32, String)>,
    pub(super) fids: BTreeMap<u32, SavedFid>,
}

/// Whether requests of type `ty` change the table (their replies are then buffered so that
/// the device can read them).
pub(super) fn tracks(ty: u8) -> bool {
    use msg::*;
    matches!(
        ty,
        TVERSION | TATTACH | TWALK | TLOPEN | TLCREATE | TCLUNK | TREMOVE | TRENAME | TRENAMEAT
    )
}

impl FidTable {
    /// Updates the table after the server answered `request` with `reply` (both whole
    /// messages). Error replies change nothing; requests it cannot parse are ignored.
    pub(super) fn observe(&mut self, request: &[u8], reply: &[u8]) {
        if reply.len() < HEADER_LEN || reply[4] == msg::RLERROR {
            return;
        }
        let mut r = Cursor::new(request.get(HEADER_LEN..).unwrap_or_default());
        let _ = self.apply(request[4], &mut r, reply);
    }

    /// Decides, before the server sees `request` (a whole tracked message), whether the guest
    /// may have it: a new fid needs room under `MAX_FIDS`, and a walk must stay within
    /// `MAX_WALK_NAMES`, `MAX_FID_PATH_DEPTH` and `MAX_FID_PATH_BYTES`. Returns the errno to
    /// refuse with.
    pub(super) fn admit(&self, request: &[u8]) -> Result<(), i32> {
        let mut r = Cursor::new(request.get(HEADER_LEN..).unwrap_or_default());
        let newfid = match request.get(4).copied() {
            Some(msg::TATTACH) => wire::u32_le(&mut r),
            Some(msg::TWALK) => self.admit_walk(&mut r)?,
            _ => return Ok(()),
        };
        // Malformed requests are the server's to refuse.
        match newfid {
            Some(fid) if !self.fids.contains_key(&fid) && self.fids.len() >= MAX_FIDS => {
                Err(libc::EMFILE)
            }
            _ => Ok(()),
        }
    }

    /// Checks a Twalk's names; returns its newfid.
    fn admit_walk(&self, r: &mut Cursor<&[u8]>) -> Result<Option<u32>, i32> {
        let (Some(fid), Some(newfid), Some(count)) =
            (wire::u32_le(r), wire::u32_le(r), wire::u16_le(r))
        else {
            return Ok(None);
        };
        if count > MAX_WALK_NAMES {
            return Err(libc::EINVAL);
        }
        let names = (0..count).map(|_| string_of(r)).collect::<Option<Vec<_>>>();
        let start = self.fids.get(&fid).map(|f| f.path.as_slice());
        if let (Some(start), Some(names)) = (start, names) {
            let path = joined(start, &names);
            let bytes: usize = path.iter().map(|n| n.len() + 1).sum();
            if path.len() > MAX_FID_PATH_DEPTH || bytes > MAX_FID_PATH_BYTES {
                return Err(libc::ENAMETOOLONG);
            }
        }
        Ok(Some(newfid))
    }

    fn apply(&mut self, ty: u8, r: &mut Cursor<&[u8]>, reply: &[u8]) -> Option<()> {
        match ty {
            msg::TVERSION => {
                let msize = wire::u32_le(r)?;
                self.version = Some((msize, string_of(r)?));
                self.fids.clear();
            }
            msg::TATTACH => {
                let fid = wire::u32_le(r)?;
                self.insert(fid, Vec::new());
            }
            msg::TWALK => self.walk(r, reply)?,
            msg::TLOPEN => {
                let fid = wire::u32_le(r)?;
                let flags = wire::u32_le(r)?;
                self.fids.get_mut(&fid)?.open_flags = Some(flags);
            }
            msg::TLCREATE => {
                let fid = wire::u32_le(r)?;
                let name = string_of(r)?;
                let flags = wire::u32_le(r)?;
                let f = self.fids.get_mut(&fid)?;
                f.path = joined(&f.path, &[name]);
                f.open_flags = Some(flags);
            }
            msg::TCLUNK | msg::TREMOVE => {
                self.fids.remove(&wire::u32_le(r)?);
            }
            msg::TRENAME => {
                let fid = wire::u32_le(r)?;
                let dir = self.fids.get(&wire::u32_le(r)?)?.path.clone();
                let to = joined(&dir, &[string_of(r)?]);
                let from = self.fids.get(&fid)?.path.clone();
                self.moved(&from, &to);
            }
            msg::TRENAMEAT => {
                let old_dir = self.fids.get(&wire::u32_le(r)?)?.path.clone();
                let from = joined(&old_dir, &[string_of(r)?]);
                let new_dir = self.fids.get(&wire::u32_le(r)?)?.path.clone();
                let to = joined(&new_dir, &[string_of(r)?]);
                self.moved(&from, &to);
            }
            _ => {}
        }
        Some(())
    }

    /// Twalk makes `newfid` only when every name was walked (Rwalk has one qid per name).
    fn walk(&mut self, r: &mut Cursor<&[u8]>, reply: &[u8]) -> Option<()> {
        let fid = wire::u32_le(r)?;
        let newfid = wire::u32_le(r)?;
        let count = wire::u16_le(r)?;
        let names = (0..count)
            .map(|_| string_of(r))
            .collect::<Option<Vec<_>>>()?;
        let walked = reply.get(HEADER_LEN..HEADER_LEN + 2)?;
        if u16::from_le_bytes([walked[0], walked[1]]) != count {
            return Some(());
        }
        let path = joined(&self.fids.get(&fid)?.path, &names);
        self.insert(newfid, path);
        Some(())
    }

    fn insert(&mut self, fid: u32, path: Vec<String>) {
        let open_flags = None;
        self.fids.insert(fid, SavedFid { path, open_flags });
    }

    /// A rename: every fid at `from` or below it now lies at `to`.
    fn moved(&mut self, from: &[String], to: &[String]) {
        for f in self.fids.values_mut() {
            if f.path.starts_with(from) {
                f.path = joined(to, &f.path[from.len()..]);
            }
        }
    }

    /// The requests that rebuild this table in a fresh server, each with the fid it is for.
    pub(super) fn replay(&self) -> Vec<(Vec<u8>, Option<u32>)> {
        let Some((msize, version)) = &self.version else {
            return Vec::new();
        };
        let mut out = vec![(
            message(msg::TVERSION, |m| {
                put_u32(m, *msize);
                put_str(m, version);
            }),
            None,
        )];
        for (&fid, f) in &self.fids {
            out.push((attach(fid), Some(fid)));
            if !f.path.is_empty() {
                out.push((walk(fid, &f.path), Some(fid)));
            }
            if let Some(flags) = f.open_flags {
                out.push((lopen(fid, flags & REOPEN_MASK), Some(fid)));
            }
        }
        out
    }
}

/// `base` followed by `names`, with `..` taking one component off (the server's root is
/// the share's view, so `..` never leaves it) and `.` ignored.
fn joined(base: &[String], names: &[String]) -> Vec<String> {
    let mut path = base.to_vec();
    for n in names {
        match n.as_str() {
            ".." => {
                path.pop();
            }
            "." | "" => {}
            _ => path.push(n.clone()),
        }
    }
    path
}

fn string_of(r: &mut impl Read) -> Option<String> {
    String::from_utf8(wire::string(r)?).ok()
}

fn put_u32(m: &mut Vec<u8>, v: u32) {
    m.extend_from_slice(&v.to_le_bytes());
}

fn put_str(m: &mut Vec<u8>, s: &str) {
    m.extend_from_slice(&(s.len() as u16).to_le_bytes());
    m.extend_from_slice(s.as_bytes());
}

/// A whole request of type `ty` (tag 0) with the body `body` writes.
fn message(ty: u8, body: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    let mut m = vec![0u8; 4];
    m.push(ty);
    m.extend_from_slice(&0u16.to_le_bytes());
    body(&mut m);
    let len = m.len() as u32;
    m[..4].copy_from_slice(&len.to_le_bytes());
    m
}

fn attach(fid: u32) -> Vec<u8> {
    message(msg::TATTACH, |m| {
        put_u32(m, fid);
        put_u32(m, NOFID);
        put_str(m, "");
        put_str(m, "");
        put_u32(m, NOFID);
    })
}

fn walk(fid: u32, path: &[String]) -> Vec<u8> {
    message(msg::TWALK, |m| {
        put_u32(m, fid);
        put_u32(m, fid);
        m.extend_from_slice(&(path.len() as u16).to_le_bytes());
        path.iter().for_each(|n| put_str(m, n));
    })
}

fn lopen(fid: u32, flags: u32) -> Vec<u8> {
    message(msg::TLOPEN, |m| {
        put_u32(m, fid);
        put_u32(m, flags);
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok_reply(ty: u8) -> Vec<u8> {
        message(ty + 1, |_| {})
    }

    fn rwalk(n: u16) -> Vec<u8> {
        message(msg::TWALK + 1, |m| {
            m.extend_from_slice(&n.to_le_bytes());
            m.extend(std::iter::repeat_n(0u8, 13 * usize::from(n)));
        })
    }

    fn names(p: &[&str]) -> Vec<String> {
        p.iter().map(|s| s.to_string()).collect()
    }

    fn table() -> FidTable {
        let mut t = FidTable::default();
        let version = message(msg::TVERSION, |m| {
            put_u32(m, 65560);
            put_str(m, "9P2000.L");
        });
        t.observe(&version, &ok_reply(msg::TVERSION));
        t.observe(&attach(1), &ok_reply(msg::TATTACH));
        t
    }

    #[test]
    fn fs9p_fids_follow_walks_opens_and_clunks() {
        let mut t = table();
        let w = message(msg::TWALK, |m| {
            put_u32(m, 1);
            put_u32(m, 2);
            m.extend_from_slice(&2u16.to_le_bytes());
            put_str(m, "tmp");
            put_str(m, "c");
        });
        t.observe(&w, &rwalk(2));
        t.observe(&lopen(2, 0o1001), &ok_reply(msg::TLOPEN));
        assert_eq!(t.fids[&2].path, names(&["tmp", "c"]));
        assert_eq!(t.fids[&2].open_flags, Some(0o1001));
        // A partial walk makes no fid; an error reply changes nothing.
        t.observe(&walk(2, &names(&["x", "y"])).clone(), &rwalk(1));
        t.observe(&lopen(1, 0), &message(msg::RLERROR, |m| put_u32(m, 2)));
        assert_eq!(t.fids[&1].open_flags, None);
        let clunk = message(msg::TCLUNK, |m| put_u32(m, 2));
        t.observe(&clunk, &ok_reply(msg::TCLUNK));
        assert!(!t.fids.contains_key(&2));
    }

    #[test]
    fn fs9p_fids_follow_renames_and_dotdot() {
        let mut t = table();
        t.observe(&walk(1, &names(&["a"])), &rwalk(1));
        let w = message(msg::TWALK, |m| {
            put_u32(m, 1);
            put_u32(m, 3);
            m.extend_from_slice(&3u16.to_le_bytes());
            ["x", "..", "f"].iter().for_each(|n| put_str(m, n));
        });
        t.observe(&w, &rwalk(3));
        assert_eq!(t.fids[&3].path, names(&["a", "f"]));
        let rename = message(msg::TRENAMEAT, |m| {
            put_u32(m, 1);
            put_str(m, "f");
            put_u32(m, 1);
            put_str(m, "g");
        });
        t.observe(&rename, &ok_reply(msg::TRENAMEAT));
        assert_eq!(t.fids[&3].path, names(&["a", "g"]));
    }

    #[test]
    fn fs9p_fid_replay_reopens_without_truncating() {
        let mut t = table();
        t.observe(&lopen(1, 0o1002), &ok_reply(msg::TLOPEN));
        let replay = t.replay();
        assert_eq!(replay.len(), 3);
        assert_eq!(replay[0].0[4], msg::TVERSION);
        assert_eq!(replay[1].0, attach(1));
        assert_eq!(replay[2].0, lopen(1, 0o2));
        assert!(FidTable::default().replay().is_empty());
    }
}
