//! The vsock worker: one thread, one epoll set over the queue eventfds, the listening socket,
//! half-open host connections (still sending `CONNECT <port>\n`) and live connections.
//!
//! Packets for the guest are produced lazily: control packets wait in `ctrl` and connections
//! with readable host data wait in `data_ready`, and both are turned into packets only when the
//! guest has posted an rx buffer. So a guest that stops reading stalls only its own traffic, and
//! host data is read straight into the guest's buffer within the guest's credit.

use std::collections::{HashMap, VecDeque};
use std::ffi::OsString;
use std::io::{self, Read, Write};
use std::os::unix::io::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use virtio_vsock::packet::{VsockPacket, PKT_HEADER_SIZE};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::connection::{Connection, State, BUF_ALLOC, SHUTDOWN_BOTH, SHUTDOWN_SEND};
use super::{EVT_QUEUE, HOST_CID, RX_QUEUE, TX_QUEUE};
use crate::devices::virtio::{GuestMemoryMmap, Interrupt, WorkerCtl};

/// Packet operations (virtio 1.2, 5.10.6).
const OP_REQUEST: u16 = 1;
const OP_RESPONSE: u16 = 2;
const OP_RST: u16 = 3;
const OP_SHUTDOWN: u16 = 4;
const OP_RW: u16 = 5;
const OP_CREDIT_UPDATE: u16 = 6;
const OP_CREDIT_REQUEST: u16 = 7;
const TYPE_STREAM: u16 = 1;
const EVENT_TRANSPORT_RESET: u32 = 0;

/// Largest payload we accept or produce in one packet (Linux's VIRTIO_VSOCK_MAX_PKT_BUF_SIZE).
const MAX_PKT_DATA: u32 = 64 << 10;
/// Longest `CONNECT <port>` line we wait for.
const MAX_CONNECT_LINE: usize = 32;
/// Host-side ports for host-initiated connections start here, far from guest services.
const FIRST_LOCAL_PORT: u32 = 1 << 30;
/// Most connections (both directions) one VM may have. Each holds a host socket and up to
/// `BUF_ALLOC` (256 KiB) of guest data its host reader has not taken yet, so this bounds that
/// buffering at 64 MiB. A container VM uses a handful (the agent's connection, one per exec
/// or attach, short-lived notices); 256 leaves wide margin for parallel execs.
pub(super) const MAX_CONNECTIONS: usize = 256;
/// Most control packets (RST, RESPONSE, REQUEST, credit) waiting for the guest to post rx
/// buffers. A guest that sends packets but never posts rx buffers would otherwise grow this
/// queue by one entry per packet forever. Live connections need at most a few entries each
/// (REQUEST or RESPONSE, CREDIT_UPDATE, CREDIT_REQUEST, RST), so 8 per allowed connection
/// never bites a guest that reads; 2048 entries are 32 KiB.
pub(super) const MAX_CTRL_QUEUE: usize = 8 * MAX_CONNECTIONS;

const TOKEN_STOP: u64 = 3;
const TOKEN_RESET: u64 = 4;
const TOKEN_LISTENER: u64 = 5;
const TOKEN_HOLD: u64 = 6;
/// Tokens of sockets are this plus the fd.
const TOKEN_FD_BASE: u64 = 1 << 32;

/// `(local_port, peer_port)`: the host-side port and the guest-side port.
type Key = (u32, u32);

/// What the device hands the worker.
pub(super) struct Setup {
    pub(super) mem: Arc<GuestMemoryMmap>,
    pub(super) queues: Vec<Queue>,
    pub(super) notifies: Vec<EventFd>,
    pub(super) interrupt: Arc<Interrupt>,
    pub(super) listener: Arc<UnixListener>,
    pub(super) uds_path: PathBuf,
    pub(super) cid: Arc<AtomicU64>,
    pub(super) reset: EventFd,
}

/// Who owns a socket fd in the epoll set.
#[derive(Clone, Copy)]
enum FdOwner {
    Handshake,
    Conn(Key),
}

/// A host process that connected to the listener and has not finished its CONNECT line.
struct Handshake {
    stream: UnixStream,
    line: Vec<u8>,
}

/// A control packet waiting for an rx buffer.
#[derive(Clone, Copy)]
struct Ctrl {
    key: Key,
    op: u16,
    flags: u32,
}

pub(super) struct Muxer {
    s: Setup,
    epoll: Epoll,
    conns: HashMap<Key, Connection>,
    fds: HashMap<RawFd, FdOwner>,
    handshakes: HashMap<RawFd, Handshake>,
    ctrl: VecDeque<Ctrl>,
    data_ready: VecDeque<Key>,
    next_port: u32,
    reset_event_pending: bool,
    /// A transport reset was delivered and the driver has not re-posted its event buffer
    /// yet. Host connections wait meanwhile (the listener is out of the epoll set): the
    /// driver resets every connected socket when it handles the event, which would kill a
    /// connection made just before.
    reset_unacked: bool,
    used: [bool; 3],
    buf: Vec<u8>,
}

impl Muxer {
    pub(super) fn new(s: Setup) -> io::Result<Self> {
        let epoll = Epoll::new()?;
        let add = |fd: RawFd, token: u64| {
            epoll.ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN, token),
            )
        };
        for (i, evt) in s.notifies.iter().enumerate() {
            add(evt.as_raw_fd(), i as u64)?;
        }
        add(s.reset.as_raw_fd(), TOKEN_RESET)?;
        add(s.listener.as_raw_fd(), TOKEN_LISTENER)?;
        Ok(Self {
            s,
            epoll,
            conns: HashMap::new(),
            fds: HashMap::new(),
            handshakes: HashMap::new(),
            ctrl: VecDeque::new(),
            data_ready: VecDeque::new(),
            next_port: FIRST_LOCAL_PORT,
            reset_event_pending: false,
            reset_unacked: false,
            used: [false; 3],
            buf: vec![0; MAX_PKT_DATA as usize],
        })
    }

    /// The thread body; returns when `ctl.stop` is signalled. Dropping the muxer closes every
    /// host connection (but not the listener, which the device keeps for the next activation).
    pub(super) fn run(mut self, ctl: &WorkerCtl) {
        if let Err(e) = self.event_loop(ctl) {
            log::error!("virtio-vsock: worker failed: {e}");
        }
        // Leave the listener's epoll registration behind with this epoll set, not the listener.
        let _ = self.epoll.ctl(
            ControlOperation::Delete,
            self.s.listener.as_raw_fd(),
            EpollEvent::default(),
        );
    }

    fn event_loop(&mut self, ctl: &WorkerCtl) -> io::Result<()> {
        for (fd, token) in [
            (ctl.stop.as_raw_fd(), TOKEN_STOP),
            (ctl.hold.eventfd().as_raw_fd(), TOKEN_HOLD),
        ] {
            self.epoll.ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN, token),
            )?;
        }
        // The driver may have queued packets before we started listening.
        self.process_tx();
        self.send_reset_event();
        self.process_rx();
        self.signal_guest();
        let mut events = vec![EpollEvent::default(); 64];
        loop {
            let n = match self.epoll.wait(-1, &mut events) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                other => other?,
            };
            for ev in &events[..n] {
                match ev.data() {
                    TOKEN_STOP => return Ok(()),
                    // Between two batches every popped chain is completed: safe to hold here.
                    TOKEN_HOLD => ctl.hold.park(),
                    token => self.dispatch(token, ev.event_set()),
                }
            }
            self.process_rx();
            self.signal_guest();
        }
    }

    fn dispatch(&mut self, token: u64, events: EventSet) {
        match token {
            t if t == RX_QUEUE as u64 => {
                // New rx buffers: process_rx runs after every batch anyway.
                let _ = self.s.notifies[RX_QUEUE].read();
            }
            t if t == TX_QUEUE as u64 => {
                let _ = self.s.notifies[TX_QUEUE].read();
                self.process_tx();
            }
            t if t == EVT_QUEUE as u64 => {
                let _ = self.s.notifies[EVT_QUEUE].read();
                // Linux re-posts an event buffer (and kicks) only once it has handled the
                // event in it, i.e. after resetting its sockets.
                if self.reset_unacked {
                    self.reset_acknowledged();
                }
                self.send_reset_event();
            }
            TOKEN_RESET => {
                let _ = self.s.reset.read();
                self.transport_reset();
            }
            TOKEN_LISTENER => self.accept_all(),
            t if t >= TOKEN_FD_BASE => self.fd_event((t - TOKEN_FD_BASE) as RawFd, events),
            t => log::warn!("virtio-vsock: unexpected epoll token {t}"),
        }
    }

    // ---- guest -> host -------------------------------------------------------------------

    fn process_tx(&mut self) {
        let mem = self.s.mem.clone();
        while let Some(mut chain) = self.s.queues[TX_QUEUE].pop_descriptor_chain(mem.as_ref()) {
            let head = chain.head_index();
            match VsockPacket::from_tx_virtq_chain(mem.as_ref(), &mut chain, MAX_PKT_DATA) {
                Ok(pkt) => self.guest_packet(&pkt),
                Err(e) => log::warn!("virtio-vsock: dropping bad tx packet: {e}"),
            }
            self.add_used(TX_QUEUE, head, 0);
        }
    }

    fn guest_packet(&mut self, pkt: &VsockPacket<'_, ()>) {
        if pkt.src_cid() != self.s.cid.load(Ordering::SeqCst) {
            log::warn!("virtio-vsock: packet from foreign cid {}", pkt.src_cid());
            return;
        }
        let key = (pkt.dst_port(), pkt.src_port());
        if pkt.dst_cid() != HOST_CID || pkt.type_() != TYPE_STREAM {
            // Only stream sockets to the host exist here; a reset ends the guest's attempt.
            if pkt.op() != OP_RST {
                self.push_ctrl(key, OP_RST, 0);
            }
            return;
        }
        match self.conns.get_mut(&key) {
            Some(conn) => {
                conn.update_peer_credit(pkt.buf_alloc(), pkt.fwd_cnt());
                self.conn_packet(key, pkt);
                self.after_change(key);
            }
            None => match pkt.op() {
                OP_REQUEST => self.connect_to_host(key, pkt),
                OP_RST => {}
                _ => self.push_ctrl(key, OP_RST, 0),
            },
        }
    }

    fn conn_packet(&mut self, key: Key, pkt: &VsockPacket<'_, ()>) {
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        match (pkt.op(), conn.state) {
            (OP_RESPONSE, State::LocalInit) => {
                conn.state = State::Established;
                let ok = format!("OK {}\n", conn.local_port);
                // A fresh socket always has room for one short line; failing means it is gone.
                if conn.stream.write_all(ok.as_bytes()).is_err() {
                    self.reset_conn(key);
                }
            }
            (OP_RW, State::Established) => self.guest_data(key, pkt),
            (OP_CREDIT_UPDATE, _) => {}
            (OP_CREDIT_REQUEST, _) => self.queue_credit_update(key),
            (OP_SHUTDOWN, State::Established) => {
                conn.peer_shutdown |= pkt.flags() & SHUTDOWN_BOTH;
                if conn.flush().is_err() {
                    self.reset_conn(key);
                }
            }
            (OP_RST, _) => self.remove_conn(key),
            (op, state) => {
                log::debug!("virtio-vsock: op {op} in state {state:?}, resetting");
                self.reset_conn(key);
            }
        }
    }

    fn guest_data(&mut self, key: Key, pkt: &VsockPacket<'_, ()>) {
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        let data = match pkt.data_slice() {
            Some(slice) => {
                let n = slice.len().min(self.buf.len());
                slice.copy_to(&mut self.buf[..n]);
                &self.buf[..n]
            }
            None => &[][..],
        };
        let ok = conn.peer_shutdown & SHUTDOWN_SEND == 0
            && matches!(conn.push_from_guest(data), Ok(Ok(())));
        if !ok {
            // Data after SHUTDOWN(SEND), beyond our credit, or a broken host socket.
            self.reset_conn(key);
        }
    }

    fn connect_to_host(&mut self, key: Key, pkt: &VsockPacket<'_, ()>) {
        if self.conns.len() >= MAX_CONNECTIONS {
            log::debug!("virtio-vsock: {MAX_CONNECTIONS} connections open, refusing {key:?}");
            self.push_ctrl(key, OP_RST, 0);
            return;
        }
        let mut path = OsString::from(self.s.uds_path.as_os_str());
        path.push(format!("_{}", key.0));
        match connect_nonblocking(Path::new(&path)) {
            Ok(stream) => {
                let mut conn = Connection::new(stream, State::Established, key.0);
                conn.update_peer_credit(pkt.buf_alloc(), pkt.fwd_cnt());
                self.insert_conn(key, conn);
                self.push_ctrl(key, OP_RESPONSE, 0);
                self.update_interest(key);
            }
            Err(e) => {
                log::debug!("virtio-vsock: no host listener at {path:?}: {e}");
                self.push_ctrl(key, OP_RST, 0);
            }
        }
    }

    // ---- host sockets ----------------------------------------------------------------------

    fn accept_all(&mut self) {
        loop {
            match self.s.listener.accept() {
                Ok((stream, _)) => self.add_handshake(stream),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    log::warn!("virtio-vsock: accept failed: {e}");
                    return;
                }
            }
        }
    }

    fn add_handshake(&mut self, stream: UnixStream) {
        let fd = stream.as_raw_fd();
        let ev = EpollEvent::new(EventSet::IN, TOKEN_FD_BASE + fd as u64);
        if stream.set_nonblocking(true).is_err()
            || self.epoll.ctl(ControlOperation::Add, fd, ev).is_err()
        {
            return;
        }
        self.fds.insert(fd, FdOwner::Handshake);
        let line = Vec::with_capacity(MAX_CONNECT_LINE);
        self.handshakes.insert(fd, Handshake { stream, line });
    }

    fn fd_event(&mut self, fd: RawFd, events: EventSet) {
        match self.fds.get(&fd).copied() {
            Some(FdOwner::Handshake) => self.handshake_readable(fd),
            Some(FdOwner::Conn(key)) => self.conn_event(key, events),
            None => {}
        }
    }

    /// Reads the CONNECT line one byte at a time, so bytes after it stay in the socket for the
    /// guest.
    fn handshake_readable(&mut self, fd: RawFd) {
        let Some(hs) = self.handshakes.get_mut(&fd) else {
            return;
        };
        let mut byte = [0u8; 1];
        loop {
            match hs.stream.read(&mut byte) {
                Ok(1) if byte[0] == b'\n' => break,
                Ok(1) if hs.line.len() < MAX_CONNECT_LINE => hs.line.push(byte[0]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // End of file, error, or an overlong line: drop the client.
                _ => {
                    self.take_handshake(fd);
                    return;
                }
            }
        }
        let Some(hs) = self.take_handshake(fd) else {
            return;
        };
        match parse_connect(&hs.line) {
            Some(_) if self.conns.len() >= MAX_CONNECTIONS => {
                // Dropping the stream closes it: the host process sees EOF instead of OK.
                log::warn!("virtio-vsock: {MAX_CONNECTIONS} connections open, refusing a host one");
            }
            Some(port) => {
                let local = self.alloc_port();
                let key = (local, port);
                self.insert_conn(key, Connection::new(hs.stream, State::LocalInit, local));
                self.push_ctrl(key, OP_REQUEST, 0);
            }
            None => log::debug!("virtio-vsock: bad handshake {:?}", hs.line),
        }
    }

    fn take_handshake(&mut self, fd: RawFd) -> Option<Handshake> {
        self.fds.remove(&fd);
        let _ = self
            .epoll
            .ctl(ControlOperation::Delete, fd, EpollEvent::default());
        self.handshakes.remove(&fd)
    }

    fn alloc_port(&mut self) -> u32 {
        loop {
            let port = self.next_port;
            self.next_port = self.next_port.wrapping_add(1).max(FIRST_LOCAL_PORT);
            if !self.conns.keys().any(|k| k.0 == port) {
                return port;
            }
        }
    }

    fn conn_event(&mut self, key: Key, events: EventSet) {
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        let readable = EventSet::IN | EventSet::HANG_UP | EventSet::ERROR;
        if events.intersects(readable) && conn.can_send_to_guest() && !conn.rx_pending {
            conn.rx_pending = true;
            self.data_ready.push_back(key);
        }
        if events.intersects(EventSet::OUT | EventSet::HANG_UP | EventSet::ERROR)
            && conn.flush().is_err()
        {
            self.reset_conn(key);
            return;
        }
        self.after_change(key);
    }

    // ---- host -> guest ---------------------------------------------------------------------

    fn process_rx(&mut self) {
        let mem = self.s.mem.clone();
        while !self.ctrl.is_empty() || !self.data_ready.is_empty() {
            let Some(mut chain) = self.s.queues[RX_QUEUE].pop_descriptor_chain(mem.as_ref()) else {
                // No buffers: wait for the driver to post some (rx queue notify).
                return;
            };
            let head = chain.head_index();
            let mut pkt =
                match VsockPacket::from_rx_virtq_chain(mem.as_ref(), &mut chain, MAX_PKT_DATA) {
                    Ok(pkt) => pkt,
                    Err(e) => {
                        log::warn!("virtio-vsock: unusable rx buffer: {e}");
                        self.add_used(RX_QUEUE, head, 0);
                        continue;
                    }
                };
            match self.fill_rx_packet(&mut pkt) {
                Some(len) => self.add_used(RX_QUEUE, head, len),
                None => {
                    // Nothing to send after all: give the buffer back for later.
                    self.s.queues[RX_QUEUE].go_to_previous_position();
                    return;
                }
            }
        }
    }

    /// Writes the next pending packet into `pkt`; returns its total length.
    fn fill_rx_packet(&mut self, pkt: &mut VsockPacket<'_, ()>) -> Option<u32> {
        while let Some(c) = self.ctrl.pop_front() {
            // Control packets of connections that are gone are stale, except the RST itself.
            if c.op == OP_RST || self.conns.contains_key(&c.key) {
                self.stamp(pkt, c.key, c.op, c.flags, 0);
                return Some(PKT_HEADER_SIZE as u32);
            }
        }
        while let Some(key) = self.data_ready.pop_front() {
            if let Some(len) = self.read_host_data(pkt, key) {
                return Some(len);
            }
        }
        None
    }

    /// Reads from a connection's socket into `pkt`, within the guest's credit.
    fn read_host_data(&mut self, pkt: &mut VsockPacket<'_, ()>, key: Key) -> Option<u32> {
        let room = pkt.data_slice().map_or(0, |s| s.len());
        let conn = self.conns.get_mut(&key)?;
        conn.rx_pending = false;
        let max = room.min(conn.peer_credit() as usize).min(self.buf.len());
        if !conn.can_send_to_guest() || max == 0 {
            self.update_interest(key);
            return None;
        }
        match conn.read_for_guest(&mut self.buf[..max]) {
            Ok(0) => {
                // The host closed (or half-closed) its side: the guest may still send.
                conn.host_eof = true;
                self.stamp(pkt, key, OP_SHUTDOWN, SHUTDOWN_SEND, 0);
                self.after_change(key);
                Some(PKT_HEADER_SIZE as u32)
            }
            Ok(n) => {
                if let Some(slice) = pkt.data_slice() {
                    slice.copy_from(&self.buf[..n]);
                }
                conn.sent_to_guest(n as u32);
                // More may be waiting; go round the other connections first.
                conn.rx_pending = true;
                let out_of_credit = conn.peer_credit() == 0;
                self.data_ready.push_back(key);
                if out_of_credit {
                    self.push_ctrl(key, OP_CREDIT_REQUEST, 0);
                }
                self.stamp(pkt, key, OP_RW, 0, n as u32);
                self.after_change(key);
                Some(PKT_HEADER_SIZE as u32 + n as u32)
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                self.update_interest(key);
                None
            }
            Err(_) => {
                self.stamp(pkt, key, OP_RST, 0, 0);
                self.remove_conn(key);
                Some(PKT_HEADER_SIZE as u32)
            }
        }
    }

    /// Fills in a whole packet header for connection `key`.
    fn stamp(&mut self, pkt: &mut VsockPacket<'_, ()>, key: Key, op: u16, flags: u32, len: u32) {
        let cid = self.s.cid.load(Ordering::SeqCst);
        let (buf_alloc, fwd_cnt) = match self.conns.get_mut(&key) {
            Some(conn) => (BUF_ALLOC, conn.take_fwd_cnt()),
            None => (0, 0),
        };
        // Zero first: the rx buffer holds whatever the guest left there.
        let _ = pkt.set_header_from_raw(&[0u8; PKT_HEADER_SIZE]);
        pkt.set_src_cid(HOST_CID)
            .set_dst_cid(cid)
            .set_src_port(key.0)
            .set_dst_port(key.1)
            .set_type(TYPE_STREAM)
            .set_op(op)
            .set_flags(flags)
            .set_len(len)
            .set_buf_alloc(buf_alloc)
            .set_fwd_cnt(fwd_cnt);
    }

    // ---- connection bookkeeping -------------------------------------------------------------

    /// Queues a control packet for the guest. With the queue full (the guest withholds rx
    /// buffers), an RST is dropped (its connection is already gone; the guest's next packet on
    /// it gets another) and any other packet resets its connection instead of waiting.
    fn push_ctrl(&mut self, key: Key, op: u16, flags: u32) {
        if self.ctrl.len() < MAX_CTRL_QUEUE {
            self.ctrl.push_back(Ctrl { key, op, flags });
            return;
        }
        log::debug!("virtio-vsock: control queue full, dropping op {op} for {key:?}");
        if op != OP_RST {
            self.remove_conn(key);
        }
    }

    fn queue_credit_update(&mut self, key: Key) {
        if let Some(conn) = self.conns.get_mut(&key) {
            if !conn.credit_update_queued {
                conn.credit_update_queued = true;
                self.push_ctrl(key, OP_CREDIT_UPDATE, 0);
            }
        }
    }

    fn insert_conn(&mut self, key: Key, conn: Connection) {
        self.fds.insert(conn.stream.as_raw_fd(), FdOwner::Conn(key));
        self.conns.insert(key, conn);
    }

    /// After anything happened to a connection: close it if both sides are done, tell the guest
    /// about freed buffer space, and fix the epoll interest.
    fn after_change(&mut self, key: Key) {
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        if conn.is_done() {
            self.reset_conn(key);
            return;
        }
        if conn.needs_credit_update() {
            self.queue_credit_update(key);
        }
        self.update_interest(key);
    }

    fn update_interest(&mut self, key: Key) {
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        let want = conn.wanted_events();
        let fd = conn.stream.as_raw_fd();
        let ev = EpollEvent::new(want, TOKEN_FD_BASE + fd as u64);
        // An empty interest set leaves the epoll set entirely: EPOLLHUP is reported even for an
        // empty set and would spin the loop on a closed socket we are not ready to read.
        let op = match (conn.registered, want.is_empty()) {
            (None, false) => ControlOperation::Add,
            (Some(cur), false) if cur != want => ControlOperation::Modify,
            (Some(_), true) => ControlOperation::Delete,
            _ => return,
        };
        match self.epoll.ctl(op, fd, ev) {
            Ok(()) => conn.registered = (!want.is_empty()).then_some(want),
            Err(e) => log::error!("virtio-vsock: epoll_ctl on connection: {e}"),
        }
    }

    /// Sends RST to the guest and forgets the connection.
    fn reset_conn(&mut self, key: Key) {
        self.push_ctrl(key, OP_RST, 0);
        self.remove_conn(key);
    }

    fn remove_conn(&mut self, key: Key) {
        let Some(conn) = self.conns.remove(&key) else {
            return;
        };
        if conn.rx_pending {
            // A later connection with the same key must not find a stale entry.
            self.data_ready.retain(|k| *k != key);
        }
        let fd = conn.stream.as_raw_fd();
        self.fds.remove(&fd);
        if conn.registered.is_some() {
            let _ = self
                .epoll
                .ctl(ControlOperation::Delete, fd, EpollEvent::default());
        }
    }

    // ---- events queue, interrupts -------------------------------------------------------------

    fn transport_reset(&mut self) {
        let keys: Vec<Key> = self.conns.keys().copied().collect();
        for key in keys {
            self.remove_conn(key);
        }
        self.ctrl.clear();
        self.data_ready.clear();
        self.reset_event_pending = true;
        self.send_reset_event();
    }

    fn send_reset_event(&mut self) {
        if !self.reset_event_pending {
            return;
        }
        let mem = self.s.mem.clone();
        let Some(chain) = self.s.queues[EVT_QUEUE].pop_descriptor_chain(mem.as_ref()) else {
            // Retried when the driver posts an event buffer.
            return;
        };
        let head = chain.head_index();
        let event = EVENT_TRANSPORT_RESET.to_le_bytes();
        let written = chain
            .writer(mem.as_ref())
            .is_ok_and(|mut w| w.write_all(&event).is_ok());
        self.add_used(
            EVT_QUEUE,
            head,
            if written { event.len() as u32 } else { 0 },
        );
        self.reset_event_pending = !written;
        if written && !self.reset_unacked {
            self.reset_unacked = true;
            let _ = self.epoll.ctl(
                ControlOperation::Delete,
                self.s.listener.as_raw_fd(),
                EpollEvent::default(),
            );
        }
    }

    /// The driver has handled the reset: host connections may come in again.
    fn reset_acknowledged(&mut self) {
        self.reset_unacked = false;
        let listen = EpollEvent::new(EventSet::IN, TOKEN_LISTENER);
        if let Err(e) = self
            .epoll
            .ctl(ControlOperation::Add, self.s.listener.as_raw_fd(), listen)
        {
            log::error!("virtio-vsock: cannot listen for host connections again: {e}");
        }
        self.accept_all();
    }

    fn add_used(&mut self, queue: usize, head: u16, len: u32) {
        if let Err(e) = self.s.queues[queue].add_used(self.s.mem.as_ref(), head, len) {
            log::error!("virtio-vsock: cannot return buffer on queue {queue}: {e}");
        }
        self.used[queue] = true;
    }

    fn signal_guest(&mut self) {
        let mut notify = false;
        for (queue, used) in self.used.iter_mut().enumerate() {
            if std::mem::take(used) {
                let q = &mut self.s.queues[queue];
                notify |= q.needs_notification(self.s.mem.as_ref()).unwrap_or(true);
            }
        }
        if notify {
            self.s.interrupt.signal_used_queue();
        }
    }
}

/// Connects to a host service without ever blocking the worker: a Unix stream connect either
/// completes at once or, when the listener's backlog is full, fails with EAGAIN instead of
/// waiting (which would freeze every connection of this VM).
fn connect_nonblocking(path: &Path) -> io::Result<UnixStream> {
    use nix::sys::socket::{connect, socket, AddressFamily, SockFlag, SockType, UnixAddr};
    let flags = SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC;
    let fd = socket(AddressFamily::Unix, SockType::Stream, flags, None)?;
    connect(fd.as_raw_fd(), &UnixAddr::new(path)?)?;
    Ok(UnixStream::from(fd))
}

/// Parses `CONNECT <port>` (an optional trailing `\r` is tolerated).
fn parse_connect(line: &[u8]) -> Option<u32> {
    let text = std::str::from_utf8(line).ok()?.trim_end_matches('\r');
    text.strip_prefix("CONNECT ")?.trim().parse().ok()
}
