//! Who is in the ring of each round, agreed from gossip with no coordinator.
//!
//! Every peer of a run gossips a heartbeat with its status. Two ways lead into a
//! ring, and every honest peer computes the same result from the same messages:
//!
//! - **Forming** (the first round, and after a failed round): a peer that is in
//!   no ring collects the live peers that are forming the same `(round,
//!   attempt)`, its *view*, and announces the view's hash. When every peer of
//!   its view announces that same hash, all of them start the ring made of the
//!   view. The very first attempt waits for `min_peers`; after that a ring of
//!   any size goes on. Views that disagree simply wait for the next heartbeat; a ring built
//!   on a view that changed at the last moment fails its commit phase and the
//!   peers form again with the next attempt number.
//! - **Joining** a running ring: a peer that sees a ring running asks to join.
//!   Each member lists the joiners it saw in its commit; the next ring is this
//!   ring plus the union of those lists, which every member knows once it holds
//!   every commit, and every member's `Done` carries it, so the joiner learns it
//!   too and starts the next round with the others.
//!
//! Within a ring, members are ordered by `blake3(run ‖ round ‖ attempt ‖ peer)`,
//! so the neighbours change from round to round and no position is special.

use crate::hash::Hash;
use crate::message::{Gossip, Heartbeat, JoinRequest, PeerKey, PeerStatus, RoundDone, RunId};
use std::collections::{BTreeMap, BTreeSet};

/// A peer silent for this many peer timeouts is forgotten entirely.
const FORGET_AFTER_TIMEOUTS: u64 = 10;

/// Timing and size rules of membership.
#[derive(Debug, Clone)]
pub struct MembershipConfig {
    /// How often a peer gossips its heartbeat.
    pub heartbeat_us: u64,
    /// A peer not heard from for this long is taken as gone.
    pub peer_timeout_us: u64,
    /// Peers to wait for before the first round (later rounds go on with any).
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
#[derive(Debug, Clone, PartialEq)]
pub enum MembershipAction {
    /// Gossip this message on the run's topic.
    Publish(Gossip),
    /// Run this round with this ring.
    Start(RingView),
}

#[derive(Debug, Clone, PartialEq)]
enum Phase {
    Forming { round: u64, attempt: u32 },
    Running(RingView),
}

#[derive(Debug, Clone)]
struct Seen {
    at: u64,
    status: Option<PeerStatus>,
}

/// One peer's membership state machine.
#[derive(Debug)]
pub struct Membership {
    run: RunId,
    me: PeerKey,
    cfg: MembershipConfig,
    peers: BTreeMap<PeerKey, Seen>,
    joins: BTreeMap<PeerKey, u64>,
    phase: Phase,
    seq: u64,
    last_heartbeat: Option<u64>,
    last_join: Option<u64>,
    last_view: Option<Hash>,
}

impl Membership {
    pub fn new(run: RunId, me: PeerKey, cfg: MembershipConfig) -> Self {
        Self {
            run,
            me,
            cfg,
            peers: BTreeMap::new(),
            joins: BTreeMap::new(),
            phase: Phase::Forming { round: 0, attempt: 0 },
            seq: 0,
            last_heartbeat: None,
            last_join: None,
            last_view: None,
        }
    }

    fn alive(&self, seen: &Seen, now: u64) -> bool {
        now.saturating_sub(seen.at) < self.cfg.peer_timeout_us
    }

    /// Any message from `peer` shows it is alive.
    pub fn observe(&mut self, peer: &str, now: u64) {
        if peer == self.me {
            return;
        }
        self.peers.entry(peer.to_owned()).or_insert(Seen { at: now, status: None }).at = now;
    }

    pub fn on_heartbeat(&mut self, hb: &Heartbeat, now: u64) {
        if hb.peer == self.me || hb.run != self.run {
            return;
        }
        self.peers.insert(hb.peer.clone(), Seen { at: now, status: Some(hb.status.clone()) });
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
        if d.run != self.run || d.round + 1 < round || !d.next_members.contains(&self.me) {
            return Vec::new();
        }
        let view = RingView::order(self.run, d.round + 1, 0, d.next_members.iter().cloned());
        self.enter(view, now)
    }

    fn enter(&mut self, view: RingView, now: u64) -> Vec<MembershipAction> {
        self.phase = Phase::Running(view.clone());
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
            Phase::Running(v) => PeerStatus::Running { round: v.round, attempt: v.attempt, ring: v.hash(self.run) },
        }
    }

    fn heartbeat(&mut self, now: u64) -> MembershipAction {
        self.seq += 1;
        self.last_heartbeat = Some(now);
        MembershipAction::Publish(Gossip::Heartbeat(Heartbeat {
            run: self.run,
            peer: self.me.clone(),
            seq: self.seq,
            status: self.status(),
            batch: self.cfg.batch,
        }))
    }

    /// The ring this peer is in, if any.
    pub fn ring(&self) -> Option<&RingView> {
        match &self.phase {
            Phase::Running(v) => Some(v),
            Phase::Forming { .. } => None,
        }
    }

    /// Live peers that asked to join and are not in this peer's ring.
    pub fn joiners(&self, now: u64) -> Vec<PeerKey> {
        let ring = self.ring();
        self.joins
            .iter()
            .filter(|(p, at)| {
                now.saturating_sub(**at) < self.cfg.peer_timeout_us
                    && self.peers.get(*p).is_some_and(|s| self.alive(s, now))
                    && !ring.is_some_and(|r| r.members.contains(p))
            })
            .map(|(p, _)| p.clone())
            .collect()
    }

    /// Members of this peer's ring that have not been heard from in time.
    pub fn dead_members(&self, now: u64) -> Vec<PeerKey> {
        let Some(ring) = self.ring() else { return Vec::new() };
        ring.members
            .iter()
            .filter(|m| **m != self.me && !self.peers.get(*m).is_some_and(|s| self.alive(s, now)))
            .cloned()
            .collect()
    }

    /// Live peers this one knows, itself excluded.
    pub fn live_peers(&self, now: u64) -> usize {
        self.peers.values().filter(|s| self.alive(s, now)).count()
    }

    /// The round completed: move on to the next ring (which includes this peer).
    pub fn round_completed(&mut self, next: RingView, now: u64) -> Vec<MembershipAction> {
        for m in &next.members {
            self.joins.remove(m);
        }
        self.enter(next, now)
    }

    /// The round failed: form again for the same round with the next attempt.
    pub fn round_failed(&mut self, now: u64) {
        if let Phase::Running(v) = &self.phase {
            self.phase = Phase::Forming { round: v.round, attempt: v.attempt + 1 };
            self.last_view = None;
            self.last_heartbeat = None;
        }
        let _ = now;
    }

    /// Heartbeats, join requests and ring formation; call it every few tens of ms.
    pub fn tick(&mut self, now: u64) -> Vec<MembershipAction> {
        // Forget peers long gone, so a stream of short-lived identities cannot
        // grow the table without bound.
        let forget = self.cfg.peer_timeout_us.saturating_mul(FORGET_AFTER_TIMEOUTS);
        self.peers.retain(|_, s| now.saturating_sub(s.at) < forget);
        self.joins.retain(|_, at| now.saturating_sub(*at) < forget);
        let mut out = Vec::new();
        if let Phase::Forming { round, attempt } = self.phase {
            out.extend(self.form(round, attempt, now));
        }
        let due = self.last_heartbeat.is_none_or(|t| now.saturating_sub(t) >= self.cfg.heartbeat_us);
        if due && !out.iter().any(|a| matches!(a, MembershipAction::Publish(Gossip::Heartbeat(_)))) {
            out.push(self.heartbeat(now));
        }
        out
    }

    fn form(&mut self, mut round: u64, mut attempt: u32, now: u64) -> Vec<MembershipAction> {
        let live: Vec<(&PeerKey, &PeerStatus)> = self
            .peers
            .iter()
            .filter(|(_, s)| self.alive(s, now))
            .filter_map(|(p, s)| s.status.as_ref().map(|st| (p, st)))
            .collect();
        // Adopt the furthest (round, attempt) that live peers are forming.
        for (_, st) in &live {
            if let PeerStatus::Forming { round: r, attempt: a, .. } = st
                && (*r, *a) > (round, attempt)
            {
                (round, attempt) = (*r, *a);
            }
        }
        self.phase = Phase::Forming { round, attempt };
        // The view: this peer and the live peers forming, or already running,
        // the same (round, attempt).
        let mut view: BTreeSet<PeerKey> =
            live.iter()
                .filter(|(_, st)| match st {
                    PeerStatus::Forming { round: r, attempt: a, .. }
                    | PeerStatus::Running { round: r, attempt: a, .. } => (*r, *a) == (round, attempt),
                    PeerStatus::Leaving => false,
                })
                .map(|(p, _)| (*p).clone())
                .collect();
        view.insert(self.me.clone());
        let ring = RingView::order(self.run, round, attempt, view.iter().cloned());
        let ring = RingView { members: ring.members.into_iter().take(self.cfg.max_peers.max(1)).collect(), ..ring };
        let ring_hash = ring.hash(self.run);
        // A live ring other than the one this view makes is running: ask to join it.
        let running_elsewhere = live.iter().any(|(_, st)| {
            matches!(st, PeerStatus::Running { round: r, attempt: a, ring } if (*r, *a, *ring) != (round, attempt, ring_hash))
        });
        let mut out = Vec::new();
        if running_elsewhere {
            if self.last_join.is_none_or(|t| now.saturating_sub(t) >= self.cfg.heartbeat_us) {
                self.last_join = Some(now);
                out.push(MembershipAction::Publish(Gossip::Join(JoinRequest {
                    run: self.run,
                    peer: self.me.clone(),
                    round,
                    batch: self.cfg.batch,
                })));
            }
            return out;
        }
        let vh = view_hash(self.run, round, attempt, &view);
        if self.last_view != Some(vh) {
            self.last_view = Some(vh);
            out.push(self.heartbeat(now));
        }
        let needed = if (round, attempt) == (0, 0) { self.cfg.min_peers.max(1) } else { 1 };
        let agreed = view.iter().filter(|p| **p != self.me).all(|p| match &self.peers[p].status {
            Some(PeerStatus::Forming { view, .. }) => *view == vh,
            Some(PeerStatus::Running { ring, .. }) => *ring == ring_hash,
            _ => false,
        });
        if view.len() >= needed && agreed && ring.members.contains(&self.me) {
            out.extend(self.enter(ring, now));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1000;

    fn cfg(min_peers: usize) -> MembershipConfig {
        MembershipConfig { heartbeat_us: 200 * MS, peer_timeout_us: 1000 * MS, min_peers, max_peers: 64, batch: 1 }
    }

    /// Delivers every published message to every other peer (a perfect gossip
    /// layer) and returns, per peer, the rings it started.
    fn simulate(peers: &mut [Membership], alive: &[bool], steps: u64, start: u64) -> Vec<Vec<RingView>> {
        let mut started = vec![Vec::new(); peers.len()];
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
                        MembershipAction::Start(v) => started[i].push(v),
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
        started
    }

    fn peers(n: usize, min: usize) -> Vec<Membership> {
        let run = RunId::from_name("m");
        (0..n).map(|i| Membership::new(run, format!("peer-{i}"), cfg(min))).collect()
    }

    #[test]
    fn all_peers_agree_on_the_first_ring() {
        for n in 1..10 {
            let mut ps = peers(n, n);
            let started = simulate(&mut ps, &vec![true; n], 40, 0);
            let first: Vec<&RingView> = started.iter().map(|s| &s[0]).collect();
            assert!(first.iter().all(|v| *v == first[0]), "{first:?}");
            assert_eq!(first[0].len(), n);
            assert_eq!((first[0].round, first[0].attempt), (0, 0));
        }
    }

    #[test]
    fn waits_for_min_peers_before_the_first_round() {
        let mut ps = peers(3, 4);
        let started = simulate(&mut ps, &[true; 3], 40, 0);
        assert!(started.iter().all(Vec::is_empty));
    }

    #[test]
    fn survivors_reform_without_a_dead_peer() {
        let mut ps = peers(4, 4);
        let started = simulate(&mut ps, &[true; 4], 20, 0);
        let ring = started[0][0].clone();
        // Peer 2 dies; the others fail the round and form again.
        for (i, p) in ps.iter_mut().enumerate() {
            if i != 2 {
                p.round_failed(20 * 50 * MS);
            }
        }
        let alive = [true, true, false, true];
        let again = simulate(&mut ps, &alive, 60, 21 * 50 * MS);
        let views: Vec<&RingView> = [0, 1, 3].iter().map(|&i| again[i].last().unwrap()).collect();
        assert!(views.iter().all(|v| *v == views[0]));
        assert_eq!(views[0].round, ring.round);
        assert_eq!(views[0].attempt, 1);
        assert_eq!(views[0].len(), 3);
        assert!(!views[0].members.contains(&"peer-2".to_string()));
    }

    #[test]
    fn a_joiner_asks_and_enters_through_done() {
        let run = RunId::from_name("m");
        let mut ps = peers(2, 2);
        let started = simulate(&mut ps, &[true; 2], 20, 0);
        let ring = started[0][0].clone();
        let mut j = Membership::new(run, "joiner".into(), cfg(2));
        // The joiner sees a running ring and asks to join.
        for p in &mut ps {
            let _ = p.tick(2000 * MS);
        }
        let hb = match ps[0].tick(2300 * MS).remove(0) {
            MembershipAction::Publish(Gossip::Heartbeat(h)) => h,
            other => panic!("{other:?}"),
        };
        j.on_heartbeat(&hb, 2300 * MS);
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
        let acts = j.on_done(&done, 2400 * MS);
        assert!(acts.contains(&MembershipAction::Start(next.clone())));
        let acts = ps[0].round_completed(next.clone(), 2400 * MS);
        assert!(acts.contains(&MembershipAction::Start(next)));
        assert!(ps[0].joiners(2400 * MS).is_empty());
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
}
