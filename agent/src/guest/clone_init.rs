//! Making a guest restored from a template its own: every clone wakes with the template's
//! wall clock and the template's random pool, which sibling clones share until told apart.

use std::fs::OpenOptions;
use std::os::fd::AsRawFd;

/// `RNDADDENTROPY`: `_IOW('R', 0x03, int[2])`.
const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;
/// `RNDRESEEDCRNG`: `_IO('R', 0x07)`; makes the kernel's generator use the new input now
/// rather than at its next scheduled reseed.
const RNDRESEEDCRNG: libc::c_ulong = 0x5207;
/// At most this much entropy is taken from one request (the host sends 64 bytes).
const MAX_ENTROPY: usize = 512;

/// Sets the wall clock and reseeds the kernel's random generator from `entropy`.
pub fn make_unique(time_ns: u64, entropy: &[u8]) -> Result<(), String> {
    set_clock(time_ns)?;
    add_entropy(entropy)
}

fn set_clock(time_ns: u64) -> Result<(), String> {
    let ts = libc::timespec {
        tv_sec: (time_ns / 1_000_000_000) as libc::time_t,
        tv_nsec: (time_ns % 1_000_000_000) as libc::c_long,
    };
    // SAFETY: `ts` is a valid timespec that lives across the call.
    if unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) } != 0 {
        return Err(format!(
            "setting the clock: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

/// `struct rand_pool_info` with its trailing buffer.
#[repr(C)]
struct PoolInfo {
    entropy_count: libc::c_int,
    buf_size: libc::c_int,
    buf: [u8; MAX_ENTROPY],
}

fn add_entropy(entropy: &[u8]) -> Result<(), String> {
    let n = entropy.len().min(MAX_ENTROPY);
    let mut info = PoolInfo {
        entropy_count: (n * 8) as libc::c_int,
        buf_size: n as libc::c_int,
        buf: [0; MAX_ENTROPY],
    };
    info.buf[..n].copy_from_slice(&entropy[..n]);
    let dev = OpenOptions::new()
        .write(true)
        .open("/dev/urandom")
        .map_err(|e| format!("opening /dev/urandom: {e}"))?;
    let fd = dev.as_raw_fd();
    // SAFETY: `info` is a rand_pool_info whose buf_size bytes follow its header, as the ioctl
    // expects; the kernel only reads it.
    if unsafe { libc::ioctl(fd, RNDADDENTROPY as _, &info as *const PoolInfo) } != 0 {
        return Err(format!(
            "adding entropy: {}",
            std::io::Error::last_os_error()
        ));
    }
    // SAFETY: RNDRESEEDCRNG takes no argument.
    if unsafe { libc::ioctl(fd, RNDRESEEDCRNG as _) } != 0 {
        return Err(format!(
            "reseeding the random generator: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}
