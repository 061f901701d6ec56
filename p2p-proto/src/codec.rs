//! Framing of every message on the wire: gossip payloads and ring streams alike.
//!
//! A frame is `len: u32 LE | version: u8 | body`, where `len` counts the version
//! byte and the body, and the body is the message in postcard encoding. The
//! decoder checks the length against [`MAX_FRAME_BYTES`] before it allocates or
//! reads the body, and never panics on arbitrary input: every failure is a
//! [`FrameError`] that names what was wrong.

use crate::hash::Hash;
use crate::message::{RingStep, RunId, StepId};
use serde::{Serialize, de::DeserializeOwned};

/// Version of the wire format; a peer refuses frames of any other version.
pub const PROTOCOL_VERSION: u8 = 6;

/// Size of the frame header: the length prefix and the version byte.
pub const HEADER_BYTES: usize = 5;

/// Largest frame a peer accepts (header excluded). A ring segment carries at most
/// [`crate::chunk::SEGMENT_ELEMS`] 4-byte integers (1 MiB); the rest is headroom
/// for the step header. Anything larger is refused before a byte is allocated.
pub const MAX_FRAME_BYTES: usize = 2 * 1024 * 1024;

/// Why a frame could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("truncated frame: need {needed} bytes, have {available}")]
    Truncated { needed: usize, available: usize },
    #[error("oversize frame: {len} bytes announced, the limit is {max}")]
    Oversize { len: usize, max: usize },
    #[error("empty frame: the length prefix is 0, so there is no version byte")]
    Empty,
    #[error("wrong protocol version {got}, this peer speaks {expected}: upgrade the older peer")]
    WrongVersion { got: u8, expected: u8 },
    #[error("malformed frame body: {0}")]
    Malformed(String),
    #[error("frame body has {count} trailing bytes after the message")]
    TrailingBytes { count: usize },
}

/// Encodes `msg` as one frame.
pub fn encode_frame<T: Serialize>(msg: &T) -> Vec<u8> {
    let mut out = Vec::new();
    encode_frame_into(msg, &mut out);
    out
}

/// Encodes `msg` as one frame into `out` (cleared first), so a writer can reuse one buffer.
pub fn encode_frame_into<T: Serialize>(msg: &T, out: &mut Vec<u8>) {
    out.clear();
    out.extend_from_slice(&[0, 0, 0, 0, PROTOCOL_VERSION]);
    // The io flavor copies byte strings with one memcpy (the extend flavor goes byte by byte).
    postcard::to_io(msg, &mut *out).expect("serializing to a Vec cannot fail");
    let len = u32::try_from(out.len() - 4).expect("a frame is far below 4 GiB");
    out[..4].copy_from_slice(&len.to_le_bytes());
}

/// A ring step's fields before its payload, serialized as `RingFrame::Step`'s variant: the
/// frame's body starts with them, then the payload's length (a varint), the payload and the
/// signature.
#[derive(Serialize, serde::Deserialize)]
enum FrameHead {
    Step { run: RunId, round: u64, attempt: u32, id: StepId, hash: Hash },
}

/// The frame of a ring step (`RingFrame::Step`) in three parts, so a writer can send the
/// payload from where it lies instead of copying it into a frame buffer: `head` (the frame
/// header, the step's fields and the payload's length) and `tail` (its signature) are written
/// here, and `head`, the payload and `tail` in that order are exactly
/// `encode_frame(&RingFrame::Step(step))`.
pub fn encode_step_frame_parts(step: &RingStep, head: &mut Vec<u8>, tail: &mut Vec<u8>) {
    let fields =
        FrameHead::Step { run: step.run, round: step.round, attempt: step.attempt, id: step.id, hash: step.hash };
    head.clear();
    head.extend_from_slice(&[0, 0, 0, 0, PROTOCOL_VERSION]);
    postcard::to_io(&fields, &mut *head).expect("serializing to a Vec cannot fail");
    // A byte string is its length (a varint, as a `usize`) and its bytes.
    postcard::to_io(&step.payload.len(), &mut *head).expect("serializing to a Vec cannot fail");
    tail.clear();
    postcard::to_io(serde_bytes::Bytes::new(&step.signature), &mut *tail).expect("serializing to a Vec cannot fail");
    let len = u32::try_from(head.len() - 4 + step.payload.len() + tail.len()).expect("a frame is far below 4 GiB");
    head[..4].copy_from_slice(&len.to_le_bytes());
}

/// The longest start of a ring step's body before its payload (every field at its widest
/// varint, enum indices at the 5 bytes the decoder takes for a `u32`): a reader that has this
/// much of a body, or all of a shorter one, can decode the head with [`decode_step_head`].
pub const STEP_HEAD_MAX: usize = 5 + 32 + 10 + 5 + (1 + 5 + 3 + 5 + 5) + 32 + 10;

/// A ring step frame's fields before its payload, decoded from the start of its body, so a
/// reader can read the payload straight into a buffer of its own instead of copying it out
/// of the frame.
#[derive(Debug, Clone, PartialEq)]
pub struct StepHead {
    run: RunId,
    round: u64,
    attempt: u32,
    id: StepId,
    hash: Hash,
    /// The payload's length in bytes.
    pub payload_len: usize,
}

/// Decodes the head of a ring step frame's body `body_len` bytes long from `start`, its first
/// `min(body_len, STEP_HEAD_MAX)` bytes; returns it and how many of those bytes it took. Fails
/// as [`decode_body`] would for a body that is not a ring step or whose payload does not fit.
pub fn decode_step_head(start: &[u8], body_len: usize) -> Result<(StepHead, usize), FrameError> {
    let malformed = |e: postcard::Error| FrameError::Malformed(e.to_string());
    let (FrameHead::Step { run, round, attempt, id, hash }, rest) =
        postcard::take_from_bytes::<FrameHead>(start).map_err(malformed)?;
    let (payload_len, rest) = postcard::take_from_bytes::<usize>(rest).map_err(malformed)?;
    let used = start.len() - rest.len();
    if body_len.checked_sub(used).is_none_or(|left| payload_len > left) {
        return Err(FrameError::Malformed(format!(
            "a payload of {payload_len} bytes in a frame body of {body_len} bytes, {used} of them before the payload"
        )));
    }
    Ok((StepHead { run, round, attempt, id, hash, payload_len }, used))
}

impl StepHead {
    /// The step, given its payload and the rest of its body (`tail`: the signature, exactly).
    pub fn into_step(self, payload: Vec<u8>, tail: &[u8]) -> Result<RingStep, FrameError> {
        if payload.len() != self.payload_len {
            let (got, want) = (payload.len(), self.payload_len);
            return Err(FrameError::Malformed(format!("a payload of {got} bytes where the head announced {want}")));
        }
        let signature: serde_bytes::ByteBuf = decode_body(tail)?;
        let StepHead { run, round, attempt, id, hash, .. } = self;
        Ok(RingStep { run, round, attempt, id, hash, payload, signature: signature.into_vec() })
    }
}

/// Reads the header at the start of `buf` and returns the body length that
/// follows it. Used by stream readers to size the body read after checking it.
pub fn decode_header(buf: &[u8]) -> Result<usize, FrameError> {
    if buf.len() < 4 {
        return Err(FrameError::Truncated { needed: 4, available: buf.len() });
    }
    let len = u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    if len == 0 {
        return Err(FrameError::Empty);
    }
    if len > MAX_FRAME_BYTES {
        return Err(FrameError::Oversize { len, max: MAX_FRAME_BYTES });
    }
    if buf.len() < HEADER_BYTES {
        return Err(FrameError::Truncated { needed: HEADER_BYTES, available: buf.len() });
    }
    if buf[4] != PROTOCOL_VERSION {
        return Err(FrameError::WrongVersion { got: buf[4], expected: PROTOCOL_VERSION });
    }
    Ok(len - 1)
}

/// Decodes a frame body (what follows the header) as exactly one message.
pub fn decode_body<T: DeserializeOwned>(body: &[u8]) -> Result<T, FrameError> {
    let (msg, rest) = postcard::take_from_bytes(body).map_err(|e| FrameError::Malformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(FrameError::TrailingBytes { count: rest.len() });
    }
    Ok(msg)
}

/// Decodes one frame from the start of `buf`; returns the message and the number
/// of bytes it used.
pub fn decode_frame<T: DeserializeOwned>(buf: &[u8]) -> Result<(T, usize), FrameError> {
    let body_len = decode_header(buf)?;
    let total = HEADER_BYTES + body_len;
    if buf.len() < total {
        return Err(FrameError::Truncated { needed: total, available: buf.len() });
    }
    Ok((decode_body(&buf[HEADER_BYTES..total])?, total))
}

/// Decodes a buffer that must hold exactly one frame (a gossip payload).
pub fn decode_exact<T: DeserializeOwned>(buf: &[u8]) -> Result<T, FrameError> {
    let (msg, used) = decode_frame(buf)?;
    if used != buf.len() {
        return Err(FrameError::TrailingBytes { count: buf.len() - used });
    }
    Ok(msg)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::{Gossip, Heartbeat, PeerStatus, RingFrame, RingStep, RunId, StepId};
    use crate::ring::Phase;
    use proptest::prelude::*;

    /// A step frame written in parts is byte for byte the frame `encode_frame` makes, at every
    /// payload length where the length's varint changes size.
    #[test]
    fn a_step_frame_in_parts_is_the_encoded_frame() {
        for len in [0usize, 4, 124, 128, 16_380, 16_384, 2_097_148, 1 << 20] {
            for (round, attempt, sig) in
                [(0u64, 0u32, vec![]), (u64::MAX, u32::MAX, vec![7u8; 64]), (300, 5, vec![1; 200])]
            {
                let id = StepId { level: 2, phase: Phase::AllGather, step: 300, chunk: 70_000, segment: 129 };
                let mut step = RingStep::new(RunId::from_name("parts"), round, attempt, id, vec![0xab; len]);
                step.signature = sig;
                let (mut head, mut tail) = (Vec::new(), Vec::new());
                encode_step_frame_parts(&step, &mut head, &mut tail);
                let whole = [&head[..], &step.payload[..], &tail[..]].concat();
                assert_eq!(whole, encode_frame(&RingFrame::Step(step)), "payload of {len} bytes");
            }
        }
    }

    /// Decodes a ring step's body as a reader does that reads the payload into a buffer of its
    /// own: the head from its first bytes, then the payload, then the signature.
    fn decode_in_parts(body: &[u8]) -> Result<RingStep, FrameError> {
        let (head, used) = decode_step_head(&body[..body.len().min(STEP_HEAD_MAX)], body.len())?;
        let end = used + head.payload_len;
        let payload = body[used..end].to_vec();
        head.into_step(payload, &body[end..])
    }

    /// Read in parts, a step frame decodes to the step `decode_body` makes of it, at the widest
    /// varints too.
    #[test]
    fn a_step_decoded_in_parts_is_the_decoded_frame() {
        for len in [0usize, 4, 124, 128, 16_384, 1 << 20] {
            for (round, attempt, sig) in
                [(0u64, 0u32, vec![]), (u64::MAX, u32::MAX, vec![7u8; 64]), (300, 5, vec![1; 200])]
            {
                let id = StepId { level: 255, phase: Phase::AllGather, step: u16::MAX, chunk: u32::MAX, segment: 129 };
                let mut step = RingStep::new(RunId::from_name("parts"), round, attempt, id, vec![0xcd; len]);
                step.signature = sig;
                let frame = encode_frame(&RingFrame::Step(step.clone()));
                let body = &frame[HEADER_BYTES..];
                assert_eq!(decode_in_parts(body), Ok(step), "payload of {len} bytes");
            }
        }
        let widest = StepId { level: 255, phase: Phase::AllGather, step: u16::MAX, chunk: u32::MAX, segment: u32::MAX };
        let step = RingStep::new(RunId::from_name("w"), u64::MAX, u32::MAX, widest, vec![1; 1 << 20]);
        let frame = encode_frame(&RingFrame::Step(step));
        let (_, used) = decode_step_head(&frame[HEADER_BYTES..][..STEP_HEAD_MAX], frame.len() - HEADER_BYTES).unwrap();
        // With its enum indices overlong (5 bytes each, which the decoder takes), the head of a
        // step at every field's widest is still within STEP_HEAD_MAX and decodes as the whole.
        let body = &frame[HEADER_BYTES..];
        let phase_at = 1 + 32 + 10 + 5 + 1;
        let overlong = [0x80, 0x80, 0x80, 0x80, 0x00];
        let five = |index: u8| [0x80 | index, 0x80, 0x80, 0x80, 0x00];
        assert_eq!(body[phase_at], 1, "AllGather");
        let long: Vec<u8> = [&overlong[..], &body[1..phase_at], &five(1)[..], &body[phase_at + 1..]].concat();
        let whole = decode_body::<RingFrame>(&long).map(|RingFrame::Step(s)| s);
        assert!(whole.is_ok(), "{whole:?}");
        assert_eq!(decode_in_parts(&long), whole);
        // Every field at its widest but the enum indices (1 byte each as encoded, where the
        // decoder takes up to 5) and the payload's length (2^20 is a 3-byte varint).
        assert_eq!(used, STEP_HEAD_MAX - 2 * 4 - 10 + 3);
    }

    fn sample_frames() -> Vec<Vec<u8>> {
        let run = RunId::from_name("fuzz");
        let hb = Gossip::Heartbeat(Heartbeat {
            run,
            peer: "12D3KooWpeer".into(),
            seq: 7,
            status: PeerStatus::Forming { round: 3, attempt: 1, view: [9; 32] },
            batch: 64,
            state: crate::message::StateTag { round: 3, param_hash: [4; 32] },
            excluded: vec!["12D3KooWother".into()],
        });
        let step = RingFrame::Step(RingStep::new(
            run,
            4,
            0,
            StepId { level: 0, phase: Phase::ReduceScatter, step: 1, chunk: 2, segment: 0 },
            vec![1, 2, 3, 4, 5, 6, 7, 8],
        ));
        vec![encode_frame(&hb), encode_frame(&step)]
    }

    #[test]
    fn round_trips() {
        let frames = sample_frames();
        let (g, used): (Gossip, usize) = decode_frame(&frames[0]).unwrap();
        assert_eq!(used, frames[0].len());
        assert!(matches!(g, Gossip::Heartbeat(ref h) if h.seq == 7));
        let f: RingFrame = decode_exact(&frames[1]).unwrap();
        let RingFrame::Step(s) = f;
        assert!(s.verify().is_ok());
    }

    #[test]
    fn typed_errors() {
        let good = &sample_frames()[0];
        // Oversize: checked from the length prefix alone, before any body exists.
        let mut big = (MAX_FRAME_BYTES as u32 + 1).to_le_bytes().to_vec();
        big.push(PROTOCOL_VERSION);
        assert_eq!(
            decode_frame::<Gossip>(&big).unwrap_err(),
            FrameError::Oversize { len: MAX_FRAME_BYTES + 1, max: MAX_FRAME_BYTES }
        );
        assert!(matches!(decode_frame::<Gossip>(&u32::MAX.to_le_bytes()).unwrap_err(), FrameError::Oversize { .. }));
        // Truncated: every strict prefix of a good frame.
        for cut in 0..good.len() {
            assert!(
                matches!(
                    decode_frame::<Gossip>(&good[..cut]).unwrap_err(),
                    FrameError::Truncated { .. } | FrameError::Empty
                ),
                "prefix of {cut} bytes"
            );
        }
        // Wrong version.
        let mut v2 = good.clone();
        v2[4] = PROTOCOL_VERSION + 1;
        assert_eq!(
            decode_frame::<Gossip>(&v2).unwrap_err(),
            FrameError::WrongVersion { got: PROTOCOL_VERSION + 1, expected: PROTOCOL_VERSION }
        );
        // Empty, garbage body, trailing bytes.
        assert_eq!(decode_frame::<Gossip>(&[0, 0, 0, 0, 1]).unwrap_err(), FrameError::Empty);
        let garbage = [3u8, 0, 0, 0, PROTOCOL_VERSION, 0xff, 0xff];
        assert!(matches!(decode_frame::<Gossip>(&garbage).unwrap_err(), FrameError::Malformed(_)));
        let mut trailing = good.clone();
        trailing.push(0);
        assert!(matches!(decode_exact::<Gossip>(&trailing).unwrap_err(), FrameError::TrailingBytes { count: 1 }));
    }

    /// xorshift64*: a tiny seeded generator, so the million inputs are the same on every run.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
    }

    /// One million inputs: half pure noise, half valid frames with random damage
    /// (bit flips, cuts, rewritten length prefixes), which reach deep into the
    /// body decoder. None may panic; every kind of error must show up.
    #[test]
    fn a_million_random_inputs_never_panic() {
        let seeds = sample_frames();
        let mut rng = Rng(0x005e_ed0f_d7a1_u64);
        let mut ok = 0usize;
        let mut seen = std::collections::HashSet::new();
        let mut buf = Vec::with_capacity(4096);
        for i in 0..1_000_000u32 {
            buf.clear();
            if i % 2 == 0 {
                let len = (rng.next() % 300) as usize;
                buf.extend((0..len).map(|_| rng.next() as u8));
                if rng.next().is_multiple_of(4) && buf.len() >= 5 {
                    // Plausible header over random bytes.
                    let body = (buf.len() - 4) as u32;
                    buf[..4].copy_from_slice(&body.to_le_bytes());
                    buf[4] = PROTOCOL_VERSION;
                }
            } else {
                buf.extend_from_slice(&seeds[(rng.next() % seeds.len() as u64) as usize]);
                for _ in 0..=(rng.next() % 4) {
                    if buf.is_empty() {
                        buf.push(rng.next() as u8);
                    }
                    match rng.next() % 4 {
                        0 => {
                            let at = (rng.next() as usize) % buf.len();
                            buf[at] ^= 1 << (rng.next() % 8);
                        }
                        1 => buf.truncate((rng.next() as usize) % (buf.len() + 1)),
                        2 if buf.len() >= 4 => {
                            let len = rng.next() as u32 >> (rng.next() % 32);
                            buf[..4].copy_from_slice(&len.to_le_bytes());
                        }
                        _ => buf.push(rng.next() as u8),
                    }
                }
            }
            let results = [decode_frame::<Gossip>(&buf).map(|_| ()), decode_frame::<RingFrame>(&buf).map(|_| ())];
            for r in results {
                match r {
                    Ok(()) => ok += 1,
                    Err(e) => {
                        seen.insert(std::mem::discriminant(&e));
                    }
                }
            }
        }
        assert!(ok > 0, "some damaged frames still decode (flips inside payloads)");
        assert_eq!(seen.len(), 6, "every error kind was reached");
    }

    proptest! {
        /// A damaged step body (bytes flipped, cut or added) decodes in parts to what
        /// `decode_body` makes of it: the same step, or an error both ways.
        #[test]
        fn a_damaged_step_decodes_in_parts_as_whole(
            payload_len in 0usize..300,
            flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 0..4),
            cut in proptest::option::of(any::<usize>()),
            extra in proptest::collection::vec(any::<u8>(), 0..3),
        ) {
            let id = StepId { level: 1, phase: Phase::ReduceScatter, step: 2, chunk: 3, segment: 4 };
            let mut step = RingStep::new(RunId::from_name("d"), 9, 1, id, vec![0x5a; payload_len]);
            step.signature = vec![3; 64];
            let mut body = encode_frame(&RingFrame::Step(step))[HEADER_BYTES..].to_vec();
            for (at, x) in flips {
                let n = body.len();
                body[at % n] ^= x;
            }
            if let Some(c) = cut {
                body.truncate(c % (body.len() + 1));
            }
            body.extend(extra);
            let whole = decode_body::<RingFrame>(&body).map(|RingFrame::Step(s)| s);
            let parts = decode_in_parts(&body);
            prop_assert_eq!(whole.is_ok(), parts.is_ok(), "{:?} against {:?}", whole, parts);
            if let (Ok(w), Ok(p)) = (whole, parts) {
                prop_assert_eq!(w, p);
            }
        }

        #[test]
        fn step_round_trip(payload in proptest::collection::vec(any::<u8>(), 0..2048), round in any::<u64>(), seg in any::<u32>()) {
            let frame = RingFrame::Step(RingStep::new(RunId::from_name("p"), round, 2, StepId { level: 0, phase: Phase::AllGather, step: 3, chunk: 1, segment: seg }, payload.clone()));
            let bytes = encode_frame(&frame);
            let back: RingFrame = decode_exact(&bytes).unwrap();
            prop_assert_eq!(back, frame);
        }
    }
}
