//! Ring payloads over direct libp2p streams.
//!
//! Each round, a member opens one stream to its right neighbour and writes the
//! frames of every step on it, in order. Incoming streams are read by one task
//! each, which checks every frame before it reaches the driver: the length
//! against [`p2p_proto::MAX_FRAME_BYTES`] before allocating, the version, the
//! encoding, the sender's signature, the payload against its blake3 hash, and that every
//! frame of a stream is for the attempt of its first (a frame signed for another round
//! is a replay). A bad frame closes that stream with a logged reason and is reported to the
//! driver (which fails the attempt, naming the sender); it never reaches the ring state
//! machine.

use futures::{AsyncReadExt, AsyncWriteExt, StreamExt};
use libp2p::{PeerId, StreamProtocol};
use libp2p_stream::Control;
use p2p_proto::codec::{HEADER_BYTES, decode_body, decode_header, encode_frame};
use p2p_proto::message::{RING_PROTOCOL, RingFrame, RingStep, StepError, VerifiedStep};
use p2p_proto::{FrameError, PeerKey};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{Notify, mpsc};
use tracing::{debug, warn};

/// A verified ring step (or why a frame was rejected) and the peer whose stream carried it.
#[derive(Debug)]
pub struct Inbound {
    pub from: PeerId,
    pub step: Result<VerifiedStep, String>,
    /// For a rejected frame that is its sender's doing (not a transport error): the attempt
    /// it was sent in (the stream's, or the frame's own); `None` when nobody is to blame.
    pub attempt: Option<(u64, u32)>,
    /// Notified by the driver to close the stream (it is not the ring's).
    pub close: Arc<Notify>,
}

/// Why a ring stream was closed.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("{0}")]
    Frame(#[from] FrameError),
    #[error("{0}")]
    Step(#[from] StepError),
    #[error("stream error: {0}")]
    Io(#[from] std::io::Error),
}

pub fn protocol() -> StreamProtocol {
    StreamProtocol::new(RING_PROTOCOL)
}

/// Reads one frame (its length checked before the body is allocated); `None` at a clean end
/// of stream.
pub async fn read_frame<T: serde::de::DeserializeOwned, R: futures::AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut Vec<u8>,
) -> Result<Option<T>, ReadError> {
    let mut header = [0u8; HEADER_BYTES];
    let mut got = 0;
    while got < HEADER_BYTES {
        let n = r.read(&mut header[got..]).await?;
        if n == 0 {
            if got == 0 {
                return Ok(None);
            }
            return Err(FrameError::Truncated { needed: HEADER_BYTES, available: got }.into());
        }
        got += n;
    }
    let len = decode_header(&header)?;
    buf.clear();
    buf.resize(len, 0);
    r.read_exact(buf).await.map_err(|e| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => ReadError::Frame(FrameError::Truncated { needed: len, available: 0 }),
        _ => ReadError::Io(e),
    })?;
    Ok(Some(decode_body(buf)?))
}

/// Accepts ring streams for the life of the node, one reader task per stream.
pub fn spawn_acceptor(mut control: Control, inbound: mpsc::Sender<Inbound>) {
    let mut incoming = control.accept(protocol()).expect("the ring protocol is registered once");
    tokio::spawn(async move {
        while let Some((peer, stream)) = incoming.next().await {
            tokio::spawn(read_stream(peer, stream, inbound.clone()));
        }
    });
}

async fn read_stream(peer: PeerId, mut stream: libp2p::Stream, inbound: mpsc::Sender<Inbound>) {
    let mut buf = Vec::new();
    let close = Arc::new(Notify::new());
    let Some(key) = crate::sign::public_key(&peer) else {
        warn!(%peer, "rejected ring stream: the peer's id holds no key to check its signatures");
        return;
    };
    let mut attempt: Option<(p2p_proto::RunId, u64, u32)> = None;
    loop {
        let frame = tokio::select! {
            f = read_frame::<RingFrame, _>(&mut stream, &mut buf) => f,
            () = close.notified() => return,
        };
        let stream_at = attempt.map(|(_, r, a)| (r, a));
        // A rejected frame is its sender's doing (the stream is authenticated end to end),
        // except when the transport cut it short.
        let (step, at) = match frame {
            Ok(Some(RingFrame::Step(step)))
                if !crate::sign::step_is_signed(&key, step.run, step.round, step.attempt, &step.header()) =>
            {
                (Err("its signature does not verify".to_owned()), stream_at.or(Some((step.round, step.attempt))))
            }
            Ok(Some(RingFrame::Step(step))) if attempt.is_some_and(|a| a != (step.run, step.round, step.attempt)) => {
                let (_, round, att) = attempt.expect("checked");
                let why = format!(
                    "a frame signed for round {} attempt {} on a stream of round {round} attempt {att}: replayed or stale",
                    step.round, step.attempt
                );
                (Err(why), stream_at)
            }
            Ok(Some(RingFrame::Step(step))) => {
                let at = (step.run, step.round, step.attempt);
                match step.verify() {
                    Ok(v) => {
                        attempt = Some(at);
                        (Ok(v), Some((at.1, at.2)))
                    }
                    Err(e) => (Err(e.to_string()), Some((at.1, at.2))),
                }
            }
            Ok(None) => return,
            Err(ReadError::Io(e)) => (Err(format!("stream error: {e}")), None),
            Err(ReadError::Frame(e @ FrameError::Truncated { .. })) => (Err(e.to_string()), None),
            Err(e) => (Err(e.to_string()), stream_at),
        };
        let rejected = step.is_err();
        if let Err(reason) = &step {
            warn!(%peer, %reason, "rejected ring frame; closing the stream");
        }
        if inbound.send(Inbound { from: peer, step, attempt: at, close: close.clone() }).await.is_err() || rejected {
            return;
        }
    }
}

/// Opens a stream to `peer` and writes every step sent on the returned channel,
/// in order, until the sender is dropped.
pub fn spawn_writer(mut control: Control, peer: PeerKey, open_timeout: Duration) -> mpsc::UnboundedSender<RingStep> {
    let (tx, mut rx) = mpsc::unbounded_channel::<RingStep>();
    tokio::spawn(async move {
        let Ok(peer_id) = peer.parse::<PeerId>() else {
            warn!(%peer, "ring neighbour has an invalid peer id");
            return;
        };
        let mut stream = match tokio::time::timeout(open_timeout, control.open_stream(peer_id, protocol())).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                warn!(%peer, error = %e, "cannot open a ring stream to the right neighbour");
                return;
            }
            Err(_) => {
                warn!(%peer, "timed out opening a ring stream to the right neighbour");
                return;
            }
        };
        while let Some(step) = rx.recv().await {
            let frame = encode_frame(&RingFrame::Step(step));
            if let Err(e) = stream.write_all(&frame).await {
                warn!(%peer, error = %e, "ring stream write failed");
                return;
            }
        }
        let _ = stream.close().await;
        debug!(%peer, "ring stream closed");
    });
    tx
}
