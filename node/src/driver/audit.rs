//! Audits and proven faults.
//!
//! Every commit is signed with its member's libp2p identity key and checked on
//! arrival, so a commit can be shown to anyone as its member's own. When the
//! round asks for an audit, this peer recomputes the target's gradient on the
//! compute worker (same parameters, the target's micro-batch and weight),
//! encodes it and compares the chunk hashes with the target's commit; its
//! `Done` waits for the answer. A mismatch fails the attempt and is gossiped as
//! evidence: the signed commit and the ring it was made for. Every peer that
//! holds that round's parameters checks the evidence by recomputing the
//! gradient itself; only then does it keep the accused out of rings (a ring
//! leaves out a peer only when most of its members do) and queue the fault for
//! the chain. Evidence that does not hold up accuses nobody.
//!
//! Where gradients are not bit-exact (GPU builds, or a run that states an
//! `audit_tolerance`), the auditor asks the target for its committed values
//! ([`crate::reveal`]), accepts them only if they make the signed commit, and
//! compares them with its recomputation within the tolerance; a target that does
//! not answer fails the attempt without being accused. Peers checking the
//! evidence of such a fault fetch the values from the reporter (or the accused)
//! the same way.
//!
//! The audited member's committed values also check its partial sums: its
//! signed sum check ([`p2p_proto::sumcheck`]) must say that what it sent is what
//! it received plus those values. If not, the check itself, its commit and the
//! ring are the evidence, checked the same way (recompute, then compare).

use super::{Compute, Driver, Internal};
use crate::reveal::{Expect, Unrevealed};
use crate::train::worker::Gradient;
use libp2p::PeerId;
use p2p_proto::audit;
use p2p_proto::compress::{self, Compression};
use p2p_proto::membership::RingView;
use p2p_proto::message::{FaultEvidence, FaultKind, GradientCommit, PeerKey};
use p2p_proto::round::AuditJob;
use std::sync::Arc;
use tracing::{info, warn};

/// Fault evidence checked is remembered per (accused, round, attempt, kind) so that gossip
/// repeating it is not checked again; past this many entries only recent rounds are kept.
const MAX_FAULTS_CHECKED: usize = 4096;
/// The rounds kept then: older evidence cannot concern a round this peer still acts on.
const FAULT_ROUNDS: u64 = 64;

/// Whether `commit` carries a valid signature of the peer it names.
pub(super) fn signed_by_its_peer(commit: &GradientCommit) -> bool {
    crate::sign::commit_is_signed(commit)
}

/// A test-only misbehaviour (builds with the `fault-injection` feature): what a lying peer does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultMode {
    /// Commits to (and sends) the gradient of samples that are not its micro-batch.
    RandomGradient,
    /// Commits to (and sends) its gradient scaled by 1000.
    Scale1000,
    /// Commits to (and sends) NaNs, as the raw bits of f32 NaN (the encoder refuses them).
    Nan,
    /// Commits to its gradient, then sends (and signs) other values for its own chunk.
    CommitMismatch,
    /// Sends (and signs) partial sums of its own values only, dropping what it received (in a
    /// hierarchical round, what goes across groups leaves out its group ring's partial sum).
    DropContribution,
    /// Commits to (and sends) a gradient of norm 4.5 (below the default norm clipping of 5) all
    /// in one coordinate, weighted like any other, ignoring the run's coordinate-wise clipping.
    Spike,
    /// Alters partial sums after signing them: the bytes no longer match their hash.
    CorruptInTransit,
    /// Sends, in every later round, a partial sum it signed in its first.
    Replay,
    /// Honest, on a backend that is not bit-exact: its gradient is one part in 10^4 off what
    /// anyone recomputes (passes audits within a tolerance, fails bit-exact ones).
    Inexact,
    /// Commits to the gradient of other samples, like random-gradient, and never reveals its
    /// committed values to an auditor (it does not serve the reveal protocol).
    Withhold,
    /// Like withhold, but it accepts every reveal request and closes the stream unanswered.
    WithholdSilent,
}

/// `out -= inb`, both one little-endian `i32` (wrapping): a liar leaving a value out.
fn subtract_le(out: &mut [u8], inb: &[u8]) {
    let v = i32::from_le_bytes([out[0], out[1], out[2], out[3]])
        .wrapping_sub(i32::from_le_bytes([inb[0], inb[1], inb[2], inb[3]]));
    out.copy_from_slice(&v.to_le_bytes());
}

/// What a test-only liar remembers between messages.
#[derive(Debug, Default)]
pub struct FaultState {
    /// Reduce-scatter segments received in the current attempt, by (level, chunk, segment).
    received: std::collections::HashMap<(u8, u32, u32), Vec<u8>>,
    /// The attempt they belong to.
    attempt: (u64, u32),
    /// The chunk and step of the latest group-ring (level 0) segment received.
    group_last: Option<(u32, u32)>,
    /// A signed partial sum of an earlier round, to replay.
    old: Option<p2p_proto::message::RingStep>,
}

impl std::str::FromStr for FaultMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "random-gradient" => Ok(Self::RandomGradient),
            "scale-1000" => Ok(Self::Scale1000),
            "nan" => Ok(Self::Nan),
            "commit-mismatch" => Ok(Self::CommitMismatch),
            "drop-contribution" => Ok(Self::DropContribution),
            "spike" => Ok(Self::Spike),
            "corrupt-in-transit" => Ok(Self::CorruptInTransit),
            "replay" => Ok(Self::Replay),
            "inexact" => Ok(Self::Inexact),
            "withhold" => Ok(Self::Withhold),
            "withhold-silent" => Ok(Self::WithholdSilent),
            other => Err(format!(
                "unknown fault mode `{other}`: random-gradient, scale-1000, nan, commit-mismatch, drop-contribution, \
                 spike, corrupt-in-transit, replay, inexact, withhold or withhold-silent"
            )),
        }
    }
}

/// What recomputing a member's gradient, or checking evidence, concluded.
#[derive(Debug)]
pub(super) enum Verdict {
    /// The member's commit is its gradient (within the run's tolerance): its committed values,
    /// when this peer holds them.
    Holds(Option<Vec<i32>>),
    /// The member lied, for this reason.
    Lie(String),
    /// Nothing is proven, but the member is why: it did not reveal values making its commit,
    /// or revealed values farther from the recomputation than the tolerance, though not
    /// [`PROOF_FACTOR`] times farther (device noise cannot be ruled out).
    Doubt(String),
    /// This peer cannot conclude (it holds other parameters than the commit names).
    Open(String),
    /// The member did not answer for its committed values: the stream broke or fell silent,
    /// which a busy (or flooded) holder does too. The attempt fails and the member counts a
    /// strike as one that stopped responding (kept out after several attempts in a row), not
    /// a bad message.
    Unanswered(String),
}

/// Audits within a tolerance: a committed gradient this many times the allowed distance from
/// the recomputation is a proven lie; between 1 and this, the attempt fails and the member
/// counts a bad message here, but nobody accuses it (it might be a noisier device).
pub const PROOF_FACTOR: f64 = 10.0;

/// What an audit or a check of evidence concluded.
#[derive(Debug)]
pub(super) enum Audited {
    /// This peer's own audit in attempt (round, attempt) of the member at `target`.
    Own { round: u64, attempt: u32, target: usize, job: Box<AuditJob>, verdict: Verdict },
    /// A check of gossiped evidence.
    Evidence { evidence: Box<FaultEvidence>, verdict: Verdict },
}

/// Judges `commit` against the gradient recomputed from public inputs (`weighted`, of
/// `samples` samples), in a ring of `n` with segments of `seg` values: bit-exactly against the
/// commit's hashes, or, with values the member revealed, within `tolerance`.
#[allow(clippy::too_many_arguments)]
fn judge(
    fixed: &p2p_proto::FixedPoint,
    weighted: &[f32],
    samples: u64,
    commit: &GradientCommit,
    n: usize,
    seg: usize,
    tolerance: f64,
    compressed: Option<(Compression, f64)>,
    revealed: Option<Result<Arc<Vec<i32>>, Unrevealed>>,
) -> Verdict {
    let recomputed = match fixed.encode(weighted) {
        Ok(d) => d,
        Err(e) => return Verdict::Lie(format!("its recomputed gradient cannot be encoded ({e}), yet it committed")),
    };
    if commit.samples != samples {
        return Verdict::Lie(format!("it committed {} samples, its micro-batch has {samples}", commit.samples));
    }
    if let Some((comp, max_norm)) = compressed {
        if samples == 0 {
            // Nothing: the payload of zeros, the residual kept. Only asynchronous rounds take a
            // commit of no samples (a synchronous one refuses it as other than the member's
            // announced batch, at least one sample, before anyone audits it).
            let zeros = compress::zeros(comp, weighted.len());
            return match audit::matches_payload(commit, &zeros, 0.0, seg) {
                Err(e) => Verdict::Lie(format!("{e} (compressed, no samples)")),
                Ok(()) if commit.residual_next != commit.residual => {
                    Verdict::Lie("it committed no samples but says its residual changed".into())
                }
                Ok(()) => Verdict::Holds(None),
            };
        }
        // The payload is recomputed exactly, with the residual the commit names (top-k).
        let residual = match (comp.has_residual(), revealed) {
            (false, _) => None,
            (true, Some(Ok(r))) => Some(r),
            (true, Some(Err(e))) if e.lost => {
                return Verdict::Unanswered(format!("the residual its commit names could not be fetched ({e})"));
            }
            (true, Some(Err(e))) => {
                return Verdict::Doubt(format!("the residual its commit names was not revealed ({e})"));
            }
            (true, None) => return Verdict::Open("no residual to recompute its payload with".into()),
        };
        let e =
            compress::encode(comp, &recomputed, residual.as_deref().map(Vec::as_slice), fixed.max_units(), max_norm);
        if let Err(e) = audit::matches_payload(commit, &e.payload, e.norm, seg) {
            return Verdict::Lie(format!("{e} (compressed)"));
        }
        if e.residual.is_some_and(|r| p2p_proto::hash::hash_i32s(&r) != commit.residual_next) {
            return Verdict::Lie("the residual it says its payload leaves is not the one it leaves".into());
        }
        return Verdict::Holds(None);
    }
    match revealed {
        None => match audit::check(commit, &recomputed, samples, n, seg) {
            Ok(()) => Verdict::Holds(Some(recomputed)),
            Err(e) => Verdict::Lie(e),
        },
        Some(Err(e)) if e.lost => Verdict::Unanswered(format!("its committed values could not be fetched ({e})")),
        Some(Err(e)) => Verdict::Doubt(format!("its committed values were not revealed ({e})")),
        Some(Ok(data)) => match audit::tolerance_excess(&data, &recomputed, tolerance) {
            Ok(x) if x <= 1.0 => Verdict::Holds(Some(data.to_vec())),
            Ok(x) if x <= PROOF_FACTOR => Verdict::Doubt(format!(
                "its committed gradient is {x:.1} times the run's audit tolerance away from its recomputed one \
                 (not accused below {PROOF_FACTOR} times)"
            )),
            Ok(x) => Verdict::Lie(audit::beyond_tolerance(x, tolerance)),
            Err(e) => Verdict::Lie(e),
        },
    }
}

impl Driver {
    /// Signs a commit's bytes with this peer's identity key.
    pub(super) fn signer(&self) -> impl Fn(&[u8]) -> Vec<u8> + use<> {
        let signer = self.signer.clone();
        move |bytes: &[u8]| signer.sign(bytes)
    }

    /// This peer's left neighbour signed a chunk that contradicts its commit: gossip the proof
    /// and act on it (the round fails on its own).
    pub(super) fn contradiction(&mut self, c: Box<p2p_proto::round::Contradiction>) {
        let accused = c.view.members[c.accused].clone();
        warn!(round = c.view.round, peer = %accused, "the peer signed a chunk that contradicts its commit");
        let evidence = FaultEvidence {
            run: self.cfg.run,
            reporter: self.me.clone(),
            accused,
            kind: FaultKind::CommitContradiction,
            commit: c.commit,
            members: c.view.members,
            batches: c.batches,
            steps: c.steps,
            sum_check: None,
        };
        self.publish(&p2p_proto::message::Gossip::Fault(Box::new(evidence.clone())));
        self.proven(&evidence, "it signed a chunk other than the one it committed to");
    }

    /// A member signed a commit no honest member can make (its norm is above the run's norm
    /// clipping): the commit is the proof; gossip it and act on it.
    pub(super) fn bad_commit(&mut self, b: Box<p2p_proto::round::BadCommit>) {
        let accused = b.view.members[b.accused].clone();
        warn!(round = b.view.round, peer = %accused, reason = %b.reason, "the peer committed to a gradient above the run's norm clipping");
        let evidence = FaultEvidence {
            run: self.cfg.run,
            reporter: self.me.clone(),
            accused,
            kind: FaultKind::NormExceeded,
            commit: b.commit,
            members: b.view.members,
            batches: b.batches,
            steps: Vec::new(),
            sum_check: None,
        };
        self.publish(&p2p_proto::message::Gossip::Fault(Box::new(evidence.clone())));
        self.proven(&evidence, &b.reason);
    }

    /// The member this peer audited sent partial sums other than what it received plus its
    /// gradient, by its own signed sum check: gossip the proof and act on it.
    pub(super) fn sum_fault(&mut self, f: Box<p2p_proto::round::SumFault>) {
        let accused = f.view.members[f.accused].clone();
        warn!(round = f.view.round, peer = %accused, "the peer's partial sums did not add its committed gradient to what it received");
        let evidence = FaultEvidence {
            run: self.cfg.run,
            reporter: self.me.clone(),
            accused,
            kind: FaultKind::PartialSumMismatch,
            commit: f.commit,
            members: f.view.members,
            batches: f.batches,
            steps: Vec::new(),
            sum_check: Some(Box::new(f.check)),
        };
        self.publish(&p2p_proto::message::Gossip::Fault(Box::new(evidence.clone())));
        self.proven(&evidence, "its partial sums dropped, changed or added values");
    }

    /// Recomputes the gradient of the member at `target` of `view` (its micro-batch in a round
    /// with these `batches`, at this peer's current parameters) and judges `commit` by it; with
    /// audits within a tolerance, the committed values come from the first of `holders` that
    /// reveals them. The verdict comes back as `then(verdict)`.
    fn recompute(
        &self,
        view: &RingView,
        target: usize,
        batches: &[u64],
        commit: GradientCommit,
        holders: Vec<PeerId>,
        then: impl FnOnce(Verdict) -> Audited + Send + 'static,
    ) {
        let Compute::Train(spec) = &self.cfg.compute else { return };
        let (offset, batch, weight) = audit::micro_batch(batches, target);
        let gradient: Result<crate::train::worker::Reply<Gradient>, String> = match self.asy.as_ref() {
            // Asynchronous rounds: a member that committed nothing committed zeros.
            Some(_) if commit.samples == 0 => {
                let (len, param_hash) = (spec.worker.params, commit.param_hash);
                Ok(Box::pin(async move {
                    Ok(Gradient { weighted: vec![0.0; len], loss: 0.0, samples: 0, param_hash, compute_us: 0 })
                }))
            }
            // A stale gradient: recomputed on the parameters of its round, on the micro-batch
            // that round's certified ring gave the member, weighted down by its staleness.
            Some(a) if commit.computed_at < commit.round => {
                let factor = audit::staleness_weight(weight, commit.round - commit.computed_at);
                match a.slot_of(commit.computed_at, &commit.peer) {
                    Some((start, b)) => Ok(spec.worker.gradient_at(start, b as usize, factor, commit.param_hash)),
                    None => Err(format!(
                        "this peer does not hold the ring of round {}, which the gradient is of",
                        commit.computed_at
                    )),
                }
            }
            _ => Ok(spec.worker.gradient(self.cursor.saturating_add(offset), batch as usize, weight)),
        };
        // The commit's chunks: one per member of the target's ring (its group, in a hierarchy).
        let n = self.cfg.round.chunks(view.len());
        let (fixed, seg, tx) = (self.cfg.fixed, self.cfg.round.segment_elems, self.internal.clone());
        let tolerance = self.cfg.audit_tolerance;
        let comp = self.cfg.round.compression;
        let compressed = (!comp.is_none()).then(|| (comp, self.cfg.round.max_norm_units * f64::from(weight)));
        let expect = if comp.has_residual() && commit.samples > 0 {
            Some(Expect::Residual { len: spec.worker.params })
        } else {
            (tolerance > 0.0).then_some(Expect::Committed { n, seg })
        };
        // Fetched while the gradient is recomputed; kept, so that this peer can show them to
        // peers checking a fault it reports.
        let revealed = expect.map(|expect| {
            let (control, store, commit) = (self.net.control(), self.reveals.clone(), commit.clone());
            tokio::spawn(async move {
                let data = Arc::new(crate::reveal::fetch(control, &holders, &commit, expect).await?);
                store.insert(&commit.peer, commit.round, commit.attempt, data.clone());
                Ok::<_, Unrevealed>(data)
            })
        });
        tokio::spawn(async move {
            let g = match gradient {
                Ok(g) => g.await,
                Err(reason) => {
                    let _ = tx.send(Internal::Audited(then(Verdict::Open(reason))));
                    return;
                }
            };
            let Ok(g) = g else { return };
            let revealed = match revealed {
                Some(task) => {
                    Some(task.await.unwrap_or_else(|e| Err(Unrevealed { reason: e.to_string(), lost: true })))
                }
                None => None,
            };
            let verdict = if g.param_hash != commit.param_hash {
                Verdict::Open("this peer holds other parameters than the commit names".to_owned())
            } else {
                tokio::task::spawn_blocking(move || {
                    judge(&fixed, &g.weighted, g.samples as u64, &commit, n, seg, tolerance, compressed, revealed)
                })
                .await
                .unwrap_or_else(|e| Verdict::Open(e.to_string()))
            };
            let _ = tx.send(Internal::Audited(then(verdict)));
        });
    }

    /// The round asks this peer to audit a member.
    pub(super) fn audit(&mut self, job: Box<AuditJob>) {
        let (round, attempt, target) = (job.view.round, job.view.attempt, job.target);
        let commit = job.commit.clone();
        let (view, batches) = (job.view.clone(), job.batches.clone());
        let holders = commit.peer.parse().into_iter().collect();
        self.recompute(&view, target, &batches, commit, holders, move |verdict| Audited::Own {
            round,
            attempt,
            target,
            job,
            verdict,
        });
    }

    pub(super) fn on_audited(&mut self, a: Audited) {
        let now = self.now();
        match a {
            Audited::Own { round, attempt, target, job, verdict } => {
                let current = self.round.as_ref().is_some_and(|r| r.is_for(round, attempt));
                if !current && !matches!(verdict, Verdict::Lie(_)) {
                    return;
                }
                // A failed audit proves the fault even when the attempt failed meanwhile for
                // another reason (a range check caught the same lie first, say).
                self.cfg.metrics.update(|s| {
                    s.audits +=
                        u64::from(!matches!(verdict, Verdict::Open(_) | Verdict::Doubt(_) | Verdict::Unanswered(_)));
                    s.audits_failed += u64::from(matches!(verdict, Verdict::Lie(_)));
                });
                let acts = match verdict {
                    Verdict::Holds(data) => {
                        self.round.as_mut().map(|r| r.audit_passed(now, target, data)).unwrap_or_default()
                    }
                    Verdict::Open(reason) => {
                        warn!(round, attempt, peer = %job.commit.peer, %reason, "audit could not finish; nobody is accused");
                        let kind = p2p_proto::round::FailureKind::Other;
                        self.round.as_mut().map(|r| r.audit_unanswered(target, &reason, kind)).unwrap_or_default()
                    }
                    Verdict::Unanswered(reason) => {
                        warn!(round, attempt, peer = %job.commit.peer, %reason, "audit could not finish: the peer did not answer");
                        let kind = p2p_proto::round::FailureKind::Gone;
                        self.round.as_mut().map(|r| r.audit_unanswered(target, &reason, kind)).unwrap_or_default()
                    }
                    Verdict::Doubt(reason) => {
                        warn!(round, attempt, peer = %job.commit.peer, %reason, "audit could not finish; the peer is not accused");
                        let kind = p2p_proto::round::FailureKind::BadMessage;
                        self.round.as_mut().map(|r| r.audit_unanswered(target, &reason, kind)).unwrap_or_default()
                    }
                    Verdict::Lie(reason) => {
                        let accused = job.commit.peer.clone();
                        warn!(round, attempt, peer = %accused, %reason, "audit failed: the peer's commit is not its gradient");
                        let evidence = FaultEvidence {
                            run: self.cfg.run,
                            reporter: self.me.clone(),
                            accused,
                            kind: FaultKind::AuditMismatch,
                            commit: job.commit.clone(),
                            members: job.view.members.clone(),
                            batches: job.batches.clone(),
                            steps: Vec::new(),
                            sum_check: None,
                        };
                        self.publish(&p2p_proto::message::Gossip::Fault(Box::new(evidence.clone())));
                        self.proven(&evidence, &reason);
                        match self.round.as_mut().filter(|_| current) {
                            Some(r) => r.audit_failed(target, &reason),
                            None => return,
                        }
                    }
                };
                self.on_round_actions(acts);
            }
            Audited::Evidence { evidence, verdict } => match verdict {
                Verdict::Lie(reason) => self.proven(&evidence, &reason),
                Verdict::Open(reason) | Verdict::Doubt(reason) | Verdict::Unanswered(reason) => {
                    info!(
                        round = evidence.commit.round,
                        accused = %evidence.accused,
                        %reason,
                        "fault evidence could not be checked here; nobody is excluded"
                    );
                    // It may be checked again if it comes again.
                    let c = &evidence.commit;
                    self.faults_checked.remove(&(evidence.accused.clone(), c.round, c.attempt, evidence.kind));
                }
                Verdict::Holds(_) => warn!(
                    round = evidence.commit.round,
                    accused = %evidence.accused,
                    reporter = %evidence.reporter,
                    "fault evidence does not hold up: the accused's commit is its gradient; nobody is excluded"
                ),
            },
        }
    }

    /// A fault this peer checked itself: keep the peer out for good and report it on chain.
    fn proven(&mut self, evidence: &FaultEvidence, reason: &str) {
        let round = evidence.commit.round;
        if !self.convicted.insert(evidence.accused.clone()) {
            return;
        }
        info!(
            round,
            accused = %evidence.accused,
            reporter = %evidence.reporter,
            kind = ?evidence.kind,
            %reason,
            "fault proven: the peer is kept out of rings"
        );
        self.membership.convict(&evidence.accused, round);
        self.cfg.metrics.fault(crate::metrics::FaultRow {
            round,
            peer: evidence.accused.clone(),
            kind: format!("{:?}", evidence.kind),
            reason: reason.to_owned(),
        });
        if let (Some(ledger), Ok(peer)) = (&self.cfg.ledger, evidence.accused.parse::<PeerId>()) {
            ledger.report_fault(peer.to_bytes(), round, evidence.kind as u8, evidence.digest());
        }
    }

    /// Gossiped evidence against a peer: checked here before anything is believed.
    /// Words of every member's contribution (a compressed one's payload).
    fn contribution_len(&self) -> usize {
        let values = match &self.cfg.compute {
            Compute::Train(spec) => spec.worker.params,
            Compute::Demo { len } => *len,
        };
        self.cfg.round.compression.payload_words(values)
    }

    pub(super) fn on_fault(&mut self, evidence: Box<FaultEvidence>) {
        let c = &evidence.commit;
        // By kind too: evidence of one kind that holds up proves nothing about another kind
        // (an honest commit can still come with partial sums that do not add up).
        let key = (evidence.accused.clone(), c.round, c.attempt, evidence.kind);
        if self.convicted.contains(&evidence.accused) || self.faults_checked.contains(&key) {
            return;
        }
        let view = RingView { round: c.round, attempt: c.attempt, members: evidence.members.clone() };
        let most = self.most_samples();
        let malformed = if evidence.batches.iter().any(|b| *b > most) {
            Some("a member's samples are more than a peer of this run computes in a round")
        } else if c.peer != evidence.accused || c.run != self.cfg.run {
            Some("the commit is not the accused's in this run")
        } else if !signed_by_its_peer(c) {
            Some("the commit's signature does not verify")
        } else if evidence.members.len() != evidence.batches.len() {
            Some("the ring and its samples do not match in length")
        } else if audit::ring_hash(self.cfg.run, &view, &evidence.batches) != c.ring {
            Some("the commit was made for another ring")
        } else if c.len != self.contribution_len() as u64 {
            Some("the commit is for another number of values than this run's contributions have")
        } else {
            None
        };
        if let Some(why) = malformed {
            warn!(accused = %evidence.accused, reporter = %evidence.reporter, why, "fault evidence refused");
            return;
        }
        let Some(target) = view.position(&evidence.accused) else { return };
        if evidence.kind == FaultKind::RefusedFrames {
            warn!(accused = %evidence.accused, reporter = %evidence.reporter, "fault evidence refused: refused frames prove nothing to a third peer");
            return;
        }
        if evidence.kind == FaultKind::NormExceeded {
            // Self-contained: the signed commit states a norm no honest member can reach.
            self.checking_fault(key);
            let verdict = match audit::norm_exceeds(c, &evidence.batches, target, self.cfg.round.max_norm_units) {
                Some(why) => Verdict::Lie(why),
                None => Verdict::Holds(None),
            };
            return self.on_audited(Audited::Evidence { evidence, verdict });
        }
        if evidence.kind == FaultKind::CommitContradiction {
            // Self-contained: the accused's own signatures contradict each other. The shape and
            // the hashes first (cheap, and they bound the segments to one chunk's), then the
            // signatures.
            let (layout, seg) = (self.cfg.round.layout(view.len()), self.cfg.round.segment_elems);
            if let Err(why) = audit::contradicts(c, layout, view.len(), target, seg, &evidence.steps) {
                warn!(accused = %evidence.accused, why, "fault evidence refused");
                return;
            }
            let signer = crate::sign::peer_key(&evidence.accused);
            let signed = signer.is_some_and(|k| {
                evidence.steps.iter().all(|s| crate::sign::step_is_signed(&k, c.run, c.round, c.attempt, s))
            });
            if !signed {
                warn!(accused = %evidence.accused, reporter = %evidence.reporter, "fault evidence refused: its segments are not signed by the accused");
                return;
            }
            self.checking_fault(key);
            let verdict = Verdict::Lie("it signed a chunk other than the one it committed to".to_owned());
            return self.on_audited(Audited::Evidence { evidence, verdict });
        }
        let state = self.membership.state();
        // Asynchronous rounds: an empty commit names no parameters, a stale one those of its
        // round (this peer keeps recent ones).
        let holds_params = match &self.asy {
            Some(a) => {
                c.samples == 0
                    || a.params_at(c.computed_at) == Some(c.param_hash)
                    || (c.computed_at == c.round && state.param_hash == c.param_hash)
            }
            None => state.param_hash == c.param_hash,
        };
        if self.next_round != c.round || !holds_params {
            info!(
                round = c.round,
                accused = %evidence.accused,
                "fault evidence for a round whose parameters this peer does not hold; not checked"
            );
            return;
        }
        if !self.attempts_in.contains(&view) {
            // A recomputation costs a gradient: only for rings this peer was in, so that a
            // peer cannot queue one per made-up attempt (any peer can sign commits for rings
            // that never existed).
            info!(
                round = c.round,
                attempt = c.attempt,
                accused = %evidence.accused,
                "fault evidence for an attempt this peer was not in; not checked"
            );
            return;
        }
        info!(round = c.round, accused = %evidence.accused, reporter = %evidence.reporter, "checking fault evidence");
        let batches = evidence.batches.clone();
        let commit = evidence.commit.clone();
        let (n, seg, layout) = (view.len(), self.cfg.round.segment_elems, self.cfg.round.layout(view.len()));
        // With audits within a tolerance: the committed values, from the reporter (who fetched
        // them) or the accused.
        let holders: Vec<PeerId> =
            [&evidence.reporter, &evidence.accused].into_iter().filter_map(|p| p.parse().ok()).collect();
        if evidence.kind == FaultKind::PartialSumMismatch {
            // The accused's own signed claims, for the ring the evidence names.
            let check = evidence.sum_check.as_deref().filter(|s| {
                (s.run, s.peer.as_str(), s.round, s.attempt) == (c.run, evidence.accused.as_str(), c.round, c.attempt)
                    && crate::sign::sum_check_is_signed(s)
                    && p2p_proto::sumcheck::check_shape(s, layout, n, target, c.len as usize, seg).is_ok()
            });
            let Some(check) = check.cloned() else {
                warn!(accused = %evidence.accused, reporter = %evidence.reporter, "fault evidence refused: its sum check is not the accused's, signed, for that ring");
                return;
            };
            self.checking_fault(key);
            self.recompute(&view, target, &batches, commit, holders, move |verdict| {
                // Its commit must be its gradient, and its claims must add up to its values.
                let verdict = match verdict {
                    Verdict::Holds(Some(d)) => {
                        let points = p2p_proto::sumcheck::points(check.run, check.round, check.attempt, &check.sum);
                        match p2p_proto::sumcheck::check_own(&check, layout, n, target, &d, seg, points) {
                            Ok(()) => Verdict::Holds(None),
                            Err(why) => Verdict::Lie(why),
                        }
                    }
                    other => other,
                };
                Audited::Evidence { evidence, verdict }
            });
            return;
        }
        self.checking_fault(key);
        self.recompute(&view, target, &batches, commit, holders, move |verdict| Audited::Evidence {
            evidence,
            verdict,
        });
    }

    /// Evidence about `key` (accused, round, attempt, kind) is being checked: remembered so that it
    /// is checked once, and only once a check starts, so that evidence refused before
    /// (malformed, or not checkable here) does not hide valid evidence about the same attempt
    /// that comes later. The set keeps recent rounds only.
    fn checking_fault(&mut self, key: (String, u64, u32, FaultKind)) {
        if self.faults_checked.len() >= MAX_FAULTS_CHECKED {
            let recent = self.next_round.saturating_sub(FAULT_ROUNDS);
            self.faults_checked.retain(|(_, round, _, _)| *round >= recent);
        }
        self.faults_checked.insert(key);
    }
}

impl Driver {
    /// The round failed on frames `blame` sent this peer that failed their checks: remembered,
    /// to report once the rings go on without the sender.
    pub(super) fn frames_refused(&mut self, round: u64, blame: &[String], reason: &str) {
        for p in blame {
            self.refused.entry(p.clone()).or_insert_with(|| Some((round, reason.to_owned())));
        }
    }

    /// A ring completed a round: peers in it whose frames this peer refused behaved since
    /// (forgiven); peers not in it were kept out by most of its members. Reported on chain, at that round (every member of the certified
    /// ring that refused frames of the peer reports the same round, so the chain counts it
    /// once), as an attestation: the frames prove nothing to anyone else. A peer that comes
    /// back and sends such frames again is reported again.
    pub(super) fn report_refused(&mut self, view: &RingView) {
        self.refused.retain(|p, _| !view.members.contains(p));
        let out: Vec<PeerKey> = self
            .refused
            .iter()
            .filter(|(p, r)| r.is_some() && !view.members.contains(p) && !self.convicted.contains(*p))
            .map(|(p, _)| p.clone())
            .collect();
        for p in out {
            let Some((first, reason)) = self.refused.remove(&p).flatten() else { continue };
            info!(
                round = view.round,
                peer = %p,
                first_refused = first,
                %reason,
                "a ring completed a round without a peer whose frames failed their checks here: reported on chain"
            );
            self.cfg.metrics.fault(crate::metrics::FaultRow {
                round: view.round,
                peer: p.clone(),
                kind: format!("{:?}", FaultKind::RefusedFrames),
                reason: reason.clone(),
            });
            if let (Some(ledger), Ok(peer)) = (&self.cfg.ledger, p.parse::<PeerId>()) {
                let mut h = blake3::Hasher::new();
                h.update(b"dtrain/refused-frames/v1");
                h.update(&self.cfg.run.0);
                h.update(p.as_bytes());
                h.update(&first.to_le_bytes());
                h.update(reason.as_bytes());
                ledger.report_fault(peer.to_bytes(), view.round, FaultKind::RefusedFrames as u8, h.finalize().into());
            }
        }
    }
}

impl FaultMode {
    /// Where a peer in this mode reads its micro-batch, instead of at `start`.
    pub(super) fn start(mode: Option<Self>, start: u64) -> u64 {
        if matches!(mode, Some(Self::RandomGradient | Self::Withhold | Self::WithholdSilent)) {
            start + 7_919
        } else {
            start
        }
    }

    /// What a peer in this mode does to its weighted gradient before it encodes it.
    pub(super) fn distort(mode: Option<Self>, weighted: &mut [f32], weight: f32) {
        match mode {
            Some(Self::Scale1000) => weighted.iter_mut().for_each(|v| *v *= 1000.0),
            Some(Self::Nan) => weighted.fill(f32::NAN),
            Some(Self::Inexact) => weighted
                .iter_mut()
                .enumerate()
                .for_each(|(i, v)| *v *= if i % 2 == 0 { 1.0 + 1e-4 } else { 1.0 - 1e-4 }),
            Some(Self::Spike) => {
                weighted.fill(0.0);
                if let Some(first) = weighted.first_mut() {
                    *first = 4.5 * weight;
                }
            }
            _ => {}
        }
    }

    /// What a peer in this mode does to a ring segment before it signs it: its own chunk goes
    /// out with other values (and their hash), against its commit; or its partial sums go out
    /// without what it received.
    /// `hier` is the attempt's hierarchy, the vector's length and the segment size.
    pub(super) fn tamper(
        mode: Option<Self>,
        step: &mut p2p_proto::message::RingStep,
        st: &mut FaultState,
        hier: Option<(p2p_proto::hier::Layout, usize, usize)>,
    ) {
        let rs = step.id.phase == p2p_proto::ring::Phase::ReduceScatter;
        if mode == Some(Self::DropContribution)
            && rs
            && step.id.level == 1
            && step.id.step == 0
            && st.attempt == (step.round, step.attempt)
            && let Some((layout, len, seg)) = hier
        {
            // What goes across groups is the group ring's last partial sum plus its own values
            // (and its extras'): leave out the partial sum.
            let last = (layout.g - 2) as u32;
            let Some((held, _)) = st.group_last.filter(|(_, s)| *s == last) else { return };
            let held_len = p2p_proto::chunk::chunk_ranges(len, layout.g)[held as usize].len();
            let across = p2p_proto::chunk::chunk_ranges(held_len, layout.groups());
            let range = p2p_proto::chunk::segment_range(&across[step.id.chunk as usize], seg, step.id.segment as usize);
            for (i, out) in range.zip(step.payload.chunks_exact_mut(4)) {
                let Some(got) = st.received.get(&(0, held, (i / seg) as u32)) else { return };
                subtract_le(out, &got[(i % seg) * 4..(i % seg) * 4 + 4]);
            }
            step.hash = *blake3::hash(&step.payload).as_bytes();
            return;
        }
        // Its own values: step 0 of the (group) ring, or an attached member's chunks to holders.
        let own = step.id.level == 2 || (step.id.level == 0 && step.id.step == 0);
        if mode == Some(Self::CommitMismatch) && rs && own && step.payload.len() >= 4 {
            step.payload[0] ^= 0x10;
            step.hash = *blake3::hash(&step.payload).as_bytes();
        }
        if mode == Some(Self::DropContribution)
            && rs
            && step.id.step >= 1
            && st.attempt == (step.round, step.attempt)
            && let Some(got) = st.received.get(&(step.id.level, step.id.chunk, step.id.segment))
        {
            for (out, inb) in step.payload.chunks_exact_mut(4).zip(got.chunks_exact(4)) {
                subtract_le(out, inb);
            }
            step.hash = *blake3::hash(&step.payload).as_bytes();
        }
    }

    /// What a peer in this mode notes of a reduce-scatter segment it received.
    pub(super) fn received(mode: Option<Self>, step: &p2p_proto::message::RingStep, st: &mut FaultState) {
        if mode == Some(Self::DropContribution) && step.id.phase == p2p_proto::ring::Phase::ReduceScatter {
            if st.attempt != (step.round, step.attempt) {
                st.received.clear();
                st.group_last = None;
                st.attempt = (step.round, step.attempt);
            }
            if step.id.level == 0 {
                // The group ring's steps: the last one brings the partial sum of the held chunk.
                let later = st.group_last.is_none_or(|(_, s)| u32::from(step.id.step) > s);
                if later {
                    st.group_last = Some((step.id.chunk, u32::from(step.id.step)));
                }
            }
            st.received.insert((step.id.level, step.id.chunk, step.id.segment), step.payload.clone());
        }
    }

    /// What a peer in this mode does to a signed segment on its way out: alter its bytes, or
    /// send in its place one it signed in an earlier round.
    pub(super) fn in_transit(mode: Option<Self>, step: &mut p2p_proto::message::RingStep, st: &mut FaultState) {
        let partial = step.id.phase == p2p_proto::ring::Phase::ReduceScatter && step.id.step >= 1;
        match mode {
            Some(Self::CorruptInTransit) if partial && !step.payload.is_empty() => step.payload[0] ^= 0x01,
            Some(Self::Replay) if partial => match &st.old {
                Some(old) if old.round < step.round => *step = old.clone(),
                Some(_) => {}
                None => st.old = Some(step.clone()),
            },
            _ => {}
        }
    }

    /// How a peer in this mode encodes: NaNs go out as their raw bits; a scaled gradient
    /// ignores the run's coordinate-wise clipping (only the fixed-point range bounds it).
    pub(super) fn encode(
        mode: Option<Self>,
        fixed: &p2p_proto::FixedPoint,
        weighted: &[f32],
    ) -> Result<Vec<i32>, p2p_proto::fixed::FixedPointError> {
        match mode {
            Some(Self::Nan) => Ok(weighted.iter().map(|v| v.to_bits() as i32).collect()),
            Some(Self::Scale1000 | Self::Spike) => p2p_proto::FixedPoint::default().encode(weighted),
            _ => fixed.encode(weighted),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use p2p_proto::hash::hash_i32s;
    use p2p_proto::message::RunId;

    const SEG: usize = 64;

    fn gradient(len: usize, seed: u32) -> Vec<f32> {
        let mix = |i: u32| (i ^ seed.wrapping_mul(0x9e37_79b9)).wrapping_mul(2_654_435_761);
        (0..len).map(|i| mix(i as u32) as f32 / u32::MAX as f32 - 0.5).collect()
    }

    /// The commit a member makes to `payload` (decoded norm `norm`), compressed with `residual`.
    fn commit(payload: &[i32], norm: f64, residual: &[i32], next: &[i32]) -> GradientCommit {
        GradientCommit {
            run: RunId::from_name("audit-test"),
            peer: "m".into(),
            round: 3,
            attempt: 0,
            ring: [0; 32],
            len: payload.len() as u64,
            chunk_hashes: audit::chunk_hashes(payload, 1, SEG),
            samples: 32,
            norm,
            param_hash: [1; 32],
            computed_at: 3,
            joiners: Vec::new(),
            excluded: Vec::new(),
            leaving: false,
            residual: hash_i32s(residual),
            residual_next: hash_i32s(next),
            signature: Vec::new(),
        }
    }

    /// Audits of compressed payloads recompute them exactly: an honest member's holds, a payload
    /// of another gradient or compressed without the residual its commit names is a lie, and a
    /// residual that is not revealed proves nothing.
    #[test]
    fn compressed_payloads_are_audited_exactly() {
        let fixed = p2p_proto::FixedPoint::default();
        let (w, other) = (gradient(1000, 1), gradient(1000, 2));
        let units = fixed.encode(&w).unwrap();
        let max_norm = 1e9;
        let judge_with = |comp, c: &GradientCommit, revealed: Option<Result<Arc<Vec<i32>>, Unrevealed>>| {
            judge(&fixed, &w, 32, c, 3, SEG, 0.0, Some((comp, max_norm)), revealed)
        };

        let int8 = Compression::Int8 { block: 32 };
        let e = compress::encode(int8, &units, None, fixed.max_units(), max_norm);
        assert!(matches!(judge_with(int8, &commit(&e.payload, e.norm, &[], &[]), None), Verdict::Holds(_)));
        let lie = compress::encode(int8, &fixed.encode(&other).unwrap(), None, fixed.max_units(), max_norm);
        let v = judge_with(int8, &commit(&lie.payload, lie.norm, &[], &[]), None);
        assert!(matches!(&v, Verdict::Lie(why) if why.contains("compressed")), "{v:?}");

        let topk = Compression::TopK { per_million: 50_000 };
        let residual: Vec<i32> = fixed.encode(&gradient(1000, 3)).unwrap();
        let e = compress::encode(topk, &units, Some(&residual), fixed.max_units(), max_norm);
        let next = e.residual.clone().unwrap();
        let honest = commit(&e.payload, e.norm, &residual, &next);
        let shown = || Some(Ok(Arc::new(residual.clone())));
        assert!(matches!(judge_with(topk, &honest, shown()), Verdict::Holds(_)));
        // Sent without its residual, while the commit names one.
        let bare = compress::encode(topk, &units, None, fixed.max_units(), max_norm);
        let v = judge_with(topk, &commit(&bare.payload, bare.norm, &residual, &next), shown());
        assert!(matches!(v, Verdict::Lie(_)), "{v:?}");
        // The right payload, but it claims to keep another residual than the payload leaves.
        let v = judge_with(topk, &commit(&e.payload, e.norm, &residual, &residual), shown());
        assert!(matches!(&v, Verdict::Lie(why) if why.contains("leaves")), "{v:?}");
        let refused = Unrevealed { reason: "peer p does not hold them".into(), lost: false };
        let v = judge_with(topk, &honest, Some(Err(refused)));
        assert!(matches!(&v, Verdict::Doubt(why) if why.contains("not revealed")), "{v:?}");
        // A stream that broke or timed out counts as not answering, not as a bad answer.
        let lost = Unrevealed { reason: "peer p did not answer in time".into(), lost: true };
        let v = judge_with(topk, &honest, Some(Err(lost)));
        assert!(matches!(&v, Verdict::Unanswered(why) if why.contains("could not be fetched")), "{v:?}");

        // Nothing (asynchronous rounds): the payload of zeros with the residual kept holds, with
        // no residual to reveal; anything else, or a residual it says changed, is a lie.
        let zeros = vec![0.0; 1000];
        for comp in [int8, topk] {
            let judge_empty =
                |c: &GradientCommit| judge(&fixed, &zeros, 0, c, 3, SEG, 0.0, Some((comp, max_norm)), None);
            let empty =
                |payload: &[i32], next: &[i32]| GradientCommit { samples: 0, ..commit(payload, 0.0, &residual, next) };
            let nothing = compress::zeros(comp, 1000);
            assert!(matches!(judge_empty(&empty(&nothing, &residual)), Verdict::Holds(_)), "{comp:?}");
            let v = judge_empty(&empty(&nothing, &next));
            assert!(matches!(&v, Verdict::Lie(why) if why.contains("residual changed")), "{comp:?}: {v:?}");
            let other = compress::encode(comp, &units, None, fixed.max_units(), max_norm).payload;
            let v = judge_empty(&empty(&other, &residual));
            assert!(matches!(&v, Verdict::Lie(why) if why.contains("no samples")), "{comp:?}: {v:?}");
        }
    }
}
