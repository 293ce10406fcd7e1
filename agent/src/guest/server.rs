//! Serving host connections: the accept loop and, one thread per connection, the request loop
//! that dispatches each request to its handler.

use std::fs::File;
use std::io::{self, BufReader, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use nix::poll::{poll, PollFd, PollFlags};

use husk_agent::proto::{
    read_frame, Frame, FrameError, FrameKind, Request, Response, PROTOCOL_VERSION,
};

use super::agent_state::{AgentState, Mode};
use super::container::relay::Relay;
use super::container::{self, ExecStarted, Split, Stdio};
use super::exec;
use super::host_conn::{Running, Sender};
use super::listener::Listener;
use super::lock::lock;

/// Accepts connections forever, serving each on its own thread.
pub fn serve(listener: Listener, state: Arc<AgentState>) -> ! {
    loop {
        match listener.accept() {
            Ok(stream) => {
                let state = state.clone();
                let spawned = thread::Builder::new()
                    .name("conn".into())
                    .spawn(move || Conn::serve(stream, state));
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
    state: Arc<AgentState>,
    out: Sender,
    running: Running,
    /// The running (or last) exec's or the attached container's stdin (the pty master with
    /// a terminal); only this thread writes to it.
    stdin: Option<File>,
    /// The pty master of the exec or attached container, for `Resize` and `CloseStdin`.
    pty: Option<File>,
    /// The container init's stdio, when this connection is attached to it.
    relay: Option<Arc<Relay>>,
}

impl Conn {
    fn serve(stream: File, state: Arc<AgentState>) {
        let writer = match stream.try_clone() {
            Ok(w) => w,
            Err(e) => return eprintln!("husk-agent: connection: {e}"),
        };
        let mut conn = Conn {
            state,
            out: Sender::new(writer),
            running: Arc::default(),
            stdin: None,
            pty: None,
            relay: None,
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
                    if let Mode::Init = conn.state.mode {
                        nix::unistd::sync();
                        await_hangup(reader.get_ref());
                    }
                    conn.state.mode.poweroff();
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
        let handled = match req {
            Request::Poweroff => {
                self.reply(Response::Ok);
                return Flow::Poweroff;
            }
            Request::Exec(exec) => self.exec(&exec),
            Request::ExecInContainer { id, process } => self.exec_in(&id, process),
            Request::AttachStdio { id } => self.attach(&id),
            Request::CloseStdin => {
                self.close_stdin();
                Ok(())
            }
            Request::Resize { rows, cols } => {
                if let Some(pty) = &self.pty {
                    let _ = container::resize(pty, rows, cols);
                }
                Ok(())
            }
            Request::Signal { signal } => {
                self.signal(signal);
                Ok(())
            }
            other => {
                self.reply(self.answer(other));
                Ok(())
            }
        };
        if let Err(message) = handled {
            self.reply_error(message);
        }
        Flow::Continue
    }

    /// The requests that get exactly one reply.
    fn answer(&self, req: Request) -> Response {
        let result = match req {
            Request::Ping => Ok(Response::Pong),
            Request::Version => Ok(Response::Version {
                agent: env!("CARGO_PKG_VERSION").into(),
                protocol: PROTOCOL_VERSION,
            }),
            Request::CloneInit { time_ns, entropy } => {
                super::clone_init::make_unique(time_ns, &entropy).map(|()| Response::Ok)
            }
            Request::MountShares { shares } => super::shares::mount(&shares).map(|()| Response::Ok),
            other => self.container_request(other),
        };
        result.unwrap_or_else(|message| Response::Error { message })
    }

    fn exec(&mut self, req: &husk_agent::ExecRequest) -> Result<(), String> {
        self.check_idle()?;
        let stdin = exec::start(req, &self.state, &self.out, &self.running)?;
        self.stdin = stdin.map(|s| File::from(OwnedFd::from(s)));
        self.pty = None;
        Ok(())
    }

    /// The container requests that get exactly one reply.
    fn container_request(&self, req: Request) -> Result<Response, String> {
        let state = &self.state;
        let c = &state.containers;
        match req {
            Request::CreateContainer { id, spec, rootfs } => c
                .create(&state.reaper, &id, spec, &rootfs)
                .map(|pid| Response::Created { pid }),
            Request::StartContainer { id } => c.start(&id).map(|()| Response::Ok),
            Request::WaitContainer { id } => c.wait(&id).map(Response::Exit),
            Request::SignalContainer { id, signal, all } => c
                .signal(&state.reaper, &id, signal, all)
                .map(|()| Response::Ok),
            Request::DeleteContainer { id } => c.delete(&id).map(|()| Response::Ok),
            Request::PrepareSpare { namespaces } => c
                .prepare_spare(&state.reaper, &namespaces)
                .map(|()| Response::Ok),
            Request::ListProcesses { id } => {
                c.processes(&id).map(|pids| Response::Processes { pids })
            }
            other => Err(format!("unexpected request {other:?}")),
        }
    }

    /// Runs a process in a container, streamed on this connection like `Exec`.
    fn exec_in(&mut self, id: &str, process: serde_json::Value) -> Result<(), String> {
        self.check_idle()?;
        let ExecStarted { pid, status, stdio } =
            self.state
                .containers
                .exec(&self.state.reaper, id, process)?;
        *lock(&self.running) = Some(pid);
        let status = move || status.recv().unwrap_or_default();
        self.stream(stdio, status, Some(self.running.clone()))
            .inspect_err(|_| {
                let _ = self.state.reaper.signal(pid, libc::SIGKILL);
            })
    }

    /// Makes this connection the container init's stdio: `Ok`, then its output and `Exit`
    /// (taking the stdio over from a connection attached before).
    fn attach(&mut self, id: &str) -> Result<(), String> {
        let relay = self.state.containers.attach(id)?;
        self.pty = match relay.pty() {
            Some(pty) => Some(pty.try_clone().map_err(|e| format!("stdio: {e}"))?),
            None => None,
        };
        self.reply(Response::Ok);
        relay.attach(self.out.clone());
        self.relay = Some(relay);
        Ok(())
    }

    /// Pumps a process's output to this connection and `Exit` after it; keeps its input.
    fn stream(
        &mut self,
        stdio: Stdio,
        status: impl FnOnce() -> husk_agent::ExitStatus + Send + 'static,
        running: Option<Running>,
    ) -> Result<(), String> {
        let fail = |e: io::Error| format!("stdio: {e}");
        let Split {
            outputs: [stdout, stderr],
            stdin,
            pty,
        } = stdio.split().map_err(fail)?;
        let pumps = [
            stdout.map(|s| exec::pump(s, FrameKind::Stdout, self.out.clone())),
            stderr.map(|s| exec::pump(s, FrameKind::Stderr, self.out.clone())),
        ];
        exec::spawn_waiter(pumps, status, self.out.clone(), running).map_err(fail)?;
        self.stdin = Some(stdin);
        self.pty = pty;
        Ok(())
    }

    /// Ends the process's input: closes the pipe, or on a terminal types EOF (^D), which is
    /// what closing the host side of a terminal means to a reader in canonical mode.
    fn close_stdin(&mut self) {
        if let Some(relay) = &self.relay {
            return relay.close_stdin();
        }
        if self.pty.is_some() {
            if let Some(stdin) = &mut self.stdin {
                let _ = stdin.write_all(b"\x04");
            }
            return;
        }
        self.stdin = None;
    }

    fn write_stdin(&mut self, data: &[u8]) {
        if let Some(relay) = &self.relay {
            return relay.write_stdin(data);
        }
        // Stdin frames get no reply; once the child stops reading, further input is dropped.
        if let Some(stdin) = &mut self.stdin {
            if stdin.write_all(data).is_err() {
                self.stdin = None;
            }
        }
    }

    fn signal(&self, signal: i32) {
        if let Some(pid) = self.running_pid() {
            if let Err(e) = self.state.reaper.signal(pid, signal) {
                eprintln!("husk-agent: signal {signal} to {pid}: {e}");
            }
        }
    }

    /// The host went away: an exec belongs to its connection, so stop it.
    fn abandon_exec(&mut self) {
        self.stdin = None;
        if let Some(pid) = self.running_pid() {
            let _ = self.state.reaper.signal(pid, libc::SIGKILL);
        }
    }

    /// Fails when an exec already runs on this connection: it has one stdin and one `Exit`.
    fn check_idle(&self) -> Result<(), String> {
        match self.running_pid() {
            Some(_) => Err("an exec is already running on this connection".into()),
            None => Ok(()),
        }
    }

    fn running_pid(&self) -> Option<i32> {
        *lock(&self.running)
    }

    fn reply(&self, resp: Response) {
        // A failed write shows up as EOF or an error on the next read, which ends the loop.
        let _ = self.out.send(&resp.into());
    }

    fn reply_error(&self, message: String) {
        self.reply(Response::Error { message });
    }
}
