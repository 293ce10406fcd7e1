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
    let mut stream = UnixStream::connect(uds)
        .with_context(|| format!("connecting to VM socket {}", uds.display()))?;
    stream.write_all(format!("CONNECT {port}\n").as_bytes())?;
    let line = read_line(&stream)?;
    if !line.starts_with("OK ") {
        bail!("guest port {port} refused the connection: {line:?}");
    }
    Ok(stream)
}

/// Reads the handshake reply one byte at a time so no stream data is consumed past the newline.
fn read_line(stream: &UnixStream) -> Result<String> {
    let mut reader = BufReader::with_capacity(1, stream);
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
        match connect(uds, port) {
            Ok(stream) => return Ok(stream),
            Err(e) if start.elapsed() >= timeout => {
                return Err(e.context(format!("guest port {port} not reachable after {timeout:?}")))
            }
            Err(e) if !alive() => return Err(e.context("the VM stopped")),
            Err(_) => std::thread::sleep(Duration::from_millis(2)),
        }
    }
}

/// Reads everything the other side sends until it closes.
pub fn read_to_end(mut stream: UnixStream) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    stream.read_to_end(&mut out)?;
    Ok(out)
}
