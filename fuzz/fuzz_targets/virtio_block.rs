//! See `husk_vmm::fuzzing::block` for what the bytes mean.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| husk_vmm::fuzzing::block(data));
