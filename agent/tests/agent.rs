//! The real agent binary in `--unix` mode, driven through `Client` and through raw bytes.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use husk_agent::proto::{
    encode_data, read_frame, Frame, FrameKind, Header, Request, Response, MAX_PAYLOAD,
};
use husk_agent::{Client, ClientError, ExecEvent, ExecRequest, PROTOCOL_VERSION};

/// A running agent; killed on drop so a failing test leaves nothing behind.
struct Agent {
    child: Child,
    socket: PathBuf,
    dir: tempfile::TempDir,
}

impl Agent {
    fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("agent.sock");
        let child = Command::new(env!("CARGO_BIN_EXE_husk-agent"))
            .arg("--unix")
            .arg(&socket)
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let agent = Agent { child, socket, dir };
        agent.wait_listening();
        agent
    }

    fn wait_listening(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while UnixStream::connect(&self.socket).is_err() {
            assert!(Instant::now() < deadline, "agent did not start listening");
            thread::sleep(Duration::from_millis(10));
        }
    }

    fn connect(&self) -> UnixStream {
        let s = UnixStream::connect(&self.socket).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        s
    }

    fn client(&self) -> Client<UnixStream> {
        Client::new(self.connect())
    }

    fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn sh(script: &str) -> ExecRequest {
    ExecRequest {
        argv: vec!["sh".into(), "-c".into(), script.into()],
        ..Default::default()
    }
}

#[test]
fn ping_and_version() {
    let agent = Agent::start();
    let mut c = agent.client();
    c.ping().unwrap();
    let (version, protocol) = c.version().unwrap();
    assert_eq!(version, env!("CARGO_PKG_VERSION"));
    assert_eq!(protocol, PROTOCOL_VERSION);
}

#[test]
fn exec_uname() {
    let agent = Agent::start();
    let out = agent
        .client()
        .exec(&ExecRequest {
            argv: vec!["uname".into(), "-a".into()],
            ..Default::default()
        })
        .unwrap();
    assert!(out.status.success(), "{:?}", out);
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("Linux"));
}

#[test]
fn exit_code_is_reported() {
    let agent = Agent::start();
    let out = agent.client().exec(&sh("exit 7")).unwrap();
    assert_eq!(out.status.code, Some(7));
    assert_eq!(out.status.signal, None);
}

#[test]
fn stdout_and_stderr_are_separate() {
    let agent = Agent::start();
    let out = agent
        .client()
        .exec(&sh("echo out; echo err >&2; echo out2"))
        .unwrap();
    assert_eq!(out.stdout, b"out\nout2\n");
    assert_eq!(out.stderr, b"err\n");
}

#[test]
fn ten_mib_of_stdout_arrive_intact() {
    let agent = Agent::start();
    let file = agent.dir().join("data");
    let script = format!(
        "head -c 10485760 /dev/urandom | tee {}; echo done >&2",
        file.display()
    );
    let out = agent.client().exec(&sh(&script)).unwrap();
    assert!(out.status.success());
    assert_eq!(out.stdout.len(), 10 << 20);
    assert!(
        out.stdout == std::fs::read(&file).unwrap(),
        "output differs"
    );
    assert_eq!(out.stderr, b"done\n");
}

#[test]
fn env_and_cwd_are_applied() {
    let agent = Agent::start();
    let req = ExecRequest {
        env: vec!["GREETING=hello there".into()],
        cwd: Some(agent.dir().display().to_string()),
        ..sh("echo \"$GREETING\"; pwd")
    };
    let out = agent.client().exec(&req).unwrap();
    let expected = format!("hello there\n{}\n", agent.dir().display());
    assert_eq!(String::from_utf8_lossy(&out.stdout), expected);
}

#[test]
fn stdin_is_forwarded() {
    let agent = Agent::start();
    let input: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
    let status = agent
        .client()
        .exec_with_input(&sh("cat"), &input, &mut stdout, &mut stderr)
        .unwrap();
    assert!(status.success());
    assert!(stdout == input, "stdin did not round-trip");
}

#[test]
fn killed_process_reports_its_signal() {
    let agent = Agent::start();
    let mut c = agent.client();
    let out = c.exec(&sh("kill -9 $$")).unwrap();
    assert_eq!((out.status.code, out.status.signal), (None, Some(9)));

    // Signal a running exec through the protocol; the connection stays usable afterwards.
    c.start_exec(&sh("echo started; exec sleep 30")).unwrap();
    assert_eq!(
        c.next_event().unwrap(),
        ExecEvent::Stdout(b"started\n".to_vec())
    );
    c.signal(15).unwrap();
    let status = loop {
        if let ExecEvent::Exit(status) = c.next_event().unwrap() {
            break status;
        }
    };
    assert_eq!(status.signal, Some(15));
    c.ping().unwrap();
}

#[test]
fn failed_spawn_is_an_error_and_the_connection_survives() {
    let agent = Agent::start();
    let mut c = agent.client();
    let req = ExecRequest {
        argv: vec!["/no/such/program".into()],
        ..Default::default()
    };
    assert!(matches!(c.exec(&req), Err(ClientError::Agent(_))));
    let empty = ExecRequest::default();
    assert!(matches!(c.exec(&empty), Err(ClientError::Agent(_))));
    let bad_env = ExecRequest {
        env: vec!["NOEQUALS".into()],
        ..sh("true")
    };
    assert!(matches!(c.exec(&bad_env), Err(ClientError::Agent(_))));
    c.ping().unwrap();
}

#[test]
fn orphans_are_reaped() {
    let agent = Agent::start();
    let out = agent
        .client()
        .exec(&sh("sleep 0.2 </dev/null >/dev/null 2>&1 & echo $!"))
        .unwrap();
    let pid: u32 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
    let stat = PathBuf::from(format!("/proc/{pid}/stat"));
    let deadline = Instant::now() + Duration::from_secs(10);
    // Gone entirely means reaped; a lingering "Z" state would mean a zombie.
    while stat.exists() {
        assert!(Instant::now() < deadline, "orphan {pid} was not reaped");
        thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn connections_are_served_concurrently() {
    let agent = Agent::start();
    let mut busy = agent.client();
    busy.start_exec(&sh("sleep 1")).unwrap();
    let started = Instant::now();
    agent.client().ping().unwrap();
    assert!(started.elapsed() < Duration::from_millis(900));
    assert!(matches!(busy.next_event().unwrap(), ExecEvent::Exit(s) if s.success()));
}

#[test]
fn second_exec_on_a_busy_connection_is_refused() {
    let agent = Agent::start();
    let mut c = agent.client();
    c.start_exec(&sh("sleep 0.3; echo first")).unwrap();
    c.start_exec(&sh("echo second")).unwrap();
    assert!(matches!(c.next_event(), Err(ClientError::Agent(m)) if m.contains("already")));
    assert_eq!(
        c.next_event().unwrap(),
        ExecEvent::Stdout(b"first\n".to_vec())
    );
    assert!(matches!(c.next_event().unwrap(), ExecEvent::Exit(s) if s.success()));
    // Input for an exec that has finished is dropped without a reply.
    c.send_stdin(b"late").unwrap();
    c.close_stdin().unwrap();
    c.ping().unwrap();
}

/// Reads one frame and checks that it is an `Error` reply.
fn expect_error(stream: &mut UnixStream) {
    match read_frame(stream).unwrap() {
        Frame::Response(Response::Error { message }) => assert!(!message.is_empty()),
        other => panic!("expected an Error reply, got {other:?}"),
    }
}

fn assert_closed(stream: &mut UnixStream) {
    let mut buf = [0u8; 16];
    assert_eq!(stream.read(&mut buf).unwrap(), 0, "connection left open");
}

fn ping(stream: &mut UnixStream) {
    stream
        .write_all(&Frame::Request(Request::Ping).encode())
        .unwrap();
    assert_eq!(read_frame(stream).unwrap(), Frame::Response(Response::Pong));
}

#[test]
fn recoverable_garbage_gets_errors_on_a_live_connection() {
    let agent = Agent::start();
    let mut s = agent.connect();
    let mut unknown_kind = encode_data(FrameKind::Stdout, b"x");
    unknown_kind[4] = 99;
    let frames = [
        encode_data(FrameKind::Request, b"{not json"),
        encode_data(FrameKind::Request, br#"{"type":"launch_missiles"}"#),
        encode_data(FrameKind::Request, b""),
        unknown_kind,
        Frame::Response(Response::Ok).encode(),
        Frame::Stdout(b"wrong direction".to_vec()).encode(),
    ];
    for frame in frames {
        s.write_all(&frame).unwrap();
        expect_error(&mut s);
    }
    ping(&mut s);
}

#[test]
fn untrustworthy_streams_get_an_error_and_are_closed() {
    let agent = Agent::start();
    let mut bad_magic = Frame::Request(Request::Ping).encode();
    bad_magic[..3].copy_from_slice(b"GET");
    let mut bad_version = Frame::Request(Request::Ping).encode();
    bad_version[3] = PROTOCOL_VERSION + 1;
    let oversized = Header::encode(FrameKind::Request, MAX_PAYLOAD + 1).to_vec();
    for bytes in [bad_magic, bad_version, oversized] {
        let mut s = agent.connect();
        s.write_all(&bytes).unwrap();
        expect_error(&mut s);
        assert_closed(&mut s);
    }
    ping(&mut agent.connect());
}

#[test]
fn truncated_frames_and_random_bytes_do_not_hurt_the_agent() {
    let agent = Agent::start();
    let whole = Frame::Request(Request::Exec(sh("true"))).encode();
    for cut in [1, 5, 9, whole.len() - 1] {
        let mut s = agent.connect();
        s.write_all(&whole[..cut]).unwrap();
        drop(s);
    }
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    for _ in 0..50 {
        let junk: Vec<u8> = (0..200)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                seed as u8
            })
            .collect();
        let mut s = agent.connect();
        s.write_all(&junk).unwrap();
        let _ = s.shutdown(std::net::Shutdown::Write);
        // Whatever the reply, the agent must answer or close, never hang or die.
        let mut sink = Vec::new();
        let _ = s.read_to_end(&mut sink);
    }
    let mut c = agent.client();
    c.ping().unwrap();
    assert_eq!(c.exec(&sh("exit 3")).unwrap().status.code, Some(3));
}

#[test]
fn poweroff_in_unix_mode_exits_the_agent() {
    let mut agent = Agent::start();
    agent.client().poweroff().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = agent.child.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "agent still running after poweroff"
        );
        thread::sleep(Duration::from_millis(10));
    };
    assert!(status.success());
    assert!(!agent.socket.exists(), "socket left behind");
}
