//! Test and benchmark support, not part of the production VMM: built only with the
//! `test-guest` feature (which the crate's own tests turn on, and the host benchmarks).
//!
//! - [`guests`]: hand-assembled raw guests and helpers to run and inspect them;
//! - [`bench_restore`]: timing of snapshot restores.

pub mod guests;

use std::path::Path;
use std::time::{Duration, Instant};

use crate::error::VmError;
use crate::snapshot::RestoreOverrides;
use crate::vm::Vm;

/// Restores the snapshot in `dir` `count` times, dropping each VM unrun; returns how long each
/// restore took. For benchmarks: a restore's cost is mapping, not copying, guest memory.
pub fn bench_restore(
    dir: &Path,
    overrides: &RestoreOverrides,
    count: usize,
) -> Result<Vec<Duration>, VmError> {
    (0..count)
        .map(|_| {
            let start = Instant::now();
            let vm = Vm::restore(dir, overrides.clone())?;
            let took = start.elapsed();
            drop(vm);
            Ok(took)
        })
        .collect()
}
