//! Terminals for container processes. The helper opens the pty inside the container (its
//! /dev/ptmx leads to the container's own devpts), so `tty` shows /dev/pts/N as seen in
//! there; the master goes to the agent, which bridges it to the host.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;

use nix::fcntl::OFlag;
use nix::pty::{grantpt, posix_openpt, ptsname_r, unlockpt};
use nix::unistd::{dup2_stderr, dup2_stdin, dup2_stdout, fchown, setsid, Gid, Uid};
use oci_spec::runtime::Process;

use super::HelperResult;

nix::ioctl_write_ptr_bad!(set_winsize, libc::TIOCSWINSZ, libc::winsize);

/// Opens a pty, makes its slave the controlling terminal and stdio of this process, and
/// returns the master.
pub fn attach_new(process: &Process) -> HelperResult<OwnedFd> {
    let err = |what: &str, e: nix::Error| format!("console: {what}: {}", e.desc());
    let master = posix_openpt(OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_CLOEXEC)
        .map_err(|e| err("open /dev/ptmx", e))?;
    grantpt(&master).map_err(|e| err("grantpt", e))?;
    unlockpt(&master).map_err(|e| err("unlockpt", e))?;
    let name = ptsname_r(&master).map_err(|e| err("ptsname", e))?;
    let slave = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY)
        .open(&name)
        .map_err(|e| format!("console: open {name}: {e}"))?;
    let user = process.user();
    fchown(&slave, Some(Uid::from_raw(user.uid())), None::<Gid>).map_err(|e| err("chown", e))?;
    if let Some(size) = process.console_size() {
        resize(&slave, size.height() as u16, size.width() as u16).map_err(|e| err("resize", e))?;
    }
    // Already a session leader (the init did setsid) is fine.
    let _ = setsid();
    // SAFETY: TIOCSCTTY takes an int argument; the fd is a valid open terminal.
    if unsafe { libc::ioctl(slave.as_raw_fd(), libc::TIOCSCTTY, 0) } < 0 {
        return Err(format!(
            "console: set controlling terminal: {}",
            std::io::Error::last_os_error()
        ));
    }
    dup2_stdin(&slave).map_err(|e| err("dup2", e))?;
    dup2_stdout(&slave).map_err(|e| err("dup2", e))?;
    dup2_stderr(&slave).map_err(|e| err("dup2", e))?;
    Ok(OwnedFd::from(master))
}

/// Sets a terminal's window size.
pub fn resize(fd: &impl AsFd, rows: u16, cols: u16) -> nix::Result<()> {
    let ws = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads one winsize struct, which lives for the call.
    unsafe { set_winsize(fd.as_fd().as_raw_fd(), &ws) }.map(drop)
}
