//! Gradient audits by recomputation: who audits whom, and what an audit checks.
//!
//! Every input of a member's gradient is public: the parameters (every member
//! holds the same, and its commit names their hash), its micro-batch (its
//! stretch of the sample stream, after the members before it in ring order)
//! and its weight (its share of the round's samples). So any member can
//! recompute any other's gradient, encode it the same way, and compare the
//! chunk hashes with the commit; on the CPU backend the gradient is bit-exact
//! from process to process, so an honest member always matches.
//!
//! Who audits whom is drawn, once every commit of the attempt is in, from the
//! digests of all commits: a member chooses its commit before it can know the
//! others', so no single member can steer whether, or by whom, it is audited.
//! When an attempt is audited (one in `audit_every`), every member audits the
//! member a common shift ahead of it in the ring: each audits one, each is
//! audited once, and a member that commits to anything but its gradient is
//! caught in that very attempt.

use crate::chunk::{chunk_ranges, segment_count};
use crate::hash::{Hash, chunk_hash, segment_hashes};
use crate::membership::RingView;
use crate::message::{GradientCommit, RunId};

/// The seed of an attempt's audits: blake3 over the digests of all its commits, in ring order.
pub fn seed<'a>(run: RunId, round: u64, attempt: u32, commits: impl IntoIterator<Item = &'a GradientCommit>) -> Hash {
    let mut h = blake3::Hasher::new();
    h.update(b"dtrain/audit-seed/v1");
    h.update(&run.0);
    h.update(&round.to_le_bytes());
    h.update(&attempt.to_le_bytes());
    for c in commits {
        h.update(&c.digest());
    }
    h.finalize().into()
}

/// The position member `pos` of a ring of `n` audits in an attempt with `seed`, if the attempt
/// is audited (one in `audit_every`; 0: never).
pub fn target(seed: &Hash, n: usize, pos: usize, audit_every: u64) -> Option<usize> {
    if audit_every == 0 || n < 2 {
        return None;
    }
    let word = |i: usize| u64::from_le_bytes(seed[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
    if !word(0).is_multiple_of(audit_every) {
        return None;
    }
    let shift = 1 + (word(1) % (n as u64 - 1)) as usize;
    Some((pos + shift) % n)
}

/// The ring identity a commit carries: the ordered ring and every member's samples.
pub fn ring_hash(run: RunId, view: &RingView, batches: &[u64]) -> Hash {
    if batches.is_empty() {
        return view.hash(run);
    }
    let mut h = blake3::Hasher::new();
    h.update(b"dtrain/ring-batches/v1");
    h.update(&view.hash(run));
    for b in batches {
        h.update(&b.to_le_bytes());
    }
    h.finalize().into()
}

/// The chunk hashes a commit to `data` carries in a ring of `n` with segments of
/// `segment_elems` values.
pub fn chunk_hashes(data: &[i32], n: usize, segment_elems: usize) -> Vec<Hash> {
    segment_hashes(data, &chunk_ranges(data.len(), n), segment_elems).iter().map(chunk_hash).collect()
}

/// Member `pos`'s micro-batch in a round whose members contribute `batches` samples each:
/// its offset in the round's stretch of the sample stream, its samples, and the weight of its
/// mean gradient in the ring's sum (its share of the round's samples).
pub fn micro_batch(batches: &[u64], pos: usize) -> (u64, u64, f32) {
    let total: u64 = batches.iter().sum();
    let offset = batches[..pos].iter().sum();
    let weight = (batches[pos] as f64 / total.max(1) as f64) as f32;
    (offset, batches[pos], weight)
}

/// Asynchronous runs: the factor a member's clipped gradient is multiplied by when it joins the
/// sum `staleness` rounds after the round it was computed for, at the member's `weight` in the
/// round it joins: `weight / (1 + staleness)`, exactly `weight` when fresh. Every honest member
/// and every auditor computes the same bits, so a stale gradient is audited like a fresh one.
pub fn staleness_weight(weight: f32, staleness: u64) -> f32 {
    if staleness == 0 { weight } else { (f64::from(weight) / (1 + staleness) as f64) as f32 }
}

/// Whether the norm `commit` states is above the largest an honest member at `pos` can commit
/// to: its gradient clipped to the run's norm (`max_norm_units`, in units; 0: not checked) and
/// weighted by its share of the samples, plus half a unit of rounding per value.
pub fn norm_exceeds(commit: &GradientCommit, batches: &[u64], pos: usize, max_norm_units: f64) -> Option<String> {
    if !(commit.norm.is_finite() && commit.norm >= 0.0) {
        return Some(format!("it committed to a norm of {}", commit.norm));
    }
    if max_norm_units <= 0.0 || batches.is_empty() {
        return None;
    }
    let (_, _, weight) = micro_batch(batches, pos);
    let limit = max_norm_units * f64::from(weight) * (1.0 + 1e-5) + 0.5 * (commit.len as f64).sqrt() + 1.0;
    (commit.norm > limit).then(|| {
        format!(
            "it committed to a gradient of norm {:.0} units, above the {limit:.0} the run's norm clipping allows \
             for its weight",
            commit.norm
        )
    })
}

/// Whether `steps` (signed segments of one chunk of the committing member's own values, the
/// member at position `pos` of a ring of `n`, hierarchical with `layout`) contradict `commit`:
/// their hashes make another chunk hash than it committed to. Own values travel at step 0 of
/// the (group) ring, chunk `pos` (in a group, the member's place in it), or, from an attached
/// member of a hierarchy, to the holders of each chunk. Every segment of the chunk must be
/// there (`segment_elems` values a segment): a chunk hash over some of them differs from the
/// committed one without contradicting it. The caller checks the signatures; this checks the
/// shape and the hashes.
pub fn contradicts(
    commit: &GradientCommit,
    layout: Option<crate::hier::Layout>,
    n: usize,
    pos: usize,
    segment_elems: usize,
    steps: &[crate::message::SignedStep],
) -> Result<(), String> {
    use crate::hier::Place;
    use crate::ring::Phase;
    let Some(first) = steps.first() else { return Err("no signed segment".into()) };
    let (level, step, chunk) = match layout.map(|l| (l, l.place(pos))) {
        None => (0, 0, pos),
        Some((_, Place::Core { j, .. })) => (0, 0, j),
        Some((l, Place::Extra { .. })) => (2, l.extra_rank(pos), first.id.chunk as usize),
    };
    for (i, s) in steps.iter().enumerate() {
        if s.id.level != level
            || s.id.phase != Phase::ReduceScatter
            || usize::from(s.id.step) != step
            || s.id.chunk as usize != chunk
            || s.id.segment as usize != i
        {
            return Err(format!("segment {i} is not one of the member's own chunk {chunk}"));
        }
    }
    let chunks = layout.map_or(n, |l| l.g);
    if commit.chunk_hashes.len() != chunks {
        return Err(format!("the commit has {} chunk hashes, not this ring's {chunks}", commit.chunk_hashes.len()));
    }
    let Some(committed) = commit.chunk_hashes.get(chunk) else {
        return Err("the commit has no such chunk".into());
    };
    let want = segment_count(crate::chunk::chunk_range(commit.len as usize, chunks, chunk).len(), segment_elems);
    if steps.len() != want {
        return Err(format!("{} signed segments of a chunk of {want}", steps.len()));
    }
    if chunk_hash(steps.iter().map(|s| &s.hash)) == *committed {
        return Err("the signed segments make the committed chunk hash: no contradiction".into());
    }
    Ok(())
}

/// What an audit concludes about a commit, given the auditor's own encoding of the target's
/// recomputed gradient (bit-exact audits: the recomputation must be the commit).
pub fn check(
    commit: &GradientCommit,
    recomputed: &[i32],
    samples: u64,
    n: usize,
    segment_elems: usize,
) -> Result<(), String> {
    if commit.samples != samples {
        return Err(format!("it committed {} samples, its micro-batch has {samples}", commit.samples));
    }
    matches_commit(commit, recomputed, n, segment_elems)
}

/// Whether `data` is exactly what `commit` committed to: its length, every chunk hash (in a
/// ring of `n` with segments of `segment_elems` values) and its norm.
pub fn matches_commit(commit: &GradientCommit, data: &[i32], n: usize, segment_elems: usize) -> Result<(), String> {
    matches(commit, data, n, segment_elems, crate::fixed::norm_units(data))
}

/// Whether `payload`, a compressed contribution of decoded norm `norm` ([`crate::compress`],
/// committed as one chunk whatever the ring), is exactly what `commit` committed to.
pub fn matches_payload(
    commit: &GradientCommit,
    payload: &[i32],
    norm: f64,
    segment_elems: usize,
) -> Result<(), String> {
    matches(commit, payload, 1, segment_elems, norm)
}

fn matches(commit: &GradientCommit, data: &[i32], n: usize, segment_elems: usize, norm: f64) -> Result<(), String> {
    if commit.len != data.len() as u64 {
        return Err(format!("it committed {} values, the model has {}", commit.len, data.len()));
    }
    let want = chunk_hashes(data, n, segment_elems);
    match want.iter().zip(&commit.chunk_hashes).position(|(a, b)| a != b) {
        None if want.len() == commit.chunk_hashes.len() => {}
        None => return Err("its commit lists another number of chunks".into()),
        Some(i) => return Err(format!("chunk {i} of its commit is not the hash of its recomputed gradient")),
    }
    if commit.norm.to_bits() != norm.to_bits() {
        return Err(format!("it committed to a norm of {}, its recomputed gradient has {norm}", commit.norm));
    }
    Ok(())
}

/// Audits within a tolerance, for backends whose gradients are not bit-exact from one device to
/// another (GPUs): the target's committed values (revealed on request, and checked against its
/// commit with [`matches_commit`]) must be within `tolerance` of the auditor's recomputation in
/// relative L2 distance, `|committed - recomputed| <= tolerance * |recomputed| + sqrt(len)`
/// (in fixed-point units; the second term allows one unit of rounding per value). A lie that
/// passes moves the member's contribution by at most that much.
pub fn within_tolerance(committed: &[i32], recomputed: &[i32], tolerance: f64) -> Result<(), String> {
    let excess = tolerance_excess(committed, recomputed, tolerance)?;
    if excess <= 1.0 { Ok(()) } else { Err(beyond_tolerance(excess, tolerance)) }
}

/// Why a committed gradient `excess` times the allowed distance away fails an audit.
pub fn beyond_tolerance(excess: f64, tolerance: f64) -> String {
    format!(
        "its committed gradient is {excess:.1} times the run's audit tolerance of {tolerance:.0e} away from its \
         recomputed one: beyond the run's audit tolerance"
    )
}

/// How many times the allowed distance ([`within_tolerance`]) `committed` is from
/// `recomputed`: at most 1 passes.
pub fn tolerance_excess(committed: &[i32], recomputed: &[i32], tolerance: f64) -> Result<f64, String> {
    if committed.len() != recomputed.len() {
        return Err(format!("it committed {} values, the model has {}", committed.len(), recomputed.len()));
    }
    let distance = committed
        .iter()
        .zip(recomputed)
        .map(|(&a, &b)| {
            let d = f64::from(a) - f64::from(b);
            d * d
        })
        .sum::<f64>()
        .sqrt();
    let norm = crate::fixed::norm_units(recomputed);
    let limit = tolerance * norm + (recomputed.len() as f64).sqrt();
    Ok(distance / limit)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_audited_attempt_audits_every_member_once_and_no_member_itself() {
        let mut audited_attempts = 0;
        for i in 0..200u8 {
            let seed = *blake3::hash(&[i]).as_bytes();
            for n in 2..9 {
                let targets: Vec<Option<usize>> = (0..n).map(|p| target(&seed, n, p, 1)).collect();
                let mut hit: Vec<usize> = targets.iter().map(|t| t.expect("audited")).collect();
                assert!(hit.iter().enumerate().all(|(p, t)| p != *t), "no member audits itself");
                hit.sort();
                assert_eq!(hit, (0..n).collect::<Vec<_>>(), "each member audited once");
            }
            audited_attempts += usize::from(target(&seed, 4, 0, 4).is_some());
        }
        // One attempt in four is audited with audit_every = 4 (200 seeds: about 50).
        assert!((30..=70).contains(&audited_attempts), "{audited_attempts}");
        assert_eq!(target(&[0; 32], 1, 0, 1), None, "a ring of one audits nobody");
        assert_eq!(target(&[0; 32], 4, 0, 0), None, "audits off");
    }

    #[test]
    fn micro_batches_tile_the_round_and_weights_sum_to_one() {
        let batches = [16, 32, 48];
        let parts: Vec<(u64, u64, f32)> = (0..3).map(|p| micro_batch(&batches, p)).collect();
        assert_eq!(parts.iter().map(|p| (p.0, p.1)).collect::<Vec<_>>(), vec![(0, 16), (16, 32), (48, 48)]);
        let total: f32 = parts.iter().map(|p| p.2).sum();
        assert!((total - 1.0).abs() < 1e-6);
    }

    #[test]
    fn a_commit_to_anything_but_the_gradient_fails_the_check() {
        let run = RunId::from_name("audit");
        let data: Vec<i32> = (0..1000).map(|i| i * 3 - 700).collect();
        let commit = GradientCommit {
            run,
            peer: "p".into(),
            round: 3,
            attempt: 0,
            ring: [0; 32],
            len: 1000,
            chunk_hashes: chunk_hashes(&data, 4, 64),
            samples: 32,
            norm: crate::fixed::norm_units(&data),
            param_hash: [1; 32],
            computed_at: 3,
            joiners: vec![],
            excluded: vec![],
            leaving: false,
            residual: Default::default(),
            residual_next: Default::default(),
            signature: vec![],
        };
        assert_eq!(check(&commit, &data, 32, 4, 64), Ok(()));
        let mut other = data.clone();
        other[999] += 1;
        assert!(check(&commit, &other, 32, 4, 64).unwrap_err().contains("chunk 3"));
        assert!(check(&commit, &data, 33, 4, 64).unwrap_err().contains("samples"));
        assert!(check(&commit, &data[..999], 32, 4, 64).unwrap_err().contains("values"));
        let understated = GradientCommit { norm: commit.norm / 2.0, ..commit.clone() };
        assert!(check(&understated, &data, 32, 4, 64).unwrap_err().contains("norm"));
    }

    #[test]
    fn a_commit_above_the_runs_norm_clipping_proves_a_lie_and_an_honest_one_does_not() {
        let len = 10_000u64;
        let commit = |norm: f64| GradientCommit {
            run: RunId::from_name("norm"),
            peer: "p".into(),
            round: 0,
            attempt: 0,
            ring: [0; 32],
            len,
            chunk_hashes: vec![],
            samples: 16,
            norm,
            param_hash: [0; 32],
            computed_at: 0,
            joiners: vec![],
            excluded: vec![],
            leaving: false,
            residual: Default::default(),
            residual_next: Default::default(),
            signature: vec![],
        };
        // Clipped to 5.0 (in units of 2^-20), one of four equal members: weight 1/4.
        let max = 5.0 * f64::from(1u32 << 20);
        let batches = [16, 16, 16, 16];
        let honest = max / 4.0 + 0.5 * (len as f64).sqrt();
        assert_eq!(norm_exceeds(&commit(honest), &batches, 1, max), None);
        assert!(norm_exceeds(&commit(honest * 1.01), &batches, 1, max).is_some());
        assert!(norm_exceeds(&commit(1000.0 * max / 4.0), &batches, 1, max).unwrap().contains("norm clipping"));
        assert!(norm_exceeds(&commit(f64::NAN), &batches, 1, 0.0).is_some(), "a NaN norm is never honest");
        assert_eq!(norm_exceeds(&commit(1e30), &batches, 1, 0.0), None, "not checked without a bound");
    }

    #[test]
    fn signed_segments_against_the_commit_are_a_contradiction_and_honest_ones_are_not() {
        use crate::message::{SignedStep, StepId};
        use crate::ring::Phase;
        let data: Vec<i32> = (0..100).collect();
        let segs = segment_hashes(&data, &chunk_ranges(100, 2), 16);
        let commit = GradientCommit {
            run: RunId::from_name("c"),
            peer: "p".into(),
            round: 1,
            attempt: 0,
            ring: [0; 32],
            len: 100,
            chunk_hashes: segs.iter().map(chunk_hash).collect(),
            samples: 1,
            norm: 0.0,
            param_hash: [0; 32],
            computed_at: 1,
            joiners: vec![],
            excluded: vec![],
            leaving: false,
            residual: Default::default(),
            residual_next: Default::default(),
            signature: vec![],
        };
        let steps = |pos: usize, hashes: &[Hash]| -> Vec<SignedStep> {
            hashes
                .iter()
                .enumerate()
                .map(|(i, h)| SignedStep {
                    id: StepId { level: 0, phase: Phase::ReduceScatter, step: 0, chunk: pos as u32, segment: i as u32 },
                    hash: *h,
                    signature: vec![],
                })
                .collect()
        };
        // The honest segments of chunk 1 make its committed hash: no contradiction.
        assert!(contradicts(&commit, None, 2, 1, 16, &steps(1, &segs[1])).is_err());
        // One altered segment: a contradiction.
        let mut altered = segs[1].clone();
        altered[2][0] ^= 1;
        assert_eq!(contradicts(&commit, None, 2, 1, 16, &steps(1, &altered)), Ok(()));
        // Segments of another chunk, or out of order, prove nothing.
        assert!(contradicts(&commit, None, 2, 0, 16, &steps(1, &altered)).is_err());
        let mut shuffled = steps(1, &altered);
        shuffled.swap(0, 1);
        assert!(contradicts(&commit, None, 2, 1, 16, &shuffled).is_err());
        assert!(contradicts(&commit, None, 2, 1, 16, &[]).is_err());
        // An honest member's first segments alone (a neighbour cutting the list short) make
        // another chunk hash, but prove nothing: every segment of the chunk must be there.
        let honest = steps(1, &segs[1]);
        assert!(honest.len() > 1);
        for cut in 1..honest.len() {
            assert!(contradicts(&commit, None, 2, 1, 16, &honest[..cut]).is_err(), "cut to {cut}");
        }
        // Nor does a commit cut into other chunks than the ring's.
        assert!(contradicts(&commit, None, 3, 1, 16, &steps(1, &altered)).is_err());
    }

    #[test]
    fn a_tolerance_audit_accepts_device_noise_and_refuses_a_perturbed_gradient() {
        // A gradient of norm about 2e5 units (0.2 at 2^20 units per 1.0).
        let recomputed: Vec<i32> = (0..10_000).map(|i| ((i * 7919) % 4001) - 2000).collect();
        let norm = crate::fixed::norm_units(&recomputed);
        // Device noise: every value off by one part in 10^4, plus a unit of rounding.
        let noisy: Vec<i32> =
            recomputed.iter().enumerate().map(|(i, &v)| v + v / 10_000 + if i % 2 == 0 { 1 } else { -1 }).collect();
        assert_ne!(noisy, recomputed);
        assert!(within_tolerance(&noisy, &recomputed, 1e-3).is_ok());
        assert!(within_tolerance(&recomputed, &recomputed, 0.0).is_ok());
        // Another gradient of the same size, a 1% perturbation, a gradient scaled by 1.01:
        // refused.
        let other: Vec<i32> = recomputed.iter().rev().copied().collect();
        assert!(within_tolerance(&other, &recomputed, 1e-3).is_err());
        let mut bumped = recomputed.clone();
        bumped[17] += (norm * 0.01) as i32;
        let err = within_tolerance(&bumped, &recomputed, 1e-3).unwrap_err();
        assert!(err.contains("beyond the run's audit tolerance"), "{err}");
        let scaled: Vec<i32> = recomputed.iter().map(|&v| v + v / 100).collect();
        assert!(within_tolerance(&scaled, &recomputed, 1e-3).is_err());
        assert!(within_tolerance(&recomputed[1..], &recomputed, 1e-3).is_err(), "another length");
    }
}
