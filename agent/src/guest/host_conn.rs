//! What the request handlers share about one host connection: `Sender`, its write half, and
//! `Running`, the pid of the exec it runs.

use std::fs::File;
use std::io::{self, Write};
use std::sync::{Arc, Mutex};

use husk_agent::proto::{encode_data, Frame, FrameKind};

use super::lock::lock;

/// The pid of the connection's running exec, `None` when idle. Cleared just before `Exit` is
/// sent, so a client that reacts to `Exit` with a new `Exec` never finds it still set.
pub type Running = Arc<Mutex<Option<i32>>>;

/// The write half of a connection, shared by the request loop and the exec output threads;
/// the lock keeps each frame contiguous.
#[derive(Clone)]
pub struct Sender(Arc<Mutex<File>>);

impl Sender {
    pub fn new(conn: File) -> Self {
        Self(Arc::new(Mutex::new(conn)))
    }

    /// Whether both are the same connection.
    pub fn same(&self, other: &Sender) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }

    pub fn send(&self, frame: &Frame) -> io::Result<()> {
        self.write(&frame.encode())
    }

    pub fn send_data(&self, kind: FrameKind, data: &[u8]) -> io::Result<()> {
        self.write(&encode_data(kind, data))
    }

    fn write(&self, bytes: &[u8]) -> io::Result<()> {
        lock(&self.0).write_all(bytes)
    }
}
