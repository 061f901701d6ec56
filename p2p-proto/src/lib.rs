//! Pure protocol library of the trainer: everything two peers must agree on, with
//! no sockets, no runtime and no clock of its own.
//!
//! Data flows through it in this order during one round:
//!
//! 1. [`membership`] decides, from gossiped heartbeats, the ring of the round
//!    (every honest peer computes the same ring; no peer is special).
//! 2. [`fixed`] clips a peer's f32 gradient and encodes it as fixed-point
//!    integers, so that sums are exact and order-independent.
//! 3. [`chunk`] splits the vector into one chunk per ring member, and each chunk
//!    into segments that travel as one frame each; [`hash`] commits to them.
//! 4. [`round`] gossips the commit, runs [`ring`] (reduce-scatter, then
//!    all-gather) and certifies the result with every member's `Done`; in an
//!    audited attempt [`sumcheck`] then checks every member's partial sums.
//!    A run that compresses ([`compress`]: int8, top-k) commits to each
//!    member's payload instead, and the ring gathers the payloads unchanged
//!    for every member to decode and add. A hierarchical run ([`hier`]) runs
//!    the ring in groups, then across the groups.
//! 5. [`message`] defines every message on the wire and [`codec`] frames it
//!    with a version byte and a size limit checked before any allocation.
//!
//! Time and randomness are always passed in, so every state machine here is
//! deterministic and tested without a network.

pub mod audit;
pub mod chunk;
pub mod codec;
pub mod compress;
pub mod demo;
pub mod fixed;
pub mod hash;
pub mod hier;
pub mod membership;
pub mod message;
pub mod ring;
pub mod round;
pub mod state;
pub mod sumcheck;

pub use codec::{FrameError, MAX_FRAME_BYTES, PROTOCOL_VERSION, decode_frame, encode_frame};
pub use fixed::FixedPoint;
pub use hash::Hash;
pub use message::{Gossip, PeerKey, RingFrame, RunId};
