//! `husk bench pause --container` (lab): what pausing costs and saves on a real container. One
//! busybox `sleep 600` container cloned from the default template: its monitor's memory
//! (/proc/PID/smaps_rollup: Rss, Pss, Private_Dirty) running, then paused (the guest's memory
//! paged out as `[pause]` in the runtime's configuration says), then resumed; with the time
//! `husk pause` and `husk resume` took. Last line: `paused/running pss ratio: <ratio>`.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use super::fleet::{work_dir, Fleet, Runtime};
use super::stats::{kib_field, ms};

/// How long the container idles before the first reading (late guest work settles).
const SETTLE: Duration = Duration::from_secs(3);
const RUNNING_TIMEOUT: Duration = Duration::from_secs(60);

/// The monitor's memory at one moment, KiB.
struct Reading {
    rss: u64,
    pss: u64,
    private_dirty: u64,
}

impl Reading {
    fn of(pid: i32) -> Result<Reading> {
        let path = format!("/proc/{pid}/smaps_rollup");
        let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
        let field = |name: &str| {
            kib_field(&text, name).with_context(|| format!("no {name} line in {path}"))
        };
        Ok(Reading {
            rss: field("Rss:")?,
            pss: field("Pss:")?,
            private_dirty: field("Private_Dirty:")?,
        })
    }
}

impl std::fmt::Display for Reading {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Rss {} KiB, Pss {} KiB, Private_Dirty {} KiB",
            self.rss, self.pss, self.private_dirty
        )
    }
}

pub fn run() -> Result<()> {
    let (work, bundle) = work_dir("husk-bench-pause-")?;
    let rt = Runtime::husk(work.path(), true)?;
    let mut fleet = Fleet::new(&rt);
    fleet.launch(&bundle, "paused")?;
    rt.wait_for("paused", "running", RUNNING_TIMEOUT)?;
    std::thread::sleep(SETTLE);
    let pid = rt.pid("paused")?;
    let running = Reading::of(pid)?;
    println!("running:  {running}");
    let pause = timed(&rt, "pause")?;
    let paused = Reading::of(pid)?;
    println!("paused:   {paused} (husk pause took {:.1} ms)", ms(pause));
    let resume = timed(&rt, "resume")?;
    rt.wait_for("paused", "running", RUNNING_TIMEOUT)?;
    println!(
        "resumed:  {} (husk resume took {:.1} ms)",
        Reading::of(pid)?,
        ms(resume)
    );
    fleet.teardown()?;
    println!(
        "paused/running pss ratio: {:.3}",
        paused.pss as f64 / running.pss as f64
    );
    Ok(())
}

fn timed(rt: &Runtime, verb: &str) -> Result<Duration> {
    let began = Instant::now();
    rt.invoke(&[verb, "paused"])?;
    Ok(began.elapsed())
}
