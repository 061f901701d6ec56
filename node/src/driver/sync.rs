//! Catching up: a peer that is behind fetches the training state for the
//! round it joins from peers that hold it, checks it, restores it, and only
//! then trains; and every peer serves its own state to the others.
//!
//! A fetched state is intact when every chunk matches the header (checked as
//! it arrives). It is the run's state when the chain's latest finalized
//! checkpoint is for exactly that round and holds its parameter hash, or,
//! for rounds after the latest checkpoint, when a strict majority of the live
//! peers at that round state that hash in their signed gossip (heartbeats,
//! commits). A state older than the latest finalized checkpoint is refused.
//! When the statements stay short of a majority until the deadline, the state
//! is taken if more peers state its hash than any other (logged as such); the
//! ring's commits still check every member's parameter hash each round.

use super::{Compute, Driver, Internal};
use crate::ledger::client::Client;
use crate::state_sync::{self, Answer, ServeRequest, Served};
use crate::train::checkpoint::optimizer_hash;
use crate::train::optim::Optimizer;
use alloy::primitives::B256;
use libp2p::PeerId;
use p2p_proto::Hash;
use p2p_proto::hash::hex;
use p2p_proto::membership::RingView;
use p2p_proto::message::{
    AttemptRef, Gossip, MAX_UNSETTLED, PeerKey, RoundFailed, RunId, Settlement, StateHeader, StateTag,
};
use p2p_proto::state::{State, Verdict, chunk_hashes, state_bytes};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::{info, warn};

/// Longest wait for the chain's latest checkpoint: an outage must not hold up a joiner.
/// Peers besides the server asked what they know of this peer's pending credits after a sync.
const SETTLE_ASKED: usize = 8;
const CHAIN_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a state request may wait for this peer to finish the round before it.
const SERVE_WAIT: Duration = Duration::from_secs(10);

/// A fetch in progress.
#[derive(Debug)]
pub(super) struct Sync {
    /// The state wanted: parameters after rounds `0..round`.
    pub round: u64,
    /// The ring to start once the state is in (a joiner); `None`: form with the others.
    pub then: Option<RingView>,
    started: Instant,
    /// Until when (driver time) statements are awaited before the best evidence decides.
    deadline: u64,
    fetched: Option<Box<Fetched>>,
    restoring: bool,
    /// Attempts this peer was in before it went away, without learning their outcome.
    unsettled: Vec<AttemptRef>,
}

/// A state fetched intact, not yet judged.
#[derive(Debug)]
pub(super) struct Fetched {
    state: State,
    from: PeerId,
    chain: ChainView,
}

/// What the chain said about the latest finalized checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
enum ChainView {
    NotUsed,
    Unavailable(String),
    NoCheckpoint,
    Latest { round: u64, hash: Hash },
}

/// Results of the helper tasks.
#[derive(Debug)]
pub(super) enum Event {
    Fetched(Result<Box<Fetched>, String>),
    Restored(Result<Hash, String>),
}

/// The chain's latest finalized checkpoint, bounded in time.
async fn chain_view(chain: Option<Client>, run: RunId) -> ChainView {
    let Some(c) = chain else { return ChainView::NotUsed };
    match tokio::time::timeout(CHAIN_TIMEOUT, c.read(c.contract().latestCheckpoint(B256::from(run.0)).call())).await {
        Ok(Ok(k)) if k.finalizedAt != 0 => ChainView::Latest { round: k.round, hash: k.paramHash.0 },
        Ok(Ok(_)) => ChainView::NoCheckpoint,
        Ok(Err(e)) => ChainView::Unavailable(e.to_string()),
        Err(_) => ChainView::Unavailable(format!("no answer within {} s", CHAIN_TIMEOUT.as_secs())),
    }
}

impl Driver {
    /// The size of this peer's state: values in the parameter vector, moment vectors.
    fn state_shape(&self) -> (u64, u8) {
        match &self.cfg.compute {
            Compute::Demo { .. } => (0, 0),
            Compute::Train(spec) => (spec.worker.params as u64, spec.worker.moments()),
        }
    }

    /// Fetches the state for `round` from one of `from` (in that order), then judges and
    /// restores it; `then` is the ring to start afterwards, if this peer is a joiner.
    pub(super) fn begin_sync(&mut self, round: u64, then: Option<RingView>, from: Vec<PeerKey>) {
        if self.sync.is_some() {
            return;
        }
        let peers: Vec<PeerId> = from.iter().filter_map(|p| p.parse().ok()).collect();
        info!(round, have = self.next_round, peers = peers.len(), "behind the ring: fetching its state");
        let deadline = self.now() + self.cfg.round.commit_timeout_us / 2;
        let (mut control, run, tx) = (self.net.control(), self.cfg.run, self.internal.clone());
        let shape = self.state_shape();
        let unsettled: Vec<AttemptRef> = self
            .cfg
            .ledger
            .as_ref()
            .map(|l| l.pending())
            .unwrap_or_default()
            .into_iter()
            .filter(|p| p.round < round)
            .map(|p| AttemptRef { round: p.round, attempt: p.attempt, ring: p.ring })
            .take(MAX_UNSETTLED)
            .collect();
        self.sync = Some(Sync {
            round,
            then,
            started: Instant::now(),
            deadline,
            fetched: None,
            restoring: false,
            unsettled: unsettled.clone(),
        });
        // The demonstration votes sums, not parameter hashes: the chain has nothing to check.
        let chain = match &self.cfg.compute {
            Compute::Train(_) => self.cfg.chain.clone(),
            Compute::Demo { .. } => None,
        };
        tokio::spawn(async move {
            // The chain is asked while the state is fetched: an outage costs no time.
            let fetch = async {
                let mut last = String::from("no peer to ask");
                for peer in peers {
                    match state_sync::fetch(&mut control, peer, run, round, shape, &unsettled).await {
                        Ok(state) => return Ok((state, peer)),
                        Err(e) => last = e.to_string(),
                    }
                }
                Err(last)
            };
            let (chain, fetched) = tokio::join!(chain_view(chain, run), fetch);
            let event = fetched.map(|(state, from)| Box::new(Fetched { state, from, chain }));
            let _ = tx.send(Internal::Sync(Event::Fetched(event)));
        });
    }

    pub(super) fn on_sync_event(&mut self, ev: Event) {
        let Some(sync) = self.sync.as_mut() else { return };
        match ev {
            Event::Fetched(Ok(f)) => {
                info!(
                    round = sync.round,
                    from = %f.from,
                    bytes = 4 * f.state.header.params * (1 + u64::from(f.state.header.moments)),
                    ms = sync.started.elapsed().as_millis() as u64,
                    "state fetched; every chunk matches its hash"
                );
                sync.fetched = Some(f);
                self.check_fetched();
            }
            Event::Fetched(Err(reason)) => self.sync_failed(&reason),
            Event::Restored(Ok(hash)) => self.restored(hash),
            Event::Restored(Err(reason)) => self.sync_failed(&reason),
        }
    }

    /// Judges a fetched state: accepted ones are restored, refuted ones dropped; without a
    /// verdict yet, it waits for more statements (called again every tick).
    pub(super) fn check_fetched(&mut self) {
        let now = self.now();
        let Some(sync) = self.sync.as_ref() else { return };
        let Some(f) = sync.fetched.as_ref().filter(|_| !sync.restoring) else { return };
        let (round, hash) = (sync.round, f.state.header.tag.param_hash);
        let judged: Result<String, String> = match &f.chain {
            ChainView::Latest { round: c, hash: h } if c.checked_add(1) == Some(round) => {
                if *h == hash {
                    Ok(format!("the chain's finalized checkpoint of round {c}"))
                } else {
                    Err(format!(
                        "its parameters hash to {}, but the chain finalized {} for round {c}",
                        hex(&hash),
                        hex(h)
                    ))
                }
            }
            ChainView::Latest { round: c, .. } if *c >= round => Err(format!(
                "it is the state after round {}, older than the chain's finalized checkpoint of round {c}",
                round.saturating_sub(1)
            )),
            _ => {
                let settled = self.membership.settled_peers(now);
                match self.statements.verdict(round, &hash, &settled) {
                    Verdict::Agreed { agree, of } => Ok(format!("{agree} of {of} peers at round {round} hold it")),
                    Verdict::Refuted { agree, disagree, of } => Err(format!(
                        "{disagree} of {of} peers at round {round} hold other parameters ({agree} hold these)"
                    )),
                    Verdict::Pending { agree, disagree, of } if now >= sync.deadline => {
                        if agree > disagree {
                            Ok(format!("{agree} of {of} peers at round {round} hold it (no majority stated in time)"))
                        } else {
                            Err(format!("only {agree} of {of} peers at round {round} state these parameters"))
                        }
                    }
                    Verdict::Pending { .. } => return,
                }
            }
        };
        let verified_by = match judged {
            Ok(v) => v,
            Err(reason) => return self.sync_failed(&format!("state refused: {reason}")),
        };
        if let ChainView::Unavailable(e) = &f.chain {
            warn!(reason = %e, "chain unreachable: the state is judged by the peers alone");
        }
        info!(round, param_hash = %hex(&hash), verified_by = %verified_by, "state verified");
        let header = f.state.header.clone();
        let tx = self.internal.clone();
        match &self.cfg.compute {
            Compute::Demo { .. } => self.restored(Hash::default()),
            Compute::Train(spec) => {
                // The cursor and step are the server's word (the statements cover the parameters):
                // at least they must be what rounds of this run can reach.
                let round = self.sync.as_ref().map_or(0, |s| s.round);
                let most_steps = round.saturating_mul(crate::train::config::MAX_LOCAL_STEPS);
                let most_samples =
                    round.saturating_mul(spec.most_samples).saturating_mul(self.cfg.round.max_peers as u64);
                if header.step > most_steps || header.cursor > most_samples {
                    let why = format!(
                        "its header claims {} optimizer steps and {} samples after {round} rounds, more than rounds of this \
                         run reach",
                        header.step, header.cursor
                    );
                    return self.sync_failed(&why);
                }
                let Some(sync) = self.sync.as_mut() else { return };
                sync.restoring = true;
                let f = sync.fetched.as_mut().expect("judged above");
                let mut moments = std::mem::take(&mut f.state.moments).into_iter();
                let optimizer = Optimizer {
                    config: spec.worker.optimizer.clone(),
                    step: header.step,
                    m: moments.next().unwrap_or_default(),
                    v: moments.next().unwrap_or_default(),
                };
                if optimizer_hash(&optimizer) != header.optimizer_hash {
                    return self.sync_failed("the optimizer state does not match its hash");
                }
                let expected = Some(f.state.header.tag.param_hash);
                let restore = spec.worker.restore(std::mem::take(&mut f.state.params), optimizer, expected);
                tokio::spawn(async move {
                    let r = match restore.await {
                        Ok(r) => r,
                        Err(e) => Err(e.to_string()),
                    };
                    let _ = tx.send(Internal::Sync(Event::Restored(r)));
                });
            }
        }
    }

    /// The state is restored: this peer holds the ring's parameters and goes on.
    fn restored(&mut self, hash: Hash) {
        let now = self.now();
        let Some(sync) = self.sync.take() else { return };
        let header = &sync.fetched.as_ref().expect("restored after fetching").state.header;
        if hash != header.tag.param_hash {
            // Only possible with a worker that computed something else: refuse, start over.
            self.sync = Some(sync);
            return self.sync_failed("the restored parameters hash to another value than announced");
        }
        self.next_round = sync.round;
        self.cursor = header.cursor;
        // A residual an attempt before the resync would have left counts for nothing now, nor
        // does this peer's own or what it knew of the others' (from a round it may have
        // completed on another branch): it starts again from zeros, which every member accepts,
        // and accepts the others' residuals as a member that missed rounds does.
        self.next_residual = None;
        self.residual = None;
        self.residual_history = (0, std::collections::BTreeMap::new());
        self.settle(&sync, &header.settlement);
        self.membership.set_state(StateTag { round: sync.round, param_hash: hash });
        if let Some(a) = self.asy.as_mut() {
            a.restored(sync.round, hash);
        }
        self.summary.syncs += 1;
        info!(
            round = sync.round,
            param_hash = %hex(&hash),
            cursor = self.cursor,
            ms = sync.started.elapsed().as_millis() as u64,
            "state restored"
        );
        let round = sync.round;
        self.pending.retain(|g| match g {
            Gossip::Commit(c) => c.round >= round,
            Gossip::Done(d) => d.round.saturating_add(1) >= round,
            Gossip::Failed(f) => f.round >= round,
            _ => false,
        });
        match sync.then {
            Some(view) => {
                let acts = self.membership.set_fetching(false, now);
                self.on_membership_actions(acts);
                if self.membership.ring() == Some(&view) {
                    self.start_round(view);
                }
            }
            None => {
                let acts = self.membership.synced(round, now);
                self.on_membership_actions(acts);
            }
        }
    }

    /// Settles this peer's unsettled attempts by what most peers that know say: the server's
    /// answer counts as one, and up to [`SETTLE_ASKED`] other live peers, picked at random, are
    /// asked too. A lying server alone can neither drop a credit the ring certified nor credit
    /// an attempt it did not; what no majority settles stays pending until the next sync.
    fn settle(&self, sync: &Sync, known: &Settlement) {
        if self.cfg.ledger.is_none() || sync.unsettled.is_empty() {
            return;
        }
        let server = sync.fetched.as_ref().map(|f| f.from);
        let mut peers: Vec<PeerId> = self
            .membership
            .settled_peers(self.now())
            .iter()
            .filter_map(|p| p.parse().ok())
            .filter(|p| Some(*p) != server)
            .collect();
        // A random sample, so that no peer id can place itself among the peers asked.
        let mut nonce = [0u8; 32];
        getrandom::fill(&mut nonce).expect("the OS has a source of randomness");
        peers.sort_by_cached_key(|p| *blake3::keyed_hash(&nonce, &p.to_bytes()).as_bytes());
        peers.truncate(SETTLE_ASKED);
        let (control, run, tx) = (self.net.control(), self.cfg.run, self.internal.clone());
        let (unsettled, known) = (sync.unsettled.clone(), known.clone());
        tokio::spawn(async move {
            let asks = peers.into_iter().map(|peer| {
                let (mut control, unsettled) = (control.clone(), &unsettled);
                async move { state_sync::settle(&mut control, peer, run, unsettled).await.ok() }
            });
            let mut answers: Vec<Settlement> = futures::future::join_all(asks).await.into_iter().flatten().collect();
            answers.push(known);
            let (settled, disputed) = Settlement::majority(&unsettled, &answers);
            if !disputed.is_empty() {
                warn!(
                    rounds = ?disputed,
                    answers = answers.len(),
                    "peers disagree on which attempts the ring certified: the majority decides, a tie leaves the credit pending"
                );
            }
            info!(
                asked = unsettled.len(),
                answers = answers.len(),
                certified = settled.certified.len(),
                not_certified = settled.not_certified.len(),
                "pending credits settled by what most peers that answered know"
            );
            let _ = tx.send(Internal::Settled(settled));
        });
    }

    /// What this peer knows of the attempts a peer asks about.
    fn settlement(&self, unsettled: &[AttemptRef]) -> Settlement {
        let mut s = Settlement::default();
        for a in unsettled {
            match self.certified.get(&a.round) {
                Some(done) if done == a => s.certified.push(a.round),
                Some(_) => s.not_certified.push(a.round),
                None => {}
            }
        }
        s
    }

    /// The fetch failed or its state was refused: a joiner tells its ring not to wait for
    /// it; either way this peer forms again at its own round and tries later.
    pub(super) fn sync_failed(&mut self, reason: &str) {
        let now = self.now();
        let Some(sync) = self.sync.take() else { return };
        warn!(round = sync.round, %reason, "cannot catch up yet");
        match sync.then {
            Some(view) => {
                self.publish(&Gossip::Failed(RoundFailed {
                    run: self.cfg.run,
                    peer: self.me.clone(),
                    round: view.round,
                    attempt: view.attempt,
                    reason: format!("could not fetch the ring's state: {reason}"),
                }));
                self.membership.form_at(self.next_round, now);
            }
            None => self.membership.sync_failed(now),
        }
        if self.leave == super::Leave::Requested {
            self.finish_leave();
        }
    }

    /// A peer asks for this peer's state for `round`: served now if this peer holds it, once
    /// this peer finishes the round before it, or refused.
    pub(super) fn serve(&mut self, req: ServeRequest) {
        let refuse = |req: ServeRequest, reason: String, have: StateTag| {
            let _ = req.reply.send(Answer::Refused(reason, have));
        };
        let Some(round) = req.round else {
            let _ = req.reply.send(Answer::Settled(self.settlement(&req.unsettled)));
            return;
        };
        if self.sync.is_some() {
            refuse(req, "this peer is fetching a state itself".into(), self.membership.state());
        } else if round == self.next_round {
            self.answer(req);
        } else if round > self.next_round {
            self.waiting_serves.push((req, Instant::now() + SERVE_WAIT));
        } else {
            refuse(req, format!("this peer is at round {} already", self.next_round), self.membership.state());
        }
    }

    /// Answers the waiting requests this peer can answer now, refuses the expired ones.
    pub(super) fn serve_waiting(&mut self) {
        if self.waiting_serves.is_empty() {
            return;
        }
        for (req, until) in std::mem::take(&mut self.waiting_serves) {
            if req.round.is_none_or(|r| r <= self.next_round) || Instant::now() >= until {
                self.serve_now_or_refuse(req);
            } else {
                self.waiting_serves.push((req, until));
            }
        }
    }

    fn serve_now_or_refuse(&mut self, req: ServeRequest) {
        if req.round == Some(self.next_round) && self.sync.is_none() {
            self.answer(req);
        } else {
            let reason = format!("this peer is at round {}", self.next_round);
            let _ = req.reply.send(Answer::Refused(reason, self.membership.state()));
        }
    }

    /// Sends this peer's state as it is once the applies queued so far are done: the state for
    /// `next_round`.
    fn answer(&self, req: ServeRequest) {
        let (run, round, cursor) = (self.cfg.run, self.next_round, self.cursor);
        info!(peer = %req.from, round, "serving this peer's state");
        let settlement = self.settlement(&req.unsettled);
        match &self.cfg.compute {
            Compute::Demo { .. } => {
                let header = StateHeader {
                    run,
                    tag: StateTag { round, param_hash: Hash::default() },
                    cursor,
                    step: 0,
                    optimizer_hash: Hash::default(),
                    params: 0,
                    moments: 0,
                    chunk_hashes: Vec::new(),
                    settlement,
                };
                let _ = req.reply.send(Answer::State(Served { header, bytes: Arc::new(Vec::new()) }));
            }
            Compute::Train(spec) => {
                let snapshot = spec.worker.snapshot();
                let moments = spec.worker.moments();
                tokio::spawn(async move {
                    let Ok(s) = snapshot.await else { return };
                    let served = tokio::task::spawn_blocking(move || {
                        let mut vectors: Vec<&[f32]> = vec![&s.optimizer.m];
                        if moments == 2 {
                            vectors.push(&s.optimizer.v);
                        }
                        let bytes = state_bytes(&s.params, &vectors);
                        let header = StateHeader {
                            run,
                            tag: StateTag { round, param_hash: s.param_hash },
                            cursor,
                            step: s.optimizer.step,
                            optimizer_hash: s.optimizer_hash,
                            params: s.params.len() as u64,
                            moments,
                            chunk_hashes: chunk_hashes(&bytes),
                            settlement,
                        };
                        Served { header, bytes: Arc::new(bytes) }
                    })
                    .await;
                    if let Ok(served) = served {
                        let _ = req.reply.send(Answer::State(served));
                    }
                });
            }
        }
    }
}
