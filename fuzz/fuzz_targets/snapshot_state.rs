//! A snapshot's state file as `state_file::read` reads it. The first byte picks how the rest is
//! used: as the whole file, or (so the fuzzer gets past the checksum) as the body, behind a
//! valid header.
#![no_main]

use husk_vmm::snapshot::state_file;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let file = if mode & 1 == 0 {
        rest.to_vec()
    } else {
        let mut f = state_file::MAGIC.to_vec();
        f.extend_from_slice(&state_file::FORMAT_VERSION.to_le_bytes());
        f.extend_from_slice(&0u32.to_le_bytes());
        f.extend_from_slice(&(rest.len() as u64).to_le_bytes());
        f.extend_from_slice(&crc32fast::hash(rest).to_le_bytes());
        f.extend_from_slice(rest);
        f
    };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state");
    std::fs::write(&path, &file).unwrap();
    if let Ok((_, body)) = state_file::read(&path) {
        // What decodes encodes again.
        let again = state_file::encode(&body, 0).unwrap();
        let (_, bytes) = state_file::check(&path, &again).unwrap();
        state_file::decode(&path, bytes).unwrap();
    }
});
