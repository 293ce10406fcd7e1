//! The host side of the protocol: a blocking client over any byte stream.

use std::io::{self, Read, Write};

use crate::proto::{
    encode_data, read_frame, write_frame, ExecRequest, ExitStatus, Frame, FrameError, FrameKind,
    Request, Response, MAX_DATA_CHUNK,
};

/// Why a client call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("agent connection: {0}")]
    Io(#[from] io::Error),
    #[error("agent protocol: {0}")]
    Protocol(#[from] FrameError),
    #[error("agent reported: {0}")]
    Agent(String),
    #[error("unexpected frame from agent: {0}")]
    Unexpected(String),
    #[error("writing exec output: {0}")]
    Output(io::Error),
}

/// Most output [`Client::exec`] and [`Client::exec_in_container`] collect per stream: they
/// keep whatever the guest prints in memory, so a hostile guest printing without end would
/// grow the host process without bound. 64 MiB is six times the most any caller collects
/// (the lab's 10 MiB stream); larger outputs belong in [`Client::exec_streaming`].
pub const MAX_COLLECTED_OUTPUT: usize = 64 << 20;

/// Captured result of `Client::exec`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExecOutput {
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub status: ExitStatus,
}

/// One step of a running exec, as returned by `Client::next_event`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExecEvent {
    Stdout(Vec<u8>),
    Stderr(Vec<u8>),
    Exit(ExitStatus),
}

/// A blocking agent client. One request at a time; an exec owns the connection until `Exit`.
pub struct Client<S: Read + Write> {
    stream: S,
}

impl<S: Read + Write> Client<S> {
    pub fn new(stream: S) -> Self {
        Self { stream }
    }

    /// The connection, e.g. to bound how long a reply is awaited.
    pub fn get_ref(&self) -> &S {
        &self.stream
    }

    /// Gives the stream back (e.g. to drive it from an event loop with `proto`).
    pub fn into_inner(self) -> S {
        self.stream
    }

    pub fn ping(&mut self) -> Result<(), ClientError> {
        match self.call(Request::Ping)? {
            Response::Pong => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    /// The agent's version string and protocol version.
    pub fn version(&mut self) -> Result<(String, u8), ClientError> {
        match self.call(Request::Version)? {
            Response::Version { agent, protocol } => Ok((agent, protocol)),
            other => Err(unexpected(other)),
        }
    }

    /// Runs a command and collects its output. With `req.stdin` the child sees EOF at once.
    pub fn exec(&mut self, req: &ExecRequest) -> Result<ExecOutput, ClientError> {
        let mut out = ExecOutput::default();
        let (mut stdout, mut stderr) = (Collect(&mut out.stdout), Collect(&mut out.stderr));
        let status = self.exec_streaming(req, &mut stdout, &mut stderr)?;
        out.status = status;
        Ok(out)
    }

    /// Runs a command, writing its output to the sinks as it arrives.
    pub fn exec_streaming(
        &mut self,
        req: &ExecRequest,
        stdout: &mut dyn Write,
        stderr: &mut dyn Write,
    ) -> Result<ExitStatus, ClientError> {
        self.start_exec(req)?;
        if req.stdin {
            self.close_stdin()?;
        }
        self.pump(stdout, stderr)
    }

    /// Runs a command with `input` as its stdin. The input is sent before any output is read,
    /// so keep it small (tens of KiB): a child that writes a lot before reading all its input
    /// would otherwise fill both directions' buffers. For large two-way streams use
    /// `start_exec` and drive the stream yourself.
    pub fn exec_with_input(
        &mut self,
        req: &ExecRequest,
        input: &[u8],
        stdout: &mut dyn Write,
        stderr: &mut dyn Write,
    ) -> Result<ExitStatus, ClientError> {
        let req = ExecRequest {
            stdin: true,
            ..req.clone()
        };
        self.start_exec(&req)?;
        for chunk in input.chunks(MAX_DATA_CHUNK) {
            self.send_stdin(chunk)?;
        }
        self.close_stdin()?;
        self.pump(stdout, stderr)
    }

    /// Sends an `Exec` request; follow with `next_event` until `ExecEvent::Exit`.
    pub fn start_exec(&mut self, req: &ExecRequest) -> Result<(), ClientError> {
        self.send(Request::Exec(req.clone()))
    }

    /// Feeds the running exec's stdin, splitting into frames of at most `MAX_DATA_CHUNK`.
    pub fn send_stdin(&mut self, data: &[u8]) -> Result<(), ClientError> {
        for chunk in data.chunks(MAX_DATA_CHUNK) {
            self.stream
                .write_all(&encode_data(FrameKind::Stdin, chunk))?;
        }
        Ok(self.stream.flush()?)
    }

    /// Closes the running exec's stdin.
    pub fn close_stdin(&mut self) -> Result<(), ClientError> {
        self.send(Request::CloseStdin)
    }

    /// Signals the running exec's process (no reply; its `Exit` tells the outcome).
    pub fn signal(&mut self, signal: i32) -> Result<(), ClientError> {
        self.send(Request::Signal { signal })
    }

    /// The next output chunk or the final status of the running exec.
    pub fn next_event(&mut self) -> Result<ExecEvent, ClientError> {
        match read_frame(&mut self.stream)? {
            Frame::Stdout(d) => Ok(ExecEvent::Stdout(d)),
            Frame::Stderr(d) => Ok(ExecEvent::Stderr(d)),
            Frame::Response(Response::Exit(status)) => Ok(ExecEvent::Exit(status)),
            Frame::Response(Response::Error { message }) => Err(ClientError::Agent(message)),
            other => Err(ClientError::Unexpected(describe(&other))),
        }
    }

    /// Asks the guest to power off; returns once the agent has acknowledged.
    pub fn poweroff(&mut self) -> Result<(), ClientError> {
        match self.call(Request::Poweroff)? {
            Response::Ok => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    /// Creates a container from a bundle's `config.json` and a guest rootfs path; returns the
    /// guest pid of its init, which waits for `start_container`.
    pub fn create_container(
        &mut self,
        id: &str,
        spec: &serde_json::Value,
        rootfs: &str,
    ) -> Result<i32, ClientError> {
        let req = Request::CreateContainer {
            id: id.into(),
            spec: spec.clone(),
            rootfs: rootfs.into(),
        };
        match self.call(req)? {
            Response::Created { pid } => Ok(pid),
            other => Err(unexpected(other)),
        }
    }

    /// Has the guest clone a container helper into `namespaces` ahead of the next create
    /// (see `Request::PrepareSpare`).
    pub fn prepare_spare(&mut self, namespaces: &[&str]) -> Result<(), ClientError> {
        let namespaces = namespaces.iter().map(|n| n.to_string()).collect();
        self.call_ok(Request::PrepareSpare { namespaces })
    }

    /// Lets a created container's init exec its process.
    pub fn start_container(&mut self, id: &str) -> Result<(), ClientError> {
        self.call_ok(Request::StartContainer { id: id.into() })
    }

    /// Turns this connection into the container init's stdio (use a dedicated connection,
    /// before `start_container`).
    pub fn attach_stdio(mut self, id: &str) -> Result<Attachment<S>, ClientError> {
        self.call_ok(Request::AttachStdio { id: id.into() })?;
        Ok(Attachment { client: self })
    }

    /// Blocks until the container's init has exited and returns how.
    pub fn wait_container(&mut self, id: &str) -> Result<ExitStatus, ClientError> {
        match self.call(Request::WaitContainer { id: id.into() })? {
            Response::Exit(status) => Ok(status),
            other => Err(unexpected(other)),
        }
    }

    /// Signals the container's init, or with `all` each of its processes.
    pub fn signal_container(
        &mut self,
        id: &str,
        signal: i32,
        all: bool,
    ) -> Result<(), ClientError> {
        self.call_ok(Request::SignalContainer {
            id: id.into(),
            signal,
            all,
        })
    }

    /// Starts an OCI process object inside a container; follow with `next_event` (and
    /// `send_stdin`, `close_stdin`, `signal`, `resize`) until `ExecEvent::Exit`.
    pub fn start_exec_in_container(
        &mut self,
        id: &str,
        process: &serde_json::Value,
    ) -> Result<(), ClientError> {
        self.send(Request::ExecInContainer {
            id: id.into(),
            process: process.clone(),
        })
    }

    /// Runs an OCI process object inside a container with empty stdin and collects its output.
    pub fn exec_in_container(
        &mut self,
        id: &str,
        process: &serde_json::Value,
    ) -> Result<ExecOutput, ClientError> {
        self.start_exec_in_container(id, process)?;
        self.close_stdin()?;
        let mut out = ExecOutput::default();
        let (mut stdout, mut stderr) = (Collect(&mut out.stdout), Collect(&mut out.stderr));
        let status = self.pump(&mut stdout, &mut stderr)?;
        out.status = status;
        Ok(out)
    }

    /// Kills what is left of a container and forgets it.
    pub fn delete_container(&mut self, id: &str) -> Result<(), ClientError> {
        self.call_ok(Request::DeleteContainer { id: id.into() })
    }

    /// Guest pids of the container's processes.
    pub fn list_processes(&mut self, id: &str) -> Result<Vec<i32>, ClientError> {
        match self.call(Request::ListProcesses { id: id.into() })? {
            Response::Processes { pids } => Ok(pids),
            other => Err(unexpected(other)),
        }
    }

    /// Sets the terminal size of this connection's attached or exec'd process (no reply).
    pub fn resize(&mut self, rows: u16, cols: u16) -> Result<(), ClientError> {
        self.send(Request::Resize { rows, cols })
    }

    fn call_ok(&mut self, req: Request) -> Result<(), ClientError> {
        match self.call(req)? {
            Response::Ok => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    fn pump(
        &mut self,
        stdout: &mut dyn Write,
        stderr: &mut dyn Write,
    ) -> Result<ExitStatus, ClientError> {
        loop {
            match self.next_event()? {
                ExecEvent::Stdout(d) => stdout.write_all(&d).map_err(ClientError::Output)?,
                ExecEvent::Stderr(d) => stderr.write_all(&d).map_err(ClientError::Output)?,
                ExecEvent::Exit(status) => return Ok(status),
            }
        }
    }

    fn send(&mut self, req: Request) -> Result<(), ClientError> {
        Ok(write_frame(&mut self.stream, &Frame::Request(req))?)
    }

    /// Sends a request and reads its single reply; an `Error` reply becomes `Err`.
    fn call(&mut self, req: Request) -> Result<Response, ClientError> {
        self.send(req)?;
        self.reply()
    }

    /// Reads the reply to the oldest request still unanswered.
    fn reply(&mut self) -> Result<Response, ClientError> {
        match read_frame(&mut self.stream)? {
            Frame::Response(Response::Error { message }) => Err(ClientError::Agent(message)),
            Frame::Response(r) => Ok(r),
            other => Err(ClientError::Unexpected(describe(&other))),
        }
    }

    /// Sends requests that each get one reply without waiting for any (the agent answers a
    /// connection's requests in order): the replies are read with [`Self::replies`]. Saves a
    /// round trip to the guest per request, which in a slow guest is worth it.
    pub fn send_all(&mut self, reqs: Vec<Request>) -> Result<(), ClientError> {
        reqs.into_iter().try_for_each(|r| self.send(r))
    }

    /// The replies to `n` requests sent with [`Self::send_all`], in order; each is `Err` if
    /// the agent answered that request with an error. The outer `Err` means the connection
    /// broke (or went out of step), after which no further reply can be trusted.
    pub fn replies(&mut self, n: usize) -> Result<Vec<Result<Response, ClientError>>, ClientError> {
        (0..n)
            .map(|_| match self.reply() {
                Err(ClientError::Agent(m)) => Ok(Err(ClientError::Agent(m))),
                other => other.map(Ok),
            })
            .collect()
    }
}

/// A connection carrying a container init's stdio (from `Client::attach_stdio`).
pub struct Attachment<S: Read + Write> {
    client: Client<S>,
}

impl<S: Read + Write> Attachment<S> {
    /// Feeds the process's stdin (or its terminal).
    pub fn send_stdin(&mut self, data: &[u8]) -> Result<(), ClientError> {
        self.client.send_stdin(data)
    }

    /// Ends the process's stdin; with a terminal this types the EOF character (^D) instead.
    pub fn close_stdin(&mut self) -> Result<(), ClientError> {
        self.client.close_stdin()
    }

    /// Sets the terminal's window size.
    pub fn resize(&mut self, rows: u16, cols: u16) -> Result<(), ClientError> {
        self.client.resize(rows, cols)
    }

    /// The next output chunk, or the init's final status after all of its output.
    pub fn next_event(&mut self) -> Result<ExecEvent, ClientError> {
        self.client.next_event()
    }

    /// Copies all remaining output to the sinks and returns the final status.
    pub fn copy_output(
        &mut self,
        stdout: &mut dyn Write,
        stderr: &mut dyn Write,
    ) -> Result<ExitStatus, ClientError> {
        self.client.pump(stdout, stderr)
    }

    /// The underlying stream, e.g. to split it for a two-way event loop.
    pub fn into_inner(self) -> S {
        self.client.into_inner()
    }
}

/// Collects exec output in memory, refusing to hold more than [`MAX_COLLECTED_OUTPUT`].
struct Collect<'a>(&'a mut Vec<u8>);

impl Write for Collect<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.0.len() + buf.len() > MAX_COLLECTED_OUTPUT {
            let msg = format!("more than {MAX_COLLECTED_OUTPUT} bytes; stream it instead");
            return Err(io::Error::new(io::ErrorKind::OutOfMemory, msg));
        }
        self.0.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A short description: data frames can be 64 KiB, too long to print whole.
fn describe(frame: &Frame) -> String {
    match frame {
        Frame::Request(r) => format!("request {r:?}"),
        Frame::Response(r) => format!("response {r:?}"),
        Frame::Stdout(d) | Frame::Stderr(d) | Frame::Stdin(d) => {
            format!("{:?} data of {} bytes", frame.kind(), d.len())
        }
    }
}

fn unexpected(resp: Response) -> ClientError {
    ClientError::Unexpected(format!("{resp:?}"))
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::proto::{Header, MAX_PAYLOAD};

    /// The floods below measure the process's peak memory: one at a time.
    static FLOOD: Mutex<()> = Mutex::new(());

    /// How far the process's peak resident memory rose above its resident memory while `f`
    /// ran, in KiB (VmHWM is reset to VmRSS first).
    fn peak_growth_kib(f: impl FnOnce()) -> u64 {
        let kib = |field: &str| -> u64 {
            let status = std::fs::read_to_string("/proc/self/status").unwrap();
            let line = status.lines().find(|l| l.starts_with(field)).unwrap();
            line.split_whitespace().nth(1).unwrap().parse().unwrap()
        };
        std::fs::write("/proc/self/clear_refs", "5").unwrap();
        let before = kib("VmRSS:");
        f();
        kib("VmHWM:").saturating_sub(before)
    }

    /// A hostile guest's end of the connection: `head` once, then `body` over and over until
    /// `total` bytes were read, then `tail`; writes are swallowed.
    struct HostileGuest {
        stream: Box<dyn Read>,
    }

    impl HostileGuest {
        fn new(head: Vec<u8>, body: Vec<u8>, total: u64, tail: Vec<u8>) -> Self {
            let body = Repeat { data: body, at: 0 }.take(total);
            let stream = io::Cursor::new(head).chain(body.chain(io::Cursor::new(tail)));
            Self {
                stream: Box::new(stream),
            }
        }
    }

    impl Read for HostileGuest {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.stream.read(buf)
        }
    }

    impl Write for HostileGuest {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    /// `data` repeated without end.
    struct Repeat {
        data: Vec<u8>,
        at: usize,
    }

    impl Read for Repeat {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let n = buf.len().min(self.data.len() - self.at);
            buf[..n].copy_from_slice(&self.data[self.at..self.at + n]);
            self.at = (self.at + n) % self.data.len();
            Ok(n)
        }
    }

    /// A guest announces frames of up to 4 GiB and then streams 64 MiB into each: every one
    /// is refused from its header, before any of its payload is read or allocated.
    #[test]
    fn flood_of_oversized_frames_allocates_nothing() {
        let _one = FLOOD.lock().unwrap_or_else(|p| p.into_inner());
        let grown = peak_growth_kib(|| {
            for len in [MAX_PAYLOAD + 1, 1 << 24, 1 << 31, u32::MAX] {
                let head = Header::encode(FrameKind::Stdout, len).to_vec();
                let mut guest = HostileGuest::new(head, vec![0xa5; 1 << 16], 64 << 20, vec![]);
                let err = read_frame(&mut guest).unwrap_err();
                assert!(matches!(err, FrameError::TooLarge(n) if n == len), "{err}");
            }
        });
        eprintln!("flood agent frames announcing up to 4 GiB: peak RSS grew {grown} KiB");
        assert!(grown < 4 << 10, "peak RSS grew {grown} KiB, bound 4 MiB");
    }

    /// A guest answers an exec with 256 MiB of stdout in maximum-size frames: `exec` stops
    /// collecting at `MAX_COLLECTED_OUTPUT` with an error instead of holding it all.
    #[test]
    fn flood_of_exec_output_stops_at_the_cap() {
        let _one = FLOOD.lock().unwrap_or_else(|p| p.into_inner());
        let frame = encode_data(FrameKind::Stdout, &vec![b'x'; MAX_PAYLOAD as usize]);
        let exit = Frame::Response(Response::Exit(ExitStatus::default())).encode();
        let total = 256 * frame.len() as u64;
        let mut client = Client::new(HostileGuest::new(vec![], frame, total, exit));
        let mut result = None;
        let grown = peak_growth_kib(|| result = Some(client.exec(&ExecRequest::default())));
        eprintln!("flood agent exec output (256 MiB): peak RSS grew {grown} KiB");
        let bound = (MAX_COLLECTED_OUTPUT >> 10) as u64 + (8 << 10);
        assert!(
            grown < bound,
            "peak RSS grew {grown} KiB, bound {bound} KiB"
        );
        let err = result.unwrap().unwrap_err();
        assert!(matches!(err, ClientError::Output(_)), "{err}");
    }
}
