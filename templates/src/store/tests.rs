use super::*;
use crate::manifest::test_settings as settings;

/// A builder that writes a marker instead of booting a guest.
fn fake(target: &BuildTarget) -> Result<()> {
    std::fs::create_dir_all(&target.snapshot_dir)?;
    std::fs::write(target.snapshot_dir.join("state"), b"fake")?;
    assert!(target.placeholder.is_dir());
    Ok(())
}

#[test]
fn build_list_and_remove() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::new(&dir.path().join("store"));
    let s = settings(dir.path());
    let t = store.build("default", &s, &fake).unwrap();
    assert!(t.snapshot_dir().join("state").exists());
    assert!(t.placeholder().is_dir());
    let list = store.list().unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].name, "default");
    assert_eq!(list[0].clones, 0);
    assert_eq!(list[0].kernel, s.kernel);
    store.remove("default", false).unwrap();
    assert!(store.list().unwrap().is_empty());
    // Nothing is left from the build.
    let left: Vec<_> = std::fs::read_dir(store.root())
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .filter(|n| n != LOCK_FILE && n != LEASES_DIR)
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

#[test]
fn a_leased_template_is_not_removed_without_force() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::new(&dir.path().join("store"));
    let t = store.build("t1", &settings(dir.path()), &fake).unwrap();
    let lease = store.lease(&t).unwrap();
    assert_eq!(store.clones("t1"), [std::process::id() as i32]);
    let e = store.remove("t1", false).unwrap_err().to_string();
    assert!(e.contains("running clone"), "{e}");
    drop(lease);
    assert!(store.clones("t1").is_empty());
    store.remove("t1", false).unwrap();
}

#[test]
fn the_lease_of_an_ended_clone_is_released_and_a_live_one_kept() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::new(&dir.path().join("store"));
    let t = store.build("t1", &settings(dir.path()), &fake).unwrap();
    let live = store.lease(&t).unwrap();
    let mut child = std::process::Command::new("true").spawn().unwrap();
    child.wait().unwrap();
    let ended = child.id() as i32;
    let leases = store.leases_dir("t1");
    std::fs::write(leases.join(ended.to_string()), b"").unwrap();
    store.release_ended_clone(ended);
    assert!(!leases.join(ended.to_string()).exists());
    store.release_ended_clone(std::process::id() as i32);
    assert_eq!(store.clones("t1"), [std::process::id() as i32]);
    drop(live);
}

#[test]
fn a_failed_build_leaves_nothing_and_keeps_the_old_template() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::new(&dir.path().join("store"));
    let s = settings(dir.path());
    store.build("t", &s, &fake).unwrap();
    let failing = |_: &BuildTarget| -> Result<()> { bail!("no guest today") };
    let e = store.build("t", &s, &failing).unwrap_err();
    assert!(format!("{e:#}").contains("no guest today"));
    assert!(store.open("t").unwrap().is_some());
    let hidden = std::fs::read_dir(store.root())
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(".build"))
        .count();
    assert_eq!(hidden, 0);
}

#[test]
fn names_are_single_components() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::new(dir.path());
    for bad in ["", "..", "a/b", ".hidden"] {
        assert!(store.remove(bad, true).is_err(), "{bad:?}");
        // A name from a checkpoint image is opened only inside the store.
        assert!(store.open(bad).is_err(), "{bad:?}");
    }
}
