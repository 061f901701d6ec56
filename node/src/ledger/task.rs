//! The ledger actor. It owns the contract client and sends what the outbox
//! holds. A completed round is written to the outbox by the caller of
//! [`LedgerHandle::round_completed`] (one small redb transaction, so a crash
//! right after it loses nothing), then the task is woken; nobody waits for the
//! chain.
//!
//! Sending, oldest record first: a record already on chain is marked done
//! without sending; one the contract would refuse (checked by a dry run) is
//! marked rejected with the contract's reason; the rest are sent with
//! consecutive nonces from this task, the only writer for its key, then their
//! receipts awaited. Registration and run creation are barriers: later records
//! depend on them, so they are sent alone. While the chain is unreachable,
//! records wait and the task retries with exponential backoff. A record is
//! never lost (it is in redb before anything is sent) and never lands twice
//! (the contract keeps one record per key, and the outbox checks the chain
//! before every resend).

use super::client::{Client, ClientError, OnChain};
use super::outbox::{B32, Depth, Entry, Outbox, OutboxError, PendingCredit, Record, RoundTally, Settled, Status};
use alloy::primitives::B256;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tracing::{debug, error, info, warn};

/// Records sent back to back before their receipts are awaited.
const MAX_IN_FLIGHT: usize = 16;
/// Longest wait for one receipt before the task checks again on its next pass.
const RECEIPT_TIMEOUT: Duration = Duration::from_secs(30);
const BACKOFF_MIN: Duration = Duration::from_millis(250);
/// A record refused for a reason that can pass (its run or a peer it names not on chain yet)
/// is tried this many times, the waits doubling from [`DEFER_FIRST`] to [`DEFER_MAX`] (about
/// 10 minutes in all), before it counts as rejected.
const DEFER_TRIES: u32 = 10;
const DEFER_FIRST: Duration = Duration::from_secs(2);
const DEFER_MAX: Duration = Duration::from_secs(120);
/// Contract errors a later state of the chain can clear.
const PASSING_ERRORS: [&str; 2] = ["NotRegistered", "UnknownRun"];
const BACKOFF_MAX: Duration = Duration::from_secs(10);

/// What the run looks like on chain.
#[derive(Debug, Clone)]
pub struct LedgerConfig {
    pub run: B32,
    pub config_hash: B32,
    /// K: one contribution record per K rounds.
    pub epoch_rounds: u64,
    pub quorum_bps: u16,
    pub min_votes: u16,
    /// This peer's libp2p peer id (multihash bytes).
    pub peer_id: Vec<u8>,
}

enum Event {
    /// New records are in the outbox.
    Wake,
    Finish(oneshot::Sender<Depth>),
}

/// The driver's handle: cheap to clone, never waits for the chain.
#[derive(Debug, Clone)]
pub struct LedgerHandle {
    tx: mpsc::UnboundedSender<Event>,
    outbox: Outbox,
    run: B32,
    epoch_rounds: u64,
}

impl LedgerHandle {
    /// Notes a round this peer completed: its tally (and the records of any epoch it closes)
    /// are in the outbox when this returns; the ledger task then sends them. A round credited
    /// before is not counted again.
    pub fn round_completed(&self, t: RoundTally) {
        match self.outbox.round_completed(self.run, self.epoch_rounds, t) {
            Ok(Some(recs)) => {
                log_queued(&recs);
                let _ = self.tx.send(Event::Wake);
            }
            Ok(None) => warn!(
                round = t.round,
                "round credited before (this peer went back to an older state); not counted again"
            ),
            Err(e) => error!(round = t.round, reason = %e, "cannot store the round in the ledger outbox"),
        }
    }

    /// Queues the report of a proven fault of the peer `peer_id` (multihash bytes) at `round`,
    /// with the digest of its evidence; any peer's report counts, and one per fault lands.
    pub fn report_fault(&self, peer_id: Vec<u8>, round: u64, kind: u8, evidence: B32) {
        let record = Record::FaultOf { run: self.run, peer_id, round, kind, evidence };
        match self.outbox.push(record) {
            Ok((_, true)) => {
                info!(round, kind, evidence = %hex::encode(evidence), "fault report queued for the ledger");
                let _ = self.tx.send(Event::Wake);
            }
            Ok((_, false)) => {}
            Err(e) => error!(round, reason = %e, "cannot store the fault report in the ledger outbox"),
        }
    }

    /// Records of the outbox by status (a blocking redb read); none if it cannot be read.
    pub fn depth(&self) -> Option<Depth> {
        self.outbox.depth().ok()
    }

    /// Notes the attempt this peer is in before it announces its sum (a blocking redb write:
    /// call it off the event loop).
    pub fn note_pending(&self, p: PendingCredit) -> Result<(), OutboxError> {
        self.outbox.note_pending(self.run, p)
    }

    /// Attempts noted and not yet credited (this peer died before it learnt their outcome).
    pub fn pending(&self) -> Vec<PendingCredit> {
        self.outbox.pending(&self.run).unwrap_or_else(|e| {
            error!(reason = %e, "cannot read the pending credits");
            Vec::new()
        })
    }

    /// Credits the pending attempts that the ring certified, drops those it certified with
    /// another attempt, keeps the rest, and logs each (see [`Outbox::resolve_pending`]).
    pub fn resolve_pending(&self, certified: &[u64], not_certified: &[u64]) {
        match self.outbox.resolve_pending(self.run, self.epoch_rounds, certified, not_certified) {
            Ok(Settled { credited, dropped, records }) => {
                for p in &credited {
                    info!(
                        round = p.round,
                        attempt = p.attempt,
                        samples = p.samples,
                        commit = %hex::encode(p.commit),
                        "credit recovered: the ring certified this round while this peer was away"
                    );
                }
                for p in &dropped {
                    info!(
                        round = p.round,
                        attempt = p.attempt,
                        "pending credit dropped: the ring did not certify that attempt with this peer"
                    );
                }
                log_queued(&records);
                let _ = self.tx.send(Event::Wake);
            }
            Err(e) => error!(reason = %e, "cannot settle the pending credits"),
        }
    }

    /// Closes the open epochs and waits up to `timeout` for every record to be on chain.
    /// Returns the outbox depth when it emptied, or `None` on timeout (the records stay in the
    /// outbox and are sent when the node next starts with this data directory).
    pub async fn finish(&self, timeout: Duration) -> Option<Depth> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(Event::Finish(reply)).ok()?;
        tokio::time::timeout(timeout, rx).await.ok()?.ok()
    }
}

/// Starts the ledger task: queues the run creation (a no-op on chain if the run exists with
/// the same configuration) and this peer's registration, then sends whatever is open.
pub fn spawn(client: Client, outbox: Outbox, cfg: LedgerConfig) -> Result<LedgerHandle, OutboxError> {
    let (rounds, pending) = outbox.adopt_unowned(cfg.run)?;
    if rounds + pending > 0 {
        info!(
            rounds,
            pending, "tallied rounds and pending credits from before runs were kept apart: counted for this run"
        );
    }
    outbox.push(Record::CreateRun {
        run: cfg.run,
        config_hash: cfg.config_hash,
        epoch_rounds: cfg.epoch_rounds,
        quorum_bps: cfg.quorum_bps,
        min_votes: cfg.min_votes,
    })?;
    outbox.push(Record::Register { run: cfg.run, peer_id: cfg.peer_id.clone() })?;
    let (tx, rx) = mpsc::unbounded_channel();
    let handle = LedgerHandle { tx, outbox: outbox.clone(), run: cfg.run, epoch_rounds: cfg.epoch_rounds };
    let task = Task {
        client,
        outbox,
        cfg,
        nonce: None,
        backoff: BACKOFF_MIN,
        unreachable_since: None,
        deferred: std::collections::HashMap::new(),
    };
    tokio::spawn(task.run(rx));
    Ok(handle)
}

struct Task {
    client: Client,
    outbox: Outbox,
    cfg: LedgerConfig,
    /// Next nonce of this account, while it is known; re-read from the chain after any error.
    nonce: Option<u64>,
    backoff: Duration,
    unreachable_since: Option<Instant>,
    /// Entries refused for a reason that can pass: how often, and when to try again.
    deferred: std::collections::HashMap<u64, (u32, Instant)>,
}

/// Why a pass stopped early.
enum Stop {
    /// The chain could not be asked; retry after the backoff.
    Transient(ClientError),
    /// A sent transaction is still waiting to be mined; look again soon.
    Waiting,
}

fn log_queued(recs: &[Record]) {
    for r in recs {
        match r {
            Record::Contribution { epoch, part, rounds, samples, .. } => {
                info!(epoch, part, rounds, samples, "contribution queued for the ledger")
            }
            Record::Vote { round, param_hash, .. } => {
                info!(round, hash = %B256::from(*param_hash), "checkpoint vote queued for the ledger")
            }
            other => debug!(kind = other.kind(), "record queued for the ledger"),
        }
    }
}

impl Task {
    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Event>) {
        let mut finishing: Option<oneshot::Sender<Depth>> = None;
        let mut next_pass = Instant::now();
        loop {
            tokio::select! {
                ev = rx.recv() => match ev {
                    Some(Event::Wake) => {}
                    Some(Event::Finish(reply)) => {
                        match self.outbox.close_all(self.cfg.run, self.cfg.epoch_rounds) {
                            Ok(recs) => log_queued(&recs),
                            Err(e) => error!(reason = %e, "cannot close the open epoch"),
                        }
                        finishing = Some(reply);
                        next_pass = Instant::now();
                    }
                    // The node is gone without finishing: what is open stays in the outbox.
                    None => return,
                },
                () = tokio::time::sleep_until(next_pass) => {
                    let open = self.pass().await;
                    next_pass = Instant::now() + if open == 0 { Duration::from_secs(3600) } else { self.backoff };
                    if open == 0 && let Some(reply) = finishing.take() {
                        let depth = self.outbox.depth().unwrap_or_default();
                        let _ = reply.send(depth);
                        return;
                    }
                }
            }
            if !rx.is_empty() {
                continue;
            }
            // New records go out at once unless the chain is backing off.
            if self.unreachable_since.is_none() {
                next_pass = next_pass.min(Instant::now());
            }
        }
    }

    /// One pass over the open entries; returns how many are still open.
    async fn pass(&mut self) -> usize {
        let result = self.send_open().await;
        let open = match self.outbox.open_entries() {
            Ok(o) => o.len(),
            Err(e) => {
                error!(reason = %e, "cannot read the ledger outbox");
                return 1;
            }
        };
        match result {
            Ok(()) | Err(Stop::Waiting) => {
                if let Some(since) = self.unreachable_since.take() {
                    info!(down_ms = since.elapsed().as_millis() as u64, open, "chain reachable again");
                }
                self.backoff = if result.is_ok() { BACKOFF_MIN } else { Duration::from_millis(200) };
            }
            Err(Stop::Transient(e)) => {
                self.nonce = None;
                if self.unreachable_since.is_none() {
                    self.unreachable_since = Some(Instant::now());
                    warn!(reason = %e, open, "ledger writes wait in the outbox; training goes on");
                } else {
                    debug!(reason = %e, open, "chain still unreachable");
                }
                self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
            }
        }
        open
    }

    async fn send_open(&mut self) -> Result<(), Stop> {
        loop {
            let open = self.outbox.open_entries().map_err(|e| Stop::Transient(ClientError::Other(e.to_string())))?;
            self.deferred.retain(|seq, _| open.iter().any(|e| e.seq == *seq));
            // Entries waiting to be tried again are left out; nothing passes a waiting barrier.
            let now = Instant::now();
            let waiting = |e: &Entry| self.deferred.get(&e.seq).is_some_and(|(_, at)| *at > now);
            let open: Vec<Entry> = open
                .iter()
                .take_while(|e| !(e.record.is_barrier() && waiting(e)))
                .filter(|e| !waiting(e))
                .cloned()
                .collect();
            if open.is_empty() {
                return Ok(());
            }
            // A barrier goes alone; otherwise a run of independent records, up to the limit.
            let batch: Vec<Entry> = if open[0].record.is_barrier() {
                vec![open[0].clone()]
            } else {
                open.iter().take_while(|e| !e.record.is_barrier()).take(MAX_IN_FLIGHT).cloned().collect()
            };
            let mut in_flight = Vec::new();
            for entry in &batch {
                if let Some(tx) = self.advance(entry).await? {
                    in_flight.push((entry, tx));
                }
            }
            for (entry, tx) in in_flight {
                self.await_receipt(entry, tx).await?;
            }
        }
    }

    fn set(&self, seq: u64, status: Status) {
        if let Err(e) = self.outbox.set_status(seq, status) {
            error!(seq, reason = %e, "cannot update the ledger outbox");
        }
    }

    /// Moves one entry forward: done if the chain has it, rejected if the contract refuses it,
    /// otherwise sent. Returns the transaction to wait for.
    async fn advance(&mut self, entry: &Entry) -> Result<Option<B256>, Stop> {
        let transient = Stop::Transient;
        if let Status::Sent { tx, .. } = entry.status {
            let tx = B256::from(tx);
            match self.client.receipt(tx, Duration::ZERO).await.map_err(transient)? {
                Some(_) => return Ok(Some(tx)),
                None if self.client.tx_known(tx).await.map_err(transient)? => return Err(Stop::Waiting),
                // The endpoint lost it (a restarted chain, a dropped pool): check and resend.
                None => debug!(seq = entry.seq, %tx, "sent transaction unknown to the chain; resending"),
            }
        }
        match self.client.on_chain(&entry.record).await.map_err(transient)? {
            OnChain::Same => {
                info!(kind = entry.record.kind(), key = %entry.record.key(), "record already on chain");
                self.set(entry.seq, Status::Done { tx: None, block: None });
                return Ok(None);
            }
            OnChain::Different(reason) => {
                error!(kind = entry.record.kind(), key = %entry.record.key(), %reason, "ledger record rejected");
                self.set(entry.seq, Status::Rejected { reason });
                return Ok(None);
            }
            OnChain::NotYet(reason) => {
                self.defer(entry, reason);
                return Ok(None);
            }
            OnChain::Absent => {}
        }
        match self.client.simulate(&entry.record).await {
            Ok(()) => {}
            // Another peer's report of the same fault landed between the look and the dry run:
            // one report per fault is what the chain keeps, so this one is there.
            Err(ClientError::Rejected { name: "FaultAlreadyReported", .. }) => {
                info!(kind = entry.record.kind(), key = %entry.record.key(), "record already on chain (another peer reported the fault)");
                self.set(entry.seq, Status::Done { tx: None, block: None });
                return Ok(None);
            }
            Err(ClientError::Rejected { name, message, .. }) if PASSING_ERRORS.contains(&name) => {
                self.defer(entry, format!("{name}: {message}"));
                return Ok(None);
            }
            Err(ClientError::Rejected { name, message, .. }) => {
                error!(kind = entry.record.kind(), key = %entry.record.key(), error = name, reason = %message, "ledger record rejected by the contract");
                self.set(entry.seq, Status::Rejected { reason: format!("{name}: {message}") });
                return Ok(None);
            }
            Err(e) => return Err(transient(e)),
        }
        let nonce = match self.nonce {
            Some(n) => n,
            None => self.client.next_nonce().await.map_err(transient)?,
        };
        let tx = self.client.send(&entry.record, Some(nonce)).await.map_err(transient)?;
        self.nonce = Some(nonce + 1);
        self.set(entry.seq, Status::Sent { tx: tx.0, nonce });
        debug!(kind = entry.record.kind(), nonce, %tx, "ledger record sent");
        Ok(Some(tx))
    }

    /// `entry` is refused for `reason`, which a later state of the chain can clear: tried
    /// again later, and rejected after [`DEFER_TRIES`] tries.
    fn defer(&mut self, entry: &Entry, reason: String) {
        let tries = self.deferred.get(&entry.seq).map_or(0, |(n, _)| *n) + 1;
        if tries > DEFER_TRIES {
            self.deferred.remove(&entry.seq);
            error!(kind = entry.record.kind(), key = %entry.record.key(), %reason, tries = DEFER_TRIES, "ledger record rejected: still refused after every try");
            self.set(
                entry.seq,
                Status::Rejected { reason: format!("{reason} (still refused after {DEFER_TRIES} tries)") },
            );
            return;
        }
        let wait = DEFER_FIRST.saturating_mul(1 << (tries - 1).min(16)).min(DEFER_MAX);
        warn!(kind = entry.record.kind(), key = %entry.record.key(), %reason, tries, wait_s = wait.as_secs(), "ledger record refused for now; tried again later");
        self.deferred.insert(entry.seq, (tries, Instant::now() + wait));
    }

    async fn await_receipt(&mut self, entry: &Entry, tx: B256) -> Result<(), Stop> {
        let seq = entry.seq;
        match self.client.receipt(tx, RECEIPT_TIMEOUT).await.map_err(Stop::Transient)? {
            Some((true, block)) => {
                info!(kind = entry.record.kind(), key = %entry.record.key(), block, %tx, "recorded on chain");
                self.set(seq, Status::Done { tx: Some(tx.0), block: Some(block) });
                Ok(())
            }
            Some((false, block)) => {
                // Someone changed the state between the dry run and the block (another peer
                // created the run first, say): look at the chain again on the next pass.
                debug!(seq, block, %tx, "ledger transaction reverted; will re-check");
                self.set(seq, Status::Pending);
                self.nonce = None;
                Ok(())
            }
            None => Err(Stop::Waiting),
        }
    }
}
