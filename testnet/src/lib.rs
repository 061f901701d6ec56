//! The local cluster: starts real `node` processes on loopback, follows their
//! rounds from their JSON logs, and measures the all-reduce against the
//! machine's own TCP ceiling.

pub mod bench;
pub mod cluster;
pub mod process;
pub mod verify;
