//! Failed builds and finished runs leave no threads behind. One test per binary, so no other
//! test's threads come and go while we count.

use std::path::Path;

use husk_vmm::{Boot, CpuMode, Vm, VmConfig, VmExit};

fn threads() -> usize {
    std::fs::read_dir("/proc/self/task").unwrap().count()
}

#[test]
fn no_threads_survive_a_failed_build_or_a_finished_run() {
    assert!(
        Path::new("/dev/kvm").exists(),
        "/dev/kvm is missing: this test needs KVM"
    );
    let before = threads();
    let bad = VmConfig::new(Boot::Linux {
        kernel: "/nonexistent/vmlinux".into(),
        initramfs: None,
        cmdline: String::new(),
    });
    assert!(Vm::new(bad).is_err());
    assert_eq!(threads(), before);
    // Two vCPUs: vCPU 0 resets at once, vCPU 1 spins until it is kicked.
    let image = vec![
        0x85, 0xff, 0x75, 0x04, // test edi, edi; jnz +4
        0xb0, 0xfe, 0xe6, 0x64, // mov al, 0xfe; out 0x64, al
        0xeb, 0xfe, // jmp $
    ];
    let mut cfg = VmConfig::new(Boot::Raw {
        image,
        load_addr: 0x10_0000,
        entry: 0x10_0000,
        mode: CpuMode::Long,
    });
    cfg.vcpus = 2;
    assert_eq!(Vm::new(cfg).unwrap().run().unwrap(), VmExit::Reset);
    assert_eq!(threads(), before);
}
