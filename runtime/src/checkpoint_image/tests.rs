//! Images authenticated under a host key: what a restore accepts and what it refuses.

use std::os::unix::fs::PermissionsExt;

use super::*;

/// An image in a fresh directory, written under the key made at `<tmp>/key`.
fn image() -> (tempfile::TempDir, PathBuf, ImageKey) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("image");
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join(husk_vmm::snapshot::STATE_FILE), b"state bytes").unwrap();
    std::fs::write(dir.join(husk_vmm::snapshot::PAGES_FILE), vec![7u8; 10_000]).unwrap();
    let key = ImageKey::load_or_create(&tmp.path().join("key")).unwrap();
    let m = ImageManifest::new(&dir, "c1", Path::new("/bundles/c1"), None).unwrap();
    m.write_with(&dir, &key).unwrap();
    (tmp, dir, key)
}

fn refusal(dir: &Path, key: &ImageKey) -> String {
    let e = ImageManifest::read_checked_with(dir, key).unwrap_err();
    let line = format!("{e:#}");
    assert_eq!(line.lines().count(), 1, "{line}");
    line
}

#[test]
fn an_image_reads_back_under_the_key_it_was_written_with() {
    let (_tmp, dir, key) = image();
    let m = ImageManifest::read_checked_with(&dir, &key).unwrap();
    assert_eq!((m.id.as_str(), m.files.len()), ("c1", 2));
    assert!(dir.join(MAC_FILE).exists() && dir.join(INVENTORY_FILE).exists());
}

#[test]
fn a_flipped_byte_is_refused_as_damaged() {
    let (_tmp, dir, key) = image();
    let pages = dir.join(husk_vmm::snapshot::PAGES_FILE);
    let mut bytes = std::fs::read(&pages).unwrap();
    bytes[5000] ^= 1;
    std::fs::write(&pages, bytes).unwrap();
    let e = refusal(&dir, &key);
    assert!(
        e.contains("pages is damaged") && e.contains("sha256"),
        "{e}"
    );
}

#[test]
fn a_truncated_file_is_refused_as_truncated() {
    let (_tmp, dir, key) = image();
    let pages = std::fs::OpenOptions::new()
        .write(true)
        .open(dir.join(husk_vmm::snapshot::PAGES_FILE))
        .unwrap();
    pages.set_len(4096).unwrap();
    let e = refusal(&dir, &key);
    assert!(e.contains("truncated to 4096 of 10000 bytes"), "{e}");
}

#[test]
fn an_image_of_another_key_is_refused_as_foreign() {
    let (tmp, dir, _) = image();
    let other = ImageKey::load_or_create(&tmp.path().join("other")).unwrap();
    let e = refusal(&dir, &other);
    assert!(e.contains("not made on this host"), "{e}");
}

#[test]
fn an_edited_manifest_is_refused_before_it_is_used() {
    let (_tmp, dir, key) = image();
    let path = dir.join(MANIFEST_FILE);
    let text = std::fs::read_to_string(&path).unwrap();
    let edited = text.replace("/bundles/c1", "/etc/shadow");
    assert_ne!(text, edited);
    std::fs::write(&path, edited).unwrap();
    let e = refusal(&dir, &key);
    assert!(e.contains("manifest was altered"), "{e}");
}

#[test]
fn a_manifest_naming_a_file_outside_the_image_is_refused_even_when_authentic() {
    let (_tmp, dir, key) = image();
    let mut m = ImageManifest::read(&dir).unwrap();
    m.files[0].name = "../../etc/passwd".into();
    m.write_with(&dir, &key).unwrap();
    let e = refusal(&dir, &key);
    assert!(e.contains("that no image has"), "{e}");
}

#[test]
fn an_image_without_its_mac_is_refused() {
    let (_tmp, dir, key) = image();
    std::fs::remove_file(dir.join(MAC_FILE)).unwrap();
    let e = refusal(&dir, &key);
    assert!(e.contains("not authenticated"), "{e}");
}

#[test]
fn a_missing_key_is_refused_and_not_created_by_a_reader() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("absent.key");
    let e = format!("{:#}", ImageKey::load(&path).err().unwrap());
    assert!(e.contains("no checkpoint image key"), "{e}");
    assert!(!path.exists());
}

#[test]
fn a_key_is_created_private_once_and_a_readable_one_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("store/.image.key");
    let first = ImageKey::load_or_create(&path).unwrap();
    let meta = std::fs::metadata(&path).unwrap();
    assert_eq!((meta.len(), meta.permissions().mode() & 0o777), (32, 0o600));
    let again = ImageKey::load_or_create(&path).unwrap();
    assert_eq!(first.mac(b"x"), again.mac(b"x"));
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let e = format!("{:#}", ImageKey::load(&path).err().unwrap());
    assert!(e.contains("readable by its owner only"), "{e}");
}
