//! Containers cloned from templates, in the lab: a clone runs commands and reports exit
//! codes, sibling clones do not share private state, a damaged template is rebuilt, and a
//! template with a running clone is not removed.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use husk_lab_tests::{husk_bin, Oci, Out};

/// The store the tests that do not damage or remove templates share (one build per run).
fn shared_store() -> PathBuf {
    std::env::temp_dir().join(format!("husk-templates-{}", std::process::id()))
}

/// A store of the test's own.
fn own_store(oci: &Oci) -> PathBuf {
    oci.dir.path().join("templates")
}

fn husk_cmd(oci: &Oci, store: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new(husk_bin());
    cmd.arg("--root")
        .arg(oci.root())
        .args(args)
        .env("HUSK_TEMPLATES", store)
        .env_remove("HUSK_NO_TEMPLATE")
        .stdin(Stdio::null());
    cmd
}

fn husk(oci: &Oci, store: &Path, args: &[&str]) -> Out {
    let out = husk_cmd(oci, store, args).output().expect("spawn husk");
    Out {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// `husk create`, whose monitor keeps stdio: output goes to files, only `create` is awaited.
fn create_detached(oci: &Oci, store: &Path, bundle: &Path, id: &str) -> Out {
    let out = oci.dir.path().join(format!("{id}.out"));
    let err = oci.dir.path().join(format!("{id}.err"));
    let status = husk_cmd(
        oci,
        store,
        &["create", "--bundle", bundle.to_str().unwrap(), id],
    )
    .stdout(std::fs::File::create(&out).unwrap())
    .stderr(std::fs::File::create(&err).unwrap())
    .status()
    .expect("spawn husk");
    Out {
        code: status.code().unwrap_or(-1),
        stdout: std::fs::read_to_string(&out).unwrap_or_default(),
        stderr: std::fs::read_to_string(&err).unwrap_or_default(),
    }
}

fn run(oci: &Oci, store: &Path, bundle: &Path, id: &str) -> Out {
    husk(
        oci,
        store,
        &["run", "--bundle", bundle.to_str().unwrap(), id],
    )
}

#[test]
fn a_clone_runs_commands_and_reports_exit_codes() {
    let oci = Oci::new();
    let store = shared_store();
    let b = oci.bundle("hi", &["echo", "hi"]);
    let out = run(&oci, &store, &b, "hi");
    assert_eq!(
        (out.code, out.stdout.as_str()),
        (0, "hi\n"),
        "{}",
        out.stderr
    );
    let b = oci.bundle("seven", &["sh", "-c", "exit 7"]);
    assert_eq!(run(&oci, &store, &b, "seven").code, 7);
    let list = husk(&oci, &store, &["template", "list"]);
    assert_eq!(list.code, 0, "{}", list.stderr);
    assert!(
        list.stdout.lines().any(|l| l.starts_with("default ")),
        "{}",
        list.stdout
    );
}

#[test]
fn sibling_clones_do_not_share_private_state() {
    let oci = Oci::new();
    let store = shared_store();
    // Warm the store first, so that both clones below run at the same time.
    let b = oci.bundle("warm", &["true"]);
    assert_eq!(run(&oci, &store, &b, "warm").code, 0);
    let script = "touch /dev/shm/$(hostname); sleep 2; ls /dev/shm; \
                  cat /proc/sys/kernel/random/boot_id /proc/sys/kernel/random/uuid; date +%s";
    let clones: Vec<_> = ["one", "two"]
        .iter()
        .map(|name| {
            let b = oci.bundle(name, &["sh", "-c", script]);
            oci.edit(&b, |v| {
                v["hostname"] = serde_json::json!(format!("host-{name}"))
            });
            let mut cmd = husk_cmd(
                &oci,
                &store,
                &["run", "--bundle", b.to_str().unwrap(), name],
            );
            cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
            cmd.spawn().expect("spawn husk")
        })
        .collect();
    let outs: Vec<_> = clones
        .into_iter()
        .map(|c| c.wait_with_output().expect("wait"))
        .collect();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let mut seen = Vec::new();
    for (name, out) in ["one", "two"].iter().zip(&outs) {
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{name}: {text} {err}");
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 4, "{name}: {text}");
        // Only its own file: the other clone's tmpfs is not visible.
        assert_eq!(lines[0], format!("host-{name}"), "{name}: {text}");
        // The guest's wall clock is the host's, not the template's.
        let guest_now: u64 = lines[3].parse().unwrap();
        assert!(
            now.abs_diff(guest_now) < 120,
            "{name}: guest clock {guest_now}, host {now}"
        );
        seen.push((lines[1].to_string(), lines[2].to_string()));
    }
    assert_ne!(seen[0].0, seen[1].0, "boot_id is shared");
    assert_ne!(seen[0].1, seen[1].1, "random uuids are shared");
}

#[test]
fn a_damaged_template_is_refused_and_rebuilt() {
    let oci = Oci::new();
    let store = own_store(&oci);
    let built = husk(&oci, &store, &["template", "build"]);
    assert_eq!(built.code, 0, "{}", built.stderr);
    let state = store.join("default/snapshot/state");
    let mut bytes = std::fs::read(&state).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x01;
    std::fs::write(&state, &bytes).unwrap();
    let b = oci.bundle("b", &["echo", "hi"]);
    let out = run(&oci, &store, &b, "rebuilt");
    assert_eq!(
        (out.code, out.stdout.as_str()),
        (0, "hi\n"),
        "{}",
        out.stderr
    );
    assert!(
        out.stderr.contains("template default is unusable") && out.stderr.contains("rebuilding"),
        "{}",
        out.stderr
    );
    assert_ne!(
        std::fs::read(&state).unwrap(),
        bytes,
        "the template was not rebuilt"
    );
}

#[test]
fn a_template_with_a_running_clone_is_not_removed() {
    let oci = Oci::new();
    let store = own_store(&oci);
    let b = oci.bundle("b", &["sleep", "1000"]);
    let created = create_detached(&oci, &store, &b, "sleeper");
    assert_eq!(created.code, 0, "{}", created.stderr);
    let list = husk(&oci, &store, &["template", "list"]);
    let line = list
        .stdout
        .lines()
        .find(|l| l.starts_with("default "))
        .unwrap_or("");
    assert!(
        line.split_whitespace().nth(3) == Some("1"),
        "{}",
        list.stdout
    );
    let rm = husk(&oci, &store, &["template", "rm", "default"]);
    assert_eq!(rm.code, 1);
    assert!(rm.stderr.contains("running clone"), "{}", rm.stderr);
    assert_eq!(rm.stderr.lines().count(), 1, "{}", rm.stderr);
    let deleted = husk(&oci, &store, &["delete", "--force", "sleeper"]);
    assert_eq!(deleted.code, 0, "{}", deleted.stderr);
    wait_for_no_clones(&oci, &store);
    let rm = husk(&oci, &store, &["template", "rm", "default"]);
    assert_eq!(rm.code, 0, "{}", rm.stderr);
    let list = husk(&oci, &store, &["template", "list"]);
    assert_eq!(list.stdout.lines().count(), 1, "{}", list.stdout);
}

/// `delete --force` kills the monitor; its lease goes with its pid.
fn wait_for_no_clones(oci: &Oci, store: &Path) {
    let deadline = Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let list = husk(oci, store, &["template", "list"]);
        let line = list
            .stdout
            .lines()
            .find(|l| l.starts_with("default "))
            .unwrap_or("");
        if line.split_whitespace().nth(3) == Some("0") {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "clone still listed: {}",
            list.stdout
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

/// Not a check: prints create+start+exit time of a clone and of a cold boot, same run.
#[test]
fn clone_and_cold_boot_times() {
    let oci = Oci::new();
    let store = shared_store();
    let b = oci.bundle("t", &["true"]);
    assert_eq!(run(&oci, &store, &b, "t-warm").code, 0);
    let time = |args: &[&str], id: &str| {
        let mut all = args.to_vec();
        all.extend(["--bundle", b.to_str().unwrap(), id]);
        let start = Instant::now();
        let out = husk(&oci, &store, &all);
        assert_eq!(out.code, 0, "{}", out.stderr);
        start.elapsed()
    };
    let clone = time(&["run"], "t-clone");
    let cold = time(&["run", "--no-template"], "t-cold");
    eprintln!(
        "husk run true: clone {:.0} ms, cold boot {:.0} ms, clone/cold {:.2}",
        clone.as_secs_f64() * 1e3,
        cold.as_secs_f64() * 1e3,
        clone.as_secs_f64() / cold.as_secs_f64()
    );
}
