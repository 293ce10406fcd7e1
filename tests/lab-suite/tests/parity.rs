//! Behaviours where Husk must do what runc does: the same bundle under both runtimes, and
//! what the caller or the container observes compared.

use std::path::Path;
use std::time::{Duration, Instant};

use husk_lab_tests::{ConsoleSocket, Oci, Out};
use serde_json::json;

/// A runtime under test, `runc` or `husk`, with its state under the test's directory.
struct Runtime<'a> {
    name: &'static str,
    oci: &'a Oci,
}

impl Runtime<'_> {
    fn both(oci: &Oci) -> [Runtime<'_>; 2] {
        [Runtime { name: "runc", oci }, Runtime { name: "husk", oci }]
    }

    /// Runs a command and reads its output to EOF, as `out=$(...)` does.
    fn captured(&self, args: &[&str]) -> Out {
        match self.name {
            "runc" => self.oci.runc(args),
            _ => self.oci.husk(args),
        }
    }

    /// Runs a command that leaves a container holding a copy of its stdio: output to files,
    /// the command alone awaited.
    fn detached(&self, args: &[&str]) -> Out {
        match self.name {
            "runc" => self.oci.runc_detached(args),
            _ => self.oci.husk_detached(args),
        }
    }

    /// Runs a command that must succeed, reading its output to EOF.
    fn ok(&self, args: &[&str]) -> Out {
        let out = self.captured(args);
        assert_eq!(out.code, 0, "{} {args:?}: {}", self.name, out.stderr);
        out
    }

    fn ok_detached(&self, args: &[&str]) {
        let out = self.detached(args);
        assert_eq!(out.code, 0, "{} {args:?}: {}", self.name, out.stderr);
    }

    fn status(&self, id: &str) -> String {
        let out = self.ok(&["state", id]);
        let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
        v["status"].as_str().unwrap_or_default().to_string()
    }

    /// Waits until container `id` is stopped; false if it still runs after `limit`.
    fn stops_within(&self, id: &str, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        while self.status(id) != "stopped" {
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        true
    }
}

/// With a terminal, every command that leaves a container behind returns with its stdout and
/// stderr closed: a caller that captures them (`out=$(husk create …)`) gets them back at once
/// instead of when the container exits. (`Oci::husk` and `Oci::runc` read the output to EOF
/// and fail when it stays open after the command exited.)
#[test]
fn a_terminal_container_leaves_the_callers_stdio_alone() {
    let oci = Oci::new();
    let console = ConsoleSocket::bind(&oci.dir.path().join("console.sock"));
    let b = oci.bundle("tty", &["sleep", "300"]);
    oci.edit(&b, |v| v["process"]["terminal"] = true.into());
    let (bundle, sock) = (b.to_str().unwrap(), console.path());
    let mut masters = 0;
    for rt in Runtime::both(&oci) {
        let created = format!("{}-created", rt.name);
        let running = format!("{}-running", rt.name);
        for args in [
            [
                "create",
                "--bundle",
                bundle,
                "--console-socket",
                sock,
                &created,
            ]
            .as_slice(),
            &[
                "run",
                "-d",
                "--bundle",
                bundle,
                "--console-socket",
                sock,
                &running,
            ],
            &[
                "exec",
                "-d",
                "--tty",
                "--console-socket",
                sock,
                &running,
                "sleep",
                "300",
            ],
        ] {
            rt.ok(args);
            masters += 1;
            console.wait_for(masters);
        }
        assert_eq!(rt.status(&created), "created", "{}", rt.name);
        assert_eq!(rt.status(&running), "running", "{}", rt.name);
    }
    // Husk's restore alone: runc's needs CRIU, which the lab's emulated CPU does not serve.
    let image = oci.dir.path().join("image");
    let [_, husk] = Runtime::both(&oci);
    husk.ok(&[
        "checkpoint",
        "--image-path",
        image.to_str().unwrap(),
        "husk-running",
    ]);
    let image = image.to_str().unwrap();
    husk.ok(&[
        "restore",
        "-d",
        "--image-path",
        image,
        "--bundle",
        bundle,
        "--console-socket",
        sock,
        "husk-restored",
    ]);
    console.wait_for(masters + 1);
    assert_eq!(husk.status("husk-restored"), "running");
}

/// A signal sent as soon as `start` has returned reaches the process's own handler: the
/// shell's trap runs (it leaves a file on the rootfs) and interrupts its `wait`, so the
/// container stops long before its sleep would end. Under runc this holds because `start`
/// returns once the process has exec'd, and the shell is through its first lines (trap set,
/// waiting) before `kill` can reach it; Husk's agent holds such an early signal until then.
#[test]
fn a_signal_right_after_start_reaches_the_processs_handler() {
    let oci = Oci::new();
    for sig in ["TERM", "USR1", "USR2"] {
        let script = format!("trap 'touch /{sig}' {sig}; sleep 60 & wait $!");
        for rt in Runtime::both(&oci) {
            let id = format!("{}-{sig}", rt.name);
            let b = oci.bundle(&id, &["sh", "-c", &script]);
            oci.edit(&b, |v| v["root"]["readonly"] = false.into());
            rt.ok_detached(&["create", "--bundle", b.to_str().unwrap(), &id]);
            rt.ok(&["start", &id]);
            rt.ok(&["kill", &id, sig]);
            let stopped = rt.stops_within(&id, Duration::from_secs(40));
            let trapped = Path::new(&b).join("rootfs").join(sig).exists();
            assert!(
                stopped && trapped,
                "{id}: stopped early {stopped}, trap ran {trapped}"
            );
            rt.ok(&["delete", &id]);
        }
    }
}

/// A capability name the runtime does not know (a newer kernel's) and a syscall name the
/// guest kernel does not have are skipped, with runc's warning for the capability; the rest of
/// the spec applies, and the container sees the same as under runc.
#[test]
fn unknown_capability_and_syscall_names_are_skipped() {
    const FUTURE_CAP: &str = "CAP_FROM_A_NEWER_KERNEL";
    let oci = Oci::new();
    let script = "grep -E '^Cap(Prm|Eff|Bnd|Amb)' /proc/self/status; \
                  mkdir /dev/shm/d 2>/dev/null && echo mkdir allowed || echo mkdir refused";
    let b = oci.bundle("names", &["sh", "-c", script]);
    oci.edit(&b, |v| {
        for set in ["bounding", "effective", "permitted", "ambient"] {
            let list = v["process"]["capabilities"][set].as_array_mut().unwrap();
            list.push(json!(FUTURE_CAP));
        }
        v["linux"]["seccomp"] = json!({
            "defaultAction": "SCMP_ACT_ALLOW",
            "architectures": ["SCMP_ARCH_X86_64"],
            "syscalls": [{
                "names": ["a_syscall_from_a_newer_kernel", "mkdir", "mkdirat"],
                "action": "SCMP_ACT_ERRNO"
            }]
        });
    });
    let bundle = b.to_str().unwrap();
    let [runc, husk] = Runtime::both(&oci);
    let r = runc.ok(&["run", "--bundle", bundle, "names-r"]);
    let h = husk.ok(&["run", "--bundle", bundle, "names-h"]);
    assert!(r.stdout.contains("mkdir refused"), "{}", r.stdout);
    assert_eq!(h.stdout, r.stdout, "husk and runc differ");
    for (name, out) in [("runc", &r), ("husk", &h)] {
        let warned = out
            .stderr
            .lines()
            .any(|l| l.contains("level=warning") && l.contains(FUTURE_CAP));
        assert!(warned, "{name} did not warn: {}", out.stderr);
    }
}
