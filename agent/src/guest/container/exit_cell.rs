//! A container init's exit status as the agent keeps it: set once by a watcher thread, waited
//! for by `WaitContainer`, `DeleteContainer` and the stdio relay.

use std::sync::mpsc::Receiver;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use husk_agent::proto::ExitStatus;

use super::HelperResult;
use crate::guest::lock::lock;

/// A container init's exit status, set once by its watcher thread.
#[derive(Default)]
pub struct ExitCell {
    status: Mutex<Option<ExitStatus>>,
    changed: Condvar,
}

impl ExitCell {
    fn set(&self, status: ExitStatus) {
        *lock(&self.status) = Some(status);
        self.changed.notify_all();
    }

    pub fn get(&self) -> Option<ExitStatus> {
        *lock(&self.status)
    }

    /// Blocks until the status is known.
    pub fn wait(&self) -> ExitStatus {
        self.wait_for(Duration::MAX).unwrap_or_default()
    }

    pub fn wait_for(&self, timeout: Duration) -> Option<ExitStatus> {
        let guard = lock(&self.status);
        let (guard, _) = self
            .changed
            .wait_timeout_while(guard, timeout, |s| s.is_none())
            .unwrap_or_else(|p| p.into_inner());
        *guard
    }
}

/// Records the init's exit status in `cell` when the reaper delivers it.
pub fn watch_exit(pid: i32, status: Receiver<ExitStatus>, cell: Arc<ExitCell>) -> HelperResult<()> {
    std::thread::Builder::new()
        .name(format!("ctr-wait-{pid}"))
        .spawn(move || cell.set(status.recv().unwrap_or_default()))
        .map(drop)
        .map_err(|e| format!("exit watcher thread: {e}"))
}
