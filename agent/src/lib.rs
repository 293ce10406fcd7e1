//! Husk's host<->guest protocol (`proto`), a blocking host-side client (`client`), what both
//! sides read of `/proc/self/mountinfo` (`mountinfo`), the OCI hook runner both sides use
//! (`oci_hook`), and, in the `husk-agent` binary, the guest's PID 1 that serves it.

pub mod client;
pub mod mountinfo;
pub mod oci_hook;
pub mod passwd;
pub mod proto;

pub use client::{Attachment, Client, ClientError, ExecEvent, ExecOutput};
pub use proto::{ExecRequest, ExitStatus, AGENT_VSOCK_PORT, PROTOCOL_VERSION, READY_VSOCK_PORT};
