//! The guest agent: PID 1 setup, the connection server, exec, OCI containers and child
//! reaping.

pub mod clone_init;
pub mod container;
pub mod exec;
pub mod init;
pub mod reaper;
pub mod relay;
pub mod server;
pub mod shares;
pub mod vsock_send;

use server::Mode;

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
