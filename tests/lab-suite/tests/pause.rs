//! Pause pages a container's guest memory out to a page file and gives the RAM back; resume
//! brings it back lazily and the container carries on where it was.

use std::path::{Path, PathBuf};
use std::sync::Once;
use std::time::{Duration, Instant};

use husk_lab_tests::Oci;

/// Page files of these tests go here (see `config`).
const PAGE_DIR: &str = "/tmp/husk-pause-tests/pages";

/// Points every husk command of this binary at a configuration that pages out at once.
fn config() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let dir = Path::new("/tmp/husk-pause-tests");
        std::fs::create_dir_all(dir).unwrap();
        let file = dir.join("config.toml");
        std::fs::write(
            &file,
            format!(
                "[pause]\npage_out_after_ms = 0\nresume = \"lazy\"\npage_dir = \"{PAGE_DIR}\"\n"
            ),
        )
        .unwrap();
        // Set once, before any command runs; every test of this binary wants the same value.
        std::env::set_var("HUSK_CONFIG", file);
    });
}

/// A busybox container counting in a shell variable and writing each value to tmpfs (guest
/// RAM), created and started; returns the monitor's pid.
fn counter(oci: &Oci, id: &str) -> i32 {
    counter_booted(oci, id, false)
}

/// Like `counter`; `cold` boots the VM instead of cloning the template (its RAM then maps
/// the kernel and initramfs files instead of the template's memory file).
fn counter_booted(oci: &Oci, id: &str, cold: bool) -> i32 {
    config();
    let script = "i=0; while :; do i=$((i+1)); echo $i > /dev/shm/n; usleep 100000; done";
    let b = oci.bundle(id, &["sh", "-c", script]);
    if cold {
        oci.edit(&b, |v| v["annotations"]["io.husk.template"] = "none".into());
    }
    let pid = oci.create(&b, id);
    let start = oci.husk(&["start", id]);
    assert_eq!(start.code, 0, "{}", start.stderr);
    pid
}

/// Waits up to a minute for container `id` to be stopped; fails with `what` if it is not.
fn wait_stopped(oci: &Oci, id: &str, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while oci.status(id) != "stopped" {
        assert!(Instant::now() < deadline, "{what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A counter that has counted, then paused (and so paged out); returns the monitor's pid.
fn paused_counter(oci: &Oci, id: &str) -> i32 {
    let pid = counter(oci, id);
    count(oci, id);
    assert_eq!(oci.husk(&["pause", id]).code, 0);
    pid
}

/// The counter's current value.
fn count(oci: &Oci, id: &str) -> u64 {
    oci.number_in(id, "/dev/shm/n")
}

/// A field of /proc/PID/smaps_rollup, in KiB.
fn rollup(pid: i32, field: &str) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no {field} in smaps_rollup"))
}

/// The page file of container `id` (named `<id>-<monitor pid>.pages`).
fn page_file(id: &str, pid: i32) -> PathBuf {
    Path::new(PAGE_DIR).join(format!("{id}-{pid}.pages"))
}

#[test]
fn a_paused_container_gives_its_memory_back_and_resumes_counting() {
    pause_and_resume("p1", false);
}

#[test]
fn a_cold_booted_container_pauses_and_resumes_too() {
    pause_and_resume("p5", true);
}

fn pause_and_resume(id: &str, cold: bool) {
    let oci = Oci::new();
    let pid = counter_booted(&oci, id, cold);
    let before = count(&oci, id);
    // Every page the guest dirtied is private to the monitor; a page-out releases them.
    let dirty = rollup(pid, "Private_Dirty");
    let pause = oci.husk(&["pause", id]);
    assert_eq!(pause.code, 0, "{}", pause.stderr);
    assert_eq!(oci.status(id), "paused");
    assert!(page_file(id, pid).exists(), "no page file after pause");
    let paused_dirty = rollup(pid, "Private_Dirty");
    eprintln!("monitor Private_Dirty: running {dirty} KiB, paused {paused_dirty} KiB");
    assert!(
        paused_dirty < dirty / 2,
        "pause released too little: {dirty} KiB -> {paused_dirty} KiB"
    );
    let resume = oci.husk(&["resume", id]);
    assert_eq!(resume.code, 0, "{}", resume.stderr);
    assert_eq!(oci.status(id), "running");
    let after = count(&oci, id);
    assert!(after >= before, "the count went back: {before} -> {after}");
    // And it keeps counting.
    std::thread::sleep(Duration::from_secs(2));
    let later = count(&oci, id);
    assert!(
        later > after,
        "the counter stopped after resume: {after} -> {later}"
    );
    assert_eq!(oci.husk(&["delete", "--force", id]).code, 0);
    assert!(!page_file(id, pid).exists(), "page file left behind");
}

#[test]
fn a_truncated_page_file_is_refused_and_the_container_stays_paused() {
    let oci = Oci::new();
    let pid = paused_counter(&oci, "p2");
    let file = page_file("p2", pid);
    let len = std::fs::metadata(&file).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&file)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    let resume = oci.husk(&["resume", "p2"]);
    assert_eq!(resume.code, 1, "resumed on a truncated page file");
    assert!(
        resume.stderr.contains("page file") && resume.stderr.lines().count() == 1,
        "{}",
        resume.stderr
    );
    assert_eq!(oci.status("p2"), "paused");
    assert_eq!(oci.husk(&["delete", "--force", "p2"]).code, 0);
    assert!(!file.exists(), "page file left behind");
}

#[test]
fn a_monitor_killed_while_paused_is_cleaned_up_by_delete() {
    let oci = Oci::new();
    let pid = counter(&oci, "p3");
    assert_eq!(oci.husk(&["pause", "p3"]).code, 0);
    let file = page_file("p3", pid);
    assert!(file.exists());
    // SAFETY: kill(2) of the monitor this test started.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    wait_stopped(&oci, "p3", "a dead monitor still counts as alive");
    let delete = oci.husk(&["delete", "p3"]);
    assert_eq!(delete.code, 0, "{}", delete.stderr);
    assert!(!file.exists(), "page file left behind");
    assert!(!oci.root().join("p3").exists(), "state left behind");
    assert!(
        !Path::new("/sys/fs/cgroup/husk/p3").exists(),
        "cgroup left behind"
    );
}

/// Overwrites every block of a page file (everything between the header and the index) with
/// one byte value, keeping its size, header, index and trailer: the file opens, and every
/// block then fails its checksum when a fault reads it.
fn damage_blocks(file: &Path) {
    use std::os::unix::fs::FileExt;
    const HEADER_LEN: u64 = 20;
    const TRAILER_LEN: u64 = 32;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(file)
        .unwrap();
    let len = f.metadata().unwrap().len();
    let mut trailer = [0u8; TRAILER_LEN as usize];
    f.read_exact_at(&mut trailer, len - TRAILER_LEN).unwrap();
    // The trailer: magic (8), index offset (8), index length (8), two checksums.
    let index_at = u64::from_le_bytes(trailer[8..16].try_into().unwrap());
    assert!(index_at > HEADER_LEN, "a page file without blocks");
    let junk = vec![0x5au8; (index_at - HEADER_LEN) as usize];
    f.write_all_at(&junk, HEADER_LEN).unwrap();
}

/// A page file damaged while paused: the lazy page-in refuses the first bad block and stops
/// the VM. The monitor's log (in the state directory: no `--log` here) says why, `state`
/// points to it in one stderr line beside its unchanged JSON, and `delete` hands the error
/// lines on before the state directory goes.
#[test]
fn a_damaged_page_is_logged_and_state_and_delete_point_to_the_log() {
    let oci = Oci::new();
    let pid = paused_counter(&oci, "p4");
    damage_blocks(&page_file("p4", pid));
    let resume = oci.husk(&["resume", "p4"]);
    assert_eq!(resume.code, 0, "{}", resume.stderr);
    wait_stopped(&oci, "p4", "a VM on damaged memory still runs");
    let log = oci.root().join("p4/monitor.log");
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        text.lines().any(|l| l.starts_with("time=\"")
            && l.contains(" level=error msg=\"lazy page-in stopped the VM: ")),
        "monitor log: {text:?}"
    );

    let state = oci.husk(&["state", "p4"]);
    assert_eq!(state.code, 0, "{}", state.stderr);
    let json: serde_json::Value = serde_json::from_str(&state.stdout).unwrap();
    assert_eq!(json["status"], "stopped");
    assert_eq!(state.stderr.lines().count(), 1, "{}", state.stderr);
    assert!(
        state.stderr.contains("level=warning") && state.stderr.contains(log.to_str().unwrap()),
        "{}",
        state.stderr
    );

    let delete = oci.husk(&["delete", "p4"]);
    assert_eq!(delete.code, 0, "{}", delete.stderr);
    eprintln!(
        "state's stderr: {}delete's stderr: {}",
        state.stderr, delete.stderr
    );
    assert!(
        delete
            .stderr
            .lines()
            .any(|l| l.contains("level=error msg=\"lazy page-in stopped the VM: ")),
        "{}",
        delete.stderr
    );
    assert!(!oci.root().join("p4").exists(), "state left behind");
}
