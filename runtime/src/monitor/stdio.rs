//! Bridges a container process's stdio between the host and the agent's stream.
//!
//! Without a terminal the monitor's own stdin/stdout/stderr (inherited from the caller, e.g.
//! conmon's pipes) are forwarded. With `process.terminal` a host pty is made, its master goes to
//! the caller over `--console-socket`, and the slave side is forwarded; the guest has its own pty
//! doing the line discipline, so the host side is raw.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{Context, Result};
use husk_agent::proto::{read_frame, write_frame, Frame, Request, Response};
use husk_agent::ExitStatus;
use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};

/// Where the process's stdio goes on the host.
pub enum HostStdio {
    /// The monitor's fds 0, 1, 2.
    Inherited,
    /// A pty whose master was handed to the caller; we keep the slave.
    Terminal(File),
}

/// Makes a host pty and sends its master over the console socket, as runc does.
pub fn terminal(console_socket: &Path) -> Result<HostStdio> {
    let pty = nix::pty::openpty(None, None).context("allocating a pty")?;
    make_raw(&pty.slave)?;
    send_master(console_socket, &pty.master)?;
    Ok(HostStdio::Terminal(File::from(pty.slave)))
}

fn make_raw(fd: &OwnedFd) -> Result<()> {
    use nix::sys::termios::{cfmakeraw, tcgetattr, tcsetattr, SetArg};
    let mut t = tcgetattr(fd.as_fd())?;
    cfmakeraw(&mut t);
    tcsetattr(fd.as_fd(), SetArg::TCSANOW, &t)?;
    Ok(())
}

fn send_master(console_socket: &Path, master: &OwnedFd) -> Result<()> {
    let sock = UnixStream::connect(console_socket)
        .with_context(|| format!("connecting to console socket {}", console_socket.display()))?;
    let fds = [master.as_raw_fd()];
    let name = b"/dev/ptmx";
    let iov = [std::io::IoSlice::new(name)];
    sendmsg::<()>(
        sock.as_raw_fd(),
        &iov,
        &[ControlMessage::ScmRights(&fds)],
        MsgFlags::empty(),
        None,
    )
    .context("sending the pty master over the console socket")?;
    Ok(())
}

/// Points fds 0, 1 and 2 at /dev/null. A detached process (the monitor, a detached exec's
/// monitor) whose stdio is a terminal must not hold the caller's pipes: a caller that reads
/// them to EOF (`out=$(husk create …)`) would wait for the container to exit, where runc
/// returns at once.
pub fn release_caller_stdio() -> Result<()> {
    let null = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
        .context("opening /dev/null")?;
    for fd in 0..=2 {
        // SAFETY: dup2 onto a standard fd; nothing in this process owns fds 0-2 as Rust
        // objects (std's handles only borrow them), so none is closed behind its owner's back.
        if unsafe { libc::dup2(null.as_raw_fd(), fd) } < 0 {
            return Err(std::io::Error::last_os_error()).context("pointing stdio at /dev/null");
        }
    }
    Ok(())
}

/// How the process ended, or the agent's reason it could not run.
pub type Outcome = std::result::Result<ExitStatus, String>;

/// Starts the forwarding threads; the receiver yields the process's status once all of its
/// output has been written out.
pub fn bridge(stream: UnixStream, host: HostStdio) -> Result<mpsc::Receiver<Outcome>> {
    let (tx, rx) = mpsc::channel();
    let to_guest = stream.try_clone()?;
    match host {
        HostStdio::Inherited => {
            let stdin = File::from(std::io::stdin().as_fd().try_clone_to_owned()?);
            spawn("stdin", move || pump_in(stdin, to_guest));
            spawn("stdout", move || {
                let status = pump_out(stream, &mut std::io::stdout(), &mut std::io::stderr());
                let _ = tx.send(status);
            });
        }
        HostStdio::Terminal(slave) => {
            let input = slave.try_clone()?;
            let resize = slave.try_clone()?;
            let resize_stream = to_guest.try_clone()?;
            spawn("tty-in", move || pump_in(input, to_guest));
            spawn("tty-size", move || watch_size(resize, resize_stream));
            spawn("tty-out", move || {
                let mut out = slave;
                let mut err = out.try_clone().expect("dup pty");
                let _ = tx.send(pump_out(stream, &mut out, &mut err));
            });
        }
    }
    Ok(rx)
}

fn spawn(name: &str, f: impl FnOnce() + Send + 'static) {
    let _ = std::thread::Builder::new().name(name.into()).spawn(|| {
        husk_vmm::confine::thread_started(husk_vmm::confine::ThreadKind::Stdio);
        f()
    });
}

/// Host input → Stdin frames; EOF → CloseStdin (stdin EOF must reach the process).
fn pump_in(mut input: File, mut to_guest: UnixStream) {
    let mut buf = vec![0u8; husk_agent::proto::MAX_DATA_CHUNK];
    loop {
        match input.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if write_frame(&mut to_guest, &Frame::Stdin(buf[..n].to_vec())).is_err() {
                    return;
                }
            }
        }
    }
    let _ = write_frame(&mut to_guest, &Frame::Request(Request::CloseStdin));
}

/// Stdout/Stderr frames → host fds, in order, until the Exit response.
fn pump_out(mut from_guest: UnixStream, out: &mut dyn Write, err: &mut dyn Write) -> Outcome {
    loop {
        match read_frame(&mut from_guest) {
            Ok(Frame::Stdout(d)) => {
                let _ = out.write_all(&d).and_then(|_| out.flush());
            }
            Ok(Frame::Stderr(d)) => {
                let _ = err.write_all(&d).and_then(|_| err.flush());
            }
            Ok(Frame::Response(Response::Exit(status))) => return Ok(status),
            Ok(Frame::Response(Response::Error { message })) => return Err(message),
            Ok(_) => {}
            // The guest went away without a status: report a kill, as a lost process would.
            Err(_) => {
                return Ok(ExitStatus {
                    code: None,
                    signal: Some(libc::SIGKILL),
                })
            }
        }
    }
}

/// Polls the host pty's window size and forwards changes. Polling (every 100 ms) rather than
/// SIGWINCH: the monitor is not the pty's foreground process, so it would not get the signal.
fn watch_size(slave: File, mut to_guest: UnixStream) {
    let mut last = (0u16, 0u16);
    loop {
        if let Some(size) = window_size(&slave) {
            if size != last && size != (0, 0) {
                last = size;
                let req = Request::Resize {
                    rows: size.0,
                    cols: size.1,
                };
                if write_frame(&mut to_guest, &Frame::Request(req)).is_err() {
                    return;
                }
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn window_size(f: &File) -> Option<(u16, u16)> {
    let mut ws = libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ writes one winsize into the struct we own; the fd is valid.
    let rc = unsafe { libc::ioctl(f.as_raw_fd(), libc::TIOCGWINSZ, &mut ws) };
    (rc == 0).then_some((ws.ws_row, ws.ws_col))
}

/// The shell-style exit code for a status: the code, or 128 + signal.
pub fn exit_code(status: &ExitStatus) -> i32 {
    match (status.code, status.signal) {
        (Some(c), _) => c,
        (None, Some(s)) => 128 + s,
        (None, None) => 255,
    }
}
