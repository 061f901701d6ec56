//! What happens after a training round completed, in round order, beside the
//! driver's loop: wait for the worker's apply, record the round in the ledger
//! outbox (before it is logged, so a crash never leaves a logged round that
//! the ledger does not know), tell the loop which state this peer now holds,
//! then log the evaluation and the checkpoint.

use super::Internal;
use crate::ledger::outbox::RoundTally;
use crate::ledger::task::LedgerHandle;
use crate::train::worker::Reply;
use p2p_proto::Hash;
use p2p_proto::hash::hex;
use p2p_proto::message::StateTag;
use std::path::PathBuf;
use tokio::sync::mpsc;
use tracing::{info, warn};

/// What is left to do once a training round completed; the futures were queued on the
/// worker in round order when the round completed.
pub(super) struct PostRound {
    pub round: u64,
    pub ring_size: usize,
    pub loss: Option<f32>,
    pub ring_samples: u64,
    pub own_samples: u64,
    pub own_commit: Hash,
    pub bytes_sent: u64,
    pub round_us: u64,
    pub applied: Reply<Hash>,
    pub evaluated: Option<Reply<f64>>,
    pub saved: Option<(PathBuf, Reply<Result<Hash, String>>)>,
}

pub(super) async fn post_rounds(
    mut rx: mpsc::UnboundedReceiver<PostRound>,
    ledger: Option<LedgerHandle>,
    driver: mpsc::UnboundedSender<Internal>,
    metrics: crate::metrics::Metrics,
) {
    while let Some(p) = rx.recv().await {
        let Ok(hash) = p.applied.await else {
            warn!(round = p.round, "the compute thread stopped; no more rounds can be applied");
            return;
        };
        if let Some(ledger) = &ledger {
            ledger.round_completed(RoundTally {
                round: p.round,
                samples: p.own_samples,
                commit: p.own_commit,
                param_hash: hash,
            });
        }
        let _ = driver.send(Internal::Applied(StateTag { round: p.round + 1, param_hash: hash }));
        let secs = (p.round_us as f64 / 1e6).max(1e-9);
        info!(
            round = p.round,
            ring_size = p.ring_size,
            loss = p.loss.unwrap_or(f32::NAN),
            samples = p.ring_samples,
            own_samples = p.own_samples,
            samples_per_s = p.ring_samples as f64 / secs,
            bytes_sent = p.bytes_sent,
            commit = %hex(&p.own_commit),
            param_hash = %hex(&hash),
            "round trained"
        );
        metrics.trained(crate::metrics::RoundPoint {
            round: p.round,
            ring_size: p.ring_size,
            loss: p.loss.map(f64::from),
            accuracy: None,
            samples_per_s: p.ring_samples as f64 / secs,
            round_s: secs,
        });
        if let Some(eval) = p.evaluated
            && let Ok(accuracy) = eval.await
        {
            info!(round = p.round, accuracy, "evaluated");
            metrics.evaluated(p.round, accuracy);
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
