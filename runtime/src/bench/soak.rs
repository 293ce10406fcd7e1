//! `husk bench soak` (lab): many container lifecycles in a row, each checked, with a leak
//! check after every batch, to find what only shows after hundreds of containers (a wedge, a
//! leaked monitor, mount, cgroup, socket, page file, lease or fd).
//!
//! Each cycle drives one busybox `sleep 600` container, cloned from the default template,
//! through husk's command line as the other container benchmarks do: `create` (state
//! `created`), `start` (`running`), `exec` of `sh -c 'echo ID 42; exit 7'` (that output, exit
//! status 7), on every [`PAUSE_EVERY`]th cycle `pause` (`paused`), `resume` (`running`) and
//! another exec, on every [`CHECKPOINT_EVERY`]th `checkpoint` (`stopped`), `delete`, `restore
//! --detach` (`running`) and another exec, then `kill ID KILL` (`stopped`) and `delete` (its
//! state gone). `--parallel` cycles run at once, one thread each; after each such batch the
//! [`leaks`](super::leaks) census is compared with the one taken before the soak.
//!
//! Every husk command has a timeout longer than husk's own waits for a guest, so a wedged
//! guest shows as husk's error (with its vCPU report) rather than a hung soak. A failed step
//! prints one line (container, step, error, the monitor's stderr) and the container is
//! force-deleted; the soak goes on. The last line is `soak failures: N, leaks: N`.

use std::ffi::OsStr;
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Result};

use super::fleet::{work_dir, Fleet, Runtime};
use super::leaks::{Census, LeakWatch, Watched};
use super::timing::{run_within, Finished, COMMAND_TIMEOUT};
use super::SoakBench;

/// Every this many cycles a container is also paused and resumed.
const PAUSE_EVERY: usize = 5;
/// Every this many cycles a container is also checkpointed and restored.
const CHECKPOINT_EVERY: usize = 7;
/// A progress line after every this many cycles.
const PROGRESS_EVERY: usize = 10;
/// How long a killed container may take to be reported stopped.
const STOP_TIMEOUT: Duration = Duration::from_secs(60);
/// How much of a monitor's stderr a failure line carries (its end).
const MONITOR_STDERR_TAIL: usize = 600;

/// Runs the soak; whether it ended without failures and leaks.
pub fn run(b: &SoakBench) -> Result<bool> {
    if b.cycles == 0 || b.parallel == 0 {
        bail!("--cycles and --parallel must be at least 1");
    }
    let (work, bundle) = work_dir("husk-bench-soak-")?;
    let rt = Runtime::husk(work.path(), true)?;
    warm_up(&rt, &bundle)?;
    let images = work.path().join("images");
    std::fs::create_dir_all(&images)?;
    let soak = Soak { rt, bundle, images };
    let watched = Watched::husk_with(soak.rt.root())?;
    let mut tally = Tally::new(LeakWatch::new(Census::take(&watched)?));
    println!(
        "soak: {} cycles, {} at a time (pause every {PAUSE_EVERY}th, checkpoint every {CHECKPOINT_EVERY}th)",
        b.cycles, b.parallel
    );
    for first in (1..=b.cycles).step_by(b.parallel) {
        let batch = first..=(first + b.parallel - 1).min(b.cycles);
        tally.failures += soak.batch(batch.clone());
        tally.check_leaks(&Census::take(&watched)?, *batch.end());
        tally.progress(*batch.end(), b.cycles);
    }
    println!("soak failures: {}, leaks: {}", tally.failures, tally.leaks);
    Ok(tally.failures == 0 && tally.leaks == 0)
}

/// One unchecked cycle before the baseline: it builds the default template if there is none,
/// and whatever husk sets up once (the cgroup parents) is there from then on.
fn warm_up(rt: &Runtime, bundle: &Path) -> Result<()> {
    eprintln!("warm-up: one template clone (builds the default template if there is none)");
    let mut warm = Fleet::new(rt);
    warm.launch(bundle, "warm-up")?;
    warm.teardown()
}

/// What the soak has found so far.
struct Tally {
    failures: usize,
    leaks: usize,
    watch: LeakWatch,
    started: Instant,
}

impl Tally {
    fn new(watch: LeakWatch) -> Tally {
        Tally {
            failures: 0,
            leaks: 0,
            watch,
            started: Instant::now(),
        }
    }

    /// Prints and counts what `now` holds beyond the baseline that was not reported yet.
    fn check_leaks(&mut self, now: &Census, after_cycle: usize) {
        for leak in self.watch.new_leaks(now) {
            println!("soak leak after cycle {after_cycle}: {leak}");
            self.leaks += 1;
        }
    }

    /// A progress line when `done` has passed a multiple of [`PROGRESS_EVERY`], and at the end.
    fn progress(&self, done: usize, total: usize) {
        let passed = done / PROGRESS_EVERY > (done - 1) / PROGRESS_EVERY;
        if done != total && !passed {
            return;
        }
        println!(
            "soak: {done}/{total} cycles in {:.1} s; failures {}, leaks {}",
            self.started.elapsed().as_secs_f64(),
            self.failures,
            self.leaks
        );
    }
}

/// What every cycle shares: husk with its `--root`, the bundle, where images go.
struct Soak {
    rt: Runtime,
    bundle: PathBuf,
    images: PathBuf,
}

impl Soak {
    /// Runs the cycles of `batch` at once, one thread each; their failures.
    fn batch(&self, batch: RangeInclusive<usize>) -> usize {
        std::thread::scope(|s| {
            let threads: Vec<_> = batch
                .map(|n| s.spawn(move || Cycle::new(self, n).run()))
                .collect();
            threads
                .into_iter()
                .map(|t| {
                    t.join().unwrap_or_else(|_| {
                        println!("soak failure: a cycle's thread panicked");
                        1
                    })
                })
                .sum()
        })
    }
}

/// A failed step of a cycle.
struct Failed {
    step: &'static str,
    error: anyhow::Error,
}

/// `r`, its error as the failure of `step`.
fn step(step: &'static str, r: Result<()>) -> Result<(), Failed> {
    r.map_err(|error| Failed { step, error })
}

/// One container's life.
struct Cycle<'a> {
    soak: &'a Soak,
    n: usize,
    id: String,
}

impl<'a> Cycle<'a> {
    fn new(soak: &'a Soak, n: usize) -> Self {
        Cycle {
            soak,
            n,
            id: format!("soak-{n}"),
        }
    }

    /// Runs the cycle; its failures: none, the failed step, and the forced cleanup after it
    /// if that fails too.
    fn run(&self) -> usize {
        let Err(failed) = self.steps() else {
            return 0;
        };
        self.report(&failed);
        match self.force_delete() {
            Ok(()) => 1,
            Err(error) => {
                self.report(&Failed {
                    step: "force-delete after the failure",
                    error,
                });
                2
            }
        }
    }

    fn steps(&self) -> Result<(), Failed> {
        step("create", self.create())?;
        step("start", self.verb("start", "running"))?;
        step("exec", self.exec_check())?;
        if self.n.is_multiple_of(PAUSE_EVERY) {
            step("pause", self.verb("pause", "paused"))?;
            step("resume", self.verb("resume", "running"))?;
            step("exec after resume", self.exec_check())?;
        }
        if self.n.is_multiple_of(CHECKPOINT_EVERY) {
            self.checkpoint_restore()?;
        }
        step("kill", self.kill())?;
        step("delete", self.delete())
    }

    /// `create` with a pid file, the monitor's stderr kept; then state `created`.
    fn create(&self) -> Result<()> {
        self.with_monitor(&["create".as_ref()])?;
        self.expect("created")
    }

    /// `husk VERB ID`, then state `want`.
    fn verb(&self, verb: &str, want: &str) -> Result<()> {
        self.husk(&[verb, &self.id])?;
        self.expect(want)
    }

    /// `exec ID sh -c 'echo ID 42; exit 7'`: that output and exit status 7.
    fn exec_check(&self) -> Result<()> {
        let script = format!("echo {} $((6*7)); exit 7", self.id);
        let done = self.run_husk(&["exec", &self.id, "sh", "-c", &script])?;
        let want = format!("{} 42\n", self.id);
        ensure!(
            done.status.code() == Some(7) && done.stdout == want,
            "exec printed {:?} and ended with {}, expected {want:?} and exit status 7; stderr: {}",
            done.stdout,
            done.status,
            one_line(&done.stderr)
        );
        Ok(())
    }

    /// `checkpoint` (state `stopped`), `delete`, `restore --detach` (`running`), an exec.
    fn checkpoint_restore(&self) -> Result<(), Failed> {
        let image = self.image();
        let image_arg = image.to_string_lossy();
        let checkpoint = self.husk(&["checkpoint", "--image-path", &image_arg, &self.id]);
        step(
            "checkpoint",
            checkpoint.and_then(|_| self.expect("stopped")),
        )?;
        step("delete after checkpoint", self.delete())?;
        let restore = ["restore", "--image-path", &image_arg, "--detach"].map(OsStr::new);
        let restored = self.with_monitor(&restore);
        step("restore", restored.and_then(|()| self.expect("running")))?;
        step("exec after restore", self.exec_check())?;
        step(
            "removing the image",
            std::fs::remove_dir_all(&image).map_err(Into::into),
        )
    }

    /// `husk ARGS --bundle B --pid-file P ID` (`create`, or `restore` and its options), the
    /// new monitor's stderr going to the runtime's file for it; it must exit 0.
    fn with_monitor(&self, args: &[&OsStr]) -> Result<()> {
        let rt = &self.soak.rt;
        let mut cmd = rt.command();
        cmd.args(args).arg("--bundle").arg(&self.soak.bundle);
        cmd.arg("--pid-file")
            .arg(rt.pid_file(&self.id))
            .arg(&self.id);
        let done = run_within(&mut cmd, rt.open_monitor_stderr(&self.id)?, COMMAND_TIMEOUT)?;
        ensure!(
            done.status.success(),
            "husk {} ended with {}: {}",
            args[0].to_string_lossy(),
            done.status,
            one_line(&done.stderr)
        );
        Ok(())
    }

    /// `kill ID KILL`, then state `stopped` within [`STOP_TIMEOUT`].
    fn kill(&self) -> Result<()> {
        self.husk(&["kill", &self.id, "KILL"])?;
        self.soak.rt.wait_for(&self.id, "stopped", STOP_TIMEOUT)
    }

    /// `delete ID`, then no state directory and no `state`.
    fn delete(&self) -> Result<()> {
        self.husk(&["delete", &self.id])?;
        self.expect_gone()
    }

    /// After a failure: `delete --force` if the container is still there, and its image gone.
    fn force_delete(&self) -> Result<()> {
        if self.state_dir().exists() {
            self.husk(&["delete", "--force", &self.id])?;
            self.expect_gone()?;
        }
        match std::fs::remove_dir_all(self.image()) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e.into()),
            _ => Ok(()),
        }
    }

    fn expect(&self, want: &str) -> Result<()> {
        let status = self.soak.rt.status(&self.id)?;
        ensure!(status == want, "state says {status}, expected {want}");
        Ok(())
    }

    fn expect_gone(&self) -> Result<()> {
        ensure!(
            !self.state_dir().exists(),
            "{} is still there",
            self.state_dir().display()
        );
        ensure!(
            self.soak.rt.status(&self.id).is_err(),
            "state still answers"
        );
        Ok(())
    }

    /// `husk ARGS`, which must exit 0; its stdout.
    fn husk(&self, args: &[&str]) -> Result<String> {
        let done = self.run_husk(args)?;
        ensure!(
            done.status.success(),
            "husk {} ended with {}: {}",
            args.join(" "),
            done.status,
            one_line(&done.stderr)
        );
        Ok(done.stdout)
    }

    /// `husk ARGS` to its end within [`COMMAND_TIMEOUT`], whatever its status.
    fn run_husk(&self, args: &[&str]) -> Result<Finished> {
        let mut cmd = self.soak.rt.command();
        run_within(cmd.args(args), tempfile::tempfile()?, COMMAND_TIMEOUT)
    }

    fn state_dir(&self) -> PathBuf {
        self.soak.rt.root().join(&self.id)
    }

    fn image(&self) -> PathBuf {
        self.soak.images.join(&self.id)
    }

    /// One line: the container, the step, the error, the end of its monitor's stderr, and
    /// what `ps` finds in the guest now.
    fn report(&self, failed: &Failed) {
        let monitor =
            std::fs::read_to_string(self.soak.rt.monitor_stderr(&self.id)).unwrap_or_default();
        let monitor = one_line(tail(monitor.trim(), MONITOR_STDERR_TAIL));
        println!(
            "soak failure: {} {}: {}; monitor stderr: {monitor:?}; then {}",
            self.id,
            failed.step,
            one_line(&format!("{:#}", failed.error)),
            self.probe()
        );
    }

    /// Whether the guest still answers after a failure, and what runs in it: `husk ps`, which
    /// asks the agent through the monitor (and reports the vCPUs if the agent does not answer).
    fn probe(&self) -> String {
        if !self.state_dir().exists() {
            return "no state directory".into();
        }
        match self.husk(&["ps", "--format", "json", &self.id]) {
            Ok(pids) => format!("ps: guest pids {}", pids.trim()),
            Err(e) => format!("ps: {}", one_line(&format!("{e:#}"))),
        }
    }
}

/// `text` on one line: its lines joined with " | ".
fn one_line(text: &str) -> String {
    text.trim().lines().collect::<Vec<_>>().join(" | ")
}

/// The last `max` bytes of `text` (from a character boundary).
fn tail(text: &str, max: usize) -> &str {
    let mut at = text.len().saturating_sub(max);
    while !text.is_char_boundary(at) {
        at += 1;
    }
    &text[at..]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_multi_line_error_reads_on_one_line() {
        let e = "agent timed out\nvCPU 0: halted rip=0x1\nvCPU 1: runnable\n";
        assert_eq!(
            one_line(e),
            "agent timed out | vCPU 0: halted rip=0x1 | vCPU 1: runnable"
        );
    }

    #[test]
    fn the_tail_keeps_whole_characters() {
        assert_eq!(tail("abcdef", 3), "def");
        assert_eq!(tail("ab", 3), "ab");
        assert_eq!(tail("aé", 1), "");
        assert_eq!(tail("aéb", 2), "b");
    }
}
