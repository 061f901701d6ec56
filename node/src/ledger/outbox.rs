//! The durable outbox: every ledger write is stored here before it is sent,
//! and stays until the chain shows it. Entries move Pending -> Sent -> Done
//! (or Rejected, with the contract's reason). Each record has a key naming
//! what it is about (`vote:<run>:<round>`), so pushing the same record twice,
//! for example after a restart, adds nothing.
//!
//! The outbox also keeps the per-round tally of this peer's completed rounds,
//! from which the contribution of each epoch of K rounds is built; closing an
//! epoch deletes its tally and stores its records in one transaction, so a
//! crash loses neither. A peer that leaves mid-epoch records what it did as one
//! part of the epoch; if it comes back within the epoch, the rounds it does then
//! become the next part. A watermark (the highest round ever tallied) makes sure
//! no round is credited twice, even when a restarted peer's state goes back to an
//! older checkpoint and a round number comes round again.
//!
//! A round can be certified by the other members with this peer's gradient in it
//! while this peer dies before it learns so. So before a member announces its
//! sum, the attempt it is in is noted as a *pending credit*; the round's tally
//! replaces it. A peer that comes back with pending credits asks the peer it
//! fetches the ring's state from, and other live peers, which of those attempts the
//! ring certified, and credits exactly those most of them name
//! ([`Outbox::resolve_pending`]).

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::Arc;

const ENTRIES: TableDefinition<u64, &[u8]> = TableDefinition::new("ledger_outbox");
const KEYS: TableDefinition<&str, u64> = TableDefinition::new("ledger_outbox_keys");
/// The entries still open (pending or sent), so a pass does not read every done entry again.
const OPEN: TableDefinition<u64, ()> = TableDefinition::new("ledger_outbox_open");
/// This peer's completed rounds not yet in a closed epoch, by (run id, round): a data
/// directory may serve several runs, and one run's rounds must never close another's epochs.
const TALLY: TableDefinition<(&[u8], u64), &[u8]> = TableDefinition::new("ledger_run_round_tally");
/// Per run (hex id): one past the highest round ever tallied.
const CREDITED: TableDefinition<&str, u64> = TableDefinition::new("ledger_credited_through");
/// Rounds this peer committed to and may have completed, by (run id, round): the attempt it
/// is in.
const PENDING: TableDefinition<(&[u8], u64), &[u8]> = TableDefinition::new("ledger_run_pending_credit");
/// The tables before runs were told apart, keyed by round alone: what they hold is adopted by
/// the run that opens the outbox first ([`Outbox::adopt_unowned`]), as it was used before.
const UNOWNED_TALLY: TableDefinition<u64, &[u8]> = TableDefinition::new("ledger_round_tally");
const UNOWNED_PENDING: TableDefinition<u64, &[u8]> = TableDefinition::new("ledger_pending_credit");

pub type B32 = [u8; 32];

/// One write to the ledger contract, as this peer will send it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Record {
    CreateRun {
        run: B32,
        config_hash: B32,
        epoch_rounds: u64,
        quorum_bps: u16,
        min_votes: u16,
    },
    Register {
        run: B32,
        peer_id: Vec<u8>,
    },
    /// This peer's work in `epoch`, or in one stretch of it (`part` 0, 1, ...) when it left
    /// and came back within the epoch.
    Contribution {
        run: B32,
        epoch: u64,
        part: u32,
        rounds: u64,
        samples: u64,
        commit_root: B32,
    },
    Vote {
        run: B32,
        round: u64,
        param_hash: B32,
    },
    Fault {
        run: B32,
        accused: [u8; 20],
        round: u64,
        kind: u8,
        evidence: B32,
    },
    /// A fault of the peer with libp2p peer id `peer_id` (multihash bytes): the chain gives its
    /// account when the report is sent.
    FaultOf {
        run: B32,
        peer_id: Vec<u8>,
        round: u64,
        kind: u8,
        evidence: B32,
    },
}

/// The key prefix of the contribution records of one epoch (one per part).
fn contribution_prefix(run: &B32, epoch: u64) -> String {
    format!("contribution:{}:{epoch}:", hex::encode(run))
}

impl Record {
    /// What the record is about: two records with one key are one write.
    pub fn key(&self) -> String {
        match self {
            Record::CreateRun { run, .. } => format!("create-run:{}", hex::encode(run)),
            Record::Register { run, .. } => format!("register:{}", hex::encode(run)),
            Record::Contribution { run, epoch, part, .. } => {
                format!("{}{part}", contribution_prefix(run, *epoch))
            }
            Record::Vote { run, round, .. } => format!("vote:{}:{round}", hex::encode(run)),
            Record::Fault { run, accused, round, kind, .. } => {
                format!("fault:{}:{}:{round}:{kind}", hex::encode(run), hex::encode(accused))
            }
            Record::FaultOf { run, peer_id, round, kind, .. } => {
                format!("fault-of:{}:{}:{round}:{kind}", hex::encode(run), hex::encode(peer_id))
            }
        }
    }

    /// Short name for logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Record::CreateRun { .. } => "create-run",
            Record::Register { .. } => "register",
            Record::Contribution { .. } => "contribution",
            Record::Vote { .. } => "vote",
            Record::Fault { .. } | Record::FaultOf { .. } => "fault",
        }
    }

    /// Records later ones depend on (the run must exist and this peer be registered before it
    /// records anything): sent alone and waited for.
    pub fn is_barrier(&self) -> bool {
        matches!(self, Record::CreateRun { .. } | Record::Register { .. })
    }
}

/// Where an entry stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Status {
    Pending,
    /// Handed to the RPC endpoint as transaction `tx` with `nonce`; not yet seen mined.
    Sent {
        tx: B32,
        nonce: u64,
    },
    /// On chain: mined by us in `tx` at `block`, or found there already (`tx` unknown).
    Done {
        tx: Option<B32>,
        block: Option<u64>,
    },
    /// The contract refuses it for good; `reason` is the readable explanation.
    Rejected {
        reason: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub seq: u64,
    pub record: Record,
    pub status: Status,
    /// Send attempts so far.
    pub attempts: u32,
}

impl Entry {
    pub fn is_open(&self) -> bool {
        matches!(self.status, Status::Pending | Status::Sent { .. })
    }
}

/// One completed round, as this peer's contribution counts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoundTally {
    pub round: u64,
    pub samples: u64,
    /// Digest of this peer's gradient commit in the round.
    pub commit: B32,
    /// The parameter hash every member held after the round.
    pub param_hash: B32,
}

/// An attempt this peer committed to and may have completed: credited once the ring is known
/// to have certified it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingCredit {
    pub round: u64,
    pub attempt: u32,
    /// Hash of the attempt's ring (its members in order).
    pub ring: B32,
    pub samples: u64,
    /// Digest of this peer's commit in the attempt.
    pub commit: B32,
    /// Whether the round may be credited: it was not credited before the note (set by
    /// [`Outbox::note_pending`]).
    pub creditable: bool,
}

/// What settling the pending credits did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Settled {
    pub credited: Vec<PendingCredit>,
    pub dropped: Vec<PendingCredit>,
    /// The records the credited rounds created (epochs they closed).
    pub records: Vec<Record>,
}

#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    #[error("ledger outbox: {0}")]
    Db(Box<redb::Error>),
    #[error("ledger outbox entry {seq} is corrupt ({reason}): move the data directory aside or repair it")]
    Corrupt { seq: u64, reason: String },
}

impl<E: Into<redb::Error>> From<E> for OutboxError {
    fn from(e: E) -> Self {
        OutboxError::Db(Box::new(e.into()))
    }
}

/// Counts by status, for logs and status pages.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Depth {
    pub pending: usize,
    pub sent: usize,
    pub done: usize,
    pub rejected: usize,
}

/// The outbox, over the node's redb database.
#[derive(Debug, Clone)]
pub struct Outbox {
    db: Arc<Database>,
}

fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    postcard::to_allocvec(v).expect("outbox values serialize")
}

impl Outbox {
    pub fn new(db: Arc<Database>) -> Result<Self, OutboxError> {
        let w = db.begin_write()?;
        {
            // The open index is rebuilt from the entries at every start (a database written
            // before the index existed has none).
            let entries = w.open_table(ENTRIES)?;
            let mut open = w.open_table(OPEN)?;
            open.retain(|_, _| false)?;
            for item in entries.iter()? {
                let (k, v) = item?;
                let entry: Entry = postcard::from_bytes(v.value())
                    .map_err(|e| OutboxError::Corrupt { seq: k.value(), reason: e.to_string() })?;
                if entry.is_open() {
                    open.insert(k.value(), ())?;
                }
            }
        }
        w.open_table(KEYS)?;
        w.open_table(TALLY)?;
        w.open_table(CREDITED)?;
        w.open_table(PENDING)?;
        w.open_table(UNOWNED_TALLY)?;
        w.open_table(UNOWNED_PENDING)?;
        w.commit()?;
        Ok(Self { db })
    }

    /// Moves what the tables from before runs were told apart hold into `run`'s (a data
    /// directory written by an earlier version tallied its rounds by round alone); returns how
    /// many rounds and pending credits moved.
    pub fn adopt_unowned(&self, run: B32) -> Result<(usize, usize), OutboxError> {
        let w = self.db.begin_write()?;
        let moved = {
            let mut moved = (0, 0);
            for (from, to, n) in [(UNOWNED_TALLY, TALLY, &mut moved.0), (UNOWNED_PENDING, PENDING, &mut moved.1)] {
                let mut old = w.open_table(from)?;
                let mut new = w.open_table(to)?;
                for item in old.iter()? {
                    let (k, v) = item?;
                    new.insert((run.as_slice(), k.value()), v.value())?;
                    *n += 1;
                }
                old.retain(|_, _| false)?;
            }
            moved
        };
        w.commit()?;
        Ok(moved)
    }

    /// Stores `record` as pending unless a record with its key exists; returns its sequence
    /// number and whether it was new.
    pub fn push(&self, record: Record) -> Result<(u64, bool), OutboxError> {
        let w = self.db.begin_write()?;
        let out = Self::push_in(&w, record)?;
        w.commit()?;
        Ok(out)
    }

    fn push_in(w: &redb::WriteTransaction, record: Record) -> Result<(u64, bool), OutboxError> {
        let key = record.key();
        let mut keys = w.open_table(KEYS)?;
        if let Some(seq) = keys.get(key.as_str())? {
            return Ok((seq.value(), false));
        }
        let mut entries = w.open_table(ENTRIES)?;
        let seq = entries.last()?.map_or(0, |(k, _)| k.value() + 1);
        let entry = Entry { seq, record, status: Status::Pending, attempts: 0 };
        entries.insert(seq, encode(&entry).as_slice())?;
        keys.insert(key.as_str(), seq)?;
        w.open_table(OPEN)?.insert(seq, ())?;
        Ok((seq, true))
    }

    /// Every entry not yet done or rejected, oldest first.
    pub fn open_entries(&self) -> Result<Vec<Entry>, OutboxError> {
        let r = self.db.begin_read()?;
        let (open, entries) = (r.open_table(OPEN)?, r.open_table(ENTRIES)?);
        let mut out = Vec::new();
        for item in open.iter()? {
            let seq = item?.0.value();
            if let Some(v) = entries.get(seq)? {
                let entry: Entry =
                    postcard::from_bytes(v.value()).map_err(|e| OutboxError::Corrupt { seq, reason: e.to_string() })?;
                out.push(entry);
            }
        }
        Ok(out)
    }

    /// Every entry, oldest first.
    pub fn entries(&self) -> Result<Vec<Entry>, OutboxError> {
        let r = self.db.begin_read()?;
        let t = r.open_table(ENTRIES)?;
        let mut out = Vec::new();
        for item in t.iter()? {
            let (k, v) = item?;
            let entry: Entry = postcard::from_bytes(v.value())
                .map_err(|e| OutboxError::Corrupt { seq: k.value(), reason: e.to_string() })?;
            out.push(entry);
        }
        Ok(out)
    }

    /// Sets the status of entry `seq` (and counts an attempt when it was sent).
    pub fn set_status(&self, seq: u64, status: Status) -> Result<(), OutboxError> {
        let w = self.db.begin_write()?;
        {
            let mut t = w.open_table(ENTRIES)?;
            let mut entry: Entry = match t.get(seq)? {
                Some(v) => {
                    postcard::from_bytes(v.value()).map_err(|e| OutboxError::Corrupt { seq, reason: e.to_string() })?
                }
                None => return Ok(()),
            };
            if matches!(status, Status::Sent { .. }) {
                entry.attempts += 1;
            }
            entry.status = status;
            t.insert(seq, encode(&entry).as_slice())?;
            let mut open = w.open_table(OPEN)?;
            if entry.is_open() {
                open.insert(seq, ())?;
            } else {
                open.remove(seq)?;
            }
        }
        w.commit()?;
        Ok(())
    }

    pub fn depth(&self) -> Result<Depth, OutboxError> {
        let mut d = Depth::default();
        for e in self.entries()? {
            match e.status {
                Status::Pending => d.pending += 1,
                Status::Sent { .. } => d.sent += 1,
                Status::Done { .. } => d.done += 1,
                Status::Rejected { .. } => d.rejected += 1,
            }
        }
        Ok(d)
    }

    /// Notes a completed round, then closes every epoch of `epoch_rounds` rounds that this
    /// round ends or leaves behind (see [`close_epochs`]); the records are stored in the same
    /// transaction that removes their tally. Returns the records created, or `None` when the
    /// round was credited before (its number is at or below the highest round ever tallied):
    /// it is not counted again.
    pub fn round_completed(
        &self,
        run: B32,
        epoch_rounds: u64,
        tally: RoundTally,
    ) -> Result<Option<Vec<Record>>, OutboxError> {
        self.close(run, epoch_rounds, Some(tally), true)
    }

    /// Closes every epoch still tallied, the current one included: this peer is leaving the
    /// run (it finished, or was asked to stop). Its last round gets a checkpoint vote.
    pub fn close_all(&self, run: B32, epoch_rounds: u64) -> Result<Vec<Record>, OutboxError> {
        Ok(self.close(run, epoch_rounds, None, true)?.unwrap_or_default())
    }

    /// Notes the attempt this peer is in for `p.round` of `run` (replacing an earlier
    /// attempt's); it is creditable unless the round was credited before.
    pub fn note_pending(&self, run: B32, mut p: PendingCredit) -> Result<(), OutboxError> {
        let w = self.db.begin_write()?;
        let through = w.open_table(CREDITED)?.get(hex::encode(run).as_str())?.map_or(0, |v| v.value());
        p.creditable = p.round >= through;
        w.open_table(PENDING)?.insert((run.as_slice(), p.round), encode(&p).as_slice())?;
        w.commit()?;
        Ok(())
    }

    /// The attempts of `run` noted and not yet credited, oldest round first.
    pub fn pending(&self, run: &B32) -> Result<Vec<PendingCredit>, OutboxError> {
        let r = self.db.begin_read()?;
        let t = r.open_table(PENDING)?;
        let mut out = Vec::new();
        for item in t.range((run.as_slice(), 0)..=(run.as_slice(), u64::MAX))? {
            let (k, v) = item?;
            out.push(
                postcard::from_bytes(v.value())
                    .map_err(|e| OutboxError::Corrupt { seq: k.value().1, reason: e.to_string() })?,
            );
        }
        Ok(out)
    }

    /// Settles pending credits: an attempt the ring `certified` is credited like a completed
    /// round (without a checkpoint vote: this peer does not know the parameters after it), even
    /// if this peer credited later rounds since, as long as the round was not credited before
    /// the note; one the ring certified with another attempt (`not_certified`), or that is not
    /// creditable, is dropped; the others stay pending.
    pub fn resolve_pending(
        &self,
        run: B32,
        epoch_rounds: u64,
        certified: &[u64],
        not_certified: &[u64],
    ) -> Result<Settled, OutboxError> {
        let (mut credited, mut dropped, mut records) = (Vec::new(), Vec::new(), Vec::new());
        for p in self.pending(&run)? {
            if certified.contains(&p.round) && p.creditable {
                let tally = RoundTally { round: p.round, samples: p.samples, commit: p.commit, param_hash: [0; 32] };
                records.extend(self.close(run, epoch_rounds, Some(tally), false)?.unwrap_or_default());
                credited.push(p);
            } else if certified.contains(&p.round) || not_certified.contains(&p.round) || !p.creditable {
                let w = self.db.begin_write()?;
                w.open_table(PENDING)?.remove((run.as_slice(), p.round))?;
                w.commit()?;
                dropped.push(p);
            }
        }
        Ok(Settled { credited, dropped, records })
    }

    /// One past the highest round this peer ever tallied in `run` (0: none).
    pub fn credited_through(&self, run: &B32) -> Result<u64, OutboxError> {
        let r = self.db.begin_read()?;
        let t = r.open_table(CREDITED)?;
        Ok(t.get(hex::encode(run).as_str())?.map_or(0, |v| v.value()))
    }

    /// Adds `latest` to the tally (if any and, with `watermark`, not credited before), closes
    /// the epochs that are over, and stores their records, all in one transaction.
    fn close(
        &self,
        run: B32,
        epoch_rounds: u64,
        latest: Option<RoundTally>,
        watermark: bool,
    ) -> Result<Option<Vec<Record>>, OutboxError> {
        let w = self.db.begin_write()?;
        let records = {
            if let Some(tally) = &latest {
                let mut credited = w.open_table(CREDITED)?;
                let run_key = hex::encode(run);
                let through = credited.get(run_key.as_str())?.map_or(0, |v| v.value());
                if watermark && tally.round < through {
                    return Ok(None);
                }
                credited.insert(run_key.as_str(), through.max(tally.round + 1))?;
            }
            let mut t = w.open_table(TALLY)?;
            if let Some(tally) = &latest {
                t.insert((run.as_slice(), tally.round), encode(tally).as_slice())?;
                w.open_table(PENDING)?.remove((run.as_slice(), tally.round))?;
            }
            let all = Self::read_tally(&t, &run)?;
            let keys = w.open_table(KEYS)?;
            let parts = |epoch: u64| -> Result<u32, OutboxError> {
                let prefix = contribution_prefix(&run, epoch);
                let mut n = 0u32;
                for item in keys.range(prefix.as_str()..)? {
                    let (k, _) = item?;
                    if !k.value().starts_with(&prefix) {
                        break;
                    }
                    n += 1;
                }
                Ok(n)
            };
            let (records, closed) = close_epochs(run, epoch_rounds, &all, latest.map(|t| t.round), parts)?;
            for round in closed {
                t.remove((run.as_slice(), round))?;
            }
            records
        };
        for r in &records {
            Self::push_in(&w, r.clone())?;
        }
        w.commit()?;
        Ok(Some(records))
    }

    /// `run`'s tallied rounds.
    fn read_tally(t: &redb::Table<(&[u8], u64), &[u8]>, run: &B32) -> Result<BTreeMap<u64, RoundTally>, OutboxError> {
        let mut all = BTreeMap::new();
        for item in t.range((run.as_slice(), 0)..=(run.as_slice(), u64::MAX))? {
            let (k, v) = item?;
            let round = k.value().1;
            let tally: RoundTally = postcard::from_bytes(v.value())
                .map_err(|e| OutboxError::Corrupt { seq: round, reason: e.to_string() })?;
            all.insert(round, tally);
        }
        Ok(all)
    }
}

/// The root a contribution record carries: blake3 over the epoch's (round, commit digest)
/// pairs in round order, so anyone holding the gossiped commits can recompute it.
pub fn commit_root(rounds: &[RoundTally]) -> B32 {
    let mut h = blake3::Hasher::new();
    h.update(b"dtrain/commit-root/v1");
    for t in rounds {
        h.update(&t.round.to_le_bytes());
        h.update(&t.commit);
    }
    h.finalize().into()
}

/// Builds the records of the epochs that are over. With `latest = Some(r)` (round `r` just
/// completed), an epoch is over when `r` is its last round or lies in a later epoch; with
/// `None`, every tallied epoch is closed. An epoch whose last round this peer completed also
/// gets its checkpoint vote (the parameter hash after that round), as does the very last
/// tallied round when everything is closed. `parts(epoch)` tells how many records of the epoch
/// exist already (this peer left and came back within it): the new record is the next part.
/// Returns the records and the rounds they consumed.
pub fn close_epochs<E>(
    run: B32,
    epoch_rounds: u64,
    tally: &BTreeMap<u64, RoundTally>,
    latest: Option<u64>,
    parts: impl Fn(u64) -> Result<u32, E>,
) -> Result<(Vec<Record>, Vec<u64>), E> {
    let k = epoch_rounds.max(1);
    let mut by_epoch: BTreeMap<u64, Vec<RoundTally>> = BTreeMap::new();
    for t in tally.values() {
        by_epoch.entry(t.round / k).or_default().push(*t);
    }
    let last_tallied = tally.keys().next_back().copied();
    let mut records = Vec::new();
    let mut closed = Vec::new();
    for (epoch, rounds) in by_epoch {
        let end = epoch * k + k - 1;
        let over = match latest {
            Some(r) => r >= end,
            None => true,
        };
        if !over {
            continue;
        }
        let samples = rounds.iter().map(|t| t.samples).sum();
        records.push(Record::Contribution {
            run,
            epoch,
            part: parts(epoch)?,
            rounds: rounds.len() as u64,
            samples,
            commit_root: commit_root(&rounds),
        });
        let last = rounds.last().expect("an epoch has rounds");
        // A round credited after the fact (see `resolve_pending`) has no known parameter hash.
        let known = last.param_hash != [0; 32];
        if known && (last.round == end || (latest.is_none() && Some(last.round) == last_tallied)) {
            records.push(Record::Vote { run, round: last.round, param_hash: last.param_hash });
        }
        closed.extend(rounds.iter().map(|t| t.round));
    }
    Ok((records, closed))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_db(name: &str) -> (Arc<Database>, std::path::PathBuf) {
        let dir = std::env::temp_dir().join(format!("dtrain-outbox-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let db = Database::create(dir.join("node.redb")).unwrap();
        (Arc::new(db), dir)
    }

    fn tally(round: u64) -> RoundTally {
        RoundTally { round, samples: 10 + round, commit: [round as u8; 32], param_hash: [100 + round as u8; 32] }
    }

    const RUN: B32 = [7; 32];

    #[test]
    fn push_is_idempotent_per_key_and_survives_reopen() {
        let (db, dir) = temp_db("push");
        let outbox = Outbox::new(db).unwrap();
        let vote = Record::Vote { run: RUN, round: 3, param_hash: [1; 32] };
        assert_eq!(outbox.push(vote.clone()).unwrap(), (0, true));
        assert_eq!(outbox.push(Record::Register { run: RUN, peer_id: vec![1, 2] }).unwrap(), (1, true));
        // The same vote again (say, replayed after a restart) is the same entry.
        assert_eq!(outbox.push(vote.clone()).unwrap(), (0, false));
        outbox.set_status(0, Status::Sent { tx: [9; 32], nonce: 4 }).unwrap();
        drop(outbox);

        let db = Arc::new(Database::create(dir.join("node.redb")).unwrap());
        let outbox = Outbox::new(db).unwrap();
        let open = outbox.open_entries().unwrap();
        assert_eq!(open.len(), 2);
        assert_eq!(open[0].record, vote);
        assert_eq!(open[0].status, Status::Sent { tx: [9; 32], nonce: 4 });
        assert_eq!(open[0].attempts, 1);
        outbox.set_status(0, Status::Done { tx: Some([9; 32]), block: Some(12) }).unwrap();
        outbox.set_status(1, Status::Rejected { reason: "no".into() }).unwrap();
        assert!(outbox.open_entries().unwrap().is_empty());
        assert_eq!(outbox.depth().unwrap(), Depth { pending: 0, sent: 0, done: 1, rejected: 1 });
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn epochs_close_at_their_last_round_with_a_vote() {
        let (db, dir) = temp_db("epochs");
        let outbox = Outbox::new(db).unwrap();
        // K = 3: rounds 0,1 tally; round 2 ends epoch 0.
        assert_eq!(outbox.round_completed(RUN, 3, tally(0)).unwrap(), Some(vec![]));
        assert_eq!(outbox.round_completed(RUN, 3, tally(1)).unwrap(), Some(vec![]));
        let recs = outbox.round_completed(RUN, 3, tally(2)).unwrap().unwrap();
        let expected_root = commit_root(&[tally(0), tally(1), tally(2)]);
        assert_eq!(
            recs,
            vec![
                Record::Contribution {
                    run: RUN,
                    epoch: 0,
                    part: 0,
                    rounds: 3,
                    samples: 33,
                    commit_root: expected_root
                },
                Record::Vote { run: RUN, round: 2, param_hash: tally(2).param_hash },
            ]
        );
        // Epoch 1: this peer misses round 5 (its last) and next completes round 6 (epoch 2):
        // epoch 1 closes with what it has and without a vote.
        outbox.round_completed(RUN, 3, tally(3)).unwrap();
        let recs = outbox.round_completed(RUN, 3, tally(6)).unwrap().unwrap();
        assert_eq!(
            recs,
            vec![Record::Contribution {
                run: RUN,
                epoch: 1,
                part: 0,
                rounds: 1,
                samples: 13,
                commit_root: commit_root(&[tally(3)])
            }]
        );
        // Leaving closes the open epoch 2 and votes its last round.
        outbox.round_completed(RUN, 3, tally(7)).unwrap();
        let recs = outbox.close_all(RUN, 3).unwrap();
        assert_eq!(recs.len(), 2);
        assert!(matches!(recs[0], Record::Contribution { epoch: 2, rounds: 2, samples: 33, .. }));
        assert_eq!(recs[1], Record::Vote { run: RUN, round: 7, param_hash: tally(7).param_hash });
        // Everything lands in the outbox exactly once, in order.
        let kinds: Vec<_> = outbox.entries().unwrap().iter().map(|e| e.record.key()).collect();
        assert_eq!(kinds.len(), 5);
        assert!(outbox.close_all(RUN, 3).unwrap().is_empty());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A creditable pending credit of `attempt` of `round`.
    fn pending(round: u64, attempt: u32) -> PendingCredit {
        PendingCredit { round, attempt, ring: [9; 32], samples: 32, commit: [round as u8; 32], creditable: true }
    }

    #[test]
    fn pending_credits_are_credited_only_for_attempts_the_ring_certified() {
        let (db, dir) = temp_db("pending");
        let outbox = Outbox::new(db).unwrap();
        outbox.round_completed(RUN, 4, tally(0)).unwrap();
        // Round 1's first attempt failed; the second replaced it and completed.
        outbox.note_pending(RUN, pending(1, 0)).unwrap();
        outbox.note_pending(RUN, pending(1, 1)).unwrap();
        assert_eq!(outbox.pending(&RUN).unwrap(), vec![pending(1, 1)]);
        outbox.round_completed(RUN, 4, tally(1)).unwrap();
        assert!(outbox.pending(&RUN).unwrap().is_empty(), "a completed round is no longer pending");
        // A round credited before (a restarted peer redoes it) is never creditable again.
        outbox.note_pending(RUN, pending(1, 7)).unwrap();
        assert!(!outbox.pending(&RUN).unwrap()[0].creditable);
        // Pending attempts of rounds 2, 3 and 9 (in truth a peer has one at a time; this one
        // keeps several to settle them together).
        outbox.note_pending(RUN, pending(2, 0)).unwrap();
        outbox.note_pending(RUN, pending(3, 4)).unwrap();
        outbox.note_pending(RUN, pending(9, 0)).unwrap();
        // The ring certified round 2's
        // attempt, round 3 with another attempt, and the answer knows nothing of round 9.
        let Settled { credited, dropped, records } = outbox.resolve_pending(RUN, 4, &[2, 1], &[3]).unwrap();
        assert_eq!(credited, vec![pending(2, 0)]);
        let mut old = pending(1, 7);
        old.creditable = false;
        assert_eq!(dropped, vec![old, pending(3, 4)]);
        assert!(records.is_empty(), "epoch 0 is not over yet");
        assert_eq!(outbox.pending(&RUN).unwrap(), vec![pending(9, 0)]);
        // Closing epoch 0: rounds 0, 1 and the recovered 2; no vote, as round 3 is missing.
        let recs = outbox.close_all(RUN, 4).unwrap();
        assert!(matches!(recs[0], Record::Contribution { epoch: 0, rounds: 3, .. }), "{recs:?}");
        assert_eq!(recs.len(), 1, "no vote for a parameter hash this peer does not know: {recs:?}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_peer_back_within_an_epoch_records_the_next_part_and_no_round_twice() {
        let (db, dir) = temp_db("parts");
        let outbox = Outbox::new(db).unwrap();
        // K = 4. The peer does rounds 0 and 1, leaves (closing part 0 of epoch 0)...
        outbox.round_completed(RUN, 4, tally(0)).unwrap();
        outbox.round_completed(RUN, 4, tally(1)).unwrap();
        let recs = outbox.close_all(RUN, 4).unwrap();
        assert!(matches!(recs[0], Record::Contribution { epoch: 0, part: 0, rounds: 2, .. }), "{recs:?}");
        assert_eq!(outbox.credited_through(&RUN).unwrap(), 2);
        // ... comes back: its state went back to an older checkpoint, so round 1 comes round
        // again; it is not credited twice.
        assert_eq!(outbox.round_completed(RUN, 4, tally(1)).unwrap(), None);
        // Round 3 ends the epoch: its rounds since the return are part 1.
        outbox.round_completed(RUN, 4, tally(2)).unwrap();
        let recs = outbox.round_completed(RUN, 4, tally(3)).unwrap().unwrap();
        assert_eq!(
            recs[0],
            Record::Contribution {
                run: RUN,
                epoch: 0,
                part: 1,
                rounds: 2,
                samples: 12 + 13,
                commit_root: commit_root(&[tally(2), tally(3)])
            }
        );
        assert_eq!(recs[1], Record::Vote { run: RUN, round: 3, param_hash: tally(3).param_hash });
        // Both parts are in the outbox under their own keys, and the epoch is whole: 4 rounds.
        let rounds: u64 = outbox
            .entries()
            .unwrap()
            .iter()
            .filter_map(|e| match e.record {
                Record::Contribution { epoch: 0, rounds, .. } => Some(rounds),
                _ => None,
            })
            .sum();
        assert_eq!(rounds, 4);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A data directory serving a second run (the first one's process killed mid-epoch): the
    /// second run's epochs hold only its own rounds, and the first's wait for it.
    #[test]
    fn one_runs_rounds_never_close_another_runs_epochs() {
        let (db, dir) = temp_db("runs");
        let outbox = Outbox::new(db).unwrap();
        const OTHER: B32 = [8; 32];
        for r in 10..15 {
            outbox.round_completed(RUN, 10, tally(r)).unwrap();
        }
        outbox.note_pending(RUN, pending(15, 0)).unwrap();
        // The other run: its rounds 15..19 close its epoch 1 with exactly those.
        for r in 15..19 {
            assert_eq!(outbox.round_completed(OTHER, 10, tally(r)).unwrap(), Some(vec![]));
        }
        let recs = outbox.round_completed(OTHER, 10, tally(19)).unwrap().unwrap();
        assert!(
            matches!(recs[0], Record::Contribution { run: OTHER, epoch: 1, rounds: 5, .. }),
            "only the other run's own rounds: {recs:?}"
        );
        assert!(outbox.pending(&OTHER).unwrap().is_empty(), "the first run's pending credit is its own");
        assert!(outbox.close_all(OTHER, 10).unwrap().is_empty());
        // The first run, back: its rounds and pending credit are still there.
        assert_eq!(outbox.pending(&RUN).unwrap().len(), 1);
        let recs = outbox.close_all(RUN, 10).unwrap();
        assert!(matches!(recs[0], Record::Contribution { run: RUN, epoch: 1, rounds: 5, .. }), "{recs:?}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A data directory from before runs were kept apart: its tallied rounds and pending
    /// credits go to the run that opens it first, once.
    #[test]
    fn rounds_tallied_before_runs_were_kept_apart_go_to_the_first_run_that_opens_them() {
        let (db, dir) = temp_db("unowned");
        let outbox = Outbox::new(db.clone()).unwrap();
        let w = db.begin_write().unwrap();
        {
            let mut t = w.open_table(UNOWNED_TALLY).unwrap();
            for r in 0..2 {
                t.insert(r, encode(&tally(r)).as_slice()).unwrap();
            }
            w.open_table(UNOWNED_PENDING).unwrap().insert(2, encode(&pending(2, 1)).as_slice()).unwrap();
        }
        w.commit().unwrap();
        assert_eq!(outbox.adopt_unowned(RUN).unwrap(), (2, 1));
        assert_eq!(outbox.adopt_unowned([8; 32]).unwrap(), (0, 0), "adopted once");
        assert_eq!(outbox.pending(&RUN).unwrap().len(), 1);
        let recs = outbox.close_all(RUN, 4).unwrap();
        assert!(matches!(recs[0], Record::Contribution { run: RUN, epoch: 0, rounds: 2, .. }), "{recs:?}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn commit_root_depends_on_every_round_and_commit() {
        let base = commit_root(&[tally(0), tally(1)]);
        let mut other = tally(1);
        other.commit[31] ^= 1;
        assert_ne!(base, commit_root(&[tally(0), other]));
        let mut moved = tally(1);
        moved.round = 2;
        assert_ne!(base, commit_root(&[tally(0), moved]));
        assert_ne!(base, commit_root(&[tally(0)]));
    }
}
