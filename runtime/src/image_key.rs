//! The host's key for checkpoint images: a restore brings back only what this host wrote.
//!
//! A checkpoint's manifest is authenticated with HMAC-SHA256 under a 32-byte key of the host
//! (the manifest carries each file's size and SHA-256, so the MAC covers the whole image). The
//! key lives in the template store's directory (`/var/lib/husk/templates/.image.key` unless
//! `$HUSK_TEMPLATES` moves the store, or `$HUSK_IMAGE_KEY` names the file): the runtime's
//! `--root` is usually on tmpfs, and an image must stay restorable after a reboot, as long as
//! the templates its pages are relative to. The store skips names starting with '.', so the
//! key is never taken for a template. `checkpoint` creates the key, mode 0600, on first use;
//! `restore` never does: without the key no image can be authentic.

use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// The key file's name in the template store's directory.
pub const KEY_FILE: &str = ".image.key";
/// Names the key file instead.
pub const KEY_ENV: &str = "HUSK_IMAGE_KEY";
/// Bytes of key.
pub const KEY_LEN: usize = 32;

/// A host's image key.
pub struct ImageKey([u8; KEY_LEN]);

impl ImageKey {
    /// Where this host's key is.
    pub fn default_path() -> PathBuf {
        std::env::var_os(KEY_ENV).map_or_else(
            || husk_templates::Store::from_env().root().join(KEY_FILE),
            PathBuf::from,
        )
    }

    /// The key at `path`, which must exist, be a regular file of [`KEY_LEN`] bytes and be
    /// readable by its owner only.
    pub fn load(path: &Path) -> Result<ImageKey> {
        let mut f = std::fs::File::open(path).with_context(|| {
            format!(
                "no checkpoint image key at {} (only this host's checkpoints can be restored)",
                path.display()
            )
        })?;
        let meta = f.metadata()?;
        if !meta.is_file() || meta.mode() & 0o077 != 0 || meta.len() != KEY_LEN as u64 {
            bail!(
                "checkpoint image key {} is not a {KEY_LEN}-byte file readable by its owner only",
                path.display()
            );
        }
        let mut key = [0u8; KEY_LEN];
        f.read_exact(&mut key)
            .with_context(|| format!("reading {}", path.display()))?;
        Ok(ImageKey(key))
    }

    /// The key at `path`, made from fresh randomness if there is none yet.
    pub fn load_or_create(path: &Path) -> Result<ImageKey> {
        if !path.exists() {
            create(path).with_context(|| format!("creating {}", path.display()))?;
        }
        ImageKey::load(path)
    }

    /// The MAC of `bytes`.
    pub fn mac(&self, bytes: &[u8]) -> Vec<u8> {
        self.hmac(bytes).finalize().into_bytes().to_vec()
    }

    /// Whether `tag` is the MAC of `bytes` (compared in constant time).
    pub fn verify(&self, bytes: &[u8], tag: &[u8]) -> bool {
        self.hmac(bytes).verify_slice(tag).is_ok()
    }

    fn hmac(&self, bytes: &[u8]) -> Hmac<Sha256> {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.0).expect("HMAC takes any key length");
        mac.update(bytes);
        mac
    }
}

/// Writes a new key to a private temporary file and links it into place: two checkpoints
/// racing to create it both end up with the one that got there first.
fn create(path: &Path) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!("{KEY_FILE}.{}.tmp", std::process::id()));
    let mut key = [0u8; KEY_LEN];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut key)?;
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .and_then(|mut f| f.write_all(&key).and_then(|()| f.sync_all()));
    let linked = written.and_then(|()| match std::fs::hard_link(&tmp, path) {
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        other => other,
    });
    let _ = std::fs::remove_file(&tmp);
    linked?;
    Ok(())
}
