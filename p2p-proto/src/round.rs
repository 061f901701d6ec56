//! One attempt of one round, from a member's point of view, as a pure state
//! machine: commit, ring all-reduce, certify.
//!
//! 1. **Commit.** The member gossips the hash of each ring chunk of its encoded
//!    vector, then waits for every member's commit for the same ring. No
//!    payload moves before all commits are known, so nobody can pick its values
//!    after seeing others'.
//! 2. **Reduce.** [`RingAllReduce`] runs over the member's streams; steps that
//!    arrive before the last commit wait in a bounded buffer.
//! 3. **Certify.** The member gossips `Done` with the hash of the sum and the
//!    next ring, and the round counts only once every member's `Done` carries
//!    the same hash. A member that dies mid-round thus makes the round fail for
//!    everyone (within the timeouts) instead of counting for some.
//!
//! 4. **Check.** In an audited attempt every member gossips its signed
//!    [`SumCheck`] ([`crate::sumcheck`]) with its `Done` (its evaluation points
//!    come from the sum, which nobody knew while the ring ran): neighbours check
//!    the claims about the segments they hold, the auditor checks that its
//!    target's partial sums added exactly its committed gradient. A member whose
//!    checks all passed, once every `Done` is in, gossips `Checked`, and the
//!    round counts once every member did: one gossip exchange after the
//!    certificate, not two.
//!
//! Any timeout, any inconsistent message from a member, or a member's
//! `Failed` fails the attempt; membership then forms the next one.

use crate::chunk::chunk_ranges;
use crate::compress::Compression;
use crate::hash::{Hash, chunk_hash, hex, segment_hashes, sum_hash};
use crate::hier::{HierAllReduce, Layout, Place};
use crate::membership::RingView;
use crate::message::{
    Gossip, GradientCommit, PartialSums, PeerKey, RingStep, RoundChecked, RoundDone, RoundFailed, RunId, SegmentClaim,
    SignedStep, StepId, SumCheck, VerifiedStep,
};
use crate::ring::{Phase, RingAllReduce, RingParams};
use crate::sumcheck;
use std::collections::{BTreeMap, BTreeSet};

/// Members whose `Done` names the next ring when it grows (two, so that one crash after the
/// all-reduce does not leave a joiner unaware that it is in).
pub const DONE_CARRIERS: usize = 2;

/// Timeouts and sizes of a round.
#[derive(Debug, Clone)]
pub struct RoundConfig {
    /// Longest wait for all commits.
    pub commit_timeout_us: u64,
    /// Longest wait for the next ring segment once the ring runs.
    pub step_timeout_us: u64,
    /// Longest wait for every member's `Done` after this member finished.
    pub done_timeout_us: u64,
    /// How often a commit or `Done` is gossiped again while waiting, in case a
    /// peer missed it.
    pub republish_us: u64,
    /// Values per ring segment.
    pub segment_elems: usize,
    /// Largest ring the next round may have.
    pub max_peers: usize,
    /// One attempt in this many is audited (see [`crate::audit`]); 0: none.
    pub audit_every: u64,
    /// Largest magnitude of one member's encoded value; partial sums beyond the range of their
    /// contributions are refused (0: not checked).
    pub max_units: i32,
    /// The run's norm clipping, in units: a commit to a larger weighted norm is refused as
    /// proof of a lie ([`crate::audit::norm_exceeds`]; 0: not checked).
    pub max_norm_units: f64,
    /// How contributions are compressed: not at all (the ring reduces them), or compressed,
    /// gathered and decoded by every member ([`crate::compress`]).
    pub compression: Compression,
    /// Asynchronous runs: how many rounds late a slow member's gradient may join the sum
    /// (weighted down by [`crate::audit::staleness_weight`]), and whether a member may commit
    /// nothing (zeros, no samples) while its gradient is still being computed. 0: synchronous,
    /// every member commits the gradient of this round's parameters and its announced samples.
    pub max_staleness: u64,
    /// Hierarchical rounds: rings of this many members, then rings across the groups
    /// ([`crate::hier`]); 0: the plain ring.
    pub group_size: usize,
}

impl RoundConfig {
    /// The hierarchy of a ring of `n` (None: the plain ring). Compressed rounds gather
    /// payloads and are never hierarchical.
    pub fn layout(&self, n: usize) -> Option<Layout> {
        if self.compression.is_none() { Layout::of(n, self.group_size) } else { None }
    }

    /// Chunks a member's commit covers in a ring of `n`: one per member of its ring, which in
    /// a hierarchical round is its group.
    pub fn chunks(&self, n: usize) -> usize {
        self.layout(n).map_or(n, |l| l.g)
    }
}

/// The all-reduce of an attempt: one ring, or a hierarchy of rings.
#[derive(Debug)]
enum Reducer {
    Ring(RingAllReduce),
    Hier(HierAllReduce),
}

impl Reducer {
    fn is_done(&self) -> bool {
        match self {
            Self::Ring(r) => r.is_done(),
            Self::Hier(h) => h.is_done(),
        }
    }

    /// Applies a segment from the member at `from`; returns what to send, to whom (`right`:
    /// the plain ring's right neighbour).
    fn on_step(
        &mut self,
        from: usize,
        right: usize,
        step: VerifiedStep,
    ) -> Result<Vec<(usize, RingStep)>, crate::ring::RingError> {
        match self {
            Self::Ring(r) => r.on_step(step).map(|s| s.into_iter().map(|s| (right, s)).collect()),
            Self::Hier(h) => h.on_step(from, step),
        }
    }

    fn bytes(&self) -> (u64, u64) {
        match self {
            Self::Ring(r) => (r.bytes_sent(), r.bytes_received()),
            Self::Hier(h) => (h.bytes_sent(), h.bytes_received()),
        }
    }

    /// Partial sums to gossip for the sum checks (a hierarchy's are not checked).
    fn partial_sums(&self) -> Vec<crate::message::PartialSum> {
        match self {
            Self::Ring(r) => r.partial_sums(),
            Self::Hier(_) => Vec::new(),
        }
    }

    fn into_result(self) -> Vec<i32> {
        match self {
            Self::Ring(r) => r.into_result(),
            Self::Hier(h) => h.into_result(),
        }
    }

    /// The result's [`crate::hash::sum_hash`] from the segment hashes checked on the way, where
    /// the all-reduce knows them.
    fn result_hash(&self) -> Option<Hash> {
        match self {
            Self::Ring(r) => r.result_hash(),
            Self::Hier(h) => h.result_hash(),
        }
    }
}

/// What this member contributes to the round.
#[derive(Debug, Clone)]
pub struct Contribution {
    /// Fixed-point encoded values.
    pub data: Vec<i32>,
    pub samples: u64,
    pub param_hash: Hash,
    /// L2 norm of `data`, in units.
    norm: f64,
    /// Peers that asked to join, as this member saw them.
    pub joiners: Vec<PeerKey>,
    /// Joiners this member keeps out of the next ring.
    pub excluded: Vec<PeerKey>,
    /// This member leaves after the round: the next ring goes on without it.
    pub leaving: bool,
    /// blake3 of every segment of every ring chunk of `data`.
    segment_hashes: Vec<Vec<Hash>>,
    /// Samples each member contributes, in ring order, as this member knows them (empty:
    /// not checked). They are part of the ring's identity: members that disagree on them
    /// disagree on the ring, and a member committing another count fails the round.
    ring_batches: Vec<u64>,
    /// A compressed contribution: the length of the vector `data` is a payload of.
    values: Option<usize>,
    /// blake3 of the residual a top-k payload was compressed with, and of the one it leaves
    /// (zeros otherwise).
    residual: [Hash; 2],
    /// Top-k: the residuals each member's commit named in the round before this one, as this
    /// member certified it, and the hash of a residual of zeros (see [`Round::on_commit`]).
    residual_history: BTreeMap<PeerKey, [Hash; 2]>,
    residual_zero: Hash,
    /// The round the values were computed for (None: this round).
    computed_at: Option<u64>,
    /// Asynchronous runs: the parameter hash this member held at the start of each recent
    /// round, to check other members' (possibly stale) commits against.
    param_history: BTreeMap<u64, Hash>,
    /// Asynchronous runs: the members and their samples of each recent round this member
    /// completed, to check stale commits against.
    rings: BTreeMap<u64, AsyncRing>,
}

/// A certified ring of an asynchronous run, as a member completed it: its members in ring order
/// and the samples each announced.
pub type AsyncRing = (Vec<PeerKey>, Vec<u64>);

impl Contribution {
    /// Hashes `data` for a ring of `n` members: one blake3 pass over the
    /// values, the only heavy part of starting a round, so callers can run it
    /// off their event loop.
    pub fn new(
        data: Vec<i32>,
        samples: u64,
        param_hash: Hash,
        joiners: Vec<PeerKey>,
        n: usize,
        segment_elems: usize,
    ) -> Self {
        let chunks = chunk_ranges(data.len(), n);
        let segment_hashes = segment_hashes(&data, &chunks, segment_elems);
        Self {
            norm: crate::fixed::norm_units(&data),
            data,
            samples,
            param_hash,
            joiners,
            excluded: Vec::new(),
            leaving: false,
            segment_hashes,
            ring_batches: Vec::new(),
            values: None,
            residual: Default::default(),
            residual_history: BTreeMap::new(),
            residual_zero: Hash::default(),
            computed_at: None,
            param_history: BTreeMap::new(),
            rings: BTreeMap::new(),
        }
    }

    /// A compressed contribution ([`crate::compress`]): `payload` of a vector of `values`
    /// values, whose decoded norm is `norm`. It is committed to as one chunk, whatever the ring.
    pub fn compressed(
        payload: Vec<i32>,
        norm: f64,
        values: usize,
        samples: u64,
        param_hash: Hash,
        joiners: Vec<PeerKey>,
        segment_elems: usize,
    ) -> Self {
        let mut c = Self::new(Vec::new(), samples, param_hash, joiners, 1, segment_elems);
        c.segment_hashes = segment_hashes(&payload, &chunk_ranges(payload.len(), 1), segment_elems);
        c.norm = norm;
        c.data = payload;
        c.values = Some(values);
        c
    }

    /// Sets the blake3 of the residual a top-k payload was compressed with and of the one it
    /// leaves.
    pub fn with_residual(mut self, used: Hash, next: Hash) -> Self {
        self.residual = [used, next];
        self
    }

    /// Top-k: what each member's residual may be in this round, from the round before, which
    /// this member certified: the one that round's commit left, the one it started from (the
    /// member did not see that round certified), or zeros (a restarted member), whose hash is
    /// `zero`. A member named in `history` committing another residual fails the attempt.
    pub fn with_residual_history(mut self, history: BTreeMap<PeerKey, [Hash; 2]>, zero: Hash) -> Self {
        self.residual_history = history;
        self.residual_zero = zero;
        self
    }

    /// Asynchronous runs: the values are of the round `computed_at` (a stale gradient, or zeros
    /// with no samples while this member's gradient is still being computed), and
    /// `param_history` holds the parameter hash this member held at the start of each recent
    /// round (this one included, once known), and `rings` the members and samples of each
    /// recent round it completed. A member's commit to a stale gradient must name the
    /// parameters of its round, where this member knows them, and the samples that round's ring
    /// gave it; and every member of this ring must have been in that one (or none could audit
    /// it). A commit of no samples must be to zeros.
    pub fn with_async(
        mut self,
        computed_at: u64,
        param_history: BTreeMap<u64, Hash>,
        rings: BTreeMap<u64, AsyncRing>,
    ) -> Self {
        self.computed_at = Some(computed_at);
        self.param_history = param_history;
        self.rings = rings;
        self
    }

    /// Sets the joiners this member keeps out of the next ring.
    pub fn with_excluded(mut self, excluded: Vec<PeerKey>) -> Self {
        self.excluded = excluded;
        self
    }

    /// Sets the samples every member contributes, in ring order.
    pub fn with_ring_batches(mut self, batches: Vec<u64>) -> Self {
        self.ring_batches = batches;
        self
    }
}

/// A certified round.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub view: RingView,
    pub position: usize,
    /// The exact sum of every member's values.
    pub sum: Vec<i32>,
    pub sum_hash: Hash,
    /// Total samples behind the sum.
    pub samples: u64,
    /// Samples behind this member's own contribution.
    pub own_samples: u64,
    /// blake3 of this member's gossiped commit message: what it committed to before any
    /// payload moved, recomputable by anyone who received the commit.
    pub own_commit: Hash,
    pub next: RingView,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    /// From the last commit to this member holding the sum.
    pub reduce_us: u64,
    /// From the start of the attempt to the certificate.
    pub round_us: u64,
    /// The member this member audited in the attempt, if it was audited.
    pub audited: Option<PeerKey>,
    /// Members this member audited besides, standing in for auditors behind the ring
    /// (asynchronous runs).
    pub audited_also: Vec<PeerKey>,
    /// Each member's residual hashes (used, left) as its commit stated them (top-k).
    pub residuals: BTreeMap<PeerKey, [Hash; 2]>,
    /// Samples the ring's members announced for the round (its stretch of the sample stream),
    /// whether or not each committed them: in an asynchronous run a slow member's samples are
    /// used later, in a stale gradient.
    pub ring_samples: u64,
    /// The round each member's commit was computed for, by member.
    pub computed_at: BTreeMap<PeerKey, u64>,
}

/// Why an attempt failed, and whom it waited for in vain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub reason: String,
    pub kind: FailureKind,
    /// Members the attempt timed out waiting for, or that stopped responding: what the
    /// circuit breakers count. Empty when the failure proves nothing about a peer.
    pub blame: Vec<PeerKey>,
}

/// The kinds of failure the node reacts to differently.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// A member committed on other parameters: one side is out of sync.
    ParamsDiffer,
    /// This member's audit proved that the blamed member lied.
    Fault,
    /// A member left, stopped responding, or timed out.
    Gone,
    /// The blamed member sent this member a ring frame that failed its checks (bytes altered
    /// after signing, a bad signature, a replay, values out of range or other than committed):
    /// its own doing on an authenticated stream, seen here, not provable to others.
    BadFrame,
    /// The blamed member's gossip failed its checks here (two sum checks for one attempt, a
    /// false claim about a segment this member holds), or it did not reveal the values it
    /// committed to: seen here, not provable to others.
    BadMessage,
    /// Anything else (views differ, a rejected step, another member failed).
    Other,
}

/// An audit this member must run before it may certify the attempt: recompute the gradient of
/// the member at `target` and check it against `commit`.
#[derive(Debug, Clone)]
pub struct AuditJob {
    pub view: RingView,
    pub target: usize,
    pub commit: GradientCommit,
    /// Samples each member contributes, in ring order.
    pub batches: Vec<u64>,
}

/// A commit that proves a lie by itself (its norm is above what the run allows).
#[derive(Debug, Clone)]
pub struct BadCommit {
    pub view: RingView,
    pub accused: usize,
    pub commit: GradientCommit,
    pub batches: Vec<u64>,
    pub reason: String,
}

/// Proof that the left neighbour signed a chunk other than the one it committed to.
#[derive(Debug, Clone)]
pub struct Contradiction {
    pub view: RingView,
    /// Position of the left neighbour.
    pub accused: usize,
    pub commit: GradientCommit,
    pub batches: Vec<u64>,
    /// Its signed step-0 segments of its own chunk, in order.
    pub steps: Vec<SignedStep>,
}

/// Proof that the member at `accused` sent partial sums other than what it received plus its
/// committed gradient: its own signed checksums, against its gradient recomputed from public
/// inputs (which its commit matched).
#[derive(Debug, Clone)]
pub struct SumFault {
    pub view: RingView,
    pub accused: usize,
    pub commit: GradientCommit,
    pub batches: Vec<u64>,
    pub check: SumCheck,
}

/// What the round asks the node to do.
#[derive(Debug, Clone)]
pub enum RoundAction {
    /// Gossip this message (a [`Gossip::SumCheck`] is signed first).
    Publish(Gossip),
    /// Sign and send to this member (the right neighbour, in the plain ring).
    Send(PeerKey, RingStep),
    /// Gossip this proof of a lie (the attempt fails too).
    Contradiction(Box<Contradiction>),
    /// Gossip this proof of a wrong partial sum (the attempt fails too).
    SumFault(Box<SumFault>),
    /// Act on this commit that proves its member lied (the attempt fails too).
    BadCommit(Box<BadCommit>),
    /// Run this audit, then call [`Round::audit_passed`] or [`Round::audit_failed`].
    Audit(Box<AuditJob>),
    Completed(Box<Outcome>),
    Failed(Failure),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    Committing,
    Reducing,
    Certifying,
    Checking,
    Finished,
}

/// One member's state for one attempt of one round.
#[derive(Debug)]
pub struct Round {
    run: RunId,
    view: RingView,
    ring_hash: Hash,
    pos: usize,
    cfg: RoundConfig,
    stage: Stage,
    commits: Vec<Option<GradientCommit>>,
    data: Option<Vec<i32>>,
    own_segments: Vec<Hash>,
    /// Compressed contributions: the length of the vector the payloads decode to.
    values: Option<usize>,
    /// Compressed contributions: the sum of the payloads decoded so far.
    decoded: Vec<i32>,
    /// Top-k: the residuals members may start from ([`Contribution::with_residual_history`]).
    residual_history: BTreeMap<PeerKey, [Hash; 2]>,
    residual_zero: Hash,
    /// Expected samples per member (empty: not checked).
    ring_batches: Vec<u64>,
    /// Asynchronous runs: this member's parameter hashes and certified rings of recent rounds,
    /// and the chunk hashes of a vector of zeros (computed when first needed).
    param_history: BTreeMap<u64, Hash>,
    rings: BTreeMap<u64, AsyncRing>,
    zero_hashes: Option<Vec<Hash>>,
    ring: Option<Reducer>,
    /// A hierarchical attempt's groups (None: the plain ring), and this member's segment
    /// hashes of every chunk until its all-reduce starts.
    layout: Option<Layout>,
    hier_segments: Vec<Vec<Hash>>,
    /// Segments that came before the last commit, with their senders' positions.
    early: Vec<(usize, VerifiedStep)>,
    /// The payload bytes of `early`.
    early_bytes: usize,
    dones: Vec<Option<RoundDone>>,
    sum: Option<(Vec<i32>, Hash)>,
    next: Option<RingView>,
    /// Audits this member runs and has not finished, by target: its `Done` waits for them.
    auditing: BTreeSet<usize>,
    /// The members this member audits in this attempt: its own target first, then those it
    /// stands in for.
    audit_targets: Vec<usize>,
    /// The left neighbour's signed step-0 segments (its own chunk), as they arrived.
    left_step0: Vec<SignedStep>,
    /// Sum of squares of the left neighbour's own values seen so far (step 0).
    left_step0_sq: f64,
    /// In a hierarchical attempt, the signed segments of its own chunk each attached member
    /// sent this one, by position.
    extra_steps: BTreeMap<usize, Vec<SignedStep>>,
    /// Whether this attempt's partial sums are checked ([`crate::sumcheck`]): audited ones.
    sum_checking: bool,
    /// Segments received (reduce-scatter and all-gather step 0) and sent, kept for the checks.
    held_in: BTreeMap<StepId, (Hash, Vec<u8>)>,
    held_out: BTreeMap<StepId, (Hash, Vec<u8>)>,
    /// The same segments' claims (hash and checksums), once the points are known: each
    /// segment is evaluated once, then its bytes are dropped.
    claims_in: BTreeMap<StepId, SegmentClaim>,
    claims_out: BTreeMap<StepId, SegmentClaim>,
    checks: Vec<Option<SumCheck>>,
    checked: Vec<bool>,
    /// Members that said all their checks passed.
    confirmed: Vec<bool>,
    /// The audited members' recomputed values, to check their sum checks against.
    audited_data: BTreeMap<usize, Vec<i32>>,
    points: [u64; 2],
    deadline: u64,
    last_publish: u64,
    started: u64,
    reduce_started: u64,
    reduce_us: u64,
    bytes: (u64, u64),
}

impl Round {
    /// Starts the attempt: returns the state and the commit to gossip, signed with `sign`
    /// (over [`GradientCommit::signing_bytes`]). `me` must be a member of `view`.
    pub fn new(
        run: RunId,
        me: &str,
        view: RingView,
        input: Contribution,
        cfg: RoundConfig,
        now: u64,
        sign: &dyn Fn(&[u8]) -> Vec<u8>,
    ) -> (Self, Vec<RoundAction>) {
        let n = view.len();
        let pos = view.position(me).expect("a round is only started by a member of its ring");
        assert!(input.ring_batches.is_empty() || input.ring_batches.len() == n, "one batch size per member");
        let ring_hash = crate::audit::ring_hash(run, &view, &input.ring_batches);
        let segs = input.segment_hashes;
        let gathered = input.values.is_some();
        assert_eq!(gathered, !cfg.compression.is_none(), "compressed contributions exactly in compressed rounds");
        let layout = cfg.layout(n);
        assert_eq!(
            segs.len(),
            if gathered { 1 } else { cfg.chunks(n) },
            "the contribution was hashed for a ring of this size"
        );
        let commit = GradientCommit {
            run,
            peer: me.to_owned(),
            round: view.round,
            attempt: view.attempt,
            ring: ring_hash,
            len: input.data.len() as u64,
            chunk_hashes: segs.iter().map(chunk_hash).collect(),
            samples: input.samples,
            norm: input.norm,
            param_hash: input.param_hash,
            computed_at: input.computed_at.unwrap_or(view.round),
            joiners: input.joiners,
            excluded: input.excluded,
            leaving: input.leaving,
            residual: input.residual[0],
            residual_next: input.residual[1],
            signature: Vec::new(),
        };
        let commit = GradientCommit { signature: sign(&commit.signing_bytes()), ..commit };
        let mut commits = vec![None; n];
        commits[pos] = Some(commit.clone());
        let mut r = Self {
            run,
            ring_hash,
            pos,
            stage: Stage::Committing,
            commits,
            data: Some(input.data),
            own_segments: if layout.is_some() { Vec::new() } else { segs[if gathered { 0 } else { pos }].clone() },
            values: input.values,
            decoded: Vec::new(),
            residual_history: input.residual_history,
            residual_zero: input.residual_zero,
            ring_batches: input.ring_batches,
            param_history: input.param_history,
            rings: input.rings,
            zero_hashes: None,
            ring: None,
            layout,
            hier_segments: if layout.is_some() { segs.clone() } else { Vec::new() },
            early: Vec::new(),
            early_bytes: 0,
            dones: vec![None; n],
            sum: None,
            next: None,
            auditing: BTreeSet::new(),
            audit_targets: Vec::new(),
            left_step0: Vec::new(),
            left_step0_sq: 0.0,
            extra_steps: BTreeMap::new(),
            sum_checking: false,
            held_in: BTreeMap::new(),
            held_out: BTreeMap::new(),
            claims_in: BTreeMap::new(),
            claims_out: BTreeMap::new(),
            checks: vec![None; n],
            checked: vec![false; n],
            confirmed: vec![false; n],
            audited_data: BTreeMap::new(),
            points: [0; 2],
            deadline: now + cfg.commit_timeout_us,
            last_publish: now,
            started: now,
            reduce_started: now,
            reduce_us: 0,
            bytes: (0, 0),
            view,
            cfg,
        };
        let mut out = vec![RoundAction::Publish(Gossip::Commit(commit))];
        r.maybe_reduce(now, &mut out);
        (r, out)
    }

    pub fn view(&self) -> &RingView {
        &self.view
    }

    pub fn position(&self) -> usize {
        self.pos
    }

    /// This member's commit in the attempt.
    pub fn own_commit(&self) -> &GradientCommit {
        self.commits[self.pos].as_ref().expect("a member holds its own commit")
    }

    /// The member this one sends ring traffic to (in a hierarchical attempt, the next in its
    /// group; for an attached member, the first of its group).
    pub fn right(&self) -> &PeerKey {
        let n = self.view.len();
        &self.view.members[match self.layout.map(|l| (l, l.place(self.pos))) {
            None => (self.pos + 1) % n,
            Some((l, Place::Core { .. })) => l.right(self.pos, 0),
            Some((l, Place::Extra { group })) => l.holder(group, 1),
        }]
    }

    /// The member this one accepts ring traffic from (in a hierarchical attempt, the one
    /// before it in its group; for an attached member, the first of its group).
    pub fn left(&self) -> &PeerKey {
        &self.view.members[self.left_pos()]
    }

    fn left_pos(&self) -> usize {
        let n = self.view.len();
        match self.layout.map(|l| (l, l.place(self.pos))) {
            None => (self.pos + n - 1) % n,
            Some((l, Place::Core { .. })) => l.left(self.pos, 0),
            Some((l, Place::Extra { group })) => l.holder(group, 1),
        }
    }

    /// Every member this one sends segments to.
    pub fn destinations(&self) -> Vec<PeerKey> {
        match self.layout {
            Some(l) => l.destinations(self.pos).into_iter().map(|p| self.view.members[p].clone()).collect(),
            None if self.view.len() > 1 => vec![self.right().clone()],
            None => Vec::new(),
        }
    }

    /// Whether `peer` sends this member any segment in this attempt.
    pub fn hears_from(&self, peer: &str) -> bool {
        match (self.layout, self.view.position(peer)) {
            (Some(l), Some(from)) => l.destinations(from).contains(&self.pos),
            (None, _) => self.left() == peer,
            _ => false,
        }
    }

    /// Whether `peer` sends this member the segment `id` in this attempt.
    pub fn hears(&self, peer: &str, id: &StepId) -> bool {
        match (self.layout, self.view.position(peer)) {
            (Some(l), Some(from)) => l.sends(from, self.pos, id),
            (None, _) => self.left() == peer && id.level == 0,
            _ => false,
        }
    }

    /// Whether the attempt has ended, one way or the other.
    pub fn is_over(&self) -> bool {
        self.stage == Stage::Finished
    }

    /// Whether the message is for this attempt.
    pub fn is_for(&self, round: u64, attempt: u32) -> bool {
        (round, attempt) == (self.view.round, self.view.attempt)
    }

    fn fail(&mut self, reason: String, out: &mut Vec<RoundAction>) {
        self.fail_with(reason, FailureKind::Other, Vec::new(), out);
    }

    fn fail_with(&mut self, reason: String, kind: FailureKind, blame: Vec<PeerKey>, out: &mut Vec<RoundAction>) {
        if self.stage == Stage::Finished {
            return;
        }
        self.stage = Stage::Finished;
        out.push(RoundAction::Publish(Gossip::Failed(RoundFailed {
            run: self.run,
            peer: self.view.members[self.pos].clone(),
            round: self.view.round,
            attempt: self.view.attempt,
            reason: reason.clone(),
        })));
        out.push(RoundAction::Failed(Failure { reason, kind, blame }));
    }

    fn member(&self, peer: &str) -> Option<usize> {
        self.view.position(peer)
    }

    pub fn on_commit(&mut self, c: GradientCommit, now: u64) -> Vec<RoundAction> {
        let mut out = Vec::new();
        if self.stage == Stage::Finished || !self.is_for(c.round, c.attempt) {
            return out;
        }
        let Some(i) = self.member(&c.peer) else { return out };
        let asynchronous = self.cfg.max_staleness > 0;
        let refused = if asynchronous { self.refuse_async(&c) } else { None };
        let mine = self.commits[self.pos].as_ref().expect("own commit");
        // Asynchronous: a commit of no samples (the member's gradient is not ready) carries
        // zeros, whatever the parameters; a stale one names the parameters of its round (a
        // fresh one this round's, which this member may know only from its own gradient).
        let own_fresh = (mine.computed_at == mine.round && mine.samples > 0).then_some(mine.param_hash);
        let expected_params = if asynchronous {
            self.param_history.get(&c.computed_at).copied().or(own_fresh.filter(|_| c.computed_at == c.round))
        } else {
            Some(mine.param_hash)
        };
        if c.computed_at > c.round || c.round - c.computed_at > self.cfg.max_staleness {
            let peer = c.peer.clone();
            self.fail_with(
                format!(
                    "peer {peer} committed a gradient of round {} in round {}: beyond the run's staleness of {}",
                    c.computed_at, c.round, self.cfg.max_staleness
                ),
                FailureKind::BadMessage,
                vec![peer],
                &mut out,
            );
        } else if let Some((why, kind)) = refused {
            let peer = c.peer.clone();
            self.fail_with(format!("peer {peer} {why}"), kind, vec![peer], &mut out);
        } else if c.ring != self.ring_hash {
            self.fail(format!("peer {} formed another ring for this round: views differ", c.peer), &mut out);
        } else if c.len != mine.len || c.chunk_hashes.len() != mine.chunk_hashes.len() {
            self.fail(format!("peer {} committed to a vector of another shape", c.peer), &mut out);
        } else if self.ring_batches.get(i).is_some_and(|b| *b != c.samples) && !(asynchronous && c.is_behind()) {
            let expected = self.ring_batches[i];
            self.fail(
                format!("peer {} committed {} samples, not the {expected} it announced", c.peer, c.samples),
                &mut out,
            );
        } else if expected_params.is_some_and(|h| h != c.param_hash) && !(asynchronous && c.samples == 0) {
            // A gradient computed on other parameters would be averaged into ours: no round
            // with a member whose parameters differ (it must resync first).
            self.fail_with(
                format!("peer {} holds other parameters ({})", c.peer, crate::hash::hex(&c.param_hash)),
                FailureKind::ParamsDiffer,
                Vec::new(),
                &mut out,
            );
        } else if let Some(prev) = &self.commits[i] {
            if *prev != c {
                self.fail(format!("peer {} sent two different commits for one round", c.peer), &mut out);
            }
        } else if let Some(h) = self.residual_history.get(&c.peer)
            && ![h[0], h[1], self.residual_zero].contains(&c.residual)
        {
            // Its residual is none of what its last round could have left it: the error
            // feedback would carry values it never computed.
            let peer = c.peer.clone();
            self.fail_with(
                format!("peer {peer} compressed with a residual its last round did not leave it"),
                FailureKind::BadMessage,
                vec![peer],
                &mut out,
            );
        } else if let Some(why) = crate::audit::norm_exceeds(&c, &self.ring_batches, i, self.cfg.max_norm_units) {
            let peer = c.peer.clone();
            out.push(RoundAction::BadCommit(Box::new(BadCommit {
                view: self.view.clone(),
                accused: i,
                commit: c,
                batches: self.ring_batches.clone(),
                reason: why.clone(),
            })));
            self.fail_with(format!("peer {peer}: {why}"), FailureKind::Fault, vec![peer], &mut out);
        } else {
            self.commits[i] = Some(c);
            self.maybe_reduce(now, &mut out);
        }
        out
    }

    /// Asynchronous runs: why `c` is refused, if it is: a commit of no samples to anything but
    /// zeros, or a stale one this member cannot check against the ring of its round (unknown
    /// here, or a member of this ring was not in it: an honest member never offers it then,
    /// though it may not know this member missed that round) or that claims other samples than
    /// that ring gave it.
    fn refuse_async(&mut self, c: &GradientCommit) -> Option<(String, FailureKind)> {
        if c.samples == 0 {
            // Compressed: the payload of zeros, one chunk, and the residual kept for later.
            let (cfg, seg) = (&self.cfg, self.cfg.segment_elems);
            let zeros = self.zero_hashes.get_or_insert_with(|| match self.values {
                Some(values) => crate::audit::chunk_hashes(&crate::compress::zeros(cfg.compression, values), 1, seg),
                // This member's length: the commit's is not checked yet (a shape check follows).
                None => {
                    let own = self.commits[self.pos].as_ref().map_or(0, |m| m.len as usize);
                    crate::audit::chunk_hashes(&vec![0; own], cfg.chunks(self.view.len()), seg)
                }
            });
            // The norm's bits: -0.0 is not what an honest member commits, as auditors see it.
            let zeros_of_this_round =
                c.computed_at == c.round && c.norm.to_bits() == 0f64.to_bits() && c.chunk_hashes == *zeros;
            return if !zeros_of_this_round {
                Some(("committed no samples but not to zeros of this round".to_owned(), FailureKind::BadMessage))
            } else if c.residual_next != c.residual {
                Some(("committed no samples but says its residual changed".to_owned(), FailureKind::BadMessage))
            } else {
                None
            };
        }
        if c.computed_at >= c.round {
            return None;
        }
        let Some((members, batches)) = self.rings.get(&c.computed_at) else {
            let why = format!("committed a gradient of round {}, whose ring this member does not hold", c.computed_at);
            return Some((why, FailureKind::Other));
        };
        if let Some(m) = self.view.members.iter().find(|m| !members.contains(m)) {
            let why = format!("committed a gradient of round {}, whose ring {m} was not in", c.computed_at);
            return Some((why, FailureKind::Other));
        }
        let Some(pos) = members.iter().position(|m| *m == c.peer) else {
            let why = format!("committed a gradient of round {}, whose ring it was not in", c.computed_at);
            return Some((why, FailureKind::BadMessage));
        };
        (batches.get(pos) != Some(&c.samples)).then(|| {
            let why = format!(
                "committed {} samples of round {}, whose ring gave it {}",
                c.samples,
                c.computed_at,
                batches.get(pos).copied().unwrap_or_default()
            );
            (why, FailureKind::BadMessage)
        })
    }

    fn maybe_reduce(&mut self, now: u64, out: &mut Vec<RoundAction>) {
        if self.stage != Stage::Committing || self.commits.iter().any(Option::is_none) {
            return;
        }
        let n = self.view.len();
        // This ring, less the members leaving, plus the joiners some member saw and none keeps out.
        let commits: Vec<&GradientCommit> = self.commits.iter().flatten().collect();
        let kept_out: std::collections::BTreeSet<&PeerKey> = commits.iter().flat_map(|c| &c.excluded).collect();
        let mut next: Vec<PeerKey> = commits.iter().filter(|c| !c.leaving).map(|c| c.peer.clone()).collect();
        for c in &commits {
            next.extend(c.joiners.iter().filter(|j| !kept_out.contains(j)).cloned());
        }
        let mut next = RingView::order(self.run, self.view.round + 1, 0, next);
        // Members first, then joiners in ring order, up to the size limit.
        if next.len() > self.cfg.max_peers {
            let keep: std::collections::BTreeSet<PeerKey> = self
                .view
                .members
                .iter()
                .cloned()
                .chain(next.members.iter().filter(|m| !self.view.members.contains(m)).cloned())
                .take(self.cfg.max_peers)
                .collect();
            next.members.retain(|m| keep.contains(m));
        }
        self.next = Some(next);
        let seed = crate::audit::seed(self.run, self.view.round, self.view.attempt, self.commits.iter().flatten());
        // Asynchronous runs: a member behind the ring (its commit empty or stale) audits nobody,
        // as its compute is busy or slow and the ring goes on without waiting for it; a stand-in
        // audits its target (below), or it does where nobody can. Every member still decides
        // the sum checks alike.
        let asynchronous = self.cfg.max_staleness > 0;
        let behind: Vec<bool> =
            self.commits.iter().map(|c| asynchronous && c.as_ref().expect("all commits").is_behind()).collect();
        if let Some(target) = crate::audit::target(&seed, n, self.pos, self.cfg.audit_every)
            && !self.ring_batches.is_empty()
        {
            // A gathered payload is checked whole against its commit; no partial sums to check.
            self.sum_checking = self.values.is_none();
            // A member behind audits nobody; its target is audited by a stand-in, the first member
            // after it in ring order that is not behind (and is not that target), so every commit
            // is still recomputed in every audited attempt. Where nobody can stand in (the target
            // is the only member not behind), the member behind audits it itself.
            let stand_in = |b: usize, t: usize| (1..n).map(|k| (b + k) % n).find(|m| !behind[*m] && *m != t);
            if !behind[self.pos] || stand_in(self.pos, target).is_none() {
                self.audit_targets = vec![target];
            }
            if !behind[self.pos] {
                for b in (0..n).filter(|b| behind[*b]) {
                    let Some(t) = crate::audit::target(&seed, n, b, self.cfg.audit_every) else { continue };
                    if stand_in(b, t) == Some(self.pos) && !self.audit_targets.contains(&t) {
                        self.audit_targets.push(t);
                    }
                }
            }
            for &t in &self.audit_targets {
                self.auditing.insert(t);
                out.push(RoundAction::Audit(Box::new(AuditJob {
                    view: self.view.clone(),
                    target: t,
                    commit: self.commits[t].clone().expect("all commits"),
                    batches: self.ring_batches.clone(),
                })));
            }
        }
        let params = RingParams {
            run: self.run,
            round: self.view.round,
            attempt: self.view.attempt,
            n,
            pos: self.pos,
            segment_elems: self.cfg.segment_elems,
            max_units: if self.values.is_some() { 0 } else { self.cfg.max_units },
        };
        let data = self.data.take().expect("data until the ring starts");
        let own = std::mem::take(&mut self.own_segments);
        let commits: Vec<&GradientCommit> = self.commits.iter().flatten().collect();
        let ring = if let Some(values) = self.values {
            self.decoded = vec![0; values];
            let len = data.len();
            let mut all = vec![0; n * len];
            all[self.pos * len..(self.pos + 1) * len].copy_from_slice(&data);
            RingAllReduce::gather(params, all, own, commits.iter().map(|c| c.chunk_hashes[0]).collect())
                .map(Reducer::Ring)
        } else if let Some(layout) = self.layout {
            let all: Vec<Vec<Hash>> = commits.iter().map(|c| c.chunk_hashes.clone()).collect();
            HierAllReduce::new(layout, params, data, std::mem::take(&mut self.hier_segments), &all).map(Reducer::Hier)
        } else {
            let left = (self.pos + n - 1) % n;
            RingAllReduce::new(params, data, own, commits[left].chunk_hashes[left]).map(Reducer::Ring)
        };
        let mut ring = match ring {
            Ok(r) => r,
            Err(e) => return self.fail(e.to_string(), out),
        };
        let right = (self.pos + 1) % n;
        let first = match &mut ring {
            Reducer::Ring(r) => Ok(r.start().into_iter().map(|s| (right, s)).collect()),
            Reducer::Hier(h) => h.start(),
        };
        match first {
            Ok(steps) => out.extend(self.sends(steps)),
            Err(e) => return self.fail(e.to_string(), out),
        }
        self.ring = Some(ring);
        if !self.absorb_gathered(out) {
            return;
        }
        self.stage = Stage::Reducing;
        self.reduce_started = now;
        self.deadline = now + self.cfg.step_timeout_us;
        for (from, s) in std::mem::take(&mut self.early) {
            let from = self.view.members[from].clone();
            out.extend(self.on_step_from(&from, s, now));
        }
        self.maybe_certify(now, out);
    }

    /// What this member's `Done` says of the next ring. Only peers outside this ring need it
    /// (a joiner learns from it that it is in the next one; members make the next ring from
    /// the commits themselves), so only the first [`DONE_CARRIERS`] members in ring order carry
    /// it, and only when the next ring has members this one lacks: every other `Done` stays a
    /// few hundred bytes whatever the ring's size, where each carried a list of every member
    /// (53 kB at 1,000 peers, and every peer receives every member's `Done`).
    fn next_members_to_announce(&self) -> Vec<PeerKey> {
        let next = &self.next.as_ref().expect("next ring").members;
        let now: BTreeSet<&PeerKey> = self.view.members.iter().collect();
        let grows = next.iter().any(|m| !now.contains(m));
        if self.pos < DONE_CARRIERS && grows { next.clone() } else { Vec::new() }
    }

    fn sends(&self, steps: Vec<(usize, RingStep)>) -> impl Iterator<Item = RoundAction> + '_ {
        steps.into_iter().map(|(to, s)| RoundAction::Send(self.view.members[to].clone(), s))
    }

    /// A verified segment from the left neighbour (the caller checks the sender).
    pub fn on_step(&mut self, step: VerifiedStep, now: u64) -> Vec<RoundAction> {
        let left = self.left().clone();
        self.on_step_from(&left, step, now)
    }

    /// A verified segment from `from` (the caller checks that it sends this member this
    /// segment: [`Self::hears`]).
    pub fn on_step_from(&mut self, from: &str, step: VerifiedStep, now: u64) -> Vec<RoundAction> {
        let mut out = Vec::new();
        let Some(from_pos) = self.view.position(from) else { return out };
        match self.stage {
            Stage::Committing => {
                // The left neighbour may hold all commits before this member does. It can be at
                // most the reduce-scatter ahead (about the vector), or in a gathering ring the
                // payloads of all the others; a segment is at most the run's segment size.
                let len = self.commits[self.pos].as_ref().map_or(0, |c| c.len as usize);
                let seg = self.cfg.segment_elems.max(1);
                let bytes = step.step().payload.len();
                let most = 4 * len * if self.values.is_some() { self.view.len() } else { 2 };
                if bytes > 4 * seg {
                    let reason = format!(
                        "ring frame from {from} rejected: a segment of {bytes} bytes, beyond the run's segments of {seg} \
                         values"
                    );
                    self.fail_with(reason, FailureKind::BadFrame, vec![from.to_owned()], &mut out);
                } else if self.early.len() > 2 * self.view.len() * (1 + len / seg) || self.early_bytes + bytes > most {
                    self.fail("too many ring steps before the commits arrived".into(), &mut out);
                } else {
                    self.early_bytes += bytes;
                    self.early.push((from_pos, step));
                }
            }
            Stage::Reducing => {
                let s = step.step();
                let level = s.id.level;
                if level == 2 && s.id.phase == Phase::ReduceScatter {
                    self.extra_steps.entry(from_pos).or_default().push(s.header());
                }
                if s.id.level == 0 && s.id.phase == Phase::ReduceScatter && s.id.step == 0 && self.values.is_none() {
                    self.left_step0.push(s.header());
                    // Part of the left neighbour's vector cannot have a larger norm than it all.
                    self.left_step0_sq += crate::fixed::sum_squares_le_bytes(&s.payload);
                    let claimed = self.commits[self.left_pos()].as_ref().map_or(0.0, |c| c.norm);
                    if self.left_step0_sq.sqrt() > claimed * (1.0 + 1e-9) + 1.0 {
                        let left = self.left().clone();
                        let reason = format!(
                            "ring frame from {left} rejected: its own chunk alone has a larger norm than the {claimed:.0} \
                             units it committed to"
                        );
                        self.fail_with(reason, FailureKind::BadFrame, vec![left], &mut out);
                        return out;
                    }
                }
                if self.sum_checking && sumcheck::claimed(self.layout, &s.id) {
                    self.held_in.insert(s.id, (s.hash, s.payload.clone()));
                }
                let right = (self.pos + 1) % self.view.len();
                let ring = self.ring.as_mut().expect("ring while reducing");
                match ring.on_step(from_pos, right, step) {
                    Ok(send) => {
                        out.extend(self.sends(send));
                        self.deadline = now + self.cfg.step_timeout_us;
                        if self.absorb_gathered(&mut out) {
                            self.maybe_certify(now, &mut out);
                        }
                    }
                    Err(e) => {
                        // Every rejected step (values out of range or other than committed, a
                        // step out of place or twice) is the sender's doing: the stream is
                        // authenticated end to end.
                        let sender = from.to_owned();
                        let blame = vec![sender.clone()];
                        if matches!(e, crate::ring::RingError::CommitMismatch { .. }) && self.values.is_none() {
                            // Its own chunk: step 0 of the (group) ring, or an attached member's.
                            let (accused, mut steps) = match level {
                                2 => (from_pos, self.extra_steps.remove(&from_pos).unwrap_or_default()),
                                _ => (self.left_pos(), self.left_step0.clone()),
                            };
                            steps.sort_by_key(|s| s.id.segment);
                            out.push(RoundAction::Contradiction(Box::new(Contradiction {
                                view: self.view.clone(),
                                accused,
                                commit: self.commits[accused].clone().expect("all commits"),
                                batches: self.ring_batches.clone(),
                                steps,
                            })));
                        }
                        let reason = format!("ring frame from {sender} rejected: {e}");
                        self.fail_with(reason, FailureKind::BadFrame, blame, &mut out)
                    }
                }
            }
            Stage::Certifying | Stage::Checking | Stage::Finished => {}
        }
        out
    }

    /// What this member actually sent (after signing): kept for its sum check, which goes out
    /// once the sum is here and every segment it claims was noted.
    pub fn note_sent(&mut self, step: &RingStep, now: u64) -> Vec<RoundAction> {
        let mut out = Vec::new();
        if self.sum_checking && self.is_for(step.round, step.attempt) && sumcheck::claimed(self.layout, &step.id) {
            self.held_out.insert(step.id, (step.hash, step.payload.clone()));
            self.maybe_publish_check(&mut out);
            self.maybe_certify(now, &mut out);
        }
        out
    }

    /// This member's audit found the commit of the member at `target` to be its gradient,
    /// recomputed as `data` (kept to check the target's partial sums).
    pub fn audit_passed(&mut self, now: u64, target: usize, data: Option<Vec<i32>>) -> Vec<RoundAction> {
        let mut out = Vec::new();
        if self.stage != Stage::Finished && self.auditing.remove(&target) {
            if let Some(data) = data {
                self.audited_data.insert(target, data);
            }
            self.maybe_certify(now, &mut out);
        }
        out
    }

    /// This member's audit proved that the member at `target` committed to something else than
    /// its gradient: the attempt fails, naming it.
    pub fn audit_failed(&mut self, target: usize, reason: &str) -> Vec<RoundAction> {
        let mut out = Vec::new();
        let accused = self.view.members[target].clone();
        self.fail_with(
            format!("audit of peer {accused} failed: {reason}"),
            FailureKind::Fault,
            vec![accused],
            &mut out,
        );
        out
    }

    /// This member's audit could not prove a lie, yet the attempt cannot count: the member at
    /// `target` did not reveal values matching its commit, or revealed values that are
    /// suspiciously far from its recomputation though within what could still be device
    /// noise (audits within a tolerance). Nothing is proven; the attempt fails naming it, as
    /// a message that failed its checks here.
    /// With `kind` [`FailureKind::Other`], the doubt is this member's own (it could not
    /// recompute), and nobody is blamed.
    pub fn audit_unanswered(&mut self, target: usize, reason: &str, kind: FailureKind) -> Vec<RoundAction> {
        let mut out = Vec::new();
        if self.auditing.contains(&target) && self.stage != Stage::Finished {
            let peer = self.view.members[target].clone();
            let blame = if kind == FailureKind::Other { Vec::new() } else { vec![peer.clone()] };
            self.fail_with(format!("audit of peer {peer} could not finish: {reason}"), kind, blame, &mut out);
        }
        out
    }

    fn maybe_certify(&mut self, now: u64, out: &mut Vec<RoundAction>) {
        if self.stage == Stage::Reducing
            && self.ring.as_ref().is_some_and(Reducer::is_done)
            && !self.auditing.is_empty()
        {
            // The sum is here; the Done waits for this member's audit (bounded by the step timeout).
            self.deadline = self.deadline.max(now + self.cfg.step_timeout_us);
            return;
        }
        if self.stage == Stage::Reducing && self.ring.as_ref().is_some_and(Reducer::is_done) {
            let ring = self.ring.take().expect("ring");
            let sums = ring.partial_sums();
            self.bytes = ring.bytes();
            self.reduce_us = now - self.reduce_started;
            // Certified from the segment hashes checked on the way; made here only where the
            // all-reduce did not hash the sum's segments (a ring of one, decoded payloads).
            let known = if self.values.is_none() { ring.result_hash() } else { None };
            let sum = match self.values {
                None => ring.into_result(),
                Some(_) => std::mem::take(&mut self.decoded),
            };
            let chunks = self.cfg.chunks(self.view.len());
            let hash = known.unwrap_or_else(|| sum_hash(&sum, chunks, self.cfg.segment_elems));
            let me = self.view.members[self.pos].clone();
            if !sums.is_empty() {
                out.push(RoundAction::Publish(Gossip::PartialSums(PartialSums {
                    run: self.run,
                    peer: me.clone(),
                    round: self.view.round,
                    attempt: self.view.attempt,
                    sums,
                })));
            }
            let done = RoundDone {
                run: self.run,
                peer: me,
                round: self.view.round,
                attempt: self.view.attempt,
                result: hash,
                next_members: self.next_members_to_announce(),
            };
            out.push(RoundAction::Publish(Gossip::Done(done.clone())));
            self.dones[self.pos] = Some(done);
            self.sum = Some((sum, hash));
            self.stage = Stage::Certifying;
            self.deadline = now + self.cfg.done_timeout_us;
            self.last_publish = now;
            self.maybe_publish_check(out);
            // Dones that came early.
            for i in 0..self.dones.len() {
                if let Some(d) = &self.dones[i]
                    && d.result != hash
                {
                    let who = d.peer.clone();
                    return self.fail(
                        format!("peer {who} holds another sum {}: the ring diverged", &hex(&d.result)[..16]),
                        out,
                    );
                }
            }
        }
        if self.stage == Stage::Certifying && self.dones.iter().all(Option::is_some) && self.sum_checking {
            // Every member certified the same sum: the checks decide.
            self.stage = Stage::Checking;
            self.deadline = now + self.cfg.done_timeout_us;
            self.maybe_confirm(out);
        }
        if (self.stage == Stage::Certifying && self.dones.iter().all(Option::is_some))
            || (self.stage == Stage::Checking && self.confirmed.iter().all(|c| *c))
        {
            self.stage = Stage::Finished;
            let (sum, sum_hash) = self.sum.take().expect("sum");
            let samples = self.commits.iter().flatten().fold(0u64, |s, c| s.saturating_add(c.samples));
            let ring_samples = if self.ring_batches.is_empty() { samples } else { self.ring_batches.iter().sum() };
            let own = self.commits[self.pos].as_ref().expect("own commit");
            out.push(RoundAction::Completed(Box::new(Outcome {
                view: self.view.clone(),
                position: self.pos,
                sum,
                sum_hash,
                samples,
                own_samples: own.samples,
                own_commit: own.digest(),
                next: self.next.take().expect("next ring"),
                bytes_sent: self.bytes.0,
                bytes_received: self.bytes.1,
                reduce_us: self.reduce_us,
                round_us: now - self.started,
                audited: self.audit_targets.first().map(|t| self.view.members[*t].clone()),
                audited_also: self.audit_targets.iter().skip(1).map(|t| self.view.members[*t].clone()).collect(),
                residuals: self
                    .commits
                    .iter()
                    .flatten()
                    .map(|c| (c.peer.clone(), [c.residual, c.residual_next]))
                    .collect(),
                ring_samples,
                computed_at: self.commits.iter().flatten().map(|c| (c.peer.clone(), c.computed_at)).collect(),
            })));
        }
    }

    /// Decodes the gathered payloads that arrived whole since the last call (each matched its
    /// originator's commit) into the sum, while the others travel. A payload that cannot be
    /// decoded, or whose norm is not the one its commit states, fails the attempt naming its
    /// member; returns whether the attempt goes on.
    fn absorb_gathered(&mut self, out: &mut Vec<RoundAction>) -> bool {
        let (Some(values), Some(Reducer::Ring(ring))) = (self.values, self.ring.as_mut()) else { return true };
        let c = self.cfg.compression;
        let max_units = if self.cfg.max_units > 0 { self.cfg.max_units } else { i32::MAX / self.view.len() as i32 };
        for i in ring.take_gathered() {
            let payload = ring.chunk(i);
            let committed = self.commits[i].as_ref().expect("all commits").norm;
            let why = match crate::compress::check(c, payload, values, max_units) {
                Ok(norm) if norm.to_bits() == committed.to_bits() => {
                    crate::compress::add_into(c, payload, &mut self.decoded);
                    continue;
                }
                Ok(norm) => format!("decodes to a norm of {norm:.0} units, not the {committed:.0} it committed to"),
                Err(e) => e.to_string(),
            };
            let peer = self.view.members[i].clone();
            self.fail_with(
                format!("peer {peer} committed to a payload that {why}"),
                FailureKind::BadMessage,
                vec![peer],
                out,
            );
            return false;
        }
        true
    }

    /// Once this member holds the sum and noted every segment it claims to have sent, gossips
    /// its claims (with its `Done`) and checks those already in.
    fn maybe_publish_check(&mut self, out: &mut Vec<RoundAction>) {
        if !self.sum_checking || self.sum.is_none() || self.checks[self.pos].is_some() || self.stage == Stage::Finished
        {
            return;
        }
        let (n, len) = (self.view.len(), self.own_commit().len as usize);
        let sent = sumcheck::claimed_ids(self.layout, n, self.pos, len, self.cfg.segment_elems).0;
        if sent.iter().any(|id| !self.held_out.contains_key(id)) {
            return;
        }
        let sum = self.sum.as_ref().expect("sum").1;
        self.points = sumcheck::points(self.run, self.view.round, self.view.attempt, &sum);
        let points = self.points;
        let evaluate = |held: BTreeMap<StepId, (Hash, Vec<u8>)>| -> BTreeMap<StepId, SegmentClaim> {
            held.into_iter()
                .map(|(id, (hash, bytes))| {
                    (id, SegmentClaim { id, hash, eval: sumcheck::eval_le_bytes(&bytes, points) })
                })
                .collect()
        };
        self.claims_in = evaluate(std::mem::take(&mut self.held_in));
        self.claims_out = evaluate(std::mem::take(&mut self.held_out));
        let check = SumCheck {
            run: self.run,
            peer: self.view.members[self.pos].clone(),
            round: self.view.round,
            attempt: self.view.attempt,
            sum,
            sent: self.claims_out.values().copied().collect(),
            // The all-gather chunk it received is not its to claim (its sender claims it).
            received: self.claims_in.values().filter(|c| c.id.phase == Phase::ReduceScatter).copied().collect(),
            signature: Vec::new(),
        };
        out.push(RoundAction::Publish(Gossip::SumCheck(Box::new(check.clone()))));
        self.checks[self.pos] = Some(check);
        self.checked[self.pos] = true;
        for i in 0..self.checks.len() {
            if i != self.pos && self.checks[i].is_some() && self.stage != Stage::Finished {
                self.verify_check(i, out);
            }
        }
        self.maybe_confirm(out);
    }

    /// Checks member `i`'s sum check: its shape, the claims about segments this member holds
    /// and, if this member audited it, its partial sums against its recomputed values.
    fn verify_check(&mut self, i: usize, out: &mut Vec<RoundAction>) {
        let (n, me, layout) = (self.view.len(), self.pos, self.layout);
        // Whether `from` sends `to` the segment (in a plain ring, to its right neighbour).
        let sends = |from: usize, to: usize, id: &StepId| match layout {
            Some(l) => l.sends(from, to, id),
            None => (from + 1) % n == to,
        };
        let check = self.checks[i].as_ref().expect("a check to verify");
        let to_me: Vec<SegmentClaim> = check.sent.iter().filter(|c| sends(i, me, &c.id)).copied().collect();
        let from_me: Vec<SegmentClaim> = check.received.iter().filter(|c| sends(me, i, &c.id)).copied().collect();
        let peer = check.peer.clone();
        let len = self.own_commit().len as usize;
        let sum = self.sum.as_ref().expect("sum while checking").1;
        if check.sum != sum {
            // As a Done with another sum (its check may come first): the ring diverged.
            let reason = format!("peer {peer} holds another sum {}: the ring diverged", &hex(&check.sum)[..16]);
            return self.fail(reason, out);
        }
        let wrong = sumcheck::check_shape(check, layout, n, i, len, self.cfg.segment_elems)
            .and_then(|()| sumcheck::check_held(&to_me, &self.claims_in))
            .and_then(|()| sumcheck::check_held(&from_me, &self.claims_out));
        if let Err(why) = wrong {
            return self.fail_with(format!("peer {peer}: {why}"), FailureKind::BadMessage, vec![peer], out);
        }
        if let Some(data) = self.audited_data.get(&i)
            && let Err(why) = sumcheck::check_own(check, layout, n, i, data, self.cfg.segment_elems, self.points)
        {
            out.push(RoundAction::SumFault(Box::new(SumFault {
                view: self.view.clone(),
                accused: i,
                commit: self.commits[i].clone().expect("all commits"),
                batches: self.ring_batches.clone(),
                check: check.clone(),
            })));
            return self.fail_with(format!("peer {peer}: {why}"), FailureKind::Fault, vec![peer], out);
        }
        self.checked[i] = true;
        self.maybe_confirm(out);
    }

    /// Once every check passed, tells the others.
    fn maybe_confirm(&mut self, out: &mut Vec<RoundAction>) {
        if self.stage == Stage::Checking && !self.confirmed[self.pos] && self.checked.iter().all(|c| *c) {
            self.confirmed[self.pos] = true;
            out.push(RoundAction::Publish(Gossip::Checked(self.own_checked())));
        }
    }

    fn own_checked(&self) -> RoundChecked {
        RoundChecked {
            run: self.run,
            peer: self.view.members[self.pos].clone(),
            round: self.view.round,
            attempt: self.view.attempt,
        }
    }

    /// A member said all its checks passed.
    pub fn on_checked(&mut self, c: &RoundChecked, now: u64) -> Vec<RoundAction> {
        let mut out = Vec::new();
        if self.stage == Stage::Finished || !self.is_for(c.round, c.attempt) || !self.sum_checking {
            return out;
        }
        if let Some(i) = self.member(&c.peer).filter(|i| *i != self.pos) {
            self.confirmed[i] = true;
            self.maybe_certify(now, &mut out);
        }
        out
    }

    /// A member's sum check (the caller checked its signature).
    pub fn on_sum_check(&mut self, check: SumCheck, now: u64) -> Vec<RoundAction> {
        let mut out = Vec::new();
        if self.stage == Stage::Finished || !self.is_for(check.round, check.attempt) || !self.sum_checking {
            return out;
        }
        let Some(i) = self.member(&check.peer).filter(|i| *i != self.pos) else { return out };
        match &self.checks[i] {
            Some(prev) if *prev != check => {
                let peer = check.peer.clone();
                self.fail_with(
                    format!("peer {peer} sent two different sum checks for one attempt"),
                    FailureKind::BadMessage,
                    vec![peer],
                    &mut out,
                );
                return out;
            }
            Some(_) => return out,
            None => self.checks[i] = Some(check),
        }
        // Checked once this member published its own claims (those that came earlier are
        // checked then).
        if matches!(self.stage, Stage::Certifying | Stage::Checking) && self.checks[self.pos].is_some() {
            self.verify_check(i, &mut out);
            self.maybe_certify(now, &mut out);
        }
        out
    }

    pub fn on_done(&mut self, d: RoundDone, now: u64) -> Vec<RoundAction> {
        let mut out = Vec::new();
        if self.stage == Stage::Finished || !self.is_for(d.round, d.attempt) {
            return out;
        }
        let Some(i) = self.member(&d.peer) else { return out };
        if let Some((_, mine)) = &self.sum
            && d.result != *mine
        {
            self.fail(
                format!("peer {} holds another sum {}: the ring diverged", d.peer, &hex(&d.result)[..16]),
                &mut out,
            );
            return out;
        }
        self.dones[i] = Some(d);
        self.maybe_certify(now, &mut out);
        out
    }

    pub fn on_failed(&mut self, f: &RoundFailed) -> Vec<RoundAction> {
        let mut out = Vec::new();
        if self.is_for(f.round, f.attempt) && self.member(&f.peer).is_some() && f.peer != self.view.members[self.pos] {
            self.fail(format!("peer {} failed the round: {}", f.peer, f.reason), &mut out);
        }
        out
    }

    /// Fails the round because members stopped responding or left, unless each of them has
    /// sent all it had to (its `Done`, and its `Checked` in a checked attempt): a member that
    /// certified and then left (it finished the run, or was asked to stop) holds the sum, and
    /// failing the attempt for it would have the others redo a round it completed.
    pub fn members_gone(&mut self, gone: &[PeerKey]) -> Vec<RoundAction> {
        let mut out = Vec::new();
        let finished = |i: usize| match self.stage {
            Stage::Certifying => self.dones[i].is_some(),
            Stage::Checking => self.dones[i].is_some() && self.checked[i],
            _ => false,
        };
        let gone: Vec<PeerKey> = gone.iter().filter(|p| self.member(p).is_none_or(|i| !finished(i))).cloned().collect();
        if !gone.is_empty() {
            self.fail_with(
                format!("ring members stopped responding or left: {}", gone.join(", ")),
                FailureKind::Gone,
                gone.to_vec(),
                &mut out,
            );
        }
        out
    }

    /// The left neighbour sent a frame that failed the checks before the state machine (its
    /// hash, its signature, a replay on this attempt's stream): the attempt fails, naming it.
    pub fn rejected_from_left(&mut self, reason: &str) -> Vec<RoundAction> {
        let left = self.left().clone();
        self.rejected_from(&left, reason)
    }

    /// As [`Self::rejected_from_left`], for a frame from `left`, a left neighbour of this member
    /// in one of the attempt's rings.
    pub fn rejected_from(&mut self, left: &str, reason: &str) -> Vec<RoundAction> {
        let mut out = Vec::new();
        if matches!(self.stage, Stage::Committing | Stage::Reducing) {
            let left = left.to_owned();
            self.fail_with(
                format!("ring frame from {left} rejected: {reason}"),
                FailureKind::BadFrame,
                vec![left],
                &mut out,
            );
        }
        out
    }

    /// This member aborts the attempt (it is leaving before the ring could use its gradient).
    pub fn abort(&mut self, reason: &str) -> Vec<RoundAction> {
        let mut out = Vec::new();
        self.fail(reason.to_owned(), &mut out);
        out
    }

    /// Whether this member's gradient may already be in another member's partial sums: the
    /// attempt is past its commit barrier.
    pub fn is_reducing(&self) -> bool {
        matches!(self.stage, Stage::Reducing | Stage::Certifying | Stage::Checking)
    }

    /// Timeouts and re-gossip.
    pub fn tick(&mut self, now: u64) -> Vec<RoundAction> {
        let mut out = Vec::new();
        if self.stage == Stage::Finished {
            return out;
        }
        if now >= self.deadline {
            let members = &self.view.members;
            let missing = |present: Vec<bool>| -> Vec<PeerKey> {
                present.iter().zip(members).filter(|(p, _)| !**p).map(|(_, m)| m.clone()).collect()
            };
            let (what, blame) = match self.stage {
                Stage::Committing => ("commits", missing(self.commits.iter().map(Option::is_some).collect())),
                Stage::Reducing if !self.auditing.is_empty() && self.ring.as_ref().is_some_and(Reducer::is_done) => {
                    ("this member's audit", Vec::new())
                }
                // In a hierarchy any of several members may be the one behind.
                Stage::Reducing if self.layout.is_some() => ("ring data from the members sending to it", Vec::new()),
                Stage::Reducing => ("ring data", vec![self.left().clone()]),
                Stage::Checking if self.checks.iter().any(Option::is_none) => {
                    ("sum checks", missing(self.checks.iter().map(Option::is_some).collect()))
                }
                Stage::Checking => ("their checks", missing(self.confirmed.clone())),
                _ => ("Done", missing(self.dones.iter().map(Option::is_some).collect())),
            };
            let reason = match blame.is_empty() {
                true => format!("timed out waiting for {what}"),
                false => format!("timed out waiting for {what} from {}", blame.join(", ")),
            };
            self.fail_with(reason, FailureKind::Gone, blame, &mut out);
            return out;
        }
        if now.saturating_sub(self.last_publish) >= self.cfg.republish_us {
            self.last_publish = now;
            match self.stage {
                Stage::Committing => {
                    out.push(RoundAction::Publish(Gossip::Commit(self.commits[self.pos].clone().expect("own commit"))));
                }
                Stage::Certifying => {
                    out.push(RoundAction::Publish(Gossip::Done(self.dones[self.pos].clone().expect("own done"))));
                    if let Some(check) = self.checks[self.pos].clone() {
                        out.push(RoundAction::Publish(Gossip::SumCheck(Box::new(check))));
                    }
                }
                Stage::Checking => {
                    // A member still waiting for Dones may have missed this one.
                    out.push(RoundAction::Publish(Gossip::Done(self.dones[self.pos].clone().expect("own done"))));
                    if let Some(check) = self.checks[self.pos].clone() {
                        out.push(RoundAction::Publish(Gossip::SumCheck(Box::new(check))));
                    }
                    if self.confirmed[self.pos] {
                        out.push(RoundAction::Publish(Gossip::Checked(self.own_checked())));
                    }
                }
                _ => {}
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::RingStep;
    use std::collections::VecDeque;

    const RUN: &str = "round-test";

    fn cfg() -> RoundConfig {
        RoundConfig {
            commit_timeout_us: 1_000,
            step_timeout_us: 1_000,
            done_timeout_us: 1_000,
            republish_us: 500,
            segment_elems: 3,
            max_peers: 8,
            audit_every: 0,
            max_units: 1 << 20,
            max_norm_units: 0.0,
            compression: Compression::None,
            max_staleness: 0,
            group_size: 0,
        }
    }

    fn no_sign(_: &[u8]) -> Vec<u8> {
        Vec::new()
    }

    fn member_data(i: usize, len: usize) -> Vec<i32> {
        (0..len).map(|j| (i as i32 + 1) * 1000 + j as i32 * 7 - 50).collect()
    }

    /// Runs one attempt with a perfect network: gossip reaches every member,
    /// ring steps reach the right neighbour. `silent` members never act.
    fn run_round(n: usize, len: usize, joiners: &[&str], silent: &[usize]) -> Vec<Vec<RoundAction>> {
        run_round_with(n, len, joiners, silent, None, Compression::None)
    }

    /// As [`run_round`]; the member at `liar` announces a wrong sum in its `Done`; members
    /// compress their values with `comp` (a liar then commits to a payload above its range).
    fn run_round_with(
        n: usize,
        len: usize,
        joiners: &[&str],
        silent: &[usize],
        liar: Option<usize>,
        comp: Compression,
    ) -> Vec<Vec<RoundAction>> {
        run_round_cfg(n, len, joiners, silent, liar, RoundConfig { compression: comp, ..cfg() }).0
    }

    /// As [`run_round_with`], under `base` (its compression, its groups); also returns every
    /// `Done` a member published, by position.
    fn run_round_cfg(
        n: usize,
        len: usize,
        joiners: &[&str],
        silent: &[usize],
        liar: Option<usize>,
        base: RoundConfig,
    ) -> (Vec<Vec<RoundAction>>, Vec<(usize, RoundDone)>) {
        let mut dones = Vec::new();
        let comp = base.compression;
        let cfg = || base.clone();
        let run = RunId::from_name(RUN);
        let names: Vec<String> = (0..n).map(|i| format!("m{i}")).collect();
        let view = RingView::order(run, 4, 0, names.clone());
        let mut rounds = Vec::new();
        let mut queue: VecDeque<(usize, RoundAction)> = VecDeque::new();
        for (pos, name) in view.members.iter().enumerate() {
            let i: usize = name[1..].parse().unwrap();
            let joiners = if i == 0 { joiners.iter().map(|s| s.to_string()).collect() } else { Vec::new() };
            let seg = cfg().segment_elems;
            let input = if comp.is_none() {
                Contribution::new(member_data(i, len), 10 + i as u64, [1; 32], joiners, cfg().chunks(n), seg)
            } else {
                let mut e = crate::compress::encode(comp, &member_data(i, len), None, cfg().max_units, 0.0);
                if liar == Some(pos) {
                    let k = e.payload.len() / 2;
                    e.payload[k] = cfg().max_units + 1;
                }
                Contribution::compressed(e.payload, e.norm, len, 10 + i as u64, [1; 32], joiners, seg)
            };
            let (r, acts) = Round::new(run, name, view.clone(), input, cfg(), 0, &no_sign);
            if !silent.contains(&pos) {
                queue.extend(acts.into_iter().map(|a| (pos, a)));
            }
            rounds.push(r);
        }
        let mut results: Vec<Vec<RoundAction>> = vec![Vec::new(); n];
        let mut now = 0;
        while now < 10_000 {
            while let Some((from, a)) = queue.pop_front() {
                let mut out: Vec<(usize, Vec<RoundAction>)> = Vec::new();
                match &a {
                    RoundAction::Publish(g) => {
                        if let Gossip::Done(d) = g {
                            dones.push((from, d.clone()));
                        }
                        let mut g = g.clone();
                        if let Gossip::Done(d) = &mut g
                            && liar == Some(from)
                            && comp.is_none()
                        {
                            d.result = [9; 32];
                        }
                        for (to, r) in rounds.iter_mut().enumerate() {
                            if to == from || silent.contains(&to) {
                                continue;
                            }
                            let acts = match &g {
                                Gossip::Commit(c) => r.on_commit(c.clone(), now),
                                Gossip::Done(d) => r.on_done(d.clone(), now),
                                Gossip::Failed(f) => r.on_failed(f),
                                _ => Vec::new(),
                            };
                            out.push((to, acts));
                        }
                    }
                    RoundAction::Send(peer, step) => {
                        let to = view.position(peer).unwrap();
                        assert!(rounds[to].hears(&view.members[from], &step.id), "{from} may send {to} {:?}", step.id);
                        if !silent.contains(&to) {
                            let v = RingStep::clone(step).verify().unwrap();
                            out.push((to, rounds[to].on_step_from(&view.members[from], v, now)));
                        }
                    }
                    RoundAction::Audit(_)
                    | RoundAction::Contradiction(_)
                    | RoundAction::SumFault(_)
                    | RoundAction::BadCommit(_) => {}
                    RoundAction::Completed(_) | RoundAction::Failed(_) => results[from].push(a.clone()),
                }
                for (to, acts) in out {
                    queue.extend(acts.into_iter().map(|a| (to, a)));
                }
            }
            now += 100;
            for (pos, r) in rounds.iter_mut().enumerate() {
                if !silent.contains(&pos) {
                    let acts = r.tick(now);
                    queue.extend(acts.into_iter().map(|a| (pos, a)));
                }
            }
            if queue.is_empty() && rounds.iter().enumerate().all(|(p, r)| r.is_over() || silent.contains(&p)) {
                break;
            }
        }
        (results, dones)
    }

    /// Only the first members in ring order name the next ring in their `Done`, and only when
    /// it grows: a joiner learns it is in from them, and every other `Done` stays small at any
    /// ring size.
    #[test]
    fn only_the_first_members_dones_name_a_ring_that_grows() {
        for n in 1..7 {
            for (joiners, g) in [(&["joiner"][..], 0), (&[][..], 0), (&["joiner"][..], 2)] {
                let base = RoundConfig { group_size: g, ..cfg() };
                let (results, dones) = run_round_cfg(n, 40, joiners, &[], None, base);
                assert!(results.iter().all(|r| matches!(r[..], [RoundAction::Completed(_)])), "n={n}");
                assert_eq!(dones.len(), n, "one Done per member");
                for (pos, d) in &dones {
                    let RoundAction::Completed(o) = &results[*pos][0] else { unreachable!() };
                    if joiners.is_empty() || *pos >= DONE_CARRIERS {
                        assert!(d.next_members.is_empty(), "n={n} member {pos}: {:?}", d.next_members);
                    } else {
                        assert_eq!(d.next_members, o.next.members, "n={n} member {pos}");
                        assert!(d.next_members.iter().any(|m| m == "joiner"));
                    }
                }
            }
        }
    }

    #[test]
    fn every_member_certifies_the_exact_sum_and_the_next_ring() {
        for n in 1..7 {
            for len in [0, 1, 5, 40] {
                let results = run_round(n, len, &["joiner"], &[]);
                let want: Vec<i32> = (0..len).map(|j| (0..n).map(|i| member_data(i, len)[j]).sum()).collect();
                let run = RunId::from_name(RUN);
                let mut members: Vec<String> = (0..n).map(|i| format!("m{i}")).collect();
                members.push("joiner".into());
                let next = RingView::order(run, 5, 0, members);
                for r in &results {
                    assert_eq!(r.len(), 1, "one outcome per member");
                    let RoundAction::Completed(o) = &r[0] else { panic!("{:?}", r[0]) };
                    assert_eq!(o.sum, want, "n={n} len={len}");
                    // Certified from the segment hashes checked on the way: the sum's hash.
                    assert_eq!(o.sum_hash, sum_hash(&want, n, cfg().segment_elems), "n={n} len={len}");
                    assert_eq!(o.next, next);
                    assert_eq!(o.samples, (0..n as u64).map(|i| 10 + i).sum::<u64>());
                }
            }
        }
    }

    /// Hierarchical rounds: every member certifies the exact sum, whatever the groups (and a
    /// ring no group size divides runs as the plain ring); a silent member fails the attempt
    /// for all, across groups too.
    #[test]
    fn hierarchical_rounds_certify_the_exact_sum() {
        for (n, g) in [(4, 2), (6, 2), (6, 3), (8, 4), (5, 2)] {
            for len in [0, 1, 7, 40] {
                let results = run_round_cfg(n, len, &[], &[], None, RoundConfig { group_size: g, ..cfg() }).0;
                let want: Vec<i32> = (0..len).map(|j| (0..n).map(|i| member_data(i, len)[j]).sum()).collect();
                for r in &results {
                    let RoundAction::Completed(o) = &r[0] else { panic!("n={n} g={g}: {:?}", r[0]) };
                    assert_eq!(o.sum, want, "n={n} g={g} len={len}");
                    let chunks = if n / g >= 2 { g } else { n };
                    assert_eq!(o.sum_hash, sum_hash(&want, chunks, cfg().segment_elems), "n={n} g={g} len={len}");
                }
            }
        }
        let results = run_round_cfg(6, 40, &[], &[4], None, RoundConfig { group_size: 3, ..cfg() }).0;
        for (pos, r) in results.iter().enumerate().filter(|(p, _)| *p != 4) {
            assert!(matches!(r.last(), Some(RoundAction::Failed(_))), "member {pos}: {r:?}");
        }
    }

    /// Compressed rounds: every member decodes every gathered payload and holds the same sum,
    /// the sum of what each member's payload decodes to.
    #[test]
    fn compressed_rounds_agree_on_the_decoded_sum() {
        for comp in [Compression::Int8 { block: 4 }, Compression::TopK { per_million: 250_000 }] {
            for n in 1..6 {
                for len in [1, 7, 40] {
                    let results = run_round_with(n, len, &[], &[], None, comp);
                    let mut want = vec![0; len];
                    for i in 0..n {
                        let e = crate::compress::encode(comp, &member_data(i, len), None, cfg().max_units, 0.0);
                        crate::compress::add_into(comp, &e.payload, &mut want);
                    }
                    for r in &results {
                        let RoundAction::Completed(o) = &r[0] else { panic!("{comp:?} n={n}: {:?}", r[0]) };
                        assert_eq!(o.sum, want, "{comp:?} n={n} len={len}");
                        assert_eq!(o.sum_hash, sum_hash(&want, n, cfg().segment_elems));
                    }
                }
            }
        }
    }

    /// A member that commits to a payload no honest member makes (a top-k value beyond its
    /// range) fails the round for every other member, naming it.
    #[test]
    fn an_undecodable_payload_names_its_member() {
        let comp = Compression::TopK { per_million: 250_000 };
        let results = run_round_with(4, 40, &[], &[], Some(2), comp);
        let view = RingView::order(RunId::from_name(RUN), 4, 0, (0..4).map(|i| format!("m{i}")));
        for (pos, r) in results.iter().enumerate() {
            let RoundAction::Failed(f) = &r[0] else { panic!("member {pos}: {:?}", r[0]) };
            if f.kind == FailureKind::BadMessage {
                assert_eq!(f.blame, vec![view.members[2].clone()]);
                assert!(f.reason.contains("is beyond"), "{}", f.reason);
            }
        }
        assert!(
            results.iter().flatten().any(|a| matches!(a, RoundAction::Failed(f) if f.kind == FailureKind::BadMessage))
        );
    }

    /// Top-k: a member whose commit names a residual its last round did not leave it (nor the
    /// one it started that round from, nor zeros) fails the attempt, named, at every member that
    /// certified that round; the allowed ones pass.
    #[test]
    fn a_residual_from_nowhere_is_refused() {
        let comp = Compression::TopK { per_million: 250_000 };
        let cfg = RoundConfig { compression: comp, ..cfg() };
        let run = RunId::from_name(RUN);
        let view = RingView::order(run, 4, 0, ["a", "b"].map(String::from));
        let input = |peer: &str, residual: Hash| {
            let e = crate::compress::encode(comp, &member_data(1, 20), None, cfg.max_units, 0.0);
            let history = [("a", [[1; 32], [2; 32]]), ("b", [[3; 32], [4; 32]])]
                .into_iter()
                .filter(|(p, _)| *p != peer)
                .map(|(p, h)| (p.to_owned(), h))
                .collect();
            Contribution::compressed(e.payload, e.norm, 20, 10, [1; 32], Vec::new(), cfg.segment_elems)
                .with_residual(residual, [9; 32])
                .with_residual_history(history, [5; 32])
        };
        for (residual, allowed) in [([3; 32], true), ([4; 32], true), ([5; 32], true), ([6; 32], false)] {
            let (mut a, _) = Round::new(run, "a", view.clone(), input("a", [1; 32]), cfg.clone(), 0, &no_sign);
            let (b, _) = Round::new(run, "b", view.clone(), input("b", residual), cfg.clone(), 0, &no_sign);
            let acts = a.on_commit(b.own_commit().clone(), 0);
            let failed = acts.iter().find_map(|x| match x {
                RoundAction::Failed(f) => Some(f.clone()),
                _ => None,
            });
            match failed {
                None => assert!(allowed, "{residual:?} passed"),
                Some(f) => {
                    assert!(!allowed, "{residual:?}: {f:?}");
                    assert_eq!((f.kind, f.blame), (FailureKind::BadMessage, vec!["b".to_owned()]));
                    assert!(f.reason.contains("did not leave it"), "{}", f.reason);
                }
            }
        }
    }

    #[test]
    fn a_silent_member_fails_the_round_for_everyone_naming_it() {
        let results = run_round(4, 20, &[], &[2]);
        for (pos, r) in results.iter().enumerate() {
            if pos == 2 {
                continue;
            }
            assert_eq!(r.len(), 1);
            let RoundAction::Failed(f) = &r[0] else { panic!("member {pos} did not fail: {:?}", r[0]) };
            assert!(f.reason.contains("commits from") || f.reason.contains("failed the round"), "{f:?}");
            // Whoever timed out names the silent member, and only it.
            if f.reason.contains("commits from") {
                let view = RingView::order(RunId::from_name(RUN), 4, 0, (0..4).map(|i| format!("m{i}")));
                assert_eq!(f.blame, vec![view.members[2].clone()]);
            }
        }
    }

    /// A member that certified and then left (its `Done` is in) fails nobody's attempt; one
    /// that left before its `Done` does.
    #[test]
    fn a_member_gone_after_its_done_fails_nobody() {
        let run = RunId::from_name(RUN);
        let view = RingView::order(run, 4, 0, (0..3).map(|i| format!("m{i}")));
        let mut rounds: Vec<Round> = Vec::new();
        let mut queue: VecDeque<(usize, RoundAction)> = VecDeque::new();
        for (pos, name) in view.members.iter().enumerate() {
            let input = Contribution::new(member_data(pos, 20), 10, [1; 32], Vec::new(), 3, cfg().segment_elems);
            let (r, acts) = Round::new(run, name, view.clone(), input, cfg(), 0, &no_sign);
            queue.extend(acts.into_iter().map(|a| (pos, a)));
            rounds.push(r);
        }
        // Everything flows, except member 1's Done to member 0.
        let mut held = None;
        while let Some((from, a)) = queue.pop_front() {
            let mut out = Vec::new();
            match a {
                RoundAction::Publish(g) => {
                    for to in (0..3).filter(|to| *to != from) {
                        match &g {
                            Gossip::Done(d) if (from, to) == (1, 0) => held = Some(d.clone()),
                            Gossip::Commit(c) => out.push((to, rounds[to].on_commit(c.clone(), 0))),
                            Gossip::Done(d) => out.push((to, rounds[to].on_done(d.clone(), 0))),
                            _ => {}
                        }
                    }
                }
                RoundAction::Send(peer, step) => {
                    let to = view.position(&peer).unwrap();
                    out.push((to, rounds[to].on_step_from(&view.members[from], step.verify().unwrap(), 0)));
                }
                _ => {}
            }
            for (to, acts) in out {
                queue.extend(acts.into_iter().map(|a| (to, a)));
            }
        }
        assert!(!rounds[0].is_over(), "member 0 waits for member 1's Done");
        // Member 2 certified and left: nothing to wait for from it.
        assert!(rounds[0].members_gone(std::slice::from_ref(&view.members[2])).is_empty());
        // Member 1's Done is not in: its leaving fails the attempt, naming it.
        let acts = rounds[0].members_gone(std::slice::from_ref(&view.members[1]));
        let Some(RoundAction::Failed(f)) = acts.iter().find(|a| matches!(a, RoundAction::Failed(_))) else {
            panic!("{acts:?}")
        };
        assert_eq!(f.blame, vec![view.members[1].clone()]);
        assert!(held.is_some());
    }

    #[test]
    fn a_done_with_another_sum_fails_the_round() {
        let results = run_round_with(3, 10, &[], &[], Some(1), Compression::None);
        for (pos, r) in results.iter().enumerate() {
            if pos == 1 {
                continue;
            }
            let RoundAction::Failed(f) = &r[0] else { panic!("member {pos} accepted a diverging Done") };
            assert!(f.reason.contains("diverged"), "{f:?}");
            assert!(f.blame.is_empty(), "a diverging sum proves nothing about who is wrong");
        }
    }

    #[test]
    fn a_commit_for_another_ring_fails_fast() {
        let run = RunId::from_name(RUN);
        let view = RingView::order(run, 0, 0, ["a".to_string(), "b".to_string()]);
        let other = RingView::order(run, 0, 0, ["a".to_string(), "b".to_string(), "c".to_string()]);
        let input = |n| Contribution::new(vec![1; 4], 1, [0; 32], vec![], n, 3);
        let (mut a, _) = Round::new(run, "a", view, input(2), cfg(), 0, &no_sign);
        let (_, acts) = Round::new(run, "b", other, input(3), cfg(), 0, &no_sign);
        let RoundAction::Publish(Gossip::Commit(c)) = &acts[0] else { panic!() };
        let out = a.on_commit(c.clone(), 0);
        assert!(out.iter().any(|x| matches!(x, RoundAction::Failed(f) if f.reason.contains("another ring"))));
    }

    #[test]
    fn a_member_holding_other_parameters_fails_the_round() {
        let run = RunId::from_name(RUN);
        let view = RingView::order(run, 0, 0, ["a".to_string(), "b".to_string()]);
        let input = |p| Contribution::new(vec![1; 4], 1, [p; 32], vec![], 2, 3);
        let (mut a, _) = Round::new(run, "a", view.clone(), input(1), cfg(), 0, &no_sign);
        let (_, acts) = Round::new(run, "b", view, input(2), cfg(), 0, &no_sign);
        let RoundAction::Publish(Gossip::Commit(c)) = &acts[0] else { panic!() };
        let out = a.on_commit(c.clone(), 0);
        assert!(out.iter().any(|x| matches!(x, RoundAction::Failed(f) if f.reason.contains("holds other parameters") && f.kind == FailureKind::ParamsDiffer)));
    }

    #[test]
    fn asynchronous_rounds_take_stale_and_empty_commits_within_the_staleness_and_no_others() {
        let run = RunId::from_name(RUN);
        let view = RingView::order(run, 5, 0, ["a".to_string(), "b".to_string()]);
        let history: BTreeMap<u64, Hash> = (3..=5).map(|r| (r, [r as u8; 32])).collect();
        let batches = vec![32, 32];
        // What b commits: values of `at`'s round, on parameters `params`, of `samples` samples.
        let rings: BTreeMap<u64, AsyncRing> = (3..5).map(|r| (r, (view.members.clone(), vec![32, 32]))).collect();
        let commit_to = |cfg: RoundConfig, data: Vec<i32>, at: u64, params: u8, samples: u64| {
            let input = Contribution::new(data, samples, [params; 32], vec![], 2, 3)
                .with_ring_batches(batches.clone())
                .with_async(at, BTreeMap::new(), BTreeMap::new());
            let (_, acts) = Round::new(run, "b", view.clone(), input, cfg, 0, &no_sign);
            let RoundAction::Publish(Gossip::Commit(c)) = &acts[0] else { panic!() };
            c.clone()
        };
        // A member's empty commits are to zeros.
        let commit = |cfg: RoundConfig, at: u64, params: u8, samples: u64| {
            commit_to(cfg, vec![if samples == 0 { 0 } else { 1 }; 4], at, params, samples)
        };
        // a's verdict on it, knowing the rings in `rings`.
        let judge_with = |cfg: RoundConfig, c: GradientCommit, rings: BTreeMap<u64, AsyncRing>| {
            let own = Contribution::new(vec![1; 4], 32, [5; 32], vec![], 2, 3)
                .with_ring_batches(batches.clone())
                .with_async(5, history.clone(), rings);
            let (mut a, _) = Round::new(run, "a", view.clone(), own, cfg, 0, &no_sign);
            a.on_commit(c, 0).into_iter().find_map(|x| match x {
                RoundAction::Failed(f) => Some(f),
                _ => None,
            })
        };
        let judge = |cfg: RoundConfig, c: GradientCommit| judge_with(cfg, c, rings.clone());
        let asynchronous = || RoundConfig { max_staleness: 2, ..cfg() };
        // Fresh, stale by one or two rounds on that round's parameters, or empty: accepted.
        for (at, params, samples) in [(5, 5, 32), (4, 4, 32), (3, 3, 32), (5, 9, 0)] {
            let f = judge(asynchronous(), commit(asynchronous(), at, params, samples));
            assert!(f.is_none(), "computed at {at} on {params}, {samples} samples: {f:?}");
        }
        // Stale on parameters other than its round's: one side is out of sync.
        let f = judge(asynchronous(), commit(asynchronous(), 4, 5, 32)).expect("refused");
        assert_eq!(f.kind, FailureKind::ParamsDiffer, "{f:?}");
        // Older than the run allows, or of a later round: the member is blamed.
        let f = judge(asynchronous(), commit(asynchronous(), 2, 2, 32)).expect("refused");
        assert!(f.reason.contains("beyond the run's staleness") && f.blame == vec!["b".to_string()], "{f:?}");
        let f = judge(asynchronous(), commit(asynchronous(), 6, 5, 32)).expect("refused");
        assert_eq!(f.kind, FailureKind::BadMessage, "{f:?}");
        // A fresh commit of other samples than announced stays refused; a stale one must have
        // the samples its round's ring gave it.
        let f = judge(asynchronous(), commit(asynchronous(), 5, 5, 8)).expect("refused");
        assert!(f.reason.contains("committed 8 samples"), "{f:?}");
        let f = judge(asynchronous(), commit(asynchronous(), 4, 4, 8)).expect("refused");
        assert!(f.reason.contains("whose ring gave it 32") && f.kind == FailureKind::BadMessage, "{f:?}");
        // An empty commit to anything but zeros, or of an earlier round: the member lied.
        let f = judge(asynchronous(), commit_to(asynchronous(), vec![0, 0, 1, 0], 5, 5, 0)).expect("refused");
        assert!(f.reason.contains("not to zeros") && f.blame == vec!["b".to_string()], "{f:?}");
        assert!(judge(asynchronous(), commit_to(asynchronous(), vec![0; 4], 4, 4, 0)).is_some());
        // A stale commit of a round whose ring this member does not hold, or whose ring lacked a
        // member of this one: not taken (nobody here could audit it), the sender blamed once.
        let f = judge_with(asynchronous(), commit(asynchronous(), 4, 4, 32), BTreeMap::new()).expect("refused");
        assert!(f.reason.contains("does not hold") && f.kind == FailureKind::Other, "{f:?}");
        let without_a: BTreeMap<u64, AsyncRing> = [(4, (vec!["b".to_string()], vec![32]))].into();
        let f = judge_with(asynchronous(), commit(asynchronous(), 4, 4, 32), without_a).expect("refused");
        assert!(f.reason.contains("was not in"), "{f:?}");
        // An empty commit claiming a vector of any length is refused without allocating one.
        let mut huge = commit(asynchronous(), 5, 9, 0);
        huge.len = u64::MAX;
        assert!(judge(asynchronous(), huge).is_some());
        // A synchronous run takes neither stale nor empty commits.
        assert!(judge(cfg(), commit(cfg(), 4, 4, 32)).is_some());
        assert!(judge(cfg(), commit(cfg(), 5, 5, 0)).is_some());
    }

    /// Asynchronous hierarchical rounds: a member's empty commit is to zeros chunked as its
    /// group ring chunks (G chunks, not one per member), and is taken; one to anything else is not.
    #[test]
    fn an_empty_commit_in_a_hierarchy_is_to_zeros_in_group_chunks() {
        let run = RunId::from_name(RUN);
        let view = RingView::order(run, 5, 0, (0..4).map(|i| format!("m{i}")).collect::<Vec<_>>());
        let hier = RoundConfig { max_staleness: 2, group_size: 2, ..cfg() };
        let input = |data: Vec<i32>, samples: u64| {
            Contribution::new(data, samples, [5; 32], vec![], hier.chunks(4), 3)
                .with_ring_batches(vec![4; 4])
                .with_async(5, BTreeMap::new(), BTreeMap::new())
        };
        for (data, taken) in [(vec![0; 8], true), (vec![0, 0, 0, 1, 0, 0, 0, 0], false)] {
            let (_, acts) = Round::new(run, &view.members[1], view.clone(), input(data, 0), hier.clone(), 0, &no_sign);
            let RoundAction::Publish(Gossip::Commit(empty)) = &acts[0] else { panic!("{acts:?}") };
            assert_eq!(empty.chunk_hashes.len(), 2, "one chunk per member of a group");
            let (mut a, _) =
                Round::new(run, &view.members[0], view.clone(), input(vec![1; 8], 4), hier.clone(), 0, &no_sign);
            let failed = a.on_commit(empty.clone(), 0).into_iter().any(|x| matches!(x, RoundAction::Failed(_)));
            assert_eq!(failed, !taken, "an empty commit to zeros is taken, to anything else refused");
        }
    }

    /// Asynchronous compressed rounds: a member's empty commit is to the payload of zeros
    /// (`compress::zeros`, its residual kept: the one it names is the one it leaves) and is
    /// taken; a payload of anything else, or a residual it says changed, is refused, the member
    /// blamed.
    #[test]
    fn an_empty_compressed_commit_is_to_the_payload_of_zeros_and_keeps_its_residual() {
        let run = RunId::from_name(RUN);
        let view = RingView::order(run, 5, 0, ["a".to_string(), "b".to_string()]);
        let (len, max_units) = (40, cfg().max_units);
        for comp in [Compression::Int8 { block: 8 }, Compression::TopK { per_million: 100_000 }] {
            let asy = RoundConfig { max_staleness: 2, compression: comp, ..cfg() };
            let input = |payload: Vec<i32>, norm: f64, samples: u64, residual: [Hash; 2]| {
                Contribution::compressed(payload, norm, len, samples, [5; 32], vec![], asy.segment_elems)
                    .with_residual(residual[0], residual[1])
                    .with_ring_batches(vec![4, 4])
                    .with_async(5, BTreeMap::new(), BTreeMap::new())
            };
            let some = crate::compress::encode(comp, &member_data(1, len), None, max_units, 0.0);
            let zeros = crate::compress::zeros(comp, len);
            assert_eq!(crate::compress::check(comp, &zeros, len, max_units), Ok(0.0), "{comp:?}: a valid payload");
            let kept = [[7; 32], [7; 32]];
            for (payload, norm, residual, taken) in [
                (zeros.clone(), 0.0, kept, true),
                (some.payload.clone(), 0.0, kept, false),
                (zeros.clone(), 0.0, [[7; 32], [8; 32]], false),
            ] {
                let (_, acts) =
                    Round::new(run, "b", view.clone(), input(payload, norm, 0, residual), asy.clone(), 0, &no_sign);
                let RoundAction::Publish(Gossip::Commit(empty)) = &acts[0] else { panic!("{acts:?}") };
                let own = input(some.payload.clone(), some.norm, 4, kept);
                let (mut a, _) = Round::new(run, "a", view.clone(), own, asy.clone(), 0, &no_sign);
                let failed = a.on_commit(empty.clone(), 0).into_iter().find_map(|x| match x {
                    RoundAction::Failed(f) => Some(f),
                    _ => None,
                });
                assert_eq!(failed.is_none(), taken, "{comp:?}: {failed:?}");
                if let Some(f) = failed {
                    assert_eq!(f.blame, vec!["b".to_string()], "{f:?}");
                }
            }
        }
    }

    /// Ring segments that arrive before this member holds every commit wait, but no more than
    /// the left neighbour can honestly be ahead: a segment beyond the run's segment size fails
    /// the attempt naming its sender, and more bytes than the vector twice fail it too.
    #[test]
    fn segments_before_the_commits_are_bounded_by_size_and_bytes() {
        let run = RunId::from_name(RUN);
        let view = RingView::order(run, 0, 0, ["a".to_string(), "b".to_string(), "c".to_string()]);
        // Segments of 3 values (12 bytes); vectors of 12 values: at most 96 bytes wait.
        let start = || {
            let input = Contribution::new(member_data(0, 12), 4, [0; 32], vec![], 3, 3);
            Round::new(run, &view.members[1], view.clone(), input, cfg(), 0, &no_sign).0
        };
        let left = view.members[0].clone();
        let segment = |segment: u32, values: usize| {
            let id = StepId { level: 0, phase: Phase::ReduceScatter, step: 0, chunk: 0, segment };
            RingStep::new(run, 0, 0, id, vec![0; 4 * values]).verify().unwrap()
        };
        let failed = |acts: Vec<RoundAction>| {
            acts.into_iter().find_map(|a| match a {
                RoundAction::Failed(f) => Some(f),
                _ => None,
            })
        };
        let mut r = start();
        let f = failed(r.on_step_from(&left, segment(0, 4), 0)).expect("a segment of 4 values is refused");
        assert!(f.reason.contains("beyond the run's segments of 3") && f.blame == vec![left.clone()], "{f:?}");
        let mut r = start();
        for i in 0..8 {
            assert!(failed(r.on_step_from(&left, segment(i, 3), 0)).is_none(), "segment {i} of 96 bytes waits");
        }
        let f = failed(r.on_step_from(&left, segment(8, 3), 0)).expect("beyond the vector twice");
        assert!(f.reason.contains("too many ring steps before the commits"), "{f:?}");
    }

    #[test]
    fn members_disagreeing_on_batches_or_committing_other_counts_fail_the_round() {
        let run = RunId::from_name(RUN);
        let view = RingView::order(run, 0, 0, ["a".to_string(), "b".to_string()]);
        let input = |samples, batches: Vec<u64>| {
            Contribution::new(vec![1; 4], samples, [0; 32], vec![], 2, 3).with_ring_batches(batches)
        };
        let pos_b = view.position("b").unwrap();
        let mut batches = vec![16, 16];
        batches[pos_b] = 32;
        // b commits the 32 samples both expect: accepted (the round waits for more).
        let (mut a, _) = Round::new(run, "a", view.clone(), input(16, batches.clone()), cfg(), 0, &no_sign);
        let (_, acts) = Round::new(run, "b", view.clone(), input(32, batches.clone()), cfg(), 0, &no_sign);
        let RoundAction::Publish(Gossip::Commit(c)) = &acts[0] else { panic!() };
        assert!(!a.on_commit(c.clone(), 0).iter().any(|x| matches!(x, RoundAction::Failed(_))));
        // b commits 8 samples while announcing 32: refused.
        let (mut a, _) = Round::new(run, "a", view.clone(), input(16, batches.clone()), cfg(), 0, &no_sign);
        let (_, acts) = Round::new(run, "b", view.clone(), input(8, batches.clone()), cfg(), 0, &no_sign);
        let RoundAction::Publish(Gossip::Commit(c)) = &acts[0] else { panic!() };
        let out = a.on_commit(c.clone(), 0);
        assert!(
            out.iter().any(|x| matches!(x, RoundAction::Failed(f) if f.reason.contains("committed 8 samples"))),
            "{out:?}"
        );
        // a and b see different batch sizes: different rings.
        let (mut a, _) = Round::new(run, "a", view.clone(), input(16, vec![16, 16]), cfg(), 0, &no_sign);
        let (_, acts) = Round::new(run, "b", view, input(32, batches), cfg(), 0, &no_sign);
        let RoundAction::Publish(Gossip::Commit(c)) = &acts[0] else { panic!() };
        let out = a.on_commit(c.clone(), 0);
        assert!(
            out.iter().any(|x| matches!(x, RoundAction::Failed(f) if f.reason.contains("another ring"))),
            "{out:?}"
        );
    }

    /// Delivers gossip and ring steps between two members until nothing moves; returns the
    /// actions that stayed with each (audits, outcomes).
    fn exchange(rounds: &mut [Round; 2], mut queue: VecDeque<(usize, RoundAction)>) -> Vec<Vec<RoundAction>> {
        let mut kept = vec![Vec::new(), Vec::new()];
        while let Some((from, a)) = queue.pop_front() {
            let to = 1 - from;
            let acts = match &a {
                RoundAction::Publish(Gossip::Commit(c)) => rounds[to].on_commit(c.clone(), 0),
                RoundAction::Publish(Gossip::Done(d)) => rounds[to].on_done(d.clone(), 0),
                RoundAction::Publish(Gossip::SumCheck(c)) => rounds[to].on_sum_check((**c).clone(), 0),
                RoundAction::Publish(Gossip::Checked(c)) => rounds[to].on_checked(c, 0),
                RoundAction::Publish(_) => Vec::new(),
                RoundAction::Send(_, step) => {
                    let noted = rounds[from].note_sent(step, 0);
                    queue.extend(noted.into_iter().map(|x| (from, x)));
                    rounds[to].on_step(RingStep::clone(step).verify().unwrap(), 0)
                }
                _ => {
                    kept[from].push(a);
                    continue;
                }
            };
            queue.extend(acts.into_iter().map(|x| (to, x)));
        }
        kept
    }

    #[test]
    fn an_audited_member_certifies_only_after_its_audit_and_a_failed_audit_names_the_target() {
        let run = RunId::from_name(RUN);
        let view = RingView::order(run, 2, 0, ["a".to_string(), "b".to_string()]);
        let audited = RoundConfig { audit_every: 1, ..cfg() };
        let start = |fail: bool| {
            let mut rounds = Vec::new();
            let mut queue = VecDeque::new();
            for (pos, name) in view.members.iter().enumerate() {
                let input =
                    Contribution::new(member_data(pos, 10), 5, [3; 32], vec![], 2, 3).with_ring_batches(vec![5, 5]);
                let (r, acts) = Round::new(run, name, view.clone(), input, audited.clone(), 0, &no_sign);
                rounds.push(r);
                queue.extend(acts.into_iter().map(|a| (pos, a)));
            }
            let mut rounds: [Round; 2] = rounds.try_into().unwrap();
            let kept = exchange(&mut rounds, queue);
            // Each member was asked to audit the other, and nobody certified yet.
            for (pos, k) in kept.iter().enumerate() {
                assert_eq!(k.len(), 1, "{k:?}");
                let RoundAction::Audit(job) = &k[0] else { panic!("{k:?}") };
                assert_eq!(job.target, 1 - pos);
                assert_eq!(job.commit.peer, view.members[1 - pos]);
                assert_eq!(job.batches, vec![5, 5]);
            }
            if fail {
                let acts = rounds[1].audit_failed(0, "chunk 0 differs");
                let failed = acts.iter().find_map(|a| match a {
                    RoundAction::Failed(f) => Some(f.clone()),
                    _ => None,
                });
                let f = failed.expect("the attempt fails");
                assert_eq!((f.kind, f.blame), (FailureKind::Fault, vec![view.members[0].clone()]));
                return;
            }
            let mut queue = VecDeque::new();
            for (pos, r) in rounds.iter_mut().enumerate() {
                queue.extend(r.audit_passed(0, 1 - pos, Some(member_data(1 - pos, 10))).into_iter().map(|a| (pos, a)));
            }
            let kept = exchange(&mut rounds, queue);
            for k in kept {
                assert!(matches!(k.as_slice(), [RoundAction::Completed(_)]), "{k:?}");
            }
        };
        start(false);
        start(true);
    }

    /// Hands gossip `g` published by the member at `from` to every other member (at time 0);
    /// returns what each did with it.
    fn gossip_to_all(rounds: &mut [Round], from: usize, g: &Gossip) -> Vec<(usize, Vec<RoundAction>)> {
        let mut out = Vec::new();
        for (to, r) in rounds.iter_mut().enumerate().filter(|(t, _)| *t != from) {
            let acts = match g {
                Gossip::Commit(c) => r.on_commit(c.clone(), 0),
                Gossip::Done(d) => r.on_done(d.clone(), 0),
                Gossip::Failed(f) => r.on_failed(f),
                Gossip::SumCheck(c) => r.on_sum_check((**c).clone(), 0),
                Gossip::Checked(c) => r.on_checked(c, 0),
                _ => Vec::new(),
            };
            out.push((to, acts));
        }
        out
    }

    /// Delivers a ring segment the member at `from` sends to `peer` (noting it as sent first);
    /// returns what the sender and the receiver did.
    fn send_step(
        rounds: &mut [Round],
        view: &RingView,
        from: usize,
        peer: &str,
        step: RingStep,
    ) -> Vec<(usize, Vec<RoundAction>)> {
        let noted = rounds[from].note_sent(&step, 0);
        let to = view.position(peer).unwrap();
        let got = rounds[to].on_step_from(&view.members[from], step.verify().unwrap(), 0);
        vec![(from, noted), (to, got)]
    }

    /// What each member ended with, the proofs gossiped (by whom), and the ring; then the
    /// contradictions found (by whom).
    type AuditedRound =
        (Vec<Option<RoundAction>>, Vec<(usize, Box<SumFault>)>, RingView, Vec<(usize, Box<Contradiction>)>);

    /// Runs one audited attempt of `n` members over `len` values with a perfect network, in
    /// groups of `group_size` (0: the plain ring); each audit passes with the target's true
    /// values. `tamper` may change a segment its sender sends (before it is noted as sent, so
    /// the sender's claims describe what it sent), `lie` a member's sum check. Returns what each
    /// member ended with, and any proof gossiped.
    fn audited_round(
        n: usize,
        len: usize,
        group_size: usize,
        tamper: impl Fn(usize, &mut RingStep),
        lie: impl Fn(usize, &mut SumCheck),
    ) -> AuditedRound {
        let run = RunId::from_name(RUN);
        let names: Vec<String> = (0..n).map(|i| format!("m{i}")).collect();
        let view = RingView::order(run, 7, 0, names);
        let audited = RoundConfig { audit_every: 1, group_size, ..cfg() };
        let chunks = audited.chunks(n);
        let data = |pos: usize| member_data(pos, len);
        let mut rounds = Vec::new();
        let mut queue: VecDeque<(usize, RoundAction)> = VecDeque::new();
        for (pos, name) in view.members.iter().enumerate() {
            let input = Contribution::new(data(pos), 4, [5; 32], vec![], chunks, cfg().segment_elems)
                .with_ring_batches(vec![4; n]);
            let (r, acts) = Round::new(run, name, view.clone(), input, audited.clone(), 0, &no_sign);
            rounds.push(r);
            queue.extend(acts.into_iter().map(|a| (pos, a)));
        }
        let mut ended: Vec<Option<RoundAction>> = vec![None; n];
        let mut proofs = Vec::new();
        let mut contradictions = Vec::new();
        while let Some((from, a)) = queue.pop_front() {
            let mut out: Vec<(usize, Vec<RoundAction>)> = Vec::new();
            match a {
                RoundAction::Publish(mut g) => {
                    if let Gossip::SumCheck(c) = &mut g {
                        lie(from, c);
                    }
                    out.extend(gossip_to_all(&mut rounds, from, &g));
                }
                RoundAction::Send(peer, mut step) => {
                    tamper(from, &mut step);
                    out.extend(send_step(&mut rounds, &view, from, &peer, step));
                }
                RoundAction::Audit(job) => {
                    out.push((from, rounds[from].audit_passed(0, job.target, Some(data(job.target)))))
                }
                RoundAction::SumFault(f) => proofs.push((from, f)),
                a @ (RoundAction::Completed(_) | RoundAction::Failed(_)) => ended[from] = Some(a),
                RoundAction::Contradiction(c) => contradictions.push((from, c)),
                RoundAction::BadCommit(_) => {}
            }
            for (to, acts) in out {
                queue.extend(acts.into_iter().map(|a| (to, a)));
            }
        }
        (ended, proofs, view, contradictions)
    }

    /// Asynchronous attempts: a member behind the ring (its commit empty) audits nobody, and
    /// its target is audited by a stand-in, the first member after it that is not behind; every
    /// commit is recomputed by exactly one auditor, and every member certifies the exact sum
    /// once all audits passed.
    #[test]
    fn a_member_behinds_audit_target_is_audited_by_a_stand_in() {
        let cases =
            [(3, vec![1]), (4, vec![2]), (5, vec![0, 1]), (6, vec![1, 4]), (4, vec![]), (2, vec![1]), (3, vec![0, 2])];
        for (n, behind) in cases {
            let run = RunId::from_name(RUN);
            let view = RingView::order(run, 7, 0, (0..n).map(|i| format!("m{i}")).collect::<Vec<_>>());
            let asy = RoundConfig { audit_every: 1, max_staleness: 2, ..cfg() };
            let len = 12;
            let data = |pos: usize| if behind.contains(&pos) { vec![0; len] } else { member_data(pos, len) };
            let mut rounds = Vec::new();
            let mut queue: VecDeque<(usize, RoundAction)> = VecDeque::new();
            for (pos, name) in view.members.iter().enumerate() {
                let samples = if behind.contains(&pos) { 0 } else { 4 };
                let input = Contribution::new(data(pos), samples, [5; 32], vec![], asy.chunks(n), cfg().segment_elems)
                    .with_ring_batches(vec![4; n])
                    .with_async(7, BTreeMap::new(), BTreeMap::new());
                let (r, acts) = Round::new(run, name, view.clone(), input, asy.clone(), 0, &no_sign);
                rounds.push(r);
                queue.extend(acts.into_iter().map(|a| (pos, a)));
            }
            let mut audits: Vec<Vec<usize>> = vec![Vec::new(); n];
            let mut ended: Vec<Option<RoundAction>> = vec![None; n];
            while let Some((from, a)) = queue.pop_front() {
                let mut out: Vec<(usize, Vec<RoundAction>)> = Vec::new();
                match a {
                    RoundAction::Publish(g) => {
                        out.extend(gossip_to_all(&mut rounds, from, &g));
                    }
                    RoundAction::Send(peer, step) => out.extend(send_step(&mut rounds, &view, from, &peer, step)),
                    RoundAction::Audit(job) => {
                        audits[from].push(job.target);
                        out.push((from, rounds[from].audit_passed(0, job.target, Some(data(job.target)))));
                    }
                    a @ (RoundAction::Completed(_) | RoundAction::Failed(_)) => ended[from] = Some(a),
                    _ => {}
                }
                for (to, acts) in out {
                    queue.extend(acts.into_iter().map(|a| (to, a)));
                }
            }
            // A member behind audits nobody, unless its target is the only member not behind.
            let ahead: Vec<usize> = (0..n).filter(|m| !behind.contains(m)).collect();
            for b in &behind {
                let alone = |t: &usize| ahead == vec![*t];
                assert!(
                    audits[*b].is_empty() || (audits[*b].len() == 1 && alone(&audits[*b][0])),
                    "n={n}: member {b} is behind and audits {:?}",
                    audits[*b]
                );
            }
            let mut audited: Vec<usize> = audits.iter().flatten().copied().collect();
            audited.sort();
            assert_eq!(audited, (0..n).collect::<Vec<_>>(), "n={n} behind={behind:?}: every commit audited once");
            let want: Vec<i32> = (0..len).map(|j| (0..n).map(|i| data(i)[j]).sum()).collect();
            for (pos, e) in ended.iter().enumerate() {
                let Some(RoundAction::Completed(o)) = e else { panic!("n={n} member {pos}: {e:?}") };
                assert_eq!(o.sum, want);
                let also: Vec<usize> = o.audited_also.iter().map(|m| view.position(m).unwrap()).collect();
                assert_eq!(also, audits[pos].iter().skip(1).copied().collect::<Vec<_>>(), "n={n} member {pos}");
            }
        }
    }

    /// A member's sum check goes out with its Done: with every Done held back, each member of
    /// an audited attempt has still published its check (and the checks pass once the Dones
    /// arrive: one gossip exchange after the certificate, the verdicts).
    #[test]
    fn the_sum_check_goes_out_with_the_done() {
        for (n, g) in [(3, 0), (4, 2)] {
            let run = RunId::from_name(RUN);
            let view = RingView::order(run, 7, 0, (0..n).map(|i| format!("m{i}")).collect::<Vec<_>>());
            let audited = RoundConfig { audit_every: 1, group_size: g, ..cfg() };
            let mut rounds = Vec::new();
            let mut queue: VecDeque<(usize, RoundAction)> = VecDeque::new();
            for (pos, name) in view.members.iter().enumerate() {
                let input = Contribution::new(member_data(pos, 12), 4, [5; 32], vec![], audited.chunks(n), 3)
                    .with_ring_batches(vec![4; n]);
                let (r, acts) = Round::new(run, name, view.clone(), input, audited.clone(), 0, &no_sign);
                rounds.push(r);
                queue.extend(acts.into_iter().map(|a| (pos, a)));
            }
            let (mut held_dones, mut checks) = (Vec::new(), vec![0; n]);
            while let Some((from, a)) = queue.pop_front() {
                let mut out: Vec<(usize, Vec<RoundAction>)> = Vec::new();
                match a {
                    RoundAction::Publish(Gossip::Done(d)) => held_dones.push(d),
                    RoundAction::Publish(g) => {
                        checks[from] += usize::from(matches!(g, Gossip::SumCheck(_)));
                        out.extend(gossip_to_all(&mut rounds, from, &g));
                    }
                    RoundAction::Send(peer, step) => out.extend(send_step(&mut rounds, &view, from, &peer, step)),
                    RoundAction::Audit(job) => {
                        out.push((from, rounds[from].audit_passed(0, job.target, Some(member_data(job.target, 12)))))
                    }
                    other => panic!("n {n} g {g}: member {from} ended before any Done arrived: {other:?}"),
                }
                for (to, acts) in out {
                    queue.extend(acts.into_iter().map(|a| (to, a)));
                }
            }
            assert_eq!(checks, vec![1; n], "n {n} g {g}: every member published its check before any Done arrived");
            for d in held_dones {
                for to in (0..n).filter(|t| view.members[*t] != d.peer) {
                    queue.extend(rounds[to].on_done(d.clone(), 0).into_iter().map(|a| (to, a)));
                }
            }
            let mut completed = 0;
            while let Some((from, a)) = queue.pop_front() {
                match a {
                    RoundAction::Publish(Gossip::Checked(c)) => {
                        for to in (0..n).filter(|t| *t != from) {
                            queue.extend(rounds[to].on_checked(&c, 0).into_iter().map(|a| (to, a)));
                        }
                    }
                    RoundAction::Completed(_) => completed += 1,
                    other => panic!("n {n} g {g}: only the verdicts are left to exchange, not {other:?}"),
                }
            }
            assert_eq!(completed, n, "n {n} g {g}: every member completed");
        }
    }

    #[test]
    fn honest_members_pass_every_sum_check_and_certify_the_exact_sum() {
        let rings = (2..6).map(|n| (n, 0));
        // Hierarchies: groups of 2 and 3, with and without extras (two in one group at 11 / 4).
        let hierarchies = [(4, 2), (5, 2), (6, 3), (7, 3), (11, 4)];
        for (n, g) in rings.chain(hierarchies) {
            for len in [1, 5, 17] {
                let (ended, proofs, _, _) = audited_round(n, len, g, |_, _| {}, |_, _| {});
                assert!(proofs.is_empty(), "n {n} g {g} len {len}: an honest member was accused: {proofs:?}");
                let want: Vec<i32> = (0..len).map(|j| (0..n).map(|i| member_data(i, len)[j]).sum()).collect();
                for e in ended {
                    let Some(RoundAction::Completed(o)) = e else { panic!("n {n} len {len}: {e:?}") };
                    assert_eq!(o.sum, want);
                }
            }
        }
    }

    /// Exactly one proof was gossiped, naming `liar`, by another member (its auditor), which
    /// failed the attempt for that fault; no member certified the wrong sum.
    fn proven_by_its_auditor(
        ended: &[Option<RoundAction>],
        proofs: &[(usize, Box<SumFault>)],
        view: &RingView,
        liar: usize,
    ) {
        assert_eq!(proofs.len(), 1, "liar {liar}: {proofs:?}");
        let (auditor, proof) = &proofs[0];
        assert_eq!((proof.accused, &proof.check.peer), (liar, &view.members[liar]));
        assert_ne!(*auditor, liar);
        for (pos, e) in ended.iter().enumerate() {
            let Some(RoundAction::Failed(f)) = e else { panic!("member {pos} certified a wrong sum: {e:?}") };
            if pos == *auditor {
                assert_eq!((f.kind, f.blame.clone()), (FailureKind::Fault, vec![view.members[liar].clone()]));
            }
        }
    }

    #[test]
    fn a_member_whose_partial_sum_drops_or_changes_values_is_proven_by_its_auditor() {
        let n = 4;
        for liar in 0..n {
            for change in [i32::MIN, 1] {
                // i32::MIN stands for "drop what came in": the liar sends only its own values.
                let (ended, proofs, view, _) = audited_round(
                    n,
                    20,
                    0,
                    |from, step| {
                        if from == liar && step.id.phase == Phase::ReduceScatter && step.id.step == 1 {
                            let mut v: Vec<i32> = step
                                .payload
                                .chunks_exact(4)
                                .map(|b| i32::from_le_bytes(b.try_into().unwrap()))
                                .collect();
                            if change == i32::MIN {
                                let chunk = crate::chunk::chunk_range(20, n, step.id.chunk as usize);
                                let seg =
                                    crate::chunk::segment_range(&chunk, cfg().segment_elems, step.id.segment as usize);
                                v = member_data(liar, 20)[seg].to_vec();
                            } else {
                                v[0] += change;
                            }
                            *step =
                                RingStep::new(step.run, step.round, step.attempt, step.id, crate::hash::le_bytes(&v));
                        }
                    },
                    |_, _| {},
                );
                proven_by_its_auditor(&ended, &proofs, &view, liar);
            }
        }
    }

    /// `liar` misstates the checksum of the first segment of the ring of `level` it claims to
    /// have sent (or received).
    fn misclaim(liar: usize, sent: bool, level: u8) -> impl Fn(usize, &mut SumCheck) {
        move |from, c| {
            if from == liar {
                let claims = if sent { &mut c.sent } else { &mut c.received };
                let claim = claims.iter_mut().find(|c| c.id.level == level).unwrap();
                claim.eval[1] = (claim.eval[1] + 1) % sumcheck::P;
            }
        }
    }

    #[test]
    fn a_member_lying_about_a_segment_it_sent_or_received_is_named_by_the_neighbour_holding_it() {
        let n = 3;
        for (sent, liar) in [(true, 0), (false, 0), (true, 2), (false, 1)] {
            let (ended, proofs, view, _) = audited_round(n, 12, 0, |_, _| {}, misclaim(liar, sent, 0));
            // The lie also breaks what its claims say about its own values, which its auditor may
            // prove; whoever is named, it is the liar.
            assert!(proofs.iter().all(|(_, p)| p.accused == liar), "{proofs:?}");
            let holder = if sent { (liar + 1) % n } else { (liar + n - 1) % n };
            let Some(RoundAction::Failed(f)) = &ended[holder] else { panic!("{:?}", ended[holder]) };
            assert_eq!(f.blame, vec![view.members[liar].clone()], "{f:?}");
            assert!(f.reason.contains("does not match"), "{f:?}");
            assert!(ended.iter().all(|e| matches!(e, Some(RoundAction::Failed(_)))), "nobody certifies: {ended:?}");
        }
    }

    /// Adds one to the first value of every segment `liar` sends that `at` selects.
    fn add_one(liar: usize, at: impl Fn(&StepId) -> bool) -> impl Fn(usize, &mut RingStep) {
        move |from, step| {
            if from == liar && at(&step.id) {
                let mut v: Vec<i32> =
                    step.payload.chunks_exact(4).map(|b| i32::from_le_bytes(b.try_into().unwrap())).collect();
                v[0] += 1;
                *step = RingStep::new(step.run, step.round, step.attempt, step.id, crate::hash::le_bytes(&v));
            }
        }
    }

    /// In a hierarchy a member that changes a partial sum is proven by its auditor, whichever
    /// ring it lies in: its group ring, or the ring across groups, where what it puts in (its
    /// group's sum of the chunk it holds, with its extras' chunks) is checked whole.
    #[test]
    fn a_member_whose_partial_sum_lies_in_a_hierarchy_is_proven_by_its_auditor() {
        // (n, g, the ring and the reduce-scatter step it lies in): the first step across groups
        // (its group's sum going out), a later one, and a later step in its group ring.
        for (n, g, level, step) in [(4, 2, 1, 0), (5, 2, 1, 0), (6, 2, 1, 1), (7, 3, 0, 1), (7, 3, 1, 0)] {
            let at = move |id: &StepId| id.level == level && id.phase == Phase::ReduceScatter && id.step == step;
            let layout = crate::hier::Layout::of(n, g).unwrap();
            let core = (0..n).filter(|p| matches!(layout.place(*p), crate::hier::Place::Core { .. }));
            for liar in core {
                let (ended, proofs, view, _) = audited_round(n, 20, g, add_one(liar, at), |_, _| {});
                proven_by_its_auditor(&ended, &proofs, &view, liar);
            }
        }
    }

    /// In a hierarchy a member whose own values contradict its commit, in its group ring or as
    /// an attached member sending a chunk to its holder, is refused by the member receiving
    /// them, whose proof (its signed segments) anyone can check against the run's groups.
    #[test]
    fn own_values_against_the_commit_in_a_hierarchy_are_proven_by_their_receiver() {
        // 5 in groups of 2: groups [0 1] [2 3], extra 4 attached to group 0.
        let (n, g) = (5, 2);
        let layout = crate::hier::Layout::of(n, g).unwrap();
        for (liar, level) in [(0, 0), (3, 0), (4, 2)] {
            let at = move |id: &StepId| id.level == level && id.phase == Phase::ReduceScatter && id.step == 0;
            let (ended, proofs, view, contradictions) = audited_round(n, 20, g, add_one(liar, at), |_, _| {});
            assert!(proofs.is_empty(), "{proofs:?}");
            // An attached member altered what it sent both holders: each proves it.
            let receivers = if level == 2 { g } else { 1 };
            assert_eq!(contradictions.len(), receivers, "liar {liar}: {contradictions:?}");
            for (by, c) in &contradictions {
                assert!(layout.destinations(liar).contains(by), "{by} received the liar's values");
                assert_eq!(c.accused, liar);
                let seg = cfg().segment_elems;
                assert_eq!(crate::audit::contradicts(&c.commit, Some(layout), n, liar, seg, &c.steps), Ok(()));
                if c.steps.len() > 1 {
                    let cut = &c.steps[..c.steps.len() - 1];
                    assert!(crate::audit::contradicts(&c.commit, Some(layout), n, liar, seg, cut).is_err());
                }
                // Checked against another place, the same segments prove nothing.
                assert!(crate::audit::contradicts(&c.commit, Some(layout), n, (liar + 1) % n, seg, &c.steps).is_err());
                let Some(RoundAction::Failed(f)) = &ended[*by] else { panic!("{:?}", ended[*by]) };
                assert_eq!(f.blame, vec![view.members[liar].clone()]);
            }
        }
    }

    /// In a hierarchy a claim about a segment is checked by whoever holds it: the member across
    /// groups, or the extra whose chunk a holder claims to have received.
    #[test]
    fn a_hierarchy_member_lying_about_a_segment_is_named_by_the_member_holding_it() {
        // 5 in groups of 2: groups [0 1] [2 3], extra 4 attached to group 0.
        let (n, g) = (5, 2);
        let layout = crate::hier::Layout::of(n, g).unwrap();
        for (liar, level, sent) in [(1, 1, true), (2, 1, false), (0, 2, false), (4, 2, true)] {
            let (ended, proofs, view, _) = audited_round(n, 12, g, |_, _| {}, misclaim(liar, sent, level));
            assert!(proofs.iter().all(|(_, p)| p.accused == liar), "{proofs:?}");
            let holders: Vec<usize> = (0..n)
                .filter(|h| {
                    let c = ended[*h].as_ref();
                    // Its own finding, not another member's failure passed on.
                    matches!(c, Some(RoundAction::Failed(f))
                        if f.reason.contains("does not match") && !f.reason.contains("failed the round"))
                })
                .collect();
            assert!(!holders.is_empty(), "liar {liar}: nobody holding the segment named it: {ended:?}");
            for h in holders {
                let (from, to) = if sent { (liar, h) } else { (h, liar) };
                assert!(layout.destinations(from).contains(&to), "{h} holds what {liar} claims");
                let Some(RoundAction::Failed(f)) = &ended[h] else { unreachable!() };
                assert_eq!(f.blame, vec![view.members[liar].clone()], "{f:?}");
            }
            assert!(ended.iter().all(|e| matches!(e, Some(RoundAction::Failed(_)))), "nobody certifies: {ended:?}");
        }
    }

    #[test]
    fn a_commit_above_the_norm_clipping_proves_its_member_lied_and_one_understating_its_norm_is_refused() {
        let run = RunId::from_name(RUN);
        let view = RingView::order(run, 0, 0, ["a".to_string(), "b".to_string()]);
        let bounded = RoundConfig { max_norm_units: 1000.0, ..cfg() };
        let input = |v: i32| Contribution::new(vec![v; 4], 1, [0; 32], vec![], 2, 3).with_ring_batches(vec![1, 1]);
        let (mut a, _) = Round::new(run, "a", view.clone(), input(1), bounded.clone(), 0, &no_sign);
        // Weight 1/2: at most 500 units plus rounding; b commits to a norm of 2 * 10_000.
        let (_, acts) = Round::new(run, "b", view.clone(), input(10_000), bounded.clone(), 0, &no_sign);
        let RoundAction::Publish(Gossip::Commit(c)) = &acts[0] else { panic!() };
        let out = a.on_commit(c.clone(), 0);
        assert!(out.iter().any(|x| matches!(x, RoundAction::BadCommit(b) if b.commit.peer == "b")), "{out:?}");
        assert!(out.iter().any(
            |x| matches!(x, RoundAction::Failed(f) if f.kind == FailureKind::Fault && f.blame == vec!["b".to_string()])
        ));
        // b commits to an honest-looking norm but its own chunk is larger: refused when it arrives.
        let (mut a, acts_a) = Round::new(run, "a", view.clone(), input(1), bounded.clone(), 0, &no_sign);
        let (mut b, acts) = Round::new(run, "b", view.clone(), input(300), bounded, 0, &no_sign);
        let RoundAction::Publish(Gossip::Commit(c)) = &acts[0] else { panic!() };
        let understated = GradientCommit { norm: 100.0, ..c.clone() };
        let RoundAction::Publish(Gossip::Commit(ca)) = &acts_a[0] else { panic!() };
        let sends: Vec<RingStep> = b
            .on_commit(ca.clone(), 0)
            .into_iter()
            .filter_map(|x| match x {
                RoundAction::Send(_, s) => Some(s),
                _ => None,
            })
            .collect();
        assert!(a.on_commit(understated, 0).iter().all(|x| !matches!(x, RoundAction::Failed(_))));
        let out: Vec<RoundAction> = sends.into_iter().flat_map(|s| a.on_step(s.verify().unwrap(), 0)).collect();
        assert!(
            out.iter().any(|x| matches!(x, RoundAction::Failed(f) if f.kind == FailureKind::BadFrame && f.reason.contains("larger norm"))),
            "{out:?}"
        );
    }
}
