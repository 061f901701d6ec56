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

use crate::chunk::{chunk_ranges, segment_count, segment_range};
use crate::hash::Hash;
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

/// The segments a member at `pos` of a ring of `n` sends and receives over a vector of `len`
/// values, in the order its [`SumCheck`] lists them: reduce-scatter steps, then the fully
/// reduced chunk it sends in all-gather step 0 (sent) or receives in reduce-scatter (received).
pub fn claimed_ids(n: usize, pos: usize, len: usize, segment_elems: usize) -> (Vec<StepId>, Vec<StepId>) {
    let chunks = chunk_ranges(len, n);
    let ids = |phase: Phase, step: usize, chunk: usize| {
        (0..segment_count(chunks[chunk].len(), segment_elems)).map(move |segment| StepId {
            level: 0,
            phase,
            step: step as u16,
            chunk: chunk as u32,
            segment: segment as u32,
        })
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

/// Checks that `check` lists exactly the segments a member at `pos` handles.
pub fn check_shape(check: &SumCheck, n: usize, pos: usize, len: usize, segment_elems: usize) -> Result<(), String> {
    let (sent, received) = claimed_ids(n, pos, len, segment_elems);
    let ids = |c: &[SegmentClaim]| c.iter().map(|c| c.id).collect::<Vec<_>>();
    if ids(&check.sent) != sent || ids(&check.received) != received {
        return Err("its sum check does not list the segments its place in the ring handles".into());
    }
    if check.sent.iter().chain(&check.received).any(|c| c.eval.iter().any(|e| *e >= P)) {
        return Err("its sum check holds a value outside the field".into());
    }
    Ok(())
}

/// What the claims of a member at `pos` say about its own values, by (chunk, segment): what it
/// sent minus what it received for that chunk (its own chunk goes out unchanged at step 0).
/// The check must have passed [`check_shape`].
pub fn own_evals(check: &SumCheck, n: usize) -> BTreeMap<(u32, u32), [u64; 2]> {
    let mut own: BTreeMap<(u32, u32), [u64; 2]> = BTreeMap::new();
    for c in &check.sent {
        own.insert((c.id.chunk, c.id.segment), c.eval);
    }
    for c in &check.received {
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

/// Checks the claims of the member at `pos` against its own values `data` (recomputed by an
/// auditor, matching its commit): `Err` names the first segment where what it sent is not
/// what it received plus its own values.
pub fn check_own(
    check: &SumCheck,
    n: usize,
    data: &[i32],
    segment_elems: usize,
    points: [u64; 2],
) -> Result<(), String> {
    let chunks = chunk_ranges(data.len(), n);
    for ((chunk, segment), claimed) in own_evals(check, n) {
        let Some(c) = chunks.get(chunk as usize) else {
            return Err(format!("its sum check names chunk {chunk}, past the ring's"));
        };
        let range = segment_range(c, segment_elems, segment as usize);
        let real = eval(data[range].iter().copied(), points);
        if real != claimed {
            return Err(format!(
                "what it sent for chunk {chunk} segment {segment} is not what it received plus its committed values: \
                 its partial sum dropped, changed or added values"
            ));
        }
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
                let all: Vec<_> = (0..n).map(|p| claimed_ids(n, p, len, 3)).collect();
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
