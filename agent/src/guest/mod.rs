//! The guest agent, as the `husk-agent` binary runs it.
//!
//! `init` does PID 1's duties; `listener` and `server` accept host connections and serve their
//! requests with the state all connections share (`agent_state`) and what the handlers share
//! about one connection (`host_conn`). `exec` runs processes in the guest, `container` builds
//! OCI containers, `reaper` reaps every child; `clone_init` and `shares` carry out `CloneInit`
//! and `MountShares`; `vsock_send` is a small vsock client tool; `lock` locks a mutex despite
//! poisoning.

pub mod agent_state;
pub mod clone_init;
pub mod container;
pub mod exec;
pub mod host_conn;
pub mod init;
pub mod listener;
pub mod lock;
pub mod reaper;
pub mod server;
pub mod shares;
pub mod vsock_send;
