//! The round driver: owns membership and the current round, and moves bytes
//! between them and the network. All protocol decisions are made by the pure
//! state machines of [`p2p_proto`]; this task only decodes, checks who sent
//! what, keeps time, and carries out their actions.
//!
//! Besides the rounds themselves it runs the life cycle of a peer: a peer that
//! is behind (it joins late, or comes back after a crash) fetches the ring's
//! state before it trains ([`sync`]), every peer serves its state to others, a
//! peer asked to stop finishes its round and says it is leaving, and the work
//! after each round (apply, ledger, evaluation, checkpoint) runs in order
//! beside the loop ([`post`]).

mod audit;
mod post;
mod stale;
mod sync;

pub use audit::FaultMode;

use crate::ledger::client::Client;
use crate::ledger::outbox::{PendingCredit, RoundTally};
use crate::ledger::task::LedgerHandle;
use crate::net::{NetEvent, NetHandle};
use crate::ring_io::{self, Inbound};
use crate::state_sync::ServeRequest;
use crate::train::worker::Worker;
use libp2p::PeerId;
use p2p_proto::codec::{decode_exact, encode_frame};
use p2p_proto::compress;
use p2p_proto::demo::demo_vector;
use p2p_proto::hash::{hash_i32s, hex};
use p2p_proto::membership::{Membership, MembershipAction, MembershipConfig, RingView, STRIKES_TO_OPEN};
use p2p_proto::message::{AttemptRef, Gossip, PeerKey, RingStep, RunId, StateTag};
use p2p_proto::round::{Contribution, FailureKind, Round, RoundAction, RoundConfig};
use p2p_proto::state::{Statements, Verdict};
use p2p_proto::{FixedPoint, Hash};
use post::PostRound;
use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

/// How often timers are checked.
const TICK: Duration = Duration::from_millis(20);
/// Gossip for rounds this peer has not reached yet, kept until it gets there.
const MAX_PENDING_GOSSIP: usize = 4096;
/// Messages of one peer kept for later at most (its latest): an honest member has a commit, a
/// `Done` and perhaps a `Failed` for an attempt or two, so one peer cannot push the others'
/// messages out.
const PENDING_PER_PEER: usize = 8;
/// Bytes of the messages kept for later at most (as [`held_bytes`] counts them).
const MAX_PENDING_BYTES: usize = 64 << 20;
/// Every this many ticks, the peers' states are copied into the metrics.
const METRICS_EVERY_TICKS: u64 = 25;
/// Every this many ticks, per-peer state of peers membership forgot is dropped.
const FORGET_EVERY_TICKS: u64 = 250;
/// Attempts this peer completed, remembered so that a peer coming back can learn whether the
/// ring certified the attempt it was in when it went away.
const CERTIFIED_HISTORY: usize = 4096;
/// Own `Done` messages kept to answer members that missed them.
const OWN_DONES: usize = 16;
/// Attempts this peer was a member of, kept to check fault evidence against.
const ATTEMPTS_KEPT: usize = 64;
/// After its last round, how long a peer still answers members waiting for its `Done`
/// (members repeat theirs every second while they wait).
const LINGER: Duration = Duration::from_millis(1500);

/// Everything the driver needs to know about the run.
#[derive(Debug, Clone)]
pub struct DriverConfig {
    pub run: RunId,
    pub membership: MembershipConfig,
    pub round: RoundConfig,
    pub fixed: FixedPoint,
    /// Audits compare within this relative distance, on values the target reveals (0: the
    /// recomputation must make the commit's hashes).
    pub audit_tolerance: f64,
    /// What each round all-reduces.
    pub compute: Compute,
    /// Stop after this many rounds (round numbers `0..rounds`).
    pub rounds: Option<u64>,
    /// How long to wait for a stream to the right neighbour to open.
    pub open_timeout: Duration,
    /// Where completed rounds are reported for the on-chain ledger, if anywhere.
    pub ledger: Option<LedgerHandle>,
    /// The chain, read to check a fetched state against the latest finalized checkpoint.
    pub chain: Option<Client>,
    /// The state this peer starts from, when it resumes from a local checkpoint.
    pub resume: Option<Resume>,
    /// Test hook (builds with the `fault-injection` feature only): freeze in the middle of
    /// this round's all-reduce, as a peer that hangs or is about to be killed.
    pub pause_in_round: Option<u64>,
    /// Test hook (builds with the `fault-injection` feature only): lie in this way.
    pub fault: Option<FaultMode>,
    /// Asynchronous rounds: how long a ring may wait for this peer's gradient once most other
    /// members committed (none: synchronous rounds; the largest staleness is in `round`).
    pub async_threshold: Option<Duration>,
    /// This peer's identity key: it signs its commits.
    pub identity: libp2p::identity::Keypair,
    /// What this peer reports about itself (`--http`).
    pub metrics: crate::metrics::Metrics,
}

/// Where a restarted peer resumes.
#[derive(Debug, Clone, Copy)]
pub struct Resume {
    pub state: StateTag,
    /// Samples of the sample stream consumed by rounds `0..state.round`.
    pub cursor: u64,
}

/// What the peers all-reduce each round.
#[derive(Debug, Clone)]
pub enum Compute {
    /// A deterministic pseudo-random vector of this many values per peer, so anyone can
    /// recompute the exact sum.
    Demo { len: usize },
    /// Training: each member's gradient of its micro-batch, weighted so the sum is the ring's
    /// average; every member applies it and checks the parameter hash of the next round.
    Train(TrainSpec),
}

/// How a peer trains.
#[derive(Debug, Clone)]
pub struct TrainSpec {
    pub worker: Worker,
    /// Samples this peer contributes per round (announced in its heartbeats).
    pub batch: usize,
    /// The run's batch, assumed for a member whose announcement this peer has not heard.
    pub default_batch: usize,
    /// The most samples a member may announce per round (the largest batch in every local
    /// step): a heartbeat, join or fault evidence claiming more is refused.
    pub most_samples: u64,
    /// Evaluate every N rounds (0: only after the last).
    pub eval_every: u64,
    /// Rounds per on-chain epoch: a local checkpoint is saved at each epoch's last round.
    pub epoch_rounds: u64,
    pub checkpoint_dir: PathBuf,
}

/// What a finished driver reports.
#[derive(Debug, Clone, Default)]
pub struct Summary {
    pub rounds_completed: u64,
    pub rounds_failed: u64,
    pub last_round: Option<u64>,
    /// States fetched from peers (late joins, returns, resyncs).
    pub syncs: u64,
}

/// Work handed from the helper tasks back to the loop.
enum Internal {
    /// A contribution was computed for a ring, with the local loss.
    Prepared {
        view: RingView,
        input: Box<Contribution>,
        loss: Option<f32>,
        /// Top-k compression: the residual the contribution was compressed with, and the one
        /// this peer keeps if the ring certifies it.
        residual: Option<Residuals>,
    },
    /// The worker applied a round: this peer now holds this state.
    Applied(StateTag),
    /// A peer asks for this peer's state.
    Serve(ServeRequest),
    Sync(sync::Event),
    /// The attempt this peer is in is noted in the ledger outbox: its `Done` may go out.
    CreditNoted {
        round: u64,
        attempt: u32,
    },
    /// Other peers told what they know of this peer's unsettled attempts.
    Settled(p2p_proto::message::Settlement),
    /// An audit, or a check of fault evidence, is done.
    Audited(audit::Audited),
    /// Asynchronous rounds: this peer's gradient job `id` is done.
    Computed {
        id: u64,
        gradient: Box<crate::train::worker::Gradient>,
    },
    /// Asynchronous rounds: the threshold since most other members committed has passed.
    AsyncDeadline,
}

/// Top-k: the residual a contribution was compressed with, and the one it leaves with its hash.
type Residuals = (Arc<Vec<i32>>, Vec<i32>, Hash);

/// A residual with its blake3 (hashed once, when it is made).
type Residual = (Arc<Vec<i32>>, Hash);

/// Makes a peer's contribution to one ring from its encoded values ([`Driver::packer`]).
struct Packer {
    comp: compress::Compression,
    n: usize,
    seg: usize,
    max_units: i32,
    max_norm: f64,
    residual: Option<Residual>,
    history: std::collections::BTreeMap<PeerKey, [Hash; 2]>,
    zero: Hash,
}

impl Packer {
    /// The contribution, and with top-k the residual it used and the one it leaves.
    fn pack(
        self,
        data: Vec<i32>,
        samples: u64,
        param_hash: Hash,
        joiners: Vec<PeerKey>,
    ) -> (Contribution, Option<Residuals>) {
        if self.comp.is_none() {
            return (Contribution::new(data, samples, param_hash, joiners, self.n, self.seg), None);
        }
        let used = self.residual.as_ref().map(|(r, _)| r.as_slice());
        let e = compress::encode(self.comp, &data, used, self.max_units, self.max_norm);
        let input = Contribution::compressed(e.payload, e.norm, data.len(), samples, param_hash, joiners, self.seg);
        match (self.residual, e.residual) {
            (Some((used, used_hash)), Some(next)) => {
                let next_hash = hash_i32s(&next);
                let input = input.with_residual(used_hash, next_hash).with_residual_history(self.history, self.zero);
                (input, Some((used, next, next_hash)))
            }
            _ => (input, None),
        }
    }

    /// Asynchronous rounds: the contribution of nothing (no samples) of `len` values: zeros,
    /// or compressed their payload ([`compress::zeros`]), the residual (top-k) kept: the one it
    /// names is the one it leaves, so this peer's residual stays as it is (nobody asks for it:
    /// auditors recompute the payload of zeros without it).
    fn nothing(self, len: usize, param_hash: Hash, joiners: Vec<PeerKey>) -> Contribution {
        if self.comp.is_none() {
            return Contribution::new(vec![0; len], 0, param_hash, joiners, self.n, self.seg);
        }
        let payload = compress::zeros(self.comp, len);
        let input = Contribution::compressed(payload, 0.0, len, 0, param_hash, joiners, self.seg);
        match self.residual {
            Some((_, hash)) => input.with_residual(hash, hash).with_residual_history(self.history, self.zero),
            None => input,
        }
    }
}

/// How far a requested stop has got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Leave {
    Staying,
    /// Asked to stop: the round under way finishes first (its commit says this peer leaves).
    Requested,
}

struct Driver {
    cfg: DriverConfig,
    net: NetHandle,
    me: PeerKey,
    epoch: Instant,
    membership: Membership,
    round: Option<Round>,
    /// One writer per member this peer sends ring traffic to (two in a hierarchical round).
    writers: Vec<(PeerKey, mpsc::UnboundedSender<RingStep>)>,
    pending: VecDeque<Gossip>,
    internal: mpsc::UnboundedSender<Internal>,
    /// Work after a training round (logs, ledger, evaluation, checkpoint), in round order.
    post_tx: mpsc::UnboundedSender<PostRound>,
    /// The next round this peer trains: every round before it is completed (its apply queued).
    next_round: u64,
    /// Samples consumed by the rounds completed so far: where the next round's stretch of the
    /// sample stream starts.
    cursor: u64,
    /// The local loss of the current round's micro-batch.
    loss: Option<f32>,
    /// Samples per round each peer announced (heartbeats, joins).
    batches: std::collections::HashMap<PeerKey, u64>,
    /// Which parameter hash each peer says it holds for which round.
    statements: Statements,
    sync: Option<sync::Sync>,
    /// State requests waiting for this peer to finish the round before the one they ask for.
    waiting_serves: Vec<(ServeRequest, Instant)>,
    leave: Leave,
    /// The attempt this peer completed of each recent round (at most [`CERTIFIED_HISTORY`]).
    certified: std::collections::BTreeMap<u64, AttemptRef>,
    /// This peer's own `Done` of its last rounds, and when it last gossiped each again for a
    /// member that still waited for it ([`Driver::answer_done`]).
    own_dones: std::collections::BTreeMap<u64, (p2p_proto::message::RoundDone, u64)>,
    /// Right neighbours whose data port could not be used lately.
    unreachable: ring_io::Unreachable,
    /// The attempts whose pending credit is being written, and this peer's `Done` for each if
    /// the round got there first: it goes out once that credit is durable, so the ring can
    /// never use this peer's work without this peer being able to claim it.
    credit_notes: std::collections::BTreeMap<(u64, u32), Option<Gossip>>,
    /// Frozen by the test hook: ignores everything until killed.
    frozen: bool,
    ticks: u64,
    /// Peers proven to lie (this peer checked the evidence).
    convicted: std::collections::HashSet<PeerKey>,
    /// Peers whose frames failed their checks here: the round and reason of the first, until
    /// reported (then none).
    refused: std::collections::HashMap<PeerKey, Option<(u64, String)>>,
    /// Fault evidence checked or being checked, by (accused, round, attempt, kind).
    faults_checked: std::collections::HashSet<(PeerKey, u64, u32, p2p_proto::message::FaultKind)>,
    /// The latest attempts this peer was a member of (at most [`ATTEMPTS_KEPT`]): evidence
    /// that needs a gradient recomputed is checked only for these, so that made-up rings
    /// cannot queue recomputations.
    attempts_in: std::collections::VecDeque<RingView>,
    /// Signs this peer's commits, ring segments and sum checks.
    signer: crate::sign::Signer,
    /// What a test-only liar remembers.
    fault_state: audit::FaultState,
    /// Committed vectors this peer reveals to auditors (audits within a tolerance), or the
    /// residuals its top-k payloads were compressed with.
    reveals: crate::reveal::Store,
    /// Top-k compression's error feedback: what this peer's certified rounds did not send.
    residual: Option<Residual>,
    /// The residual after the attempt under way (and its hash), kept if the ring certifies
    /// that attempt.
    next_residual: Option<((u64, u32), Vec<i32>, Hash)>,
    /// The residual hashes each member's commit stated in the last round this peer completed,
    /// and that round; and the hash of a residual of zeros.
    residual_history: (u64, std::collections::BTreeMap<PeerKey, [Hash; 2]>),
    residual_zero: Option<Hash>,
    /// Asynchronous rounds' state (none: synchronous).
    asy: Option<stale::Async>,
    summary: Summary,
    finished: bool,
}

/// Runs rounds until the configured number is reached or `shutdown` resolves; then finishes
/// the round under way and announces that this peer leaves.
pub async fn run(
    cfg: DriverConfig,
    net: NetHandle,
    mut events: mpsc::UnboundedReceiver<NetEvent>,
    shutdown: impl std::future::Future<Output = ()>,
) -> Summary {
    let (inbound_tx, mut inbound) = mpsc::channel::<Inbound>(256);
    let plane = match net.direct_ip {
        Some(ip) => match ring_io::DataPlane::bind(ip, net.direct_port).await {
            Ok(p) => Some(p),
            Err(e) => {
                warn!(%ip, error = %e, "cannot listen for direct ring payloads; they go over libp2p streams");
                None
            }
        },
        None => None,
    };
    ring_io::spawn_acceptor(net.control(), inbound_tx, plane);
    let (internal, mut internal_rx) = mpsc::unbounded_channel();
    let (serve_tx, mut serve_rx) = mpsc::channel::<ServeRequest>(64);
    crate::state_sync::serve(net.control(), cfg.run, serve_tx);
    let reveals = crate::reveal::Store::new(&net.local_peer_id.to_string());
    let revealing = cfg.audit_tolerance > 0.0 || cfg.round.compression.has_residual();
    match cfg.fault {
        _ if !revealing => {}
        Some(FaultMode::Withhold) => {}
        Some(FaultMode::WithholdSilent) => crate::reveal::serve_nothing(net.control()),
        _ => crate::reveal::serve(net.control(), cfg.run, reveals.clone()),
    }
    let me = net.local_peer_id.to_string();
    let (post_tx, post_rx) = mpsc::unbounded_channel();
    let post_task = tokio::spawn(post::post_rounds(post_rx, cfg.ledger.clone(), internal.clone(), cfg.metrics.clone()));
    let resume = cfg.resume;
    let state = resume.map(|r| r.state).unwrap_or_else(|| StateTag { round: 0, param_hash: initial_hash(&cfg) });
    let mut d = Driver {
        internal,
        post_tx,
        next_round: state.round,
        cursor: resume.map_or(0, |r| r.cursor),
        loss: None,
        batches: std::collections::HashMap::new(),
        statements: Statements::default(),
        sync: None,
        waiting_serves: Vec::new(),
        leave: Leave::Staying,
        certified: std::collections::BTreeMap::new(),
        own_dones: std::collections::BTreeMap::new(),
        unreachable: ring_io::Unreachable::default(),
        credit_notes: std::collections::BTreeMap::new(),
        frozen: false,
        ticks: 0,
        convicted: std::collections::HashSet::new(),
        faults_checked: std::collections::HashSet::new(),
        attempts_in: std::collections::VecDeque::new(),
        refused: std::collections::HashMap::new(),
        signer: crate::sign::Signer::new(cfg.identity.clone()),
        fault_state: audit::FaultState::default(),
        reveals,
        residual: None,
        next_residual: None,
        residual_history: (0, std::collections::BTreeMap::new()),
        residual_zero: None,
        asy: match (&cfg.compute, cfg.async_threshold) {
            (Compute::Train(_), Some(t)) => {
                let mut a = stale::Async::new(t, cfg.round.max_staleness);
                a.note_params(state.round, state.param_hash);
                Some(a)
            }
            _ => None,
        },
        membership: Membership::resume(cfg.run, me.clone(), cfg.membership.clone(), state),
        cfg,
        net,
        me,
        epoch: Instant::now(),
        round: None,
        writers: Vec::new(),
        pending: VecDeque::new(),
        summary: Summary::default(),
        finished: false,
    };
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    tokio::pin!(shutdown);
    let mut stopping = false;
    while !d.finished {
        tokio::select! {
            Some(ev) = events.recv() => d.on_net_event(ev),
            Some(msg) = inbound.recv() => d.on_inbound(msg),
            Some(msg) = internal_rx.recv() => d.on_internal(msg),
            Some(req) = serve_rx.recv() => d.on_internal(Internal::Serve(req)),
            _ = tick.tick() => d.on_tick(),
            () = &mut shutdown, if !stopping => {
                stopping = true;
                d.begin_leave();
            }
        }
    }
    // Members of the last ring that missed this peer's Done ask again by repeating theirs. A
    // Done still waiting for its pending credit to be written goes out once it is (the others
    // hold the round open for it).
    let linger = tokio::time::sleep(LINGER);
    tokio::pin!(linger);
    loop {
        tokio::select! {
            Some(msg) = internal_rx.recv(), if d.credit_notes.values().any(Option::is_some) => {
                if let Internal::CreditNoted { round, attempt } = msg {
                    d.credit_noted(round, attempt);
                }
            }
            ev = events.recv() => match ev {
                Some(NetEvent::Gossip { source, data }) => {
                    if let Ok(Gossip::Done(done)) = decode_exact::<Gossip>(&data)
                        && done.peer == source.to_string()
                        && done.run == d.cfg.run
                    {
                        let now = d.now();
                        d.answer_done(&done, now);
                    }
                }
                Some(_) => {}
                None => break,
            },
            () = &mut linger => break,
            () = &mut shutdown, if !stopping => break,
        }
    }
    let summary = d.summary.clone();
    // Let the last round's apply, evaluation, checkpoint and ledger tally finish.
    drop(d);
    let _ = post_task.await;
    summary
}

/// The parameter hash of the run's initial state (zero for the demonstration).
fn initial_hash(cfg: &DriverConfig) -> Hash {
    match &cfg.compute {
        Compute::Demo { .. } => Hash::default(),
        Compute::Train(spec) => spec.worker.initial_hash,
    }
}

impl Driver {
    fn now(&self) -> u64 {
        self.epoch.elapsed().as_micros() as u64
    }

    fn publish(&mut self, g: &Gossip) {
        if let Gossip::Done(d) = g
            && d.peer == self.me
        {
            self.own_dones.insert(d.round, (d.clone(), 0));
            while self.own_dones.len() > OWN_DONES {
                self.own_dones.pop_first();
            }
        }
        self.net.publish(encode_frame(g));
    }

    /// A member that gossips its `Done` of an attempt this peer certified has not seen this
    /// peer's `Done` (gossip can lose a message, and a certified member stops repeating its
    /// own): gossip it again, at most once a second per round, so that the member certifies
    /// too instead of redoing the round without this peer.
    fn answer_done(&mut self, done: &p2p_proto::message::RoundDone, now: u64) {
        if done.peer == self.me || self.certified.get(&done.round).is_none_or(|c| c.attempt != done.attempt) {
            return;
        }
        let Some((own, last)) = self.own_dones.get_mut(&done.round).filter(|(d, _)| d.attempt == done.attempt) else {
            return;
        };
        if *last != 0 && now < *last + 1_000_000 {
            return;
        }
        *last = now.max(1);
        let own = Gossip::Done(own.clone());
        debug!(round = done.round, peer = %done.peer, "a member still waits for this peer's Done; gossiping it again");
        self.net.publish(encode_frame(&own));
    }

    fn on_internal(&mut self, msg: Internal) {
        if self.frozen {
            return;
        }
        match msg {
            Internal::Prepared { view, input, loss, residual } => {
                self.loss = loss;
                self.on_prepared(view, *input, residual);
            }
            Internal::Applied(tag) => {
                // A state restored meanwhile (a resync) supersedes older applies.
                if tag.round >= self.membership.state().round {
                    self.membership.set_state(tag);
                    if let Some(a) = self.asy.as_mut() {
                        a.note_params(tag.round, tag.param_hash);
                    }
                }
            }
            Internal::Computed { id, gradient } => self.on_computed(id, *gradient),
            Internal::AsyncDeadline => {
                let now = self.now();
                self.tick_async(now);
            }
            Internal::Serve(req) => self.serve(req),
            Internal::Sync(ev) => self.on_sync_event(ev),
            Internal::Audited(a) => self.on_audited(a),
            Internal::Settled(s) => {
                if let Some(ledger) = &self.cfg.ledger {
                    ledger.resolve_pending(&s.certified, &s.not_certified);
                }
            }
            Internal::CreditNoted { round, attempt } => self.credit_noted(round, attempt),
        }
    }

    fn on_net_event(&mut self, ev: NetEvent) {
        if self.frozen {
            return;
        }
        match ev {
            NetEvent::Listening(addr) => {
                info!(%addr, "listening");
                println!("{addr}");
            }
            NetEvent::Gossip { source, data } => self.on_gossip(source, &data),
            NetEvent::Disconnected(peer) => {
                let peer = peer.to_string();
                if self.round.as_ref().is_some_and(|r| r.view().members.contains(&peer)) {
                    info!(%peer, "connection to a ring member closed");
                }
                self.membership.on_disconnect(&peer);
            }
        }
    }

    fn on_gossip(&mut self, source: PeerId, data: &[u8]) {
        let msg: Gossip = match decode_exact(data) {
            Ok(m) => m,
            Err(e) => {
                warn!(peer = %source, reason = %e, "rejected gossip message");
                return;
            }
        };
        if msg.run() != self.cfg.run {
            warn!(peer = %source, run = %msg.run(), "rejected gossip message: it belongs to another run");
            return;
        }
        if msg.peer() != source.to_string() {
            warn!(peer = %source, claimed = msg.peer(), "rejected gossip message: signed by another peer than it names");
            return;
        }
        let now = self.now();
        self.membership.observe(msg.peer(), now);
        let attempt = match &msg {
            Gossip::Commit(c) => Some((c.round, c.attempt)),
            Gossip::Done(d) => Some((d.round, d.attempt)),
            Gossip::SumCheck(c) => Some((c.round, c.attempt)),
            Gossip::Checked(c) => Some((c.round, c.attempt)),
            _ => None,
        };
        if let (Some((round, attempt)), Some(r)) = (attempt, &self.round)
            && r.is_for(round, attempt)
            && r.view().position(msg.peer()).is_none()
        {
            warn!(peer = %source, round, attempt, "ignored a message for the current attempt from a peer not in its ring");
            return;
        }
        let announced = match &msg {
            Gossip::Heartbeat(h) => Some(h.batch),
            Gossip::Join(j) => Some(j.batch),
            _ => None,
        };
        if let Some(batch) = announced.map(u64::from).filter(|b| *b > self.most_samples()) {
            warn!(peer = %source, batch, most = self.most_samples(), "rejected gossip message: it announces more samples per round than a peer of this run computes");
            return;
        }
        match msg {
            Gossip::Heartbeat(h) => {
                self.batches.insert(h.peer.clone(), u64::from(h.batch));
                if h.seq == 1 {
                    // A new process of that peer: what its earlier life stated no longer holds.
                    self.statements.forget(&h.peer);
                }
                self.statements.note(&h.peer, h.state);
                self.membership.on_heartbeat(&h, now)
            }
            Gossip::Join(j) => {
                self.batches.insert(j.peer.clone(), u64::from(j.batch));
                self.membership.on_join(&j, now)
            }
            Gossip::Commit(ref c) => {
                if !audit::signed_by_its_peer(c) {
                    warn!(peer = %c.peer, round = c.round, "rejected commit: its signature does not verify");
                    return;
                }
                // A commit states the parameters its gradient was computed on (those of an
                // earlier round for a stale gradient; none for an empty commit).
                if c.samples > 0 || self.asy.is_none() {
                    self.statements.note(&c.peer, StateTag { round: c.computed_at, param_hash: c.param_hash });
                }
                if let Some(r) = self.round.as_mut().filter(|r| r.is_for(c.round, c.attempt)) {
                    let acts = r.on_commit(c.clone(), now);
                    self.on_round_actions(acts);
                } else {
                    self.keep_for_later(msg);
                    self.tick_async(now);
                }
            }
            Gossip::Done(ref done) => {
                self.answer_done(done, now);
                if let Some(r) = self.round.as_mut().filter(|r| r.is_for(done.round, done.attempt)) {
                    let acts = r.on_done(done.clone(), now);
                    self.on_round_actions(acts);
                } else if self.round.is_none() && self.sync.is_none() {
                    let acts = self.membership.on_done(done, now);
                    self.keep_for_later(msg);
                    self.on_membership_actions(acts);
                } else {
                    self.keep_for_later(msg);
                }
            }
            Gossip::Failed(ref f) => {
                if let Some(r) = self.round.as_mut() {
                    let acts = r.on_failed(f);
                    self.on_round_actions(acts);
                } else if self.sync.as_ref().is_some_and(|s| {
                    s.then.as_ref().is_some_and(|v| {
                        (v.round, v.attempt) == (f.round, f.attempt) && f.peer != self.me && v.members.contains(&f.peer)
                    })
                }) {
                    // The ring this peer was fetching the state for failed (a member of that
                    // very attempt says so; anyone else's word could keep joiners out): stop,
                    // form again.
                    self.sync_failed(&format!("the ring failed meanwhile: {}", f.reason));
                } else {
                    // This peer may be computing its gradient for that very attempt.
                    self.keep_for_later(msg);
                }
            }
            Gossip::PartialSums(p) => {
                debug!(peer = %p.peer, round = p.round, sums = p.sums.len(), "partial-sum hashes");
            }
            Gossip::Checkpoint(c) => {
                debug!(peer = %c.peer, round = c.round, hash = %hex(&c.param_hash), "checkpoint announced");
            }
            Gossip::Fault(evidence) => self.on_fault(evidence),
            Gossip::SumCheck(check) => {
                if !crate::sign::sum_check_is_signed(&check) {
                    warn!(peer = %check.peer, round = check.round, "rejected sum check: its signature does not verify");
                    return;
                }
                if let Some(r) = self.round.as_mut().filter(|r| r.is_for(check.round, check.attempt)) {
                    let acts = r.on_sum_check(*check, now);
                    self.on_round_actions(acts);
                }
            }
            Gossip::Checked(c) => {
                if let Some(r) = self.round.as_mut().filter(|r| r.is_for(c.round, c.attempt)) {
                    let acts = r.on_checked(&c, now);
                    self.on_round_actions(acts);
                }
            }
        }
    }

    /// Keeps a commit, `Done` or `Failed` for a round this peer may still start.
    fn keep_for_later(&mut self, msg: Gossip) {
        let round = match &msg {
            Gossip::Commit(c) => c.round,
            Gossip::Done(d) => d.round,
            Gossip::Failed(f) => f.round,
            _ => return,
        };
        if self.round.as_ref().is_some_and(|r| round < r.view().round) {
            debug!(peer = msg.peer(), round, "stale round message dropped: its round is over");
            return;
        }
        let mut own = self.pending.iter().enumerate().filter(|(_, g)| g.peer() == msg.peer()).map(|(i, _)| i);
        if let Some(oldest) = own.next()
            && own.count() + 1 >= PENDING_PER_PEER
        {
            self.pending.remove(oldest);
        }
        self.pending.push_back(msg);
        let mut bytes: usize = self.pending.iter().map(held_bytes).sum();
        while self.pending.len() > MAX_PENDING_GOSSIP || bytes > MAX_PENDING_BYTES {
            let Some(dropped) = self.pending.pop_front() else { break };
            bytes -= held_bytes(&dropped);
        }
    }

    fn on_inbound(&mut self, msg: Inbound) {
        if self.frozen {
            return;
        }
        let now = self.now();
        let from = msg.from.to_string();
        let Some(round) = self.round.as_mut().filter(|r| r.hears_from(&from)) else {
            if msg.step.is_ok() {
                warn!(peer = %from, "rejected ring frame: the sender sends this peer nothing in its current ring");
            }
            msg.close.notify_one();
            return;
        };
        let step = match &msg.step {
            Ok(step) => step.step(),
            Err(reason) => {
                // The left neighbour sent a bad frame on this attempt's stream: the attempt cannot
                // complete, and the sender is to blame (the stream is authenticated end to end).
                if msg.attempt.is_some_and(|(r, a)| round.is_for(r, a)) {
                    let acts = round.rejected_from(&from, reason);
                    self.on_round_actions(acts);
                }
                return;
            }
        };
        if !round.is_for(step.round, step.attempt) || step.run != self.cfg.run {
            debug!(peer = %from, round = step.round, attempt = step.attempt, "stale ring frame dropped");
            msg.close.notify_one();
            return;
        }
        if !round.hears(&from, &step.id) {
            // A hierarchical round's member sent a segment it does not send this peer.
            let reason = format!("segment {:?} from a peer that does not send it to this one", step.id);
            let acts = round.rejected_from(&from, &reason);
            self.on_round_actions(acts);
            return;
        }
        FaultMode::received(self.cfg.fault, step, &mut self.fault_state);
        let Ok(step) = msg.step else { return };
        let acts = round.on_step_from(&from, step, now);
        self.on_round_actions(acts);
    }

    fn on_tick(&mut self) {
        if self.frozen {
            return;
        }
        let now = self.now();
        let acts = self.membership.tick(now);
        self.on_membership_actions(acts);
        self.tick_async(now);
        self.ticks += 1;
        if self.ticks.is_multiple_of(METRICS_EVERY_TICKS) {
            let rows = self.membership.peer_rows(now, self.next_round);
            self.cfg.metrics.update(|s| {
                s.peers = rows
                    .into_iter()
                    .map(|(peer, state, ago)| crate::metrics::PeerRow {
                        peer,
                        state: state.to_owned(),
                        last_seen_s: ago as f64 / 1e6,
                    })
                    .collect();
            });
        }
        if self.ticks.is_multiple_of(FORGET_EVERY_TICKS) {
            // What is kept per peer goes when membership forgets the peer.
            let m = &self.membership;
            self.statements.retain(|p| m.knows(p));
            self.batches.retain(|p, _| m.knows(p));
        }
        if let Some(r) = self.round.as_mut() {
            let gone = self.membership.dead_members(now);
            let mut acts = r.members_gone(&gone);
            acts.extend(r.tick(now));
            self.on_round_actions(acts);
        }
        self.check_fetched();
        self.serve_waiting();
    }

    fn on_membership_actions(&mut self, acts: Vec<MembershipAction>) {
        for a in acts {
            match a {
                MembershipAction::Publish(g) => self.publish(&g),
                MembershipAction::Start(view) => self.start_round(view),
                MembershipAction::Sync { round, from } => self.begin_sync(round, None, from),
            }
        }
    }

    /// Computes this peer's contribution for `view` off the event loop (on the compute worker
    /// or a blocking thread), so heartbeats and gossip keep flowing while it is hashed. A peer
    /// whose state is behind the ring's round fetches that state first.
    fn start_round(&mut self, view: RingView) {
        if self.finished || self.leave != Leave::Staying {
            return;
        }
        let now = self.now();
        if view.round != self.next_round {
            if view.round < self.next_round {
                warn!(
                    round = view.round,
                    have = self.next_round,
                    "a ring for a round this peer has done; not joining it"
                );
                self.membership.round_failed(now, &[]);
                return;
            }
            // A joiner: the ring's state first. Its members that completed the previous round
            // hold it; those whose Done named this peer come first.
            let mut from: Vec<PeerKey> = self
                .pending
                .iter()
                .filter_map(|g| match g {
                    Gossip::Done(d) if d.round.checked_add(1) == Some(view.round) => Some(d.peer.clone()),
                    _ => None,
                })
                .collect();
            let others: Vec<PeerKey> =
                view.members.iter().filter(|m| **m != self.me && !from.contains(m)).cloned().collect();
            from.extend(others);
            let acts = self.membership.set_fetching(true, now);
            self.on_membership_actions(acts);
            self.begin_sync(view.round, Some(view), from);
            return;
        }
        if let Err(e) = self.cfg.fixed.check_ring_size(view.len()) {
            warn!(round = view.round, reason = %e, "cannot run this ring");
            self.membership.round_failed(now, &[]);
            return;
        }
        info!(
            round = view.round,
            attempt = view.attempt,
            ring_size = view.len(),
            members = %view.members.join(","),
            "round started"
        );
        let joiners = self.membership.joiners(now);
        let excluded = self.membership.excluded(view.round);
        let (run, me, fixed) = (self.cfg.run, self.me.clone(), self.cfg.fixed);
        let tx = self.internal.clone();
        match &self.cfg.compute {
            Compute::Demo { len } => {
                let len = *len;
                let pack = self.packer(&view, len, 1.0);
                tokio::task::spawn_blocking(move || {
                    let values = demo_vector(run, view.round, &me, len);
                    let data = fixed.encode(&values).expect("demo values are finite");
                    // The demonstration has no parameters: its parameter hash is zero.
                    let (input, residual) = pack.pack(data, 1, Hash::default(), joiners);
                    let input = input.with_excluded(excluded);
                    let _ = tx.send(Internal::Prepared { view, input: Box::new(input), loss: None, residual });
                });
            }
            Compute::Train(spec) => {
                let pos = view.position(&me).expect("a started ring holds this peer");
                // Member p takes its batch of the stream right after those of members 0..p,
                // and weighs its mean gradient by its share of the round's samples, so the
                // ring's sum is the mean over all of them.
                let batches: Vec<u64> = view
                    .members
                    .iter()
                    .map(|m| {
                        if *m == me {
                            spec.batch as u64
                        } else {
                            self.batches.get(m).copied().unwrap_or(spec.default_batch as u64)
                        }
                    })
                    .collect();
                if self.asy.is_some() {
                    self.start_async(view, batches, joiners, excluded);
                    return;
                }
                let (offset, _, weight) = p2p_proto::audit::micro_batch(&batches, pos);
                let fault = self.cfg.fault;
                let start = FaultMode::start(fault, self.cursor.saturating_add(offset));
                let gradient = spec.worker.gradient(start, spec.batch, weight);
                let pack = self.packer(&view, spec.worker.params, weight);
                tokio::spawn(async move {
                    let Ok(mut g) = gradient.await else { return };
                    FaultMode::distort(fault, &mut g.weighted, weight);
                    if !g.loss.is_finite() {
                        warn!(
                            round = view.round,
                            loss = g.loss,
                            "the loss is not finite; not contributing to this round"
                        );
                        return;
                    }
                    let prepared = tokio::task::spawn_blocking(move || {
                        let data = FaultMode::encode(fault, &fixed, &g.weighted).map_err(|e| e.to_string())?;
                        let (input, residual) = pack.pack(data, g.samples as u64, g.param_hash, joiners);
                        let input = input.with_ring_batches(batches).with_excluded(excluded);
                        Ok::<_, String>((input, g.loss, residual))
                    })
                    .await;
                    match prepared {
                        Ok(Ok((input, loss, residual))) => {
                            let _ = tx.send(Internal::Prepared {
                                view,
                                input: Box::new(input),
                                loss: Some(loss),
                                residual,
                            });
                        }
                        Ok(Err(e)) => warn!(round = view.round, reason = %e, "cannot encode the gradient"),
                        Err(_) => {}
                    }
                });
            }
        }
    }

    /// The most samples a member of this run may contribute per round.
    fn most_samples(&self) -> u64 {
        match &self.cfg.compute {
            Compute::Train(spec) => spec.most_samples,
            Compute::Demo { .. } => crate::train::config::MAX_BATCH as u64,
        }
    }

    /// How this peer's contribution to `view` is made from its `len` encoded values, weighed
    /// `weight` in the ring's sum: hashed for the ring, or compressed (top-k with this peer's
    /// residual, and the residuals the other members may start from).
    fn packer(&mut self, view: &RingView, len: usize, weight: f32) -> Packer {
        let comp = self.cfg.round.compression;
        let topk = comp.has_residual();
        let zero =
            if topk { *self.residual_zero.get_or_insert_with(|| hash_i32s(&vec![0; len])) } else { Hash::default() };
        let residual = topk.then(|| self.residual.get_or_insert_with(|| (Arc::new(vec![0; len]), zero)).clone());
        // Known for the members of the round before, when this peer completed it.
        let history = match &self.residual_history {
            (r, h) if topk && r + 1 == view.round => h.clone(),
            _ => Default::default(),
        };
        Packer {
            comp,
            n: self.cfg.round.chunks(view.len()),
            seg: self.cfg.round.segment_elems,
            max_units: self.cfg.fixed.max_units(),
            // An honest member's payload stays within the norm its weight allows.
            max_norm: self.cfg.round.max_norm_units * f64::from(weight),
            residual,
            history,
            zero,
        }
    }

    fn on_prepared(&mut self, view: RingView, mut input: Contribution, residual: Option<Residuals>) {
        if self.finished || self.round.is_some() || self.membership.ring() != Some(&view) {
            debug!(round = view.round, attempt = view.attempt, "contribution for a ring no longer current; dropped");
            return;
        }
        // Top-k: an auditor asks for the residual the commit names; the next one counts only if
        // this attempt does (none: the commit keeps the residual, an empty one).
        self.next_residual = residual.map(|(used, next, hash)| {
            self.reveals.insert(&self.me, view.round, view.attempt, used);
            ((view.round, view.attempt), next, hash)
        });
        // Asked to stop while the gradient was computed: the round still gets it, and the next
        // ring goes on without this peer.
        input.leaving = self.leave == Leave::Requested;
        if self.cfg.audit_tolerance > 0.0 {
            // An auditor may ask for these values.
            self.reveals.insert(&self.me, view.round, view.attempt, std::sync::Arc::new(input.data.clone()));
        }
        let now = self.now();
        if self.attempts_in.len() >= ATTEMPTS_KEPT {
            self.attempts_in.pop_front();
        }
        self.attempts_in.push_back(view.clone());
        let (round, acts) =
            Round::new(self.cfg.run, &self.me, view, input, self.cfg.round.clone(), now, &self.signer());
        self.writers = round.destinations().into_iter().map(|to| (to.clone(), self.writer_to(to))).collect();
        let (r, a) = (round.view().round, round.view().attempt);
        if let Some(ledger) = self.cfg.ledger.clone() {
            // Noted while the all-reduce runs; this peer's Done waits for it (see `credit_note`).
            let own = round.own_commit();
            let credit = PendingCredit {
                round: r,
                attempt: a,
                ring: round.view().hash(self.cfg.run),
                samples: own.samples,
                commit: own.digest(),
                // Decided by the outbox when it notes the credit.
                creditable: false,
            };
            self.credit_notes.insert((r, a), None);
            let tx = self.internal.clone();
            tokio::task::spawn_blocking(move || {
                if let Err(e) = ledger.note_pending(credit) {
                    warn!(round = r, reason = %e, "cannot note the pending credit; the round goes on");
                }
                let _ = tx.send(Internal::CreditNoted { round: r, attempt: a });
            });
        }
        self.round = Some(round);
        self.on_round_actions(acts);
        // Commits, Dones and failures that arrived before this peer started the round.
        let (now_msgs, later): (Vec<Gossip>, Vec<Gossip>) = std::mem::take(&mut self.pending)
            .into_iter()
            .filter(|g| match g {
                Gossip::Commit(c) => c.round >= r,
                Gossip::Done(d) => d.round >= r,
                Gossip::Failed(f) => f.round >= r,
                _ => false,
            })
            .partition(|g| match g {
                Gossip::Commit(c) => (c.round, c.attempt) == (r, a),
                Gossip::Done(d) => (d.round, d.attempt) == (r, a),
                Gossip::Failed(f) => (f.round, f.attempt) == (r, a),
                _ => false,
            });
        self.pending = later.into();
        for g in now_msgs {
            let now = self.now();
            let Some(round) = self.round.as_mut() else { break };
            let acts = match g {
                Gossip::Commit(c) => round.on_commit(c, now),
                Gossip::Done(d) => round.on_done(d, now),
                Gossip::Failed(f) => round.on_failed(&f),
                _ => Vec::new(),
            };
            self.on_round_actions(acts);
        }
    }

    /// A writer of ring segments to `to`.
    fn writer_to(&self, to: PeerKey) -> mpsc::UnboundedSender<RingStep> {
        // A peer that keeps its payloads on libp2p streams sends them there too.
        let ip = self.net.direct_ip.and_then(|_| to.parse().ok().and_then(|p| self.net.remote_ip(&p)));
        ring_io::spawn_writer(self.net.control(), to, ip, self.cfg.open_timeout, self.unreachable.clone())
    }

    fn on_round_actions(&mut self, acts: Vec<RoundAction>) {
        for a in acts {
            if self.frozen {
                return;
            }
            match a {
                RoundAction::Publish(Gossip::Done(d)) if self.credit_notes.contains_key(&(d.round, d.attempt)) => {
                    self.credit_notes.insert((d.round, d.attempt), Some(Gossip::Done(d)));
                }
                RoundAction::Publish(Gossip::SumCheck(mut check)) => {
                    self.signer.sign_sum_check(&mut check);
                    self.publish(&Gossip::SumCheck(check));
                }
                RoundAction::Publish(g) => self.publish(&g),
                RoundAction::Send(to, step) => {
                    if self.cfg.pause_in_round == Some(step.round) && step.id.step >= 1 {
                        // The test hook: this peer hangs mid all-reduce (its step-0 chunk went out).
                        warn!(round = step.round, "test hook: pausing in the middle of the all-reduce");
                        self.frozen = true;
                        return;
                    }
                    if let Some((_, w)) = self.writers.iter().find(|(p, _)| *p == to) {
                        let mut step = step;
                        let hier = self.round.as_ref().filter(|_| self.cfg.fault.is_some()).and_then(|r| {
                            let layout = self.cfg.round.layout(r.view().len())?;
                            Some((layout, r.own_commit().len as usize, self.cfg.round.segment_elems))
                        });
                        FaultMode::tamper(self.cfg.fault, &mut step, &mut self.fault_state, hier);
                        self.signer.sign_step(&mut step);
                        let now = self.now();
                        let noted = self.round.as_mut().map(|r| r.note_sent(&step, now)).unwrap_or_default();
                        FaultMode::in_transit(self.cfg.fault, &mut step, &mut self.fault_state);
                        let _ = w.send(step);
                        // This member's sum check, once the last segment it claims went out.
                        self.on_round_actions(noted);
                    }
                }
                RoundAction::Audit(job) => self.audit(job),
                RoundAction::Contradiction(c) => self.contradiction(c),
                RoundAction::SumFault(f) => self.sum_fault(f),
                RoundAction::BadCommit(b) => self.bad_commit(b),
                RoundAction::Completed(o) => self.on_completed(*o),
                RoundAction::Failed(f) => {
                    let now = self.now();
                    let Some(r) = self.round.take() else { continue };
                    let (round, attempt) = (r.view().round, r.view().attempt);
                    warn!(round, attempt, reason = %f.reason, "round failed");
                    self.writers.clear();
                    if let Some(a) = self.asy.as_mut() {
                        a.attempt_failed();
                    }
                    self.summary.rounds_failed += 1;
                    self.cfg.metrics.update(|s| {
                        s.rounds_failed += 1;
                        s.frames_refused += u64::from(f.kind == FailureKind::BadFrame);
                    });
                    let strikes = if matches!(f.kind, FailureKind::BadFrame | FailureKind::BadMessage) {
                        STRIKES_TO_OPEN
                    } else {
                        1
                    };
                    if f.kind == FailureKind::BadFrame {
                        self.frames_refused(round, &f.blame, &f.reason);
                    }
                    for p in self.membership.round_failed_with(now, &f.blame, strikes) {
                        warn!(peer = %p, round, "peer failed rounds in a row: kept out of rings for a while (circuit breaker)");
                    }
                    if self.leave == Leave::Requested {
                        self.finish_leave();
                        return;
                    }
                    if f.kind == FailureKind::ParamsDiffer {
                        self.check_own_parameters(round);
                    }
                }
            }
        }
    }

    fn on_completed(&mut self, o: p2p_proto::round::Outcome) {
        let now = self.now();
        self.writers.clear();
        self.round = None;
        self.summary.rounds_completed += 1;
        self.summary.last_round = Some(o.view.round);
        // The ring's stretch of the sample stream, whether or not every member committed its
        // samples this round (a slow member's join a later round, asynchronously).
        self.cursor = self.cursor.saturating_add(o.ring_samples);
        let own_at = o.computed_at.get(&self.me).copied();
        self.completed_async(&o.view, own_at);
        self.next_round = o.view.round + 1;
        let done = AttemptRef { round: o.view.round, attempt: o.view.attempt, ring: o.view.hash(self.cfg.run) };
        self.certified.insert(o.view.round, done);
        if let Some((at, next, hash)) = self.next_residual.take()
            && at == (o.view.round, o.view.attempt)
        {
            self.residual = Some((Arc::new(next), hash));
        }
        if self.cfg.round.compression.has_residual() {
            self.residual_history = (o.view.round, o.residuals.clone());
        }
        self.cfg.metrics.update(|s| {
            s.rounds_completed += 1;
            s.round = o.view.round + 1;
            s.ring = o.view.members.clone();
            s.round_s = o.round_us as f64 / 1e6;
            s.bytes_sent += o.bytes_sent;
            s.bytes_received += o.bytes_received;
            s.samples_trained += o.samples;
        });
        self.report_refused(&o.view);
        if self.certified.len() > CERTIFIED_HISTORY {
            self.certified.pop_first();
        }
        match &self.cfg.compute {
            Compute::Demo { .. } => {
                // The demonstration has no parameters: the agreed sum stands for them.
                let tally = RoundTally {
                    round: o.view.round,
                    samples: o.own_samples,
                    commit: o.own_commit,
                    param_hash: o.sum_hash,
                };
                if let Some(ledger) = &self.cfg.ledger {
                    ledger.round_completed(tally);
                }
                self.cfg.metrics.trained(crate::metrics::RoundPoint {
                    round: o.view.round,
                    ring_size: o.view.len(),
                    loss: None,
                    accuracy: None,
                    samples_per_s: o.samples as f64 / (o.round_us as f64 / 1e6).max(1e-9),
                    round_s: o.round_us as f64 / 1e6,
                });
                self.membership.set_state(StateTag { round: self.next_round, param_hash: Hash::default() });
            }
            Compute::Train(spec) => {
                let round = o.view.round;
                let last = self.cfg.rounds.is_some_and(|n| round + 1 >= n);
                // Queued now, in round order, before any later round's gradient.
                let applied = spec.worker.apply(self.cfg.fixed.decode(&o.sum));
                let evaluated = (last || (spec.eval_every > 0 && (round + 1).is_multiple_of(spec.eval_every)))
                    .then(|| spec.worker.evaluate());
                let saved = (last || (round + 1).is_multiple_of(spec.epoch_rounds.max(1))).then(|| {
                    let path = spec.checkpoint_dir.join(format!("round-{round}.safetensors"));
                    (path.clone(), spec.worker.save(path, round, self.cursor))
                });
                let _ = self.post_tx.send(PostRound {
                    round,
                    ring_size: o.view.len(),
                    loss: self.loss.take(),
                    ring_samples: o.samples,
                    own_samples: o.own_samples,
                    own_commit: o.own_commit,
                    bytes_sent: o.bytes_sent,
                    round_us: o.round_us,
                    applied,
                    evaluated,
                    saved,
                });
            }
        }
        info!(
            round = o.view.round,
            attempt = o.view.attempt,
            ring_size = o.view.len(),
            // Rings across which the round's groups reduced (1: one ring).
            groups = self.cfg.round.layout(o.view.len()).map_or(1, |l| l.groups()),
            position = o.position,
            members = %o.view.members.join(","),
            len = o.sum.len(),
            bytes_sent = o.bytes_sent,
            bytes_received = o.bytes_received,
            reduce_us = o.reduce_us,
            round_us = o.round_us,
            result_hash = %hex(&o.sum_hash),
            commit = %hex(&o.own_commit),
            audited = o.audited.as_deref().unwrap_or(""),
            audited_also = %o.audited_also.join(","),
            "round complete"
        );
        self.serve_waiting();
        if self.cfg.rounds.is_some_and(|n| o.view.round + 1 >= n) {
            info!(rounds = o.view.round + 1, "all rounds done");
            self.finish_leave();
            return;
        }
        if self.leave == Leave::Requested {
            self.finish_leave();
            return;
        }
        let acts = self.membership.round_completed(&o.view, o.next, now);
        self.on_membership_actions(acts);
    }

    /// A ring failed because a member committed on other parameters: if most peers at this
    /// round state another hash than this peer holds, this peer is the one out of sync, and
    /// fetches their state before it takes part again.
    fn check_own_parameters(&mut self, round: u64) {
        let now = self.now();
        let mine = self.membership.state();
        if mine.round != round {
            return;
        }
        let settled = self.membership.settled_peers(now);
        if let Verdict::Refuted { agree, disagree, of } = self.statements.verdict(round, &mine.param_hash, &settled) {
            warn!(round, agree, disagree, of, "this peer's parameters differ from most peers': fetching theirs");
            let from: Vec<PeerKey> = settled
                .into_iter()
                .filter(|p| self.statements.of(p, round).is_some_and(|h| h != mine.param_hash))
                .collect();
            let acts = self.membership.begin_sync(round, from.clone(), now);
            self.on_membership_actions(acts);
        }
    }

    /// Asked to stop: leave now when idle; otherwise the round under way (or about to start
    /// with a gradient being computed) finishes first, bounded by its own timeouts.
    fn begin_leave(&mut self) {
        if self.leave != Leave::Staying || self.finished {
            return;
        }
        self.leave = Leave::Requested;
        let preparing = self.round.is_none() && self.membership.ring().is_some() && self.sync.is_none();
        if self.round.is_some() || preparing {
            info!(round = self.membership.round(), "stop requested: finishing this round, then leaving");
        } else {
            self.finish_leave();
        }
    }

    /// The pending credit of `(round, attempt)` is durable: this peer's `Done` for it, if the
    /// round got there first, goes out now.
    fn credit_noted(&mut self, round: u64, attempt: u32) {
        if let Some(Some(done)) = self.credit_notes.remove(&(round, attempt)) {
            self.publish(&done);
        }
    }

    /// Announces that this peer leaves and ends the loop.
    fn finish_leave(&mut self) {
        let now = self.now();
        if let Some(r) = self.round.as_mut() {
            let acts = r.abort("this peer is leaving");
            self.round = None;
            for a in acts {
                if let RoundAction::Publish(g) = a {
                    self.publish(&g);
                }
            }
        }
        let acts = self.membership.leave(now);
        for a in acts {
            if let MembershipAction::Publish(g) = a {
                self.publish(&g);
            }
        }
        info!(round = self.next_round, "leaving the run");
        self.finished = true;
    }
}

/// About the bytes a message kept for later holds: its lists and strings, plus its fixed
/// fields.
fn held_bytes(g: &Gossip) -> usize {
    const FIXED: usize = 256;
    let keys = |ks: &[PeerKey]| ks.iter().map(|k| k.len() + 24).sum::<usize>();
    FIXED
        + match g {
            Gossip::Commit(c) => 32 * c.chunk_hashes.len() + keys(&c.joiners) + keys(&c.excluded) + c.signature.len(),
            Gossip::Done(d) => keys(&d.next_members),
            Gossip::Failed(f) => f.reason.len(),
            _ => 0,
        }
}
