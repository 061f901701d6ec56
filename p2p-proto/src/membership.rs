//! Who is in the ring of each round, agreed from gossip with no coordinator.
//!
//! Every peer of a run gossips a heartbeat with its status, the training state
//! it holds ([`StateTag`]) and the peers it keeps out for now. Two ways lead
//! into a ring, and every honest peer computes the same result from the same
//! messages:
//!
//! - **Forming** (the first round, and after a failed round): a peer that is in
//!   no ring collects the live peers that are forming the same `(round,
//!   attempt)`, its *view*, minus the peers most of them keep out, and
//!   announces the view's hash. When every peer of its view announces that same
//!   hash, all of them start the ring made of the view. A peer's first ring in
//!   its process waits for `min_peers` (so a restarted peer does not train alone
//!   before it has seen the others); after that a ring of any size goes on.
//!   Views that disagree simply wait for the next heartbeat; a ring built on a
//!   view that changed at the last moment fails its commit phase and the peers
//!   form again with the next attempt number, after a back-off that grows with
//!   the attempts.
//! - **Joining** a running ring: a peer that sees a ring running asks to join.
//!   Each member lists the joiners it saw in its commit; the next ring is this
//!   ring plus the union of those lists (less the leavers and the joiners a
//!   member keeps out), which every member knows once it holds every commit,
//!   and every member's `Done` carries it, so the joiner learns it too and
//!   starts the next round with the others. A joiner's state is behind: it
//!   fetches the ring's state before it commits (the node does that, see
//!   [`crate::state`]).
//!
//! A peer behind the others (more live peers announce a later round than its
//! own or an earlier one, ties going to the later round) never forms a ring of
//! its own at its old round: it joins the running ring, or, when the others are
//! forming, fetches their state ([`MembershipAction::Sync`]) and forms with
//! them. A peer that leaves says so; the rings it was in fail at once rather
//! than at a timeout, and the next ring goes on without it.
//!
//! **Circuit breakers.** A round that fails names the peers it waited for in
//! vain. A peer named in [`STRIKES_TO_OPEN`] failed rounds in a row is kept out
//! of rings for [`BREAKER_BASE_ROUNDS`] rounds, twice as long each time it
//! happens again (up to [`BREAKER_MAX_ROUNDS`]); a round it completes clears its
//! strikes. One timeout never bans a peer; a message that failed its checks
//! (altered bytes, a replay, a false claim about a segment: faults its receiver
//! sees but cannot prove to others) counts as [`STRIKES_TO_OPEN`] strikes, so
//! every peer that receives one keeps the sender out at once, and the sender is
//! out of rings once most of them did. A peer proven to lie is kept out for
//! good ([`Membership::convict`]). A forming ring leaves out a peer when more
//! than half of its other members keep it out, so every member computes the same
//! ring and no single peer can keep an honest one out.
//!
//! Within a ring, members are ordered by `blake3(run ‖ round ‖ attempt ‖ peer)`,
//! so the neighbours change from round to round and no position is special.

use crate::hash::Hash;
use crate::message::{Gossip, Heartbeat, JoinRequest, PeerKey, PeerStatus, RoundDone, RoundFailed, RunId, StateTag};
use std::collections::{BTreeMap, BTreeSet};

/// A peer silent for this many peer timeouts is forgotten entirely.
const FORGET_AFTER_TIMEOUTS: u64 = 10;
/// Failed rounds in a row that open a peer's circuit breaker.
pub const STRIKES_TO_OPEN: u32 = 3;
/// Rounds a peer is kept out the first time its breaker opens; doubled each time after.
pub const BREAKER_BASE_ROUNDS: u64 = 4;
/// Longest a breaker stays open, in rounds.
pub const BREAKER_MAX_ROUNDS: u64 = 256;
/// Rounds a peer proven to lie is kept out: the rest of any run.
pub const CONVICTION_ROUNDS: u64 = 1 << 40;
/// Back-off before the second attempt of a round; doubled per further attempt.
pub const BACKOFF_BASE_US: u64 = 50_000;
/// Longest back-off between attempts of a round.
pub const BACKOFF_MAX_US: u64 = 2_000_000;
/// Heartbeat intervals a peer listens before it decides that it is behind the others.
const LISTEN_HEARTBEATS: u64 = 2;

/// Timing and size rules of membership.
#[derive(Debug, Clone)]
pub struct MembershipConfig {
    /// How often a peer gossips its heartbeat.
    pub heartbeat_us: u64,
    /// A peer not heard from for this long is taken as gone.
    pub peer_timeout_us: u64,
    /// Peers to wait for before this peer's first ring (later rings go on with any).
    pub min_peers: usize,
    /// Largest ring; further joiners wait for a later round.
    pub max_peers: usize,
    /// Samples this peer contributes per round, announced in its heartbeats and joins.
    pub batch: u32,
}

/// The ordered members of one attempt of one round.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RingView {
    pub round: u64,
    pub attempt: u32,
    pub members: Vec<PeerKey>,
}

impl RingView {
    /// Orders `members` for `(round, attempt)` of `run`; duplicates are dropped.
    pub fn order(run: RunId, round: u64, attempt: u32, members: impl IntoIterator<Item = PeerKey>) -> Self {
        let set: BTreeSet<PeerKey> = members.into_iter().collect();
        let mut keyed: Vec<(Hash, PeerKey)> = set
            .into_iter()
            .map(|p| {
                let mut h = blake3::Hasher::new();
                h.update(&run.0);
                h.update(&round.to_le_bytes());
                h.update(&attempt.to_le_bytes());
                h.update(p.as_bytes());
                (*h.finalize().as_bytes(), p)
            })
            .collect();
        keyed.sort();
        Self { round, attempt, members: keyed.into_iter().map(|(_, p)| p).collect() }
    }

    /// Hash of the ordered ring, carried in commits and heartbeats.
    pub fn hash(&self, run: RunId) -> Hash {
        let mut h = blake3::Hasher::new();
        h.update(b"dtrain/ring/v1");
        h.update(&run.0);
        h.update(&self.round.to_le_bytes());
        h.update(&self.attempt.to_le_bytes());
        for m in &self.members {
            h.update(&(m.len() as u32).to_le_bytes());
            h.update(m.as_bytes());
        }
        *h.finalize().as_bytes()
    }

    pub fn position(&self, peer: &str) -> Option<usize> {
        self.members.iter().position(|m| m == peer)
    }

    pub fn len(&self) -> usize {
        self.members.len()
    }

    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// The member after `pos` (where `pos` sends ring traffic).
    pub fn right_of(&self, pos: usize) -> &PeerKey {
        &self.members[(pos + 1) % self.members.len()]
    }

    /// The member before `pos` (where `pos` receives ring traffic from).
    pub fn left_of(&self, pos: usize) -> &PeerKey {
        &self.members[(pos + self.members.len() - 1) % self.members.len()]
    }
}

/// Hash of an unordered set of peers (a forming view).
pub fn view_hash(run: RunId, round: u64, attempt: u32, set: &BTreeSet<PeerKey>) -> Hash {
    RingView::order(run, round, attempt, set.iter().cloned()).hash(run)
}

/// What membership asks the node to do.
// Actions live for one call; most are `Publish`, so boxing the gossip would only add allocations.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum MembershipAction {
    /// Gossip this message on the run's topic.
    Publish(Gossip),
    /// Run this round with this ring.
    Start(RingView),
    /// This peer is behind: fetch the training state for `round` from one of `from` (peers
    /// holding it), then call [`Membership::synced`] (or [`Membership::sync_failed`]).
    Sync { round: u64, from: Vec<PeerKey> },
}

#[derive(Debug, Clone, PartialEq)]
enum Phase {
    Forming {
        round: u64,
        attempt: u32,
    },
    Running(RingView),
    /// Fetching the state for `round`; `back` is the round to form again if that fails.
    Syncing {
        round: u64,
        back: u64,
    },
    Leaving,
}

#[derive(Debug, Clone)]
struct Seen {
    at: u64,
    status: Option<PeerStatus>,
    excluded: Vec<PeerKey>,
    /// Its connection closed: taken as gone until a newer heartbeat of it arrives (messages
    /// it sent before, still relayed by others, do not count).
    disconnected: bool,
    /// The sequence number of its last heartbeat.
    seq: u64,
}

/// The circuit breaker this peer keeps for another.
#[derive(Debug, Clone, Default)]
struct Breaker {
    /// Failed rounds in a row that named the peer.
    strikes: u32,
    /// Times the breaker opened.
    opens: u32,
    /// Kept out of rings before this round.
    open_until: u64,
}

/// One peer's membership state machine.
#[derive(Debug)]
pub struct Membership {
    run: RunId,
    me: PeerKey,
    cfg: MembershipConfig,
    peers: BTreeMap<PeerKey, Seen>,
    joins: BTreeMap<PeerKey, u64>,
    breakers: BTreeMap<PeerKey, Breaker>,
    phase: Phase,
    state: StateTag,
    /// In a ring, but still fetching the state for it (a joiner).
    fetching: bool,
    rings_entered: u64,
    /// No ring is entered before this time (back-off after failed attempts).
    not_before: u64,
    /// When this peer first ticked: it listens for a while before it decides it is behind.
    first_tick: Option<u64>,
    /// The members of the ring that just failed, and until when to wait for them to say
    /// they form again, rather than forming without them on a stale view.
    settling: Option<(Vec<PeerKey>, u64)>,
    seq: u64,
    last_heartbeat: Option<u64>,
    last_join: Option<u64>,
    last_view: Option<Hash>,
}

impl Membership {
    pub fn new(run: RunId, me: PeerKey, cfg: MembershipConfig) -> Self {
        Self::resume(run, me, cfg, StateTag::default())
    }

    /// A peer that holds `state` already (restored from a local checkpoint): it forms for
    /// `state.round`.
    pub fn resume(run: RunId, me: PeerKey, cfg: MembershipConfig, state: StateTag) -> Self {
        Self {
            run,
            me,
            cfg,
            peers: BTreeMap::new(),
            joins: BTreeMap::new(),
            breakers: BTreeMap::new(),
            phase: Phase::Forming { round: state.round, attempt: 0 },
            state,
            fetching: false,
            rings_entered: 0,
            not_before: 0,
            first_tick: None,
            settling: None,
            seq: 0,
            last_heartbeat: None,
            last_join: None,
            last_view: None,
        }
    }

    fn alive(&self, seen: &Seen, now: u64) -> bool {
        !seen.disconnected && now.saturating_sub(seen.at) < self.cfg.peer_timeout_us
    }

    /// Any message from `peer` shows it is alive (unless its connection closed since: then only
    /// a newer heartbeat does).
    pub fn observe(&mut self, peer: &str, now: u64) {
        if peer == self.me {
            return;
        }
        let seen = self.peers.entry(peer.to_owned()).or_insert(Seen {
            at: now,
            status: None,
            excluded: Vec::new(),
            disconnected: false,
            seq: 0,
        });
        seen.at = now;
    }

    /// The connection to `peer` closed: take it as gone until it is heard from again.
    pub fn on_disconnect(&mut self, peer: &str) {
        if let Some(seen) = self.peers.get_mut(peer) {
            seen.disconnected = true;
        }
    }

    pub fn on_heartbeat(&mut self, hb: &Heartbeat, now: u64) {
        if hb.peer == self.me || hb.run != self.run {
            return;
        }
        // After its connection closed, only a heartbeat it sent since proves it alive: a newer
        // one, or the first of a new process.
        if let Some(seen) = self.peers.get(&hb.peer)
            && seen.disconnected
            && hb.seq <= seen.seq
            && hb.seq != 1
        {
            return;
        }
        self.peers.insert(
            hb.peer.clone(),
            Seen {
                at: now,
                status: Some(hb.status.clone()),
                excluded: hb.excluded.clone(),
                disconnected: false,
                seq: hb.seq,
            },
        );
        if hb.status == PeerStatus::Leaving {
            self.joins.remove(&hb.peer);
        }
    }

    pub fn on_join(&mut self, j: &JoinRequest, now: u64) {
        if j.peer == self.me || j.run != self.run {
            return;
        }
        self.observe(&j.peer, now);
        self.joins.insert(j.peer.clone(), now);
    }

    /// A `Done` of a ring this peer is not in: if it names this peer in the next
    /// ring, this peer joins that ring.
    pub fn on_done(&mut self, d: &RoundDone, now: u64) -> Vec<MembershipAction> {
        self.observe(&d.peer, now);
        let Phase::Forming { round, .. } = self.phase else { return Vec::new() };
        // A round past the last one counts nothing (its successor does not exist).
        let Some(next) = d.round.checked_add(1) else { return Vec::new() };
        // A next ring is this ring and its joiners: two peers at least. A `Done` naming this
        // peer alone (or it twice) would have it train a ring of one, a fork of the run.
        if d.run != self.run || next < round || !d.next_members.contains(&self.me) {
            return Vec::new();
        }
        let view = RingView::order(self.run, next, 0, d.next_members.iter().cloned());
        if view.len() < 2 {
            return Vec::new();
        }
        self.enter(view, now)
    }

    fn enter(&mut self, view: RingView, now: u64) -> Vec<MembershipAction> {
        self.phase = Phase::Running(view.clone());
        self.settling = None;
        self.rings_entered += 1;
        self.last_view = None;
        let mut out = vec![self.heartbeat(now)];
        out.push(MembershipAction::Start(view));
        out
    }

    fn status(&self) -> PeerStatus {
        match &self.phase {
            Phase::Forming { round, attempt } => {
                PeerStatus::Forming { round: *round, attempt: *attempt, view: self.last_view.unwrap_or_default() }
            }
            Phase::Running(v) if self.fetching => PeerStatus::Syncing { round: v.round },
            Phase::Running(v) => PeerStatus::Running { round: v.round, attempt: v.attempt, ring: v.hash(self.run) },
            Phase::Syncing { round, .. } => PeerStatus::Syncing { round: *round },
            Phase::Leaving => PeerStatus::Leaving,
        }
    }

    fn heartbeat(&mut self, now: u64) -> MembershipAction {
        self.seq += 1;
        self.last_heartbeat = Some(now);
        let round = self.round();
        MembershipAction::Publish(Gossip::Heartbeat(Heartbeat {
            run: self.run,
            peer: self.me.clone(),
            seq: self.seq,
            status: self.status(),
            batch: self.cfg.batch,
            state: self.state,
            excluded: self.excluded(round),
        }))
    }

    /// The round this peer is at: the one it forms, runs or fetches.
    pub fn round(&self) -> u64 {
        match &self.phase {
            Phase::Forming { round, .. } | Phase::Syncing { round, .. } => *round,
            Phase::Running(v) => v.round,
            Phase::Leaving => self.state.round,
        }
    }

    /// The ring this peer is in, if any.
    pub fn ring(&self) -> Option<&RingView> {
        match &self.phase {
            Phase::Running(v) => Some(v),
            _ => None,
        }
    }

    /// The training state this peer announces.
    pub fn state(&self) -> StateTag {
        self.state
    }

    /// This peer now holds `state` (it applied a round, or restored a fetched state).
    pub fn set_state(&mut self, state: StateTag) {
        self.state = state;
    }

    /// In a ring, this peer is (or is no longer) fetching the ring's state first; its
    /// heartbeats say so, and joiners do not count it when they judge a state.
    pub fn set_fetching(&mut self, fetching: bool, now: u64) -> Vec<MembershipAction> {
        if self.fetching == fetching {
            return Vec::new();
        }
        self.fetching = fetching;
        vec![self.heartbeat(now)]
    }

    /// This peer's state turned out to differ from the others' (or it is otherwise behind):
    /// fetch the state for `round` from `from` before forming again.
    pub fn begin_sync(&mut self, round: u64, from: Vec<PeerKey>, now: u64) -> Vec<MembershipAction> {
        if matches!(self.phase, Phase::Leaving | Phase::Syncing { .. }) {
            return Vec::new();
        }
        let back = self.round();
        self.phase = Phase::Syncing { round, back };
        self.fetching = false;
        vec![self.heartbeat(now), MembershipAction::Sync { round, from }]
    }

    /// The state for `round` was fetched and restored: form with the peers at that round.
    pub fn synced(&mut self, round: u64, now: u64) -> Vec<MembershipAction> {
        if !matches!(self.phase, Phase::Syncing { .. }) {
            return Vec::new();
        }
        self.phase = Phase::Forming { round, attempt: 0 };
        self.last_view = None;
        vec![self.heartbeat(now)]
    }

    /// Forms again at `round` (this peer's own), after a back-off: it was in a ring it could
    /// not take part in (it could not fetch the ring's state, or the ring was for a round it
    /// had done).
    pub fn form_at(&mut self, round: u64, now: u64) {
        if self.phase == Phase::Leaving {
            return;
        }
        self.phase = Phase::Forming { round, attempt: 0 };
        self.fetching = false;
        self.last_view = None;
        self.not_before = now + BACKOFF_MAX_US;
    }

    /// Fetching the state failed: form again at the old round, and try later.
    pub fn sync_failed(&mut self, now: u64) {
        if let Phase::Syncing { back, .. } = self.phase {
            self.phase = Phase::Forming { round: back, attempt: 0 };
            self.last_view = None;
            self.not_before = now + BACKOFF_MAX_US;
        }
    }

    /// This peer leaves the run: it announces it and forms no more rings.
    pub fn leave(&mut self, now: u64) -> Vec<MembershipAction> {
        if self.phase == Phase::Leaving {
            return Vec::new();
        }
        self.phase = Phase::Leaving;
        vec![self.heartbeat(now)]
    }

    /// `peer` was proven to lie (this peer checked the evidence itself): it is kept out of
    /// rings for the rest of the run.
    pub fn convict(&mut self, peer: &str, round: u64) {
        if peer == self.me {
            return;
        }
        let b = self.breakers.entry(peer.to_owned()).or_default();
        b.open_until = b.open_until.max(round.saturating_add(CONVICTION_ROUNDS));
        b.opens += 1;
        self.joins.remove(peer);
    }

    /// Peers this one keeps out of rings at `round` (their breakers are open).
    pub fn excluded(&self, round: u64) -> Vec<PeerKey> {
        self.breakers.iter().filter(|(_, b)| b.open_until > round).map(|(p, _)| p.clone()).collect()
    }

    /// Live peers that asked to join, are not in this peer's ring and are not kept out.
    pub fn joiners(&self, now: u64) -> Vec<PeerKey> {
        let ring = self.ring();
        let out = self.excluded(self.round());
        // No more than the next ring has room for: a commit names them all, and made-up
        // identities asking to join in numbers would otherwise grow every commit past what
        // gossip carries.
        let room = self.cfg.max_peers.saturating_sub(ring.map_or(0, RingView::len));
        self.joins
            .iter()
            .filter(|(p, at)| {
                now.saturating_sub(**at) < self.cfg.peer_timeout_us
                    && self.peers.get(*p).is_some_and(|s| self.alive(s, now))
                    && !ring.is_some_and(|r| r.members.contains(p))
                    && !out.contains(p)
            })
            .map(|(p, _)| p.clone())
            .take(room)
            .collect()
    }

    /// Members of this peer's ring that have not been heard from in time, whose connection
    /// closed, or that announced they are leaving.
    pub fn dead_members(&self, now: u64) -> Vec<PeerKey> {
        let Some(ring) = self.ring() else { return Vec::new() };
        ring.members
            .iter()
            .filter(|m| {
                **m != self.me
                    && !self.peers.get(*m).is_some_and(|s| self.alive(s, now) && s.status != Some(PeerStatus::Leaving))
            })
            .cloned()
            .collect()
    }

    /// Whether this peer still knows `peer` (peers silent for long are forgotten).
    pub fn knows(&self, peer: &str) -> bool {
        self.peers.contains_key(peer)
    }

    /// Every peer this one knows, for people watching: its state (training, forming, syncing,
    /// joining, leaving, gone, or kept out of rings at `round`) and how long ago it was heard
    /// from, in microseconds.
    pub fn peer_rows(&self, now: u64, round: u64) -> Vec<(PeerKey, &'static str, u64)> {
        let mut rows: Vec<(PeerKey, &'static str, u64)> = self
            .peers
            .iter()
            .map(|(p, s)| {
                let state = if !self.alive(s, now) {
                    "gone"
                } else if self.breakers.get(p).is_some_and(|b| b.open_until > round) {
                    "kept out"
                } else {
                    match s.status {
                        Some(PeerStatus::Running { .. }) => "training",
                        Some(PeerStatus::Forming { .. }) => "forming",
                        Some(PeerStatus::Syncing { .. }) => "syncing",
                        Some(PeerStatus::Leaving) => "leaving",
                        None => "joining",
                    }
                };
                (p.clone(), state, now.saturating_sub(s.at))
            })
            .collect();
        rows.sort();
        rows
    }

    /// Live peers this one knows, itself excluded.
    pub fn live_peers(&self, now: u64) -> usize {
        self.peers.values().filter(|s| self.alive(s, now)).count()
    }

    /// Live peers, this one excluded, that hold a state of their own: not fetching one, not
    /// leaving. A fetched state is judged by their statements.
    pub fn settled_peers(&self, now: u64) -> BTreeSet<PeerKey> {
        self.peers
            .iter()
            .filter(|(_, s)| {
                self.alive(s, now) && !matches!(s.status, Some(PeerStatus::Syncing { .. } | PeerStatus::Leaving))
            })
            .map(|(p, _)| p.clone())
            .collect()
    }

    /// The round `done` completed: its members proved themselves (their strikes are cleared).
    /// Moves on to the next ring, unless most live peers are at a later round than that ring:
    /// then this peer forms instead, and catches up with them.
    pub fn round_completed(&mut self, done: &RingView, next: RingView, now: u64) -> Vec<MembershipAction> {
        for m in &done.members {
            if let Some(b) = self.breakers.get_mut(m) {
                b.strikes = 0;
            }
        }
        for m in &next.members {
            self.joins.remove(m);
        }
        if self.ahead(next.round, now).is_some() && next.members.contains(&self.me) {
            // The next ring would wait for this peer's commit: tell it not to.
            let failed = Gossip::Failed(RoundFailed {
                run: self.run,
                peer: self.me.clone(),
                round: next.round,
                attempt: next.attempt,
                reason: "most live peers are at a later round: catching up with them".into(),
            });
            self.phase = Phase::Forming { round: next.round, attempt: 0 };
            self.last_view = None;
            return vec![self.heartbeat(now), MembershipAction::Publish(failed)];
        }
        if !next.members.contains(&self.me) {
            // This peer is leaving: the next ring goes on without it.
            self.phase = Phase::Forming { round: next.round, attempt: 0 };
            return Vec::new();
        }
        self.enter(next, now)
    }

    /// The round failed, waiting in vain for `blame` (none when it failed for another
    /// reason): form again for the same round with the next attempt, after a back-off.
    pub fn round_failed(&mut self, now: u64, blame: &[PeerKey]) -> Vec<PeerKey> {
        self.round_failed_with(now, blame, 1)
    }

    /// As [`Self::round_failed`], each blamed peer taking `strikes` strikes.
    pub fn round_failed_with(&mut self, now: u64, blame: &[PeerKey], strikes: u32) -> Vec<PeerKey> {
        let mut opened = Vec::new();
        if let Phase::Running(v) = &self.phase {
            let (round, attempt) = (v.round, v.attempt.saturating_add(1));
            for p in blame.iter().filter(|p| **p != self.me) {
                let b = self.breakers.entry(p.clone()).or_default();
                b.strikes += strikes;
                if b.strikes >= STRIKES_TO_OPEN {
                    let rounds = (BREAKER_BASE_ROUNDS << b.opens.min(16)).min(BREAKER_MAX_ROUNDS);
                    b.open_until = round + rounds;
                    b.opens += 1;
                    b.strikes = 0;
                    opened.push(p.clone());
                }
            }
            self.settling = Some((v.members.clone(), now + self.cfg.peer_timeout_us));
            self.phase = Phase::Forming { round, attempt };
            self.fetching = false;
            self.last_view = None;
            self.last_heartbeat = None;
            self.not_before = now + backoff_us(attempt);
        }
        opened
    }

    /// Heartbeats, join requests and ring formation; call it every few tens of ms.
    pub fn tick(&mut self, now: u64) -> Vec<MembershipAction> {
        // Forget peers long gone, so a stream of short-lived identities cannot
        // grow the table without bound.
        let forget = self.cfg.peer_timeout_us.saturating_mul(FORGET_AFTER_TIMEOUTS);
        self.peers.retain(|_, s| now.saturating_sub(s.at) < forget);
        self.joins.retain(|_, at| now.saturating_sub(*at) < forget);
        let round = self.round();
        self.breakers.retain(|p, b| b.open_until > round || b.strikes > 0 || self.peers.contains_key(p));
        let mut out = Vec::new();
        self.first_tick.get_or_insert(now);
        if let Phase::Forming { round, attempt } = self.phase {
            out.extend(self.form(round, attempt, now));
        }
        let due = self.last_heartbeat.is_none_or(|t| now.saturating_sub(t) >= self.cfg.heartbeat_us);
        if due && !out.iter().any(|a| matches!(a, MembershipAction::Publish(Gossip::Heartbeat(_)))) {
            out.push(self.heartbeat(now));
        }
        out
    }

    /// The live peers at a later round than `round` (forming or running one), when they
    /// outnumber the live peers at `round` or earlier (this one included; ties go to the later
    /// round): the later round to catch up with (a running ring first, else the round most of
    /// them form), whether a ring runs it, and who is forming it.
    fn ahead(&self, round: u64, now: u64) -> Option<(u64, bool, Vec<PeerKey>)> {
        let mut later: BTreeMap<u64, (usize, bool, Vec<PeerKey>)> = BTreeMap::new();
        let (mut ahead, mut here) = (0usize, 1usize);
        for (p, s) in self.peers.iter().filter(|(_, s)| self.alive(s, now)) {
            let (r, running) = match &s.status {
                Some(PeerStatus::Forming { round, .. }) => (*round, false),
                Some(PeerStatus::Running { round, .. }) => (*round, true),
                _ => continue,
            };
            if r > round {
                let e = later.entry(r).or_default();
                e.0 += 1;
                e.1 |= running;
                if !running {
                    e.2.push(p.clone());
                }
                ahead += 1;
            } else {
                here += 1;
            }
        }
        if ahead == 0 || ahead < here {
            return None;
        }
        let (r, (_, running, forming)) = later.into_iter().max_by_key(|(r, (n, running, _))| (*running, *n, *r))?;
        Some((r, running, forming))
    }

    fn form(&mut self, round: u64, mut attempt: u32, now: u64) -> Vec<MembershipAction> {
        let mut out = Vec::new();
        // Behind most peers: catch up rather than form at an old round.
        if let Some((target, running, from)) = self.ahead(round, now) {
            // Decide only after hearing every peer's heartbeat at least once: one peer claiming a
            // later round must not pull a peer that has not heard the others yet.
            let listened =
                self.first_tick.is_some_and(|t| now.saturating_sub(t) >= LISTEN_HEARTBEATS * self.cfg.heartbeat_us);
            if running {
                out.extend(self.ask_to_join(round, now));
            } else if now >= self.not_before && listened {
                self.phase = Phase::Syncing { round: target, back: round };
                out.push(self.heartbeat(now));
                out.push(MembershipAction::Sync { round: target, from });
            }
            return out;
        }
        let live: Vec<(&PeerKey, &Seen)> = self.peers.iter().filter(|(_, s)| self.alive(s, now)).collect();
        // Adopt the furthest attempt that live peers are forming for this round.
        for (_, s) in &live {
            if let Some(PeerStatus::Forming { round: r, attempt: a, .. }) = &s.status
                && *r == round
                && *a > attempt
            {
                attempt = *a;
            }
        }
        self.phase = Phase::Forming { round, attempt };
        // The view: this peer and the live peers forming, or already running,
        // the same (round, attempt), less every peer one of them keeps out.
        let same = |st: &Option<PeerStatus>| match st {
            Some(
                PeerStatus::Forming { round: r, attempt: a, .. } | PeerStatus::Running { round: r, attempt: a, .. },
            ) => (*r, *a) == (round, attempt),
            _ => false,
        };
        let mut view: BTreeSet<PeerKey> =
            live.iter().filter(|(_, s)| same(&s.status)).map(|(p, _)| (*p).clone()).collect();
        view.insert(self.me.clone());
        // Nobody else forms this attempt, yet live peers form or run this round or a later one:
        // they train without this peer (it is kept out, or about to catch up). A ring of one
        // would only fork the run; this peer waits to join or catch up instead. (A peer alone
        // because the others are gone, or because it keeps all of them out, still goes on.)
        let left_alone = view.len() == 1
            && live.iter().any(|(p, s)| {
                **p != self.me
                    && matches!(&s.status, Some(PeerStatus::Forming { round: r, .. } | PeerStatus::Running { round: r, .. }) if *r >= round)
            });
        // A peer is kept out when more than half of the view's other members keep it out: no
        // single peer can keep an honest one out of the ring.
        let mut votes: BTreeMap<&PeerKey, usize> = BTreeMap::new();
        let mine = self.excluded(round);
        let lists = live
            .iter()
            .filter(|(p, _)| view.contains(*p))
            .map(|(p, s)| (*p, &s.excluded))
            .chain(std::iter::once((&self.me, &mine)));
        for (voter, list) in lists {
            for p in list.iter().filter(|p| *p != voter && view.contains(*p)) {
                *votes.entry(p).or_default() += 1;
            }
        }
        let others = view.len().saturating_sub(1);
        let out_of_ring: BTreeSet<PeerKey> =
            votes.into_iter().filter(|(_, v)| 2 * v > others).map(|(p, _)| p.clone()).collect();
        view.retain(|p| !out_of_ring.contains(p));
        let ring = RingView::order(self.run, round, attempt, view.iter().cloned());
        let ring = RingView { members: ring.members.into_iter().take(self.cfg.max_peers.max(1)).collect(), ..ring };
        let ring_hash = ring.hash(self.run);
        // A live ring other than the one this view makes is running this round or a later
        // one: ask to join it. Past the first ring of a run meant for several peers a ring has
        // two members at least, so it counts once two peers not kept out say they run it: one
        // peer announcing a ring that does not exist would otherwise keep every peer asking to
        // join it, and no ring would ever form. (A run of `min_peers` 1 may run a ring of one.)
        let mut elsewhere: BTreeMap<(u64, u32, Hash), usize> = BTreeMap::new();
        for (p, s) in &live {
            if let Some(PeerStatus::Running { round: r, attempt: a, ring }) = &s.status
                && *r >= round
                && (*r, *a, *ring) != (round, attempt, ring_hash)
                && self.breakers.get(*p).is_none_or(|b| b.open_until <= round)
            {
                *elsewhere.entry((*r, *a, *ring)).or_default() += 1;
            }
        }
        let reporters = if self.cfg.min_peers <= 1 { 1 } else { 2 };
        let running_elsewhere = elsewhere.values().any(|n| *n >= reporters);
        if running_elsewhere {
            return self.ask_to_join(round, now);
        }
        let vh = ring.hash(self.run);
        if self.last_view != Some(vh) {
            self.last_view = Some(vh);
            out.push(self.heartbeat(now));
        }
        // The first ring waits for `min_peers`; later ones go on with fewer, but a run meant for
        // several peers never continues as a ring of one: a peer alone (the others gone, or not
        // heard, or keeping it out) would train a fork of the run and be credited for it.
        let needed = if self.rings_entered == 0 { self.cfg.min_peers.max(1) } else { self.cfg.min_peers.clamp(1, 2) };
        // Members of the ring that just failed, alive and still running it: they are about to
        // form again; a view without them would be stale.
        let settling = self.settling.as_ref().is_some_and(|(members, until)| {
            now < *until
                && members.iter().any(|m| {
                    self.peers.get(m).is_some_and(|s| {
                        self.alive(s, now)
                            && matches!(&s.status, Some(PeerStatus::Running { round: r, attempt: a, .. })
                                if (*r, *a) < (round, attempt))
                    })
                })
        });
        let agreed = ring.members.iter().filter(|p| **p != self.me).all(|p| match &self.peers[p].status {
            Some(PeerStatus::Forming { view, .. }) => *view == vh,
            Some(PeerStatus::Running { ring, .. }) => *ring == ring_hash,
            _ => false,
        });
        if ring.len() >= needed
            && agreed
            && !settling
            && !left_alone
            && ring.members.contains(&self.me)
            && now >= self.not_before
        {
            out.extend(self.enter(ring, now));
        }
        out
    }

    fn ask_to_join(&mut self, round: u64, now: u64) -> Vec<MembershipAction> {
        if self.last_join.is_some_and(|t| now.saturating_sub(t) < self.cfg.heartbeat_us) {
            return Vec::new();
        }
        self.last_join = Some(now);
        vec![MembershipAction::Publish(Gossip::Join(JoinRequest {
            run: self.run,
            peer: self.me.clone(),
            round,
            batch: self.cfg.batch,
        }))]
    }
}

/// The wait before attempt `attempt` of a round (no wait before the first).
pub fn backoff_us(attempt: u32) -> u64 {
    if attempt == 0 { 0 } else { (BACKOFF_BASE_US << (attempt - 1).min(16)).min(BACKOFF_MAX_US) }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1000;

    fn cfg(min_peers: usize) -> MembershipConfig {
        MembershipConfig { heartbeat_us: 200 * MS, peer_timeout_us: 1000 * MS, min_peers, max_peers: 64, batch: 1 }
    }

    /// What each peer was asked to do.
    #[derive(Debug, Default, Clone)]
    struct Asked {
        started: Vec<RingView>,
        syncs: Vec<(u64, Vec<PeerKey>)>,
    }

    /// Delivers every published message to every other peer (a perfect gossip
    /// layer) and returns, per peer, the rings it started and the syncs it asked for.
    fn simulate(peers: &mut [Membership], alive: &[bool], steps: u64, start: u64) -> Vec<Asked> {
        let mut asked = vec![Asked::default(); peers.len()];
        for t in 0..steps {
            let now = start + t * 50 * MS;
            let mut msgs = Vec::new();
            for (i, p) in peers.iter_mut().enumerate() {
                if !alive[i] {
                    continue;
                }
                for a in p.tick(now) {
                    match a {
                        MembershipAction::Publish(g) => msgs.push(g),
                        MembershipAction::Start(v) => asked[i].started.push(v),
                        MembershipAction::Sync { round, from } => asked[i].syncs.push((round, from)),
                    }
                }
            }
            for g in msgs {
                for (i, p) in peers.iter_mut().enumerate() {
                    if !alive[i] {
                        continue;
                    }
                    match &g {
                        Gossip::Heartbeat(h) => p.on_heartbeat(h, now),
                        Gossip::Join(j) => p.on_join(j, now),
                        _ => {}
                    }
                }
            }
        }
        asked
    }

    fn names(n: usize) -> Vec<PeerKey> {
        (0..n).map(|i| format!("peer-{i}")).collect()
    }

    fn peers(n: usize, min: usize) -> Vec<Membership> {
        let run = RunId::from_name("m");
        names(n).into_iter().map(|p| Membership::new(run, p, cfg(min))).collect()
    }

    #[test]
    fn all_peers_agree_on_the_first_ring() {
        for n in 1..10 {
            let mut ps = peers(n, n);
            let asked = simulate(&mut ps, &vec![true; n], 40, 0);
            let first: Vec<&RingView> = asked.iter().map(|s| &s.started[0]).collect();
            assert!(first.iter().all(|v| *v == first[0]), "{first:?}");
            assert_eq!(first[0].len(), n);
            assert_eq!((first[0].round, first[0].attempt), (0, 0));
        }
    }

    #[test]
    fn waits_for_min_peers_before_the_first_round() {
        let mut ps = peers(3, 4);
        let asked = simulate(&mut ps, &[true; 3], 40, 0);
        assert!(asked.iter().all(|a| a.started.is_empty()));
    }

    /// Peers 0..n start ring `round` together and complete it.
    fn complete_round(ps: &mut [Membership], who: &[usize], round: u64, now: u64) -> RingView {
        let run = RunId::from_name("m");
        let members: Vec<PeerKey> = who.iter().map(|i| ps[*i].me.clone()).collect();
        let done = RingView::order(run, round, 0, members.clone());
        let next = RingView::order(run, round + 1, 0, members);
        for i in who {
            ps[*i].phase = Phase::Running(done.clone());
            ps[*i].rings_entered += 1;
            ps[*i].round_completed(&done, next.clone(), now);
            ps[*i].set_state(StateTag { round: round + 1, param_hash: [round as u8 + 1; 32] });
        }
        next
    }

    #[test]
    fn survivors_reform_without_a_dead_peer_after_a_back_off() {
        let mut ps = peers(4, 4);
        let asked = simulate(&mut ps, &[true; 4], 20, 0);
        let ring = asked[0].started[0].clone();
        // Peer 2 dies; the others fail the round, naming it, and form again.
        let failed_at = 20 * 50 * MS;
        for (i, p) in ps.iter_mut().enumerate() {
            if i != 2 {
                assert!(p.round_failed(failed_at, &["peer-2".to_string()]).is_empty(), "one strike opens nothing");
            }
        }
        let alive = [true, true, false, true];
        let again = simulate(&mut ps, &alive, 60, failed_at + 50 * MS);
        let views: Vec<&RingView> = [0, 1, 3].iter().map(|&i| again[i].started.last().unwrap()).collect();
        assert!(views.iter().all(|v| *v == views[0]));
        assert_eq!(views[0].round, ring.round);
        assert_eq!(views[0].attempt, 1);
        assert_eq!(views[0].len(), 3);
        assert!(!views[0].members.contains(&"peer-2".to_string()));
        assert_eq!(backoff_us(1), BACKOFF_BASE_US);
        assert_eq!(backoff_us(40), BACKOFF_MAX_US);
    }

    #[test]
    fn a_peer_failing_rounds_in_a_row_is_kept_out_for_a_growing_number_of_rounds() {
        let mut ps = peers(3, 3);
        simulate(&mut ps, &[true; 3], 20, 0);
        let flaky = "peer-2".to_string();
        let now = 20 * 50 * MS;
        // Strikes 1 and 2: nothing opens; a completed round in between clears them.
        for p in ps.iter_mut().take(2) {
            p.round_failed(now, std::slice::from_ref(&flaky));
        }
        complete_round(&mut ps, &[0, 1, 2], 0, now);
        assert_eq!(ps[0].breakers[&flaky].strikes, 0, "a completed round clears the strikes");
        for strike in 1..=STRIKES_TO_OPEN {
            for (i, p) in ps.iter_mut().enumerate() {
                p.phase = Phase::Running(RingView::order(p.run, 1, strike - 1, names(3)));
                if i == 2 {
                    // The flaky peer's attempts fail too, for reasons that name nobody.
                    p.round_failed(now, &[]);
                    continue;
                }
                let opened = p.round_failed(now, std::slice::from_ref(&flaky));
                assert_eq!(opened.is_empty(), strike < STRIKES_TO_OPEN, "strike {strike}");
            }
        }
        assert_eq!(ps[0].excluded(1), vec![flaky.clone()]);
        assert_eq!(ps[0].excluded(1 + BREAKER_BASE_ROUNDS), Vec::<PeerKey>::new(), "open for a few rounds only");
        // The others form without it; the flaky peer, seeing itself kept out, does not enter.
        let asked = simulate(&mut ps, &[true; 3], 40, now);
        let ring = asked[0].started.last().expect("the others form").clone();
        assert_eq!(ring.members.len(), 2, "{asked:?}");
        assert!(!ring.members.contains(&flaky));
        assert!(asked[2].started.is_empty(), "the excluded peer stays out");
        assert!(!ps[0].joiners(now).contains(&flaky));
        // The second time it opens, it stays open twice as long.
        for strike in 0..STRIKES_TO_OPEN {
            ps[0].phase = Phase::Running(RingView::order(ps[0].run, 10, strike, names(3)));
            ps[0].round_failed(now, std::slice::from_ref(&flaky));
        }
        assert!(ps[0].excluded(10 + 2 * BREAKER_BASE_ROUNDS - 1).contains(&flaky));
        assert!(!ps[0].excluded(10 + 2 * BREAKER_BASE_ROUNDS).contains(&flaky));
    }

    #[test]
    fn a_bad_message_opens_the_breaker_at_once_but_only_where_it_was_seen() {
        let mut ps = peers(3, 3);
        simulate(&mut ps, &[true; 3], 20, 0);
        let liar = "peer-2".to_string();
        let now = 20 * 50 * MS;
        ps[0].phase = Phase::Running(RingView::order(ps[0].run, 1, 0, names(3)));
        assert_eq!(ps[0].round_failed_with(now, std::slice::from_ref(&liar), STRIKES_TO_OPEN), vec![liar.clone()]);
        assert_eq!(ps[0].excluded(1), vec![liar.clone()]);
        // Peer 1 saw nothing: one peer's word keeps nobody out of its rings.
        assert!(ps[1].excluded(1).is_empty());
    }

    /// Three peers (run "m", min 3) that heard the peer "liar" state `status` and `state`.
    fn told_by_a_liar(status: PeerStatus, state: StateTag) -> Vec<Membership> {
        let run = RunId::from_name("m");
        let liar = Heartbeat { run, peer: "liar".into(), seq: 1, status, batch: 1, state, excluded: Vec::new() };
        let mut ps = peers(3, 3);
        for p in &mut ps {
            p.on_heartbeat(&liar, 0);
        }
        ps
    }

    /// One peer saying it runs a ring that does not exist keeps nobody from forming one: a
    /// ring counts once two peers say they run it.
    #[test]
    fn one_peer_announcing_a_ring_that_does_not_exist_does_not_stop_the_others() {
        let mut ps = told_by_a_liar(
            PeerStatus::Running { round: 0, attempt: 9, ring: [7; 32] },
            StateTag { round: 0, param_hash: [0; 32] },
        );
        let started = simulate(&mut ps, &[true; 3], 20, 0);
        assert!(
            started.iter().all(|s| s.started.len() == 1 && s.started[0].members.len() == 3),
            "the three formed their ring: {started:?}"
        );
    }

    /// A commit names no more joiners than the next ring has room for, however many ask.
    #[test]
    fn joiners_are_named_only_as_far_as_the_next_ring_has_room() {
        let mut ps = peers(2, 2);
        let asked = simulate(&mut ps, &[true; 2], 20, 0);
        assert_eq!(asked[0].started.len(), 1, "the ring of two runs");
        let now = 1000 * MS;
        for i in 0..100 {
            let j = JoinRequest { run: RunId::from_name("m"), peer: format!("joiner-{i:03}"), round: 0, batch: 1 };
            ps[0].on_join(&j, now);
        }
        assert_eq!(ps[0].joiners(now).len(), 64 - 2, "room in a ring of at most 64");
    }

    #[test]
    fn a_joiner_asks_and_enters_through_done() {
        let run = RunId::from_name("m");
        let mut ps = peers(2, 2);
        let asked = simulate(&mut ps, &[true; 2], 20, 0);
        let ring = asked[0].started[0].clone();
        let mut j = Membership::new(run, "joiner".into(), cfg(2));
        // The joiner sees a running ring and asks to join.
        for p in &mut ps {
            let _ = p.tick(2000 * MS);
        }
        // (Both members' heartbeats: a ring counts once two peers say they run it.)
        for p in ps.iter_mut() {
            let hb = match p.tick(2300 * MS).remove(0) {
                MembershipAction::Publish(Gossip::Heartbeat(h)) => h,
                other => panic!("{other:?}"),
            };
            j.on_heartbeat(&hb, 2300 * MS);
        }
        let acts = j.tick(2300 * MS);
        let join = acts.iter().find_map(|a| match a {
            MembershipAction::Publish(Gossip::Join(r)) => Some(r.clone()),
            _ => None,
        });
        let join = join.expect("joiner asks to join");
        ps[0].on_join(&join, 2300 * MS);
        assert_eq!(ps[0].joiners(2300 * MS), vec!["joiner".to_string()]);
        let next = RingView::order(run, ring.round + 1, 0, ring.members.iter().cloned().chain(["joiner".to_string()]));
        let done = RoundDone {
            run,
            peer: ring.members[0].clone(),
            round: ring.round,
            attempt: 0,
            result: [0; 32],
            next_members: next.members.clone(),
        };
        // A Done of the last round there can be names no next ring.
        assert!(j.on_done(&RoundDone { round: u64::MAX, ..done.clone() }, 2400 * MS).is_empty());
        // Nor does one naming this peer alone (a ring of one would fork the run).
        let alone = RoundDone { next_members: vec!["joiner".to_string()], ..done.clone() };
        assert!(j.on_done(&alone, 2400 * MS).is_empty());
        let twice = RoundDone { next_members: vec!["joiner".to_string(); 2], ..done.clone() };
        assert!(j.on_done(&twice, 2400 * MS).is_empty());
        let acts = j.on_done(&done, 2400 * MS);
        assert!(acts.contains(&MembershipAction::Start(next.clone())));
        // While it fetches the ring's state, its heartbeats say so, and peers judging a state
        // do not count it.
        let acts = j.set_fetching(true, 2400 * MS);
        let MembershipAction::Publish(Gossip::Heartbeat(hb)) = &acts[0] else { panic!("{acts:?}") };
        assert_eq!(hb.status, PeerStatus::Syncing { round: ring.round + 1 });
        ps[0].on_heartbeat(hb, 2400 * MS);
        assert!(!ps[0].settled_peers(2400 * MS).contains("joiner"));
        let acts = ps[0].round_completed(&ring, next.clone(), 2400 * MS);
        assert!(acts.contains(&MembershipAction::Start(next)));
        assert!(ps[0].joiners(2400 * MS).is_empty());
        // An attempt at the last number there is (a liar's heartbeat can name one) fails into
        // the same number, not past it.
        j.phase = Phase::Running(RingView { attempt: u32::MAX, ..ring.clone() });
        let _ = j.round_failed(2500 * MS, &[]);
    }

    #[test]
    fn a_peer_behind_forming_peers_syncs_and_forms_with_them() {
        // The whole run restarted: three peers resume from their checkpoints of round 5 and
        // wait for a fourth, which comes back from an older checkpoint (round 2).
        let run = RunId::from_name("m");
        let mut ps: Vec<Membership> = names(3)
            .into_iter()
            .map(|p| Membership::resume(run, p, cfg(4), StateTag { round: 5, param_hash: [5; 32] }))
            .collect();
        ps.push(Membership::resume(run, "peer-3".into(), cfg(4), StateTag { round: 2, param_hash: [2; 32] }));
        let asked = simulate(&mut ps, &[true; 4], 10, 2000 * MS);
        let (round, from) = asked[3].syncs.first().expect("the late peer asks for the state").clone();
        assert_eq!(round, 5);
        assert_eq!(from.len(), 3, "any of the forming peers can serve it: {from:?}");
        assert!(asked[3].started.is_empty(), "it forms no ring at its old round");
        // Once synced, it forms round 5 with the others.
        ps[3].set_state(StateTag { round: 5, param_hash: [5; 32] });
        ps[3].synced(5, 2500 * MS);
        let asked = simulate(&mut ps, &[true; 4], 40, 2500 * MS);
        let ring = asked[3].started.first().expect("it entered a ring").clone();
        assert_eq!(ring.round, 5);
        assert_eq!(ring.len(), 4);
        assert!(asked.iter().all(|a| a.started.last() == Some(&ring)), "{asked:?}");
    }

    #[test]
    fn one_peer_claiming_a_later_round_does_not_pull_the_others_away() {
        let mut ps = told_by_a_liar(
            PeerStatus::Forming { round: 1_000_000, attempt: 0, view: [0; 32] },
            StateTag { round: 1_000_000, param_hash: [6; 32] },
        );
        let asked = simulate(&mut ps, &[true; 3], 15, 0);
        assert!(asked.iter().all(|a| a.syncs.is_empty()), "{asked:?}");
        assert!(asked.iter().all(|a| a.started.len() == 1 && a.started[0].round == 0));
    }

    #[test]
    fn a_peer_left_alone_while_others_form_does_not_train_alone_but_a_lone_survivor_does() {
        let run = RunId::from_name("m");
        let tag = StateTag { round: 1, param_hash: [1; 32] };
        let mut a = Membership::resume(run, "a".into(), cfg(1), tag);
        let mut b = Membership::resume(run, "b".into(), cfg(1), tag);
        // b forms round 1 at another attempt than a (a ring a is not in, or one it has not
        // caught up with): a, alone in its view, starts nothing.
        a.phase = Phase::Forming { round: 1, attempt: 3 };
        b.phase = Phase::Forming { round: 1, attempt: 1 };
        let started = |acts: &[MembershipAction]| acts.iter().any(|x| matches!(x, MembershipAction::Start(_)));
        for t in 0..10 {
            let now = t * 100 * MS;
            let MembershipAction::Publish(Gossip::Heartbeat(h)) = b.heartbeat(now) else { panic!() };
            a.on_heartbeat(&h, now);
            assert!(!started(&a.tick(now)), "a ring of one beside a live peer forming round 1");
        }
        // b is gone (no heartbeat for longer than the timeout): in a run of one peer (min_peers
        // 1), a goes on alone; in a run meant for several, after its first ring, it waits.
        let later = 10 * 100 * MS + 2 * cfg(1).peer_timeout_us;
        let acts = a.tick(later);
        let solo = acts.iter().find_map(|x| match x {
            MembershipAction::Start(v) => Some(v.clone()),
            _ => None,
        });
        assert_eq!(solo.map(|v| v.members), Some(vec!["a".to_string()]), "{acts:?}");
        let mut c = Membership::resume(run, "c".into(), cfg(3), tag);
        c.rings_entered = 1;
        let mut asked = simulate(std::slice::from_mut(&mut c), &[true], 40, later);
        assert!(asked.pop().unwrap().started.is_empty(), "a ring of one in a run of min_peers 3");
    }

    #[test]
    fn a_restarted_peer_waits_for_min_peers_and_does_not_train_alone() {
        let run = RunId::from_name("m");
        let mut p = vec![Membership::resume(run, "back".into(), cfg(3), StateTag { round: 40, param_hash: [1; 32] })];
        let asked = simulate(&mut p, &[true], 40, 0);
        assert!(asked[0].started.is_empty(), "a peer's first ring needs min_peers, at any round");
        assert_eq!(p[0].round(), 40);
    }

    #[test]
    fn a_leaving_member_fails_the_ring_at_once_and_is_not_in_the_next_view() {
        let mut ps = peers(3, 3);
        simulate(&mut ps, &[true; 3], 20, 0);
        let now = 19 * 50 * MS + 10 * MS;
        let acts = ps[1].leave(now);
        let MembershipAction::Publish(Gossip::Heartbeat(hb)) = &acts[0] else { panic!("{acts:?}") };
        assert_eq!(hb.status, PeerStatus::Leaving);
        ps[0].on_heartbeat(hb, now);
        assert_eq!(ps[0].dead_members(now), vec!["peer-1".to_string()], "no timeout to wait for");
        assert!(ps[1].tick(now + 100 * MS).iter().all(|a| matches!(a, MembershipAction::Publish(_))));
        // A closed connection counts at once too; messages it sent before, relayed late by
        // others, do not bring it back; a newer heartbeat does.
        ps[0].on_disconnect("peer-2");
        assert!(ps[0].dead_members(now).contains(&"peer-2".to_string()));
        let mut hb = match ps[2].heartbeat(now) {
            MembershipAction::Publish(Gossip::Heartbeat(h)) => h,
            other => panic!("{other:?}"),
        };
        let newer = hb.clone();
        hb.seq -= 1;
        ps[0].observe("peer-2", now);
        ps[0].on_heartbeat(&hb, now);
        assert!(ps[0].dead_members(now).contains(&"peer-2".to_string()), "a stale relayed heartbeat");
        ps[0].on_heartbeat(&newer, now);
        assert!(!ps[0].dead_members(now).contains(&"peer-2".to_string()));
    }

    #[test]
    fn silent_peers_are_forgotten() {
        let mut ps = peers(1, 1);
        let run = RunId::from_name("m");
        for i in 0..1000 {
            let hb = Heartbeat {
                run,
                peer: format!("ghost-{i}"),
                seq: 1,
                status: PeerStatus::Forming { round: 0, attempt: 0, view: [0; 32] },
                batch: 1,
                state: StateTag::default(),
                excluded: Vec::new(),
            };
            ps[0].on_heartbeat(&hb, 0);
        }
        assert_eq!(ps[0].live_peers(1), 1000);
        let _ = ps[0].tick(11 * 1000 * MS);
        assert_eq!(ps[0].peers.len(), 0);
    }

    #[test]
    fn ring_order_is_a_deterministic_permutation() {
        let run = RunId::from_name("x");
        let a = RingView::order(run, 5, 0, ["c", "a", "b", "a"].map(String::from));
        let b = RingView::order(run, 5, 0, ["b", "c", "a"].map(String::from));
        assert_eq!(a, b);
        assert_eq!(a.len(), 3);
        let rounds: BTreeSet<Vec<PeerKey>> =
            (0..20).map(|r| RingView::order(run, r, 0, ["a", "b", "c", "d"].map(String::from)).members).collect();
        assert!(rounds.len() > 1, "the order changes across rounds");
    }

    #[test]
    fn one_peer_cannot_keep_an_honest_peer_out_but_most_keep_a_convicted_one_out() {
        // Four peers; peer-0 (a liar) keeps peer-3 out on its own: peer-3 stays in.
        let mut ps = peers(4, 4);
        ps[0].convict("peer-3", 0);
        let asked = simulate(&mut ps, &[true; 4], 30, 0);
        assert!(asked.iter().all(|a| a.started.first().is_some_and(|v| v.len() == 4)), "{asked:?}");
        // Peers 1 and 2 (with peer-0, three of the other three) checked evidence against
        // peer-3 and convicted it: it is out of the next ring, for good.
        let mut ps = peers(4, 3);
        for p in ps.iter_mut().take(3) {
            p.convict("peer-3", 0);
        }
        let asked = simulate(&mut ps, &[true; 4], 30, 0);
        let ring = asked[0].started.first().unwrap_or_else(|| panic!("the others form: {asked:?} {:?}", ps[0])).clone();
        assert_eq!(ring.len(), 3);
        assert!(!ring.members.contains(&"peer-3".to_string()));
        assert!(asked[3].started.is_empty());
        assert!(ps[0].excluded(1 << 30).contains(&"peer-3".to_string()), "kept out for the rest of the run");
    }
}
