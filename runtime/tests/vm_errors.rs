//! Bad input to the VMM (`husk vm`): one clear line, a non-zero exit, nothing left behind.
//! These run on the host's /dev/kvm: every case fails before a guest instruction runs.

use std::path::{Path, PathBuf};
use std::process::Command;

struct Case {
    dir: tempfile::TempDir,
}

impl Case {
    fn new() -> Case {
        assert!(
            Path::new("/dev/kvm").exists(),
            "/dev/kvm is missing: these tests need KVM on the host"
        );
        let dir = tempfile::tempdir().unwrap();
        // A file that is not a kernel, and an initramfs that is never read.
        std::fs::write(dir.path().join("garbage"), vec![0x5a; 64 << 10]).unwrap();
        std::fs::write(dir.path().join("initramfs"), b"").unwrap();
        Case { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Runs `husk vm` with a vsock socket in the case's directory plus `args`; returns stderr.
    fn fail(&self, args: &[&str]) -> String {
        let before = self.listing();
        let out = Command::new(env!("CARGO_BIN_EXE_husk"))
            .arg("vm")
            .arg("--vsock")
            .arg(self.path("vsock.sock"))
            .arg("--initramfs")
            .arg(self.path("initramfs"))
            .arg("--console")
            .arg(self.path("console.log"))
            .args(args)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(out.status.code(), Some(1), "stderr: {err}");
        assert_eq!(err.lines().count(), 1, "not one line: {err:?}");
        assert!(err.starts_with("husk: "), "{err:?}");
        let mut after = self.listing();
        after.retain(|f| f != "console.log");
        assert_eq!(after, before, "files left behind");
        err
    }

    fn listing(&self) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(self.dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }
}

#[test]
fn missing_kvm_device_is_named() {
    let c = Case::new();
    let kernel = c.path("garbage");
    let err = c.fail(&[
        "--kvm-device",
        "/nonexistent/kvm",
        "--kernel",
        kernel.to_str().unwrap(),
    ]);
    assert!(err.contains("/nonexistent/kvm"), "{err}");
}

#[test]
fn missing_kernel_is_named() {
    let c = Case::new();
    let err = c.fail(&["--kernel", "/nonexistent/vmlinux"]);
    assert!(err.contains("/nonexistent/vmlinux"), "{err}");
}

#[test]
fn corrupt_kernel_is_refused() {
    let c = Case::new();
    let kernel = c.path("garbage");
    let err = c.fail(&["--kernel", kernel.to_str().unwrap()]);
    assert!(err.contains("kernel"), "{err}");
}

#[test]
fn too_little_memory_is_refused() {
    let c = Case::new();
    let kernel = c.path("garbage");
    let err = c.fail(&["--memory", "8", "--kernel", kernel.to_str().unwrap()]);
    assert!(err.contains("memory"), "{err}");
}

#[test]
fn missing_disk_image_is_named() {
    let c = Case::new();
    let kernel = c.path("garbage");
    let err = c.fail(&[
        "--disk",
        "/nonexistent/disk.img",
        "--kernel",
        kernel.to_str().unwrap(),
    ]);
    assert!(err.contains("/nonexistent/disk.img"), "{err}");
}
