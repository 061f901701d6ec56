//! Asynchronous rounds: a peer slower than the ring does not stall it.
//!
//! A member's gradient job starts when its ring does, on the round's parameters and the
//! member's stretch of the sample stream, with weight 1 (its clipped gradient). If the job
//! is done when the member commits, it commits it as in a synchronous run. If most of the
//! other members have committed and the job is still running after the run's threshold, the
//! member commits an earlier gradient it finished since its last commit, or else nothing for
//! the round (zeros, no samples), and the ring goes on; the job keeps running, and its
//! gradient joins the sum of a later round (at most `max_staleness` rounds later), weighted
//! down to `weight / (1 + staleness)` ([`p2p_proto::audit::staleness_weight`]), unless that
//! round's own gradient is ready first (a member late once does not stay stale), while the
//! member's next job already runs. A stale commit names the round it was computed
//! for and that round's parameters, which every member checks against its own recent
//! parameter hashes ([`p2p_proto::round::Contribution::with_async`]); an auditor recomputes it
//! from the parameters of that round, which its compute worker keeps, and the members and
//! samples of that round's certified ring, which the driver keeps. Nothing about a member's
//! gradient is thus less verifiable for being late, and the chain counts each sample once, in
//! the round its gradient joined.

use super::{Compute, Driver, Internal};
use crate::train::worker::{Gradient, Reply};
use p2p_proto::Hash;
use p2p_proto::audit::{micro_batch, staleness_weight};
use p2p_proto::membership::RingView;
use p2p_proto::message::{Gossip, PeerKey};
use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;
use tracing::{info, warn};

/// A gradient job of this peer, and what it is of.
#[derive(Debug)]
pub(super) struct Job {
    id: u64,
    /// The round whose parameters and stretch of the sample stream it is of.
    round: u64,
    /// Its micro-batch: where it starts in the sample stream, and its samples.
    start: u64,
    batch: u64,
    /// The clipped gradient (weight 1), once computed.
    done: Option<Arc<Gradient>>,
}

/// A certified round's stretch of the sample stream: where it started, and the ring's members
/// and samples in ring order.
#[derive(Debug, Clone)]
pub(super) struct Slot {
    cursor: u64,
    members: Vec<PeerKey>,
    batches: Vec<u64>,
}

impl Slot {
    /// Where `peer`'s micro-batch of the round starts, and its samples.
    fn of(&self, peer: &str) -> Option<(u64, u64)> {
        let pos = self.members.iter().position(|m| m == peer)?;
        let (offset, batch, _) = micro_batch(&self.batches, pos);
        Some((self.cursor.saturating_add(offset), batch))
    }
}

/// A ring this peer has not committed to yet, waiting for its gradient.
#[derive(Debug)]
struct Waiting {
    view: RingView,
    batches: Vec<u64>,
    joiners: Vec<PeerKey>,
    excluded: Vec<PeerKey>,
    /// When most of the other members' commits were in (µs since the driver started).
    most_in: Option<u64>,
}

/// What this peer commits to a ring.
enum Source {
    Gradient(u64, Arc<Gradient>),
    Nothing,
}

/// The state of asynchronous rounds.
#[derive(Debug)]
pub(super) struct Async {
    threshold: Duration,
    max_staleness: u64,
    next_id: u64,
    /// The newest gradient job.
    job: Option<Job>,
    /// A computed gradient committed to (an attempt of) this round.
    in_use: Option<(u64, Job)>,
    /// A computed stale gradient, committed at the deadline if this round's own is not ready
    /// by then (a fresh gradient is preferred: a peer late once does not stay stale).
    fallback: Option<Job>,
    waiting: Option<Waiting>,
    /// The parameter hash this peer held at the start of each recent round.
    params: BTreeMap<u64, Hash>,
    /// The stretch of the sample stream of each recent certified round.
    slots: BTreeMap<u64, Slot>,
    /// The attempt under way: its samples by member and the cursor it started at.
    started: Option<((u64, u32), Vec<u64>, u64)>,
}

impl Async {
    pub(super) fn new(threshold: Duration, max_staleness: u64) -> Self {
        Self {
            threshold,
            max_staleness,
            next_id: 0,
            job: None,
            in_use: None,
            fallback: None,
            waiting: None,
            params: BTreeMap::new(),
            slots: BTreeMap::new(),
            started: None,
        }
    }

    /// Where `peer`'s micro-batch of the certified `round` started, and its samples.
    pub(super) fn slot_of(&self, round: u64, peer: &str) -> Option<(u64, u64)> {
        self.slots.get(&round)?.of(peer)
    }

    /// The parameters this peer held at the start of `round`, if it keeps them.
    pub(super) fn params_at(&self, round: u64) -> Option<Hash> {
        self.params.get(&round).copied()
    }

    /// This peer holds the parameters `hash` at the start of `round`.
    pub(super) fn note_params(&mut self, round: u64, hash: Hash) {
        self.params.insert(round, hash);
        self.forget(round);
    }

    /// A state was restored (a resync): gradients of the old state no longer count.
    pub(super) fn restored(&mut self, round: u64, hash: Hash) {
        self.job = None;
        self.in_use = None;
        self.fallback = None;
        self.waiting = None;
        self.params.clear();
        self.slots.clear();
        self.note_params(round, hash);
    }

    fn forget(&mut self, round: u64) {
        let oldest = round.saturating_sub(self.max_staleness + 1);
        self.params.retain(|r, _| *r >= oldest);
        self.slots.retain(|r, _| *r >= oldest);
    }

    /// Whether `job` may be committed to round `round` of a ring of `members`, where this
    /// peer's micro-batch starts at `start` with `batch` samples: a fresh one of this very
    /// micro-batch, or a stale one within the run's staleness whose micro-batch is the one the
    /// certified ring of its round gave this peer (`me`), if every member was in that ring
    /// (a member that joined since holds neither that round's parameters nor its ring, so it
    /// could not audit the gradient).
    fn usable(&self, job: &Job, round: u64, members: &[PeerKey], start: u64, batch: u64, me: &str) -> bool {
        if job.round == round {
            return (job.start, job.batch) == (start, batch);
        }
        let Some(slot) = self.slots.get(&job.round) else { return false };
        job.round < round
            && round - job.round <= self.max_staleness
            && slot.of(me) == Some((job.start, job.batch))
            && members.iter().all(|m| slot.members.contains(m))
    }

    /// An attempt failed: a stale gradient it carried is not offered again (an auditor may
    /// have been unable to recompute it); a fresh one is.
    pub(super) fn attempt_failed(&mut self) {
        self.in_use = self.in_use.take().filter(|(r, job)| job.round == *r);
        self.waiting = None;
    }
}

impl Driver {
    /// Starts this peer's part in `view` in an asynchronous run: commits a computed gradient at
    /// once if it has one that may join, and makes sure a job runs for this round's micro-batch.
    pub(super) fn start_async(
        &mut self,
        view: RingView,
        batches: Vec<u64>,
        joiners: Vec<PeerKey>,
        excluded: Vec<PeerKey>,
    ) {
        let me = self.me.clone();
        let pos = view.position(&me).expect("a started ring holds this peer");
        let (offset, batch, _) = micro_batch(&batches, pos);
        let (round, start) = (view.round, self.cursor.saturating_add(offset));
        let cursor = self.cursor;
        let Some(asy) = self.asy.as_mut() else { return };
        asy.started = Some(((round, view.attempt), batches.clone(), cursor));
        asy.waiting = None;
        // A gradient chosen for this round by an attempt that failed.
        let chosen = match asy.in_use.take() {
            Some((r, job)) if r == round && asy.usable(&job, round, &view.members, start, batch, &me) => Some(job),
            _ => None,
        };
        let chosen = chosen.or_else(|| {
            let job = asy.job.take_if(|j| j.done.is_some())?;
            if !asy.usable(&job, round, &view.members, start, batch, &me) {
                info!(round, computed_for = job.round, "a gradient too old for this round is dropped");
                return None;
            }
            if job.round == round {
                return Some(job);
            }
            // Stale: kept for the deadline, while this round's own gradient is computed.
            asy.fallback = Some(job);
            None
        });
        if chosen.is_some()
            || asy.fallback.as_ref().is_some_and(|j| !asy.usable(j, round, &view.members, start, batch, &me))
        {
            // A fresh gradient goes in instead (a stale one would only get staler).
            asy.fallback = None;
        }
        let waiting = Waiting { view, batches, joiners, excluded, most_in: None };
        match chosen {
            Some(job) => self.commit_job(waiting, job),
            None => asy.waiting = Some(waiting),
        }
        // This round's micro-batch gets its job, unless one runs already (a slow peer's
        // gradients queue no deeper than one).
        let asy = self.asy.as_mut().expect("asynchronous");
        let covered = asy.job.is_some() || asy.in_use.as_ref().is_some_and(|(_, j)| j.round == round);
        if !covered {
            self.start_job(round, start, batch);
        }
    }

    fn start_job(&mut self, round: u64, start: u64, batch: u64) {
        let Compute::Train(spec) = &self.cfg.compute else { return };
        let Some(asy) = self.asy.as_mut() else { return };
        asy.next_id += 1;
        let id = asy.next_id;
        asy.job = Some(Job { id, round, start, batch, done: None });
        let gradient: Reply<Gradient> = spec.worker.gradient(start, batch as usize, 1.0);
        let tx = self.internal.clone();
        tokio::spawn(async move {
            if let Ok(g) = gradient.await {
                let _ = tx.send(Internal::Computed { id, gradient: Box::new(g) });
            }
        });
    }

    /// A gradient job finished: commit it if this peer waits for it and it may join.
    pub(super) fn on_computed(&mut self, id: u64, gradient: Gradient) {
        let Some(asy) = self.asy.as_mut() else { return };
        let Some(job) = asy.job.as_mut().filter(|j| j.id == id) else { return };
        // The worker computed it on the parameters of its round: now known here, if they were not.
        let (round, params) = (job.round, gradient.param_hash);
        job.done = Some(Arc::new(gradient));
        asy.params.entry(round).or_insert(params);
        let Some(w) = asy.waiting.as_ref() else { return };
        if self.round.is_some() || self.membership.ring() != Some(&w.view) {
            return;
        }
        self.retry_waiting();
    }

    /// The ring this peer waits in, started again now that its gradient job is done.
    fn retry_waiting(&mut self) {
        let Some(w) = self.asy.as_mut().and_then(|a| a.waiting.take()) else { return };
        self.start_async(w.view, w.batches, w.joiners, w.excluded);
    }

    /// On every commit kept for later, every tick and at the deadline: a peer waiting for its
    /// gradient while most of the other members (a strict majority of them: all of them in a
    /// ring of 3) have committed commits nothing once the run's threshold has passed; so
    /// neither one slow peer nor a slow minority stalls the ring.
    pub(super) fn tick_async(&mut self, now: u64) {
        if self.round.is_some() {
            return;
        }
        let Some(asy) = self.asy.as_mut() else { return };
        let Some(w) = asy.waiting.as_mut() else { return };
        let n = w.view.len();
        if n < 2 {
            return;
        }
        if w.most_in.is_none() {
            let (round, attempt) = (w.view.round, w.view.attempt);
            let committed: HashSet<&str> = self
                .pending
                .iter()
                .filter_map(|g| match g {
                    Gossip::Commit(c) if (c.round, c.attempt) == (round, attempt) => Some(c.peer.as_str()),
                    _ => None,
                })
                .filter(|p| *p != self.me && w.view.members.iter().any(|m| m == p))
                .collect();
            if 2 * committed.len() > n - 1 {
                w.most_in = Some(now);
                // Woken at the deadline itself, not at the next tick.
                let (tx, wait) = (self.internal.clone(), asy.threshold);
                tokio::spawn(async move {
                    tokio::time::sleep(wait).await;
                    let _ = tx.send(Internal::AsyncDeadline);
                });
            }
        }
        let Some(most_in) = w.most_in else { return };
        if now.saturating_sub(most_in) < asy.threshold.as_micros() as u64 {
            return;
        }
        let w = asy.waiting.take().expect("waiting");
        let (round, attempt, threshold_ms) = (w.view.round, w.view.attempt, asy.threshold.as_millis() as u64);
        match asy.fallback.take() {
            Some(job) => {
                info!(
                    round,
                    attempt,
                    threshold_ms,
                    computed_for = job.round,
                    "this round's gradient is not ready and most of the ring has committed: committing an \
                     earlier one"
                );
                self.commit_job(w, job);
            }
            None => {
                info!(
                    round,
                    attempt,
                    threshold_ms,
                    "this peer's gradient is not ready and most of the ring has committed: committing nothing \
                     this round; the gradient joins a later one"
                );
                self.commit_async(w, Source::Nothing);
            }
        }
    }

    /// Commits the computed gradient of `job` to `w`'s ring; it is in use until that round ends.
    fn commit_job(&mut self, w: Waiting, job: Job) {
        let Some(asy) = self.asy.as_mut() else { return };
        let (computed_for, g) = (job.round, job.done.clone().expect("a computed gradient"));
        asy.in_use = Some((w.view.round, job));
        self.commit_async(w, Source::Gradient(computed_for, g));
    }

    /// Encodes and hashes this peer's commit to `w`'s ring off the event loop.
    fn commit_async(&mut self, w: Waiting, source: Source) {
        let Compute::Train(spec) = &self.cfg.compute else { return };
        let Some(asy) = self.asy.as_ref() else { return };
        let view = w.view;
        let pos = view.position(&self.me).expect("a started ring holds this peer");
        let (_, _, weight) = micro_batch(&w.batches, pos);
        let history = asy.params.clone();
        let rings = asy.slots.iter().map(|(r, s)| (*r, (s.members.clone(), s.batches.clone()))).collect();
        let (fixed, len) = (self.cfg.fixed, spec.worker.params);
        let own_params = history.get(&view.round).or_else(|| history.values().next_back()).copied().unwrap_or_default();
        let tx = self.internal.clone();
        let (joiners, excluded, batches) = (w.joiners, w.excluded, w.batches);
        // Compressed runs: a stale gradient is compressed as a fresh one (with this peer's
        // residual, top-k); nothing is the payload of zeros, the residual kept for later.
        let pack = self.packer(&view, len, weight);
        tokio::task::spawn_blocking(move || {
            let gradient = match source {
                Source::Gradient(at, g) => {
                    let staleness = view.round - at;
                    if staleness > 0 {
                        info!(round = view.round, computed_for = at, staleness, "a stale gradient joins this round");
                    }
                    let factor = staleness_weight(weight, staleness);
                    let weighted: Vec<f32> = g.weighted.iter().map(|v| v * factor).collect();
                    match fixed.encode(&weighted) {
                        Ok(d) if g.loss.is_finite() => Some((d, g.samples as u64, g.param_hash, at, g.loss)),
                        // The ring is not held up for it: this round gets nothing from this peer.
                        Ok(_) => {
                            warn!(round = view.round, loss = g.loss, "the loss is not finite; committing nothing");
                            None
                        }
                        Err(e) => {
                            warn!(round = view.round, reason = %e, "cannot encode the gradient; committing nothing");
                            None
                        }
                    }
                }
                Source::Nothing => None,
            };
            let (input, residual, computed_at, loss) = match gradient {
                Some((data, samples, param_hash, at, loss)) => {
                    let (input, residual) = pack.pack(data, samples, param_hash, joiners);
                    (input, residual, at, Some(loss))
                }
                None => (pack.nothing(len, own_params, joiners), None, view.round, None),
            };
            let input =
                input.with_ring_batches(batches).with_excluded(excluded).with_async(computed_at, history, rings);
            let _ = tx.send(Internal::Prepared { view, input: Box::new(input), loss, residual });
        });
    }

    /// A round completed: keep its stretch of the sample stream, and let go of the gradient it
    /// used.
    pub(super) fn completed_async(&mut self, view: &RingView, computed_at: Option<u64>) {
        let Some(asy) = self.asy.as_mut() else { return };
        if let Some((at, batches, cursor)) = asy.started.take()
            && at == (view.round, view.attempt)
        {
            asy.slots.insert(view.round, Slot { cursor, members: view.members.clone(), batches });
        }
        if asy.in_use.as_ref().is_some_and(|(r, _)| *r == view.round) {
            asy.in_use = None;
        }
        asy.waiting = None;
        asy.forget(view.round + 1);
        if let Some(at) = computed_at
            && at < view.round
        {
            info!(round = view.round, computed_for = at, staleness = view.round - at, "stale gradient counted");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(round: u64, start: u64, batch: u64) -> Job {
        Job { id: 0, round, start, batch, done: None }
    }

    #[test]
    fn a_gradient_joins_only_rounds_within_the_staleness_on_the_micro_batch_its_ring_gave_it() {
        let mut a = Async::new(Duration::from_millis(10), 2);
        let members: Vec<PeerKey> = ["x", "me", "y"].map(String::from).to_vec();
        // Round 4 started at sample 1000; "me" came after x's 64 samples and took 32.
        a.slots.insert(4, Slot { cursor: 1000, members: members.clone(), batches: vec![64, 32, 64] });
        assert_eq!(a.slot_of(4, "me"), Some((1064, 32)));
        assert_eq!(a.slot_of(4, "z"), None);
        assert_eq!(a.slot_of(3, "me"), None);

        let stale = job(4, 1064, 32);
        assert!(a.usable(&stale, 5, &members, 0, 0, "me"), "one round late");
        assert!(a.usable(&stale, 6, &members, 0, 0, "me"), "two rounds late");
        assert!(!a.usable(&stale, 7, &members, 0, 0, "me"), "beyond the staleness");
        assert!(!a.usable(&stale, 3, &members, 0, 0, "me"), "of a later round");
        // Computed for an attempt whose ring gave it another micro-batch than the certified one.
        assert!(!a.usable(&job(4, 1000, 32), 5, &members, 0, 0, "me"));
        assert!(!a.usable(&job(4, 1064, 64), 5, &members, 0, 0, "me"));
        // A fresh one: exactly this attempt's micro-batch.
        assert!(a.usable(&job(5, 2000, 32), 5, &members, 2000, 32, "me"));
        assert!(!a.usable(&job(5, 2000, 32), 5, &members, 2032, 32, "me"));
        // A member left since: usable; one joined since: not (it could not audit it).
        assert!(a.usable(&stale, 5, &members[..2], 0, 0, "me"));
        let joined: Vec<PeerKey> = ["x", "me", "y", "new"].map(String::from).to_vec();
        assert!(!a.usable(&stale, 5, &joined, 0, 0, "me"));
        assert!(a.usable(&job(5, 2000, 32), 5, &joined, 2000, 32, "me"), "a fresh one goes to any ring");
        // Of a round whose ring this peer does not hold (it was not certified here): not usable.
        assert!(!a.usable(&job(3, 900, 32), 4, &members, 0, 0, "me"));
    }

    #[test]
    fn what_audits_need_is_kept_for_the_staleness_and_a_restore_drops_the_old_state() {
        let mut a = Async::new(Duration::from_millis(10), 2);
        for r in 0..10u64 {
            a.slots.insert(r, Slot { cursor: r * 100, members: vec!["me".into()], batches: vec![100] });
            a.note_params(r, [r as u8; 32]);
        }
        // Round 9's parameters: stale gradients of rounds 7 and 8 may still come (and round 6's
        // ring is the oldest any of their audits asks for).
        assert_eq!(a.params.keys().copied().collect::<Vec<_>>(), vec![6, 7, 8, 9]);
        assert_eq!(a.slots.keys().copied().collect::<Vec<_>>(), vec![6, 7, 8, 9]);
        a.job = Some(job(9, 900, 100));
        a.restored(20, [20; 32]);
        assert!(a.job.is_none() && a.slots.is_empty());
        assert_eq!(a.params.into_iter().collect::<Vec<_>>(), vec![(20, [20; 32])]);
    }
}
