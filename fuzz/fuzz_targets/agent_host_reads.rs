//! The host reading what a guest agent sends: the first byte picks a client call, the rest is
//! the guest's side of the connection (frames, or anything else). Whatever the guest sends, the
//! client returns a value or an error; every frame it decodes also encodes back to itself.
#![no_main]

use std::io::{Cursor, Read, Write};

use husk_agent::client::Client;
use husk_agent::proto::{ExecRequest, Frame};

/// A connection whose reads are the fuzzer's bytes and whose writes go nowhere.
struct Guest<'a>(Cursor<&'a [u8]>);

impl Read for Guest<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.0.read(buf)
    }
}

impl Write for Guest<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Some((&call, stream)) = data.split_first() else {
        return;
    };
    let mut client = Client::new(Guest(Cursor::new(stream)));
    let req = ExecRequest {
        argv: vec!["true".into()],
        env: Vec::new(),
        cwd: None,
        stdin: call & 0x80 != 0,
    };
    let _ = match call % 8 {
        0 => client.ping().map(drop),
        1 => client.version().map(drop),
        2 => client.exec(&req).map(drop),
        3 => client.wait_container("c").map(drop),
        4 => client.list_processes("c").map(drop),
        5 => client.replies(4).map(drop),
        6 => client
            .exec_in_container("c", &serde_json::json!({"args": ["true"]}))
            .map(drop),
        _ => (0..8).try_for_each(|_| client.next_event().map(drop)),
    };
    // The same bytes as a buffer, the way a caller with its own buffering decodes them.
    let mut buf = stream;
    while let Ok(Some((frame, used))) = Frame::decode(buf) {
        roundtrip(&frame);
        buf = &buf[used..];
    }
});

fn roundtrip(frame: &Frame) {
    let bytes = frame.encode();
    let (again, used) = Frame::decode(&bytes).unwrap().unwrap();
    assert_eq!(used, bytes.len());
    assert_eq!(&again, frame);
}
