//! A checkpoint image's manifest as a restore reads it (`ImageManifest::read`, then
//! `read_checked`, which checks each file the manifest names inside the image directory).
#![no_main]

use husk_runtime::checkpoint_image::ImageManifest;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("manifest.json"), data).unwrap();
    std::fs::write(dir.path().join("pages"), b"pages").unwrap();
    if ImageManifest::read(dir.path()).is_ok() {
        let _ = ImageManifest::read_checked(dir.path());
    }
});
