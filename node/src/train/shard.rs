//! Deterministic sharding: which samples a peer trains on, as a pure function
//! of public values, so any peer can recompute any other's micro-batch.
//!
//! The training set is read as an endless stream of epochs; epoch `e` visits
//! every sample exactly once, in a permutation drawn from
//! `blake3(dataset hash ‖ run seed ‖ e)`. A round consumes the next stretch of
//! that stream, `cursor .. cursor + Σ batches` (the cursor is the number of
//! samples all earlier rounds consumed, which every peer knows), and the member
//! at ring position `p` takes its `batch` samples right after those of positions
//! `0..p`. So batches are disjoint, balanced, and no sample repeats within an
//! epoch.

use p2p_proto::Hash;

/// Draws epoch permutations and micro-batches, caching the current epoch's.
#[derive(Debug, Clone)]
pub struct Sampler {
    dataset: Hash,
    seed: u64,
    len: usize,
    cached: Option<(u64, Vec<u32>)>,
}

impl Sampler {
    pub fn new(dataset: Hash, seed: u64, len: usize) -> Self {
        assert!(len > 0 && len <= u32::MAX as usize, "a training set of 1..=2^32-1 samples");
        Self { dataset, seed, len, cached: None }
    }

    /// The permutation of `0..len` that epoch `epoch` visits.
    pub fn permutation(&self, epoch: u64) -> Vec<u32> {
        let mut h = blake3::Hasher::new();
        h.update(b"dtrain/epoch-permutation/v1");
        h.update(&self.dataset);
        h.update(&self.seed.to_le_bytes());
        h.update(&epoch.to_le_bytes());
        let mut xof = h.finalize_xof();
        let mut p: Vec<u32> = (0..self.len as u32).collect();
        // Fisher–Yates; 64 random bits per draw make the modulo bias negligible
        // (at most len / 2^64) and the result identical everywhere.
        let mut buf = [0u8; 8];
        for i in (1..p.len()).rev() {
            xof.fill(&mut buf);
            let j = (u64::from_le_bytes(buf) % (i as u64 + 1)) as usize;
            p.swap(i, j);
        }
        p
    }

    /// Sample indices at positions `start .. start + count` of the sample stream.
    pub fn stream(&mut self, start: u64, count: usize) -> Vec<u32> {
        let len = self.len as u64;
        (start..start.saturating_add(count as u64))
            .map(|k| {
                let epoch = k / len;
                if self.cached.as_ref().is_none_or(|(e, _)| *e != epoch) {
                    self.cached = Some((epoch, self.permutation(epoch)));
                }
                self.cached.as_ref().expect("just cached").1[(k % len) as usize]
            })
            .collect()
    }

    /// The micro-batch of the member at ring position `position` in a round
    /// that starts at stream position `cursor`, when every member before it
    /// takes `batch` samples too.
    pub fn micro_batch(&mut self, cursor: u64, position: usize, batch: usize) -> Vec<u32> {
        self.stream(cursor + (position * batch) as u64, batch)
    }

    /// The epoch a stream position falls in.
    pub fn epoch_of(&self, position: u64) -> u64 {
        position / self.len as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    #[test]
    fn an_epoch_visits_every_sample_once() {
        let s = Sampler::new([3; 32], 7, 1000);
        let p = s.permutation(0);
        assert_eq!(p.iter().copied().collect::<BTreeSet<_>>().len(), 1000);
        assert_ne!(p, s.permutation(1), "epochs are shuffled differently");
        assert_ne!(p, Sampler::new([4; 32], 7, 1000).permutation(0), "the dataset keys the order");
        assert_ne!(p, Sampler::new([3; 32], 8, 1000).permutation(0), "the seed keys the order");
    }

    #[test]
    fn ring_members_take_disjoint_balanced_batches_and_anyone_can_recompute_them() {
        let (n, batch, len) = (4, 16, 1000);
        let mut mine = Sampler::new([1; 32], 42, len);
        let mut seen = BTreeSet::new();
        let mut cursor = 0;
        // One epoch: rounds of 4 x 16 samples, no repeats.
        while cursor + (n * batch) as u64 <= len as u64 {
            for pos in 0..n {
                let b = mine.micro_batch(cursor, pos, batch);
                assert_eq!(b.len(), batch);
                // Another peer, from scratch, computes the same batch.
                assert_eq!(Sampler::new([1; 32], 42, len).micro_batch(cursor, pos, batch), b);
                for i in b {
                    assert!(seen.insert(i), "sample {i} used twice in an epoch");
                }
            }
            cursor += (n * batch) as u64;
        }
        // Crossing into the next epoch continues with its permutation.
        let across = mine.stream(len as u64 - 2, 4);
        let p0 = mine.permutation(0);
        let p1 = mine.permutation(1);
        assert_eq!(across, vec![p0[len - 2], p0[len - 1], p1[0], p1[1]]);
    }
}
