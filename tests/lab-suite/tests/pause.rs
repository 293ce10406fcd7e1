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
    let pid = counter(&oci, "p2");
    count(&oci, "p2");
    assert_eq!(oci.husk(&["pause", "p2"]).code, 0);
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
    let deadline = Instant::now() + Duration::from_secs(30);
    while oci.status("p3") != "stopped" {
        assert!(
            Instant::now() < deadline,
            "a dead monitor still counts as alive"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let delete = oci.husk(&["delete", "p3"]);
    assert_eq!(delete.code, 0, "{}", delete.stderr);
    assert!(!file.exists(), "page file left behind");
    assert!(!oci.root().join("p3").exists(), "state left behind");
    assert!(
        !Path::new("/sys/fs/cgroup/husk/p3").exists(),
        "cgroup left behind"
    );
}
