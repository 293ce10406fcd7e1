//! The thread that serves one activated virtio-9p device: it confines itself to the shared
//! directory, then answers each descriptor chain with the p9 server.

use std::fs::File;
use std::io::{self, Read, Write};
use std::path::Path;
use std::sync::{Arc, Mutex};

use nix::sys::stat::{umask, Mode};
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vmm_sys_util::eventfd::EventFd;

use super::fids::{self, FidTable};
use super::share_view;
use super::wire;
use crate::config::ShareConfig;
use crate::devices::virtio::{serve_queue, GuestMemoryMmap, Interrupt, WorkerCtl};

type Writer<'a> = virtio_queue::Writer<'a, ()>;

/// Builds a p9 server whose whole view of the host is `share` (see `share_view`).
///
/// p9 0.3 does not keep walks inside its root: it resolves each Twalk name with
/// `openat(parent, name, O_NOFOLLOW)`, so a name of `..` leaves the root and a name with a `/`
/// follows symlinks in its leading components. The thread therefore moves into a mount
/// namespace of its own whose root is the share's view: the kernel then keeps `..` at the
/// root, resolves absolute symlinks inside it, and never lets a lookup climb out (a directory
/// moved out of the share by the host is the one exception). This needs CAP_SYS_ADMIN and
/// CAP_SYS_CHROOT, which the VMM has as root.
pub(super) fn confined_server(share: &ShareConfig, pinned: &File) -> io::Result<p9::Server> {
    // p9 opens /proc now and later reopens fids through /proc/self/fd: it must see the host's
    // /proc, so the server is created before the view hides it. A reopened fid is still the
    // view's file, on the view's mount, with its flags.
    let server = p9::Server::new(Path::new("/"), Default::default(), Default::default())?;
    share_view::enter(share, pinned)?;
    // The guest kernel applies the guest's umask before it sends a mode; applying the VMM's
    // as well would silently strip permission bits from what the guest creates.
    umask(Mode::empty());
    Ok(server)
}

/// Everything the worker thread owns.
pub(super) struct Fs9pWorker {
    pub(super) mem: Arc<GuestMemoryMmap>,
    pub(super) queue: Queue,
    pub(super) server: p9::Server,
    pub(super) read_only: bool,
    pub(super) interrupt: Arc<Interrupt>,
    /// The fids the guest holds, for snapshots.
    pub(super) fids: Arc<Mutex<FidTable>>,
}

impl Fs9pWorker {
    pub(super) fn run(mut self, ctl: &WorkerCtl, notify: &EventFd) {
        if let Err(e) = self.event_loop(ctl, notify) {
            log::error!("virtio-9p: worker failed: {e}");
        }
    }

    fn event_loop(&mut self, ctl: &WorkerCtl, notify: &EventFd) -> io::Result<()> {
        serve_queue(ctl, notify, || self.process_queue())
    }

    fn process_queue(&mut self) {
        let mem = self.mem.clone();
        let mut completed = false;
        while let Some(chain) = self.queue.pop_descriptor_chain(mem.as_ref()) {
            let head = chain.head_index();
            let len = self.handle(chain, mem.as_ref());
            if let Err(e) = self.queue.add_used(mem.as_ref(), head, len) {
                log::error!("virtio-9p: cannot complete request: {e}");
            }
            completed = true;
        }
        if completed && self.queue.needs_notification(mem.as_ref()).unwrap_or(true) {
            self.interrupt.signal_used_queue();
        }
    }

    /// Answers one request; returns the number of bytes written into the chain (used length).
    fn handle(&mut self, chain: DescriptorChain<&GuestMemoryMmap>, mem: &GuestMemoryMmap) -> u32 {
        let (Ok(mut reader), Ok(writer)) = (chain.clone().reader(mem), chain.writer(mem)) else {
            log::warn!("virtio-9p: descriptor chain outside guest memory");
            return 0;
        };
        let Some(header) = wire::peek_header(&reader) else {
            log::warn!("virtio-9p: request shorter than a 9P header");
            return 0;
        };
        if self.read_only && wire::modifies_host(header.ty, &reader) {
            return reply_error(writer, header.tag, libc::EROFS);
        }
        if let Some(errno) = refusal(&mut self.server, header.ty, &reader) {
            return reply_error(writer, header.tag, errno);
        }
        if fids::tracks(header.ty) {
            return self.handle_tracked(reader, writer, header.tag);
        }
        // The server writes through a copy so that, if the reply does not fit, the original
        // still points at the start of the buffer and can carry an Rlerror instead.
        let mut out = writer.clone();
        match self.server.handle_message(&mut reader, &mut out) {
            Ok(()) => out.bytes_written() as u32,
            Err(e) => {
                log::debug!("virtio-9p: request type {} failed: {e}", header.ty);
                reply_error(writer, header.tag, errno_of(&e))
            }
        }
    }
}

impl Fs9pWorker {
    /// Answers a request that makes, moves, opens or drops a fid: the reply goes through a
    /// buffer so that the fid table can follow what the server did. These replies are small.
    fn handle_tracked(
        &mut self,
        mut reader: virtio_queue::Reader<'_, ()>,
        writer: Writer<'_>,
        tag: u16,
    ) -> u32 {
        // The server reads no more than msize either; a longer chain is not read into memory.
        let mut request = Vec::new();
        let msize = u64::from(super::MAX_MSIZE);
        if reader
            .clone()
            .take(msize)
            .read_to_end(&mut request)
            .is_err()
        {
            return reply_error(writer, tag, libc::EINVAL);
        }
        if let Err(errno) = lock(&self.fids).admit(&request) {
            return reply_error(writer, tag, errno);
        }
        let mut reply = Vec::new();
        if let Err(e) = self.server.handle_message(&mut reader, &mut reply) {
            return reply_error(writer, tag, errno_of(&e));
        }
        let mut out = writer.clone();
        if out.write_all(&reply).is_err() {
            return reply_error(writer, tag, libc::EMSGSIZE);
        }
        lock(&self.fids).observe(&request, &reply);
        reply.len() as u32
    }
}

/// Why `request` (of type `ty`) must not reach the server, if it must not: it makes a device
/// node (which the view's `nodev` would refuse to open anyway), it names a path where one
/// name belongs (see `wire::names_a_path`), or it opens (Tlopen, or Tsetattr of the size)
/// anything but a regular file or a directory.
///
/// The last covers FIFOs, which `nodev` does not: opening one would block the worker until
/// someone opens the other end. The check asks the server for the mode of the fid's own
/// inode, the one the open would reopen (a fid is an O_PATH descriptor, fixed once walked),
/// so a file renamed or replaced in between cannot slip through. A Linux guest opens its
/// FIFOs, sockets and devices itself and never sends Tlopen for them.
pub(super) fn refusal<R: Read + Clone>(
    server: &mut p9::Server,
    ty: u8,
    request: &R,
) -> Option<i32> {
    match ty {
        wire::msg::TMKNOD if wire::mknod_makes_device(request) => Some(libc::EPERM),
        _ if wire::names_a_path(ty, request) => Some(libc::EINVAL),
        _ => special_file(server, wire::opened_fid(ty, request)?),
    }
}

/// EPERM if `fid` is neither a regular file nor a directory; None if it is, or if the
/// server does not know the fid (the Tlopen then fails on its own).
fn special_file(server: &mut p9::Server, fid: u32) -> Option<i32> {
    let mut reply = Vec::new();
    let request = wire::tgetattr_mode(fid);
    server
        .handle_message(&mut io::Cursor::new(&request), &mut reply)
        .ok()?;
    let kind = wire::rgetattr_mode(&reply)? & libc::S_IFMT;
    (kind != libc::S_IFREG && kind != libc::S_IFDIR).then_some(libc::EPERM)
}

/// Rebuilds `table` in a fresh `server` (a restored VM's); fids that cannot be opened again
/// (their file is gone from the new directory) are dropped, and the guest gets EBADF on them.
pub(super) fn replay(server: &mut p9::Server, table: &mut FidTable) {
    let mut lost = Vec::new();
    for (request, fid) in table.replay() {
        // The restored directory may hold something else at a saved path.
        let refused = refusal(server, request[4], &io::Cursor::new(&request)).is_some();
        let mut reply = Vec::new();
        let ok = !refused
            && server
                .handle_message(&mut io::Cursor::new(&request), &mut reply)
                .is_ok()
            && reply.get(4).is_some_and(|&t| t != wire::msg::RLERROR);
        if !ok {
            lost.extend(fid);
        }
    }
    for fid in lost {
        if let Some(f) = table.fids.remove(&fid) {
            let path = f.path.join("/");
            log::warn!("virtio-9p: cannot reopen fid {fid} (/{path}) after a restore");
        }
    }
}

pub(super) fn lock(t: &Mutex<FidTable>) -> std::sync::MutexGuard<'_, FidTable> {
    t.lock().unwrap_or_else(|p| p.into_inner())
}

/// The errno to report when the server could not answer at all: the reply did not fit the
/// guest's buffer, or the request was malformed beyond the header.
fn errno_of(e: &io::Error) -> i32 {
    e.raw_os_error().unwrap_or(match e.kind() {
        io::ErrorKind::WriteZero => libc::EMSGSIZE,
        io::ErrorKind::InvalidData | io::ErrorKind::UnexpectedEof => libc::EINVAL,
        _ => libc::EIO,
    })
}

/// Writes an Rlerror at the start of the reply buffer; returns its used length (0 if even that
/// does not fit, which leaves the guest driver to notice the short reply).
fn reply_error(mut writer: Writer<'_>, tag: u16, errno: i32) -> u32 {
    match writer.write_all(&wire::rlerror(tag, errno)) {
        Ok(()) => wire::RLERROR_LEN as u32,
        Err(e) => {
            log::warn!("virtio-9p: no room for an error reply: {e}");
            0
        }
    }
}
