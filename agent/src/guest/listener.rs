//! The agent's listening socket: vsock in the guest, a unix socket for host testing.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::thread;
use std::time::Duration;

use nix::sys::socket::{
    accept4, bind, listen, socket, AddressFamily, Backlog, SockFlag, SockType, VsockAddr,
};

/// A listening socket. Accepted connections are plain `File`s: read/write work on any socket
/// fd, and `try_clone` gives the separate read and write halves.
pub enum Listener {
    Unix(UnixListener),
    Vsock(OwnedFd),
}

impl Listener {
    /// Listens on `port` for any CID.
    pub fn vsock(port: u32) -> io::Result<Self> {
        let fd = socket(
            AddressFamily::Vsock,
            SockType::Stream,
            SockFlag::SOCK_CLOEXEC,
            None,
        )?;
        bind(fd.as_raw_fd(), &VsockAddr::new(libc::VMADDR_CID_ANY, port))?;
        listen(&fd, Backlog::new(64)?)?;
        Ok(Self::Vsock(fd))
    }

    /// Listens on vsock `port`, retrying briefly in case the vsock device is still being set
    /// up when init starts.
    pub fn vsock_retrying(port: u32) -> io::Result<Self> {
        let mut attempt = 0;
        loop {
            match Self::vsock(port) {
                Err(e) if attempt < 50 => {
                    attempt += 1;
                    if attempt == 1 {
                        eprintln!("husk-agent: vsock listen: {e}; retrying");
                    }
                    thread::sleep(Duration::from_millis(100));
                }
                result => return result,
            }
        }
    }

    /// Listens on a unix socket at `path`, replacing a stale one.
    pub fn unix(path: &Path) -> io::Result<Self> {
        match std::fs::remove_file(path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        Ok(Self::Unix(UnixListener::bind(path)?))
    }

    /// Accepts one connection (close-on-exec, so exec children never hold it open).
    pub fn accept(&self) -> io::Result<File> {
        match self {
            Self::Unix(l) => Ok(File::from(OwnedFd::from(l.accept()?.0))),
            Self::Vsock(fd) => {
                let raw = accept4(fd.as_raw_fd(), SockFlag::SOCK_CLOEXEC)?;
                // SAFETY: accept4 just returned this fd and nothing else owns it.
                Ok(File::from(unsafe { OwnedFd::from_raw_fd(raw) }))
            }
        }
    }
}
