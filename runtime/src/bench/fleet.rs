//! Containers of one runtime (Husk cloning from the template, Husk cold-booting, runc) driven
//! through its command line with a private `--root`, for the benchmarks that run real containers.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Barrier;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

use super::setup::make_bundle;
use super::timing::{run_to_files, run_with_stderr, time};
use crate::container::template_choice::NO_TEMPLATE_ENV;

/// The process every benchmark container runs: long enough to outlive any measurement.
const IDLE_PROCESS: &[&str] = &["sleep", "600"];

/// A private work directory (the runtimes' roots, pid files; removed on drop) holding the
/// busybox bundle running [`IDLE_PROCESS`]; the bundle's path.
pub(crate) fn work_dir(prefix: &str) -> Result<(tempfile::TempDir, PathBuf)> {
    let work = tempfile::Builder::new().prefix(prefix).tempdir()?;
    let bundle = work.path().join("bundle");
    make_bundle(&bundle, IDLE_PROCESS)?;
    Ok((work, bundle))
}

/// How long a killed container may take to be reported stopped.
const STOP_TIMEOUT: Duration = Duration::from_secs(60);

/// A runtime binary with a private `--root`, and for Husk whether its VMs are cloned from the
/// template or cold-booted.
pub(crate) struct Runtime {
    pub name: &'static str,
    exe: PathBuf,
    /// Holds `root/` and the pid files.
    dir: PathBuf,
    /// `Some(true)`: set HUSK_NO_TEMPLATE=1; `Some(false)`: unset it (so that a caller's
    /// setting cannot turn the template kind into a second cold kind); `None`: leave it.
    no_template: Option<bool>,
}

impl Runtime {
    pub fn husk(work: &Path, template: bool) -> Result<Runtime> {
        let (name, tag) = match template {
            true => ("husk template", "husk-template"),
            false => ("husk cold", "husk-cold"),
        };
        Runtime::new(
            name,
            super::setup::installed_husk(work)?.husk,
            work.join(tag),
            Some(!template),
        )
    }

    pub fn runc(work: &Path) -> Result<Runtime> {
        Runtime::new("runc", "runc".into(), work.join("runc"), None)
    }

    fn new(
        name: &'static str,
        exe: PathBuf,
        dir: PathBuf,
        no_template: Option<bool>,
    ) -> Result<Runtime> {
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(Runtime {
            name,
            exe,
            dir,
            no_template,
        })
    }

    /// Its `--root`.
    pub fn root(&self) -> PathBuf {
        self.dir.join("root")
    }

    /// Where the monitor of `id` writes its stderr (its last words if it dies).
    pub fn monitor_stderr(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.create-stderr"))
    }

    /// A new, empty [`Self::monitor_stderr`] file for the `create` (or `restore`) of `id`;
    /// readable too, so that a failed create's error message can be read back from it.
    pub fn open_monitor_stderr(&self, id: &str) -> Result<std::fs::File> {
        let path = self.monitor_stderr(id);
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .with_context(|| format!("creating {}", path.display()))
    }

    pub fn pid_file(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.pid"))
    }

    /// The container's pid (for Husk: its monitor's) from the `--pid-file` of its create.
    pub fn pid(&self, id: &str) -> Result<i32> {
        let path = self.pid_file(id);
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        text.trim()
            .parse()
            .with_context(|| format!("{}: not a pid: {text:?}", path.display()))
    }

    /// `exe --root ROOT` with this kind's environment; the caller adds the subcommand.
    pub fn command(&self) -> Command {
        let mut cmd = Command::new(&self.exe);
        cmd.arg("--root").arg(self.root());
        match self.no_template {
            Some(true) => cmd.env(NO_TEMPLATE_ENV, "1"),
            Some(false) => cmd.env_remove(NO_TEMPLATE_ENV),
            None => &mut cmd,
        };
        cmd
    }

    /// `create` + `start` of `id`: the time from spawning create until start has returned.
    fn launch(&self, bundle: &Path, id: &str) -> Result<Duration> {
        let mut create = self.command();
        create.arg("create").arg("--bundle").arg(bundle);
        create.arg("--pid-file").arg(self.pid_file(id)).arg(id);
        let mut start = self.command();
        start.args(["start", id]);
        // Kept in the work directory: if the container dies before `start`, the monitor's
        // last words are there.
        let stderr_path = self.monitor_stderr(id);
        let stderr = self.open_monitor_stderr(id)?;
        let began = Instant::now();
        run_with_stderr(&mut create, stderr)?;
        time(&mut start).map_err(|e| {
            let monitor = std::fs::read_to_string(&stderr_path).unwrap_or_default();
            e.context(format!("the monitor's stderr: {:?}", monitor.trim()))
        })?;
        Ok(began.elapsed())
    }

    /// Runs `exe --root ROOT ARGS` to its end; an error if it fails.
    pub fn invoke(&self, args: &[&str]) -> Result<Duration> {
        time(self.command().args(args))
    }

    /// The status `state` reports (`created`, `running`, `stopped`, …).
    pub fn status(&self, id: &str) -> Result<String> {
        let (_, out) = run_to_files(self.command().args(["state", id]))?;
        status_of(&out).with_context(|| format!("{} state {id}: no status in {out:?}", self.name))
    }

    /// Polls `state` until it reports `want`, for at most `limit`.
    pub fn wait_for(&self, id: &str, want: &str, limit: Duration) -> Result<()> {
        let deadline = Instant::now() + limit;
        loop {
            let status = self.status(id)?;
            if status == want {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "{} container {id} is still {status}, not {want}, after {limit:?}",
                    self.name
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `kill ID KILL`, wait for `stopped`, `delete ID`; `delete --force` if that fails (and
    /// the failure is still reported). Nothing to do for an id whose create failed: both
    /// runtimes remove the state directory then.
    fn teardown(&self, id: &str) -> Result<()> {
        if !self.root().join(id).exists() {
            return Ok(());
        }
        // Ignored: a container whose process has exited already cannot be killed.
        let _ = run_to_files(self.command().args(["kill", id, "KILL"]));
        let clean = self
            .wait_for(id, "stopped", STOP_TIMEOUT)
            .and_then(|()| time(self.command().args(["delete", id])));
        if let Err(e) = clean {
            time(self.command().args(["delete", "--force", id]))
                .with_context(|| format!("{e:#}; and then"))?;
            return Err(e.context(format!("tearing down {} container {id}", self.name)));
        }
        Ok(())
    }
}

/// The `status` field of `state`'s JSON.
fn status_of(state_json: &str) -> Option<String> {
    let v: serde_json::Value = serde_json::from_str(state_json).ok()?;
    Some(v.get("status")?.as_str()?.to_string())
}

/// Containers of one runtime that must not outlive the benchmark: [`Fleet::teardown`] ends
/// them, and dropping the fleet does it too, so an error on the way leaves no VM behind.
pub(crate) struct Fleet<'a> {
    runtime: &'a Runtime,
    ids: Vec<String>,
}

impl<'a> Fleet<'a> {
    pub fn new(runtime: &'a Runtime) -> Self {
        Fleet {
            runtime,
            ids: Vec::new(),
        }
    }

    pub fn ids(&self) -> &[String] {
        &self.ids
    }

    /// Creates and starts `id`; its create+start time.
    pub fn launch(&mut self, bundle: &Path, id: &str) -> Result<Duration> {
        // Claimed before create: a create that fails half-way still gets cleaned up.
        self.ids.push(id.to_string());
        self.runtime.launch(bundle, id)
    }

    /// Creates and starts all of `ids` at once, one thread each (released together by a
    /// barrier); each one's create+start time, in the order of `ids`.
    pub fn launch_all(&mut self, bundle: &Path, ids: &[String]) -> Result<Vec<Duration>> {
        self.ids.extend_from_slice(ids);
        let rt = self.runtime;
        let barrier = Barrier::new(ids.len());
        let results: Vec<Result<Duration>> = std::thread::scope(|s| {
            let threads: Vec<_> = ids
                .iter()
                .map(|id| {
                    let barrier = &barrier;
                    s.spawn(move || {
                        barrier.wait();
                        rt.launch(bundle, id)
                    })
                })
                .collect();
            threads
                .into_iter()
                .map(|t| {
                    t.join()
                        .unwrap_or_else(|_| Err(anyhow!("a launch thread panicked")))
                })
                .collect()
        });
        results.into_iter().collect()
    }

    /// Tears every container down, each even if another fails; the first failure.
    pub fn teardown(&mut self) -> Result<()> {
        let mut first = None;
        for id in std::mem::take(&mut self.ids) {
            if let Err(e) = self.runtime.teardown(&id) {
                first.get_or_insert(e);
            }
        }
        first.map_or(Ok(()), Err)
    }
}

impl Drop for Fleet<'_> {
    fn drop(&mut self) {
        if let Err(e) = self.teardown() {
            eprintln!("teardown: {e:#}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_comes_from_the_state_json() {
        let json = r#"{"ociVersion":"1.0.2","id":"a","status":"running","pid":42}"#;
        assert_eq!(status_of(json).as_deref(), Some("running"));
        assert_eq!(status_of(r#"{"id":"a"}"#), None);
        assert_eq!(status_of("container does not exist"), None);
    }
}
