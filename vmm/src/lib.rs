//! The Husk micro-VM monitor.
pub mod bus;
pub mod devices;
