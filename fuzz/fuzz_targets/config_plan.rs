//! An OCI bundle's config.json, as `Bundle::load` reads it and `GuestPlan::new` turns it into
//! the guest's shares and mounts. The bundle is a temp dir with an empty `rootfs`, a `data`
//! directory and a `hosts` file, so relative bind sources and the rootfs resolve inside it.
#![no_main]

use std::path::Path;

use husk_runtime::container::bundle::Bundle;
use husk_runtime::container::guest_plan::GuestPlan;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let dir = tempfile::tempdir().unwrap();
    let b = dir.path();
    std::fs::create_dir_all(b.join("rootfs/etc")).unwrap();
    std::fs::create_dir(b.join("data")).unwrap();
    std::fs::write(b.join("hosts"), "").unwrap();
    std::fs::write(b.join("config.json"), data).unwrap();
    let Ok(bundle) = Bundle::load(b) else {
        return;
    };
    let _ = bundle.vm_size();
    let Ok(plan) = GuestPlan::new(&bundle) else {
        return;
    };
    let _ = plan.slot_shares(8, Path::new("/nonexistent-placeholder"));
    let _ = plan.mount_request();
});
