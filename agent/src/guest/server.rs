//! Accepting connections and serving requests, one thread per connection.

use std::fs::File;
use std::io::{self, BufReader, Write};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::process::ChildStdin;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use nix::poll::{poll, PollFd, PollFlags};
use nix::sys::socket::{
    accept4, bind, listen, socket, AddressFamily, Backlog, SockFlag, SockType, VsockAddr,
};

use husk_agent::proto::{
    encode_data, read_frame, Frame, FrameError, FrameKind, Request, Response, PROTOCOL_VERSION,
};

use super::exec::{self, Running};
use super::reaper::Reaper;

/// What kind of system the agent runs on; decides what `Poweroff` does.
pub enum Mode {
    /// PID 1 in the guest: power off by resetting the VM.
    Init,
    /// Host testing on a unix socket: exit the agent (removing the socket).
    Unix(PathBuf),
}

/// State shared by all connections.
pub struct Ctx {
    pub reaper: Arc<Reaper>,
    pub mode: Mode,
    /// `PATH` given to exec children unless their request sets one.
    pub default_path: String,
}

/// The write half of a connection, shared by the request loop and the exec output threads;
/// the lock keeps each frame contiguous.
#[derive(Clone)]
pub struct Sender(Arc<Mutex<File>>);

impl Sender {
    pub fn send(&self, frame: &Frame) -> io::Result<()> {
        self.write(&frame.encode())
    }

    pub fn send_data(&self, kind: FrameKind, data: &[u8]) -> io::Result<()> {
        self.write(&encode_data(kind, data))
    }

    fn write(&self, bytes: &[u8]) -> io::Result<()> {
        let mut file = self.0.lock().unwrap_or_else(|p| p.into_inner());
        file.write_all(bytes)
    }
}

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

    /// Listens on a unix socket at `path`, replacing a stale one.
    pub fn unix(path: &std::path::Path) -> io::Result<Self> {
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

/// Accepts connections forever, serving each on its own thread.
pub fn serve(listener: Listener, ctx: Arc<Ctx>) -> ! {
    loop {
        match listener.accept() {
            Ok(stream) => {
                let ctx = ctx.clone();
                let spawned = thread::Builder::new()
                    .name("conn".into())
                    .spawn(move || Conn::serve(stream, ctx));
                if let Err(e) = spawned {
                    eprintln!("husk-agent: connection thread: {e}");
                }
            }
            Err(e) => {
                eprintln!("husk-agent: accept: {e}");
                // Do not spin on persistent errors such as EMFILE.
                thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

/// Whether the request loop goes on after a frame.
enum Flow {
    Continue,
    Close,
    /// `Poweroff` was acknowledged: shut down once the reply has had a chance to leave.
    Poweroff,
}

/// Gives a just-written reply time to reach the host: vsock transmits asynchronously, and a
/// reset right away could drop it. Returns when the host hangs up or after 250 ms.
fn await_hangup(conn: &File) {
    let mut fds = [PollFd::new(conn.as_fd(), PollFlags::POLLIN)];
    let _ = poll(&mut fds, 250u16);
}

/// One client connection.
struct Conn {
    ctx: Arc<Ctx>,
    out: Sender,
    running: Running,
    /// The running (or last) exec's stdin; only this thread writes to it.
    stdin: Option<ChildStdin>,
}

impl Conn {
    fn serve(stream: File, ctx: Arc<Ctx>) {
        let writer = match stream.try_clone() {
            Ok(w) => w,
            Err(e) => return eprintln!("husk-agent: connection: {e}"),
        };
        let mut conn = Conn {
            ctx,
            out: Sender(Arc::new(Mutex::new(writer))),
            running: Arc::default(),
            stdin: None,
        };
        let mut reader = BufReader::new(stream);
        loop {
            let flow = match read_frame(&mut reader) {
                Ok(frame) => conn.dispatch(frame),
                Err(FrameError::Eof) => Flow::Close,
                Err(e) => conn.reject(e),
            };
            match flow {
                Flow::Continue => {}
                Flow::Close => break,
                Flow::Poweroff => {
                    if let Mode::Init = conn.ctx.mode {
                        nix::unistd::sync();
                        await_hangup(reader.get_ref());
                    }
                    super::poweroff(&conn.ctx.mode);
                }
            }
        }
        conn.abandon_exec();
    }

    /// Replies `Error` to a bad frame; closes when the stream position is lost.
    fn reject(&mut self, err: FrameError) -> Flow {
        let fatal = err.is_fatal();
        if !matches!(err, FrameError::Io(_)) {
            self.reply_error(err.to_string());
        }
        if fatal {
            Flow::Close
        } else {
            Flow::Continue
        }
    }

    fn dispatch(&mut self, frame: Frame) -> Flow {
        match frame {
            Frame::Request(req) => self.request(req),
            Frame::Stdin(data) => {
                self.write_stdin(&data);
                Flow::Continue
            }
            other => {
                self.reply_error(format!("unexpected {:?} frame from host", other.kind()));
                Flow::Continue
            }
        }
    }

    fn request(&mut self, req: Request) -> Flow {
        let reply = match req {
            Request::Ping => Response::Pong,
            Request::Version => Response::Version {
                agent: env!("CARGO_PKG_VERSION").into(),
                protocol: PROTOCOL_VERSION,
            },
            Request::Exec(exec) => match self.exec(&exec) {
                Ok(()) => return Flow::Continue,
                Err(message) => Response::Error { message },
            },
            Request::CloseStdin => {
                self.stdin = None;
                return Flow::Continue;
            }
            Request::Signal { signal } => {
                self.signal(signal);
                return Flow::Continue;
            }
            Request::Poweroff => {
                self.reply(Response::Ok);
                return Flow::Poweroff;
            }
        };
        self.reply(reply);
        Flow::Continue
    }

    fn exec(&mut self, req: &husk_agent::ExecRequest) -> Result<(), String> {
        if self.running_pid().is_some() {
            return Err("an exec is already running on this connection".into());
        }
        self.stdin = exec::start(req, &self.ctx, &self.out, &self.running)?;
        Ok(())
    }

    fn write_stdin(&mut self, data: &[u8]) {
        // Stdin frames get no reply; once the child stops reading, further input is dropped.
        if let Some(stdin) = &mut self.stdin {
            if stdin.write_all(data).is_err() {
                self.stdin = None;
            }
        }
    }

    fn signal(&self, signal: i32) {
        if let Some(pid) = self.running_pid() {
            if let Err(e) = self.ctx.reaper.signal(pid, signal) {
                eprintln!("husk-agent: signal {signal} to {pid}: {e}");
            }
        }
    }

    /// The host went away: an exec belongs to its connection, so stop it.
    fn abandon_exec(&mut self) {
        self.stdin = None;
        if let Some(pid) = self.running_pid() {
            let _ = self.ctx.reaper.signal(pid, libc::SIGKILL);
        }
    }

    fn running_pid(&self) -> Option<i32> {
        *self.running.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn reply(&self, resp: Response) {
        // A failed write shows up as EOF or an error on the next read, which ends the loop.
        let _ = self.out.send(&resp.into());
    }

    fn reply_error(&self, message: String) {
        self.reply(Response::Error { message });
    }
}
