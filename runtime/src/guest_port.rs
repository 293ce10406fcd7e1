//! The host side of a guest vsock port, reached through the VMM's Unix socket.
//!
//! Convention (Firecracker's): connect to the VM's socket, write `CONNECT <port>\n`, read back
//! `OK <host port>\n`; from then on the stream is the guest port's byte stream.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// Opens one connection to `port` in the guest. Fails if the VMM is not listening or the guest
/// refuses the port (nothing listens there yet).
pub fn connect(uds: &Path, port: u32) -> Result<UnixStream> {
    connect_with(uds, port, None)
}

/// `connect` whose handshake and every later read and write on the stream give up after
/// `timeout`: for request/reply exchanges with a guest that may have wedged.
pub fn connect_timeout(uds: &Path, port: u32, timeout: Duration) -> Result<UnixStream> {
    connect_with(uds, port, Some(timeout))
}

/// The handshake of Firecracker's convention; `timeout` (`None`: wait forever) stays set on
/// the stream.
fn connect_with(uds: &Path, port: u32, timeout: Option<Duration>) -> Result<UnixStream> {
    let mut stream = UnixStream::connect(uds)
        .with_context(|| format!("connecting to VM socket {}", uds.display()))?;
    stream.set_read_timeout(timeout)?;
    stream.set_write_timeout(timeout)?;
    stream.write_all(format!("CONNECT {port}\n").as_bytes())?;
    let line = read_line(&stream)
        .with_context(|| format!("waiting for guest port {port} to take the connection"))?;
    if !line.starts_with("OK ") {
        bail!("guest port {port} refused the connection: {line:?}");
    }
    Ok(stream)
}

/// Longest handshake reply read: `OK <u32>` and a newline fit with room to spare.
const MAX_HANDSHAKE_LINE: u64 = 64;
/// Most a [`read_to_end`] holds of what the guest sends: the guest may be hostile and never
/// stop; replies read this way are short (a status line, a small file).
pub const MAX_READ_TO_END: u64 = 16 << 20;

/// Reads the handshake reply one byte at a time so no stream data is consumed past the newline.
fn read_line(stream: &UnixStream) -> Result<String> {
    let mut reader = BufReader::with_capacity(1, stream.take(MAX_HANDSHAKE_LINE));
    let mut line = String::new();
    reader.read_line(&mut line)?;
    if line.is_empty() {
        bail!("VM socket closed during the vsock handshake");
    }
    Ok(line.trim_end().to_string())
}

/// Keeps trying `connect` until it succeeds, `alive` says the VM is gone, or `timeout` passes.
pub fn connect_retry(
    uds: &Path,
    port: u32,
    timeout: Duration,
    alive: &dyn Fn() -> bool,
) -> Result<UnixStream> {
    let start = Instant::now();
    loop {
        // A guest that wedges after the VMM took the connection must not hold the handshake
        // past the deadline; the stream itself waits without limit once the port answered.
        let left = timeout
            .saturating_sub(start.elapsed())
            .max(Duration::from_millis(1));
        match connect_with(uds, port, Some(left)).and_then(without_timeouts) {
            Ok(stream) => return Ok(stream),
            Err(e) if start.elapsed() >= timeout => {
                return Err(e.context(format!("guest port {port} not reachable after {timeout:?}")))
            }
            Err(e) if !alive() => return Err(e.context("the VM stopped")),
            Err(_) => std::thread::sleep(Duration::from_millis(2)),
        }
    }
}

/// Clears the read and write timeouts `connect_with` (or `connect_timeout`) set.
pub fn without_timeouts(stream: UnixStream) -> Result<UnixStream> {
    stream.set_read_timeout(None)?;
    stream.set_write_timeout(None)?;
    Ok(stream)
}

/// Reads everything the other side sends until it closes, up to [`MAX_READ_TO_END`] bytes.
pub fn read_to_end(stream: UnixStream) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    stream.take(MAX_READ_TO_END + 1).read_to_end(&mut out)?;
    if out.len() as u64 > MAX_READ_TO_END {
        bail!("the guest sent more than {MAX_READ_TO_END} bytes");
    }
    Ok(out)
}

/// The host end of the agent's "I listen" notice: a unix listener at `<uds>_<port>`, which the
/// VMM connects to when the guest connects to that host port. Waiting on it costs the booting
/// guest nothing, unlike polling its port. The socket file is removed on drop.
pub struct ReadySignal {
    listener: std::os::unix::net::UnixListener,
    path: std::path::PathBuf,
}

impl ReadySignal {
    /// Listens for the notice on `port` of the VM whose socket is `uds`.
    pub fn bind(uds: &Path, port: u32) -> Result<Self> {
        let mut path = uds.as_os_str().to_os_string();
        path.push(format!("_{port}"));
        let path = std::path::PathBuf::from(path);
        let _ = std::fs::remove_file(&path);
        let listener = std::os::unix::net::UnixListener::bind(&path)
            .with_context(|| format!("listening on {}", path.display()))?;
        listener.set_nonblocking(true)?;
        Ok(Self { listener, path })
    }

    /// Waits until the guest connects, `alive` says the VM is gone, or `timeout` passes.
    pub fn wait(&self, timeout: Duration, alive: &dyn Fn() -> bool) -> Result<()> {
        use std::os::fd::AsFd;
        let start = Instant::now();
        loop {
            match self.listener.accept() {
                Ok(_) => return Ok(()),
                Err(e) if e.kind() != std::io::ErrorKind::WouldBlock => return Err(e.into()),
                Err(_) => {}
            }
            if !alive() {
                bail!("the VM stopped before its agent was ready");
            }
            if start.elapsed() >= timeout {
                bail!("the guest agent did not report ready within {timeout:?}");
            }
            // Wake on the connection itself; the timeout only bounds the liveness checks.
            let mut fds = [nix::poll::PollFd::new(
                self.listener.as_fd(),
                nix::poll::PollFlags::POLLIN,
            )];
            let _ = nix::poll::poll(&mut fds, 50u16);
        }
    }
}

impl Drop for ReadySignal {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A guest port that sends without end: the host keeps at most `MAX_READ_TO_END` of it
    /// and reports the overflow.
    #[test]
    fn read_to_end_stops_a_guest_that_never_stops() {
        let (host, mut guest) = UnixStream::pair().unwrap();
        let flood = std::thread::spawn(move || {
            let chunk = vec![0x5a; 1 << 16];
            while guest.write_all(&chunk).is_ok() {}
        });
        let err = read_to_end(host).unwrap_err();
        assert!(err.to_string().contains("more than"), "{err}");
        flood.join().unwrap();
        let (host, mut guest) = UnixStream::pair().unwrap();
        guest.write_all(b"short").unwrap();
        drop(guest);
        assert_eq!(read_to_end(host).unwrap(), b"short");
    }
}
