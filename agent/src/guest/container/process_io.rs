//! The agent's ends of a container process's stdio: pipes, or the master of the pty the
//! helper made.

use std::fs::File;
use std::os::fd::OwnedFd;

/// The agent's ends of a process's stdio.
pub enum Stdio {
    Pipes {
        stdin: File,
        stdout: File,
        stderr: File,
    },
    Pty {
        master: File,
    },
}

/// A process's stdio as the agent forwards it.
pub struct Split {
    /// stdout and stderr (a terminal has only the first).
    pub outputs: [Option<File>; 2],
    /// Where input goes: the pipe, or the pty master.
    pub stdin: File,
    /// The pty master again, for resizes, with a terminal.
    pub pty: Option<File>,
}

impl Stdio {
    /// Separate handles for reading output, writing input and resizing.
    pub fn split(self) -> std::io::Result<Split> {
        Ok(match self {
            Stdio::Pipes {
                stdin,
                stdout,
                stderr,
            } => Split {
                outputs: [Some(stdout), Some(stderr)],
                stdin,
                pty: None,
            },
            Stdio::Pty { master } => Split {
                outputs: [Some(master.try_clone()?), None],
                pty: Some(master.try_clone()?),
                stdin: master,
            },
        })
    }
}

/// The child's stdio fds and, without a terminal, the agent's pipe ends. With a terminal the
/// child starts on /dev/null and opens the pty itself.
pub fn stdio_pair(terminal: bool) -> std::io::Result<([OwnedFd; 3], Option<Stdio>)> {
    if terminal {
        let null = || -> std::io::Result<OwnedFd> {
            Ok(std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/null")?
                .into())
        };
        return Ok(([null()?, null()?, null()?], None));
    }
    let cloexec = nix::fcntl::OFlag::O_CLOEXEC;
    let (in_r, in_w) = nix::unistd::pipe2(cloexec)?;
    let (out_r, out_w) = nix::unistd::pipe2(cloexec)?;
    let (err_r, err_w) = nix::unistd::pipe2(cloexec)?;
    let agent = Stdio::Pipes {
        stdin: in_w.into(),
        stdout: out_r.into(),
        stderr: err_r.into(),
    };
    Ok(([in_r, out_w, err_w], Some(agent)))
}
