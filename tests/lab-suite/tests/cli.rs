//! The `husk` command line's main job, end to end in the lab.

use std::process::Command;

use husk_lab_tests::{husk_bin, require_lab};

#[test]
fn husk_boot_reports_agent_ready_and_exits_0() {
    require_lab();
    for vcpus in ["1", "2"] {
        let out = Command::new(husk_bin())
            .args(["boot", "--vcpus", vcpus])
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "husk boot failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let line = stdout.lines().next().unwrap_or_default();
        let ms = line
            .strip_prefix("agent ready in ")
            .and_then(|r| r.strip_suffix(" ms"))
            .unwrap_or_else(|| panic!("unexpected output {stdout:?}"));
        assert!(ms.parse::<u64>().is_ok(), "{line}");
    }
}

#[test]
fn husk_boot_with_a_missing_kernel_fails_with_one_line() {
    let out = Command::new(husk_bin())
        .args(["boot", "--kernel", "/nonexistent/vmlinux"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("/nonexistent/vmlinux"), "{err}");
}
