//! The host<->guest wire format, defined once for both ends.
//!
//! Every frame is a 9-byte header followed by a payload:
//!
//! ```text
//! offset 0..3  magic  b"HSK"
//! offset 3     protocol version (PROTOCOL_VERSION)
//! offset 4     frame kind (FrameKind)
//! offset 5..9  payload length, u32 little-endian, at most MAX_PAYLOAD
//! offset 9..   payload
//! ```
//!
//! Control frames (`Request`, `Response`) carry JSON; data frames (`Stdout`, `Stderr`, `Stdin`)
//! carry raw bytes so that bulk output is never JSON-encoded.
//!
//! Errors are classified by whether the byte stream can still be trusted afterwards: a bad
//! magic, version or length leaves the reader at an unknown position (fatal), while an unknown
//! kind or undecodable JSON has had its whole payload consumed, so the next frame starts at a
//! known boundary (recoverable).

use std::io::{self, Read, Write};

use serde::{Deserialize, Serialize};

/// First three bytes of every frame.
pub const MAGIC: [u8; 3] = *b"HSK";
/// Version byte carried by every frame; bumped on any incompatible change.
pub const PROTOCOL_VERSION: u8 = 1;

/// Spec annotation the host sets on a `CreateContainer` spec: where `process.args[0]` (a bare
/// name) is found on the process's PATH in the rootfs, looked up on the host, which spares the
/// guest a walk over 9p per PATH entry. Absent when the guest must look it up itself.
pub const EXEC_PATH_ANNOTATION: &str = "run.husk.exec-path";
/// Spec annotation the host sets on a `CreateContainer` spec with `startContainer` hooks: the
/// container's state as those hooks read it (JSON), whose `status` and `pid` the container's
/// init sets as it runs them.
pub const HOOK_STATE_ANNOTATION: &str = "run.husk.hook-state";
/// Size of the fixed frame header.
pub const HEADER_LEN: usize = 9;
/// Largest payload either side accepts (1 MiB), checked from the header before anything is
/// allocated, so a hostile peer cannot make a reader hold more than this per frame. The
/// largest control frame is a container's OCI spec in JSON (tens of KiB) and data frames are
/// at most `MAX_DATA_CHUNK`, so 1 MiB leaves wide room.
pub const MAX_PAYLOAD: u32 = 1 << 20;
/// Largest stdout/stderr/stdin chunk a sender puts in one data frame (64 KiB).
pub const MAX_DATA_CHUNK: usize = 64 * 1024;
/// The vsock port the agent listens on (any CID).
pub const AGENT_VSOCK_PORT: u32 = 1024;
/// Host port the agent connects to once it listens, so the host learns of it without
/// polling (each poll is a round trip through the guest while it boots).
pub const READY_VSOCK_PORT: u32 = 1025;

/// What a frame's payload is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum FrameKind {
    /// Host -> guest JSON `Request`.
    Request = 1,
    /// Guest -> host JSON `Response`.
    Response = 2,
    /// Guest -> host raw stdout bytes of the running exec.
    Stdout = 3,
    /// Guest -> host raw stderr bytes of the running exec.
    Stderr = 4,
    /// Host -> guest raw stdin bytes for the running exec.
    Stdin = 5,
}

impl FrameKind {
    /// Maps a wire byte to a kind, `None` when unknown.
    pub fn from_u8(byte: u8) -> Option<Self> {
        Some(match byte {
            1 => Self::Request,
            2 => Self::Response,
            3 => Self::Stdout,
            4 => Self::Stderr,
            5 => Self::Stdin,
            _ => return None,
        })
    }
}

/// A command to run in the guest.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecRequest {
    /// Program and arguments; the program is looked up in the child's `PATH`.
    pub argv: Vec<String>,
    /// `KEY=VALUE` entries added to the agent's default environment (only `PATH`).
    #[serde(default)]
    pub env: Vec<String>,
    /// Working directory; the agent's own when `None`.
    #[serde(default)]
    pub cwd: Option<String>,
    /// Whether the child's stdin is a pipe fed by `Stdin` frames (else `/dev/null`).
    #[serde(default)]
    pub stdin: bool,
}

/// Host -> guest control messages.
///
/// `CloseStdin` and `Signal` steer the running exec and get no reply (a reply would interleave
/// with its output); every other request gets exactly one `Response`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Request {
    /// Liveness check, answered by `Pong`.
    Ping,
    /// Answered by `Version`.
    Version,
    /// Start a command; answered by data frames and then `Exit` (or by `Error`).
    Exec(ExecRequest),
    /// Close the running exec's stdin (EOF for the child).
    CloseStdin,
    /// Send a signal to the running exec's process.
    Signal { signal: i32 },
    /// Answered by `Ok`, then the guest powers off.
    Poweroff,
    /// Prepare an OCI container: its init process is created inside the requested namespaces
    /// with its mounts done, and waits for `StartContainer`. Answered by `Created` or `Error`.
    CreateContainer {
        id: String,
        /// The bundle's `config.json`, as-is.
        spec: serde_json::Value,
        /// Guest path of the container's root filesystem (`root.path` in the spec is ignored).
        rootfs: String,
    },
    /// Let a created container's init exec its `process.args`; answered by `Ok` once it has.
    StartContainer { id: String },
    /// Turn this connection into the container init's stdio: answered by `Ok`, then the
    /// process's output arrives as `Stdout`/`Stderr` frames, `Stdin` frames and `CloseStdin`
    /// feed its stdin, `Resize` sets its terminal size, and `Exit` follows the last output.
    AttachStdio { id: String },
    /// Set the window size of the pty of this connection's attached or exec'd process. No
    /// reply, like `Signal`.
    Resize { rows: u16, cols: u16 },
    /// Answered by `Exit` once the container's init has exited (at once if it already has).
    WaitContainer { id: String },
    /// Signal the container's init, or with `all` every process of the container. `Ok`.
    SignalContainer { id: String, signal: i32, all: bool },
    /// Run an OCI `process` object inside a container's namespaces; streams like `Exec`
    /// (stdin is always a pipe or the pty: end it with `CloseStdin`).
    ExecInContainer {
        id: String,
        process: serde_json::Value,
    },
    /// Kill what is left of a container and forget it. `Ok`.
    DeleteContainer { id: String },
    /// Answered by `Processes` with the guest pids of the container's processes.
    ListProcesses { id: String },
    /// Makes a guest restored from a template its own: sets the wall clock to `time_ns`
    /// (nanoseconds since the epoch) and mixes `entropy` into the kernel's pool, reseeding it,
    /// so that sibling clones do not share clocks or random streams. `Ok`.
    CloneInit { time_ns: u64, entropy: Vec<u8> },
    /// Mount virtio 9p shares, each `tag` at `target` (created if missing), in the agent
    /// itself: a shell running `mkdir` and `mount` costs several process starts per share,
    /// which dominate a clone's create time in a slow guest. `Ok`, or `Error` naming the share.
    MountShares { shares: Vec<ShareMount> },
    /// Clone a container helper into these namespaces (OCI names) now, to wait for the next
    /// `CreateContainer` asking for exactly them: a template prepares one before its snapshot,
    /// so that its clones skip a helper's clone and exec. `Ok`.
    PrepareSpare { namespaces: Vec<String> },
}

/// One virtio 9p share for `Request::MountShares`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShareMount {
    /// The device's mount tag.
    pub tag: String,
    /// Guest directory to mount it on.
    pub target: String,
    pub read_only: bool,
    /// 9p message size (the `msize` mount option).
    pub msize: u32,
    /// Whether the host mount holding the shared directory is shared: the guest mount then
    /// is too (and private otherwise), so that a container's binds from it propagate as a
    /// runc container's binds from the host directory do.
    #[serde(default)]
    pub shared: bool,
}

/// How a process ended: exactly one of `code` and `signal` is set.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitStatus {
    /// Exit code when the process exited normally.
    pub code: Option<i32>,
    /// Signal number when the process was killed by a signal.
    pub signal: Option<i32>,
}

impl ExitStatus {
    /// True when the process exited with code 0.
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }
}

impl std::fmt::Display for ExitStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.code, self.signal) {
            (Some(code), _) => write!(f, "exit code {code}"),
            (None, Some(sig)) => write!(f, "killed by signal {sig}"),
            (None, None) => write!(f, "unknown exit status"),
        }
    }
}

/// Guest -> host control messages.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Response {
    Pong,
    Version {
        agent: String,
        protocol: u8,
    },
    /// The exec finished; sent after all of its output frames.
    Exit(ExitStatus),
    Ok,
    Error {
        message: String,
    },
    /// The container is created; `pid` is its init's pid in the guest.
    Created {
        pid: i32,
    },
    /// Guest pids of a container's processes.
    Processes {
        pids: Vec<i32>,
    },
}

/// One decoded frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    Request(Request),
    Response(Response),
    Stdout(Vec<u8>),
    Stderr(Vec<u8>),
    Stdin(Vec<u8>),
}

/// Why a frame could not be read.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("connection closed")]
    Eof,
    #[error("frame truncated: connection closed mid-frame")]
    Truncated,
    #[error("bad frame magic {0:02x?}")]
    BadMagic([u8; 3]),
    #[error("unsupported protocol version {0} (want {PROTOCOL_VERSION})")]
    BadVersion(u8),
    #[error("frame payload of {0} bytes exceeds the {MAX_PAYLOAD}-byte limit")]
    TooLarge(u32),
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    #[error("malformed {kind:?} payload: {message}")]
    BadPayload { kind: FrameKind, message: String },
    #[error("i/o: {0}")]
    Io(#[from] io::Error),
}

impl FrameError {
    /// True when the reader no longer knows where the next frame starts (or the stream is
    /// gone), so the connection must be closed.
    pub fn is_fatal(&self) -> bool {
        !matches!(self, Self::UnknownKind(_) | Self::BadPayload { .. })
    }
}

/// A validated frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Raw kind byte; validated only after the payload is consumed, to stay in sync.
    pub kind: u8,
    pub len: u32,
}

impl Header {
    /// Validates magic, version and length.
    pub fn parse(bytes: &[u8; HEADER_LEN]) -> Result<Self, FrameError> {
        let magic = [bytes[0], bytes[1], bytes[2]];
        if magic != MAGIC {
            return Err(FrameError::BadMagic(magic));
        }
        if bytes[3] != PROTOCOL_VERSION {
            return Err(FrameError::BadVersion(bytes[3]));
        }
        let len = u32::from_le_bytes([bytes[5], bytes[6], bytes[7], bytes[8]]);
        if len > MAX_PAYLOAD {
            return Err(FrameError::TooLarge(len));
        }
        Ok(Self {
            kind: bytes[4],
            len,
        })
    }

    /// Serializes a header for `kind` and a payload of `len` bytes.
    pub fn encode(kind: FrameKind, len: u32) -> [u8; HEADER_LEN] {
        let l = len.to_le_bytes();
        [
            MAGIC[0],
            MAGIC[1],
            MAGIC[2],
            PROTOCOL_VERSION,
            kind as u8,
            l[0],
            l[1],
            l[2],
            l[3],
        ]
    }
}

impl Frame {
    /// The kind byte this frame travels with.
    pub fn kind(&self) -> FrameKind {
        match self {
            Self::Request(_) => FrameKind::Request,
            Self::Response(_) => FrameKind::Response,
            Self::Stdout(_) => FrameKind::Stdout,
            Self::Stderr(_) => FrameKind::Stderr,
            Self::Stdin(_) => FrameKind::Stdin,
        }
    }

    /// Interprets a payload that was read in full.
    pub fn from_payload(kind: u8, payload: Vec<u8>) -> Result<Self, FrameError> {
        let kind = FrameKind::from_u8(kind).ok_or(FrameError::UnknownKind(kind))?;
        let bad = |e: serde_json::Error| FrameError::BadPayload {
            kind,
            message: e.to_string(),
        };
        Ok(match kind {
            FrameKind::Request => Self::Request(serde_json::from_slice(&payload).map_err(bad)?),
            FrameKind::Response => Self::Response(serde_json::from_slice(&payload).map_err(bad)?),
            FrameKind::Stdout => Self::Stdout(payload),
            FrameKind::Stderr => Self::Stderr(payload),
            FrameKind::Stdin => Self::Stdin(payload),
        })
    }

    /// Header plus payload in one buffer, so a frame goes out in a single write.
    pub fn encode(&self) -> Vec<u8> {
        match self {
            Self::Request(r) => encode_json(FrameKind::Request, r),
            Self::Response(r) => encode_json(FrameKind::Response, r),
            Self::Stdout(d) | Self::Stderr(d) | Self::Stdin(d) => encode_data(self.kind(), d),
        }
    }

    /// Decodes one frame from the front of `buf` (for callers with their own buffering).
    /// Returns `Ok(None)` when `buf` holds only part of a frame, else the frame and the
    /// number of bytes it used.
    pub fn decode(buf: &[u8]) -> Result<Option<(Self, usize)>, FrameError> {
        let Some(head) = buf.first_chunk::<HEADER_LEN>() else {
            return Ok(None);
        };
        let header = Header::parse(head)?;
        let end = HEADER_LEN + header.len as usize;
        let Some(payload) = buf.get(HEADER_LEN..end) else {
            return Ok(None);
        };
        Ok(Some((
            Self::from_payload(header.kind, payload.to_vec())?,
            end,
        )))
    }
}

impl From<Request> for Frame {
    fn from(r: Request) -> Self {
        Self::Request(r)
    }
}

impl From<Response> for Frame {
    fn from(r: Response) -> Self {
        Self::Response(r)
    }
}

fn encode_json<T: Serialize>(kind: FrameKind, msg: &T) -> Vec<u8> {
    // Serializing these plain enums to a Vec cannot fail: no maps with non-string keys, no I/O.
    let json = serde_json::to_vec(msg).unwrap_or_default();
    encode_data(kind, &json)
}

/// Encodes a frame of `kind` around `data`. Callers keep data chunks <= `MAX_DATA_CHUNK`.
pub fn encode_data(kind: FrameKind, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + data.len());
    // Payloads are bounded by MAX_PAYLOAD (checked by the reader), far below u32::MAX.
    out.extend_from_slice(&Header::encode(kind, data.len() as u32));
    out.extend_from_slice(data);
    out
}

/// Writes one frame.
pub fn write_frame<W: Write + ?Sized>(w: &mut W, frame: &Frame) -> io::Result<()> {
    w.write_all(&frame.encode())?;
    w.flush()
}

/// Reads one frame, blocking until it is complete.
pub fn read_frame<R: Read + ?Sized>(r: &mut R) -> Result<Frame, FrameError> {
    let mut head = [0u8; HEADER_LEN];
    match read_full(r, &mut head)? {
        0 => return Err(FrameError::Eof),
        HEADER_LEN => {}
        _ => return Err(FrameError::Truncated),
    }
    let header = Header::parse(&head)?;
    let mut payload = vec![0u8; header.len as usize];
    if read_full(r, &mut payload)? != payload.len() {
        return Err(FrameError::Truncated);
    }
    Frame::from_payload(header.kind, payload)
}

/// Like `read_exact`, but reports how much was read before EOF so that a clean close between
/// frames can be told from a truncated frame.
fn read_full<R: Read + ?Sized>(r: &mut R, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match r.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip(frame: Frame) {
        let bytes = frame.encode();
        assert_eq!(read_frame(&mut bytes.as_slice()).unwrap(), frame);
        assert_eq!(Frame::decode(&bytes).unwrap(), Some((frame, bytes.len())));
    }

    #[test]
    fn every_frame_roundtrips() {
        let exec = ExecRequest {
            argv: vec!["sh".into(), "-c".into(), "echo hi".into()],
            env: vec!["A=b".into()],
            cwd: Some("/tmp".into()),
            stdin: true,
        };
        for req in [
            Request::Ping,
            Request::Version,
            Request::Exec(exec),
            Request::CloseStdin,
            Request::Signal { signal: 9 },
            Request::Poweroff,
            Request::CreateContainer {
                id: "c1".into(),
                spec: serde_json::json!({"ociVersion": "1.0.2", "process": {"args": ["sh"]}}),
                rootfs: "/run/husk/rootfs".into(),
            },
            Request::StartContainer { id: "c1".into() },
            Request::AttachStdio { id: "c1".into() },
            Request::Resize { rows: 24, cols: 80 },
            Request::WaitContainer { id: "c1".into() },
            Request::SignalContainer {
                id: "c1".into(),
                signal: 15,
                all: true,
            },
            Request::ExecInContainer {
                id: "c1".into(),
                process: serde_json::json!({"args": ["ls"], "cwd": "/"}),
            },
            Request::DeleteContainer { id: "c1".into() },
            Request::ListProcesses { id: "c1".into() },
        ] {
            roundtrip(Frame::Request(req));
        }
        let exit = ExitStatus {
            code: Some(7),
            signal: None,
        };
        for resp in [
            Response::Pong,
            Response::Version {
                agent: "0.1.0".into(),
                protocol: 1,
            },
            Response::Exit(exit),
            Response::Ok,
            Response::Error {
                message: "no".into(),
            },
            Response::Created { pid: 42 },
            Response::Processes { pids: vec![1, 2] },
        ] {
            roundtrip(Frame::Response(resp));
        }
        roundtrip(Frame::Stdout(vec![0, 1, 2, 255]));
        roundtrip(Frame::Stderr(Vec::new()));
        roundtrip(Frame::Stdin(vec![7; MAX_DATA_CHUNK]));
    }

    #[test]
    fn json_shape_is_stable() {
        let bytes = serde_json::to_string(&Response::Exit(ExitStatus {
            code: None,
            signal: Some(9),
        }))
        .unwrap();
        assert_eq!(bytes, r#"{"type":"exit","code":null,"signal":9}"#);
        let req: Request = serde_json::from_str(r#"{"type":"exec","argv":["true"]}"#).unwrap();
        assert_eq!(
            req,
            Request::Exec(ExecRequest {
                argv: vec!["true".into()],
                ..Default::default()
            })
        );
    }

    #[test]
    fn clean_eof_between_frames() {
        assert!(matches!(read_frame(&mut &[][..]), Err(FrameError::Eof)));
    }

    #[test]
    fn truncated_frames_are_reported() {
        let bytes = Frame::Request(Request::Ping).encode();
        for cut in 1..bytes.len() {
            let err = read_frame(&mut &bytes[..cut]).unwrap_err();
            assert!(matches!(err, FrameError::Truncated), "cut {cut}: {err}");
            assert!(err.is_fatal());
            assert!(Frame::decode(&bytes[..cut]).unwrap().is_none());
        }
    }

    #[test]
    fn bad_magic_is_fatal() {
        let mut bytes = Frame::Request(Request::Ping).encode();
        bytes[0] = b'X';
        let err = read_frame(&mut bytes.as_slice()).unwrap_err();
        assert!(matches!(err, FrameError::BadMagic(_)) && err.is_fatal());
    }

    #[test]
    fn wrong_version_is_fatal() {
        let mut bytes = Frame::Request(Request::Ping).encode();
        bytes[3] = 2;
        let err = read_frame(&mut bytes.as_slice()).unwrap_err();
        assert!(matches!(err, FrameError::BadVersion(2)) && err.is_fatal());
    }

    #[test]
    fn oversized_frame_is_fatal_without_allocating() {
        let head = Header::encode(FrameKind::Stdin, u32::MAX);
        let err = read_frame(&mut &head[..]).unwrap_err();
        assert!(matches!(err, FrameError::TooLarge(u32::MAX)) && err.is_fatal());
        let head = Header::encode(FrameKind::Stdin, MAX_PAYLOAD + 1);
        assert!(matches!(Frame::decode(&head), Err(FrameError::TooLarge(_))));
    }

    #[test]
    fn unknown_kind_is_recoverable_and_stays_in_sync() {
        let mut bytes = encode_data(FrameKind::Stdout, b"abc");
        bytes[4] = 42;
        bytes.extend(Frame::Request(Request::Ping).encode());
        let mut r = bytes.as_slice();
        let err = read_frame(&mut r).unwrap_err();
        assert!(matches!(err, FrameError::UnknownKind(42)) && !err.is_fatal());
        assert_eq!(read_frame(&mut r).unwrap(), Frame::Request(Request::Ping));
    }

    #[test]
    fn malformed_json_is_recoverable_and_stays_in_sync() {
        let mut bytes = Vec::new();
        for junk in [
            &b"{not json"[..],
            b"",
            b"{\"type\":\"frobnicate\"}",
            b"[1,2]",
        ] {
            bytes.extend(encode_data(FrameKind::Request, junk));
        }
        bytes.extend(Frame::Request(Request::Version).encode());
        let mut r = bytes.as_slice();
        for _ in 0..4 {
            let err = read_frame(&mut r).unwrap_err();
            assert!(matches!(err, FrameError::BadPayload { .. }) && !err.is_fatal());
        }
        assert_eq!(
            read_frame(&mut r).unwrap(),
            Frame::Request(Request::Version)
        );
    }

    /// xorshift64*: a fixed-seed generator so failures reproduce.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
        fn bytes(&mut self, n: usize) -> Vec<u8> {
            (0..n).map(|_| self.next() as u8).collect()
        }
    }

    #[test]
    fn random_bytes_never_panic() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        for _ in 0..5000 {
            let n = (rng.next() % 64) as usize;
            let junk = rng.bytes(n);
            drain(&junk);
            let _ = Frame::decode(&junk);
        }
    }

    #[test]
    fn mutated_valid_frames_never_panic() {
        let mut rng = Rng(42);
        let base = Frame::Request(Request::Exec(ExecRequest {
            argv: vec!["ls".into()],
            ..Default::default()
        }))
        .encode();
        for _ in 0..5000 {
            let mut bytes = base.clone();
            for _ in 0..1 + rng.next() % 4 {
                let i = (rng.next() as usize) % bytes.len();
                bytes[i] = rng.next() as u8;
            }
            drain(&bytes);
            let _ = Frame::decode(&bytes);
        }
    }

    /// Reads frames until a fatal error, as the agent does.
    fn drain(mut bytes: &[u8]) {
        loop {
            match read_frame(&mut bytes) {
                Ok(_) => {}
                Err(e) if e.is_fatal() => return,
                Err(_) => {}
            }
        }
    }
}
