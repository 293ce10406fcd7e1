//! The guest agent reading what the host sends, frame after frame, the way its server loop
//! does: it goes on after a recoverable error and stops at a fatal one. Every frame it decodes
//! encodes back to itself.
#![no_main]

use husk_agent::proto::{read_frame, Frame};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let mut stream = data;
    loop {
        match read_frame(&mut stream) {
            Ok(frame) => {
                let bytes = frame.encode();
                let (again, used) = Frame::decode(&bytes).unwrap().unwrap();
                assert_eq!(used, bytes.len());
                assert_eq!(again, frame);
            }
            Err(e) if e.is_fatal() => break,
            Err(_) => {}
        }
    }
});
