//! A container init's stdio, kept by the agent rather than by the connection attached to it.
//!
//! The host attaches one connection (`AttachStdio`) that carries the init's output and its
//! final `Exit`. That connection can die while the container lives on: a VM restored from a
//! checkpoint gets a vsock transport reset, which closes every connection. The init's pipes
//! (or pty) therefore belong to the relay, which outlives connections: output waits while no
//! connection is attached (the init blocks on a full pipe, as it would on a slow reader) and
//! goes to whichever connection attaches next; `Exit` likewise. A later `AttachStdio` takes
//! the stream over from an earlier one, so a restored VM's new monitor gets it back.

use std::fs::File;
use std::io::{self, Read, Write};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;

use husk_agent::proto::{ExitStatus, FrameKind, Response, MAX_DATA_CHUNK};

use super::{ExitCell, Split, Stdio};
use crate::guest::host_conn::Sender;
use crate::guest::lock::lock;

/// The init's stdio and the connection it currently goes to.
pub struct Relay {
    attached: Mutex<Option<Sender>>,
    changed: Condvar,
    /// The init's stdin: the pipe, or the pty master; `None` once closed.
    stdin: Mutex<Option<File>>,
    /// The pty master with a terminal (for resizes and for EOF as ^D).
    pty: Option<File>,
}

impl Relay {
    /// Takes over `stdio` and starts forwarding it, and the exit status after it.
    pub fn start(stdio: Stdio, exit: Arc<ExitCell>) -> io::Result<Arc<Relay>> {
        let Split {
            outputs: [stdout, stderr],
            stdin,
            pty,
        } = stdio.split()?;
        let relay = Arc::new(Relay {
            attached: Mutex::new(None),
            changed: Condvar::new(),
            stdin: Mutex::new(Some(stdin)),
            pty,
        });
        let pumps = [(stdout, FrameKind::Stdout), (stderr, FrameKind::Stderr)]
            .into_iter()
            .filter_map(|(src, kind)| src.map(|s| relay.clone().pump(s, kind)))
            .collect::<io::Result<Vec<_>>>()?;
        let me = relay.clone();
        thread::Builder::new()
            .name("init-wait".into())
            .spawn(move || {
                pumps.into_iter().for_each(|p| {
                    let _ = p.join();
                });
                let status: ExitStatus = exit.wait();
                let frame = Response::Exit(status).into();
                me.deliver(|out| out.send(&frame));
            })?;
        Ok(relay)
    }

    /// Makes `out` the connection the stdio goes to (replacing any earlier one).
    pub fn attach(&self, out: Sender) {
        *lock(&self.attached) = Some(out);
        self.changed.notify_all();
    }

    /// The pty master, for resizes.
    pub fn pty(&self) -> Option<&File> {
        self.pty.as_ref()
    }

    pub fn write_stdin(&self, data: &[u8]) {
        let mut stdin = lock(&self.stdin);
        // Once the init stops reading, further input is dropped.
        if stdin.as_mut().is_some_and(|s| s.write_all(data).is_err()) {
            *stdin = None;
        }
    }

    /// Ends the init's input: closes the pipe, or on a terminal types EOF (^D).
    pub fn close_stdin(&self) {
        let mut stdin = lock(&self.stdin);
        match (&self.pty, stdin.as_mut()) {
            (Some(_), Some(master)) => {
                let _ = master.write_all(b"\x04");
            }
            _ => *stdin = None,
        }
    }

    /// Copies one output pipe into data frames on its own thread, until EOF.
    fn pump(self: Arc<Self>, mut src: File, kind: FrameKind) -> io::Result<thread::JoinHandle<()>> {
        thread::Builder::new()
            .name(format!("init-{kind:?}"))
            .spawn(move || {
                let mut buf = vec![0u8; MAX_DATA_CHUNK];
                loop {
                    match src.read(&mut buf) {
                        Ok(0) => return,
                        Ok(n) => self.deliver(|out| out.send_data(kind, &buf[..n])),
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(_) => return,
                    }
                }
            })
    }

    /// Sends with `send` on the attached connection, waiting for one while there is none; a
    /// connection that fails is detached and the send waits for the next.
    fn deliver(&self, send: impl Fn(&Sender) -> io::Result<()>) {
        loop {
            let out = {
                let guard = lock(&self.attached);
                let guard = self
                    .changed
                    .wait_while(guard, |a| a.is_none())
                    .unwrap_or_else(|p| p.into_inner());
                guard.clone().expect("waited for a connection")
            };
            if send(&out).is_ok() {
                return;
            }
            let mut attached = lock(&self.attached);
            if attached.as_ref().is_some_and(|a| a.same(&out)) {
                *attached = None;
            }
        }
    }
}
