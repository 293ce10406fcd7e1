//! OCI hooks: the same bundle under runc and under Husk, and what the hooks (and the container)
//! observe compared. Every host hook appends "NAME CWD X=$X STATE" to the bundle's
//! `hooks.log`; the `startContainer` hook, which runs inside the container, writes the same
//! (with its uid) to `/start-container` in the rootfs, and the process copies that file to
//! `/process-saw` as it starts.
//!
//! Where runc 1.1 (the lab's) departs from the runtime spec, Husk follows the spec and the test
//! says so: runc runs `poststart` during `create` (status `created`), Husk during `start`
//! (status `running`), and a failing `startContainer` hook fails Husk's `start` where runc's
//! returns 0. Husk runs `createContainer` in the host's namespaces (the container's live in
//! the guest), so that hook's pid is the monitor's where runc's is 1.

use std::path::{Path, PathBuf};
use std::time::Duration;

use husk_lab_tests::{Oci, Runtime};
use serde_json::{json, Value};

const HOST_HOOKS: [&str; 5] = [
    "prestart",
    "createRuntime",
    "createContainer",
    "poststart",
    "poststop",
];

/// How a hook of the bundle behaves.
#[derive(Clone, Copy, PartialEq)]
enum Fault {
    None,
    /// This hook exits 3 after writing `err-NAME` on stderr.
    Fails(&'static str),
    /// This hook sleeps past its one-second timeout.
    Hangs(&'static str),
}

/// A bundle for `rt` whose every hook logs what it sees, as the module's comment says.
fn hooked_bundle(oci: &Oci, rt: &Runtime, case: &str, fault: Fault) -> PathBuf {
    // Long enough that `start` has its answer before the process ends (a start that loses
    // that race under the lab's load fails with "connection closed").
    let script = "cat /start-container > /process-saw 2>&1; sleep 4";
    let b = oci.bundle(&format!("{}-{case}", rt.name), &["sh", "-c", script]);
    let log = b.join("hooks.log");
    oci.edit(&b, |v| {
        v["root"]["readonly"] = false.into();
        v["process"]["cwd"] = "/tmp".into();
        v["process"]["env"]
            .as_array_mut()
            .unwrap()
            .push("X=process".into());
        v["annotations"] = json!({"org.example.hooks": "parity"});
        let mut hooks = json!({});
        for name in HOST_HOOKS {
            let line = format!("echo \"$0 $(pwd) X=$X $s\" >> {}", log.display());
            hooks[name] = json!([hook(name, &line, fault)]);
        }
        let line = "echo \"$0 $(id -u) $(pwd) X=$X $s\" > /start-container";
        hooks["startContainer"] = json!([hook("startContainer", line, fault)]);
        // `env` replaces the environment; without it a hook inherits the runtime's (and the
        // startContainer hook the process's).
        hooks["prestart"][0]["env"] = json!(["X=given"]);
        v["hooks"] = hooks;
    });
    b
}

/// One hook: `sh` that reads the state and runs `line` with NAME as `$0`: its argv[0] on the
/// host; in the container (busybox's sh, which goes by its argv[0]) its first argument.
fn hook(name: &str, line: &str, fault: Fault) -> Value {
    let end = match fault {
        Fault::Fails(n) if n == name => "echo out-$0; echo err-$0 >&2; exit 3",
        Fault::Hangs(n) if n == name => "exec sleep 60",
        _ => "true",
    };
    let script = format!("read -r s; {line}; {end}");
    let args = match name {
        "startContainer" => json!(["sh", "-c", script, name]),
        _ => json!([name, "-c", script]),
    };
    let mut h = json!({"path": "/bin/sh", "args": args});
    if matches!(fault, Fault::Hangs(n) if n == name) {
        h["timeout"] = 1.into();
    }
    h
}

/// One hook's observation, made comparable across runtimes and bundles: the bundle's path
/// becomes BUNDLE, a pid other than 1 becomes "PID".
#[derive(Debug, PartialEq, Clone)]
struct Seen {
    name: String,
    rest: String,
    state: Value,
}

fn parse_line(line: &str, bundle: &Path) -> Seen {
    let line = line.replace(bundle.to_str().unwrap(), "BUNDLE");
    let brace = line
        .find('{')
        .unwrap_or_else(|| panic!("no state in {line:?}"));
    let (head, state) = line.split_at(brace);
    let mut state: Value = serde_json::from_str(state).unwrap();
    if state.get("pid").is_some_and(|p| p != 1) {
        state["pid"] = "PID".into();
    }
    let (name, rest) = head.trim().split_once(' ').unwrap();
    Seen {
        name: name.to_string(),
        rest: rest.to_string(),
        state,
    }
}

/// What the host hooks logged so far, in order.
fn host_log(bundle: &Path) -> Vec<Seen> {
    let text = std::fs::read_to_string(bundle.join("hooks.log")).unwrap_or_default();
    text.lines().map(|l| parse_line(l, bundle)).collect()
}

fn names(seen: &[Seen]) -> Vec<String> {
    seen.iter().map(|s| s.name.clone()).collect()
}

/// What the startContainer hook wrote (and so saw), if it ran.
fn start_container_seen(bundle: &Path) -> Option<Seen> {
    let text = std::fs::read_to_string(bundle.join("rootfs/start-container")).ok()?;
    Some(parse_line(text.trim(), bundle))
}

fn create(rt: &Runtime, bundle: &Path, id: &str) -> husk_lab_tests::Out {
    rt.detached(&["create", "--bundle", bundle.to_str().unwrap(), id])
}

/// Nothing of container `id` is left: not listed, no state directory, and for Husk no cgroup
/// and no process (its monitor) working under the test's state root.
fn assert_nothing_left(rt: &Runtime, id: &str) {
    let listed = rt.ok(&["list", "-q"]).stdout;
    assert_eq!(listed.trim(), "", "{}: still listed", rt.name);
    assert!(
        !rt.root().join(id).exists(),
        "{}: state directory left",
        rt.name
    );
    if rt.name == "husk" {
        let cgroup = Path::new("/sys/fs/cgroup/husk").join(id);
        assert!(!cgroup.exists(), "cgroup {} left", cgroup.display());
        let left = processes_mentioning(&rt.root());
        assert!(left.is_empty(), "processes left: {left:?}");
    }
}

/// The command lines of the processes whose arguments name `path`.
fn processes_mentioning(path: &Path) -> Vec<String> {
    let needle = path.to_str().unwrap();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .filter(|c| c.contains(needle))
        .collect()
}

/// A whole lifecycle, create, start, the process's end, delete: every hook runs once, in the
/// spec's order, with the state, working directory, argv[0] and environment runc gives it;
/// startContainer runs inside the container (its root, its cwd, its user, the process's
/// environment, pid 1) before the process.
#[test]
fn hooks_run_in_order_and_see_what_runcs_see() {
    const ID: &str = "hooks-order";
    let oci = Oci::new();
    let mut logs = Vec::new();
    let mut inside = Vec::new();
    for rt in Runtime::both(&oci) {
        let b = hooked_bundle(&oci, &rt, "order", Fault::None);
        let out = create(&rt, &b, ID);
        assert_eq!(out.code, 0, "{} create: {}", rt.name, out.stderr);
        let after_create = names(&host_log(&b));
        rt.ok(&["start", ID]);
        let after_start = names(&host_log(&b));
        assert!(rt.stops_within(ID, Duration::from_secs(60)), "{}", rt.name);
        rt.ok(&["delete", ID]);
        let seen = host_log(&b);
        let create_hooks = ["prestart", "createRuntime", "createContainer"];
        match rt.name {
            // runc 1.1 runs poststart during create.
            "runc" => assert_eq!(after_create[..3], create_hooks, "runc"),
            _ => {
                assert_eq!(after_create, create_hooks, "husk after create");
                assert_eq!(after_start[3..], ["poststart"], "husk after start");
                let poststart = &seen[3];
                assert_eq!(poststart.state["status"], "running", "{poststart:?}");
            }
        }
        let started = start_container_seen(&b).expect("startContainer did not run");
        let saw = std::fs::read_to_string(b.join("rootfs/process-saw")).unwrap();
        let saw = parse_line(saw.trim(), &b);
        assert_eq!(
            saw, started,
            "{}: the process ran before startContainer",
            rt.name
        );
        logs.push(seen);
        inside.push(started);
    }
    let [runc, husk] = [&logs[0], &logs[1]];
    assert_eq!(names(runc), HOST_HOOKS, "runc's order");
    assert_eq!(names(husk), HOST_HOOKS, "husk's order");
    for (r, h) in runc.iter().zip(husk) {
        let (mut r, mut h) = (r.clone(), h.clone());
        if r.name == "poststart" {
            // runc's ran in `create`, in the bundle: see the module's comment.
            r.state["status"] = "running".into();
            r.rest = h.rest.clone();
        }
        if r.name == "createContainer" {
            // runc runs it in the container's pid namespace (pid 1); Husk on the host.
            r.state["pid"] = "PID".into();
            h.rest = r.rest.clone();
        }
        assert_eq!(h, r, "husk's {} hook saw otherwise than runc's", h.name);
    }
    assert_eq!(inside[1], inside[0], "startContainer saw otherwise");
    assert_eq!(inside[0].rest, "0 /tmp X=process", "{:?}", inside[0]);
}

/// A prestart, createRuntime or createContainer hook that fails (or outlives its timeout)
/// fails `create` with its output in the error; the container is destroyed, its poststop hook
/// runs, and nothing of it is left.
#[test]
fn a_failing_create_hook_fails_create_and_leaves_nothing() {
    const ID: &str = "hooks-create";
    let oci = Oci::new();
    let faults = [
        Fault::Fails("prestart"),
        Fault::Fails("createRuntime"),
        Fault::Fails("createContainer"),
        Fault::Hangs("createRuntime"),
    ];
    for (i, fault) in faults.into_iter().enumerate() {
        let mut sequences = Vec::new();
        for rt in Runtime::both(&oci) {
            let b = hooked_bundle(&oci, &rt, &format!("fail{i}"), fault);
            let out = create(&rt, &b, ID);
            assert_ne!(out.code, 0, "{} create succeeded", rt.name);
            let expected = match fault {
                Fault::Fails(name) => format!("err-{name}"),
                _ => "hook ran past specified timeout of 1.0s".into(),
            };
            assert!(
                out.stderr.contains(&expected),
                "{}: {}",
                rt.name,
                out.stderr
            );
            assert_nothing_left(&rt, ID);
            assert!(!b.join("rootfs/process-saw").exists(), "{}", rt.name);
            sequences.push(names(&host_log(&b)));
        }
        assert_eq!(sequences[1], sequences[0], "husk's hooks ran otherwise");
        assert_eq!(sequences[0].last().unwrap(), "poststop");
    }
}

/// A failing startContainer hook stops the container before its process runs, and delete
/// still runs poststop; a failing poststop hook is reported, yet delete succeeds and leaves
/// nothing. (runc's `start` returns 0 after a failed startContainer hook; Husk's fails, as
/// the spec says.)
#[test]
fn failing_start_container_and_poststop_hooks() {
    const ID: &str = "hooks-start";
    let oci = Oci::new();
    for (case, fault) in [
        ("start", Fault::Fails("startContainer")),
        ("poststop", Fault::Fails("poststop")),
    ] {
        for rt in Runtime::both(&oci) {
            let b = hooked_bundle(&oci, &rt, case, fault);
            let out = create(&rt, &b, ID);
            assert_eq!(out.code, 0, "{} create: {}", rt.name, out.stderr);
            let started = rt.captured(&["start", ID]);
            if rt.name == "husk" && case == "start" {
                assert_ne!(started.code, 0, "husk start succeeded");
                assert!(started.stderr.contains("err-startContainer"), "{started:?}");
            } else {
                assert_eq!(started.code, 0, "{} start: {}", rt.name, started.stderr);
            }
            assert!(rt.stops_within(ID, Duration::from_secs(60)), "{}", rt.name);
            let deleted = rt.captured(&["delete", ID]);
            assert_eq!(deleted.code, 0, "{} delete: {}", rt.name, deleted.stderr);
            if case == "poststop" {
                assert!(deleted.stderr.contains("err-poststop"), "{deleted:?}");
            } else {
                assert!(
                    !b.join("rootfs/process-saw").exists(),
                    "{}: it ran",
                    rt.name
                );
            }
            assert_eq!(names(&host_log(&b)).last().unwrap(), "poststop");
            assert_nothing_left(&rt, ID);
        }
    }
}

/// A failing poststart hook: Husk's `start` fails and the container is stopped (the spec's
/// rule); runc 1.1, which runs poststart in `create`, fails that instead. Either way the
/// container does not go on running, and delete runs poststop and leaves nothing.
#[test]
fn a_failing_poststart_hook_stops_the_container() {
    const ID: &str = "hooks-poststart";
    let oci = Oci::new();
    for rt in Runtime::both(&oci) {
        let b = hooked_bundle(&oci, &rt, "poststart", Fault::Fails("poststart"));
        let created = create(&rt, &b, ID);
        let failed = match rt.name {
            "runc" => created,
            _ => {
                assert_eq!(created.code, 0, "husk create: {}", created.stderr);
                rt.captured(&["start", ID])
            }
        };
        assert_ne!(failed.code, 0, "{} did not fail", rt.name);
        assert!(failed.stderr.contains("err-poststart"), "{failed:?}");
        if rt.name == "husk" {
            assert!(
                rt.stops_within(ID, Duration::from_secs(60)),
                "still running"
            );
            rt.ok(&["delete", ID]);
        }
        assert_eq!(names(&host_log(&b)).last().unwrap(), "poststop");
        assert_nothing_left(&rt, ID);
    }
}
