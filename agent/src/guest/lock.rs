//! Locking a mutex whatever a panicked holder left behind.

use std::sync::{Mutex, MutexGuard};

/// Locks `m`, ignoring poisoning: a thread that panicked while holding it must not take the
/// whole agent (PID 1) down with it.
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
