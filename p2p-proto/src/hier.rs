//! Hierarchical all-reduce: rings of `g` members, then rings across the groups.
//!
//! A ring of `n` members, in ring order, is cut into `L = ⌊n / g⌋` groups of `g` consecutive
//! members (the ring's order is a stable hash of the run, round and peer, so groups are too);
//! the `n mod g` members left over, the *extras*, are attached to groups in turn. Chunks are
//! `1/g` of the vector, and member `j` of a group *holds* chunk `j + 1`. A round runs:
//!
//! 1. **Reduce-scatter in the group** (level 0). The group ring reduces its members'
//!    vectors, so each member ends with the chunk it holds summed over its group. An extra
//!    sends each of its chunks to the member of its group that holds it (level 2), which adds
//!    it in once the chunk matches the extra's commit.
//! 2. **All-reduce across groups** (level 1). Member `j` of every group forms ring `j`
//!    across groups, which all-reduces chunk `j + 1`: each member leads the combination of
//!    its `1/g` of the vector, so no single leader carries the whole vector.
//! 3. **All-gather in the group** (level 0). The group ring resumes and broadcasts the summed
//!    chunks, so every member holds the whole sum; each holder also sends its chunk to its
//!    group's extras (level 2).
//!
//! A round takes `2(g - 1) + 2(L - 1)` steps (2 more with extras) instead of the ring's
//! `2(n - 1)`, and each member still sends about twice the vector (an extra once). The ring's
//! checks hold in every stage: every segment carries its blake3 and is checked, every
//! member's own values against its commit (the group ring's step 0, an extra's chunks), and
//! every partial sum against the range of the contributions it can hold.

use crate::chunk::{chunk_ranges, segment_count, segment_range};
use crate::fixed::add_assign_le_bytes;
use crate::hash::{Hash, chunk_hash, le_bytes, read_le_bytes};
use crate::message::{RingStep, StepId, VerifiedStep};
use crate::ring::{Phase, RingAllReduce, RingError, RingParams, recv_chunk};
use std::ops::Range;

/// Where members sit in a hierarchical round of `n` members in groups of `g`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    pub n: usize,
    pub g: usize,
}

/// A member's place in a [`Layout`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Place {
    /// Member `j` of group `group`.
    Core { group: usize, j: usize },
    /// An extra member attached to group `group`.
    Extra { group: usize },
}

impl Layout {
    /// The layout of a ring of `n` for a run's `group_size`: None when the round is the plain
    /// ring (no group size, or a ring too small for two groups).
    pub fn of(n: usize, group_size: usize) -> Option<Self> {
        (group_size >= 2 && n / group_size >= 2).then_some(Self { n, g: group_size })
    }

    /// Number of groups (the size of each ring across groups).
    pub fn groups(&self) -> usize {
        self.n / self.g
    }

    fn core(&self) -> usize {
        self.groups() * self.g
    }

    pub fn place(&self, pos: usize) -> Place {
        if pos < self.core() {
            Place::Core { group: pos / self.g, j: pos % self.g }
        } else {
            Place::Extra { group: (pos - self.core()) % self.groups() }
        }
    }

    fn at(&self, group: usize, j: usize) -> usize {
        group * self.g + j
    }

    /// Position of core member `pos`'s left neighbour in the ring of `level` (0: its group,
    /// 1: across groups).
    pub fn left(&self, pos: usize, level: u8) -> usize {
        let (k, j) = (pos / self.g, pos % self.g);
        if level == 0 {
            self.at(k, (j + self.g - 1) % self.g)
        } else {
            self.at((k + self.groups() - 1) % self.groups(), j)
        }
    }

    /// Position of core member `pos`'s right neighbour in the ring of `level`.
    pub fn right(&self, pos: usize, level: u8) -> usize {
        let (k, j) = (pos / self.g, pos % self.g);
        if level == 0 { self.at(k, (j + 1) % self.g) } else { self.at((k + 1) % self.groups(), j) }
    }

    /// The extras attached to `group`.
    pub fn extras_of(&self, group: usize) -> Vec<usize> {
        (self.core()..self.n).filter(|p| (p - self.core()) % self.groups() == group).collect()
    }

    /// Extra `pos`'s rank among its group's extras: the step of the segments it sends (so each
    /// segment a holder receives has its own [`StepId`]).
    pub fn extra_rank(&self, pos: usize) -> usize {
        (pos - self.core()) / self.groups()
    }

    /// The member of `group` that holds chunk `chunk`.
    pub fn holder(&self, group: usize, chunk: usize) -> usize {
        self.at(group, (chunk + self.g - 1) % self.g)
    }

    /// Every member `pos` sends segments to.
    pub fn destinations(&self, pos: usize) -> Vec<usize> {
        match self.place(pos) {
            Place::Core { group, .. } => {
                let mut out = vec![self.right(pos, 0), self.right(pos, 1)];
                out.extend(self.extras_of(group));
                out.dedup();
                out
            }
            Place::Extra { group } => (0..self.g).map(|j| self.at(group, j)).collect(),
        }
    }

    /// Whether member `from` sends member `to` the segment `id` in this layout.
    pub fn sends(&self, from: usize, to: usize, id: &StepId) -> bool {
        if from >= self.n || to >= self.n {
            return false;
        }
        match (id.level, self.place(from), self.place(to)) {
            (0, Place::Core { .. }, Place::Core { .. }) => self.left(to, 0) == from,
            (1, Place::Core { .. }, Place::Core { .. }) => self.left(to, 1) == from,
            (2, Place::Extra { group }, Place::Core { group: k, j }) => {
                id.phase == Phase::ReduceScatter
                    && group == k
                    && id.chunk as usize == (j + 1) % self.g
                    && usize::from(id.step) == self.extra_rank(from)
            }
            (2, Place::Core { group: k, j }, Place::Extra { group }) => {
                id.phase == Phase::AllGather && id.step == 0 && group == k && id.chunk as usize == (j + 1) % self.g
            }
            _ => false,
        }
    }

    /// Steps of one round, against `2(n - 1)` for the plain ring.
    pub fn steps(&self) -> usize {
        2 * (self.g - 1) + 2 * (self.groups() - 1) + if self.core() < self.n { 2 } else { 0 }
    }

    /// The most contributions one group's chunk sums: its members and extras.
    fn group_contributions(&self) -> usize {
        self.g + (self.n - self.core()).div_ceil(self.groups())
    }
}

/// A segment for the member at a position.
pub type Outgoing = (usize, RingStep);

/// An extra's chunk, as its holder receives it.
#[derive(Debug)]
struct FromExtra {
    pos: usize,
    committed: Hash,
    seen: Vec<Option<Hash>>,
}

#[derive(Debug)]
enum Role {
    Core {
        group: Box<RingAllReduce>,
        across: Option<Box<RingAllReduce>>,
        /// Segments of the ring across groups that arrived before this member's group sum,
        /// each checked on arrival ([`HierAllReduce::check_early`]), and which (step, segment).
        early: Vec<VerifiedStep>,
        early_seen: std::collections::HashSet<(u16, u32)>,
        /// The chunk this member holds, and its group's extras' values of it, as they arrive.
        held: Range<usize>,
        extra_sum: Vec<i32>,
        extras: Vec<FromExtra>,
        gathered: bool,
    },
    Extra {
        data: Vec<i32>,
        own: Vec<Vec<Hash>>,
        /// Hashes of the sum's segments as they arrived, by chunk and segment.
        received: Vec<Vec<Option<Hash>>>,
        remaining: usize,
        started: bool,
    },
}

/// One member's hierarchical all-reduce.
#[derive(Debug)]
pub struct HierAllReduce {
    layout: Layout,
    p: RingParams,
    chunks: Vec<Range<usize>>,
    role: Role,
    bytes: (u64, u64),
}

impl HierAllReduce {
    /// `p` places this member in the whole ring (`p.n` members); `own` are its committed
    /// segment hashes of every chunk and `commits` every member's committed chunk hashes, by
    /// position (all chunked for `layout.g`).
    pub fn new(
        layout: Layout,
        p: RingParams,
        data: Vec<i32>,
        own: Vec<Vec<Hash>>,
        commits: &[Vec<Hash>],
    ) -> Result<Self, RingError> {
        let bad = RingError::BadPosition { n: p.n, pos: p.pos };
        if p.n != layout.n || p.pos >= p.n || commits.len() != p.n || own.len() != layout.g {
            return Err(bad);
        }
        if commits.iter().any(|c| c.len() != layout.g) {
            return Err(bad);
        }
        let chunks = chunk_ranges(data.len(), layout.g);
        let seg = p.segment_elems;
        let role = match layout.place(p.pos) {
            Place::Core { group: k, j } => {
                let left = layout.left(p.pos, 0);
                let own_chunk = own[j].clone();
                let ring = RingParams { n: layout.g, pos: j, ..p.clone() };
                let group = RingAllReduce::new(ring, data, own_chunk, commits[left][(j + layout.g - 1) % layout.g])?
                    .hold_gather(layout.n);
                let c = (j + 1) % layout.g;
                let held = chunks[c].clone();
                let extras = layout
                    .extras_of(k)
                    .into_iter()
                    .map(|pos| FromExtra {
                        pos,
                        committed: commits[pos][c],
                        seen: vec![None; segment_count(held.len(), seg)],
                    })
                    .collect();
                Role::Core {
                    group: Box::new(group),
                    across: None,
                    early: Vec::new(),
                    early_seen: std::collections::HashSet::new(),
                    extra_sum: vec![0; held.len()],
                    held,
                    extras,
                    gathered: false,
                }
            }
            Place::Extra { .. } => {
                let received: Vec<Vec<Option<Hash>>> =
                    chunks.iter().map(|c| vec![None; segment_count(c.len(), seg)]).collect();
                if own.iter().zip(&received).any(|(o, r)| o.len() != r.len()) {
                    return Err(bad);
                }
                let remaining = received.iter().map(Vec::len).sum();
                Role::Extra { data, own, received, remaining, started: false }
            }
        };
        Ok(Self { layout, p, chunks, role, bytes: (0, 0) })
    }

    /// A segment of the ring across groups that arrived before this member's group sum, checked
    /// as that ring will check it: a reduce-scatter step (an all-gather step needs this
    /// member's sum first) of the chunk its step carries, a segment of it not seen before, of
    /// its length, within the range of the groups it can sum. Checked on arrival, so that a
    /// bad one is its sender's (not the sender of whichever frame later starts the ring), and
    /// the segments kept are at most the reduce-scatter's.
    fn check_early(&self, id: &StepId, payload: &[u8]) -> Result<(), RingError> {
        let Role::Core { held, early_seen, .. } = &self.role else { return Ok(()) };
        let (groups, at) = (self.layout.groups(), self.p.pos / self.layout.g);
        let s = id.step as usize;
        if id.phase != Phase::ReduceScatter {
            return Err(RingError::Unexpected {
                id: *id,
                reason: "an all-gather segment across groups before the group sum",
            });
        }
        if s + 1 >= groups {
            return Err(RingError::Unexpected { id: *id, reason: "step beyond the ring's length" });
        }
        let chunk = recv_chunk(Phase::ReduceScatter, s, at, groups);
        if id.chunk as usize != chunk {
            return Err(RingError::Unexpected { id: *id, reason: "chunk is not the one this step carries" });
        }
        let range = chunk_ranges(held.len(), groups)[chunk].clone();
        let max_units = self.p.max_units.saturating_mul(self.layout.group_contributions() as i32);
        let seen = |i: usize| early_seen.contains(&(id.step, i as u32));
        check_segment(id, payload, &range, self.p.segment_elems, &seen, max_units, s + 1).map(|_| ())
    }

    fn msg(
        &mut self,
        phase: Phase,
        step: usize,
        chunk: usize,
        segment: usize,
        hash: Option<Hash>,
        payload: Vec<u8>,
    ) -> RingStep {
        let id = StepId { level: 2, phase, step: step as u16, chunk: chunk as u32, segment: segment as u32 };
        self.bytes.0 += payload.len() as u64;
        let (run, round, attempt) = (self.p.run, self.p.round, self.p.attempt);
        match hash {
            Some(hash) => RingStep { run, round, attempt, id, hash, payload, signature: Vec::new() },
            None => RingStep::new(run, round, attempt, id, payload),
        }
    }

    /// The first sends: this member's own group chunk, or an extra's every chunk to its holder.
    pub fn start(&mut self) -> Result<Vec<Outgoing>, RingError> {
        let pos = self.p.pos;
        let (layout, seg) = (self.layout, self.p.segment_elems);
        match &mut self.role {
            Role::Core { group, .. } => {
                let first = group.start();
                let mut out: Vec<Outgoing> = first.into_iter().map(|s| (layout.right(pos, 0), s)).collect();
                self.advance(&mut out)?;
                Ok(out)
            }
            Role::Extra { data, own, started, .. } => {
                *started = true;
                let Place::Extra { group } = layout.place(pos) else { unreachable!("an extra's place") };
                let rank = layout.extra_rank(pos);
                let mut sends = Vec::new();
                for (c, range) in self.chunks.iter().enumerate() {
                    for (s, hash) in own[c].iter().enumerate() {
                        sends.push((c, s, *hash, le_bytes(&data[segment_range(range, seg, s)])));
                    }
                }
                Ok(sends
                    .into_iter()
                    .map(|(c, s, hash, payload)| {
                        (layout.holder(group, c), self.msg(Phase::ReduceScatter, rank, c, s, Some(hash), payload))
                    })
                    .collect())
            }
        }
    }

    /// Applies one verified segment from the member at `from` (the caller checked that it
    /// sends this member this segment: [`Layout::sends`]) and returns what to send on.
    pub fn on_step(&mut self, from: usize, step: VerifiedStep) -> Result<Vec<Outgoing>, RingError> {
        let pos = self.p.pos;
        let (layout, seg, max_units) = (self.layout, self.p.segment_elems, self.p.max_units);
        let msg = step.step();
        let id = msg.id;
        if (msg.run, msg.round, msg.attempt) != (self.p.run, self.p.round, self.p.attempt) {
            return Err(RingError::WrongRound { round: msg.round, attempt: msg.attempt });
        }
        if !layout.sends(from, pos, &id) {
            return Err(RingError::Unexpected {
                id,
                reason: "this member does not receive that segment from its sender",
            });
        }
        let mut out = Vec::new();
        if id.level == 1 && matches!(self.role, Role::Core { across: None, .. }) {
            self.check_early(&id, &msg.payload)?;
            let Role::Core { early, early_seen, .. } = &mut self.role else { unreachable!("a core member") };
            early_seen.insert((id.step, id.segment));
            early.push(step);
            return Ok(out);
        }
        match &mut self.role {
            Role::Core { group, across, held, extra_sum, extras, .. } => match id.level {
                0 => out.extend(group.on_step(step)?.map(|s| (layout.right(pos, 0), s))),
                1 => {
                    let a = across.as_mut().expect("matched above while there is none");
                    out.extend(a.on_step(step)?.map(|s| (layout.right(pos, 1), s)));
                }
                _ => {
                    // An extra's values of the chunk this member holds.
                    let Some(x) = extras.iter_mut().find(|x| x.pos == from) else {
                        return Err(RingError::Unexpected { id, reason: "not an extra of this group" });
                    };
                    let s = id.segment as usize;
                    let range = check_segment(&id, &msg.payload, held, seg, &|i| x.seen[i].is_some(), max_units, 1)?;
                    let local = range.start - held.start..range.end - held.start;
                    add_assign_le_bytes(&mut extra_sum[local], &msg.payload);
                    self.bytes.1 += msg.payload.len() as u64;
                    x.seen[s] = Some(msg.hash);
                    if x.seen.iter().all(Option::is_some) && chunk_hash(x.seen.iter().flatten()) != x.committed {
                        return Err(RingError::CommitMismatch { chunk: id.chunk as usize });
                    }
                }
            },
            Role::Extra { data, received, remaining, .. } => {
                let c = id.chunk as usize;
                let flags = &received[c];
                let range = check_segment(
                    &id,
                    &msg.payload,
                    &self.chunks[c],
                    seg,
                    &|i| flags[i].is_some(),
                    max_units,
                    layout.n,
                )?;
                read_le_bytes(&msg.payload, &mut data[range]);
                received[c][id.segment as usize] = Some(msg.hash);
                *remaining -= 1;
                self.bytes.1 += msg.payload.len() as u64;
                return Ok(out);
            }
        }
        self.advance(&mut out)?;
        Ok(out)
    }

    /// Starts the ring across groups once the group's reduce-scatter is over and every extra's
    /// chunk is in, and the group's all-gather (and the extras' copies) once that ring is.
    fn advance(&mut self, out: &mut Vec<Outgoing>) -> Result<(), RingError> {
        let (layout, pos) = (self.layout, self.p.pos);
        let Role::Core { group, across, early, held, extra_sum, extras, gathered, .. } = &mut self.role else {
            return Ok(());
        };
        let extras_in = extras.iter().all(|x| x.seen.iter().all(Option::is_some));
        if across.is_none() && group.is_reduced() && extras_in {
            let mut values = group.reduced_chunk().to_vec();
            for (v, x) in values.iter_mut().zip(extra_sum.iter()) {
                *v = v.wrapping_add(*x);
            }
            let contributions = layout.group_contributions() as i32;
            let p = RingParams {
                n: layout.groups(),
                pos: pos / layout.g,
                // Each value across groups sums a whole group's contributions.
                max_units: self.p.max_units.saturating_mul(contributions),
                ..self.p.clone()
            };
            let mut ring = RingAllReduce::over_sums(p, values, 1)?;
            out.extend(ring.start().into_iter().map(|s| (layout.right(pos, 1), s)));
            for s in std::mem::take(early) {
                out.extend(ring.on_step(s)?.map(|s| (layout.right(pos, 1), s)));
            }
            *across = Some(Box::new(ring));
        }
        if let Some(ring) = across.as_ref().filter(|a| a.is_done())
            && !*gathered
        {
            *gathered = true;
            let sum = ring.values().to_vec();
            let resumed = group.resume_gather(&sum);
            // The extras get the same segments: their hashes are made once, by the group ring.
            let mut hashes = vec![None; segment_count(held.len(), self.p.segment_elems)];
            for step in &resumed {
                hashes[step.id.segment as usize] = Some(step.hash);
            }
            out.extend(resumed.into_iter().map(|s| (layout.right(pos, 0), s)));
            let targets: Vec<usize> = extras.iter().map(|x| x.pos).collect();
            let (c, seg, held) = ((pos % layout.g + 1) % layout.g, self.p.segment_elems, held.clone());
            for x in targets {
                for (s, hash) in hashes.iter().enumerate() {
                    let r = segment_range(&held, seg, s);
                    let payload = le_bytes(&sum[r.start - held.start..r.end - held.start]);
                    let step = self.msg(Phase::AllGather, 0, c, s, *hash, payload);
                    out.push((x, step));
                }
            }
        }
        Ok(())
    }

    /// Whether this member holds the whole sum.
    pub fn is_done(&self) -> bool {
        match &self.role {
            Role::Core { group, .. } => group.is_done(),
            Role::Extra { remaining, started, .. } => *started && *remaining == 0,
        }
    }

    pub fn bytes_sent(&self) -> u64 {
        self.bytes.0
            + match &self.role {
                Role::Core { group, across, .. } => group.bytes_sent() + across.as_ref().map_or(0, |a| a.bytes_sent()),
                Role::Extra { .. } => 0,
            }
    }

    pub fn bytes_received(&self) -> u64 {
        self.bytes.1
            + match &self.role {
                Role::Core { group, across, .. } => {
                    group.bytes_received() + across.as_ref().map_or(0, |a| a.bytes_received())
                }
                Role::Extra { .. } => 0,
            }
    }

    /// [`crate::hash::sum_hash`] of the result (chunked for the group), from the segment hashes
    /// checked as they arrived; None before [`Self::is_done`].
    pub fn result_hash(&self) -> Option<Hash> {
        match &self.role {
            Role::Core { group, .. } => group.result_hash(),
            Role::Extra { received, .. } if self.is_done() => {
                let all: Option<Vec<&Hash>> = received.iter().flatten().map(Option::as_ref).collect();
                all.map(crate::hash::sum_hash_of)
            }
            Role::Extra { .. } => None,
        }
    }

    /// The summed vector; only meaningful once [`Self::is_done`].
    pub fn into_result(self) -> Vec<i32> {
        match self.role {
            Role::Core { group, .. } => group.into_result(),
            Role::Extra { data, .. } => data,
        }
    }
}

/// Checks a level-2 segment of `chunk` (segment index, length, not `seen` before, values
/// within `contributions` times `max_units`) and returns its range in the vector.
fn check_segment(
    id: &StepId,
    payload: &[u8],
    chunk: &Range<usize>,
    seg: usize,
    seen: &dyn Fn(usize) -> bool,
    max_units: i32,
    contributions: usize,
) -> Result<Range<usize>, RingError> {
    let s = id.segment as usize;
    if s >= segment_count(chunk.len(), seg) {
        return Err(RingError::Unexpected { id: *id, reason: "segment index past the chunk's end" });
    }
    if seen(s) {
        return Err(RingError::Duplicate { id: *id });
    }
    let range = segment_range(chunk, seg, s);
    if payload.len() != range.len() * 4 {
        return Err(RingError::WrongLength { id: *id, expected: range.len() * 4, got: payload.len() });
    }
    crate::ring::check_range(id, payload, max_units, contributions)?;
    Ok(range)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hash::segment_hashes;
    use crate::message::RunId;
    use std::collections::VecDeque;

    #[test]
    fn groups_of_the_run_size_and_extras_attached_in_turn() {
        assert_eq!(Layout::of(4, 2), Some(Layout { n: 4, g: 2 }));
        // Too small for two groups, or no group size: the plain ring.
        assert_eq!(Layout::of(7, 4), None);
        assert_eq!(Layout::of(3, 2), None);
        assert_eq!(Layout::of(8, 0), None);
        let l = Layout::of(16, 4).unwrap();
        assert_eq!((l.groups(), l.steps()), (4, 12));
        let l = Layout::of(11, 3).unwrap();
        // Groups [0 1 2] [3 4 5] [6 7 8]; extras 9 (group 0) and 10 (group 1).
        assert_eq!((l.groups(), l.steps()), (3, 10));
        assert_eq!((l.place(10), l.extras_of(1), l.extras_of(2)), (Place::Extra { group: 1 }, vec![10], vec![]));
        // In the group ring 0's left is 2; across, 1's left is 7; chunk 0 of group 1 is held by 5.
        assert_eq!((l.left(0, 0), l.right(2, 0), l.left(1, 1), l.right(7, 1), l.holder(1, 0)), (2, 0, 7, 1, 5));
        assert_eq!(l.destinations(9), vec![0, 1, 2]);
        assert_eq!(l.destinations(3), vec![4, 6, 10]);
        // Extras 8 and 10 of group 0 send chunk 1 to its holder 0 as steps 0 and 1.
        let l = Layout::of(11, 4).unwrap();
        let to_holder = |step| StepId { level: 2, phase: Phase::ReduceScatter, step, chunk: 1, segment: 0 };
        assert_eq!((l.extras_of(0), l.extra_rank(8), l.extra_rank(10)), (vec![8, 10], 0, 1));
        assert!(l.sends(8, 0, &to_holder(0)) && l.sends(10, 0, &to_holder(1)));
        assert!(!l.sends(8, 0, &to_holder(1)) && !l.sends(10, 0, &to_holder(0)));
    }

    /// Runs every member's machine over in-memory links and returns each member's result.
    fn run(inputs: &[Vec<i32>], g: usize, seg: usize) -> Vec<Vec<i32>> {
        let n = inputs.len();
        let layout = Layout::of(n, g).expect("hierarchical");
        let run = RunId::from_name("hier");
        let chunks = chunk_ranges(inputs[0].len(), layout.g);
        let segs: Vec<Vec<Vec<Hash>>> = inputs.iter().map(|d| segment_hashes(d, &chunks, seg)).collect();
        let commits: Vec<Vec<Hash>> = segs.iter().map(|s| s.iter().map(chunk_hash).collect()).collect();
        let mut members: Vec<HierAllReduce> = (0..n)
            .map(|pos| {
                let p = RingParams { run, round: 3, attempt: 0, n, pos, segment_elems: seg, max_units: 1000 };
                HierAllReduce::new(layout, p, inputs[pos].clone(), segs[pos].clone(), &commits).unwrap()
            })
            .collect();
        let mut queue: VecDeque<(usize, usize, RingStep)> = VecDeque::new();
        for (pos, m) in members.iter_mut().enumerate() {
            queue.extend(m.start().unwrap().into_iter().map(|(to, s)| (pos, to, s)));
        }
        while let Some((from, to, s)) = queue.pop_front() {
            assert!(layout.destinations(from).contains(&to), "{from} sends only where it may: {to}");
            for (next, out) in members[to].on_step(from, s.verify().unwrap()).unwrap() {
                queue.push_back((to, next, out));
            }
        }
        members
            .into_iter()
            .map(|m| {
                assert!(m.is_done());
                m.into_result()
            })
            .collect()
    }

    #[test]
    fn every_member_ends_with_the_exact_sum() {
        for (n, g, len, seg) in [
            (4, 2, 37, 4),
            (6, 3, 100, 7),
            (6, 2, 5, 2),
            (8, 4, 64, 64),
            (9, 3, 2, 1),
            (5, 2, 40, 3),
            (11, 3, 31, 4),
            (7, 3, 9, 9),
            // Two extras in group 0 (ranks 0 and 1), one in group 1.
            (11, 4, 30, 3),
        ] {
            let inputs: Vec<Vec<i32>> =
                (0..n).map(|p| (0..len).map(|i| ((p * 31 + i * 7) % 201) as i32 - 100).collect()).collect();
            let sum: Vec<i32> = (0..len).map(|i| inputs.iter().map(|v| v[i]).sum()).collect();
            for (pos, r) in run(&inputs, g, seg).iter().enumerate() {
                assert_eq!(*r, sum, "n {n} g {g} len {len}: member {pos}");
            }
        }
    }

    fn step(level: u8, phase: Phase, chunk: u32, values: &[i32]) -> VerifiedStep {
        let id = StepId { level, phase, step: 0, chunk, segment: 0 };
        RingStep::new(RunId::from_name("hier"), 3, 0, id, le_bytes(values)).verify().unwrap()
    }

    /// Members of a ring of 5 in groups of 2 (member 4 an extra of group 0), all committed to
    /// fives; the machine of member `pos`.
    fn member(pos: usize) -> HierAllReduce {
        let layout = Layout::of(5, 2).unwrap();
        let run = RunId::from_name("hier");
        let data = vec![5; 8];
        let segs = segment_hashes(&data, &chunk_ranges(8, 2), 4);
        let commits = vec![segs.iter().map(chunk_hash).collect::<Vec<_>>(); 5];
        let p = RingParams { run, round: 3, attempt: 0, n: 5, pos, segment_elems: 4, max_units: 1000 };
        let mut m = HierAllReduce::new(layout, p, data, segs, &commits).unwrap();
        m.start().unwrap();
        m
    }

    /// A segment across groups that arrives before the member's group sum is checked then, so
    /// a bad one fails the step of its sender: a repeat, another length, an all-gather step, a
    /// step or chunk out of place, a value beyond the groups' range. A good one waits.
    #[test]
    fn segments_across_groups_before_the_group_sum_are_checked_on_arrival() {
        // Member 1 holds chunk 0 (values 0..4); its ring across groups is {1, 3}, its left 3,
        // which sends it the across chunk 1 (values 2..4) in step 0, one segment.
        let across = |phase, step: u16, chunk, values: &[i32]| {
            let id = StepId { level: 1, phase, step, chunk, segment: 0 };
            RingStep::new(RunId::from_name("hier"), 3, 0, id, le_bytes(values)).verify().unwrap()
        };
        let rs = Phase::ReduceScatter;
        let mut m = member(1);
        assert_eq!(m.on_step(3, across(rs, 0, 1, &[10, 10])), Ok(Vec::new()), "a good one waits");
        assert!(matches!(m.on_step(3, across(rs, 0, 1, &[10, 10])), Err(RingError::Duplicate { .. })));
        let refused = |step: VerifiedStep| member(1).on_step(3, step).err();
        assert!(matches!(refused(across(rs, 0, 1, &[10; 100])), Some(RingError::WrongLength { expected: 8, .. })));
        assert!(matches!(refused(across(Phase::AllGather, 0, 1, &[10, 10])), Some(RingError::Unexpected { .. })));
        assert!(matches!(refused(across(rs, 1, 1, &[10, 10])), Some(RingError::Unexpected { .. })));
        assert!(matches!(refused(across(rs, 0, 0, &[10, 10])), Some(RingError::Unexpected { .. })));
        assert!(matches!(refused(across(rs, 0, 1, &[i32::MAX, 0])), Some(RingError::OutOfRange { .. })));
    }

    #[test]
    fn values_other_than_committed_are_caught_in_the_group_ring_and_from_an_extra() {
        // Member 0 sends member 1 sixes in the group ring.
        let e = member(1).on_step(0, step(0, Phase::ReduceScatter, 0, &[6; 4])).err();
        assert!(matches!(e, Some(RingError::CommitMismatch { .. })), "{e:?}");
        // The extra sends member 1 (holder of chunk 0) sixes.
        let e = member(1).on_step(4, step(2, Phase::ReduceScatter, 0, &[6; 4])).err();
        assert!(matches!(e, Some(RingError::CommitMismatch { .. })), "{e:?}");
    }

    #[test]
    fn a_segment_from_a_member_that_does_not_send_it_is_refused() {
        // Member 2 is in another group; member 3 is member 1's left across groups, not in its group.
        for (from, level, phase, chunk) in [
            (2, 0, Phase::ReduceScatter, 0),
            (1, 1, Phase::ReduceScatter, 0),
            (4, 2, Phase::ReduceScatter, 1),
            (4, 2, Phase::AllGather, 0),
        ] {
            let e = member(1).on_step(from, step(level, phase, chunk, &[5; 4])).err();
            assert!(matches!(e, Some(RingError::Unexpected { .. })), "{from} {level}: {e:?}");
        }
        // Out of range: a member's values beyond what one contribution can hold.
        let e = member(1).on_step(4, step(2, Phase::ReduceScatter, 0, &[1001, 0, 0, 0])).err();
        assert!(matches!(e, Some(RingError::OutOfRange { .. })), "{e:?}");
    }
}
