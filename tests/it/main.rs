//! Integration tests: real `node` processes on 127.0.0.1 with ephemeral ports.

mod allreduce;
mod bad_input;
mod bootstrap_killed;
mod byzantine;
mod churn;
mod contracts;
mod identity;
mod ledger;
mod observe;
mod strategies;
mod train;
mod train_ring;
