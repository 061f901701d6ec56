//! Ring payloads over direct libp2p streams, or over plain TCP beside them.
//!
//! Each round, a member opens one stream to its right neighbour and writes the
//! frames of every step on it, in order. The receiving side first answers with an
//! offer: none, or a port and a one-time token. With an offer the writer opens a
//! plain TCP connection to that port at the neighbour's IP address, sends the
//! token, and writes the frames there instead: the bytes then skip the
//! connection's encryption and multiplexing, which cost more CPU than the whole
//! loopback TCP copy. Integrity does not depend on the channel: every frame is
//! signed by its sender and its payload checked against its blake3 hash, and the
//! token, sent only over the authenticated stream, ties the TCP connection to
//! the peer. The payloads are not secret (auditors recompute them from public
//! inputs). A writer that cannot reach the port keeps to the stream.
//!
//! Incoming streams are read by one task
//! each, which checks every frame before it reaches the driver: the length
//! against [`p2p_proto::MAX_FRAME_BYTES`] before allocating, the version, the
//! encoding, the sender's signature, the payload against its blake3 hash, and that every
//! frame of a stream is for the attempt of its first (a frame signed for another round
//! is a replay). A bad frame closes that stream with a logged reason and is reported to the
//! driver (which fails the attempt, naming the sender); it never reaches the ring state
//! machine.

use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, StreamExt};
use libp2p::{PeerId, StreamProtocol};
use libp2p_stream::Control;
use p2p_proto::codec::{
    HEADER_BYTES, STEP_HEAD_MAX, decode_body, decode_header, decode_step_head, encode_step_frame_parts,
};
use p2p_proto::message::{
    RING_OFFER_DIRECT as OFFER_DIRECT, RING_OFFER_STREAM as OFFER_STREAM, RING_PROTOCOL,
    RING_TOKEN_BYTES as TOKEN_BYTES, RingFrame, RingStep, StepError, VerifiedStep,
};
use p2p_proto::{FrameError, PeerKey};
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, Semaphore, mpsc, oneshot};
use tokio_util::compat::{Compat, TokioAsyncReadCompatExt};
use tracing::{debug, info, warn};

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

/// Reads a frame's header and returns its body's length (checked against the limit before
/// anything is allocated); `None` at a clean end of stream.
async fn read_header<R: AsyncRead + Unpin>(r: &mut R) -> Result<Option<usize>, ReadError> {
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
    Ok(Some(decode_header(&header)?))
}

/// Fills `buf` from `r`; a stream that ends first is a truncated frame.
async fn read_body<R: AsyncRead + Unpin>(r: &mut R, buf: &mut [u8]) -> Result<(), ReadError> {
    r.read_exact(buf).await.map_err(|e| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => {
            ReadError::Frame(FrameError::Truncated { needed: buf.len(), available: 0 })
        }
        _ => ReadError::Io(e),
    })
}

/// Reads one frame (its length checked before the body is allocated); `None` at a clean end
/// of stream.
pub async fn read_frame<T: serde::de::DeserializeOwned, R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut Vec<u8>,
) -> Result<Option<T>, ReadError> {
    let Some(len) = read_header(r).await? else { return Ok(None) };
    // Only growth is zeroed: the bytes are overwritten by the read.
    buf.truncate(len);
    buf.resize(len, 0);
    read_body(r, buf).await?;
    Ok(Some(decode_body(buf)?))
}

/// Reads one ring frame as [`read_frame`] does, but its payload straight into a buffer of its
/// own (from [`payloads`]) rather than into `buf` and then out of it: the step's fields first,
/// then the payload, then the signature. Decodes what `read_frame` decodes and fails where it
/// fails.
async fn read_ring_frame<R: AsyncRead + Unpin>(r: &mut R, buf: &mut Vec<u8>) -> Result<Option<RingFrame>, ReadError> {
    let Some(len) = read_header(r).await? else { return Ok(None) };
    let start = len.min(STEP_HEAD_MAX);
    buf.truncate(start);
    buf.resize(start, 0);
    read_body(r, buf).await?;
    let (head, used) = decode_step_head(buf, len)?;
    let in_start = (start - used).min(head.payload_len);
    let mut payload = payloads::take(head.payload_len);
    payload[..in_start].copy_from_slice(&buf[used..used + in_start]);
    read_body(r, &mut payload[in_start..]).await?;
    // The signature: what the start holds of it, then the rest of the body.
    let tail_len = len - used - head.payload_len;
    buf.drain(..used + in_start);
    let held = buf.len();
    buf.resize(tail_len, 0);
    read_body(r, &mut buf[held..]).await?;
    Ok(Some(RingFrame::Step(head.into_step(payload, buf)?)))
}

/// Payload buffers handed back by the ring writers once sent, for the readers to fill: a
/// megabyte segment read into a buffer of its own would otherwise be a fresh allocation the
/// allocator zeroes or faults in, once per frame.
mod payloads {
    use std::sync::Mutex;

    /// Buffers kept at most (1 MiB each for full segments); the simulator calibrates its
    /// transport with buffers of this many segments (`testnet/src/sim.rs`).
    const KEEP: usize = 16;
    static FREE: Mutex<Vec<Vec<u8>>> = Mutex::new(Vec::new());

    /// A buffer of exactly `len` bytes, their values left over from its last use.
    pub fn take(len: usize) -> Vec<u8> {
        let mut v = FREE.lock().expect("never poisoned").pop().unwrap_or_default();
        // Only growth is zeroed: the bytes are overwritten by the read.
        v.truncate(len);
        v.resize(len, 0);
        v
    }

    /// Hands `v` back for a later frame.
    pub fn give(v: Vec<u8>) {
        let mut free = FREE.lock().expect("never poisoned");
        if free.len() < KEEP && v.capacity() > 0 {
            free.push(v);
        }
    }
}

/// How long a TCP connection to the data port has to send its token.
const TOKEN_TIMEOUT: Duration = Duration::from_secs(2);
/// Sent back on a direct connection whose token was offered: only then does the writer use it
/// (a connection dropped at a busy or attacked port leaves the writer on the stream).
const ACK: u8 = 0xac;
/// Connections to the data port that may be sending their token at once.
const MAX_HANDSHAKES: usize = 64;
/// Ring streams read at once from one peer: a round opens at most three to a member, and a
/// stream closes when its round ends (a few rounds' may overlap while they close).
const RING_STREAMS_PER_PEER: usize = 16;
/// How many times a writer opens a ring stream the receiver dropped before its offer.
const OPEN_TRIES: u32 = 4;
/// A ring stream that carries no frame for this long is closed: far beyond any round's
/// timeouts, so only a stream nobody writes to any more is.
const IDLE_TIMEOUT: Duration = Duration::from_secs(600);

type Pending = Arc<Mutex<HashMap<[u8; TOKEN_BYTES], oneshot::Sender<TcpStream>>>>;

/// The TCP port where ring payloads arrive directly, and the tokens offered on ring streams.
#[derive(Debug, Clone)]
pub struct DataPlane {
    port: u16,
    pending: Pending,
    /// Peers whose frames failed a check that bytes altered in transit could fail: they are
    /// offered the (authenticated) stream from then on, where such a failure is theirs.
    downgraded: Arc<Mutex<std::collections::HashSet<PeerId>>>,
}

/// A token offered on one ring stream; withdrawn when dropped.
struct Slot {
    token: [u8; TOKEN_BYTES],
    pending: Pending,
    rx: oneshot::Receiver<TcpStream>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.pending.lock().expect("never poisoned").remove(&self.token);
    }
}

impl DataPlane {
    /// Listens on `port` of `ip` (0: an ephemeral one) for the life of the node.
    pub async fn bind(ip: IpAddr, port: u16) -> std::io::Result<Self> {
        let listener = TcpListener::bind((ip, port)).await?;
        let port = listener.local_addr()?.port();
        info!(%ip, port, "ring payloads arrive over direct TCP");
        let pending = Pending::default();
        tokio::spawn(accept_direct(listener, pending.clone()));
        Ok(Self { port, pending, downgraded: Arc::default() })
    }

    fn downgrade(&self, peer: PeerId) {
        if self.downgraded.lock().expect("never poisoned").insert(peer) {
            warn!(%peer, "a frame from this peer failed its checks on the direct connection; its frames go over the stream from now on");
        }
    }

    fn is_downgraded(&self, peer: &PeerId) -> bool {
        self.downgraded.lock().expect("never poisoned").contains(peer)
    }

    fn offer(&self) -> ([u8; 3 + TOKEN_BYTES], Slot) {
        let mut token = [0u8; TOKEN_BYTES];
        getrandom::fill(&mut token).expect("the OS has a source of randomness");
        let (tx, rx) = oneshot::channel();
        self.pending.lock().expect("never poisoned").insert(token, tx);
        let mut offer = [0u8; 3 + TOKEN_BYTES];
        offer[0] = OFFER_DIRECT;
        offer[1..3].copy_from_slice(&self.port.to_le_bytes());
        offer[3..].copy_from_slice(&token);
        (offer, Slot { token, pending: self.pending.clone(), rx })
    }
}

/// Hands each TCP connection that sends an offered token to the stream that offered it.
async fn accept_direct(listener: TcpListener, pending: Pending) {
    let handshakes = Arc::new(Semaphore::new(MAX_HANDSHAKES));
    loop {
        let (mut conn, from) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                warn!(error = %e, "cannot accept a direct ring connection; retrying");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = handshakes.clone().try_acquire_owned() else {
            debug!(%from, "too many direct ring connections sending their token; dropped one");
            continue;
        };
        let pending = pending.clone();
        tokio::spawn(async move {
            use tokio::io::AsyncReadExt as _;
            let mut token = [0u8; TOKEN_BYTES];
            let read = tokio::time::timeout(TOKEN_TIMEOUT, conn.read_exact(&mut token)).await;
            drop(permit);
            if !matches!(read, Ok(Ok(_))) {
                debug!(%from, "direct ring connection sent no token; closed");
                return;
            }
            let slot = pending.lock().expect("never poisoned").remove(&token);
            match slot {
                Some(tx) => {
                    use tokio::io::AsyncWriteExt as _;
                    let _ = conn.set_nodelay(true);
                    if conn.write_all(&[ACK]).await.is_ok() {
                        let _ = tx.send(conn);
                    }
                }
                None => warn!(%from, "direct ring connection with a token nobody offered; closed"),
            }
        });
    }
}

/// Accepts ring streams for the life of the node, one reader task per stream. With a
/// `plane`, each stream is offered a direct TCP connection.
pub fn spawn_acceptor(mut control: Control, inbound: mpsc::Sender<Inbound>, plane: Option<DataPlane>) {
    let mut incoming = control.accept(protocol()).expect("the ring protocol is registered once");
    // A reader holds up to a frame's payload: bounded in number per peer, as a round opens at
    // most three streams to a member (a hierarchy's) and they close when their round ends.
    let open: Arc<Mutex<HashMap<PeerId, usize>>> = Arc::default();
    tokio::spawn(async move {
        while let Some((peer, stream)) = incoming.next().await {
            {
                let mut open = open.lock().expect("never poisoned");
                let n = open.entry(peer).or_default();
                if *n >= RING_STREAMS_PER_PEER {
                    warn!(%peer, "ring stream refused: {RING_STREAMS_PER_PEER} from that peer are open already");
                    continue;
                }
                *n += 1;
            }
            let (inbound, plane, open) = (inbound.clone(), plane.clone(), open.clone());
            tokio::spawn(async move {
                read_stream(peer, stream, inbound, plane).await;
                let mut open = open.lock().expect("never poisoned");
                if let Some(n) = open.get_mut(&peer) {
                    *n -= 1;
                    if *n == 0 {
                        open.remove(&peer);
                    }
                }
            });
        }
    });
}

type Source = Box<dyn AsyncRead + Unpin + Send>;

/// Sends the offer on a new ring stream and returns where the frames will come from (and the
/// first frame, when the writer kept to the stream); `None` when the stream ended first.
async fn open_source(
    peer: PeerId,
    mut stream: libp2p::Stream,
    plane: Option<&DataPlane>,
    buf: &mut Vec<u8>,
    close: &Notify,
) -> Option<(Source, bool, Option<Result<Option<RingFrame>, ReadError>>)> {
    let Some(plane) = plane.filter(|p| !p.is_downgraded(&peer)) else {
        stream.write_all(&[OFFER_STREAM]).await.ok()?;
        stream.flush().await.ok()?;
        return Some((Box::new(stream), false, None));
    };
    let (offer, mut slot) = plane.offer();
    stream.write_all(&offer).await.ok()?;
    stream.flush().await.ok()?;
    // The writer either connects with the token or, if it cannot, writes here.
    let first = tokio::select! {
        tcp = &mut slot.rx => match tcp {
            Ok(tcp) => {
                // A writer that gave up waiting for the acknowledgement writes on the stream
                // and drops the connection: follow whichever carries the first frame.
                let mut tcp = tcp.compat();
                let mut other = Vec::new();
                tokio::select! {
                    f = read_ring_frame(&mut tcp, &mut other) => match f {
                        // Closed without a byte of a frame: the frames come on the stream.
                        Ok(None) => None,
                        f => {
                            std::mem::swap(buf, &mut other);
                            return Some((Box::new(tcp), true, Some(f)));
                        }
                    },
                    f = read_ring_frame(&mut stream, buf) => Some(f),
                    () = close.notified() => return None,
                    () = tokio::time::sleep(IDLE_TIMEOUT) => return None,
                }
            }
            Err(_) => None,
        },
        f = read_ring_frame(&mut stream, buf) => Some(f),
        () = close.notified() => return None,
        () = tokio::time::sleep(IDLE_TIMEOUT) => return None,
    };
    Some((Box::new(stream), false, first))
}

async fn read_stream(peer: PeerId, stream: libp2p::Stream, inbound: mpsc::Sender<Inbound>, plane: Option<DataPlane>) {
    let mut buf = Vec::new();
    let close = Arc::new(Notify::new());
    let Some(key) = crate::sign::public_key(&peer) else {
        warn!(%peer, "rejected ring stream: the peer's id holds no key to check its signatures");
        return;
    };
    let Some((mut source, direct, mut first)) = open_source(peer, stream, plane.as_ref(), &mut buf, &close).await
    else {
        return;
    };
    let mut attempt: Option<(p2p_proto::RunId, u64, u32)> = None;
    // On a direct connection, segments already delivered: a repeat could be a replay by
    // someone on the path rather than the sender.
    let mut seen = std::collections::HashSet::new();
    loop {
        let frame = match first.take() {
            Some(f) => f,
            None => tokio::select! {
                f = tokio::time::timeout(IDLE_TIMEOUT, read_ring_frame(&mut source, &mut buf)) => match f {
                    Ok(f) => f,
                    Err(_) => {
                        debug!(%peer, "ring stream idle too long; closed");
                        return;
                    }
                },
                () = close.notified() => return,
            },
        };
        let stream_at = attempt.map(|(_, r, a)| (r, a));
        // A rejected frame is its sender's doing on the stream (authenticated end to end),
        // except when the transport cut it short; on a direct connection see below.
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
            Ok(Some(RingFrame::Step(step))) if direct && !seen.insert(step.id) => {
                (Err(format!("segment {:?} arrived twice", step.id)), stream_at)
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
            warn!(%peer, %reason, direct, "rejected ring frame; closing the stream");
        }
        // The direct connection is not authenticated: what failed these checks may have been
        // altered, replayed or repeated on the way. Nobody is blamed; the peer's frames take
        // the authenticated stream from now on, where a failure is its own.
        let at = match (&plane, direct && rejected) {
            (Some(plane), true) => {
                plane.downgrade(peer);
                None
            }
            _ => at,
        };
        if inbound.send(Inbound { from: peer, step, attempt: at, close: close.clone() }).await.is_err() || rejected {
            return;
        }
    }
}

/// Neighbours whose data port could not be used, and until when this peer does not try again:
/// a firewall that drops connection attempts would otherwise cost every round the wait.
pub type Unreachable = Arc<Mutex<HashMap<PeerKey, std::time::Instant>>>;

/// How long a data port that could not be used is left alone.
const UNREACHABLE_FOR: Duration = Duration::from_secs(600);

/// Reads the receiver's offer on a new ring stream: its data port and token, if it offers one.
async fn read_offer(stream: &mut libp2p::Stream) -> Result<Option<(u16, [u8; TOKEN_BYTES])>, std::io::Error> {
    let mut kind = [0u8; 1];
    stream.read_exact(&mut kind).await?;
    match kind[0] {
        OFFER_STREAM => return Ok(None),
        OFFER_DIRECT => {}
        other => return Err(std::io::Error::other(format!("unknown ring offer {other}"))),
    }
    let mut rest = [0u8; 2 + TOKEN_BYTES];
    stream.read_exact(&mut rest).await?;
    let mut token = [0u8; TOKEN_BYTES];
    token.copy_from_slice(&rest[2..]);
    Ok(Some((u16::from_le_bytes([rest[0], rest[1]]), token)))
}

/// Connects to the neighbour's data port and hands over the token; `None` (keep to the
/// stream) when it cannot be reached or does not acknowledge within `timeout` each.
async fn connect_direct(
    ip: IpAddr,
    port: u16,
    token: &[u8; TOKEN_BYTES],
    peer: &PeerKey,
    timeout: Duration,
) -> Option<Compat<TcpStream>> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut tcp = match tokio::time::timeout(timeout, TcpStream::connect((ip, port))).await {
        Ok(Ok(tcp)) => tcp,
        Ok(Err(e)) => {
            debug!(%peer, %ip, port, error = %e, "cannot reach the neighbour's data port; ring payloads go over the stream");
            return None;
        }
        Err(_) => {
            debug!(%peer, %ip, port, "timed out reaching the neighbour's data port; ring payloads go over the stream");
            return None;
        }
    };
    let _ = tcp.set_nodelay(true);
    let mut ack = [0u8; 1];
    let acked = tokio::time::timeout(timeout, async {
        tcp.write_all(token).await?;
        tcp.read_exact(&mut ack).await
    })
    .await;
    if matches!(acked, Ok(Ok(_))) && ack[0] == ACK {
        Some(tcp.compat())
    } else {
        debug!(%peer, %ip, port, "the neighbour's data port did not take the token; ring payloads go over the stream");
        None
    }
}

/// Writes `parts` whole and in order, with vectored writes where the sink takes them.
async fn write_all_parts<W: AsyncWrite + Unpin + ?Sized>(sink: &mut W, parts: [&[u8]; 3]) -> std::io::Result<()> {
    let mut slices = parts.map(std::io::IoSlice::new);
    let mut left: &mut [std::io::IoSlice<'_>] = &mut slices;
    while !left.is_empty() {
        let n = sink.write_vectored(left).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        std::io::IoSlice::advance_slices(&mut left, n);
    }
    Ok(())
}

/// Opens a stream to `peer` (reached at `ip`, when known) and writes every step sent on the
/// returned channel, in order, until the sender is dropped: over direct TCP when the
/// neighbour offers it and its port can be reached, otherwise on the stream.
pub fn spawn_writer(
    mut control: Control,
    peer: PeerKey,
    ip: Option<IpAddr>,
    open_timeout: Duration,
    unreachable: Unreachable,
) -> mpsc::UnboundedSender<RingStep> {
    let (tx, mut rx) = mpsc::unbounded_channel::<RingStep>();
    tokio::spawn(async move {
        let Ok(peer_id) = peer.parse::<PeerId>() else {
            warn!(%peer, "ring neighbour has an invalid peer id");
            return;
        };
        // A receiver busy with several new streams at once (a hierarchical round opens up to
        // three a peer) may drop one before offering anything: open it again, within the
        // timeout, while the frames wait in the channel.
        let deadline = tokio::time::Instant::now() + open_timeout;
        let mut tries = 0;
        let (stream, offer) = loop {
            tries += 1;
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let last = tries == OPEN_TRIES || left.is_zero();
            let opened = tokio::time::timeout(left, async {
                let mut stream = control.open_stream(peer_id, protocol()).await.map_err(|e| e.to_string())?;
                let offer = read_offer(&mut stream).await.map_err(|e| e.to_string())?;
                Ok::<_, String>((stream, offer))
            });
            match opened.await {
                Ok(Ok(v)) => break v,
                Ok(Err(e)) if !last => {
                    debug!(%peer, error = %e, tries, "ring stream refused before its offer; opening it again");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Ok(Err(e)) => {
                    warn!(%peer, error = %e, tries, "right neighbour: failed opening a ring stream and reading its offer");
                    return;
                }
                Err(_) => {
                    warn!(%peer, tries, "right neighbour: timed out opening a ring stream and reading its offer");
                    return;
                }
            }
        };
        let skip =
            unreachable.lock().expect("never poisoned").get(&peer).is_some_and(|t| *t > std::time::Instant::now());
        let direct = match (offer, ip) {
            (Some((port, token)), Some(ip)) if !skip => {
                let tcp = connect_direct(ip, port, &token, &peer, open_timeout / 4).await;
                if tcp.is_none() {
                    let until = std::time::Instant::now() + UNREACHABLE_FOR;
                    unreachable.lock().expect("never poisoned").insert(peer.clone(), until);
                }
                tcp
            }
            _ => None,
        };
        let mut sink: Box<dyn AsyncWrite + Unpin + Send> = match direct {
            Some(tcp) => Box::new(tcp),
            None => Box::new(stream),
        };
        // The payload is written from where it lies; only the step's fields and signature are
        // encoded, into two small reused buffers.
        let (mut head, mut tail) = (Vec::new(), Vec::new());
        while let Some(step) = rx.recv().await {
            encode_step_frame_parts(&step, &mut head, &mut tail);
            if let Err(e) = write_all_parts(&mut sink, [&head, &step.payload, &tail]).await {
                warn!(%peer, error = %e, "ring stream write failed");
                return;
            }
            payloads::give(step.payload);
        }
        let _ = sink.close().await;
        debug!(%peer, "ring stream closed");
    });
    tx
}

#[cfg(test)]
mod tests {
    use super::*;
    use p2p_proto::codec::encode_frame;
    use p2p_proto::message::{RunId, StepId};
    use p2p_proto::ring::Phase;

    /// Streams of frames with bytes flipped, cut or inserted at random: the ring reader reads
    /// the same frames as `read_frame` and fails where it fails, frame by frame, and never
    /// panics.
    #[tokio::test]
    async fn damaged_streams_read_in_parts_as_whole() {
        let id = StepId { level: 1, phase: Phase::AllGather, step: 2, chunk: 3, segment: 4 };
        let frames: Vec<u8> = [0usize, 8, 96, 300]
            .into_iter()
            .flat_map(|len| {
                let mut s = RingStep::new(RunId::from_name("dmg"), 7, 1, id, vec![0x33; len]);
                s.signature = vec![5; 64];
                encode_frame(&RingFrame::Step(s))
            })
            .collect();
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            state = state.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
            (state >> 33) as usize
        };
        let (mut a, mut b) = (Vec::new(), Vec::new());
        for _ in 0..3000 {
            let mut bytes = frames.clone();
            for _ in 0..1 + next() % 3 {
                let at = next() % bytes.len();
                match next() % 3 {
                    0 => bytes[at] ^= 1 << (next() % 8),
                    1 => bytes.truncate(at),
                    _ => bytes.insert(at, next() as u8),
                }
                if bytes.is_empty() {
                    break;
                }
            }
            let (mut parts, mut whole) = (futures::io::Cursor::new(&bytes), futures::io::Cursor::new(&bytes));
            loop {
                let p = read_ring_frame(&mut parts, &mut a).await;
                let w = read_frame::<RingFrame, _>(&mut whole, &mut b).await;
                match (p, w) {
                    (Ok(Some(p)), Ok(Some(w))) => assert_eq!(p, w),
                    (Ok(None), Ok(None)) => break,
                    (Err(_), Err(_)) => break,
                    (p, w) => panic!("the readers disagree: {p:?} / {w:?}"),
                }
            }
        }
    }

    /// Frames back to back on one stream read with their payloads in buffers of their own are
    /// the frames `read_frame` reads, each ending where the next begins; damage fails both
    /// readers alike.
    #[tokio::test]
    async fn ring_frames_read_in_parts_are_the_frames_read_whole() {
        let id = StepId { level: 0, phase: Phase::ReduceScatter, step: 1, chunk: 2, segment: 3 };
        let steps: Vec<RingStep> = [0usize, 4, 40, 160, 1 << 20, 12]
            .into_iter()
            .enumerate()
            .map(|(i, len)| {
                let mut s = RingStep::new(RunId::from_name("io"), i as u64, 1, id, vec![i as u8 + 1; len]);
                s.signature = vec![9; 64];
                s
            })
            .collect();
        let bytes: Vec<u8> = steps.iter().flat_map(|s| encode_frame(&RingFrame::Step(s.clone()))).collect();
        let (mut parts, mut whole) = (futures::io::Cursor::new(&bytes), futures::io::Cursor::new(&bytes));
        let (mut a, mut b) = (Vec::new(), Vec::new());
        for s in &steps {
            let RingFrame::Step(got) = read_ring_frame(&mut parts, &mut a).await.unwrap().unwrap();
            assert_eq!(&got, s);
            payloads::give(got.payload);
            let read: RingFrame = read_frame(&mut whole, &mut b).await.unwrap().unwrap();
            assert_eq!(read, RingFrame::Step(s.clone()));
        }
        assert!(read_ring_frame(&mut parts, &mut a).await.unwrap().is_none(), "a clean end of stream");

        // Cut anywhere, or with its payload's length raised, a frame fails both ways.
        let one = encode_frame(&RingFrame::Step(steps[2].clone()));
        for cut in [3, HEADER_BYTES, HEADER_BYTES + 10, HEADER_BYTES + 80, one.len() - 1] {
            let short = &one[..cut];
            let parts = read_ring_frame(&mut futures::io::Cursor::new(short), &mut a).await;
            let whole = read_frame::<RingFrame, _>(&mut futures::io::Cursor::new(short), &mut b).await;
            assert!(parts.is_err() && whole.is_err(), "cut at {cut}: {parts:?} / {whole:?}");
        }
        let at = one.len() - 64 - 1 - 40 - 1; // the payload's one-byte length (its signature: 1 + 64 bytes)
        assert_eq!(one[at], 40);
        for (raised, beyond) in [(41u8, false), (120, true)] {
            let mut long = one.clone();
            long[at] = raised;
            let parts = read_ring_frame(&mut futures::io::Cursor::new(&long), &mut a).await;
            let whole = read_frame::<RingFrame, _>(&mut futures::io::Cursor::new(&long), &mut b).await;
            assert!(parts.is_err() && whole.is_err(), "length {raised}: {parts:?} / {whole:?}");
            if beyond {
                let Err(ReadError::Frame(FrameError::Malformed(why))) = parts else { panic!("{parts:?}") };
                assert!(why.contains("a payload of 120 bytes"), "{why}");
            }
        }
    }
}
