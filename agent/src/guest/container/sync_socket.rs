//! The agent <-> helper channel: a `SOCK_SEQPACKET` socketpair carrying one JSON message per
//! packet (so messages never merge or split), with an fd attached where needed (the pty
//! master). Both ends are close-on-exec in the agent, and the helper's end closes when it
//! execs the container process: EOF after `Ready` means "exec succeeded", like runc's fifo.

use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::time::Duration;

use nix::sys::socket::{
    recvmsg, sendmsg, setsockopt, socketpair, sockopt, AddressFamily, ControlMessage,
    ControlMessageOwned, MsgFlags, SockFlag, SockType,
};
use nix::sys::time::TimeVal;
use oci_spec::runtime::{LinuxNamespaceType, LinuxSeccomp, Process, Spec};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// Largest message accepted (a spec with a big seccomp profile is well below this).
const MAX_MESSAGE: usize = 1 << 20;

/// Agent -> helper.
#[derive(Debug, Serialize, Deserialize)]
pub enum ToHelper {
    /// Become a container's init. `private_shares`: see `shares::private_targets`.
    Init {
        spec: Box<Spec>,
        rootfs: PathBuf,
        private_shares: Vec<PathBuf>,
    },
    /// Join container `init_pid`'s namespaces (the pid one is already joined) and run `process`.
    Exec {
        init_pid: i32,
        namespaces: Vec<LinuxNamespaceType>,
        process: Box<Process>,
        seccomp: Option<LinuxSeccomp>,
    },
    /// Exec the prepared process (init only; exec helpers go on by themselves).
    Start,
}

/// Helper -> agent.
#[derive(Debug, Serialize, Deserialize)]
pub enum FromHelper {
    /// Set-up done; carries the pty master when the process has a terminal.
    Ready,
    /// Set-up or exec failed; the helper exits.
    Error { message: String },
}

/// One end of the channel.
pub struct SyncSocket(OwnedFd);

/// A connected pair, both ends close-on-exec.
pub fn pair() -> io::Result<(SyncSocket, SyncSocket)> {
    let (a, b) = socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )?;
    Ok((SyncSocket(a), SyncSocket(b)))
}

impl SyncSocket {
    /// Adopts the helper's inherited end.
    ///
    /// # Safety
    /// `fd` must be an open socket that nothing else owns.
    pub unsafe fn from_raw(fd: RawFd) -> Self {
        // SAFETY: guaranteed by the caller.
        Self(unsafe { OwnedFd::from_raw_fd(fd) })
    }

    pub fn raw(&self) -> RawFd {
        self.0.as_raw_fd()
    }

    /// Bounds how long `recv` blocks, so a wedged helper cannot hold a request forever.
    pub fn set_timeout(&self, timeout: Duration) -> io::Result<()> {
        let tv = TimeVal::new(timeout.as_secs() as _, 0);
        Ok(setsockopt(&self.0, sockopt::ReceiveTimeout, &tv)?)
    }

    pub fn send<T: Serialize>(&self, msg: &T, fd: Option<RawFd>) -> io::Result<()> {
        let bytes = serde_json::to_vec(msg).map_err(io::Error::other)?;
        let fds = fd.map(|f| [f]);
        let cmsgs: Vec<ControlMessage> = fds.iter().map(|f| ControlMessage::ScmRights(f)).collect();
        sendmsg::<()>(
            self.raw(),
            &[IoSlice::new(&bytes)],
            &cmsgs,
            MsgFlags::empty(),
            None,
        )?;
        Ok(())
    }

    /// The next message and any fd sent with it; `None` when the peer closed its end.
    pub fn recv<T: DeserializeOwned>(&self) -> io::Result<Option<(T, Option<OwnedFd>)>> {
        let mut buf = vec![0u8; MAX_MESSAGE];
        let mut cmsg = nix::cmsg_space!([RawFd; 1]);
        let mut iov = [IoSliceMut::new(&mut buf)];
        let msg = loop {
            match recvmsg::<()>(
                self.raw(),
                &mut iov,
                Some(&mut cmsg),
                MsgFlags::MSG_CMSG_CLOEXEC,
            ) {
                Err(nix::errno::Errno::EINTR) => continue,
                other => break other?,
            }
        };
        let mut fd = None;
        for c in msg.cmsgs()? {
            if let ControlMessageOwned::ScmRights(fds) = c {
                // SAFETY: SCM_RIGHTS just installed these fds in this process; we own them.
                fd = fds.first().map(|&f| unsafe { OwnedFd::from_raw_fd(f) });
            }
        }
        let len = msg.bytes;
        if len == 0 {
            return Ok(None);
        }
        let value = serde_json::from_slice(&buf[..len]).map_err(io::Error::other)?;
        Ok(Some((value, fd)))
    }
}
