//! Exact attribution of the ring's partial sums by random linear checksums.
//!
//! With fixed-point values a member's outgoing partial sum must equal its
//! incoming partial sum plus its own committed chunk, value for value. Once
//! every member certified the same sum, each gossips a signed [`SumCheck`]: for
//! every reduce-scatter segment it sent and received (and the fully reduced
//! chunk it sent first in the all-gather), its blake3 and two evaluations of
//! the segment's values as a polynomial at points drawn from the certified sum
//! (so nobody knew them while the ring ran), over the field of the Mersenne
//! prime 2^61 - 1. Evaluation is linear, so for every chunk the member touched
//! `eval(sent) - eval(received) = eval(own chunk)` holds exactly when it added
//! its own values and nothing else (a wrong sum passes both points with
//! probability below (segment length / 2^61)^2).
//!
//! Each claim is checked by the member that holds the segment: the left
//! neighbour checks what the right claims to have received, the right checks
//! what the left claims to have sent. The member auditing another holds its
//! recomputed gradient and checks the difference: a member that dropped,
//! changed or added values is caught in that attempt by its own signed claims,
//! and anyone who recomputes its gradient can check the proof.
//!
//! A hierarchical round ([`crate::hier`]) is checked the same way, ring by ring: a member's
//! claims cover the reduce-scatter of its group ring, the reduce-scatter and reduced chunk of
//! its ring across groups and, for a holder, the chunks its group's extras sent it (an extra
//! claims those it sent). What went into the ring across groups is the group's sum of the
//! chunk it holds, which never travels alone, so that chunk is checked whole: evaluations
//! shifted to their place in the chunk (`x^offset`) add up across segments of any size, and
//! what it put into the ring across groups must equal the partial sum it received last in its
//! group ring plus its extras' chunks plus its own values.

use crate::chunk::{chunk_ranges, segment_count, segment_range};
use crate::hash::Hash;
use crate::hier::{Layout, Place};
use crate::message::{RunId, SegmentClaim, StepId, SumCheck};
use crate::ring::{Phase, recv_chunk, send_chunk};
use std::collections::BTreeMap;

/// The field's modulus: the Mersenne prime 2^61 - 1.
pub const P: u64 = (1 << 61) - 1;

fn reduce(x: u128) -> u64 {
    let r = (x & P as u128) as u64 + (x >> 61) as u64;
    let r = (r & P) + (r >> 61);
    if r >= P { r - P } else { r }
}

fn add(a: u64, b: u64) -> u64 {
    let s = a + b;
    if s >= P { s - P } else { s }
}

fn sub(a: u64, b: u64) -> u64 {
    if a >= b { a - b } else { a + P - b }
}

fn mul(a: u64, b: u64) -> u64 {
    reduce(u128::from(a) * u128::from(b))
}

fn pow(mut x: u64, mut e: u64) -> u64 {
    let mut acc = 1;
    while e > 0 {
        if e & 1 == 1 {
            acc = mul(acc, x);
        }
        x = mul(x, x);
        e >>= 1;
    }
    acc
}

/// The evaluation of a segment that starts `offset` values into a longer vector, as part of
/// that vector's evaluation (`x^offset` times the segment's own).
fn shifted(e: [u64; 2], offset: usize, points: [u64; 2]) -> [u64; 2] {
    [0, 1].map(|j| mul(e[j], pow(points[j], offset as u64)))
}

fn add2(a: [u64; 2], b: [u64; 2]) -> [u64; 2] {
    [add(a[0], b[0]), add(a[1], b[1])]
}

fn to_field(v: i32) -> u64 {
    if v >= 0 { v as u64 } else { P - u64::from(v.unsigned_abs()) }
}

/// The two evaluation points of an attempt whose ring certified the sum hashing to `sum`.
pub fn points(run: RunId, round: u64, attempt: u32, sum: &Hash) -> [u64; 2] {
    let mut h = blake3::Hasher::new();
    h.update(b"dtrain/sum-check/v1");
    h.update(&run.0);
    h.update(&round.to_le_bytes());
    h.update(&attempt.to_le_bytes());
    h.update(sum);
    let out = h.finalize();
    let b = out.as_bytes();
    [0, 1].map(|i| {
        let x = reduce(u128::from(u64::from_le_bytes(b[i * 8..i * 8 + 8].try_into().expect("8 bytes"))));
        x.max(2)
    })
}

/// `sum_k v_k x^(k+1)` at both points.
pub fn eval(values: impl DoubleEndedIterator<Item = i32>, points: [u64; 2]) -> [u64; 2] {
    let mut acc = [0u64; 2];
    for v in values.rev() {
        let f = to_field(v);
        for j in 0..2 {
            acc[j] = reduce(u128::from(add(acc[j], f)) * u128::from(points[j]));
        }
    }
    acc
}

/// [`eval`] of little-endian `i32` bytes (a segment's payload).
pub fn eval_le_bytes(bytes: &[u8], points: [u64; 2]) -> [u64; 2] {
    eval(bytes.chunks_exact(4).map(|b| i32::from_le_bytes([b[0], b[1], b[2], b[3]])), points)
}

/// Whether members claim segment `id` in their sum checks: reduce-scatter segments and a
/// ring's reduced chunk (all-gather step 0). In a hierarchy the group ring's all-gather and
/// the holders' copies to extras carry the certified sum itself, and are not claimed.
pub fn claimed(layout: Option<Layout>, id: &StepId) -> bool {
    id.phase == Phase::ReduceScatter || (id.step == 0 && (layout.is_none() || id.level == 1))
}

/// The ids of every segment of a chunk of `chunk_len` values, `first`'s but for the segment.
fn segment_ids(first: StepId, chunk_len: usize, segment_elems: usize) -> impl Iterator<Item = StepId> {
    (0..segment_count(chunk_len, segment_elems)).map(move |segment| StepId { segment: segment as u32, ..first })
}

/// The segments a member at `pos` of a ring of `n` sends and receives in the ring of `level`
/// over a vector of `len` values: reduce-scatter steps, then the fully reduced chunk it sends in
/// all-gather step 0 (sent) or receives in reduce-scatter (received).
fn ring_ids(n: usize, pos: usize, len: usize, segment_elems: usize, level: u8) -> (Vec<StepId>, Vec<StepId>) {
    let chunks = chunk_ranges(len, n);
    let ids = |phase: Phase, step: usize, chunk: usize| {
        segment_ids(
            StepId { level, phase, step: step as u16, chunk: chunk as u32, segment: 0 },
            chunks[chunk].len(),
            segment_elems,
        )
    };
    let mut sent = Vec::new();
    let mut received = Vec::new();
    if n < 2 {
        return (sent, received);
    }
    for s in 0..n - 1 {
        sent.extend(ids(Phase::ReduceScatter, s, send_chunk(Phase::ReduceScatter, s, pos, n)));
        received.extend(ids(Phase::ReduceScatter, s, recv_chunk(Phase::ReduceScatter, s, pos, n)));
    }
    sent.extend(ids(Phase::AllGather, 0, send_chunk(Phase::AllGather, 0, pos, n)));
    (sent, received)
}

/// The segments a member at `pos` of a round of `n` (hierarchical with `layout`) claims to have
/// sent and received, in the order its [`SumCheck`] lists them.
pub fn claimed_ids(
    layout: Option<Layout>,
    n: usize,
    pos: usize,
    len: usize,
    segment_elems: usize,
) -> (Vec<StepId>, Vec<StepId>) {
    let Some(l) = layout else { return ring_ids(n, pos, len, segment_elems, 0) };
    let chunks = chunk_ranges(len, l.g);
    let level2 = |rank: usize, chunk: usize| {
        let first =
            StepId { level: 2, phase: Phase::ReduceScatter, step: rank as u16, chunk: chunk as u32, segment: 0 };
        segment_ids(first, chunks[chunk].len(), segment_elems)
    };
    let (mut sent, mut received) = match l.place(pos) {
        Place::Core { group, j } => {
            let c = (j + 1) % l.g;
            let (mut sent, mut received) = ring_ids(l.g, j, len, segment_elems, 0);
            sent.retain(|id| id.phase == Phase::ReduceScatter);
            let (across_sent, across_received) = ring_ids(l.groups(), group, chunks[c].len(), segment_elems, 1);
            sent.extend(across_sent);
            received.extend(across_received);
            for x in l.extras_of(group) {
                received.extend(level2(l.extra_rank(x), c));
            }
            (sent, received)
        }
        Place::Extra { .. } => ((0..l.g).flat_map(|c| level2(l.extra_rank(pos), c)).collect(), Vec::new()),
    };
    sent.sort();
    received.sort();
    (sent, received)
}

/// Checks that `check` lists exactly the segments a member at `pos` handles.
pub fn check_shape(
    check: &SumCheck,
    layout: Option<Layout>,
    n: usize,
    pos: usize,
    len: usize,
    segment_elems: usize,
) -> Result<(), String> {
    let (sent, received) = claimed_ids(layout, n, pos, len, segment_elems);
    let ids = |c: &[SegmentClaim]| c.iter().map(|c| c.id).collect::<Vec<_>>();
    if ids(&check.sent) != sent || ids(&check.received) != received {
        return Err("its sum check does not list the segments its place in the ring handles".into());
    }
    if check.sent.iter().chain(&check.received).any(|c| c.eval.iter().any(|e| *e >= P)) {
        return Err("its sum check holds a value outside the field".into());
    }
    Ok(())
}

/// What a member's claims about one ring (of `n`) say about its own values, by (chunk,
/// segment): what it sent minus what it received for that chunk (its own chunk goes out
/// unchanged at step 0). The claims must have passed [`check_shape`].
fn own_evals<'a>(
    sent: impl Iterator<Item = &'a SegmentClaim>,
    received: impl Iterator<Item = &'a SegmentClaim>,
    n: usize,
) -> BTreeMap<(u32, u32), [u64; 2]> {
    let mut own: BTreeMap<(u32, u32), [u64; 2]> = BTreeMap::new();
    for c in sent {
        own.insert((c.id.chunk, c.id.segment), c.eval);
    }
    for c in received {
        // What arrived at reduce-scatter step s for a chunk went out at step s + 1 (or, after
        // the last step, as the reduced chunk in all-gather step 0), with this member's values.
        if usize::from(c.id.step) + 1 < n
            && let Some(e) = own.get_mut(&(c.id.chunk, c.id.segment))
        {
            *e = [sub(e[0], c.eval[0]), sub(e[1], c.eval[1])];
        }
    }
    own
}

/// Checks a ring's per-segment claims about a member's own values against `data`.
fn check_ring_own(
    own: BTreeMap<(u32, u32), [u64; 2]>,
    chunks: &[std::ops::Range<usize>],
    data: &[i32],
    segment_elems: usize,
    points: [u64; 2],
) -> Result<(), String> {
    for ((chunk, segment), claimed) in own {
        let Some(c) = chunks.get(chunk as usize) else {
            return Err(format!("its sum check names chunk {chunk}, past the ring's"));
        };
        let range = segment_range(c, segment_elems, segment as usize);
        if eval(data[range].iter().copied(), points) != claimed {
            return Err(format!(
                "what it sent for chunk {chunk} segment {segment} is not what it received plus its committed values: \
                 its partial sum dropped, changed or added values"
            ));
        }
    }
    Ok(())
}

/// Checks the claims of the member at `pos` of a round of `n` (hierarchical with `layout`)
/// against its own values `data` (recomputed by an auditor, matching its commit): `Err` names
/// the first place where what it sent is not what it received plus its own values. The check
/// must have passed [`check_shape`].
pub fn check_own(
    check: &SumCheck,
    layout: Option<Layout>,
    n: usize,
    pos: usize,
    data: &[i32],
    segment_elems: usize,
    points: [u64; 2],
) -> Result<(), String> {
    let Some(l) = layout else {
        let own = own_evals(check.sent.iter(), check.received.iter(), n);
        return check_ring_own(own, &chunk_ranges(data.len(), n), data, segment_elems, points);
    };
    let chunks = chunk_ranges(data.len(), l.g);
    let at = |level: u8| move |c: &&SegmentClaim| c.id.level == level;
    let Place::Core { j, .. } = l.place(pos) else {
        // An extra's chunks go to their holders unchanged.
        return check_ring_own(
            check.sent.iter().map(|c| ((c.id.chunk, c.id.segment), c.eval)).collect(),
            &chunks,
            data,
            segment_elems,
            points,
        );
    };
    // The group ring, but for the chunk this member holds.
    let own = own_evals(check.sent.iter().filter(at(0)), check.received.iter().filter(at(0)), l.g);
    check_ring_own(own, &chunks, data, segment_elems, points)?;
    // The held chunk: what went into the ring across groups, against the group's last partial
    // sum, the extras' chunks and its own values.
    let c = (j + 1) % l.g;
    let held = 0..chunks[c].len();
    let across = chunk_ranges(held.len(), l.groups());
    let mut put_in = [0; 2];
    for ((chunk, s), e) in own_evals(check.sent.iter().filter(at(1)), check.received.iter().filter(at(1)), l.groups()) {
        let Some(a) = across.get(chunk as usize) else {
            return Err(format!("its sum check names chunk {chunk} across groups, past the ring's"));
        };
        put_in = add2(put_in, shifted(e, segment_range(a, segment_elems, s as usize).start, points));
    }
    let mut came_in = eval(data[chunks[c].clone()].iter().copied(), points);
    for r in &check.received {
        if (r.id.level == 0 && usize::from(r.id.step) + 2 == l.g) || r.id.level == 2 {
            let start = segment_range(&held, segment_elems, r.id.segment as usize).start;
            came_in = add2(came_in, shifted(r.eval, start, points));
        }
    }
    if put_in != came_in {
        return Err(format!(
            "what it put into the ring across groups for chunk {c} is not its group's partial sum plus its extras' \
             chunks plus its committed values: its partial sum dropped, changed or added values"
        ));
    }
    Ok(())
}

/// Checks claims about segments this member holds against its own claims about them (computed
/// from the bytes it holds): `Err` names the first claim that does not match.
pub fn check_held(claims: &[SegmentClaim], held: &BTreeMap<StepId, SegmentClaim>) -> Result<(), String> {
    for c in claims {
        let Some(mine) = held.get(&c.id) else { continue };
        if mine.hash != c.hash {
            return Err(format!("it claims another hash for segment {:?} than the one that moved", c.id));
        }
        if mine.eval != c.eval {
            return Err(format!("its checksum of segment {:?} does not match the segment's values", c.id));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn field_arithmetic_wraps_at_the_prime() {
        assert_eq!(add(P - 1, 1), 0);
        assert_eq!(sub(0, 1), P - 1);
        assert_eq!(to_field(-1), P - 1);
        assert_eq!(to_field(i32::MIN), P - (1u64 << 31));
        assert_eq!(reduce(u128::from(P) * u128::from(P)), 0);
        assert_eq!(reduce(u128::from(P - 1) * u128::from(P - 1)), 1);
    }

    proptest! {
        #[test]
        fn eval_is_linear_over_exact_sums(a in prop::collection::vec(-(1i32 << 29)..(1 << 29), 0..64),
                                           seed in any::<[u8; 32]>()) {
            let b: Vec<i32> = a.iter().rev().map(|v| v / 3 - 7).collect();
            let sum: Vec<i32> = a.iter().zip(&b).map(|(x, y)| x + y).collect();
            let pts = points(RunId([1; 32]), 3, 0, &seed);
            let (ea, eb, es) = (eval(a.iter().copied(), pts), eval(b.iter().copied(), pts), eval(sum.iter().copied(), pts));
            prop_assert_eq!(es, [add(ea[0], eb[0]), add(ea[1], eb[1])]);
        }

        #[test]
        fn a_changed_value_changes_the_checksum(a in prop::collection::vec(any::<i32>(), 1..64), i in any::<prop::sample::Index>(),
                                                 delta in (1i32..1000), seed in any::<[u8; 32]>()) {
            let pts = points(RunId([2; 32]), 1, 1, &seed);
            let mut b = a.clone();
            let k = i.index(a.len());
            b[k] = b[k].wrapping_add(delta);
            prop_assert_ne!(eval(a.iter().copied(), pts), eval(b.iter().copied(), pts));
        }
    }

    #[test]
    fn every_segment_is_claimed_once_by_each_end() {
        for n in 2..6 {
            for len in [0, 1, 7, 40] {
                let all: Vec<_> = (0..n).map(|p| claimed_ids(None, n, p, len, 3)).collect();
                for p in 0..n {
                    // What p receives in reduce-scatter is what p - 1 sends there.
                    let left = &all[(p + n - 1) % n].0;
                    let left_rs: Vec<_> = left.iter().filter(|i| i.phase == Phase::ReduceScatter).copied().collect();
                    assert_eq!(all[p].1, left_rs, "n {n} len {len} pos {p}");
                }
            }
        }
    }
}
