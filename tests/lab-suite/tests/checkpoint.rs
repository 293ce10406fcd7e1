//! `husk checkpoint` writes a container's whole micro-VM to a directory; `husk restore` brings
//! it back in a new monitor and the container carries on where it was: its memory (a shell
//! variable), its tmpfs, and its files open on the 9p rootfs.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use husk_lab_tests::Oci;

/// A busybox container counting in a shell variable, writing each value to tmpfs (guest RAM)
/// and appending it to `/count.log` on its rootfs through a descriptor held open all along
/// (a 9p fid the restored VM must get back); created and started. Returns its bundle.
fn counter(oci: &Oci, id: &str) -> PathBuf {
    let script = "exec 3>>/count.log; i=0; \
                  while :; do i=$((i+1)); echo $i > /dev/shm/n; echo $i >&3; usleep 100000; done";
    let b = oci.bundle(id, &["sh", "-c", script]);
    oci.edit(&b, |v| v["root"]["readonly"] = false.into());
    oci.create(&b, id);
    let start = oci.husk(&["start", id]);
    assert_eq!(start.code, 0, "{}", start.stderr);
    b
}

/// The counter's current value.
fn count(oci: &Oci, id: &str) -> u64 {
    oci.number_in(id, "/dev/shm/n")
}

/// The last value the container appended to its rootfs file, read on the host.
fn logged(bundle: &Path) -> u64 {
    let text = std::fs::read_to_string(bundle.join("rootfs/count.log")).unwrap_or_default();
    text.lines()
        .last()
        .and_then(|l| l.parse().ok())
        .unwrap_or(0)
}

/// `husk restore --detach` of `image` as `id`; returns the pid in its pid file.
fn restore(oci: &Oci, image: &Path, bundle: &Path, id: &str) -> i32 {
    restore_with(oci, &[], image, bundle, id)
}

/// [`restore`] with the global flags `global` (`--log` …) before the command.
fn restore_with(oci: &Oci, global: &[&str], image: &Path, bundle: &Path, id: &str) -> i32 {
    let pid_file = oci.dir.path().join(format!("{id}.restored.pid"));
    let args = [
        "restore",
        "--image-path",
        image.to_str().unwrap(),
        "--work-path",
        bundle.to_str().unwrap(),
        "--bundle",
        bundle.to_str().unwrap(),
        "--detach",
        "--pid-file",
        pid_file.to_str().unwrap(),
        "--no-pivot",
        "--tcp-established",
        id,
    ];
    let out = oci.husk_detached(&[global, &args[..]].concat());
    assert_eq!(out.code, 0, "restore: {}", out.stderr);
    std::fs::read_to_string(&pid_file).unwrap().parse().unwrap()
}

/// `husk checkpoint --image-path <dir>/ID.image ARGS ID`, which must succeed; returns the
/// image directory.
fn checkpoint(oci: &Oci, id: &str, args: &[&str]) -> PathBuf {
    let image = oci.dir.path().join(format!("{id}.image"));
    let mut all = vec!["checkpoint", "--image-path", image.to_str().unwrap()];
    all.extend_from_slice(args);
    all.push(id);
    let out = oci.husk(&all);
    assert_eq!(out.code, 0, "checkpoint: {}", out.stderr);
    image
}

/// Waits until `f` holds, for up to a minute.
fn eventually(what: &str, f: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !f() {
        assert!(Instant::now() < deadline, "{what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn a_checkpointed_container_stops_and_its_restore_counts_on() {
    let oci = Oci::new();
    let bundle = counter(&oci, "c1");
    count(&oci, "c1");
    let work = bundle.to_str().unwrap();
    let flags = ["--work-path", work, "--tcp-established", "--file-locks"];
    let image = checkpoint(
        &oci,
        "c1",
        &[&flags[..], &["--manage-cgroups-mode", "soft"]].concat(),
    );
    assert_eq!(oci.status("c1"), "stopped");
    let at_checkpoint = logged(&bundle);
    assert!(at_checkpoint > 0, "the counter never logged");
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        logged(&bundle),
        at_checkpoint,
        "a stopped container still counts"
    );
    assert_eq!(oci.husk(&["delete", "c1"]).code, 0);

    let pid = restore(&oci, &image, &bundle, "c1");
    assert_eq!(oci.status("c1"), "running");
    let state = oci.husk(&["state", "c1"]);
    assert!(
        state.stdout.contains(&format!("\"pid\": {pid}")),
        "{}",
        state.stdout
    );
    // Memory: the shell's variable goes on from where it was, not from 1.
    let after = count(&oci, "c1");
    assert!(
        after >= at_checkpoint,
        "the count went back: {at_checkpoint} -> {after}"
    );
    // The rootfs file, open across the checkpoint, keeps growing on the host.
    eventually(
        "the restored container does not write its open file",
        || logged(&bundle) > after,
    );
    assert_eq!(oci.husk(&["delete", "--force", "c1"]).code, 0);
    assert!(!oci.root().join("c1").exists(), "state left behind");
    assert!(
        !Path::new("/sys/fs/cgroup/husk/c1").exists(),
        "cgroup left behind"
    );
}

#[test]
fn leave_running_keeps_the_original_and_a_restore_under_a_new_id_runs_beside_it() {
    let oci = Oci::new();
    let bundle = counter(&oci, "c2");
    count(&oci, "c2");
    let image = checkpoint(&oci, "c2", &["--leave-running"]);
    assert_eq!(oci.status("c2"), "running");
    let before = count(&oci, "c2");
    eventually("the original stopped counting", || {
        count(&oci, "c2") > before
    });

    restore(&oci, &image, &bundle, "c2-copy");
    assert_eq!(oci.status("c2-copy"), "running");
    let copy = count(&oci, "c2-copy");
    eventually("the copy does not count", || count(&oci, "c2-copy") > copy);
    assert_eq!(oci.status("c2"), "running");
    for id in ["c2", "c2-copy"] {
        assert_eq!(oci.husk(&["delete", "--force", id]).code, 0);
    }
}

/// `husk restore` of `image` as `id` (with `env` added), which must fail with one line
/// holding `expect` and leave no state directory and no cgroup.
fn refused(oci: &Oci, image: &Path, bundle: &Path, id: &str, env: &[(&str, &Path)], expect: &str) {
    let out = oci.husk_detached_env(
        &[
            "restore",
            "--image-path",
            image.to_str().unwrap(),
            "--bundle",
            bundle.to_str().unwrap(),
            "--detach",
            id,
        ],
        env,
    );
    assert_eq!(out.code, 1, "restored a checkpoint that is {expect}");
    assert!(
        out.stderr.contains(expect) && out.stderr.trim().lines().count() == 1,
        "{}",
        out.stderr
    );
    assert!(!oci.root().join(id).exists(), "state left behind");
    let cgroup = Path::new("/sys/fs/cgroup/husk").join(id);
    assert!(!cgroup.exists(), "cgroup left behind");
}

#[test]
fn a_damaged_checkpoint_is_refused_with_one_line_and_leaves_nothing() {
    let oci = Oci::new();
    let bundle = counter(&oci, "c3");
    count(&oci, "c3");
    let image = checkpoint(&oci, "c3", &["--leave-running"]);
    // Flip one byte in the middle of the page file.
    let pages = image.join("pages");
    let mut bytes = std::fs::read(&pages).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&pages, bytes).unwrap();
    refused(&oci, &image, &bundle, "c3-bad", &[], "damaged");
    let json = oci.husk(&[
        "--log-format",
        "json",
        "restore",
        "--image-path",
        "/nonexistent",
        "c3-none",
    ]);
    assert_eq!(json.code, 1);
    let line: serde_json::Value = serde_json::from_str(json.stderr.trim()).unwrap();
    assert_eq!(line["level"], "error", "{}", json.stderr);
    assert_eq!(oci.husk(&["delete", "--force", "c3"]).code, 0);
}

#[test]
fn a_foreign_or_truncated_checkpoint_is_refused_with_one_line_and_leaves_nothing() {
    use std::os::unix::fs::OpenOptionsExt;
    let oci = Oci::new();
    let bundle = counter(&oci, "c4");
    count(&oci, "c4");
    let image = checkpoint(&oci, "c4", &["--leave-running"]);
    // Another host's key: the image is whole, but this "host" did not make it.
    let key = oci.dir.path().join("foreign.key");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&key)
        .unwrap();
    let random = std::fs::read("/proc/sys/kernel/random/uuid").unwrap();
    std::io::Write::write_all(&mut f, &random[..32]).unwrap();
    drop(f);
    let env = [("HUSK_IMAGE_KEY", key.as_path())];
    refused(
        &oci,
        &image,
        &bundle,
        "c4-foreign",
        &env,
        "not made on this host",
    );
    // The page file cut in half, under this host's own key.
    let pages = std::fs::OpenOptions::new()
        .write(true)
        .open(image.join("pages"))
        .unwrap();
    let len = pages.metadata().unwrap().len();
    pages.set_len(len / 2).unwrap();
    refused(&oci, &image, &bundle, "c4-short", &[], "truncated");
    assert_eq!(oci.status("c4"), "running");
    assert_eq!(oci.husk(&["delete", "--force", "c4"]).code, 0);
}

/// A file the guest held open is gone from the bundle when the container is restored: the
/// restored VM's 9p device cannot reopen it and says so in the `--log` file, as a JSON entry
/// (`--log-format json`), and the container runs on. Warnings alone leave `state` silent.
#[test]
fn a_file_gone_before_restore_is_reported_by_the_9p_device_in_the_log_file() {
    let oci = Oci::new();
    let bundle = counter(&oci, "c5");
    count(&oci, "c5");
    let image = checkpoint(&oci, "c5", &[]);
    assert_eq!(oci.husk(&["delete", "c5"]).code, 0);
    std::fs::remove_file(bundle.join("rootfs/count.log")).unwrap();
    let log = oci.dir.path().join("c5-log.json");
    let global = ["--log", log.to_str().unwrap(), "--log-format", "json"];
    restore_with(&oci, &global, &image, &bundle, "c5");
    // A failure shows what the monitor logged: the log goes with the test's temp dir.
    let read_log = || std::fs::read_to_string(&log).unwrap_or_default();
    let count = || {
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| count(&oci, "c5")))
            .unwrap_or_else(|_| panic!("the monitor's log: {}", read_log()))
    };
    let before = count();
    eventually("the restored container does not count", || count() > before);
    let text = read_log();
    let entries: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l:?}")))
        .collect();
    assert!(
        entries.iter().any(|e| e["level"] == "warning"
            && e["time"].is_string()
            && e["msg"].as_str().is_some_and(|m| {
                m.starts_with("virtio-9p: cannot reopen fid") && m.contains("(/count.log)")
            })),
        "log: {text:?}"
    );
    assert!(!oci.root().join("c5/monitor.log").exists());
    let state = oci.husk(&["state", "c5"]);
    assert_eq!(state.code, 0, "{}", state.stderr);
    assert_eq!(state.stderr, "", "state spoke of errors: {text}");
    assert_eq!(oci.husk(&["delete", "--force", "c5"]).code, 0);
}
