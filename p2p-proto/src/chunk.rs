//! Splitting a flat vector into ring chunks, and chunks into segments.
//!
//! A ring of `n` peers splits the vector into `n` chunks whose sizes differ by
//! at most one element (the first `len % n` chunks are one longer), so vectors
//! shorter than the ring work too: some chunks are then empty. A chunk moves as
//! segments of at most [`SEGMENT_ELEMS`] values, one frame each, which lets a
//! peer forward the first segment of a step before the last one has arrived.
//! An empty chunk still moves as one empty segment, so every step is signalled.

use std::ops::Range;

/// Largest segment: 256 Ki values, 1 MiB on the wire. Large enough that the
/// per-frame cost vanishes, small enough to pipeline a step across peers.
pub const SEGMENT_ELEMS: usize = 256 * 1024;

/// Range of chunk `i` of `n` over a vector of `len` values.
pub fn chunk_range(len: usize, n: usize, i: usize) -> Range<usize> {
    assert!(n > 0 && i < n, "chunk {i} of a ring of {n}");
    let (base, extra) = (len / n, len % n);
    let start = i * base + i.min(extra);
    start..start + base + usize::from(i < extra)
}

/// All `n` chunk ranges of a vector of `len` values, in order.
pub fn chunk_ranges(len: usize, n: usize) -> Vec<Range<usize>> {
    (0..n).map(|i| chunk_range(len, n, i)).collect()
}

/// Number of segments a chunk of `chunk_len` values moves as (at least one).
pub fn segment_count(chunk_len: usize, segment_elems: usize) -> usize {
    chunk_len.div_ceil(segment_elems).max(1)
}

/// Range of segment `s` of `chunk`, in the coordinates of the whole vector.
pub fn segment_range(chunk: &Range<usize>, segment_elems: usize, s: usize) -> Range<usize> {
    let start = (chunk.start + s * segment_elems).min(chunk.end);
    start..(start + segment_elems).min(chunk.end)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn chunks_tile_the_vector_and_differ_by_at_most_one(len in 0usize..5000, n in 1usize..40) {
            let ranges = chunk_ranges(len, n);
            prop_assert_eq!(ranges.len(), n);
            prop_assert_eq!(ranges[0].start, 0);
            prop_assert_eq!(ranges[n - 1].end, len);
            for w in ranges.windows(2) {
                prop_assert_eq!(w[0].end, w[1].start);
            }
            let sizes: Vec<usize> = ranges.iter().map(|r| r.len()).collect();
            let (min, max) = (*sizes.iter().min().unwrap(), *sizes.iter().max().unwrap());
            prop_assert!(max - min <= 1);
        }

        #[test]
        fn segments_tile_each_chunk(len in 0usize..3000, seg in 1usize..100) {
            let chunk = 7..7 + len;
            let k = segment_count(len, seg);
            let segs: Vec<_> = (0..k).map(|s| segment_range(&chunk, seg, s)).collect();
            prop_assert_eq!(segs[0].start, chunk.start);
            prop_assert_eq!(segs[k - 1].end, chunk.end);
            for w in segs.windows(2) {
                prop_assert_eq!(w[0].end, w[1].start);
            }
            prop_assert!(segs.iter().all(|s| s.len() <= seg));
        }
    }

    #[test]
    fn shorter_than_the_ring() {
        assert_eq!(chunk_ranges(2, 4), vec![0..1, 1..2, 2..2, 2..2]);
        assert_eq!(chunk_ranges(0, 3), vec![0..0, 0..0, 0..0]);
        assert_eq!(segment_count(0, 10), 1);
        assert_eq!(segment_range(&(2..2), 10, 0), 2..2);
    }
}
