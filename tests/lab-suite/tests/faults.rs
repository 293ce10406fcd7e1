//! Faults that must lose nothing: a monitor killed while its container is created, running,
//! paused (in RAM or paged out) or checkpointing, a `create` killed midway, a guest that dies,
//! a damaged state file or template, a full page directory or template store. After each, `husk state` tells the
//! truth (runc's: a container whose monitor is gone is stopped), `delete` removes everything
//! the container held (state directory, monitor, cgroup, page file, template lease), the id
//! works again, and what the container wrote to its volume before the fault is still there.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use husk_lab_tests::{husk_bin, Oci};
use serde_json::json;

/// What the container writes to its volume before the fault.
const KEPT: &str = "written before the fault";

/// A test's containers: each has the same volume, a host directory bound read-write at
/// `/vol`, and a pause configuration of the test's own.
struct Faults {
    oci: Oci,
    volume: PathBuf,
    config: PathBuf,
    page_dir: PathBuf,
}

impl Faults {
    /// `page_out_after_ms`: 0 pages a paused guest out before `pause` returns, -1 never.
    fn new(page_out_after_ms: i64) -> Faults {
        let mut oci = Oci::new();
        let volume = oci.dir.path().join("volume");
        let page_dir = oci.dir.path().join("pages");
        let config = oci.dir.path().join("config.toml");
        std::fs::create_dir_all(&volume).unwrap();
        let toml = format!(
            "[pause]\npage_out_after_ms = {page_out_after_ms}\npage_dir = \"{}\"\n",
            page_dir.display()
        );
        std::fs::write(&config, toml).unwrap();
        oci.set_env("HUSK_CONFIG", &config);
        Faults {
            oci,
            volume,
            config,
            page_dir,
        }
    }

    /// A busybox bundle running `sh -c script`, with the volume at `/vol`.
    fn bundle(&self, name: &str, script: &str) -> PathBuf {
        let b = self.oci.bundle(name, &["sh", "-c", script]);
        let volume = &self.volume;
        self.oci.edit(&b, |v| {
            let vol = json!({"destination": "/vol", "type": "bind", "source": volume,
                "options": ["rbind", "rw"]});
            v["mounts"].as_array_mut().unwrap().push(vol);
        });
        b
    }

    /// `husk create` (with this test's pause configuration) as a child, not waited for.
    fn spawn_create(&self, bundle: &Path, id: &str) -> Child {
        Command::new(husk_bin())
            .arg("--root")
            .arg(self.oci.root())
            .args(["create", "--bundle", bundle.to_str().unwrap()])
            .arg("--pid-file")
            .arg(self.oci.dir.path().join(format!("{id}.pid")))
            .arg(id)
            .env("HUSK_CONFIG", &self.config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn husk create")
    }

    /// Creates container `id` and returns its monitor's pid.
    fn create(&self, bundle: &Path, id: &str) -> i32 {
        self.oci.create(bundle, id)
    }

    /// Creates and starts container `id`, which writes [`KEPT`] to its volume and sleeps;
    /// returns its monitor's pid once the data is on the host.
    fn writer(&self, id: &str) -> i32 {
        let script = format!("printf '{KEPT}' > /vol/data; exec sleep 1000");
        let b = self.bundle(id, &script);
        let pid = self.create(&b, id);
        self.husk_ok(&["start", id]);
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.volume_data() != KEPT {
            assert!(
                Instant::now() < deadline,
                "the container never wrote its data"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        pid
    }

    /// What the volume's data file holds (empty if there is none).
    fn volume_data(&self) -> String {
        std::fs::read_to_string(self.volume.join("data")).unwrap_or_default()
    }

    fn husk_ok(&self, args: &[&str]) -> String {
        let out = self.oci.husk(args);
        assert_eq!(out.code, 0, "husk {args:?}: {}", out.stderr);
        out.stdout
    }

    /// `husk state ID` as JSON.
    fn state(&self, id: &str) -> serde_json::Value {
        let out = self.oci.husk(&["state", id]);
        assert_eq!(out.code, 0, "state {id}: {}", out.stderr);
        serde_json::from_str(&out.stdout).unwrap()
    }

    /// Asserts that `husk state` says `id` is stopped, with no pid, as runc says of a
    /// container whose process is gone.
    fn assert_stopped(&self, id: &str) {
        let st = self.state(id);
        assert_eq!(
            (st["status"].as_str(), st["pid"].as_i64()),
            (Some("stopped"), Some(0)),
            "{st}"
        );
    }

    /// The page file a monitor `pid` of container `id` pages out to.
    fn page_file(&self, id: &str, pid: i32) -> PathBuf {
        self.page_dir.join(format!("{id}-{pid}.pages"))
    }

    /// Asserts that nothing of container `id` (whose monitor was `pid`) is left: its state
    /// directory, any process running husk on this test's root, its cgroup, its page file
    /// and its template lease.
    fn assert_nothing_left(&self, id: &str, pid: Option<i32>) {
        let dir = self.oci.root().join(id);
        assert!(!dir.exists(), "state directory left: {}", dir.display());
        let procs = processes_mentioning(&self.oci.root());
        assert!(procs.is_empty(), "processes left: {procs:?}");
        let cgroup = Path::new("/sys/fs/cgroup/husk").join(id);
        assert!(!cgroup.exists(), "cgroup left: {}", cgroup.display());
        let Some(pid) = pid else { return };
        let page_file = self.page_file(id, pid);
        assert!(
            !page_file.exists(),
            "page file left: {}",
            page_file.display()
        );
        let lease = lease_file(pid);
        assert!(!lease.exists(), "template lease left: {}", lease.display());
    }

    /// A new container with the same id runs, and finds the volume's data (`expected`).
    fn assert_id_works_again(&self, id: &str, expected: &str) {
        let b = self.bundle(&format!("{id}-again"), "echo \"[$(cat /vol/data)]\"");
        let out = self
            .oci
            .husk_detached(&["run", "--bundle", b.to_str().unwrap(), id]);
        assert_eq!(out.code, 0, "run {id} again: {}", out.stderr);
        assert_eq!(out.stdout, format!("[{expected}]\n"), "{}", out.stderr);
        assert!(!self.oci.root().join(id).exists(), "run left its container");
    }
}

/// The template lease a clone monitor `pid` holds on the default template.
fn lease_file(pid: i32) -> PathBuf {
    let store = std::env::var_os("HUSK_TEMPLATES")
        .map_or_else(|| PathBuf::from("/var/lib/husk/templates"), PathBuf::from);
    store.join(".clones/default").join(pid.to_string())
}

/// Live (not zombie) processes whose command line mentions `root`: a forked monitor keeps
/// `create`'s command line, so this finds monitors as well as husk commands.
fn processes_mentioning(root: &Path) -> Vec<(i32, String)> {
    let needle = root.to_str().unwrap();
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.contains(needle) && alive(pid) {
            found.push((pid, cmdline));
        }
    }
    found
}

/// Whether `pid` runs (exists and is not a zombie).
fn alive(pid: i32) -> bool {
    husk_runtime::container::process_start_time(pid).is_some()
}

/// SIGKILL to `pid`, and waits until it is gone (a zombie counts: nothing reaps it here).
fn kill9(pid: i32) {
    // SAFETY: kill(2) of a process this test started.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let deadline = Instant::now() + Duration::from_secs(30);
    while alive(pid) {
        assert!(Instant::now() < deadline, "{pid} survived SIGKILL");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The children of `pid`.
fn children(pid: i32) -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_string_lossy().parse::<i32>().ok())
        .filter(|p| {
            let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).unwrap_or_default();
            let fields: Vec<&str> = stat.rsplit(')').next().unwrap_or("").split(' ').collect();
            fields.get(2).and_then(|f| f.parse::<i32>().ok()) == Some(pid)
        })
        .collect()
}

/// Waits up to a minute for `ready`, polling every 5 ms.
fn wait_for(what: &str, mut ready: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !ready() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Where a monitor is killed.
#[derive(Clone, Copy, PartialEq)]
enum Stage {
    Created,
    Running,
    Paused,
}

/// Kills the monitor of a container at `stage`, then checks state, delete, the id and the
/// volume. `page_out_after_ms` as in [`Faults::new`].
fn monitor_killed(id: &str, stage: Stage, page_out_after_ms: i64) {
    let f = Faults::new(page_out_after_ms);
    let (pid, kept) = match stage {
        Stage::Created => {
            let b = f.bundle(id, "exec sleep 1000");
            (f.create(&b, id), "")
        }
        _ => (f.writer(id), KEPT),
    };
    if stage == Stage::Paused {
        f.husk_ok(&["pause", id]);
        assert_eq!(f.state(id)["status"], "paused");
        let paged_out = f.page_file(id, pid).exists();
        assert_eq!(
            paged_out,
            page_out_after_ms == 0,
            "page file present: {paged_out}"
        );
    }
    assert!(lease_file(pid).exists(), "the clone holds no lease");
    kill9(pid);
    f.assert_stopped(id);
    let delete = f.oci.husk(&["delete", id]);
    assert_eq!(delete.code, 0, "{}", delete.stderr);
    f.assert_nothing_left(id, Some(pid));
    assert_eq!(f.volume_data(), kept);
    f.assert_id_works_again(id, kept);
}

#[test]
fn a_monitor_killed_while_created_loses_nothing() {
    monitor_killed("k-created", Stage::Created, 0);
}

#[test]
fn a_monitor_killed_while_running_loses_nothing() {
    monitor_killed("k-running", Stage::Running, 0);
}

#[test]
fn a_monitor_killed_while_paused_in_ram_loses_nothing() {
    monitor_killed("k-paused-ram", Stage::Paused, -1);
}

#[test]
fn a_monitor_killed_while_paged_out_loses_nothing() {
    monitor_killed("k-paged-out", Stage::Paused, 0);
}

/// The monitor killed while it writes a checkpoint: `checkpoint` fails naming the monitor's
/// end, the half-written image is refused by `restore` (its manifest, written last, is
/// missing) without leaving a container behind, and the rest is as for any killed monitor.
#[test]
fn a_monitor_killed_mid_checkpoint_loses_nothing() {
    let f = Faults::new(-1);
    let id = "k-checkpoint";
    let pid = f.writer(id);
    let image = f.oci.dir.path().join("image");
    let checkpoint = Command::new(husk_bin())
        .arg("--root")
        .arg(f.oci.root())
        .args(["checkpoint", "--image-path", image.to_str().unwrap(), id])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn husk checkpoint");
    // The monitor makes the image directory first and writes the manifest last.
    wait_for("the checkpoint to begin", || image.exists());
    kill9(pid);
    let out = checkpoint.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("checkpoint failed"),
        "checkpoint {}: {stderr}",
        out.status
    );
    assert!(
        !image.join("manifest.json").exists(),
        "the checkpoint finished before its monitor was killed"
    );
    f.assert_stopped(id);
    let restore = f.oci.husk(&[
        "restore",
        "--detach",
        "--image-path",
        image.to_str().unwrap(),
        "from-half-image",
    ]);
    assert!(
        restore.code != 0 && restore.stderr.lines().count() == 1,
        "restore of a half-written image: {}",
        restore.stderr
    );
    assert!(!f.oci.root().join("from-half-image").exists());
    let delete = f.oci.husk(&["delete", id]);
    assert_eq!(delete.code, 0, "{}", delete.stderr);
    f.assert_nothing_left(id, Some(pid));
    assert_eq!(f.volume_data(), KEPT);
    f.assert_id_works_again(id, KEPT);
}

/// Starts `husk create` of a sleeping container `id` and kills it with SIGKILL once `when`
/// holds of its pid. Returns the monitors that run on (none if `create` had not started one).
fn kill_create_when(f: &Faults, id: &str, when: impl Fn(i32) -> bool) -> Vec<i32> {
    let b = f.bundle(id, "exec sleep 1000");
    let mut create = f.spawn_create(&b, id);
    let pid = create.id() as i32;
    wait_for("the moment to kill create", || when(pid));
    kill9(pid);
    let _ = create.wait();
    processes_mentioning(&f.oci.root())
        .into_iter()
        .map(|(pid, _)| pid)
        .collect()
}

/// `create` killed as soon as its state directory appears, before any monitor runs (or
/// just as one starts): `state` says the container is stopped (or still being created by a
/// monitor that carries on), `delete --force` removes it all, and the id works again.
#[test]
fn a_create_killed_once_it_claimed_the_id_leaves_nothing_after_delete() {
    let f = Faults::new(0);
    let id = "c-claimed";
    let dir = f.oci.root().join(id);
    let monitors = kill_create_when(&f, id, |_| dir.exists());
    let st = f.state(id);
    let status = st["status"].as_str().unwrap_or("");
    eprintln!("after create was killed: monitors {monitors:?}, state {st}");
    match monitors.as_slice() {
        [] => assert_eq!(status, "stopped", "{st}"),
        [_] => assert!(["creating", "created"].contains(&status), "{st}"),
        more => panic!("more than one monitor: {more:?}"),
    }
    let delete = f.oci.husk(&["delete", "--force", id]);
    assert_eq!(delete.code, 0, "{}", delete.stderr);
    f.assert_nothing_left(id, monitors.first().copied());
    f.assert_id_works_again(id, "");
}

/// `create` killed once its monitor runs: the monitor carries on (the container is being
/// created, then created), and `delete --force` kills it and removes everything.
#[test]
fn a_create_killed_after_starting_its_monitor_leaves_nothing_after_delete() {
    let f = Faults::new(0);
    let id = "c-monitor";
    let monitors = kill_create_when(&f, id, |pid| !children(pid).is_empty());
    let [monitor] = monitors[..] else {
        panic!("monitors after create was killed: {monitors:?}");
    };
    let st = f.state(id);
    eprintln!("after create was killed: state {st}");
    let status = st["status"].as_str().unwrap_or("");
    assert!(["creating", "created"].contains(&status), "{st}");
    let delete = f.oci.husk(&["delete", "--force", id]);
    assert_eq!(delete.code, 0, "{}", delete.stderr);
    assert!(!alive(monitor), "delete left the monitor running");
    f.assert_nothing_left(id, Some(monitor));
    f.assert_id_works_again(id, "");
}

/// `create` and its monitor both killed while the container is being created: it is
/// stopped, and a plain `delete` removes what the monitor had made.
#[test]
fn a_create_killed_with_its_monitor_midway_leaves_nothing_after_delete() {
    let f = Faults::new(0);
    let id = "c-both";
    let started = std::cell::Cell::new(0);
    let monitors = kill_create_when(&f, id, |pid| {
        let kids = children(pid);
        started.set(kids.first().copied().unwrap_or(0));
        // Far enough for the monitor to have joined its cgroup and taken its lease.
        !kids.is_empty() && Path::new("/sys/fs/cgroup/husk").join(id).exists()
    });
    for pid in monitors {
        kill9(pid);
    }
    let monitor = started.get();
    f.assert_stopped(id);
    let delete = f.oci.husk(&["delete", id]);
    assert_eq!(delete.code, 0, "{}", delete.stderr);
    f.assert_nothing_left(id, Some(monitor));
    f.assert_id_works_again(id, "");
}

/// The guest dies under its running container: the container writes its data, then has the
/// guest kernel act on `sysrq` (the spec lets it write `/proc/sysrq-trigger`). The container
/// is soon stopped, and `delete` removes everything.
fn guest_dies(id: &str, sysrq: char) {
    let f = Faults::new(0);
    let script = format!(
        "printf '{KEPT}' > /vol/data; sleep 1; echo {sysrq} > /proc/sysrq-trigger; exec sleep 1000"
    );
    let b = f.bundle(id, &script);
    f.oci.edit(&b, |v| {
        let ro = v["linux"]["readonlyPaths"].as_array_mut().unwrap();
        ro.retain(|p| p != "/proc/sysrq-trigger");
    });
    let pid = f.create(&b, id);
    f.husk_ok(&["start", id]);
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let status = f.state(id)["status"].as_str().unwrap_or("").to_string();
        if status == "stopped" {
            break;
        }
        if Instant::now() > deadline {
            let console = std::fs::read_to_string(f.oci.root().join(id).join("console.log"))
                .unwrap_or_default();
            let tail: Vec<&str> = console.lines().rev().take(20).collect();
            panic!(
                "{id} still {status} 90 s after sysrq {sysrq}; console tail (newest first):\n{}",
                tail.join("\n")
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    f.assert_stopped(id);
    assert_eq!(f.volume_data(), KEPT);
    let delete = f.oci.husk(&["delete", id]);
    assert_eq!(delete.code, 0, "{}", delete.stderr);
    eprintln!("delete's stderr: {}", delete.stderr);
    f.assert_nothing_left(id, Some(pid));
    f.assert_id_works_again(id, KEPT);
}

#[test]
fn a_guest_kernel_panic_stops_the_container_and_loses_nothing() {
    guest_dies("g-panic", 'c');
}

#[test]
fn a_guest_powering_off_stops_the_container_and_loses_nothing() {
    guest_dies("g-poweroff", 'o');
}

#[test]
fn a_guest_rebooting_stops_the_container_and_loses_nothing() {
    guest_dies("g-reboot", 'b');
}

/// The state file of a container damaged by `damage`, with the container running or (with
/// `paged_out`) paused and paged out: `state` fails with one line naming the file, a plain
/// `delete` refuses, and `delete --force` still stops the monitor and removes everything.
fn state_file_damaged(id: &str, paged_out: bool, damage: impl Fn(&Path)) {
    let f = Faults::new(0);
    let pid = f.writer(id);
    if paged_out {
        f.husk_ok(&["pause", id]);
        assert!(f.page_file(id, pid).exists(), "not paged out");
    }
    let file = f.oci.root().join(id).join("state.json");
    damage(&file);
    let state = f.oci.husk(&["state", id]);
    assert_eq!(state.code, 1, "{}", state.stdout);
    assert!(
        state.stderr.contains(file.to_str().unwrap())
            && state.stderr.contains("damaged")
            && state.stderr.lines().count() == 1,
        "{}",
        state.stderr
    );
    assert_eq!(
        f.oci.husk(&["delete", id]).code,
        1,
        "deleted without --force"
    );
    let delete = f.oci.husk(&["delete", "--force", id]);
    assert_eq!(delete.code, 0, "{}", delete.stderr);
    eprintln!(
        "state's stderr: {}delete's stderr: {}",
        state.stderr, delete.stderr
    );
    f.assert_nothing_left(id, Some(pid));
    assert_eq!(f.volume_data(), KEPT);
    f.assert_id_works_again(id, KEPT);
}

#[test]
fn a_truncated_state_file_is_named_and_delete_force_cleans_up() {
    state_file_damaged("s-truncated", true, |file| {
        let len = std::fs::metadata(file).unwrap().len();
        let f = std::fs::OpenOptions::new().write(true).open(file).unwrap();
        f.set_len(len / 2).unwrap();
    });
}

#[test]
fn a_garbled_state_file_is_named_and_delete_force_cleans_up() {
    state_file_damaged("s-garbled", false, |file| {
        std::fs::write(file, b"\0\x01 not json").unwrap();
    });
}

/// A tmpfs of `size` mounted on `dir` until dropped.
struct SmallTmpfs(PathBuf);

impl SmallTmpfs {
    fn mount(dir: &Path, size: &str) -> SmallTmpfs {
        std::fs::create_dir_all(dir).unwrap();
        let opts = format!("size={size}");
        let st = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &opts, "tmpfs"])
            .arg(dir)
            .status()
            .unwrap();
        assert!(st.success(), "mounting a tmpfs on {}", dir.display());
        SmallTmpfs(dir.to_path_buf())
    }
}

impl Drop for SmallTmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// The page directory too small for the page file: `pause` succeeds with a warning that
/// says why the memory stays in RAM, nothing is left in the directory, and `resume` brings
/// the container back counting on from where it was.
#[test]
fn a_full_page_directory_leaves_the_paused_container_in_ram() {
    let f = Faults::new(0);
    let _tmpfs = SmallTmpfs::mount(&f.page_dir, "64k");
    let id = "full-pages";
    let script = format!(
        "printf '{KEPT}' > /vol/data; i=0; while :; do i=$((i+1)); echo $i > /dev/shm/n; usleep 100000; done"
    );
    let b = f.bundle(id, &script);
    let pid = f.create(&b, id);
    f.husk_ok(&["start", id]);
    let before = f.oci.number_in(id, "/dev/shm/n");
    let pause = f.oci.husk(&["pause", id]);
    eprintln!("pause's stderr: {}", pause.stderr);
    assert_eq!(pause.code, 0, "{}", pause.stderr);
    assert!(
        pause.stderr.contains("level=warning")
            && pause.stderr.contains("memory stays in RAM")
            && pause.stderr.contains("No space left on device")
            && pause.stderr.lines().count() == 1,
        "{}",
        pause.stderr
    );
    assert_eq!(f.state(id)["status"], "paused");
    let left: Vec<_> = std::fs::read_dir(&f.page_dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    assert!(left.is_empty(), "left in the page directory: {left:?}");
    f.husk_ok(&["resume", id]);
    assert_eq!(f.state(id)["status"], "running");
    let after = f.oci.number_in(id, "/dev/shm/n");
    assert!(after >= before, "the count went back: {before} -> {after}");
    std::thread::sleep(Duration::from_secs(2));
    let later = f.oci.number_in(id, "/dev/shm/n");
    assert!(
        later > after,
        "the counter stopped after resume: {after} -> {later}"
    );
    f.husk_ok(&["delete", "--force", id]);
    f.assert_nothing_left(id, Some(pid));
    assert_eq!(f.volume_data(), KEPT);
}

/// What a template store holds besides templates: leftovers of builds and replacements.
fn store_leftovers(store: &Path) -> Vec<String> {
    std::fs::read_dir(store)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".build-") || n.starts_with(".old-"))
        .collect()
}

/// Damages a file of the template.
type Damage<'a> = Box<dyn Fn() + 'a>;

/// The default template damaged in ways its checks catch (a truncated memory file, a
/// garbled manifest): the next container says so in one warning, runs on a rebuilt template,
/// and nothing of the damaged one or of the build is left behind.
#[test]
fn a_damaged_template_is_named_rebuilt_and_leaves_nothing() {
    let mut f = Faults::new(0);
    let store = f.oci.dir.path().join("templates");
    f.oci.set_env("HUSK_TEMPLATES", &store);
    let b = f.bundle("t", &format!("printf '{KEPT}' > /vol/data; echo ran"));
    let out = f.oci.husk(&["run", "--bundle", b.to_str().unwrap(), "t"]);
    assert_eq!(
        (out.code, out.stdout.as_str()),
        (0, "ran\n"),
        "{}",
        out.stderr
    );
    let memory = store.join("default/snapshot/memory");
    let manifest = store.join("default/manifest.json");
    let damages: [(&str, Damage); 2] = [
        (
            "memory",
            Box::new(|| {
                let len = std::fs::metadata(&memory).unwrap().len();
                let file = std::fs::OpenOptions::new()
                    .write(true)
                    .open(&memory)
                    .unwrap();
                file.set_len(len / 2).unwrap();
            }),
        ),
        (
            "manifest",
            Box::new(|| std::fs::write(&manifest, b"{\"name\": 3").unwrap()),
        ),
    ];
    for (what, damage) in damages {
        damage();
        let out = f.oci.husk(&["run", "--bundle", b.to_str().unwrap(), "t"]);
        eprintln!("after damaging the {what}: {}", out.stderr);
        assert_eq!(
            (out.code, out.stdout.as_str()),
            (0, "ran\n"),
            "{}",
            out.stderr
        );
        let warnings: Vec<&str> = out
            .stderr
            .lines()
            .filter(|l| l.contains("warning"))
            .collect();
        assert!(
            warnings.len() == 1 && warnings[0].contains("rebuilding"),
            "{what}: {}",
            out.stderr
        );
        assert!(
            store_leftovers(&store).is_empty(),
            "{:?}",
            store_leftovers(&store)
        );
        let leases = std::fs::read_dir(store.join(".clones/default")).map_or(0, |d| d.count());
        assert_eq!(leases, 0, "leases left after {what}");
        assert_eq!(f.volume_data(), KEPT);
    }
}

/// The disk full while the default template is built (its store on a tmpfs too small for a
/// snapshot): `run` fails with one line naming the cause, the half-built template and the
/// container are gone, and once there is room the same id runs and builds the template.
#[test]
fn a_full_disk_during_a_template_build_fails_clearly_and_leaves_nothing() {
    let mut f = Faults::new(0);
    let store = f.oci.dir.path().join("small-store");
    let tmpfs = SmallTmpfs::mount(&store, "4m");
    f.oci.set_env("HUSK_TEMPLATES", &store);
    let id = "disk-full";
    let b = f.bundle(id, &format!("printf '{KEPT}' > /vol/data; echo ran"));
    let out = f.oci.husk(&["run", "--bundle", b.to_str().unwrap(), id]);
    eprintln!("run with a full template store: {}", out.stderr);
    assert!(
        out.code != 0 && out.stderr.contains("No space left on device"),
        "exit {}: {}",
        out.code,
        out.stderr
    );
    let errors: Vec<&str> = out
        .stderr
        .lines()
        .filter(|l| l.contains("level=error"))
        .collect();
    assert_eq!(errors.len(), 1, "{}", out.stderr);
    assert!(
        store_leftovers(&store).is_empty(),
        "{:?}",
        store_leftovers(&store)
    );
    assert!(!store.join("default").exists(), "a half-built template");
    f.assert_nothing_left(id, None);
    assert_eq!(f.volume_data(), "");
    drop(tmpfs);
    f.assert_id_works_again(id, "");
    assert!(
        store.join("default").is_dir(),
        "no template after the second run"
    );
}
