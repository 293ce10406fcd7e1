//! Signals for a container's init that arrive while the program is still starting.
//!
//! The kernel drops a signal sent to a pid namespace's init while the init leaves it at its
//! default action (the init cannot be killed that way): it is not even queued. `start`
//! returns once the process has exec'd, as runc's does, so a `kill` right after it may find
//! the program still starting, e.g. a shell that has not yet run its `trap`, or has run it
//! but not yet reached the `wait` the trap is meant to interrupt. Under runc the program is
//! through its start-up before `kill` arrives on any ordinary host; in a micro-VM the first
//! moments of a program (every page it touches is new to the guest) are much slower.
//!
//! So for [`GRACE`] after start, a signal reaches the init only once the init has *settled*:
//! it has a handler for the signal (or ignores or blocks it, which the kernel then honours)
//! and sleeps, waiting for something. Until then a thread holds the signal, watching the
//! init; at the end of the grace period it sends it whatever the init's state (a signal the
//! init still leaves at its default action is then dropped, as it would have been at once).
//! Like the kernel's own pending set, one signal of a kind is held at a time; more of the
//! same kind merge into it.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::ExitCell;
use crate::guest::lock::lock;
use crate::guest::reaper::Reaper;

/// How long after start a signal waits for the init to settle.
pub const GRACE: Duration = Duration::from_secs(5);
/// How often a held signal looks at the init.
const POLL: Duration = Duration::from_millis(5);

/// The signals held for one init (bit `n - 1` for signal `n`).
#[derive(Default)]
pub struct Held(Mutex<u64>);

/// Sends `signal` to the init `pid` (a pid namespace's init, started at `started`), or holds
/// it as the module explains. `exit` tells when the init is gone.
pub fn send(
    reaper: &Arc<Reaper>,
    pid: i32,
    signal: i32,
    started: Instant,
    exit: &Arc<ExitCell>,
    held: &Arc<Held>,
) -> nix::Result<()> {
    let left = GRACE.saturating_sub(started.elapsed());
    let catchable = (1..=64).contains(&signal) && !matches!(signal, libc::SIGKILL | libc::SIGSTOP);
    if left.is_zero() || !catchable || settled(pid, signal) != Some(false) {
        return reaper.signal(pid, signal);
    }
    // Checked here so that an unknown signal number fails the request, as a sent one would.
    nix::sys::signal::Signal::try_from(signal)?;
    let bit = 1u64 << (signal - 1);
    {
        let mut pending = lock(&held.0);
        if *pending & bit != 0 {
            return Ok(());
        }
        *pending |= bit;
    }
    let (reaper, exit, held) = (reaper.clone(), exit.clone(), held.clone());
    let deadline = Instant::now() + left;
    std::thread::Builder::new()
        .name(format!("held-sig-{signal}"))
        .spawn(move || {
            while exit.get().is_none()
                && Instant::now() < deadline
                && settled(pid, signal) == Some(false)
            {
                std::thread::sleep(POLL);
            }
            *lock(&held.0) &= !bit;
            let _ = reaper.signal(pid, signal);
        })
        .map(drop)
        .map_err(|_| nix::errno::Errno::EAGAIN)
}

/// Whether `pid` has settled for `signal` (1..=64), from its /proc status; `None` when that
/// cannot be read (the process is gone).
fn settled(pid: i32, signal: i32) -> Option<bool> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    Some(settled_in(&status, signal))
}

/// Settled: it sleeps, and the signal is caught, ignored or blocked rather than left at its
/// default action.
fn settled_in(status: &str, signal: i32) -> bool {
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(str::trim)
    };
    let bit = 1u64 << (signal - 1);
    let has = |name: &str| {
        field(name)
            .and_then(|v| u64::from_str_radix(v, 16).ok())
            .is_some_and(|mask| mask & bit != 0)
    };
    let sleeping = field("State:").is_some_and(|s| s.starts_with('S'));
    sleeping && (has("SigCgt:") || has("SigIgn:") || has("SigBlk:"))
}

#[cfg(test)]
mod tests {
    use super::*;

    // SigCgt 0x4002: SIGINT (2) and SIGTERM (15); SigIgn 0x4: SIGQUIT (3); SigBlk 0x10000:
    // SIGCHLD (17).
    const SLEEPING: &str = "Name:\tsh\nState:\tS (sleeping)\nSigQ:\t0/3841\n\
        SigPnd:\t0000000000000000\nSigBlk:\t0000000000010000\nSigIgn:\t0000000000000004\n\
        SigCgt:\t0000000000004002\n";

    #[test]
    fn a_sleeping_process_has_settled_for_what_it_catches_ignores_or_blocks() {
        for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGQUIT, libc::SIGCHLD] {
            assert!(settled_in(SLEEPING, sig), "{sig}");
        }
        for sig in [libc::SIGUSR1, libc::SIGUSR2, libc::SIGHUP, 64] {
            assert!(!settled_in(SLEEPING, sig), "{sig}");
        }
    }

    #[test]
    fn a_running_process_has_not_settled() {
        let running = SLEEPING.replace("S (sleeping)", "R (running)");
        assert!(!settled_in(&running, libc::SIGTERM));
        let waiting_on_disk = SLEEPING.replace("S (sleeping)", "D (disk sleep)");
        assert!(!settled_in(&waiting_on_disk, libc::SIGTERM));
    }
}
