//! Every message peers exchange. Small signed messages travel over gossip
//! ([`Gossip`]); tensor payloads travel over direct streams ([`RingFrame`]).
//! All of them are framed by [`crate::codec`].

use crate::hash::{Hash, hex};
use crate::ring::Phase;
use serde::{Deserialize, Serialize};
use std::fmt;

/// Stream protocol for ring payloads between neighbours. The receiving side speaks first:
/// [`RING_OFFER_STREAM`], or [`RING_OFFER_DIRECT`] followed by a TCP port (u16, little
/// endian) and a one-time token of [`RING_TOKEN_BYTES`]; the sender then writes the frames
/// on the stream, or on a TCP connection to that port which starts with the token.
pub const RING_PROTOCOL: &str = "/dtrain/ring/2";
/// Offer on a ring stream: write the frames here.
pub const RING_OFFER_STREAM: u8 = 0;
/// Offer on a ring stream: write them on a TCP connection to the port that follows.
pub const RING_OFFER_DIRECT: u8 = 1;
/// Length of the token that ties a direct TCP connection to its ring stream.
pub const RING_TOKEN_BYTES: usize = 32;
/// Kademlia protocol of the trainer's DHT (kept apart from other libp2p DHTs).
pub const KAD_PROTOCOL: &str = "/dtrain/kad/1";
/// Identify protocol version string.
pub const IDENTIFY_PROTOCOL: &str = "/dtrain/id/1";
/// Stream protocol over which a peer hands its training state to a joiner.
pub const STATE_PROTOCOL: &str = "/dtrain/state/1";

/// Identifies a training run: blake3 of its name (later: of its config).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct RunId(pub Hash);

impl RunId {
    /// The run id for a run name given on the command line.
    pub fn from_name(name: &str) -> Self {
        let mut h = blake3::Hasher::new();
        h.update(b"dtrain/run-name/v1");
        h.update(name.as_bytes());
        Self(*h.finalize().as_bytes())
    }

    /// Gossip topic of the run.
    pub fn topic(&self) -> String {
        format!("dtrain/run/{}/v1", hex(&self.0))
    }
}

impl fmt::Debug for RunId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RunId({})", &hex(&self.0)[..16])
    }
}

impl fmt::Display for RunId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex(&self.0)[..16])
    }
}

/// A peer's libp2p peer id in its base58 text form.
pub type PeerKey = String;

/// Messages gossiped on a run's topic. Gossipsub signs each with the sender's
/// key; receivers check that `peer` is the signer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Gossip {
    Heartbeat(Heartbeat),
    Join(JoinRequest),
    Commit(GradientCommit),
    PartialSums(PartialSums),
    Done(RoundDone),
    Failed(RoundFailed),
    Checkpoint(CheckpointAnnounce),
    /// A proven fault, with its evidence: every peer checks it itself.
    Fault(Box<FaultEvidence>),
    /// A member's checksums of the ring segments it sent and received ([`crate::sumcheck`]).
    SumCheck(Box<SumCheck>),
    /// A member checked every sum check it could and found nothing wrong.
    Checked(RoundChecked),
}

impl Gossip {
    /// The run the message belongs to.
    pub fn run(&self) -> RunId {
        match self {
            Gossip::Heartbeat(m) => m.run,
            Gossip::Join(m) => m.run,
            Gossip::Commit(m) => m.run,
            Gossip::PartialSums(m) => m.run,
            Gossip::Done(m) => m.run,
            Gossip::Failed(m) => m.run,
            Gossip::Checkpoint(m) => m.run,
            Gossip::Fault(m) => m.run,
            Gossip::SumCheck(m) => m.run,
            Gossip::Checked(m) => m.run,
        }
    }

    /// The peer that claims to have sent it.
    pub fn peer(&self) -> &str {
        match self {
            Gossip::Heartbeat(m) => &m.peer,
            Gossip::Join(m) => &m.peer,
            Gossip::Commit(m) => &m.peer,
            Gossip::PartialSums(m) => &m.peer,
            Gossip::Done(m) => &m.peer,
            Gossip::Failed(m) => &m.peer,
            Gossip::Checkpoint(m) => &m.peer,
            Gossip::Fault(m) => &m.reporter,
            Gossip::SumCheck(m) => &m.peer,
            Gossip::Checked(m) => &m.peer,
        }
    }
}

/// Liveness and state of a peer, sent every heartbeat interval.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Heartbeat {
    pub run: RunId,
    pub peer: PeerKey,
    pub seq: u64,
    pub status: PeerStatus,
    /// Samples this peer contributes per round: its weight in the ring's average and the
    /// length of its stretch of the sample stream.
    pub batch: u32,
    /// The training state this peer holds: a signed statement joiners check snapshots against.
    pub state: StateTag,
    /// Peers this one keeps out of rings for now (its circuit breakers are open for them).
    pub excluded: Vec<PeerKey>,
}

/// The training state a peer holds: its parameters after rounds `0..round` (so `round` is the
/// next round it can train), and their hash. A fresh peer holds round 0, the run's initial
/// parameters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateTag {
    pub round: u64,
    pub param_hash: Hash,
}

/// What a peer is doing, as its heartbeat tells.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum PeerStatus {
    /// Not in a ring; wants to form one for `round` with the peers whose set
    /// hashes to `view`.
    Forming { round: u64, attempt: u32, view: Hash },
    /// In the ring hashing to `ring` for `round`.
    Running { round: u64, attempt: u32, ring: Hash },
    /// Fetching the training state for `round` from peers (it was behind); not in any view.
    Syncing { round: u64 },
    /// Leaving the run.
    Leaving,
}

/// A peer outside the running ring asks to be admitted at the next round.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JoinRequest {
    pub run: RunId,
    pub peer: PeerKey,
    /// The latest round the joiner has seen.
    pub round: u64,
    /// Samples the joiner will contribute per round.
    pub batch: u32,
}

/// A ring member's commitment to its gradient, gossiped before any payload moves.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GradientCommit {
    pub run: RunId,
    pub peer: PeerKey,
    pub round: u64,
    pub attempt: u32,
    /// Hash of the ordered ring this commit is for.
    pub ring: Hash,
    /// Number of values in the vector.
    pub len: u64,
    /// Hash of each ring chunk of the encoded gradient ([`crate::hash::chunk_hash`]).
    pub chunk_hashes: Vec<Hash>,
    /// Samples behind this gradient.
    pub samples: u64,
    /// L2 norm of the encoded vector, in fixed-point units ([`crate::fixed::norm_units`]).
    pub norm: f64,
    /// Hash of the parameters the gradient was computed on.
    pub param_hash: Hash,
    /// The round whose parameters and micro-batch the gradient is of: this round, or, in an
    /// asynchronous run, an earlier one (a stale gradient of a slow member, weighted down by
    /// its staleness; see [`crate::audit::staleness_weight`]).
    pub computed_at: u64,
    /// Peers that asked to join, as this member saw them.
    pub joiners: Vec<PeerKey>,
    /// Joiners this member keeps out of the next ring (its circuit breakers are open for them).
    pub excluded: Vec<PeerKey>,
    /// This member is leaving the run after this round: the next ring goes on without it.
    pub leaving: bool,
    /// blake3 of the error-feedback residual a top-k payload was compressed with
    /// ([`crate::compress`]), so an auditor can ask for it; zeros when there is none.
    pub residual: Hash,
    /// blake3 of the residual the payload leaves (what the member's next round starts from,
    /// if this one counts); zeros when there is none.
    pub residual_next: Hash,
    /// The member's signature (its libp2p identity key) over [`GradientCommit::signing_bytes`]:
    /// the commit can be shown to anyone as the member's own, as evidence against it.
    #[serde(with = "serde_bytes")]
    pub signature: Vec<u8>,
}

impl GradientCommit {
    /// Whether the member is behind the ring (asynchronous rounds): it committed nothing, or a
    /// gradient of an earlier round.
    pub fn is_behind(&self) -> bool {
        self.samples == 0 || self.computed_at < self.round
    }

    /// blake3 of the commit's wire encoding (signature included): the digest a peer's ledger
    /// record builds on.
    pub fn digest(&self) -> Hash {
        blake3::hash(&crate::codec::encode_frame(self)).into()
    }

    /// What the member signs: the commit's encoding with an empty signature.
    pub fn signing_bytes(&self) -> Vec<u8> {
        let mut unsigned = self.clone();
        unsigned.signature.clear();
        crate::codec::encode_frame(&unsigned)
    }
}

/// Kinds of proven fault, as the ledger contract numbers them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[repr(u8)]
pub enum FaultKind {
    /// The member's commit does not match the gradient recomputed from public inputs.
    AuditMismatch = 1,
    /// The member signed a commit and, in the ring, signed a chunk that contradicts it.
    CommitContradiction = 2,
    /// The member's partial sums (by its own signed checksums) did not add its committed
    /// gradient to what it received: it dropped, changed or added values in the ring.
    PartialSumMismatch = 3,
    /// The member signed a commit to a gradient whose norm is above what the run's norm
    /// clipping allows for its weight: no honest member can commit to it.
    NormExceeded = 4,
    /// Frames the member sent failed their checks at the reporter (bytes altered after signing,
    /// a replay, values out of range), and the rings went on without it. An attestation of the
    /// receivers that saw them, not a proof anyone else can check: it never travels as
    /// evidence, only to the chain.
    RefusedFrames = 5,
}

/// Evidence that `accused` lied in `round`, enough for any peer to check it by itself: the
/// accused's signed commit, and the ring it was made for (its members in order and their
/// samples, which its `ring` hash commits to). For an audit mismatch a peer holding that round's
/// parameters recomputes the accused's gradient from them; for a contradiction, `steps` are the
/// accused's signed step-0 segments of its own chunk, whose hashes do not make the chunk hash
/// it committed to.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FaultEvidence {
    pub run: RunId,
    pub reporter: PeerKey,
    pub accused: PeerKey,
    pub kind: FaultKind,
    pub commit: GradientCommit,
    pub members: Vec<PeerKey>,
    pub batches: Vec<u64>,
    pub steps: Vec<SignedStep>,
    /// For a partial-sum mismatch: the accused's signed checksums of what it sent and received.
    pub sum_check: Option<Box<SumCheck>>,
}

impl FaultEvidence {
    /// blake3 of the evidence: what the chain's fault report records.
    pub fn digest(&self) -> Hash {
        blake3::hash(&crate::codec::encode_frame(self)).into()
    }
}

/// A checksum claim about one ring segment: where it belongs, its blake3 and its two
/// evaluations ([`crate::sumcheck::eval_le_bytes`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SegmentClaim {
    pub id: StepId,
    pub hash: Hash,
    pub eval: [u64; 2],
}

/// What a member states, once the ring agreed on the sum, about every reduce-scatter segment
/// it sent and received (and the fully reduced chunk it sent first in the all-gather), signed
/// with its identity key. Its neighbours hold those segments and check the claims; its auditor
/// checks that the difference of what it sent and received is its committed gradient.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SumCheck {
    pub run: RunId,
    pub peer: PeerKey,
    pub round: u64,
    pub attempt: u32,
    /// The hash of the sum every member certified: the checksums' evaluation points derive
    /// from it, so nobody knew them while the ring ran.
    pub sum: Hash,
    pub sent: Vec<SegmentClaim>,
    pub received: Vec<SegmentClaim>,
    #[serde(with = "serde_bytes")]
    pub signature: Vec<u8>,
}

impl SumCheck {
    /// What the member signs: the check's encoding with an empty signature.
    pub fn signing_bytes(&self) -> Vec<u8> {
        let mut unsigned = self.clone();
        unsigned.signature.clear();
        crate::codec::encode_frame(&unsigned)
    }
}

/// A member checked every member's sum check (the claims about segments it holds and, if it
/// audited one, that member's partial sums) and found nothing wrong: the round counts once
/// every member said so.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoundChecked {
    pub run: RunId,
    pub peer: PeerKey,
    pub round: u64,
    pub attempt: u32,
}

/// One outgoing partial sum of the reduce-scatter: which step, which chunk, its hash.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartialSum {
    pub step: u16,
    pub chunk: u32,
    pub hash: Hash,
}

/// Hashes of every partial sum a member sent in a round, for later audits.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PartialSums {
    pub run: RunId,
    pub peer: PeerKey,
    pub round: u64,
    pub attempt: u32,
    pub sums: Vec<PartialSum>,
}

/// A member finished the all-gather holding the sum hashing to `result`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoundDone {
    pub run: RunId,
    pub peer: PeerKey,
    pub round: u64,
    pub attempt: u32,
    pub result: Hash,
    /// The ring of the next round, in order (this ring plus the joiners), for the peers that
    /// join it; empty unless the next ring has peers this one lacks and the member is one of
    /// the first [`crate::round::DONE_CARRIERS`] in ring order.
    pub next_members: Vec<PeerKey>,
}

/// A member gave up on a round; the others stop waiting for it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoundFailed {
    pub run: RunId,
    pub peer: PeerKey,
    pub round: u64,
    pub attempt: u32,
    pub reason: String,
}

/// A member's parameter hash after a round.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckpointAnnounce {
    pub run: RunId,
    pub peer: PeerKey,
    pub round: u64,
    pub param_hash: Hash,
}

/// What a joiner asks a peer over [`STATE_PROTOCOL`]: its training state for `round` (its
/// parameters after rounds `0..round`; `None`: no state), and whether the ring certified the
/// attempts the joiner was in before it went away without learning their outcome.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateRequest {
    pub run: RunId,
    pub round: Option<u64>,
    /// At most [`MAX_UNSETTLED`] attempts; a server looks at no more.
    pub unsettled: Vec<AttemptRef>,
}

/// Attempts a joiner may ask about in one state request.
pub const MAX_UNSETTLED: usize = 64;

/// One attempt of one round, by the hash of its ring.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttemptRef {
    pub round: u64,
    pub attempt: u32,
    /// [`crate::membership::RingView::hash`] of the attempt's ring.
    pub ring: Hash,
}

/// What a peer knows of the attempts it was asked about: the rounds whose asked attempt it saw
/// certified (that very attempt, that very ring), and those it saw certified with another
/// attempt or ring. Rounds it did not complete are in neither list.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Settlement {
    pub certified: Vec<u64>,
    pub not_certified: Vec<u64>,
}

impl Settlement {
    /// What most of the peers that answered say of each `asked` attempt: a round is settled
    /// (certified or not) when more answers say so than say the opposite. A tie settles
    /// nothing, so one lying peer against one honest peer can delay a settlement but not
    /// decide it; an answer that says both of a round, or names a round not asked, counts
    /// for nothing; each answer counts once per round however often it names it. Also the
    /// rounds the answers disagree on (some peer lied, or the run split), settled or not.
    pub fn majority(asked: &[AttemptRef], answers: &[Settlement]) -> (Settlement, Vec<u64>) {
        let (mut out, mut disputed) = (Settlement::default(), Vec::new());
        let mut rounds: Vec<u64> = asked.iter().map(|a| a.round).collect();
        rounds.sort_unstable();
        rounds.dedup();
        for round in rounds {
            let (mut yes, mut no) = (0usize, 0usize);
            for a in answers {
                match (a.certified.contains(&round), a.not_certified.contains(&round)) {
                    (true, false) => yes += 1,
                    (false, true) => no += 1,
                    _ => {}
                }
            }
            if yes > 0 && no > 0 {
                disputed.push(round);
            }
            if yes > no {
                out.certified.push(round);
            } else if no > yes {
                out.not_certified.push(round);
            }
        }
        (out, disputed)
    }
}

/// The first frame of the answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum StateReply {
    /// The state follows in `chunk_hashes.len()` [`StateChunk`] frames.
    Header(StateHeader),
    /// The answer to a request without a round: only the settlement.
    Settled(Settlement),
    /// This peer cannot serve that round; `have` is the state it holds.
    Refused { reason: String, have: StateTag },
}

/// Describes a training state: the parameters, then the optimizer's moment vectors (0, 1 or
/// 2 of them, each as long as the parameters), as little-endian f32 bytes cut into chunks of
/// [`crate::state::STATE_CHUNK_BYTES`], each hashed with blake3.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateHeader {
    pub run: RunId,
    pub tag: StateTag,
    /// Samples of the run's sample stream consumed by rounds `0..tag.round`.
    pub cursor: u64,
    /// Optimizer steps taken.
    pub step: u64,
    /// blake3 of the optimizer state (configuration, step, moments).
    pub optimizer_hash: Hash,
    /// Values in the parameter vector.
    pub params: u64,
    /// Moment vectors of the optimizer (momentum: 1, Adam: 2).
    pub moments: u8,
    pub chunk_hashes: Vec<Hash>,
    /// What this peer knows of the attempts the joiner asked about.
    pub settlement: Settlement,
}

/// One chunk of a training state.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateChunk {
    pub index: u32,
    #[serde(with = "serde_bytes")]
    pub bytes: Vec<u8>,
}

impl fmt::Debug for StateChunk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StateChunk").field("index", &self.index).field("bytes", &self.bytes.len()).finish()
    }
}

/// Frames on a ring stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum RingFrame {
    Step(RingStep),
}

/// Where a segment belongs in the all-reduce.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct StepId {
    /// Which ring of the round the segment travels in: 0 for the ring (a hierarchical round's
    /// group ring), 1 for a hierarchical round's ring across groups ([`crate::hier`]).
    pub level: u8,
    pub phase: Phase,
    pub step: u16,
    pub chunk: u32,
    pub segment: u32,
}

/// One segment of one ring step: little-endian `i32` values, their blake3, and the sender's
/// signature over where the segment belongs and its hash ([`RingStep::signing_bytes`]), so a
/// segment sent against the sender's commit can be shown to anyone.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
pub struct RingStep {
    pub run: RunId,
    pub round: u64,
    pub attempt: u32,
    pub id: StepId,
    pub hash: Hash,
    #[serde(with = "serde_bytes")]
    pub payload: Vec<u8>,
    #[serde(with = "serde_bytes")]
    pub signature: Vec<u8>,
}

/// A ring segment without its values: what its sender signed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedStep {
    pub id: StepId,
    pub hash: Hash,
    #[serde(with = "serde_bytes")]
    pub signature: Vec<u8>,
}

impl SignedStep {
    /// What the sender signed, for a step of `(run, round, attempt)`.
    pub fn signing_bytes(&self, run: RunId, round: u64, attempt: u32) -> Vec<u8> {
        RingStep::signing_bytes(run, round, attempt, &self.id, &self.hash)
    }
}

impl fmt::Debug for RingStep {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RingStep")
            .field("round", &self.round)
            .field("attempt", &self.attempt)
            .field("id", &self.id)
            .field("bytes", &self.payload.len())
            .finish()
    }
}

/// Why a ring step was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StepError {
    #[error("payload hash mismatch for {id:?}: the bytes were altered in transit or by the sender")]
    HashMismatch { id: StepId },
    #[error("payload of {len} bytes is not a whole number of 4-byte values")]
    Misaligned { len: usize },
}

impl RingStep {
    /// A step whose hash is computed from `payload` (unsigned until its sender signs it).
    pub fn new(run: RunId, round: u64, attempt: u32, id: StepId, payload: Vec<u8>) -> Self {
        let hash = *blake3::hash(&payload).as_bytes();
        Self { run, round, attempt, id, hash, payload, signature: Vec::new() }
    }

    /// What the sender of a step signs: the run, round, attempt, place and hash of the segment.
    pub fn signing_bytes(run: RunId, round: u64, attempt: u32, id: &StepId, hash: &Hash) -> Vec<u8> {
        let mut out = b"dtrain/ring-step/v1".to_vec();
        out.extend_from_slice(&run.0);
        out.extend_from_slice(&round.to_le_bytes());
        out.extend_from_slice(&attempt.to_le_bytes());
        out.push(id.level);
        out.push(id.phase as u8);
        out.extend_from_slice(&id.step.to_le_bytes());
        out.extend_from_slice(&id.chunk.to_le_bytes());
        out.extend_from_slice(&id.segment.to_le_bytes());
        out.extend_from_slice(hash);
        out
    }

    /// The step without its values.
    pub fn header(&self) -> SignedStep {
        SignedStep { id: self.id, hash: self.hash, signature: self.signature.clone() }
    }

    /// Checks the payload against its hash and its shape.
    pub fn verify(self) -> Result<VerifiedStep, StepError> {
        if !self.payload.len().is_multiple_of(4) {
            return Err(StepError::Misaligned { len: self.payload.len() });
        }
        if *blake3::hash(&self.payload).as_bytes() != self.hash {
            return Err(StepError::HashMismatch { id: self.id });
        }
        Ok(VerifiedStep(self))
    }
}

/// A ring step whose payload matched its hash. Only [`RingStep::verify`] makes one,
/// so the ring state machine never sees unchecked bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct VerifiedStep(RingStep);

impl VerifiedStep {
    pub fn step(&self) -> &RingStep {
        &self.0
    }

    pub fn into_inner(self) -> RingStep {
        self.0
    }
}

#[cfg(test)]
mod settlement_tests {
    use super::*;

    fn asked(rounds: &[u64]) -> Vec<AttemptRef> {
        rounds.iter().map(|&round| AttemptRef { round, attempt: 0, ring: [7; 32] }).collect()
    }

    fn says(certified: &[u64], not_certified: &[u64]) -> Settlement {
        Settlement { certified: certified.to_vec(), not_certified: not_certified.to_vec() }
    }

    #[test]
    fn one_liar_cannot_outvote_two_honest_peers() {
        let honest = says(&[3], &[5]);
        let liar = says(&[5], &[3]);
        let m = Settlement::majority(&asked(&[3, 5]), &[liar.clone(), honest.clone(), honest]);
        assert_eq!(m, (says(&[3], &[5]), vec![3, 5]));
    }

    #[test]
    fn a_tie_leaves_the_round_pending() {
        let m = Settlement::majority(&asked(&[3]), &[says(&[3], &[]), says(&[], &[3])]);
        assert_eq!(m, (Settlement::default(), vec![3]));
    }

    #[test]
    fn a_lone_answer_decides_and_silence_does_not_count() {
        // Peers that did not complete a round say nothing of it: the one that did decides.
        let m =
            Settlement::majority(&asked(&[3, 4]), &[says(&[3], &[4]), Settlement::default(), Settlement::default()]);
        assert_eq!(m, (says(&[3], &[4]), vec![]));
    }

    #[test]
    fn rounds_not_asked_contradictions_and_repeats_count_for_nothing() {
        let stuffed = says(&[3, 3, 3, 9], &[9]);
        let both = says(&[4], &[4]);
        let honest = says(&[], &[3]);
        // The stuffed answer counts once for round 3 (a tie with the honest one), round 9 was
        // not asked, and an answer naming round 4 both ways says nothing of it.
        let m = Settlement::majority(&asked(&[3, 4]), &[stuffed, both, honest]);
        assert_eq!(m, (Settlement::default(), vec![3]));
    }

    #[test]
    fn no_answers_settle_nothing() {
        assert_eq!(Settlement::majority(&asked(&[1, 2]), &[]), (Settlement::default(), vec![]));
    }
}
