//! Handing a training state to a peer that joins late or comes back, and
//! deciding whether to trust it.
//!
//! A state is the parameter vector followed by the optimizer's moment vectors,
//! as little-endian f32 bytes, cut into [`STATE_CHUNK_BYTES`] chunks. The
//! [`StateHeader`] lists every chunk's blake3; [`Assembler`] takes the chunks
//! in order and refuses any whose bytes or position do not match, before it
//! allocates more than the header announced, and only for a size the joiner
//! expects from its own model.
//!
//! Whether the state is the run's is decided by [`Statements`]: every peer
//! states, in signed gossip, which parameter hash it holds for which round
//! (heartbeats carry a [`StateTag`]; a round's commits carry the hash its
//! gradients were computed on). A snapshot is accepted when a strict majority
//! of the peers that are at that round state its hash, so one stale or lying
//! server cannot hand out other parameters on its own.

use crate::hash::Hash;
use crate::message::{PeerKey, StateChunk, StateHeader, StateTag};
use std::collections::{BTreeMap, BTreeSet};

/// Bytes per state chunk: one frame each, well below the frame limit.
pub const STATE_CHUNK_BYTES: usize = 1 << 20;
/// Largest state accepted (parameters and moments together), whatever the header says.
pub const MAX_STATE_BYTES: u64 = 16 << 30;
/// Rounds of statements kept, counting back from the newest.
const STATEMENT_ROUNDS: u64 = 64;

/// Why a state transfer was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StateError {
    #[error(
        "the state holds {got} parameters and {moments} moment vectors, but this peer's model expects \
         {want} parameters and {want_moments}: the peer serves another model"
    )]
    Shape { got: u64, moments: u8, want: u64, want_moments: u8 },
    #[error("a state of {bytes} bytes is over the {MAX_STATE_BYTES}-byte limit")]
    TooLarge { bytes: u64 },
    #[error("the header lists {got} chunk hashes for {bytes} bytes, which take {want} chunks")]
    ChunkCount { got: usize, want: usize, bytes: u64 },
    #[error("chunk {index} arrived where chunk {expected} was due")]
    OutOfOrder { index: u32, expected: u32 },
    #[error("chunk {index} holds {got} bytes, not {want}")]
    ChunkSize { index: u32, got: usize, want: usize },
    #[error("chunk {index} does not match its hash: altered in transit or by the sender")]
    ChunkHash { index: u32 },
    #[error("the state is for another run")]
    WrongRun,
    #[error("the peer sent the state of round {got}, not of round {want}")]
    WrongRound { got: u64, want: u64 },
}

/// Cuts `bytes` into chunks and hashes each.
pub fn chunk_hashes(bytes: &[u8]) -> Vec<Hash> {
    bytes.chunks(STATE_CHUNK_BYTES).map(|c| *blake3::hash(c).as_bytes()).collect()
}

/// The bytes of a state: parameters, then each moment vector, little-endian f32.
pub fn state_bytes(params: &[f32], moments: &[&[f32]]) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 * params.len() * (1 + moments.len()));
    for v in std::iter::once(params).chain(moments.iter().copied()) {
        for x in v {
            out.extend_from_slice(&x.to_le_bytes());
        }
    }
    out
}

/// The chunk frames of `bytes`, in order.
pub fn chunks(bytes: &[u8]) -> impl Iterator<Item = StateChunk> + '_ {
    bytes.chunks(STATE_CHUNK_BYTES).enumerate().map(|(i, c)| StateChunk { index: i as u32, bytes: c.to_vec() })
}

/// A received state, split back into vectors.
#[derive(Debug, Clone, PartialEq)]
pub struct State {
    pub header: StateHeader,
    pub params: Vec<f32>,
    pub moments: Vec<Vec<f32>>,
}

/// Reassembles a state from its chunks, checking each against the header.
#[derive(Debug)]
pub struct Assembler {
    header: StateHeader,
    total: usize,
    bytes: Vec<u8>,
    next: u32,
}

impl Assembler {
    /// Checks `header` against what the joiner expects (`params` values and `moments` moment
    /// vectors for `round` of its run) before anything is allocated.
    pub fn new(
        header: StateHeader,
        run: crate::message::RunId,
        round: u64,
        params: u64,
        moments: u8,
    ) -> Result<Self, StateError> {
        if header.run != run {
            return Err(StateError::WrongRun);
        }
        if header.tag.round != round {
            return Err(StateError::WrongRound { got: header.tag.round, want: round });
        }
        if header.params != params || header.moments != moments {
            return Err(StateError::Shape {
                got: header.params,
                moments: header.moments,
                want: params,
                want_moments: moments,
            });
        }
        let bytes = 4 * params * (1 + u64::from(moments));
        if bytes > MAX_STATE_BYTES {
            return Err(StateError::TooLarge { bytes });
        }
        let want = (bytes as usize).div_ceil(STATE_CHUNK_BYTES);
        if header.chunk_hashes.len() != want {
            return Err(StateError::ChunkCount { got: header.chunk_hashes.len(), want, bytes });
        }
        Ok(Self { header, total: bytes as usize, bytes: Vec::with_capacity(bytes as usize), next: 0 })
    }

    /// Whether every chunk has arrived.
    pub fn is_complete(&self) -> bool {
        self.next as usize == self.header.chunk_hashes.len()
    }

    /// Takes the next chunk.
    pub fn push(&mut self, chunk: StateChunk) -> Result<(), StateError> {
        if chunk.index != self.next || self.is_complete() {
            return Err(StateError::OutOfOrder { index: chunk.index, expected: self.next });
        }
        let want = (self.total - self.bytes.len()).min(STATE_CHUNK_BYTES);
        if chunk.bytes.len() != want {
            return Err(StateError::ChunkSize { index: chunk.index, got: chunk.bytes.len(), want });
        }
        if *blake3::hash(&chunk.bytes).as_bytes() != self.header.chunk_hashes[chunk.index as usize] {
            return Err(StateError::ChunkHash { index: chunk.index });
        }
        self.bytes.extend_from_slice(&chunk.bytes);
        self.next += 1;
        Ok(())
    }

    /// The state, once complete.
    pub fn finish(self) -> Option<State> {
        if !self.is_complete() {
            return None;
        }
        let n = self.header.params as usize;
        let floats: Vec<f32> =
            self.bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
        let mut vectors = floats.chunks(n.max(1)).map(<[f32]>::to_vec);
        let params = if n == 0 { Vec::new() } else { vectors.next().unwrap_or_default() };
        let moments = if n == 0 { vec![Vec::new(); self.header.moments as usize] } else { vectors.collect() };
        Some(State { header: self.header, params, moments })
    }
}

/// What the statements say about a snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// A strict majority of the peers at that round state this hash.
    Agreed { agree: usize, of: usize },
    /// A strict majority states another hash: the snapshot is not the run's.
    Refuted { agree: usize, disagree: usize, of: usize },
    /// Not enough statements yet; `disagree` is the largest group stating another hash.
    Pending { agree: usize, disagree: usize, of: usize },
}

/// Signed statements of which parameter hash each peer holds for which round.
#[derive(Debug, Default)]
pub struct Statements {
    by_round: BTreeMap<u64, BTreeMap<PeerKey, Hash>>,
    latest: BTreeMap<PeerKey, u64>,
}

impl Statements {
    /// Notes that `peer` holds `tag` (from its heartbeat, or from its commit for `tag.round`).
    /// Each peer's statements are kept for its last [`STATEMENT_ROUNDS`] rounds: a peer
    /// stating a round far ahead (a liar, or one this peer is far behind) drops only its own.
    pub fn note(&mut self, peer: &str, tag: StateTag) {
        self.by_round.entry(tag.round).or_default().insert(peer.to_owned(), tag.param_hash);
        let latest = self.latest.entry(peer.to_owned()).or_insert(tag.round);
        *latest = (*latest).max(tag.round);
        let keep = latest.saturating_sub(STATEMENT_ROUNDS);
        let old: Vec<u64> = self.by_round.range(..keep).map(|(r, _)| *r).collect();
        for r in old {
            let m = self.by_round.get_mut(&r).expect("a round just listed");
            m.remove(peer);
            if m.is_empty() {
                self.by_round.remove(&r);
            }
        }
    }

    /// Keeps only the peers `keep` says to (the peers membership still knows).
    pub fn retain(&mut self, mut keep: impl FnMut(&str) -> bool) {
        self.latest.retain(|p, _| keep(p));
        for m in self.by_round.values_mut() {
            m.retain(|p, _| self.latest.contains_key(p));
        }
    }

    /// Forgets a peer (it left or was forgotten by membership).
    pub fn forget(&mut self, peer: &str) {
        self.latest.remove(peer);
        for m in self.by_round.values_mut() {
            m.remove(peer);
        }
    }

    /// The hash `peer` stated for `round`, if any.
    pub fn of(&self, peer: &str, round: u64) -> Option<Hash> {
        self.by_round.get(&round).and_then(|m| m.get(peer)).copied()
    }

    /// Judges the hash `hash` for `round` by the statements of `peers` (the live peers other
    /// than the judge that are not themselves fetching a state): the peers whose newest
    /// statement is for `round` or later count; a strict majority of them must state `hash`.
    pub fn verdict(&self, round: u64, hash: &Hash, peers: &BTreeSet<PeerKey>) -> Verdict {
        let at: Vec<&PeerKey> = peers.iter().filter(|p| self.latest.get(*p).is_some_and(|r| *r >= round)).collect();
        let of = at.len();
        let stated = self.by_round.get(&round);
        let agree = at.iter().filter(|p| stated.and_then(|m| m.get(**p)) == Some(hash)).count();
        let mut others: BTreeMap<&Hash, usize> = BTreeMap::new();
        for p in &at {
            if let Some(h) = stated.and_then(|m| m.get(*p))
                && h != hash
            {
                *others.entry(h).or_default() += 1;
            }
        }
        let disagree = others.values().copied().max().unwrap_or(0);
        if of > 0 && 2 * agree > of {
            Verdict::Agreed { agree, of }
        } else if 2 * disagree > of {
            Verdict::Refuted { agree, disagree, of }
        } else {
            Verdict::Pending { agree, disagree, of }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::RunId;

    fn header(params: &[f32], moments: &[&[f32]], round: u64) -> (StateHeader, Vec<u8>) {
        let bytes = state_bytes(params, moments);
        let h = StateHeader {
            run: RunId::from_name("s"),
            tag: StateTag { round, param_hash: [1; 32] },
            cursor: 77,
            step: 3,
            optimizer_hash: [2; 32],
            params: params.len() as u64,
            moments: moments.len() as u8,
            chunk_hashes: chunk_hashes(&bytes),
            settlement: Default::default(),
        };
        (h, bytes)
    }

    #[test]
    fn a_state_round_trips_through_its_chunks() {
        // Over three chunks, the last one partial.
        let n = STATE_CHUNK_BYTES / 4 + 1000;
        let params: Vec<f32> = (0..n).map(|i| i as f32 * 0.5).collect();
        let m: Vec<f32> = (0..n).map(|i| -(i as f32)).collect();
        let v: Vec<f32> = (0..n).map(|i| i as f32 * 2.0).collect();
        let (h, bytes) = header(&params, &[&m, &v], 9);
        assert_eq!(h.chunk_hashes.len(), 4);
        let mut a = Assembler::new(h.clone(), h.run, 9, n as u64, 2).unwrap();
        for c in chunks(&bytes) {
            a.push(c).unwrap();
        }
        let s = a.finish().unwrap();
        assert_eq!((s.params, s.moments), (params, vec![m, v]));
        // An empty state (the demonstration run) has no chunks.
        let (h, _) = header(&[], &[], 2);
        let a = Assembler::new(h.clone(), h.run, 2, 0, 0).unwrap();
        assert!(a.is_complete());
        assert_eq!(a.finish().unwrap().params, Vec::<f32>::new());
    }

    #[test]
    fn altered_missing_or_misplaced_chunks_and_wrong_shapes_are_refused() {
        let params: Vec<f32> = (0..(STATE_CHUNK_BYTES / 2)).map(|i| i as f32).collect();
        let (h, bytes) = header(&params, &[&params], 4);
        let chunks: Vec<StateChunk> = chunks(&bytes).collect();
        let fresh = || Assembler::new(h.clone(), h.run, 4, params.len() as u64, 1).unwrap();
        let mut a = fresh();
        let mut bad = chunks[0].clone();
        bad.bytes[17] ^= 1;
        assert_eq!(a.push(bad), Err(StateError::ChunkHash { index: 0 }));
        let mut a = fresh();
        assert_eq!(a.push(chunks[1].clone()), Err(StateError::OutOfOrder { index: 1, expected: 0 }));
        let mut a = fresh();
        let mut short = chunks[0].clone();
        short.bytes.pop();
        assert!(matches!(a.push(short), Err(StateError::ChunkSize { .. })));
        let mut a = fresh();
        a.push(chunks[0].clone()).unwrap();
        assert!(a.finish().is_none(), "incomplete");
        // The joiner's model decides the size, before anything is allocated.
        assert!(matches!(Assembler::new(h.clone(), h.run, 4, 10, 1), Err(StateError::Shape { .. })));
        assert!(matches!(
            Assembler::new(h.clone(), h.run, 5, params.len() as u64, 1),
            Err(StateError::WrongRound { .. })
        ));
        assert!(matches!(
            Assembler::new(h.clone(), RunId::from_name("other"), 4, params.len() as u64, 1),
            Err(StateError::WrongRun)
        ));
        let mut lying = h.clone();
        lying.chunk_hashes.push([0; 32]);
        assert!(matches!(Assembler::new(lying, h.run, 4, params.len() as u64, 1), Err(StateError::ChunkCount { .. })));
        let mut huge = h.clone();
        huge.params = MAX_STATE_BYTES;
        assert!(matches!(Assembler::new(huge, h.run, 4, MAX_STATE_BYTES, 1), Err(StateError::TooLarge { .. })));
    }

    fn peers(names: &[&str]) -> BTreeSet<PeerKey> {
        names.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn a_snapshot_needs_a_strict_majority_of_the_peers_at_its_round() {
        let mut s = Statements::default();
        let (good, bad) = ([1; 32], [2; 32]);
        let all = peers(&["a", "b", "c", "d"]);
        // Only the server has stated round 5: one of one peer at that round.
        s.note("a", StateTag { round: 5, param_hash: good });
        for p in ["b", "c", "d"] {
            s.note(p, StateTag { round: 3, param_hash: [9; 32] });
        }
        assert_eq!(s.verdict(5, &good, &all), Verdict::Agreed { agree: 1, of: 1 });
        // Two more peers reach round 5, one with other parameters: 2 of 3 agree.
        s.note("b", StateTag { round: 5, param_hash: good });
        s.note("c", StateTag { round: 5, param_hash: bad });
        assert_eq!(s.verdict(5, &good, &all), Verdict::Agreed { agree: 2, of: 3 });
        // The stale peer's snapshot is refuted by the majority.
        assert_eq!(s.verdict(5, &bad, &all), Verdict::Refuted { agree: 1, disagree: 2, of: 3 });
        // A tie decides nothing.
        s.note("d", StateTag { round: 5, param_hash: bad });
        assert_eq!(s.verdict(5, &good, &all), Verdict::Pending { agree: 2, disagree: 2, of: 4 });
        // Peers not counted (syncing, gone) do not vote.
        assert_eq!(s.verdict(5, &good, &peers(&["a", "b", "c"])), Verdict::Agreed { agree: 2, of: 3 });
        assert_eq!(s.verdict(5, &good, &BTreeSet::new()), Verdict::Pending { agree: 0, disagree: 0, of: 0 });
        // A peer further on (round 6) that stated nothing for 5 counts against an agreement.
        s.forget("d");
        s.note("d", StateTag { round: 6, param_hash: [3; 32] });
        assert_eq!(s.verdict(5, &good, &all), Verdict::Pending { agree: 2, disagree: 1, of: 4 });
        assert_eq!(s.of("a", 5), Some(good));
    }

    #[test]
    fn old_statements_are_dropped() {
        let mut s = Statements::default();
        for r in 0..1000 {
            s.note("a", StateTag { round: r, param_hash: [r as u8; 32] });
        }
        assert!(s.by_round.len() <= STATEMENT_ROUNDS as usize + 1);
        assert_eq!(s.of("a", 999), Some([231; 32]));
        assert_eq!(s.of("a", 10), None);
        // A peer stating a round far ahead drops only its own statements.
        s.note("b", StateTag { round: 999, param_hash: [1; 32] });
        s.note("liar", StateTag { round: u64::MAX, param_hash: [9; 32] });
        assert_eq!((s.of("a", 999), s.of("b", 999)), (Some([231; 32]), Some([1; 32])));
        let all: BTreeSet<PeerKey> = ["a", "b"].map(String::from).into();
        assert_eq!(s.verdict(999, &[1; 32], &all), Verdict::Pending { agree: 1, disagree: 1, of: 2 });
        assert_eq!(s.verdict(999, &[231; 32], &["a".to_string()].into()), Verdict::Agreed { agree: 1, of: 1 });
        // Peers membership forgot are dropped too.
        s.note("b", StateTag { round: 999, param_hash: [1; 32] });
        s.retain(|p| p == "b");
        assert_eq!((s.of("a", 999), s.of("b", 999)), (None, Some([1; 32])));
        assert_eq!(s.latest.len(), 1);
    }
}
