//! Ring all-reduce as a pure state machine: reduce-scatter, then all-gather.
//!
//! A ring of `n` members, each at a position `p`, sends only to its right
//! neighbour `p + 1` and receives only from its left neighbour `p - 1`. In
//! reduce-scatter step `s` a member sends chunk `p - s` and receives chunk
//! `p - s - 1`, which it adds to its own; after `n - 1` steps it holds chunk
//! `p + 1` fully reduced. In all-gather step `s` it sends chunk `p + 1 - s` and
//! receives chunk `p - s`, which it stores. That is `2(n - 1)` steps, each
//! moving `1/n` of the vector.
//!
//! The machine works segment by segment: as soon as a segment of one step is
//! added, the same segment of the next step goes out, so a step is pipelined
//! across the whole ring. Every received segment was checked against its hash
//! ([`crate::message::RingStep::verify`]); the segments of reduce-scatter step 0
//! are the left neighbour's own values and must also match its commit.

use crate::chunk::{segment_count, segment_range};
use crate::fixed::add_assign_le_bytes;
use crate::hash::{Hash, chunk_hash, extend_le_bytes, le_bytes, read_le_bytes};
use crate::message::{PartialSum, RingStep, RunId, StepId, VerifiedStep};
use serde::{Deserialize, Serialize};
use std::ops::Range;

/// The two halves of the all-reduce.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Phase {
    ReduceScatter,
    AllGather,
}

/// Chunk that position `pos` sends in `step` of `phase`, in a ring of `n`.
pub fn send_chunk(phase: Phase, step: usize, pos: usize, n: usize) -> usize {
    match phase {
        Phase::ReduceScatter => (pos + n - step % n) % n,
        Phase::AllGather => (pos + 1 + n - step % n) % n,
    }
}

/// Chunk that position `pos` receives in `step` of `phase`, in a ring of `n`.
pub fn recv_chunk(phase: Phase, step: usize, pos: usize, n: usize) -> usize {
    send_chunk(phase, step, (pos + n - 1) % n, n)
}

/// Why a ring step could not be applied. Each one fails the round.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RingError {
    #[error("step for round {round} attempt {attempt} of another run or round")]
    WrongRound { round: u64, attempt: u32 },
    #[error("unexpected step {id:?}: {reason}")]
    Unexpected { id: StepId, reason: &'static str },
    #[error("duplicate step {id:?}")]
    Duplicate { id: StepId },
    #[error("step {id:?} carries {got} bytes, expected {expected}")]
    WrongLength { id: StepId, expected: usize, got: usize },
    #[error("left neighbour's chunk {chunk} does not match its commit: it sent other values than it committed to")]
    CommitMismatch { chunk: usize },
    #[error(
        "the payload of the member at position {chunk}, as forwarded, does not match its commit: the sender altered it"
    )]
    GatheredMismatch { chunk: usize },
    #[error("a ring of {n} cannot have a member at position {pos}")]
    BadPosition { n: usize, pos: usize },
    #[error(
        "step {id:?} holds {value}, outside the fixed-point range of its {contributions} contribution(s) (±{limit}): \
         the sender added something no member could have committed"
    )]
    OutOfRange { id: StepId, value: i32, contributions: usize, limit: i64 },
}

/// Refuses a segment holding a value beyond what `contributions` members' values can sum to,
/// at most `max_units` each (0: not checked).
pub fn check_range(id: &StepId, payload: &[u8], max_units: i32, contributions: usize) -> Result<(), RingError> {
    if max_units <= 0 {
        return Ok(());
    }
    let limit = i64::from(max_units) * contributions as i64;
    // One branch-free pass for the largest magnitude; the offending value only on failure.
    let values = || payload.chunks_exact(4).map(|b| i32::from_le_bytes([b[0], b[1], b[2], b[3]]));
    let largest = values().fold(0u32, |m, v| m.max(v.unsigned_abs()));
    if i64::from(largest) > limit {
        let value = values().find(|v| i64::from(*v).abs() > limit).expect("the largest is beyond");
        return Err(RingError::OutOfRange { id: *id, value, contributions, limit });
    }
    Ok(())
}

/// Where a member stands in a ring and what it all-reduces.
#[derive(Debug, Clone)]
pub struct RingParams {
    pub run: RunId,
    pub round: u64,
    pub attempt: u32,
    pub n: usize,
    pub pos: usize,
    pub segment_elems: usize,
    /// Largest magnitude of one member's encoded value ([`crate::FixedPoint::max_units`]): a
    /// partial sum of k contributions beyond k times it is refused (0: not checked).
    pub max_units: i32,
}

/// A gathering ring's checks: each member's committed payload hash, and the segment hashes
/// received so far, by step.
#[derive(Debug)]
struct Gathering {
    hashes: Vec<Hash>,
    seen: Vec<Vec<Option<Hash>>>,
    /// Payloads held whole and checked, not yet taken by [`RingAllReduce::take_gathered`].
    ready: Vec<usize>,
}

/// One member's all-reduce.
#[derive(Debug)]
pub struct RingAllReduce {
    p: RingParams,
    data: Vec<i32>,
    chunks: Vec<Range<usize>>,
    own_segment_hashes: Vec<Hash>,
    /// The left neighbour's committed hash of its own chunk (None: its step-0 segments are
    /// partial sums no commit covers, as in a hierarchical round's ring across groups).
    left_commit: Option<Hash>,
    /// Which ring of the round this is ([`StepId::level`]).
    level: u8,
    /// A hierarchical round's group ring: the reduced chunk waits for the ring across groups
    /// before the all-gather ([`Self::resume_gather`]); the number of contributions the
    /// gathered values sum.
    hold: Option<usize>,
    resumed: bool,
    /// Received flags, by phase, step and segment.
    received: [Vec<Vec<bool>>; 2],
    remaining: usize,
    step0_hashes: Vec<Option<Hash>>,
    /// Gather mode ([`Self::gather`]).
    gather: Option<Gathering>,
    /// Hashes of outgoing reduce-scatter segments, by step (the last entry is the
    /// fully reduced chunk sent in all-gather step 0).
    sent_sums: Vec<Vec<Option<Hash>>>,
    /// Hashes of the result's segments, by chunk, as they became known: the reduced chunk's
    /// when it was sent, every other chunk's as its all-gather segments arrived and were
    /// checked ([`Self::result_hash`]).
    final_hashes: Vec<Vec<Option<Hash>>>,
    started: bool,
    bytes_sent: u64,
    bytes_received: u64,
}

impl RingAllReduce {
    /// `own_segment_hashes` are the hashes of this member's segments of its own
    /// chunk `pos` (from its commit); `left_commit` is the left neighbour's
    /// committed hash of chunk `pos - 1`.
    pub fn new(
        p: RingParams,
        data: Vec<i32>,
        own_segment_hashes: Vec<Hash>,
        left_commit: Hash,
    ) -> Result<Self, RingError> {
        Self::build(p, data, own_segment_hashes, Some(left_commit), None)
    }

    /// A ring over partial sums no commit covers (a hierarchical round's ring across groups, at
    /// `level`): this member's own segment hashes are computed here, and step-0 segments are
    /// checked for range only.
    pub fn over_sums(p: RingParams, data: Vec<i32>, level: u8) -> Result<Self, RingError> {
        if p.n == 0 || p.pos >= p.n {
            return Err(RingError::BadPosition { n: p.n, pos: p.pos });
        }
        let own = crate::chunk::chunk_ranges(data.len(), p.n)[p.pos].clone();
        let own = crate::hash::segment_hashes(&data, &[own], p.segment_elems).remove(0);
        let mut ring = Self::build(p, data, own, None, None)?;
        ring.level = level;
        Ok(ring)
    }

    /// Holds the reduced chunk after the reduce-scatter until [`Self::resume_gather`] (a
    /// hierarchical round's group ring); the gathered values then sum `total` contributions.
    pub fn hold_gather(mut self, total: usize) -> Self {
        self.hold = Some(total);
        self
    }

    /// A ring that gathers every member's payload instead of reducing: `data` holds `n` equal
    /// chunks, this member's own payload at chunk `pos` (the rest is overwritten), and
    /// `payload_hashes` each member's committed chunk hash of its payload. In step `s` a member
    /// forwards the payload it received in step `s - 1` (its own in step 0), unchanged and with
    /// its hash, so after `n - 1` steps every member holds every payload, each checked against
    /// its originator's commit. Used for compressed contributions ([`crate::compress`]), which
    /// cannot be added as they travel; `max_units` is not checked (payloads are not values).
    pub fn gather(
        p: RingParams,
        data: Vec<i32>,
        own_segment_hashes: Vec<Hash>,
        payload_hashes: Vec<Hash>,
    ) -> Result<Self, RingError> {
        if payload_hashes.len() != p.n || !data.len().is_multiple_of(p.n.max(1)) {
            return Err(RingError::BadPosition { n: p.n, pos: p.pos });
        }
        let left = payload_hashes[(p.pos + p.n - 1) % p.n];
        Self::build(p, data, own_segment_hashes, Some(left), Some(payload_hashes))
    }

    fn build(
        p: RingParams,
        data: Vec<i32>,
        own_segment_hashes: Vec<Hash>,
        left_commit: Option<Hash>,
        gather: Option<Vec<Hash>>,
    ) -> Result<Self, RingError> {
        if p.n == 0 || p.pos >= p.n {
            return Err(RingError::BadPosition { n: p.n, pos: p.pos });
        }
        let chunks = crate::chunk::chunk_ranges(data.len(), p.n);
        let steps = p.n - 1;
        let mut remaining = 0;
        let received = [Phase::ReduceScatter, Phase::AllGather].map(|phase| {
            let steps = if gather.is_some() && phase == Phase::AllGather { 0 } else { steps };
            (0..steps)
                .map(|s| {
                    let c = &chunks[recv_chunk(phase, s, p.pos, p.n)];
                    let k = segment_count(c.len(), p.segment_elems);
                    remaining += k;
                    vec![false; k]
                })
                .collect::<Vec<_>>()
        });
        let left_chunk = &chunks[recv_chunk(Phase::ReduceScatter, 0, p.pos, p.n)];
        let step0 = vec![None; segment_count(left_chunk.len(), p.segment_elems)];
        let mine = segment_count(chunks[p.pos].len(), p.segment_elems);
        let sent_sums = (0..p.n)
            .map(|s| {
                let c = if s < steps { send_chunk(Phase::ReduceScatter, s, p.pos, p.n) } else { (p.pos + 1) % p.n };
                vec![None; segment_count(chunks[c].len(), p.segment_elems)]
            })
            .collect();
        assert_eq!(own_segment_hashes.len(), mine, "one hash per segment of the own chunk");
        let final_hashes = chunks.iter().map(|c| vec![None; segment_count(c.len(), p.segment_elems)]).collect();
        let gather = gather.map(|hashes| {
            let seen = (0..steps)
                .map(|s| {
                    let c = &chunks[recv_chunk(Phase::ReduceScatter, s, p.pos, p.n)];
                    vec![None; segment_count(c.len(), p.segment_elems)]
                })
                .collect();
            Gathering { hashes, seen, ready: vec![p.pos] }
        });
        Ok(Self {
            p,
            data,
            chunks,
            own_segment_hashes,
            left_commit,
            level: 0,
            hold: None,
            resumed: false,
            received,
            remaining,
            step0_hashes: step0,
            gather,
            sent_sums,
            final_hashes,
            started: false,
            bytes_sent: 0,
            bytes_received: 0,
        })
    }

    fn seg(&self, chunk: usize, segment: usize) -> Range<usize> {
        segment_range(&self.chunks[chunk], self.p.segment_elems, segment)
    }

    fn step_msg(
        &mut self,
        phase: Phase,
        step: usize,
        segment: usize,
        hash: Option<Hash>,
        payload: Vec<u8>,
    ) -> RingStep {
        let chunk = send_chunk(phase, step, self.p.pos, self.p.n);
        let id = StepId { level: self.level, phase, step: step as u16, chunk: chunk as u32, segment: segment as u32 };
        self.bytes_sent += payload.len() as u64;
        match hash {
            Some(hash) => RingStep {
                run: self.p.run,
                round: self.p.round,
                attempt: self.p.attempt,
                id,
                hash,
                payload,
                signature: Vec::new(),
            },
            None => RingStep::new(self.p.run, self.p.round, self.p.attempt, id, payload),
        }
    }

    /// The first sends: this member's own chunk, segment by segment. Empty for a
    /// ring of one, which is done at once.
    pub fn start(&mut self) -> Vec<RingStep> {
        if self.started || self.p.n == 1 {
            self.started = true;
            return Vec::new();
        }
        self.started = true;
        let pos = self.p.pos;
        (0..self.own_segment_hashes.len())
            .map(|s| {
                let hash = self.own_segment_hashes[s];
                self.sent_sums[0][s] = Some(hash);
                let payload = le_bytes(&self.data[self.seg(pos, s)]);
                self.step_msg(Phase::ReduceScatter, 0, s, Some(hash), payload)
            })
            .collect()
    }

    /// Applies one verified segment from the left neighbour and returns what to
    /// send on to the right neighbour.
    pub fn on_step(&mut self, step: VerifiedStep) -> Result<Option<RingStep>, RingError> {
        let msg = step.into_inner();
        let (n, pos) = (self.p.n, self.p.pos);
        if msg.run != self.p.run || msg.round != self.p.round || msg.attempt != self.p.attempt {
            return Err(RingError::WrongRound { round: msg.round, attempt: msg.attempt });
        }
        let id = msg.id;
        let (s, segment) = (id.step as usize, id.segment as usize);
        if id.level != self.level {
            return Err(RingError::Unexpected { id, reason: "segment of another ring of the round" });
        }
        if s + 1 >= n {
            return Err(RingError::Unexpected { id, reason: "step beyond the ring's length" });
        }
        let chunk = recv_chunk(id.phase, s, pos, n);
        if id.chunk as usize != chunk {
            return Err(RingError::Unexpected { id, reason: "chunk is not the one this step carries" });
        }
        // A gathering ring has no all-gather steps.
        let Some(flags) = self.received[id.phase as usize].get(s) else {
            return Err(RingError::Unexpected { id, reason: "no such step in this ring" });
        };
        if segment >= flags.len() {
            return Err(RingError::Unexpected { id, reason: "segment index past the chunk's end" });
        }
        if flags[segment] {
            return Err(RingError::Duplicate { id });
        }
        let range = self.seg(chunk, segment);
        if msg.payload.len() != range.len() * 4 {
            return Err(RingError::WrongLength { id, expected: range.len() * 4, got: msg.payload.len() });
        }
        // Reduce-scatter step s carries the sum of s + 1 members' values; all-gather the whole sum.
        let contributions = if id.phase == Phase::ReduceScatter { s + 1 } else { self.hold.unwrap_or(n) };
        check_range(&id, &msg.payload, self.p.max_units, contributions)?;
        self.received[id.phase as usize][s][segment] = true;
        self.remaining -= 1;
        self.bytes_received += msg.payload.len() as u64;

        if let Some(Gathering { hashes, seen, ready }) = self.gather.as_mut() {
            seen[s][segment] = Some(msg.hash);
            let whole = seen[s].iter().all(Option::is_some);
            if whole && chunk_hash(seen[s].iter().flatten()) != hashes[chunk] {
                return Err(if s == 0 {
                    RingError::CommitMismatch { chunk }
                } else {
                    RingError::GatheredMismatch { chunk }
                });
            }
            if whole {
                ready.push(chunk);
            }
            read_le_bytes(&msg.payload, &mut self.data[range]);
            return Ok(
                (s + 2 < n).then(|| self.step_msg(Phase::ReduceScatter, s + 1, segment, Some(msg.hash), msg.payload))
            );
        }
        match id.phase {
            Phase::ReduceScatter => {
                if s == 0 {
                    self.step0_hashes[segment] = Some(msg.hash);
                    if self.step0_hashes.iter().all(Option::is_some) {
                        let h = chunk_hash(self.step0_hashes.iter().flatten());
                        if self.left_commit.is_some_and(|c| c != h) {
                            return Err(RingError::CommitMismatch { chunk });
                        }
                    }
                }
                add_assign_le_bytes(&mut self.data[range.clone()], &msg.payload);
                let mut payload = msg.payload;
                payload.clear();
                extend_le_bytes(&self.data[range], &mut payload);
                let out = if s + 2 < n {
                    self.step_msg(Phase::ReduceScatter, s + 1, segment, None, payload)
                } else if self.hold.is_some() {
                    // The reduced segment waits for the ring across groups.
                    return Ok(None);
                } else {
                    let out = self.step_msg(Phase::AllGather, 0, segment, None, payload);
                    self.final_hashes[chunk][segment] = Some(out.hash);
                    out
                };
                self.sent_sums[s + 1][segment] = Some(out.hash);
                Ok(Some(out))
            }
            Phase::AllGather => {
                self.final_hashes[chunk][segment] = Some(msg.hash);
                read_le_bytes(&msg.payload, &mut self.data[range]);
                if s + 2 < n {
                    Ok(Some(self.step_msg(Phase::AllGather, s + 1, segment, Some(msg.hash), msg.payload)))
                } else {
                    Ok(None)
                }
            }
        }
    }

    /// Gather mode: the positions of the members whose payloads arrived whole and matched their
    /// commits since the last call (this member's own first), so they can be decoded while
    /// the rest travel.
    pub fn take_gathered(&mut self) -> Vec<usize> {
        self.gather.as_mut().map(|g| std::mem::take(&mut g.ready)).unwrap_or_default()
    }

    /// The values of chunk `i` (in gather mode, member `i`'s payload).
    pub fn chunk(&self, i: usize) -> &[i32] {
        &self.data[self.chunks[i].clone()]
    }

    /// Whether every segment of both phases has arrived.
    pub fn is_done(&self) -> bool {
        self.started && self.remaining == 0 && (self.hold.is_none() || self.resumed)
    }

    /// Whether the reduce-scatter is over: this member holds its chunk `pos + 1` reduced.
    pub fn is_reduced(&self) -> bool {
        self.started && self.received[Phase::ReduceScatter as usize].iter().flatten().all(|r| *r)
    }

    /// Whether a held ring's all-gather has resumed.
    pub fn is_resumed(&self) -> bool {
        self.resumed
    }

    /// The chunk this member reduced (meaningful once [`Self::is_reduced`]).
    pub fn reduced_chunk(&self) -> &[i32] {
        self.chunk((self.p.pos + 1) % self.p.n)
    }

    /// A held ring ([`Self::hold_gather`]): replaces the reduced chunk with `values` (its sum
    /// across groups) and starts the all-gather with it. Empty for a ring of one.
    pub fn resume_gather(&mut self, values: &[i32]) -> Vec<RingStep> {
        let (n, pos) = (self.p.n, self.p.pos);
        let c = (pos + 1) % n;
        assert!(self.is_reduced() && !self.resumed, "the gather resumes once, after the reduce-scatter");
        assert_eq!(values.len(), self.chunks[c].len(), "values for the reduced chunk");
        self.resumed = true;
        let range = self.chunks[c].clone();
        self.data[range].copy_from_slice(values);
        if n == 1 {
            return Vec::new();
        }
        (0..self.sent_sums[n - 1].len())
            .map(|segment| {
                let payload = le_bytes(&self.data[self.seg(c, segment)]);
                let out = self.step_msg(Phase::AllGather, 0, segment, None, payload);
                self.sent_sums[n - 1][segment] = Some(out.hash);
                self.final_hashes[c][segment] = Some(out.hash);
                out
            })
            .collect()
    }

    /// [`crate::hash::sum_hash`] of the result, from the segment hashes this member checked or
    /// made as the all-gather went (no pass over the vector); None before [`Self::is_done`],
    /// in a ring of one, and in gather mode, where the result is made by the caller.
    pub fn result_hash(&self) -> Option<Hash> {
        if !self.is_done() || self.p.n == 1 || self.gather.is_some() {
            return None;
        }
        let all: Option<Vec<&Hash>> = self.final_hashes.iter().flatten().map(Option::as_ref).collect();
        all.map(crate::hash::sum_hash_of)
    }

    /// The values as they stand (the result once [`Self::is_done`]).
    pub fn values(&self) -> &[i32] {
        &self.data
    }

    /// Hashes of the partial sums this member sent: reduce-scatter steps
    /// `0..n-1`, and as step `n-1` the fully reduced chunk it broadcast.
    pub fn partial_sums(&self) -> Vec<PartialSum> {
        let (n, pos) = (self.p.n, self.p.pos);
        self.sent_sums
            .iter()
            .enumerate()
            .filter(|(_, h)| h.iter().all(Option::is_some) && n > 1 && self.gather.is_none())
            .map(|(s, h)| PartialSum {
                step: s as u16,
                chunk: if s + 1 < n { send_chunk(Phase::ReduceScatter, s, pos, n) } else { (pos + 1) % n } as u32,
                hash: chunk_hash(h.iter().flatten()),
            })
            .collect()
    }

    pub fn bytes_sent(&self) -> u64 {
        self.bytes_sent
    }

    pub fn bytes_received(&self) -> u64 {
        self.bytes_received
    }

    /// The reduced vector; only meaningful once [`Self::is_done`].
    pub fn into_result(self) -> Vec<i32> {
        self.data
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hash::segment_hashes;
    use proptest::prelude::*;
    use std::collections::VecDeque;

    fn setup(inputs: &[Vec<i32>], seg: usize, run: RunId) -> Vec<RingAllReduce> {
        let n = inputs.len();
        let len = inputs[0].len();
        let chunks = crate::chunk::chunk_ranges(len, n);
        let seg_hashes: Vec<Vec<Vec<Hash>>> = inputs.iter().map(|d| segment_hashes(d, &chunks, seg)).collect();
        let commits: Vec<Vec<Hash>> = seg_hashes.iter().map(|per| per.iter().map(chunk_hash).collect()).collect();
        (0..n)
            .map(|pos| {
                let left = (pos + n - 1) % n;
                RingAllReduce::new(
                    RingParams { run, round: 9, attempt: 0, n, pos, segment_elems: seg, max_units: MAX_UNITS },
                    inputs[pos].clone(),
                    seg_hashes[pos][pos].clone(),
                    commits[left][left],
                )
                .unwrap()
            })
            .collect()
    }

    /// Runs the ring with per-link FIFO delivery in an order picked by `seed`,
    /// passing every message through the wire codec. `tamper` may alter a message.
    fn run(
        inputs: &[Vec<i32>],
        seg: usize,
        seed: u64,
        tamper: impl FnMut(usize, &mut RingStep),
    ) -> Result<Vec<Vec<i32>>, (usize, String)> {
        deliver(setup(inputs, seg, RunId::from_name("ring-test")), seed, tamper)
    }

    /// Delivers every message of `rings` until none is left.
    fn deliver(
        mut rings: Vec<RingAllReduce>,
        seed: u64,
        mut tamper: impl FnMut(usize, &mut RingStep),
    ) -> Result<Vec<Vec<i32>>, (usize, String)> {
        let n = rings.len();
        let mut links: Vec<VecDeque<RingStep>> = vec![VecDeque::new(); n];
        for (pos, r) in rings.iter_mut().enumerate() {
            links[(pos + 1) % n].extend(r.start());
        }
        let mut s = seed | 1;
        loop {
            let busy: Vec<usize> = (0..n).filter(|&i| !links[i].is_empty()).collect();
            if busy.is_empty() {
                break;
            }
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            let to = busy[(s % busy.len() as u64) as usize];
            let mut msg = links[to].pop_front().unwrap();
            tamper(to, &mut msg);
            let wire = crate::codec::encode_frame(&crate::message::RingFrame::Step(msg));
            let crate::message::RingFrame::Step(msg) = crate::codec::decode_exact(&wire).unwrap();
            let verified = msg.verify().map_err(|e| (to, e.to_string()))?;
            if let Some(out) = rings[to].on_step(verified).map_err(|e| (to, e.to_string()))? {
                links[(to + 1) % n].push_back(out);
            }
        }
        assert!(rings.iter().all(RingAllReduce::is_done));
        Ok(rings.into_iter().map(RingAllReduce::into_result).collect())
    }

    /// One member's range with 256 peers at most, as the node uses it.
    const MAX_UNITS: i32 = i32::MAX / 256;

    fn inputs(n: usize, len: usize, seed: u64) -> Vec<Vec<i32>> {
        let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        (0..n)
            .map(|_| {
                (0..len)
                    .map(|_| {
                        s ^= s << 13;
                        s ^= s >> 7;
                        s ^= s << 17;
                        (s as i32) >> 9 // within the range of max_peers = 256
                    })
                    .collect()
            })
            .collect()
    }

    fn exact_sum(inputs: &[Vec<i32>]) -> Vec<i32> {
        (0..inputs[0].len())
            .map(|j| i32::try_from(inputs.iter().map(|v| i64::from(v[j])).sum::<i64>()).unwrap())
            .collect()
    }

    /// Gather rings over `payloads` (all of one length).
    fn setup_gather(payloads: &[Vec<i32>], seg: usize) -> Vec<RingAllReduce> {
        let n = payloads.len();
        let len = payloads[0].len();
        let own: Vec<Vec<Hash>> =
            payloads.iter().map(|p| segment_hashes(p, &crate::chunk::chunk_ranges(len, 1), seg).remove(0)).collect();
        let hashes: Vec<Hash> = own.iter().map(chunk_hash).collect();
        (0..n)
            .map(|pos| {
                let mut data = vec![0; n * len];
                data[pos * len..(pos + 1) * len].copy_from_slice(&payloads[pos]);
                let p = RingParams {
                    run: RunId::from_name("ring-test"),
                    round: 9,
                    attempt: 0,
                    n,
                    pos,
                    segment_elems: seg,
                    max_units: 0,
                };
                RingAllReduce::gather(p, data, own[pos].clone(), hashes.clone()).unwrap()
            })
            .collect()
    }

    #[test]
    fn schedule_covers_every_chunk() {
        for n in 1..17 {
            for pos in 0..n {
                let rs: std::collections::BTreeSet<_> =
                    (0..n - 1).map(|s| recv_chunk(Phase::ReduceScatter, s, pos, n)).collect();
                assert!(!rs.contains(&pos) && rs.len() == n - 1);
                let ag: std::collections::BTreeSet<_> =
                    (0..n - 1).map(|s| recv_chunk(Phase::AllGather, s, pos, n)).collect();
                assert!(!ag.contains(&((pos + 1) % n)) && ag.len() == n - 1);
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]
        /// Any ring of 1..=16, any length (0, 1, shorter than the ring, several
        /// segments per chunk), any delivery order: every member ends with exactly
        /// the integer sum, bit-identical.
        #[test]
        fn every_member_holds_the_exact_sum(
            n in 1usize..=16,
            len in prop_oneof![Just(0usize), Just(1), 0usize..16, 0usize..400],
            seg in 1usize..9,
            seed in any::<u64>(),
        ) {
            let xs = inputs(n, len, seed);
            let want = exact_sum(&xs);
            let got = run(&xs, seg, seed, |_, _| {}).unwrap();
            for g in &got {
                prop_assert_eq!(g, &want);
            }
        }

        /// A flipped bit anywhere in any payload is caught by the segment hash.
        #[test]
        fn a_flipped_bit_is_detected(n in 2usize..=8, len in 1usize..200, which in any::<u64>(), bit in 0u8..8, seed in any::<u64>()) {
            let xs = inputs(n, len, seed);
            let mut count = 0u64;
            let mut target = None;
            let err = run(&xs, 4, seed, |_, m| {
                if !m.payload.is_empty() && target.is_none() && count == which % 64 {
                    let at = (which as usize / 64) % m.payload.len();
                    m.payload[at] ^= 1 << bit;
                    target = Some(m.id);
                }
                count += u64::from(!m.payload.is_empty());
            });
            if target.is_some() {
                let (_, reason) = err.unwrap_err();
                prop_assert!(reason.contains("hash mismatch"), "{}", reason);
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(100))]
        /// Gathering: every member ends with every member's payload, in position order.
        #[test]
        fn every_member_gathers_every_payload(n in 1usize..=8, len in 0usize..60, seg in 1usize..9, seed in any::<u64>()) {
            let xs = inputs(n, len, seed);
            let got = deliver(setup_gather(&xs, seg), seed, |_, _| {}).unwrap();
            let want: Vec<i32> = xs.concat();
            for g in &got {
                prop_assert_eq!(g, &want);
            }
        }
    }

    /// A member that forwards an altered payload (re-hashed, so the segment check passes) is
    /// caught against the originator's commit, and so is one that sends other values than its own.
    #[test]
    fn gathered_payloads_must_match_their_commits() {
        for (step, want) in [(0u16, "does not match its commit: it sent"), (1, "as forwarded, does not match")] {
            let xs = inputs(4, 20, 3);
            let err = deliver(setup_gather(&xs, 4), 7, |_, m| {
                if m.id.step == step && m.id.chunk == 2 && m.id.segment == 1 {
                    m.payload[0] ^= 1;
                    m.hash = *blake3::hash(&m.payload).as_bytes();
                }
            })
            .unwrap_err();
            assert!(err.1.contains(want), "{}", err.1);
        }
    }

    /// A gathering ring has no all-gather: an all-gather step sent into one is refused, not
    /// looked up among steps it does not have.
    #[test]
    fn an_all_gather_step_in_a_gathering_ring_is_refused() {
        let mut rings = setup_gather(&inputs(3, 12, 1), 4);
        let pos = 1;
        let chunk = recv_chunk(Phase::AllGather, 0, pos, 3) as u32;
        let id = StepId { level: 0, phase: Phase::AllGather, step: 0, chunk, segment: 0 };
        let step = RingStep::new(RunId::from_name("ring-test"), 9, 0, id, vec![0; 16]).verify().unwrap();
        let e = rings[pos].on_step(step);
        assert!(matches!(e, Err(RingError::Unexpected { reason: "no such step in this ring", .. })), "{e:?}");
    }

    /// A sender that re-hashes altered step-0 values passes the segment check but
    /// not the commit.
    #[test]
    fn step0_must_match_the_commit() {
        for n in 2..6 {
            let xs = inputs(n, 50, n as u64);
            let err = run(&xs, 4, 3, |_, m| {
                if m.id.phase == Phase::ReduceScatter && m.id.step == 0 && m.id.chunk == 0 && m.id.segment == 0 {
                    m.payload[0] ^= 1;
                    m.hash = *blake3::hash(&m.payload).as_bytes();
                }
            })
            .unwrap_err();
            assert_eq!(err.0, 1, "the right neighbour of position 0 catches it");
            assert!(err.1.contains("does not match its commit"), "{}", err.1);
        }
    }

    /// A member that adds a value no member could have committed (a NaN's bits, say) is
    /// caught by its right neighbour, before anything is added.
    #[test]
    fn partial_sums_outside_the_fixed_point_range_are_refused() {
        for n in 3..6 {
            let xs = inputs(n, 40, n as u64 + 7);
            let err = run(&xs, 4, 5, |_, m| {
                if m.id.phase == Phase::ReduceScatter && m.id.step == 1 && m.id.segment == 0 {
                    m.payload[..4].copy_from_slice(&f32::NAN.to_bits().to_le_bytes());
                    m.hash = *blake3::hash(&m.payload).as_bytes();
                }
            })
            .unwrap_err();
            assert!(err.1.contains("outside the fixed-point range of its 2 contribution(s)"), "{}", err.1);
        }
    }

    #[test]
    fn stray_steps_are_rejected() {
        let xs = inputs(3, 30, 1);
        let run_id = RunId::from_name("ring-test");
        let mut rings = setup(&xs, 4, run_id);
        let first = rings[0].start().remove(0);
        // Position 2 is not the right neighbour of 0: the chunk is wrong for it.
        let err = rings[2].on_step(first.clone().verify().unwrap()).unwrap_err();
        assert!(matches!(err, RingError::Unexpected { .. }));
        rings[1].on_step(first.clone().verify().unwrap()).unwrap();
        assert!(matches!(rings[1].on_step(first.clone().verify().unwrap()), Err(RingError::Duplicate { .. })));
        let mut other = first;
        other.round += 1;
        assert!(matches!(rings[1].on_step(other.verify().unwrap()), Err(RingError::WrongRound { .. })));
    }
}
