//! Training state over direct streams, for peers that join late or come back.
//!
//! Serving: every peer accepts [`STATE_PROTOCOL`] streams; a request names a
//! round, and the driver decides when (and whether) this peer's state is the
//! state for that round: it may have to finish the previous round first. The
//! answer is a [`StateReply`] header listing every chunk's blake3, then the
//! chunks. Fetching: a joiner asks one peer after another, checks the header
//! against its own model before it allocates anything, and every chunk against
//! its hash as it arrives ([`p2p_proto::state::Assembler`]). Whether the state
//! is the run's (and not merely intact) is the driver's call, from the peers'
//! signed statements and the chain.

use crate::ring_io::read_frame;
use futures::{AsyncWriteExt, StreamExt};
use libp2p::{PeerId, StreamProtocol};
use libp2p_stream::Control;
use p2p_proto::codec::encode_frame;
use p2p_proto::message::{
    AttemptRef, MAX_UNSETTLED, RunId, STATE_PROTOCOL, Settlement, StateChunk, StateHeader, StateReply, StateRequest,
    StateTag,
};
use p2p_proto::state::{Assembler, State};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, warn};

/// Longest wait for the first frame of an answer: the server may be finishing the round the
/// state is for.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(15);
/// Longest pause between two chunks.
const CHUNK_TIMEOUT: Duration = Duration::from_secs(10);
/// States served at once.
const CONCURRENT_SERVES: usize = 4;
/// State and settlement requests answered at once.
const CONCURRENT_REQUESTS: usize = 32;
/// The longest a state of `bytes` may take to serve or fetch, whole: 10 minutes, or longer for
/// a state that would need more than 1 MiB/s, so only a peer holding the stream open on purpose
/// reaches it.
fn transfer_deadline(bytes: usize) -> Duration {
    Duration::from_secs(600).max(Duration::from_secs_f64(bytes as f64 / f64::from(1 << 20)))
}

/// A state ready to be sent: its header and its bytes.
#[derive(Debug, Clone)]
pub struct Served {
    pub header: StateHeader,
    pub bytes: Arc<Vec<u8>>,
}

/// A peer asks for this peer's state for `round` (or, with `None`, only about `unsettled`);
/// the driver answers on `reply`.
#[derive(Debug)]
pub struct ServeRequest {
    pub from: PeerId,
    pub round: Option<u64>,
    /// Attempts the asker was in without learning their outcome (at most [`MAX_UNSETTLED`]).
    pub unsettled: Vec<AttemptRef>,
    pub reply: oneshot::Sender<Answer>,
}

/// The driver's answer to a [`ServeRequest`].
#[derive(Debug)]
pub enum Answer {
    State(Served),
    Settled(Settlement),
    /// Why not, and the state this peer holds.
    Refused(String, StateTag),
}

/// Why a state could not be fetched from a peer.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("cannot open a state stream to {peer}: {reason}")]
    Open { peer: PeerId, reason: String },
    #[error("{peer} did not answer in time")]
    Timeout { peer: PeerId },
    #[error("{peer} cannot serve round {round}: {reason} (it holds round {have})")]
    Refused { peer: PeerId, round: u64, reason: String, have: u64 },
    #[error("{peer} sent a bad state: {reason}")]
    Bad { peer: PeerId, reason: String },
}

/// Accepts state requests for the life of the node and hands them to the driver.
pub fn serve(mut control: Control, run: RunId, requests: mpsc::Sender<ServeRequest>) {
    let Ok(mut incoming) = control.accept(StreamProtocol::new(STATE_PROTOCOL)) else {
        warn!("the state protocol is registered twice; not serving it");
        return;
    };
    // Requests are read a bounded number at once, each within a deadline; each state served
    // holds a copy of the whole state until it is written, so only a few are served at once
    // (an asker beyond them is refused and asks another peer).
    let streams = Arc::new(tokio::sync::Semaphore::new(CONCURRENT_REQUESTS));
    let states = Arc::new(tokio::sync::Semaphore::new(CONCURRENT_SERVES));
    tokio::spawn(async move {
        while let Some((peer, stream)) = incoming.next().await {
            let Ok(slot) = streams.clone().try_acquire_owned() else {
                debug!(%peer, "state stream dropped: already answering {CONCURRENT_REQUESTS} requests");
                continue;
            };
            let (requests, states) = (requests.clone(), states.clone());
            tokio::spawn(async move {
                let _slot = slot;
                if let Err(e) = answer(peer, stream, run, requests, states).await {
                    debug!(%peer, reason = %e, "state request not served");
                }
            });
        }
    });
}

async fn answer(
    peer: PeerId,
    mut stream: libp2p::Stream,
    run: RunId,
    requests: mpsc::Sender<ServeRequest>,
    states: Arc<tokio::sync::Semaphore>,
) -> Result<(), String> {
    let mut buf = Vec::new();
    let req: StateRequest = tokio::time::timeout(CHUNK_TIMEOUT, read_frame(&mut stream, &mut buf))
        .await
        .map_err(|_| "no request in time".to_owned())?
        .map_err(|e| e.to_string())?
        .ok_or("the stream closed before the request")?;
    if req.run != run {
        let refusal = StateReply::Refused { reason: "not a peer of that run".into(), have: StateTag::default() };
        write_within(&mut stream, &encode_frame(&refusal)).await?;
        return Err(format!("asked for run {}", req.run));
    }
    // A state request holds a state slot until it is served; a settlement request needs none.
    let _state = match req.round {
        Some(_) => match states.try_acquire_owned() {
            Ok(slot) => Some(slot),
            Err(_) => {
                let reason = format!("serving {CONCURRENT_SERVES} other peers already: ask another peer");
                let refusal = StateReply::Refused { reason, have: StateTag::default() };
                write_within(&mut stream, &encode_frame(&refusal)).await?;
                return Err("busy".into());
            }
        },
        None => None,
    };
    let (reply, rx) = oneshot::channel();
    let mut unsettled = req.unsettled;
    unsettled.truncate(MAX_UNSETTLED);
    requests
        .send(ServeRequest { from: peer, round: req.round, unsettled, reply })
        .await
        .map_err(|_| "the node is stopping")?;
    let served = match tokio::time::timeout(ANSWER_TIMEOUT, rx).await {
        Ok(Ok(Answer::State(s))) => s,
        Ok(Ok(other)) => {
            let reply = match other {
                Answer::Settled(s) => StateReply::Settled(s),
                Answer::Refused(reason, have) => StateReply::Refused { reason, have },
                Answer::State(_) => unreachable!("matched above"),
            };
            write_within(&mut stream, &encode_frame(&reply)).await?;
            let _ = stream.close().await;
            return Ok(());
        }
        Err(_) | Ok(Err(_)) => return Err("the driver did not answer in time".into()),
    };
    write_within(&mut stream, &encode_frame(&StateReply::Header(served.header.clone()))).await?;
    // An asker taking each chunk just within its timeout still has the state written by this.
    let most = transfer_deadline(served.bytes.len());
    let deadline = tokio::time::Instant::now() + most;
    for chunk in p2p_proto::state::chunks(&served.bytes) {
        if tokio::time::Instant::now() >= deadline {
            return Err(format!("the asker took longer than {} s to take the state", most.as_secs()));
        }
        write_within(&mut stream, &encode_frame(&chunk)).await?;
    }
    let _ = stream.close().await;
    debug!(%peer, round = ?req.round, bytes = served.bytes.len(), "state served");
    Ok(())
}

/// Writes `frame` within the time the asker has to take a chunk.
async fn write_within(stream: &mut libp2p::Stream, frame: &[u8]) -> Result<(), String> {
    tokio::time::timeout(CHUNK_TIMEOUT, stream.write_all(frame))
        .await
        .map_err(|_| "the asker did not take a frame in time".to_owned())?
        .map_err(|e| e.to_string())
}

/// Opens a state stream to `peer`, sends `request` and reads the first frame of the answer.
async fn ask(
    control: &mut Control,
    peer: PeerId,
    request: &StateRequest,
    buf: &mut Vec<u8>,
) -> Result<(libp2p::Stream, StateReply), FetchError> {
    let mut stream =
        tokio::time::timeout(CHUNK_TIMEOUT, control.open_stream(peer, StreamProtocol::new(STATE_PROTOCOL)))
            .await
            .map_err(|_| FetchError::Timeout { peer })?
            .map_err(|e| FetchError::Open { peer, reason: e.to_string() })?;
    let bad = |reason: String| FetchError::Bad { peer, reason };
    stream.write_all(&encode_frame(request)).await.map_err(|e| bad(e.to_string()))?;
    let reply: StateReply = tokio::time::timeout(ANSWER_TIMEOUT, read_frame(&mut stream, buf))
        .await
        .map_err(|_| FetchError::Timeout { peer })?
        .map_err(|e| bad(e.to_string()))?
        .ok_or_else(|| bad("the stream closed before the answer".into()))?;
    if let StateReply::Refused { reason, have } = reply {
        return Err(FetchError::Refused { peer, round: request.round.unwrap_or_default(), reason, have: have.round });
    }
    Ok((stream, reply))
}

/// Fetches the state for `round` of `run` from `peer`, for a model of `params` values whose
/// optimizer keeps `moments` moment vectors, asking which of the `unsettled` attempts the
/// ring certified. Every chunk is checked against the header.
pub async fn fetch(
    control: &mut Control,
    peer: PeerId,
    run: RunId,
    round: u64,
    (params, moments): (u64, u8),
    unsettled: &[AttemptRef],
) -> Result<State, FetchError> {
    let bad = |reason: String| FetchError::Bad { peer, reason };
    let mut buf = Vec::new();
    let request = StateRequest { run, round: Some(round), unsettled: unsettled.to_vec() };
    let (mut stream, reply) = ask(control, peer, &request, &mut buf).await?;
    let StateReply::Header(header) = reply else { return Err(bad("it answered without a state".into())) };
    let mut assembler = Assembler::new(header, run, round, params, moments).map_err(|e| bad(e.to_string()))?;
    // A server sending a chunk just within each chunk's timeout still finishes by this.
    let bytes = 4 * params as usize * (1 + moments as usize);
    let deadline = tokio::time::Instant::now() + transfer_deadline(bytes);
    while !assembler.is_complete() {
        let wait = CHUNK_TIMEOUT.min(deadline.saturating_duration_since(tokio::time::Instant::now()));
        let chunk: StateChunk = tokio::time::timeout(wait, read_frame(&mut stream, &mut buf))
            .await
            .map_err(|_| FetchError::Timeout { peer })?
            .map_err(|e| bad(e.to_string()))?
            .ok_or_else(|| bad("the stream closed before the last chunk".into()))?;
        assembler.push(chunk).map_err(|e| bad(e.to_string()))?;
    }
    let _ = stream.close().await;
    assembler.finish().ok_or_else(|| bad("incomplete state".into()))
}

/// Asks `peer` only what it knows of the `unsettled` attempts.
pub async fn settle(
    control: &mut Control,
    peer: PeerId,
    run: RunId,
    unsettled: &[AttemptRef],
) -> Result<Settlement, FetchError> {
    let request = StateRequest { run, round: None, unsettled: unsettled.to_vec() };
    let (mut stream, reply) = ask(control, peer, &request, &mut Vec::new()).await?;
    let _ = stream.close().await;
    match reply {
        StateReply::Settled(s) => Ok(s),
        _ => Err(FetchError::Bad { peer, reason: "it answered a settlement request with a state".into() }),
    }
}
