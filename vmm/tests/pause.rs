//! Paging a paused VM's memory out and back in, on the host's real /dev/kvm, with the marked
//! counting guest: it fills part of its RAM with a pattern whose every page carries its own
//! address, then counts in memory. After a page-out the process's RSS has dropped by about the
//! fill; after a lazy or eager page-in every byte is back and the count goes on from where it
//! stopped. Damaged page files are refused, or stop the VM, with one line naming the file.
//!
//! The tests run one at a time (a lock): each measures this process's RSS.

use std::fs;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use husk_vmm::pagefile::{on_disk, PageFile};
use husk_vmm::snapshot::{AfterSnapshot, RestoreOverrides, SnapshotPaths};
use husk_vmm::testing::guests::{
    self, Running, COUNTER, FILLED, FILL_QWORDS, FILL_START, LOAD, TOUCHED, TOUCH_REQUEST,
};
use husk_vmm::{PageInMode, PageState, Vm, VmError};

static SERIAL: Mutex<()> = Mutex::new(());
const MIB: u64 = 1 << 20;
/// MiB the guest fills.
const FILL_MIB: u64 = 64;

fn scratch_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("husk-pause-{}-{name}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    dir
}

/// Starts the marked counting guest, lets it fill `FILL_MIB` MiB and count, and pauses it.
fn filled_guest() -> Running {
    assert!(Path::new("/dev/kvm").exists(), "these tests need /dev/kvm");
    let mut cfg = guests::long_mode_config(guests::marked_counting_guest());
    cfg.memory_mib = (FILL_START / MIB + FILL_MIB + 16) as u32;
    let vm = Vm::new(cfg).unwrap();
    guests::write_u64(vm.memory(), FILL_QWORDS, FILL_MIB * MIB / 8);
    let vm = Running::start(vm);
    vm.wait_for("the fill", guests::COUNT_LIMIT * 4, |m| {
        guests::read_u32(m, FILLED) == 1
    })
    .unwrap();
    let n = vm.read(COUNTER);
    vm.count_past(n + 1000).unwrap();
    vm.control.pause().unwrap();
    vm
}

/// Rss in KiB of this process (smaps_rollup) and of the mappings overlapping `ranges`.
fn rss(ranges: &[Range<usize>]) -> (u64, u64) {
    let kib = |l: &str| -> u64 { l.split_whitespace().nth(1).unwrap().parse().unwrap() };
    let rollup = fs::read_to_string("/proc/self/smaps_rollup").unwrap();
    let total = rollup
        .lines()
        .find(|l| l.starts_with("Rss:"))
        .map(kib)
        .unwrap();
    let smaps = fs::read_to_string("/proc/self/smaps").unwrap();
    let (mut inside, mut mapped) = (false, 0);
    for line in smaps.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if let Some((a, b)) = first.split_once('-') {
            if let (Ok(a), Ok(b)) = (usize::from_str_radix(a, 16), usize::from_str_radix(b, 16)) {
                inside = ranges.iter().any(|r| a < r.end && r.start < b);
                continue;
            }
        }
        if inside && first == "Rss:" {
            mapped += kib(line);
        }
    }
    (total, mapped)
}

/// Pages `vm` out to `path` and checks that the RAM went: returns the count at the pause.
fn page_out_and_check_rss(vm: &Running, path: &Path) -> u32 {
    let at_pause = vm.read(COUNTER);
    let ranges = guests::host_ranges(&vm.mem);
    let (total_before, mapped_before) = rss(&ranges);
    let report = vm.control.page_out(path, None).unwrap();
    let (total_after, mapped_after) = rss(&ranges);
    eprintln!(
        "page-out: {} pages, {} -> {} bytes in {:?}; process Rss {total_before} -> {total_after} KiB, guest RAM {mapped_before} -> {mapped_after} KiB",
        report.pages_stored, report.raw_bytes, report.file_bytes, report.write_time
    );
    let fill_kib = FILL_MIB * 1024;
    assert!(report.pages_stored >= FILL_MIB * MIB / 4096, "{report:?}");
    assert!(report.file_bytes < report.raw_bytes / 10, "{report:?}");
    assert!(
        mapped_before >= fill_kib && mapped_after < 1024,
        "{mapped_before} -> {mapped_after}"
    );
    assert!(
        total_before - total_after >= fill_kib * 9 / 10,
        "{total_before} -> {total_after}"
    );
    assert_eq!(
        vm.control.page_state(),
        PageState::PagedOut(path.to_path_buf())
    );
    at_pause
}

/// Every byte of the fill, the memory above it, and the counter going on.
fn check_memory_and_counting(vm: &Running, at_pause: u32) {
    assert_eq!(
        vm.read(COUNTER),
        at_pause,
        "the counter changed while paged out"
    );
    guests::check_marked_fill(&vm.mem, FILL_MIB * MIB).unwrap();
    let above = guests::read_pattern(&vm.mem, FILL_START + FILL_MIB * MIB, 8 * MIB);
    assert_eq!(above, 0);
    vm.control.resume();
    vm.count_past(at_pause + 1000).unwrap();
}

#[test]
fn lazy_page_in_brings_every_byte_back_and_the_count_goes_on() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let dir = scratch_dir("lazy");
    let path = dir.join("pages");
    let vm = filled_guest();
    let at_pause = page_out_and_check_rss(&vm, &path);
    let ranges = guests::host_ranges(&vm.mem);
    let report = vm.control.page_in(&path, PageInMode::Lazy).unwrap();
    eprintln!("lazy page-in: {:?}", report.took);
    assert_eq!(vm.control.page_state(), PageState::Lazy);
    // Nothing came back yet.
    assert!(rss(&ranges).1 < 1024);
    vm.control.resume();
    vm.count_past(at_pause + 1000).unwrap();
    vm.control.pause().unwrap();
    // Only the touched chunks came back.
    assert!(rss(&ranges).1 < 4 * 1024, "{:?}", rss(&ranges));
    check_memory_and_counting(&vm, vm.read(COUNTER));
    // A second pause of a lazily resumed VM first brings the rest back.
    vm.control.pause().unwrap();
    let at_pause = page_out_and_check_rss(&vm, &dir.join("pages2"));
    vm.control
        .page_in(&dir.join("pages2"), PageInMode::Lazy)
        .unwrap();
    check_memory_and_counting(&vm, at_pause);
    vm.quit().unwrap();
    fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_lazily_resumed_guest_touching_its_fill_faults_all_of_it_back() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let dir = scratch_dir("touch");
    let path = dir.join("pages");
    let vm = filled_guest();
    page_out_and_check_rss(&vm, &path);
    let ranges = guests::host_ranges(&vm.mem);
    vm.control.page_in(&path, PageInMode::Lazy).unwrap();
    let request = vm.read(TOUCHED) + 1;
    vm.write(TOUCH_REQUEST, request);
    vm.control.resume();
    vm.wait_for("the guest to touch its fill", guests::COUNT_LIMIT, |m| {
        guests::read_u32(m, TOUCHED) == request
    })
    .unwrap();
    vm.control.pause().unwrap();
    // The guest's own reads brought every filled page back (the host read only the counter).
    let (_, mapped) = rss(&ranges);
    assert!(mapped >= FILL_MIB * 1024, "guest RAM Rss {mapped} KiB");
    check_memory_and_counting(&vm, vm.read(COUNTER));
    vm.quit().unwrap();
    fs::remove_dir_all(dir).unwrap();
}

#[test]
fn eager_page_in_brings_every_byte_back_before_resuming() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let dir = scratch_dir("eager");
    let path = dir.join("pages");
    let vm = filled_guest();
    let at_pause = page_out_and_check_rss(&vm, &path);
    let ranges = guests::host_ranges(&vm.mem);
    vm.control.page_in(&path, PageInMode::Eager).unwrap();
    assert_eq!(vm.control.page_state(), PageState::Resident);
    assert!(rss(&ranges).1 >= FILL_MIB * 1024);
    check_memory_and_counting(&vm, at_pause);
    vm.quit().unwrap();
    fs::remove_dir_all(dir).unwrap();
}

#[test]
fn resume_alone_pages_in_lazily() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let dir = scratch_dir("resume");
    let vm = filled_guest();
    let at_pause = page_out_and_check_rss(&vm, &dir.join("pages"));
    vm.control.resume();
    vm.count_past(at_pause + 1000).unwrap();
    guests::check_marked_fill(&vm.mem, FILL_MIB * MIB).unwrap();
    vm.quit().unwrap();
    fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_truncated_page_file_is_refused_and_the_vm_never_runs_on_it() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let dir = scratch_dir("truncated");
    let path = dir.join("pages");
    let vm = filled_guest();
    let at_pause = page_out_and_check_rss(&vm, &path);
    let len = fs::metadata(&path).unwrap().len();
    fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(len - 100)
        .unwrap();
    for mode in [PageInMode::Eager, PageInMode::Lazy] {
        let e = vm.control.page_in(&path, mode).unwrap_err().to_string();
        assert!(
            e.contains(path.to_str().unwrap()) && e.contains("truncated"),
            "{e}"
        );
        assert_eq!(e.lines().count(), 1, "{e}");
    }
    // Resuming anyway stops the VM with that error instead of running it on empty memory.
    vm.control.resume();
    let e = vm.join().unwrap_err().to_string();
    assert!(e.contains("truncated"), "{e}");
    let _ = at_pause;
    fs::remove_dir_all(dir).unwrap();
}

/// Flips a byte in the block that holds the guest's code.
fn corrupt_code_block(path: &Path) {
    let file = PageFile::open(path).unwrap();
    let code_chunk = LOAD & !(on_disk::BLOCK_BYTES as u64 - 1);
    let block = *file
        .index()
        .blocks
        .iter()
        .find(|b| b.guest_addr == code_chunk)
        .expect("the code's block");
    drop(file);
    let mut bytes = fs::read(path).unwrap();
    bytes[block.offset as usize + block.len as usize / 2] ^= 0x55;
    fs::write(path, bytes).unwrap();
}

#[test]
fn a_corrupted_page_file_is_refused_eagerly_and_stops_the_vm_lazily() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let dir = scratch_dir("corrupt");
    let path = dir.join("pages");
    let vm = filled_guest();
    page_out_and_check_rss(&vm, &path);
    corrupt_code_block(&path);
    let e = vm
        .control
        .page_in(&path, PageInMode::Eager)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains(path.to_str().unwrap()) && e.contains("is corrupt"),
        "{e}"
    );
    assert_eq!(e.lines().count(), 1, "{e}");
    // Lazily the index is fine; the first fault on the damaged block stops the VM.
    vm.control.page_in(&path, PageInMode::Lazy).unwrap();
    vm.control.resume();
    let e = vm.join().unwrap_err();
    assert!(matches!(e, VmError::PageFile { .. }), "{e}");
    assert!(e.to_string().contains("is corrupt"), "{e}");
    fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_clone_stores_only_what_differs_from_its_template() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let dir = scratch_dir("clone");
    let vm = filled_guest();
    let snap = dir.join("snap");
    vm.control
        .snapshot(&snap, AfterSnapshot::StayPaused)
        .unwrap();
    vm.quit().unwrap();
    let clone = Running::start(Vm::restore(&snap, RestoreOverrides::default()).unwrap());
    let at = clone.read(COUNTER);
    clone.count_past(at + 1000).unwrap();
    clone.control.pause().unwrap();
    let at_pause = clone.read(COUNTER);
    let base = SnapshotPaths::in_dir(&snap).memory;
    let path = dir.join("pages");
    let report = clone.control.page_out(&path, Some(&base)).unwrap();
    // The counter's page, the stack (if any) and what KVM wrote: a handful of pages.
    assert!(report.pages_stored < 64, "{report:?}");
    clone.control.page_in(&path, PageInMode::Lazy).unwrap();
    check_memory_and_counting(&clone, at_pause);
    // And again with the mapping now anonymous and eager page-in.
    clone.control.pause().unwrap();
    let at_pause = clone.read(COUNTER);
    let report = clone
        .control
        .page_out(&dir.join("pages2"), Some(&base))
        .unwrap();
    assert!(report.pages_stored < 64, "{report:?}");
    clone
        .control
        .page_in(&dir.join("pages2"), PageInMode::Eager)
        .unwrap();
    check_memory_and_counting(&clone, at_pause);
    clone.quit().unwrap();
    fs::remove_dir_all(dir).unwrap();
}
