//! PID 1 duties inside the guest: base mounts, console, power-off.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::fd::AsRawFd;

use nix::mount::{mount, MsFlags};
use nix::sys::reboot::{reboot, RebootMode};

/// `PATH` for the agent and its children in the guest.
pub const GUEST_PATH: &str = "/bin:/sbin:/usr/bin:/usr/sbin";

/// Line the host watches for on the serial console once the agent accepts connections.
pub const READY_MARKER: &str = "husk-agent: ready";

/// (source, target, fstype, flags, data). devtmpfs comes first: the console lives there.
const MOUNTS: &[(&str, &str, &str, MsFlags, &str)] = &[
    (
        "devtmpfs",
        "/dev",
        "devtmpfs",
        MsFlags::MS_NOSUID,
        "mode=0755",
    ),
    ("proc", "/proc", "proc", NOSUID_NODEV_NOEXEC, ""),
    ("sysfs", "/sys", "sysfs", NOSUID_NODEV_NOEXEC, ""),
    (
        "devpts",
        "/dev/pts",
        "devpts",
        MsFlags::MS_NOSUID.union(MsFlags::MS_NOEXEC),
        "newinstance,ptmxmode=0666,mode=0620",
    ),
    (
        "tmpfs",
        "/dev/shm",
        "tmpfs",
        MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV),
        "mode=1777",
    ),
    (
        "tmpfs",
        "/tmp",
        "tmpfs",
        MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV),
        "mode=1777",
    ),
    ("tmpfs", "/run", "tmpfs", NOSUID_NODEV_NOEXEC, "mode=0755"),
];

const NOSUID_NODEV_NOEXEC: MsFlags = MsFlags::MS_NOSUID
    .union(MsFlags::MS_NODEV)
    .union(MsFlags::MS_NOEXEC);

/// Mounts the base filesystems and points stdio at the console. Failures are logged, not
/// fatal: a half-set-up guest that still answers the host beats a kernel panic.
pub fn setup() {
    for &(source, target, fstype, flags, data) in MOUNTS {
        if let Err(e) = fs::create_dir_all(target) {
            eprintln!("husk-agent: mkdir {target}: {e}");
        }
        let data = (!data.is_empty()).then_some(data);
        if let Err(e) = mount(Some(source), target, Some(fstype), flags, data) {
            eprintln!("husk-agent: mount {fstype} on {target}: {e}");
        }
        if target == "/dev" {
            attach_console();
        }
    }
    // With a private devpts instance, /dev/ptmx must lead to that instance.
    let _ = fs::remove_file("/dev/ptmx");
    if let Err(e) = std::os::unix::fs::symlink("pts/ptmx", "/dev/ptmx") {
        eprintln!("husk-agent: /dev/ptmx: {e}");
    }
}

/// Makes /dev/console our stdin/stdout/stderr. The kernel only opens it for init when the
/// initramfs has the node; here it appears once devtmpfs is mounted.
fn attach_console() {
    let Ok(console) = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/console")
    else {
        return;
    };
    for fd in 0..=2 {
        // SAFETY: dup2 onto the standard fds only replaces what they refer to; no Rust object
        // owns fds 0-2 in a way that could be invalidated.
        unsafe { libc::dup2(console.as_raw_fd(), fd) };
    }
}

/// Writes the ready marker to the serial console.
pub fn announce_ready() {
    match OpenOptions::new().write(true).open("/dev/console") {
        Ok(mut console) => {
            let _ = writeln!(console, "{READY_MARKER}");
        }
        Err(e) => eprintln!("husk-agent: /dev/console: {e}"),
    }
    notify_host();
}

/// Tells the host on `READY_VSOCK_PORT` that the agent listens. A host that does not listen
/// there (the bare VMM, an older runtime) refuses at once and polls instead, so failure is
/// silent.
fn notify_host() {
    use nix::sys::socket::{connect, socket, AddressFamily, SockFlag, SockType, VsockAddr};
    let Ok(fd) = socket(
        AddressFamily::Vsock,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    ) else {
        return;
    };
    let host = VsockAddr::new(libc::VMADDR_CID_HOST, husk_agent::READY_VSOCK_PORT);
    if connect(fd.as_raw_fd(), &host).is_ok() {
        let _ = std::fs::File::from(fd).write_all(b"ready\n");
    }
}

/// Flushes filesystems and resets the VM. The kernel runs with `reboot=k`, so the reset goes
/// through the i8042 port, which the VMM treats as power-off; a plain power-off would only
/// halt the vCPUs (no ACPI).
pub fn reset_vm() {
    nix::unistd::sync();
    let Err(e) = reboot(RebootMode::RB_AUTOBOOT);
    eprintln!("husk-agent: reboot: {e}");
}
