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
        out.status = self.exec_streaming(req, &mut out.stdout, &mut out.stderr)?;
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
        out.status = self.pump(&mut out.stdout, &mut out.stderr)?;
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
