//! The round driver: owns membership and the current round, and moves bytes
//! between them and the network. All protocol decisions are made by the pure
//! state machines of [`p2p_proto`]; this task only decodes, checks who sent
//! what, keeps time, and carries out their actions.

use crate::ledger::outbox::RoundTally;
use crate::ledger::task::LedgerHandle;
use crate::net::{NetEvent, NetHandle};
use crate::ring_io::{self, Inbound};
use crate::train::worker::{Reply, Worker};
use libp2p::PeerId;
use p2p_proto::codec::{decode_exact, encode_frame};
use p2p_proto::demo::demo_vector;
use p2p_proto::hash::hex;
use p2p_proto::membership::{Membership, MembershipAction, MembershipConfig, RingView};
use p2p_proto::message::{Gossip, PeerKey, RingStep, RunId};
use p2p_proto::round::{Contribution, Round, RoundAction, RoundConfig};
use p2p_proto::{FixedPoint, Hash};
use std::collections::VecDeque;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

/// How often timers are checked.
const TICK: Duration = Duration::from_millis(20);
/// Gossip for rounds this peer has not reached yet, kept until it gets there.
const MAX_PENDING_GOSSIP: usize = 4096;

/// Everything the driver needs to know about the run.
#[derive(Debug, Clone)]
pub struct DriverConfig {
    pub run: RunId,
    pub membership: MembershipConfig,
    pub round: RoundConfig,
    pub fixed: FixedPoint,
    /// What each round all-reduces.
    pub compute: Compute,
    /// Stop after this many rounds (round numbers `0..rounds`).
    pub rounds: Option<u64>,
    /// How long to wait for a stream to the right neighbour to open.
    pub open_timeout: Duration,
    /// Where completed rounds are reported for the on-chain ledger, if anywhere.
    pub ledger: Option<LedgerHandle>,
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
}

struct Driver {
    cfg: DriverConfig,
    net: NetHandle,
    me: PeerKey,
    epoch: Instant,
    membership: Membership,
    round: Option<Round>,
    writer: Option<mpsc::UnboundedSender<RingStep>>,
    pending: VecDeque<Gossip>,
    /// Contributions being computed off the event loop, for a ring, with the local loss.
    prepared_tx: mpsc::UnboundedSender<(RingView, Contribution, Option<f32>)>,
    /// Work after a training round (logs, ledger, evaluation, checkpoint), in round order.
    post_tx: mpsc::UnboundedSender<PostRound>,
    /// Samples consumed by the rounds completed so far: where the next round's stretch of the
    /// sample stream starts.
    cursor: u64,
    /// The local loss of the current round's micro-batch.
    loss: Option<f32>,
    /// Samples per round each peer announced (heartbeats, joins).
    batches: std::collections::HashMap<PeerKey, u64>,
    summary: Summary,
    finished: bool,
}

/// Runs rounds until the configured number is reached or `shutdown` resolves.
pub async fn run(
    cfg: DriverConfig,
    net: NetHandle,
    mut events: mpsc::UnboundedReceiver<NetEvent>,
    shutdown: impl std::future::Future<Output = ()>,
) -> Summary {
    let (inbound_tx, mut inbound) = mpsc::channel::<Inbound>(256);
    ring_io::spawn_acceptor(net.control(), inbound_tx);
    let me = net.local_peer_id.to_string();
    let (prepared_tx, mut prepared) = mpsc::unbounded_channel();
    let (post_tx, post_rx) = mpsc::unbounded_channel();
    let post_task = tokio::spawn(post_rounds(post_rx, cfg.ledger.clone()));
    let mut d = Driver {
        prepared_tx,
        post_tx,
        cursor: 0,
        loss: None,
        batches: std::collections::HashMap::new(),
        membership: Membership::new(cfg.run, me.clone(), cfg.membership.clone()),
        cfg,
        net,
        me,
        epoch: Instant::now(),
        round: None,
        writer: None,
        pending: VecDeque::new(),
        summary: Summary::default(),
        finished: false,
    };
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    tokio::pin!(shutdown);
    while !d.finished {
        tokio::select! {
            Some(ev) = events.recv() => d.on_net_event(ev),
            Some(msg) = inbound.recv() => d.on_inbound(msg),
            Some((view, input, loss)) = prepared.recv() => {
                d.loss = loss;
                d.on_prepared(view, input);
            }
            _ = tick.tick() => d.on_tick(),
            () = &mut shutdown => {
                info!("shutting down");
                break;
            }
        }
    }
    let summary = d.summary.clone();
    // Let the last round's apply, evaluation, checkpoint and ledger tally finish.
    drop(d);
    let _ = post_task.await;
    summary
}

/// What is left to do once a training round completed; the futures were queued on the
/// worker in round order when the round completed.
struct PostRound {
    round: u64,
    ring_size: usize,
    loss: Option<f32>,
    ring_samples: u64,
    own_samples: u64,
    own_commit: Hash,
    bytes_sent: u64,
    round_us: u64,
    applied: Reply<Hash>,
    evaluated: Option<Reply<f64>>,
    saved: Option<(PathBuf, Reply<Result<Hash, String>>)>,
}

async fn post_rounds(mut rx: mpsc::UnboundedReceiver<PostRound>, ledger: Option<LedgerHandle>) {
    while let Some(p) = rx.recv().await {
        let Ok(hash) = p.applied.await else {
            warn!(round = p.round, "the compute thread stopped; no more rounds can be applied");
            return;
        };
        let secs = (p.round_us as f64 / 1e6).max(1e-9);
        info!(
            round = p.round,
            ring_size = p.ring_size,
            loss = p.loss.unwrap_or(f32::NAN),
            samples = p.ring_samples,
            samples_per_s = p.ring_samples as f64 / secs,
            bytes_sent = p.bytes_sent,
            param_hash = %hex(&hash),
            "round trained"
        );
        if let Some(ledger) = &ledger {
            ledger.round_completed(RoundTally {
                round: p.round,
                samples: p.own_samples,
                commit: p.own_commit,
                param_hash: hash,
            });
        }
        if let Some(eval) = p.evaluated
            && let Ok(accuracy) = eval.await
        {
            info!(round = p.round, accuracy, "evaluated");
        }
        if let Some((path, saved)) = p.saved {
            match saved.await {
                Ok(Ok(h)) => info!(round = p.round, path = %path.display(), param_hash = %hex(&h), "checkpoint saved"),
                Ok(Err(e)) => warn!(round = p.round, path = %path.display(), reason = %e, "cannot save the checkpoint"),
                Err(_) => {}
            }
        }
    }
}

impl Driver {
    fn now(&self) -> u64 {
        self.epoch.elapsed().as_micros() as u64
    }

    fn publish(&self, g: &Gossip) {
        self.net.publish(encode_frame(g));
    }

    fn on_net_event(&mut self, ev: NetEvent) {
        match ev {
            NetEvent::Listening(addr) => {
                info!(%addr, "listening");
                println!("{addr}");
            }
            NetEvent::Gossip { source, data } => self.on_gossip(source, &data),
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
        match msg {
            Gossip::Heartbeat(h) => {
                self.batches.insert(h.peer.clone(), u64::from(h.batch));
                self.membership.on_heartbeat(&h, now)
            }
            Gossip::Join(j) => {
                self.batches.insert(j.peer.clone(), u64::from(j.batch));
                self.membership.on_join(&j, now)
            }
            Gossip::Commit(ref c) => {
                if let Some(r) = self.round.as_mut().filter(|r| r.is_for(c.round, c.attempt)) {
                    let acts = r.on_commit(c.clone(), now);
                    self.on_round_actions(acts);
                } else {
                    self.keep_for_later(msg);
                }
            }
            Gossip::Done(ref done) => {
                if let Some(r) = self.round.as_mut().filter(|r| r.is_for(done.round, done.attempt)) {
                    let acts = r.on_done(done.clone(), now);
                    self.on_round_actions(acts);
                } else if self.round.is_none() {
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
                }
            }
            Gossip::PartialSums(p) => {
                debug!(peer = %p.peer, round = p.round, sums = p.sums.len(), "partial-sum hashes");
            }
            Gossip::Checkpoint(c) => {
                debug!(peer = %c.peer, round = c.round, hash = %hex(&c.param_hash), "checkpoint announced");
            }
        }
    }

    /// Keeps a commit or `Done` for a round this peer may still start.
    fn keep_for_later(&mut self, msg: Gossip) {
        let round = match &msg {
            Gossip::Commit(c) => c.round,
            Gossip::Done(d) => d.round,
            _ => return,
        };
        if self.round.as_ref().is_some_and(|r| round < r.view().round) {
            return;
        }
        if self.pending.len() >= MAX_PENDING_GOSSIP {
            self.pending.pop_front();
        }
        self.pending.push_back(msg);
    }

    fn on_inbound(&mut self, msg: Inbound) {
        let now = self.now();
        let from = msg.from.to_string();
        let Some(round) = self.round.as_mut().filter(|r| *r.left() == from) else {
            warn!(peer = %from, "rejected ring frame: the sender is not this peer's left neighbour in the ring");
            msg.close.notify_one();
            return;
        };
        let step = msg.step.step();
        if !round.is_for(step.round, step.attempt) || step.run != self.cfg.run {
            debug!(peer = %from, round = step.round, attempt = step.attempt, "stale ring frame dropped");
            msg.close.notify_one();
            return;
        }
        let acts = round.on_step(msg.step, now);
        self.on_round_actions(acts);
    }

    fn on_tick(&mut self) {
        let now = self.now();
        let acts = self.membership.tick(now);
        self.on_membership_actions(acts);
        if let Some(r) = self.round.as_mut() {
            let gone = self.membership.dead_members(now);
            let mut acts = r.members_gone(&gone);
            acts.extend(r.tick(now));
            self.on_round_actions(acts);
        }
    }

    fn on_membership_actions(&mut self, acts: Vec<MembershipAction>) {
        for a in acts {
            match a {
                MembershipAction::Publish(g) => self.publish(&g),
                MembershipAction::Start(view) => self.start_round(view),
            }
        }
    }

    /// Computes this peer's contribution for `view` on a blocking thread, so
    /// heartbeats and gossip keep flowing while a large vector is hashed.
    fn start_round(&mut self, view: RingView) {
        if self.finished {
            return;
        }
        let now = self.now();
        if let Err(e) = self.cfg.fixed.check_ring_size(view.len()) {
            warn!(round = view.round, reason = %e, "cannot run this ring");
            self.membership.round_failed(now);
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
        let (run, me, fixed, seg) = (self.cfg.run, self.me.clone(), self.cfg.fixed, self.cfg.round.segment_elems);
        let tx = self.prepared_tx.clone();
        match &self.cfg.compute {
            Compute::Demo { len } => {
                let len = *len;
                tokio::task::spawn_blocking(move || {
                    let values = demo_vector(run, view.round, &me, len);
                    let data = fixed.encode(&values).expect("demo values are finite");
                    // The demonstration has no parameters: its parameter hash is zero.
                    let input = Contribution::new(data, 1, Hash::default(), joiners, view.len(), seg);
                    let _ = tx.send((view, input, None));
                });
            }
            Compute::Train(spec) => {
                let n = view.len();
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
                let total: u64 = batches.iter().sum();
                let start = self.cursor + batches[..pos].iter().sum::<u64>();
                let weight = (spec.batch as f64 / total as f64) as f32;
                let gradient = spec.worker.gradient(start, spec.batch, weight);
                tokio::spawn(async move {
                    let Ok(g) = gradient.await else { return };
                    if !g.loss.is_finite() {
                        warn!(
                            round = view.round,
                            loss = g.loss,
                            "the loss is not finite; not contributing to this round"
                        );
                        return;
                    }
                    let prepared = tokio::task::spawn_blocking(move || {
                        let data = fixed.encode(&g.weighted).map_err(|e| e.to_string())?;
                        let input = Contribution::new(data, g.samples as u64, g.param_hash, joiners, n, seg)
                            .with_ring_batches(batches);
                        Ok::<_, String>((input, g.loss))
                    })
                    .await;
                    match prepared {
                        Ok(Ok((input, loss))) => {
                            let _ = tx.send((view, input, Some(loss)));
                        }
                        Ok(Err(e)) => warn!(round = view.round, reason = %e, "cannot encode the gradient"),
                        Err(_) => {}
                    }
                });
            }
        }
    }

    fn on_prepared(&mut self, view: RingView, input: Contribution) {
        if self.finished || self.round.is_some() || self.membership.ring() != Some(&view) {
            debug!(round = view.round, attempt = view.attempt, "contribution for a ring no longer current; dropped");
            return;
        }
        let now = self.now();
        let (round, acts) = Round::new(self.cfg.run, &self.me, view, input, self.cfg.round.clone(), now);
        self.writer = (round.view().len() > 1)
            .then(|| ring_io::spawn_writer(self.net.control(), round.right().clone(), self.cfg.open_timeout));
        let (r, a) = (round.view().round, round.view().attempt);
        self.round = Some(round);
        self.on_round_actions(acts);
        // Commits and Dones that arrived before this peer started the round.
        let (now_msgs, later): (Vec<Gossip>, Vec<Gossip>) = std::mem::take(&mut self.pending)
            .into_iter()
            .filter(|g| match g {
                Gossip::Commit(c) => c.round >= r,
                Gossip::Done(d) => d.round >= r,
                _ => false,
            })
            .partition(|g| match g {
                Gossip::Commit(c) => (c.round, c.attempt) == (r, a),
                Gossip::Done(d) => (d.round, d.attempt) == (r, a),
                _ => false,
            });
        self.pending = later.into();
        for g in now_msgs {
            let now = self.now();
            let Some(round) = self.round.as_mut() else { break };
            let acts = match g {
                Gossip::Commit(c) => round.on_commit(c, now),
                Gossip::Done(d) => round.on_done(d, now),
                _ => Vec::new(),
            };
            self.on_round_actions(acts);
        }
    }

    fn on_round_actions(&mut self, acts: Vec<RoundAction>) {
        for a in acts {
            match a {
                RoundAction::Publish(g) => self.publish(&g),
                RoundAction::Send(step) => {
                    if let Some(w) = &self.writer {
                        let _ = w.send(step);
                    }
                }
                RoundAction::Completed(o) => {
                    let now = self.now();
                    self.writer = None;
                    self.round = None;
                    self.summary.rounds_completed += 1;
                    self.summary.last_round = Some(o.view.round);
                    self.cursor += o.samples;
                    match &self.cfg.compute {
                        Compute::Demo { .. } => {
                            if let Some(ledger) = &self.cfg.ledger {
                                // The demonstration has no parameters: the agreed sum stands for them.
                                ledger.round_completed(RoundTally {
                                    round: o.view.round,
                                    samples: o.own_samples,
                                    commit: o.own_commit,
                                    param_hash: o.sum_hash,
                                });
                            }
                        }
                        Compute::Train(spec) => {
                            let round = o.view.round;
                            let last = self.cfg.rounds.is_some_and(|n| round + 1 >= n);
                            // Queued now, in round order, before any later round's gradient.
                            let applied = spec.worker.apply(self.cfg.fixed.decode(&o.sum));
                            let evaluated = (last || (spec.eval_every > 0 && (round + 1) % spec.eval_every == 0))
                                .then(|| spec.worker.evaluate());
                            let saved = (last || (round + 1) % spec.epoch_rounds.max(1) == 0).then(|| {
                                let path = spec.checkpoint_dir.join(format!("round-{round}.safetensors"));
                                (path.clone(), spec.worker.save(path))
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
                        position = o.position,
                        members = %o.view.members.join(","),
                        len = o.sum.len(),
                        bytes_sent = o.bytes_sent,
                        bytes_received = o.bytes_received,
                        reduce_us = o.reduce_us,
                        round_us = o.round_us,
                        result_hash = %hex(&o.sum_hash),
                        commit = %hex(&o.own_commit),
                        "round complete"
                    );
                    if self.cfg.rounds.is_some_and(|n| o.view.round + 1 >= n) {
                        info!(rounds = o.view.round + 1, "all rounds done");
                        self.finished = true;
                        return;
                    }
                    let acts = self.membership.round_completed(o.next, now);
                    self.on_membership_actions(acts);
                }
                RoundAction::Failed(reason) => {
                    let now = self.now();
                    if let Some(r) = self.round.take() {
                        warn!(round = r.view().round, attempt = r.view().attempt, %reason, "round failed");
                    }
                    self.writer = None;
                    self.summary.rounds_failed += 1;
                    self.membership.round_failed(now);
                }
            }
        }
    }
}
