//! The local cluster: starts real `node` processes on loopback, follows their
//! rounds from their JSON logs, and measures the all-reduce against the
//! machine's own TCP ceiling. [`chain`] runs a local Anvil with the ledger
//! contract deployed. [`train`] is the training testnet: real training on
//! Fashion-MNIST through the ring, recorded on chain. [`chaos`] trains the same
//! way while peers are killed and restarted at random, then checks agreement and
//! the chain. [`report`] writes what a run did as JSON and Markdown. [`sim`]
//! simulates rounds of 16 to 1,000 peers on WAN links with the ring's own state
//! machine, checked against the real all-reduce on this machine.

pub mod bench;
pub mod chain;
pub mod chaos;
pub mod cluster;
pub mod process;
pub mod report;
pub mod sim;
pub mod train;
pub mod verify;
