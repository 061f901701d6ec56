//! Committed gradients on request, for audits within a tolerance; residuals of
//! top-k compression on request, for audits of compressed contributions.
//!
//! Where gradients are not bit-exact from one device to another (GPU backends),
//! an auditor cannot recompute a commit's hashes; it asks the target for the
//! values it committed to and compares them with its own recomputation within
//! the run's tolerance ([`p2p_proto::audit::within_tolerance`]). Every peer
//! serves, under [`REVEAL_PROTOCOL`], its own committed values of its recent
//! attempts and the values it fetched of others (so that a fault can be checked
//! by anyone after the accused stops answering). An answer proves itself: the
//! asker accepts it only if it makes the accused's signed commit, hash for hash.
//! In runs with top-k compression the same store holds the residual each
//! commit was compressed with (the commit carries its blake3), which an
//! auditor needs to recompute the payload.
//!
//! Request: the 32-byte run id, the round (u64 LE), the attempt (u32 LE), the
//! length of the member's peer id (u16 LE, at most [`MAX_PEER_BYTES`]) and the
//! peer id. Answer: a count of values (u32 LE; 0: not held), then the values as
//! i32 LE.

use futures::{AsyncReadExt, AsyncWriteExt};
use libp2p::{PeerId, StreamProtocol};
use libp2p_stream::Control;
use p2p_proto::audit;
use p2p_proto::message::{GradientCommit, PeerKey, RunId};
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tracing::debug;

pub const REVEAL_PROTOCOL: &str = "/dtrain/reveal/1";
/// Peer ids are about 52 characters.
const MAX_PEER_BYTES: usize = 128;
/// Committed vectors kept: this peer's own of its last few attempts, and as many of others'
/// (fetched to check a fault), apart, so that fetches never push out its own.
const KEPT: usize = 8;
/// Longest a single request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

type Key = (PeerKey, u64, u32);
type Kept = VecDeque<(Key, Arc<Vec<i32>>)>;

/// Committed vectors this peer can reveal, by (member, round, attempt): its own, and others'
/// it fetched; the oldest of each go first.
#[derive(Debug, Clone)]
pub struct Store {
    me: PeerKey,
    kept: Arc<Mutex<[Kept; 2]>>,
}

impl Store {
    pub fn new(me: &str) -> Self {
        Self { me: me.to_owned(), kept: Arc::default() }
    }

    pub fn insert(&self, peer: &str, round: u64, attempt: u32, data: Arc<Vec<i32>>) {
        let mut kept = self.kept.lock().expect("reveal store");
        let kept = &mut kept[usize::from(peer != self.me)];
        let key = (peer.to_owned(), round, attempt);
        kept.retain(|(k, _)| *k != key);
        if kept.len() >= KEPT {
            kept.pop_front();
        }
        kept.push_back((key, data));
    }

    fn get(&self, key: &Key) -> Option<Arc<Vec<i32>>> {
        let kept = self.kept.lock().expect("reveal store");
        kept.iter().flatten().find(|(k, _)| k == key).map(|(_, d)| d.clone())
    }
}

/// Serves the vectors in `store` to peers of `run` that ask.
pub fn serve(control: Control, run: RunId, store: Store) {
    crate::config_io::serve_requests(control, REVEAL_PROTOCOL, "reveal", move |mut stream| {
        let store = store.clone();
        async move {
            let mut head = [0u8; 32 + 8 + 4 + 2];
            stream.read_exact(&mut head).await?;
            let round = u64::from_le_bytes(head[32..40].try_into().expect("8 bytes"));
            let attempt = u32::from_le_bytes(head[40..44].try_into().expect("4 bytes"));
            let len = u16::from_le_bytes([head[44], head[45]]) as usize;
            if len > MAX_PEER_BYTES {
                return Err(std::io::Error::other(format!("a {len}-byte peer id")));
            }
            let mut name = vec![0u8; len];
            stream.read_exact(&mut name).await?;
            let held = (head[..32] == run.0)
                .then(|| String::from_utf8(name).ok())
                .flatten()
                .and_then(|member| store.get(&(member, round, attempt)));
            let data: &[i32] = held.as_deref().map_or(&[], Vec::as_slice);
            stream.write_all(&(data.len() as u32).to_le_bytes()).await?;
            // A piece at a time: no second copy of the whole vector per request.
            for piece in data.chunks(16 * 1024) {
                stream.write_all(&le_bytes(piece)).await?;
            }
            stream.close().await
        }
    });
}

/// A test-only liar's service: accepts every reveal request and closes the stream unanswered.
pub fn serve_nothing(control: Control) {
    crate::config_io::serve_requests(
        control,
        REVEAL_PROTOCOL,
        "reveal",
        |mut stream| async move { stream.close().await },
    );
}

fn le_bytes(data: &[i32]) -> Vec<u8> {
    data.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// What a revealed vector must be for the asker to accept it.
#[derive(Debug, Clone, Copy)]
pub enum Expect {
    /// The values `commit` committed to, in a ring of `n` with segments of `seg` values.
    Committed { n: usize, seg: usize },
    /// The residual a top-k payload was compressed with ([`p2p_proto::compress`]): `len`
    /// values whose blake3 is the commit's `residual`.
    Residual { len: usize },
}

/// Why a holder did not reveal: no stream to it could be opened (it may be reachable a moment
/// later: a peer that just started may not know its address yet), the stream broke or fell
/// silent, or it answered without the values.
enum AskError {
    Open(String),
    Lost(String),
    Other(String),
}

impl From<std::io::Error> for AskError {
    fn from(e: std::io::Error) -> Self {
        Self::Lost(e.to_string())
    }
}

/// Why committed values were not revealed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unrevealed {
    pub reason: String,
    /// Every holder's stream broke or timed out, none refused or answered wrongly: what a
    /// busy holder looks like (or one whose answering slots a third peer fills, which drops
    /// new streams) as much as one that withholds, so it counts against the holder as not
    /// answering, not as a bad answer.
    pub lost: bool,
}

impl std::fmt::Display for Unrevealed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.reason)
    }
}

async fn ask(
    control: &mut Control,
    from: PeerId,
    commit: &GradientCommit,
    expect: Expect,
) -> Result<Vec<i32>, AskError> {
    let mut stream = control
        .open_stream(from, StreamProtocol::new(REVEAL_PROTOCOL))
        .await
        .map_err(|e| AskError::Open(format!("failed to open stream: {e}")))?;
    let mut req = Vec::with_capacity(46 + commit.peer.len());
    req.extend_from_slice(&commit.run.0);
    req.extend_from_slice(&commit.round.to_le_bytes());
    req.extend_from_slice(&commit.attempt.to_le_bytes());
    req.extend_from_slice(&(commit.peer.len() as u16).to_le_bytes());
    req.extend_from_slice(commit.peer.as_bytes());
    stream.write_all(&req).await?;
    let mut count = [0u8; 4];
    stream.read_exact(&mut count).await?;
    let count = u32::from_le_bytes(count) as u64;
    if count == 0 {
        return Err(AskError::Other(format!("peer {from} does not hold them")));
    }
    let want = match expect {
        Expect::Committed { .. } => commit.len,
        Expect::Residual { len } => len as u64,
    };
    if count != want {
        return Err(AskError::Other(format!("peer {from} answered {count} values, {want} expected")));
    }
    let mut bytes = vec![0u8; count as usize * 4];
    stream.read_exact(&mut bytes).await?;
    let data: Vec<i32> = bytes.chunks_exact(4).map(|b| i32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
    match expect {
        Expect::Committed { n, seg } => audit::matches_commit(commit, &data, n, seg)
            .map_err(|e| AskError::Other(format!("peer {from} answered values that are not the commit's: {e}")))?,
        Expect::Residual { .. } if p2p_proto::hash::hash_i32s(&data) != commit.residual => {
            return Err(AskError::Other(format!("peer {from} answered a residual that is not the commit's")));
        }
        Expect::Residual { .. } => {}
    }
    Ok(data)
}

/// The vector `commit` names (as `expect` says), from the first of `from` that answers with
/// values making the commit.
pub async fn fetch(
    mut control: Control,
    from: &[PeerId],
    commit: &GradientCommit,
    expect: Expect,
) -> Result<Vec<i32>, Unrevealed> {
    let mut last = String::from("nobody to ask");
    // Whether a holder refused, answered wrongly or could not be reached at all.
    let mut attributable = from.is_empty();
    // A holder no stream could be opened to is asked again after a pause (a peer that just
    // started may not know the others' addresses yet), a few times, for at most about 1.5 s.
    for pause in OPEN_RETRY_MS.iter().map(|ms| Duration::from_millis(*ms)) {
        tokio::time::sleep(pause).await;
        let mut unreachable = false;
        for peer in from {
            match tokio::time::timeout(REQUEST_TIMEOUT, ask(&mut control, *peer, commit, expect)).await {
                Ok(Ok(data)) => return Ok(data),
                Ok(Err(AskError::Open(e))) => {
                    unreachable = true;
                    last = e;
                }
                Ok(Err(AskError::Other(e))) => {
                    attributable = true;
                    last = e;
                }
                Ok(Err(AskError::Lost(e))) => last = format!("the stream to peer {peer} broke: {e}"),
                Err(_) => last = format!("peer {peer} did not answer in time"),
            }
            debug!(%peer, reason = %last, "committed values not revealed");
        }
        if !unreachable {
            return Err(Unrevealed { reason: last, lost: !attributable });
        }
    }
    // A holder no stream could be opened to after every pause: it does not serve them.
    Err(Unrevealed { reason: last, lost: false })
}

/// Pauses before each round of asking a value's holders: the first at once, then again while
/// a holder could not be reached.
const OPEN_RETRY_MS: [u64; 6] = [0, 50, 100, 200, 400, 800];
