//! OCI containers: bundles, the state directory, and the lifecycle commands.
pub mod bundle;
pub mod state;
