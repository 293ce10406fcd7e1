//! The guest agent: PID 1 setup, the connection server, exec, OCI containers and child
//! reaping.

pub mod agent_state;
pub mod clone_init;
pub mod container;
pub mod exec;
pub mod host_conn;
pub mod init;
pub mod listener;
pub mod reaper;
pub mod server;
pub mod shares;
pub mod vsock_send;

use agent_state::Mode;

/// Carries out an acknowledged `Poweroff`.
pub fn poweroff(mode: &Mode) {
    match mode {
        Mode::Unix(path) => {
            let _ = std::fs::remove_file(path);
            std::process::exit(0);
        }
        Mode::Init => init::reset_vm(),
    }
}
