//! Husk's host<->guest protocol (`proto`), a blocking host-side client (`client`), and, in the
//! `husk-agent` binary, the guest's PID 1 that serves it.

pub mod client;
pub mod passwd;
pub mod proto;

pub use client::{Attachment, Client, ClientError, ExecEvent, ExecOutput};
pub use proto::{ExecRequest, ExitStatus, AGENT_VSOCK_PORT, PROTOCOL_VERSION, READY_VSOCK_PORT};
