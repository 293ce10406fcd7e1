//! Behaviours where Husk must do what runc does: the same bundle under both runtimes, and
//! what the caller or the container observes compared.

use std::path::Path;
use std::time::Duration;

use husk_lab_tests::{ConsoleSocket, Oci, Out, Runtime};
use serde_json::json;

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

/// Prints, sorted, each mount of the container at `/` or `/m-*`: its mount point, the kind
/// of each propagation field (`shared`, `master`, `unbindable`; `private` when none) and, for
/// the tmpfs mounts `/m-t-*`, its per-mount options (a bind's come from the host's mount,
/// which a 9p share does not copy), then the content of each `/m-*/f`. Peer group numbers
/// differ between runtimes; `propagate_from` says only whether a master is visible.
const MOUNT_REPORT: &str = r#"
awk '$5 == "/" || $5 ~ /^\/m-/ {
  k = ""
  for (i = 7; $i != "-"; i++) { f = $i; sub(/:[0-9]+$/, "", f); if (f != "propagate_from") k = k " " f }
  print $5, (k == "" ? "private" : k), ($5 ~ /^\/m-t-/ ? $6 : "")
}' /proc/self/mountinfo | sort
for m in /m-*; do [ -f $m/f ] && echo "$m: $(cat $m/f)"; done
true"#;

/// A directory of the test's made a mount of its own, shared (as every directory is on a
/// host where systemd made `/` shared) or private; unmounted when dropped.
struct OwnMount(std::path::PathBuf);

impl OwnMount {
    fn new(dir: &Path, propagation: &str) -> OwnMount {
        std::fs::create_dir_all(dir).unwrap();
        let d = dir.to_str().unwrap();
        for args in [["--bind", d, d], [propagation, d, ""]] {
            let args = args.iter().filter(|a| !a.is_empty());
            let st = std::process::Command::new("mount").args(args).status();
            assert!(st.unwrap().success(), "mount {d}");
        }
        OwnMount(dir.to_path_buf())
    }
}

impl Drop for OwnMount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// Runs bundle `b` to its end under both runtimes and asserts they print the same.
fn same_output(oci: &Oci, b: &Path, what: &str) -> String {
    let [runc, husk] = Runtime::both(oci);
    let bundle = b.to_str().unwrap();
    let r = runc.ok(&["run", "--bundle", bundle, "same-r"]);
    let h = husk.ok(&["run", "--bundle", bundle, "same-h"]);
    assert_eq!(h.stdout, r.stdout, "{what}: husk and runc differ");
    r.stdout
}

/// Bind mounts with each propagation option, of a directory on a private mount and of one on
/// a shared mount, under each `linux.rootfsPropagation`: the container sees the same mounts,
/// contents and kinds of propagation as under runc. The rootfs is a mount of its own, as
/// podman's overlay is (runc makes the rootfs's mount private when shared, and with it any
/// source on that mount). A mount the host makes later under a shared source does not reach
/// a Husk container: 9p serves files, not mounts.
#[test]
fn mount_propagation_matches_runc() {
    let oci = Oci::new();
    let shared = OwnMount::new(&oci.dir.path().join("shared"), "--make-shared");
    let private = oci.dir.path().join("private");
    std::fs::create_dir_all(&private).unwrap();
    std::fs::write(private.join("f"), "in private").unwrap();
    std::fs::write(shared.0.join("f"), "in shared").unwrap();
    let b = oci.bundle("prop", &["sh", "-c", MOUNT_REPORT]);
    let _rootfs = OwnMount::new(&b.join("rootfs"), "--make-private");
    let kinds = [
        "",
        "shared",
        "rshared",
        "slave",
        "rslave",
        "private",
        "rprivate",
        "unbindable",
        "runbindable",
    ];
    oci.edit(&b, |v| {
        let mounts = v["mounts"].as_array_mut().unwrap();
        for (name, src) in [("p", &private), ("s", &shared.0)] {
            for kind in kinds {
                let mut options = vec!["rbind"];
                options.extend((!kind.is_empty()).then_some(kind));
                mounts.push(
                    json!({"destination": format!("/m-{name}-{kind}"), "type": "bind",
                    "source": src, "options": options}),
                );
            }
        }
    });
    for root in [
        None,
        Some("rslave"),
        Some("slave"),
        Some("rprivate"),
        Some("private"),
        Some("rshared"),
        Some("shared"),
        Some("unbindable"),
    ] {
        oci.edit(&b, |v| v["linux"]["rootfsPropagation"] = json!(root));
        let out = same_output(&oci, &b, &format!("rootfsPropagation {root:?}"));
        assert!(out.contains("/m-s-rshared: in shared"), "{out}");
        assert!(out.contains("/m-p-unbindable: in private"), "{out}");
    }
}

/// Every flag Husk accepts for compatibility but cannot honour fails, when given, with one
/// line saying it is not supported, before anything exists: no state, no monitor.
#[test]
fn unsupported_flags_fail_with_one_line_and_leave_nothing() {
    let oci = Oci::new();
    let b = oci.bundle("flags", &["true"]);
    let (bundle, image) = (b.to_str().unwrap(), oci.dir.path().join("image"));
    let image = image.to_str().unwrap();
    let checkpoint =
        |flag: &[&'static str]| [&["checkpoint", "--image-path", image], flag, &["c5"]].concat();
    let restore = |flag: &[&'static str]| {
        let head = ["restore", "--image-path", image, "--bundle", bundle];
        [&head, flag, &["c6"]].concat()
    };
    let cases: Vec<Vec<&str>> = vec![
        vec!["create", "--bundle", bundle, "--preserve-fds", "1", "c1"],
        vec!["run", "-d", "--bundle", bundle, "--preserve-fds", "2", "c2"],
        vec!["--systemd-cgroup", "run", "--bundle", bundle, "c3"],
        vec!["exec", "--preserve-fds", "1", "c4", "true"],
        vec![
            "exec",
            "--process-label",
            "system_u:system_r:t:s0",
            "c4",
            "true",
        ],
        vec!["exec", "--apparmor", "unconfined", "c4", "true"],
        vec!["exec", "--cgroup", "sub", "c4", "true"],
        checkpoint(&["--status-fd", "2"]),
        checkpoint(&["--page-server", "h:1"]),
        checkpoint(&["--lazy-pages"]),
        restore(&["--tcp-close"]),
        restore(&["--lsm-profile", "p"]),
        restore(&["--lazy-pages"]),
    ];
    for args in &cases {
        let out = oci.husk(args);
        let lines: Vec<_> = out.stderr.lines().collect();
        assert_eq!(out.code, 1, "{args:?}: {out:?}");
        assert!(
            lines.len() == 1 && lines[0].contains("is not supported"),
            "{args:?}: {}",
            out.stderr
        );
        let flag = args
            .iter()
            .find(|a| a.starts_with("--") && lines[0].contains(**a));
        assert!(
            flag.is_some(),
            "{args:?}: the line names no flag: {}",
            lines[0]
        );
        let left = std::fs::read_dir(oci.root())
            .map(|d| d.count())
            .unwrap_or(0);
        assert_eq!(left, 0, "{args:?} left state behind");
        assert!(!Path::new(image).exists(), "{args:?} wrote an image");
    }
    // The same flags at their defaults, as podman and conmon pass them, are accepted.
    let ok = oci.husk(&[
        "run",
        "--bundle",
        bundle,
        "--preserve-fds",
        "0",
        "--no-pivot",
        "c7",
    ]);
    assert_eq!(ok.code, 0, "{}", ok.stderr);
}

/// `husk features` has runc's shape, and every mount option it claims works in a container
/// as under runc: one mount per option (a tmpfs, or a bind for the bind and propagation
/// options), whose per-mount options and propagation the container reports.
#[test]
fn features_claim_only_mount_options_that_work() {
    let oci = Oci::new();
    let [runc, husk] = Runtime::both(&oci);
    let parse = |out: Out| -> serde_json::Value { serde_json::from_str(&out.stdout).unwrap() };
    let (r, h) = (parse(runc.ok(&["features"])), parse(husk.ok(&["features"])));
    for key in ["ociVersionMin", "ociVersionMax", "mountOptions", "linux"] {
        assert!(h.get(key).is_some() && r.get(key).is_some(), "{key}: {h}");
    }
    for key in [
        "namespaces",
        "capabilities",
        "cgroup",
        "seccomp",
        "apparmor",
        "selinux",
    ] {
        assert!(h["linux"].get(key).is_some(), "linux.{key}: {h}");
    }
    let options: Vec<&str> = h["mountOptions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o.as_str().unwrap())
        .collect();
    let vol = oci.dir.path().join("vol");
    std::fs::create_dir_all(&vol).unwrap();
    std::fs::write(vol.join("f"), "bound").unwrap();
    let b = oci.bundle("opts", &["sh", "-c", MOUNT_REPORT]);
    std::fs::create_dir_all(b.join("rootfs/m-t-tmpcopyup")).unwrap();
    std::fs::write(b.join("rootfs/m-t-tmpcopyup/f"), "copied up").unwrap();
    oci.edit(&b, |v| {
        let mounts = v["mounts"].as_array_mut().unwrap();
        for opt in &options {
            let binds = ["bind", "shared", "slave", "private"]
                .iter()
                .any(|k| opt.contains(k));
            let dest = format!("/m-{}-{opt}", if binds { "b" } else { "t" });
            let tmpfs = |options: &[&str]| {
                json!({"destination": dest, "type": "tmpfs", "source": "tmpfs", "options": options})
            };
            let m = match *opt {
                "bind" | "rbind" => {
                    json!({"destination": dest, "type": "bind", "source": &vol, "options": [opt]})
                }
                _ if binds => json!({"destination": dest, "type": "bind", "source": &vol,
                    "options": ["rbind", opt]}),
                // A remount changes the mount before it at the same place.
                "remount" => {
                    mounts.push(tmpfs(&[]));
                    tmpfs(&["remount", "ro"])
                }
                _ => tmpfs(&[opt]),
            };
            mounts.push(m);
        }
    });
    let out = same_output(&oci, &b, "one mount per claimed option");
    assert!(out.contains("/m-t-tmpcopyup: copied up"), "{out}");
    assert!(out.contains("/m-b-rshared: bound"), "{out}");
}
