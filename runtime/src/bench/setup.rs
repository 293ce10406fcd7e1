//! What the benchmarks set up before they measure: an installed copy of husk and its guest
//! assets, the busybox bundle, a scratch directory on a host with KVM.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};

use crate::assets;

/// For the benchmarks that run raw test guests on the host's /dev/kvm: fails unless there is
/// one, then makes their scratch directory (`prefix`…, `what` it holds, for the error).
#[cfg(feature = "test-guest-benches")]
pub fn host_kvm_scratch(prefix: &str, what: &str) -> Result<tempfile::TempDir> {
    if !Path::new("/dev/kvm").exists() {
        bail!("/dev/kvm is missing: this benchmark runs on the host's KVM");
    }
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir()
        .with_context(|| format!("creating the {what} directory"))
}

/// The husk binary, kernel and initramfs the benchmarks run (see [`installed_husk`]).
pub struct Installed {
    pub husk: PathBuf,
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
}

/// Copies this husk binary, the guest kernel and the initramfs to `work/install` (the layout
/// `assets` looks in) unless already there: the benchmarks run husk as an installed binary on
/// local storage, as runc and QEMU are. Run straight from a lab's checkout, every exec would
/// re-read the binary over the checkout's 9p share (cache=mmap keeps no pages between opens),
/// a cost per husk process that says nothing about Husk.
pub fn installed_husk(work: &Path) -> Result<Installed> {
    let install = work.join("install");
    let assets_dir = install.join("husk");
    let to = Installed {
        husk: install.join("bin").join("husk"),
        kernel: assets_dir.join(assets::KERNEL_FILE),
        initramfs: assets_dir.join(assets::INITRAMFS_FILE),
    };
    if to.husk.exists() {
        return Ok(to);
    }
    let copies = [
        (std::env::current_exe()?, &to.husk),
        (assets::kernel(None)?, &to.kernel),
        (assets::initramfs(None)?, &to.initramfs),
    ];
    for (from, dest) in copies {
        if let Some(d) = dest.parent() {
            std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
        }
        std::fs::copy(&from, dest)
            .with_context(|| format!("copying {} to {}", from.display(), dest.display()))?;
    }
    eprintln!("husk under test: {} (an installed copy)", to.husk.display());
    Ok(to)
}

/// The script that makes the busybox bundle, relative to the current directory: the benchmarks
/// that run containers are run from the root of a Husk checkout.
const BUNDLE_SCRIPT: &str = "examples/busybox/bundle.sh";
/// Names the bundle script instead, for a run from elsewhere.
const BUNDLE_SCRIPT_ENV: &str = "HUSK_BUNDLE_SCRIPT";

/// The busybox bundle (examples/busybox/bundle.sh) in `dir`, its process running `args`.
pub fn make_bundle(dir: &Path, args: &[&str]) -> Result<()> {
    let script = bundle_script()?;
    let st = Command::new(&script)
        .arg(dir)
        .args(args)
        .stderr(Stdio::null())
        .status()
        .with_context(|| format!("running {}", script.display()))?;
    if !st.success() {
        bail!("{} failed", script.display());
    }
    Ok(())
}

/// [`BUNDLE_SCRIPT`], or the script [`BUNDLE_SCRIPT_ENV`] names.
fn bundle_script() -> Result<PathBuf> {
    if let Some(path) = std::env::var_os(BUNDLE_SCRIPT_ENV) {
        let path = PathBuf::from(path);
        if !path.is_file() {
            bail!("{} (from {BUNDLE_SCRIPT_ENV}) not found", path.display());
        }
        return Ok(path);
    }
    let path = PathBuf::from(BUNDLE_SCRIPT);
    if !path.is_file() {
        let here = std::env::current_dir()
            .map_or("the current directory".into(), |d| d.display().to_string());
        bail!(
            "{BUNDLE_SCRIPT} not found in {here}: run this benchmark from the root of a Husk checkout, or set {BUNDLE_SCRIPT_ENV} to the script"
        );
    }
    Ok(path)
}
