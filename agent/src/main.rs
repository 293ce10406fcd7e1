//! `husk-agent`: the guest's PID 1.
//!
//! As PID 1 it mounts the base filesystems, listens on vsock port `AGENT_VSOCK_PORT` and writes
//! `husk-agent: ready` to the console. `husk-agent --unix PATH` serves on a unix socket for
//! host testing, without mounts, and `Poweroff` just exits.

mod guest;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::thread;

use guest::agent_state::{AgentState, Mode};
use guest::listener::Listener;
use guest::reaper::Reaper;
use guest::server;
use husk_agent::AGENT_VSOCK_PORT;

const USAGE: &str = "usage: husk-agent                     (as PID 1 in a Husk guest)
       husk-agent --unix PATH          (host testing)
       husk-agent vsock-send CID PORT  (stdin to a vsock port, reply to stdout)
       husk-agent container-helper FD  (internal: a container process being set up)";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mode = match args.as_slice() {
        // Checked first: a helper is never the agent, even as pid 1 of a pid namespace.
        [helper, fd] if helper == guest::container::spawn::HELPER_ARG => {
            return guest::container::helper::main(fd)
        }
        // The kernel hands init every command-line word it does not know (e.g. `nomodules`)
        // as an argument: as PID 1 they mean nothing to us.
        _ if std::process::id() == 1 => Mode::Init,
        [flag, path] if flag == "--unix" => Mode::Unix(PathBuf::from(path)),
        [tool, cid, port] if tool == "vsock-send" => return vsock_send(cid, port),
        [flag] if flag == "--version" => {
            println!("husk-agent {}", env!("CARGO_PKG_VERSION"));
            return ExitCode::SUCCESS;
        }
        _ => {
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    let init = matches!(mode, Mode::Init);
    let Err(e) = run(mode);
    eprintln!("husk-agent: {e}");
    if init {
        // PID 1 must not exit (the kernel would panic): end the VM cleanly instead, leaving
        // the error on the console.
        guest::init::reset_vm();
    }
    ExitCode::FAILURE
}

fn vsock_send(cid: &str, port: &str) -> ExitCode {
    let (Ok(cid), Ok(port)) = (cid.parse(), port.parse()) else {
        eprintln!("husk-agent: vsock-send: CID and PORT must be numbers");
        return ExitCode::from(2);
    };
    match guest::vsock_send::run(cid, port) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("husk-agent: vsock-send {cid}:{port}: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(mode: Mode) -> std::io::Result<std::convert::Infallible> {
    guest::container::spawn::ensure_std_fds();
    let listener = match &mode {
        Mode::Init => {
            guest::init::setup();
            // Set before any thread exists: the environment is not thread-safe.
            std::env::set_var("PATH", guest::init::GUEST_PATH);
            Listener::vsock_retrying(AGENT_VSOCK_PORT)?
        }
        Mode::Unix(path) => {
            // Adopt orphans as PID 1 would, so host tests exercise the same reaping.
            nix::sys::prctl::set_child_subreaper(true)?;
            Listener::unix(path)?
        }
    };
    let reaper = Arc::new(Reaper::default());
    let r = reaper.clone();
    thread::Builder::new()
        .name("reaper".into())
        .spawn(move || r.run())?;
    let state = Arc::new(AgentState {
        reaper,
        default_path: std::env::var("PATH").unwrap_or_else(|_| guest::init::GUEST_PATH.into()),
        containers: Default::default(),
        mode,
    });
    match &state.mode {
        Mode::Init => guest::init::announce_ready(),
        Mode::Unix(path) => eprintln!("husk-agent: listening on {}", path.display()),
    }
    server::serve(listener, state)
}
