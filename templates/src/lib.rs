//! The template store: warmed guest snapshots that every container's micro-VM is cloned from.
//!
//! A template is a directory `<store>/<name>/` holding `manifest.json` (what it was built
//! from, see [`Manifest`]), `snapshot/` (the VMM's state and memory files) and `empty/` (the
//! placeholder directory its unused 9p share slots point at). It is built in a temporary
//! directory next to it and renamed into place, so readers see a whole template or none.
//! Running clones hold a [`Lease`], so `rm` can refuse to take a template from under them
//! (their memory stays mapped either way: files are only ever replaced, never rewritten).
//!
//! This crate decides *when* to build and where things go; *how* to boot and snapshot a guest
//! is the caller's [`Builder`] (the runtime boots its micro-VM for it).

mod file_id;
mod lease;
mod manifest;
mod store;

pub use file_id::{read_chunks, FileStamp};
pub use lease::Lease;
pub use manifest::{Manifest, Settings};
pub use store::{BuildTarget, Builder, Listing, Store, Template};

/// The template `create` clones unless told otherwise.
pub const DEFAULT_NAME: &str = "default";
/// How many virtio-9p devices a template has: the rootfs plus up to seven bind directories.
pub const SHARE_SLOTS: u8 = 8;
/// Where the store lives unless `$HUSK_TEMPLATES` says otherwise.
pub const DEFAULT_DIR: &str = "/var/lib/husk/templates";

/// The mount tag of share slot `index` (the same for cold boots and clones).
pub fn slot_tag(index: usize) -> String {
    format!("share{index}")
}
