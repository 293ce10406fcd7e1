//! The agent's state shared by all connections (`AgentState`), and the kind of system it
//! runs on (`Mode`).

use std::path::PathBuf;
use std::sync::Arc;

use super::container::Containers;
use super::reaper::Reaper;

/// What kind of system the agent runs on; decides what `Poweroff` does.
pub enum Mode {
    /// PID 1 in the guest: power off by resetting the VM.
    Init,
    /// Host testing on a unix socket: exit the agent (removing the socket).
    Unix(PathBuf),
}

impl Mode {
    /// Carries out an acknowledged `Poweroff`.
    pub fn poweroff(&self) {
        match self {
            Mode::Unix(path) => {
                let _ = std::fs::remove_file(path);
                std::process::exit(0);
            }
            Mode::Init => super::init::reset_vm(),
        }
    }
}

/// State shared by all connections.
pub struct AgentState {
    pub reaper: Arc<Reaper>,
    pub mode: Mode,
    /// `PATH` given to exec children unless their request sets one.
    pub default_path: String,
    pub containers: Containers,
}
