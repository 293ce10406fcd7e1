//! One vsock stream connection between a guest port and a host Unix socket, with its state and
//! the credit accounting of both directions (virtio 1.2, 5.10.6.3).
//!
//! Guest to host: the guest may send at most `BUF_ALLOC - (sent - our fwd_cnt)` bytes, so the
//! bytes the Unix socket has not yet taken sit in `tx_buf`, bounded by `BUF_ALLOC`. Host to
//! guest: we read from the Unix socket only as much as the guest's advertised credit allows;
//! with no credit we stop reading, and the host writer blocks once its socket buffer fills.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::num::Wrapping;
use std::os::unix::net::UnixStream;

use vmm_sys_util::epoll::EventSet;

/// The receive buffer we advertise to the guest for each connection.
pub(super) const BUF_ALLOC: u32 = 256 << 10;
/// Tell the guest about freed buffer space once this much has been forwarded unannounced.
/// Anything at or below `BUF_ALLOC` guarantees a guest that ran out of credit hears back.
const CREDIT_UPDATE_THRESHOLD: u32 = BUF_ALLOC / 4;

/// Shutdown flags (virtio 1.2, 5.10.6.6).
pub(super) const SHUTDOWN_RCV: u32 = 1;
pub(super) const SHUTDOWN_SEND: u32 = 2;
pub(super) const SHUTDOWN_BOTH: u32 = SHUTDOWN_RCV | SHUTDOWN_SEND;

/// Where a connection is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum State {
    /// A host process asked to connect; we sent REQUEST and await the guest's RESPONSE.
    LocalInit,
    /// Both sides accepted; data flows.
    Established,
}

/// The guest sent more than its credit allowed.
#[derive(Debug)]
pub(super) struct CreditOverrun;

/// A live connection. The key in the muxer is `(local_port, peer_port)`.
pub(super) struct Connection {
    pub(super) stream: UnixStream,
    pub(super) state: State,
    pub(super) local_port: u32,
    /// Bytes from the guest not yet taken by the Unix socket.
    tx_buf: VecDeque<u8>,
    /// Bytes from the guest handed to the Unix socket (our fwd_cnt).
    fwd_cnt: Wrapping<u32>,
    /// `fwd_cnt` as last told to the guest.
    fwd_cnt_sent: Wrapping<u32>,
    peer_buf_alloc: u32,
    peer_fwd_cnt: Wrapping<u32>,
    /// Bytes sent to the guest.
    rx_cnt: Wrapping<u32>,
    /// SHUTDOWN flags the guest sent.
    pub(super) peer_shutdown: u32,
    /// The Unix socket reached end of file; the guest was told with SHUTDOWN(SEND).
    pub(super) host_eof: bool,
    /// We shut down the write side of the Unix socket after the guest's SHUTDOWN(SEND).
    write_shut: bool,
    /// Waiting in the muxer's queue of connections with data to read.
    pub(super) rx_pending: bool,
    /// A CREDIT_UPDATE for this connection is queued.
    pub(super) credit_update_queued: bool,
    /// The epoll interest currently registered (None: not in the epoll set).
    pub(super) registered: Option<EventSet>,
}

impl Connection {
    pub(super) fn new(stream: UnixStream, state: State, local_port: u32) -> Self {
        Self {
            stream,
            state,
            local_port,
            tx_buf: VecDeque::new(),
            fwd_cnt: Wrapping(0),
            fwd_cnt_sent: Wrapping(0),
            peer_buf_alloc: 0,
            peer_fwd_cnt: Wrapping(0),
            rx_cnt: Wrapping(0),
            peer_shutdown: 0,
            host_eof: false,
            write_shut: false,
            rx_pending: false,
            credit_update_queued: false,
            registered: None,
        }
    }

    /// Records the credit the guest advertised in any packet header.
    pub(super) fn update_peer_credit(&mut self, buf_alloc: u32, fwd_cnt: u32) {
        self.peer_buf_alloc = buf_alloc;
        self.peer_fwd_cnt = Wrapping(fwd_cnt);
    }

    /// How many bytes the guest can take now.
    pub(super) fn peer_credit(&self) -> u32 {
        let in_flight = (self.rx_cnt - self.peer_fwd_cnt).0;
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// Our fwd_cnt for a packet header; remembers that the guest now knows it.
    pub(super) fn take_fwd_cnt(&mut self) -> u32 {
        self.fwd_cnt_sent = self.fwd_cnt;
        self.credit_update_queued = false;
        self.fwd_cnt.0
    }

    /// Whether enough buffer space was freed that the guest should hear about it.
    pub(super) fn needs_credit_update(&self) -> bool {
        !self.credit_update_queued
            && (self.fwd_cnt - self.fwd_cnt_sent).0 >= CREDIT_UPDATE_THRESHOLD
    }

    /// Data may flow to the guest: it is connected, has not closed its receive side, and the
    /// host side has not ended.
    pub(super) fn can_send_to_guest(&self) -> bool {
        self.state == State::Established && !self.host_eof && self.peer_shutdown & SHUTDOWN_RCV == 0
    }

    /// The epoll interest this connection wants: readable when we can forward to the guest and
    /// are not already queued to read; writable while guest data waits for the socket.
    pub(super) fn wanted_events(&self) -> EventSet {
        let mut ev = EventSet::empty();
        if self.can_send_to_guest() && !self.rx_pending && self.peer_credit() > 0 {
            ev |= EventSet::IN;
        }
        if !self.tx_buf.is_empty() {
            ev |= EventSet::OUT;
        }
        ev
    }

    /// Queues guest data for the Unix socket and writes what it takes.
    pub(super) fn push_from_guest(&mut self, data: &[u8]) -> Result<io::Result<()>, CreditOverrun> {
        if self.tx_buf.len() + data.len() > BUF_ALLOC as usize {
            return Err(CreditOverrun);
        }
        self.tx_buf.extend(data);
        Ok(self.flush())
    }

    /// Writes queued guest data to the Unix socket until it would block.
    pub(super) fn flush(&mut self) -> io::Result<()> {
        while !self.tx_buf.is_empty() {
            let (front, _) = self.tx_buf.as_slices();
            match self.stream.write(front) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.tx_buf.drain(..n);
                    self.fwd_cnt += n as u32;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        self.finish_guest_send()
    }

    /// Once the guest stopped sending and all its data is out, pass the EOF on to the host.
    fn finish_guest_send(&mut self) -> io::Result<()> {
        if self.peer_shutdown & SHUTDOWN_SEND != 0 && self.tx_buf.is_empty() && !self.write_shut {
            self.write_shut = true;
            self.stream.shutdown(std::net::Shutdown::Write)?;
        }
        Ok(())
    }

    /// Both directions are finished and drained: time to reset and forget the connection.
    pub(super) fn is_done(&self) -> bool {
        let guest_done = self.peer_shutdown & SHUTDOWN_SEND != 0 && self.tx_buf.is_empty();
        let host_done = self.host_eof || self.peer_shutdown & SHUTDOWN_RCV != 0;
        guest_done && host_done
    }

    /// Reads host data for the guest into `buf` (the caller sizes it within the credit).
    pub(super) fn read_for_guest(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            match self.stream.read(buf) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                other => return other,
            }
        }
    }

    /// Counts `n` bytes sent to the guest against its credit.
    pub(super) fn sent_to_guest(&mut self, n: u32) {
        self.rx_cnt += n;
    }
}
