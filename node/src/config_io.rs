//! A run's configuration over direct streams, so that a peer can join with only
//! the run id: every training peer serves its configuration (as JSON) under
//! [`CONFIG_PROTOCOL`]; a joining peer asks its bootstrap peers for the run id
//! and accepts an answer only if it hashes to that id.
//!
//! Request: the 32-byte run id. Answer: a u32 (LE) length, then that many bytes
//! of JSON, at most [`MAX_CONFIG_BYTES`]; length 0 means "not my run".

use crate::train::config::RunConfig;
use futures::{AsyncReadExt, AsyncWriteExt, StreamExt};
use libp2p::{PeerId, StreamProtocol};
use libp2p_stream::Control;
use p2p_proto::message::RunId;
use std::time::Duration;
use tracing::{debug, warn};

pub const CONFIG_PROTOCOL: &str = "/dtrain/config/1";
/// A configuration is a few hundred bytes; anything near this is not one.
pub const MAX_CONFIG_BYTES: usize = 64 * 1024;
/// Longest a single request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error(
        "no --bootstrap peer with a /p2p/<peer id> to ask for the run's configuration: pass --config <file> or a full bootstrap address"
    )]
    NoPeers,
    #[error(
        "no peer served the configuration of run 0x{run} within {secs} s ({last}): is the run id right, and is a peer of that run reachable?"
    )]
    NotFound { run: String, secs: u64, last: String },
}

/// Serves `config` (the run's bound configuration) to peers asking for `run`.
pub fn serve(control: Control, run: RunId, config: &RunConfig) {
    let json = std::sync::Arc::new(serde_json::to_vec(config).expect("the configuration serializes"));
    serve_requests(control, CONFIG_PROTOCOL, "configuration", move |mut stream| {
        let json = json.clone();
        async move {
            let mut asked = [0u8; 32];
            stream.read_exact(&mut asked).await?;
            let body: &[u8] = if asked == run.0 { &json } else { &[] };
            stream.write_all(&(body.len() as u32).to_le_bytes()).await?;
            stream.write_all(body).await?;
            stream.close().await
        }
    });
}

/// Requests of one protocol answered at once; more wait for a free slot.
const CONCURRENT_ANSWERS: usize = 8;
/// Requests of one protocol answered at once for one peer; its streams beyond are dropped at
/// once, so that one peer holding streams open cannot take every slot.
const ANSWERS_PER_PEER: usize = 2;

/// Accepts streams of `protocol` and answers each with `answer`, in its own task, within
/// [`REQUEST_TIMEOUT`], at most [`CONCURRENT_ANSWERS`] at a time and [`ANSWERS_PER_PEER`] for
/// one peer; failures are logged (at debug) as `what` requests that failed.
pub(crate) fn serve_requests<F, Fut>(mut control: Control, protocol: &'static str, what: &'static str, answer: F)
where
    F: Fn(libp2p::Stream) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = std::io::Result<()>> + Send + 'static,
{
    let Ok(mut incoming) = control.accept(StreamProtocol::new(protocol)) else {
        warn!(protocol, "the protocol is registered twice; not serving it");
        return;
    };
    let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(CONCURRENT_ANSWERS));
    let per_peer = PerPeer::default();
    tokio::spawn(async move {
        while let Some((peer, stream)) = incoming.next().await {
            let Some(held) = per_peer.take(peer) else {
                debug!(%peer, what, "request dropped: that peer has {ANSWERS_PER_PEER} answered already");
                continue;
            };
            let Ok(slot) = slots.clone().acquire_owned().await else { return };
            let answering = answer(stream);
            tokio::spawn(async move {
                let _slots = (slot, held);
                if let Err(e) = tokio::time::timeout(REQUEST_TIMEOUT, answering)
                    .await
                    .unwrap_or_else(|_| Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "request took too long")))
                {
                    debug!(%peer, what, reason = %e, "request failed");
                }
            });
        }
    });
}

async fn ask(control: &mut Control, peer: PeerId, run: RunId) -> Result<RunConfig, String> {
    let mut stream =
        control.open_stream(peer, StreamProtocol::new(CONFIG_PROTOCOL)).await.map_err(|e| e.to_string())?;
    stream.write_all(&run.0).await.map_err(|e| e.to_string())?;
    let mut len = [0u8; 4];
    stream.read_exact(&mut len).await.map_err(|e| e.to_string())?;
    let len = u32::from_le_bytes(len) as usize;
    if len == 0 {
        return Err(format!("peer {peer} is not in this run"));
    }
    if len > MAX_CONFIG_BYTES {
        return Err(format!("peer {peer} announced a {len}-byte configuration (limit {MAX_CONFIG_BYTES})"));
    }
    let mut body = vec![0u8; len];
    stream.read_exact(&mut body).await.map_err(|e| e.to_string())?;
    let cfg = RunConfig::from_json(&body).map_err(|e| format!("peer {peer} sent an invalid configuration: {e}"))?;
    if cfg.run_id() != run {
        return Err(format!("peer {peer} sent the configuration of another run"));
    }
    Ok(cfg)
}

/// Asks `peers` in turn, until one answers with the configuration of `run` or `wait` passes.
pub async fn fetch(
    mut control: Control,
    peers: &[PeerId],
    run: RunId,
    wait: Duration,
) -> Result<RunConfig, FetchError> {
    if peers.is_empty() {
        return Err(FetchError::NoPeers);
    }
    let deadline = tokio::time::Instant::now() + wait;
    let mut last = String::from("no answer yet");
    loop {
        for peer in peers {
            match tokio::time::timeout(REQUEST_TIMEOUT, ask(&mut control, *peer, run)).await {
                Ok(Ok(cfg)) => return Ok(cfg),
                Ok(Err(e)) => last = e,
                Err(_) => last = format!("peer {peer} did not answer"),
            }
            debug!(%peer, reason = %last, "configuration not fetched yet");
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(FetchError::NotFound { run: hex::encode(run.0), secs: wait.as_secs(), last });
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Requests being answered, by peer.
#[derive(Debug, Clone, Default)]
struct PerPeer(std::sync::Arc<std::sync::Mutex<std::collections::HashMap<PeerId, usize>>>);

/// One request of `peer` being answered; given back when dropped.
struct PeerSlot(PerPeer, PeerId);

impl PerPeer {
    /// A slot for one more of `peer`'s requests, unless it has [`ANSWERS_PER_PEER`] already.
    fn take(&self, peer: PeerId) -> Option<PeerSlot> {
        let mut busy = self.0.lock().expect("never poisoned");
        let n = busy.entry(peer).or_default();
        (*n < ANSWERS_PER_PEER).then(|| {
            *n += 1;
            PeerSlot(self.clone(), peer)
        })
    }
}

impl Drop for PeerSlot {
    fn drop(&mut self) {
        let mut busy = (self.0).0.lock().expect("never poisoned");
        if let Some(n) = busy.get_mut(&self.1) {
            *n -= 1;
            if *n == 0 {
                busy.remove(&self.1);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_peer_gets_at_most_its_share_of_answers_and_gets_them_back() {
        let per_peer = PerPeer::default();
        let (a, b) = (PeerId::random(), PeerId::random());
        let held: Vec<PeerSlot> = (0..ANSWERS_PER_PEER).map(|_| per_peer.take(a).expect("a slot")).collect();
        assert!(per_peer.take(a).is_none(), "one more than its share");
        assert!(per_peer.take(b).is_some(), "another peer is answered meanwhile");
        drop(held);
        assert!(per_peer.take(a).is_some(), "its slots came back");
        assert!(per_peer.0.lock().unwrap().is_empty(), "no peer is remembered once answered");
    }
}
