//! Snapshot and restore on the host's real /dev/kvm, with a hand-assembled guest that counts
//! in memory: a restored VM goes on counting from where the snapshot left it, two clones of
//! one snapshot do not see each other's memory and leave the memory file untouched, and
//! damaged snapshots are refused with the error that names the damage.
//!
//! On a PVM host every piece of vCPU and VM
//! state the snapshot takes reads and writes back (regs, sregs, FPU, legacy XSAVE, XCRs, the
//! MSRs of KVM_GET_MSR_INDEX_LIST, LAPIC, vCPU events, debug registers, MP state, both PICs,
//! IOAPIC, PIT2, KVM_GET/SET_CLOCK): a snapshot's `skipped` list is empty there. But
//! KVM_GET_SUPPORTED_CPUID reports the APIC id of the host CPU the ioctl ran on (leaf 1 EBX,
//! leaf 0xb EDX), so the CPU fingerprint leaves those fields out.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use husk_vmm::snapshot::{AfterSnapshot, RestoreOverrides, SnapshotPaths};
use husk_vmm::testing::guests::{self, Running, COUNTER, LOAD};
use husk_vmm::{SerialOutput, Vm, VmConfig, VmError};

/// Free memory the tests write to tell clones apart.
const MARK: u64 = COUNTER + 0x1000;

/// Fails (never skips) when the host has no KVM.
fn require_kvm() {
    assert!(
        Path::new("/dev/kvm").exists(),
        "/dev/kvm is missing: these tests need KVM on the host"
    );
}

fn capture() -> (SerialOutput, Arc<Mutex<Vec<u8>>>) {
    let out = Arc::new(Mutex::new(Vec::new()));
    (SerialOutput::Capture(out.clone()), out)
}

fn counting_config(vcpus: u8) -> (VmConfig, Arc<Mutex<Vec<u8>>>) {
    let mut cfg = guests::long_mode_config(guests::counting_guest());
    cfg.vcpus = vcpus;
    let (serial, out) = capture();
    cfg.serial = serial;
    (cfg, out)
}

fn scratch_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("husk-snap-{}-{name}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    dir
}

/// Runs a counting guest, snapshots it paused into `dir`, stops it; returns the count at the
/// snapshot (read while paused, so exactly what the memory file holds).
fn snapshot_counting_guest(dir: &Path, vcpus: u8) -> u32 {
    let (cfg, out) = counting_config(vcpus);
    let vm = Running::start(Vm::new(cfg).unwrap());
    vm.count_past(1000).unwrap();
    // One vCPU can count past 1000 before a busy host has run the others at all; the snapshot
    // should hold every vCPU inside the counting loop.
    wait_for_prints(&out, vcpus);
    vm.control.snapshot(dir, AfterSnapshot::StayPaused).unwrap();
    assert!(vm.control.is_paused());
    let at_snapshot = vm.read(COUNTER);
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(vm.read(COUNTER), at_snapshot, "the guest ran while paused");
    vm.quit().unwrap();
    // Every vCPU runs the same code and printed once.
    let printed = String::from_utf8_lossy(&out.lock().unwrap()).into_owned();
    assert_eq!(
        printed.matches('g').count(),
        usize::from(vcpus),
        "{printed:?}"
    );
    at_snapshot
}

/// Waits (bounded) until `vcpus` vCPUs have each printed their one `g`.
fn wait_for_prints(out: &Mutex<Vec<u8>>, vcpus: u8) {
    let printed = || out.lock().unwrap().iter().filter(|&&b| b == b'g').count();
    for _ in 0..1000 {
        if printed() >= usize::from(vcpus) {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("only {} of {vcpus} vCPUs started within 10 s", printed());
}

fn counter_in_file(paths: &SnapshotPaths) -> u32 {
    let bytes = fs::read(&paths.memory).unwrap();
    let at = COUNTER as usize;
    u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap())
}

fn restore(dir: &Path) -> (Vm, Arc<Mutex<Vec<u8>>>) {
    let (serial, out) = capture();
    let overrides = RestoreOverrides {
        serial,
        ..Default::default()
    };
    (Vm::restore(dir, overrides).unwrap(), out)
}

#[test]
fn a_restored_vm_counts_on_from_the_snapshot() {
    require_kvm();
    let dir = scratch_dir("counts-on");
    let at_snapshot = snapshot_counting_guest(&dir, 1);
    let paths = SnapshotPaths::in_dir(&dir);
    assert_eq!(counter_in_file(&paths), at_snapshot);
    let (_, body) = husk_vmm::snapshot::state_file::read(&paths.state).unwrap();
    let vcpu = &body.vcpus[0];
    assert!(
        vcpu.regs.rip >= LOAD && vcpu.regs.rip < LOAD + 0x100,
        "{:#x}",
        vcpu.regs.rip
    );
    assert_eq!(vcpu.regs.rbx, COUNTER);
    assert!(vcpu.lapic.is_some() && vcpu.xsave.is_some() && !vcpu.msrs.is_empty());
    assert!(body.vm.irqchips.is_some());
    // What this host's KVM would not give is listed, not silently lost.
    eprintln!(
        "{} MSRs saved, kvmclock {}, state KVM did not give: {:?}",
        vcpu.msrs.len(),
        body.vm.clock.is_some(),
        body.skipped
    );

    let (vm, out) = restore(&dir);
    let vm = Running::start(vm);
    assert!(vm.read(COUNTER) >= at_snapshot);
    let later = vm.count_past(at_snapshot + 1000).unwrap();
    assert!(later > at_snapshot);
    vm.quit().unwrap();
    // The guest printed before the snapshot and nothing since: no code ran twice.
    assert!(out.lock().unwrap().is_empty());
    fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_two_vcpu_vm_restores_with_both_vcpus_counting() {
    require_kvm();
    let dir = scratch_dir("two-vcpus");
    let at_snapshot = snapshot_counting_guest(&dir, 2);
    let (vm, _out) = restore(&dir);
    let vm = Running::start(vm);
    vm.count_past(at_snapshot + 1000).unwrap();
    vm.quit().unwrap();
    fs::remove_dir_all(dir).unwrap();
}

#[test]
fn two_clones_of_one_snapshot_are_independent() {
    require_kvm();
    let dir = scratch_dir("clones");
    let at_snapshot = snapshot_counting_guest(&dir, 1);
    let paths = SnapshotPaths::in_dir(&dir);
    let file_before = fs::read(&paths.memory).unwrap();

    let a = Running::start(restore(&dir).0);
    let b = Running::start(restore(&dir).0);
    a.write(MARK, 0xaaaa);
    b.write(MARK, 0xbbbb);
    a.count_past(at_snapshot + 1000).unwrap();
    b.count_past(at_snapshot + 1000).unwrap();
    assert_eq!(a.read(MARK), 0xaaaa);
    assert_eq!(b.read(MARK), 0xbbbb);
    // Pause one: the other goes on alone.
    a.control.pause().unwrap();
    let a_frozen = a.read(COUNTER);
    b.count_past(b.read(COUNTER) + 1000).unwrap();
    assert_eq!(a.read(COUNTER), a_frozen);
    a.quit().unwrap();
    b.quit().unwrap();

    let file_after = fs::read(&paths.memory).unwrap();
    assert!(
        file_before == file_after,
        "a clone wrote to the memory file"
    );
    assert_eq!(counter_in_file(&paths), at_snapshot);
    fs::remove_dir_all(dir).unwrap();
}

/// Copies a snapshot so that one test can damage it in several ways.
fn copy_snapshot(from: &Path, name: &str) -> PathBuf {
    let to = scratch_dir(name);
    for f in [
        husk_vmm::snapshot::STATE_FILE,
        husk_vmm::snapshot::MEMORY_FILE,
    ] {
        fs::copy(from.join(f), to.join(f)).unwrap();
    }
    to
}

fn restore_err(dir: &Path) -> VmError {
    match Vm::restore(dir, RestoreOverrides::default()) {
        Ok(_) => panic!("a damaged snapshot was restored"),
        Err(e) => {
            assert!(!e.to_string().contains('\n'), "multi-line error: {e}");
            e
        }
    }
}

#[test]
fn damaged_snapshots_are_refused_with_the_specific_error() {
    require_kvm();
    let dir = scratch_dir("damaged");
    snapshot_counting_guest(&dir, 1);
    let state_len = fs::metadata(dir.join("state")).unwrap().len() as usize;

    let flipped = copy_snapshot(&dir, "flipped");
    let mut state = fs::read(flipped.join("state")).unwrap();
    state[state_len / 2] ^= 0x01;
    fs::write(flipped.join("state"), &state).unwrap();
    let e = restore_err(&flipped);
    assert!(matches!(e, VmError::SnapshotChecksum { .. }), "{e}");
    assert!(e.to_string().contains("is corrupt"), "{e}");

    let versioned = copy_snapshot(&dir, "versioned");
    let mut state = fs::read(versioned.join("state")).unwrap();
    state[8..12].copy_from_slice(&99u32.to_le_bytes());
    fs::write(versioned.join("state"), &state).unwrap();
    let e = restore_err(&versioned);
    assert!(
        matches!(e, VmError::SnapshotVersion { found: 99, .. }),
        "{e}"
    );

    let fingerprint = copy_snapshot(&dir, "fingerprint");
    let mut state = fs::read(fingerprint.join("state")).unwrap();
    state[12] ^= 0xff;
    fs::write(fingerprint.join("state"), &state).unwrap();
    let e = restore_err(&fingerprint);
    assert!(matches!(e, VmError::SnapshotCpu { .. }), "{e}");

    let truncated = copy_snapshot(&dir, "truncated");
    let memory = fs::OpenOptions::new()
        .write(true)
        .open(truncated.join("memory"))
        .unwrap();
    let full = memory.metadata().unwrap().len();
    memory.set_len(full - 4096).unwrap();
    let e = restore_err(&truncated);
    assert!(
        matches!(e, VmError::SnapshotMemorySize { found, expected, .. } if found == full - 4096 && expected == full),
        "{e}"
    );

    for d in [dir, flipped, versioned, fingerprint, truncated] {
        fs::remove_dir_all(d).unwrap();
    }
}

#[test]
fn restoring_maps_memory_instead_of_reading_it() {
    require_kvm();
    let dir = scratch_dir("bench");
    snapshot_counting_guest(&dir, 1);
    let times = husk_vmm::testing::bench_restore(&dir, &RestoreOverrides::default(), 3).unwrap();
    assert_eq!(times.len(), 3);
    // A restore that copied 64 MiB would still be fast here; what we check is that restores
    // of one snapshot can be repeated back to back (nothing is left locked or bound).
    fs::remove_dir_all(dir).unwrap();
}

#[test]
fn the_snapshotted_vm_runs_on_after_a_resuming_snapshot() {
    require_kvm();
    let dir = scratch_dir("resume");
    let (cfg, _out) = counting_config(1);
    let vm = Running::start(Vm::new(cfg).unwrap());
    let before = vm.count_past(1000).unwrap();
    vm.control.snapshot(&dir, AfterSnapshot::Resume).unwrap();
    assert!(!vm.control.is_paused());
    let in_file = counter_in_file(&SnapshotPaths::in_dir(&dir));
    assert!(in_file >= before);
    vm.count_past(in_file + 1000).unwrap();
    vm.quit().unwrap();
    // Once the VM has ended its control handle refuses to snapshot.
    let e = vm_control_after_end(&dir);
    assert!(matches!(e, VmError::SnapshotState(_)), "{e}");
    fs::remove_dir_all(dir).unwrap();
}

/// Runs a VM to its end and asks its leftover control handle for a snapshot.
fn vm_control_after_end(dir: &Path) -> VmError {
    let (cfg, _out) = counting_config(1);
    let vm = Running::start(Vm::new(cfg).unwrap());
    let control = vm.control.clone();
    vm.count_past(0).unwrap();
    vm.quit().unwrap();
    control
        .snapshot(&dir.join("late"), AfterSnapshot::Resume)
        .unwrap_err()
}

/// Snapshots a counting guest that has two (unused) 9p shares.
fn snapshot_with_shares(dir: &Path) -> PathBuf {
    let share_dir = dir.join("placeholder");
    fs::create_dir_all(&share_dir).unwrap();
    let (mut cfg, _out) = counting_config(1);
    cfg.shares = ["share0", "share1"]
        .iter()
        .map(|tag| husk_vmm::ShareConfig::dir(tag, &share_dir, true))
        .collect();
    let snap = dir.join("snap");
    let vm = Running::start(Vm::new(cfg).unwrap());
    vm.count_past(1000).unwrap();
    vm.control
        .snapshot(&snap, AfterSnapshot::StayPaused)
        .unwrap();
    vm.quit().unwrap();
    snap
}

#[test]
fn a_clone_serves_its_own_share_directories_under_the_saved_tags() {
    require_kvm();
    let dir = scratch_dir("shares");
    let snap = snapshot_with_shares(&dir);
    let mine = dir.join("mine");
    fs::create_dir_all(&mine).unwrap();
    let with = |shares: Vec<(PathBuf, bool)>| RestoreOverrides {
        shares: Some(
            shares
                .iter()
                .map(|(path, ro)| husk_vmm::ShareConfig::dir("", path, *ro))
                .collect(),
        ),
        ..Default::default()
    };
    let two = vec![(mine.clone(), false), (mine.clone(), true)];
    let vm = Vm::restore(&snap, with(two)).unwrap();
    drop(vm);
    let e = Vm::restore(&snap, with(vec![(mine.clone(), false)]))
        .err()
        .unwrap();
    assert!(
        e.to_string()
            .contains("1 share directories given for a snapshot with 2"),
        "{e}"
    );
    let e = Vm::restore(&snap, with(vec![(dir.join("gone"), false); 2]))
        .err()
        .unwrap();
    assert!(e.to_string().contains("gone"), "{e}");
    fs::remove_dir_all(dir).unwrap();
}
