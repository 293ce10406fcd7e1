//! `husk-agent vsock-send CID PORT`: a tiny guest-side vsock client (busybox has none). It
//! copies stdin to the connection, half-closes it, then copies the reply to stdout. Tests use it
//! for guest-initiated connections.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};

use nix::sys::socket::{
    connect, shutdown, socket, AddressFamily, Shutdown, SockFlag, SockType, VsockAddr,
};

pub fn run(cid: u32, port: u32) -> io::Result<()> {
    let fd: OwnedFd = socket(
        AddressFamily::Vsock,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    connect(fd.as_raw_fd(), &VsockAddr::new(cid, port))?;
    let raw = fd.as_raw_fd();
    let mut conn = File::from(fd);
    io::copy(&mut io::stdin().lock(), &mut conn)?;
    conn.flush()?;
    shutdown(raw, Shutdown::Write)?;
    let mut reply = Vec::new();
    conn.read_to_end(&mut reply)?;
    io::stdout().write_all(&reply)
}
