//! Paging a paused container's guest memory out to disk and back: the policy, read
//! from the runtime's configuration file, and the monitor's side of it.
//!
//! `husk pause` freezes the vCPUs at once. Once the pause has lasted `page_out_after_ms`
//! (0: before `pause` returns), every guest page that differs from the template's (or is
//! non-zero, for a cold-booted VM) goes compressed into a page file on disk, made durable,
//! and only then is the RAM handed back. `husk resume` maps it back lazily (each page on the
//! guest's first touch, through userfaultfd) or eagerly, as configured.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use husk_vmm::{PageInMode, PageState};
use serde::Deserialize;

/// The runtime's configuration file unless `$HUSK_CONFIG` names another.
pub const CONFIG_FILE: &str = "/etc/husk/config.toml";
/// Where page files go by default: on disk, since a file on tmpfs would keep the RAM in use.
pub const DEFAULT_PAGE_DIR: &str = "/var/lib/husk/pages";

/// The `[pause]` table of the configuration file.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct PauseConfig {
    /// Page out once a pause has lasted this long; 0 pages out before `pause` returns, and a
    /// negative value never pages out (the VM stays frozen in RAM).
    pub page_out_after_ms: i64,
    /// `"lazy"` (default) or `"eager"`.
    pub resume: String,
    /// Directory of the page files.
    pub page_dir: PathBuf,
}

impl Default for PauseConfig {
    fn default() -> Self {
        PauseConfig {
            page_out_after_ms: 0,
            resume: "lazy".into(),
            page_dir: PathBuf::from(DEFAULT_PAGE_DIR),
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct ConfigFile {
    pause: PauseConfig,
}

impl PauseConfig {
    /// The configuration file's `[pause]` table; defaults when there is no file.
    pub fn load() -> Result<PauseConfig> {
        let path = std::env::var_os("HUSK_CONFIG")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(CONFIG_FILE));
        match std::fs::read_to_string(&path) {
            Ok(text) => Self::parse(&text).with_context(|| format!("{}", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }

    fn parse(text: &str) -> Result<PauseConfig> {
        let file: ConfigFile = toml::from_str(text)?;
        file.pause.mode()?;
        Ok(file.pause)
    }

    fn mode(&self) -> Result<PageInMode> {
        match self.resume.as_str() {
            "lazy" => Ok(PageInMode::Lazy),
            "eager" => Ok(PageInMode::Eager),
            other => anyhow::bail!("pause.resume must be \"lazy\" or \"eager\", not {other:?}"),
        }
    }
}

/// The monitor's paging of a paused guest: pages out after a pause, back in on resume. Clones
/// share the epoch.
#[derive(Clone)]
pub struct PausePaging {
    config: PauseConfig,
    vm: husk_vmm::VmControl,
    /// The template's memory file for a clone (pages equal to it are not stored).
    base: Option<PathBuf>,
    /// This container's page file.
    file: PathBuf,
    /// Bumped by every resume, so a delayed page-out of an earlier pause does nothing.
    epoch: Arc<Mutex<u64>>,
}

impl PausePaging {
    pub fn new(
        config: PauseConfig,
        vm: husk_vmm::VmControl,
        base: Option<PathBuf>,
        id: &str,
    ) -> PausePaging {
        let file = page_file(&config.page_dir, id, std::process::id() as i32);
        PausePaging {
            config,
            vm,
            base,
            file,
            epoch: Arc::new(Mutex::new(0)),
        }
    }

    /// The template's memory file a clone's pages are relative to; `None` for a cold boot.
    pub fn base(&self) -> Option<&Path> {
        self.base.as_deref()
    }

    /// Where this container's page file goes (recorded in its state, for `delete`).
    pub fn file(&self) -> &Path {
        &self.file
    }

    /// Called with the VM just paused: pages out now, later, or never, as configured.
    pub fn paused(&self) -> Result<()> {
        let after = self.config.page_out_after_ms;
        if after < 0 {
            return Ok(());
        }
        // (A guard in the call's argument would live through the call, which locks again.)
        let epoch = *self.epoch.lock().unwrap();
        if after == 0 {
            return self.page_out(epoch);
        }
        let me = self.clone();
        std::thread::Builder::new()
            .name("page-out".into())
            .spawn(move || {
                husk_vmm::confine::thread_started(husk_vmm::confine::ThreadKind::PageOut);
                std::thread::sleep(Duration::from_millis(after as u64));
                if let Err(e) = me.page_out(epoch) {
                    log::error!("paging out: {e:#}");
                }
            })?;
        Ok(())
    }

    /// Brings the memory back (if it was paged out) before the vCPUs go on.
    pub fn resuming(&self) -> Result<()> {
        let mut epoch = self.epoch.lock().unwrap();
        *epoch += 1;
        if let PageState::PagedOut(file) = self.vm.page_state() {
            self.vm
                .page_in(&file, self.config.mode()?)
                .map_err(|e| anyhow::anyhow!("{e}"))
                .context("paging the guest's memory back in")?;
        }
        Ok(())
    }

    /// Pages out unless a resume came since the pause of `epoch`.
    fn page_out(&self, epoch: u64) -> Result<()> {
        let current = self.epoch.lock().unwrap();
        if *current != epoch {
            return Ok(());
        }
        std::fs::create_dir_all(&self.config.page_dir)
            .with_context(|| format!("creating {}", self.config.page_dir.display()))?;
        let report = self
            .vm
            .page_out(&self.file, self.base.as_deref())
            .map_err(|e| anyhow::anyhow!("{e}"))
            .context("paging the guest's memory out")?;
        if std::env::var_os("HUSK_TRACE").is_some() {
            eprintln!("husk monitor: paged out: {report:?}");
        }
        Ok(())
    }

    /// Removes the page file (the VM is gone or never needs it again).
    pub fn remove_file(&self) {
        remove_page_file(&self.file);
    }
}

/// The page file of container `id` whose monitor is `pid`, in `page_dir`.
pub fn page_file(page_dir: &Path, id: &str, pid: i32) -> PathBuf {
    page_dir.join(format!("{id}-{pid}.pages"))
}

/// Removes a page file and the temporary file of a page-out that never finished.
pub fn remove_page_file(file: &Path) {
    let _ = std::fs::remove_file(file);
    let mut tmp = file.as_os_str().to_owned();
    tmp.push(".tmp");
    let _ = std::fs::remove_file(tmp);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pause_table_is_read_and_checked() {
        let c =
            PauseConfig::parse("[pause]\npage_out_after_ms = 250\nresume = \"eager\"\n").unwrap();
        assert_eq!(c.page_out_after_ms, 250);
        assert_eq!(c.mode().unwrap(), PageInMode::Eager);
        assert_eq!(c.page_dir, Path::new(DEFAULT_PAGE_DIR));
        assert_eq!(PauseConfig::parse("").unwrap(), PauseConfig::default());
        let bad = PauseConfig::parse("[pause]\nresume = \"soon\"\n").unwrap_err();
        assert!(format!("{bad:#}").contains("lazy"), "{bad:#}");
        assert!(PauseConfig::parse("[pause]\npage_out_afterms = 1\n").is_err());
    }
}
