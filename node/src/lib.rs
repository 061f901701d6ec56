//! The `node` binary's library: one peer of the decentralized trainer.
//!
//! Bird's eye view: [`net`] owns the libp2p swarm (Kademlia discovery,
//! identify, ping, gossipsub, and the stream protocol for ring payloads) in one
//! task and talks to the rest through channels. [`driver`] owns the protocol
//! state ([`p2p_proto::membership`] and [`p2p_proto::round`]): it turns gossip,
//! ring frames and timer ticks into actions, and those into gossip and stream
//! writes. [`ring_io`] moves framed ring payloads over streams, checking every
//! frame before it reaches the driver; [`state_sync`] hands the whole training
//! state to peers that join late or come back; [`reveal`] serves committed
//! gradients to auditors that compare within a tolerance. [`store`] keeps the peer's identity;
//! [`metrics`] and [`http`] show what the node does to people watching it.
//! [`ledger`] records the peer's work on chain through a durable outbox, in its
//! own task, fed by the driver over a channel it never waits on.
//! [`train`] is the compute half: datasets, models and the flat-gradient
//! training step, on burn.

pub mod cli;
pub mod config_io;
pub mod driver;
pub mod http;
pub mod ledger;
pub mod metrics;
pub mod net;
pub mod reveal;
pub mod ring_io;
pub mod sign;
pub mod state_sync;
pub mod store;
pub mod train;
