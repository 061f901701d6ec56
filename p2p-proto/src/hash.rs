//! blake3 commitments over encoded gradients.
//!
//! Values are hashed as little-endian `i32` bytes. A segment's hash travels with
//! the segment; a chunk's hash is blake3 over its segments' hashes (a two-level
//! tree), so checking a chunk against a commit costs one pass over the data, and
//! a commit holds one hash per ring member whatever the model size. A round's sum
//! is hashed the same way over all its chunks' segments ([`sum_hash`]), so a member
//! certifies it from the segment hashes it checked as they arrived, without another
//! pass over the vector.

use crate::chunk::{segment_count, segment_range};
use std::ops::Range;

/// A blake3 digest.
pub type Hash = [u8; 32];

const CHUNK_DOMAIN: &[u8] = b"dtrain/chunk-hash/v1";
const SUM_DOMAIN: &[u8] = b"dtrain/sum-hash/v1";

/// Little-endian bytes of `values` (the wire and hash layout).
pub fn le_bytes(values: &[i32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(values.len() * 4);
    extend_le_bytes(values, &mut out);
    out
}

/// Appends the little-endian bytes of `values` to `out`: one copy of their memory on
/// little-endian machines.
pub fn extend_le_bytes(values: &[i32], out: &mut Vec<u8>) {
    #[cfg(target_endian = "little")]
    out.extend_from_slice(bytemuck::cast_slice(values));
    #[cfg(not(target_endian = "little"))]
    for v in values {
        out.extend_from_slice(&v.to_le_bytes());
    }
}

/// Overwrites `values` with the little-endian integers in `bytes` (four bytes each).
pub fn read_le_bytes(bytes: &[u8], values: &mut [i32]) {
    debug_assert_eq!(bytes.len(), values.len() * 4);
    #[cfg(target_endian = "little")]
    bytemuck::cast_slice_mut::<i32, u8>(values).copy_from_slice(bytes);
    #[cfg(not(target_endian = "little"))]
    for (d, b) in values.iter_mut().zip(bytes.chunks_exact(4)) {
        *d = i32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    }
}

/// blake3 over the little-endian bytes of `values`.
pub fn hash_i32s(values: &[i32]) -> Hash {
    #[cfg(target_endian = "little")]
    return *blake3::hash(bytemuck::cast_slice(values)).as_bytes();
    #[cfg(not(target_endian = "little"))]
    {
        let mut h = blake3::Hasher::new();
        // Hash in blocks to avoid one large temporary.
        let mut buf = [0u8; 16 * 1024];
        for block in values.chunks(buf.len() / 4) {
            for (dst, v) in buf.chunks_exact_mut(4).zip(block) {
                dst.copy_from_slice(&v.to_le_bytes());
            }
            h.update(&buf[..block.len() * 4]);
        }
        *h.finalize().as_bytes()
    }
}

/// Hash of a chunk from the hashes of its segments, in order.
pub fn chunk_hash<'a>(segment_hashes: impl IntoIterator<Item = &'a Hash>) -> Hash {
    hash_of_hashes(CHUNK_DOMAIN, segment_hashes)
}

/// blake3 over `domain` and then `hashes`, in order.
fn hash_of_hashes<'a>(domain: &[u8], hashes: impl IntoIterator<Item = &'a Hash>) -> Hash {
    let mut h = blake3::Hasher::new();
    h.update(domain);
    for s in hashes {
        h.update(s);
    }
    *h.finalize().as_bytes()
}

/// Hash of a round's sum from the hashes of its segments, chunk by chunk in order.
pub fn sum_hash_of<'a>(segment_hashes: impl IntoIterator<Item = &'a Hash>) -> Hash {
    hash_of_hashes(SUM_DOMAIN, segment_hashes)
}

/// Hash of a round's sum `values`, cut into `chunks` chunks of segments of `segment_elems`
/// (the round's: [`crate::round::RoundConfig::chunks`]): what every member certifies in its
/// `Done`, and what anyone holding the sum can recompute.
pub fn sum_hash(values: &[i32], chunks: usize, segment_elems: usize) -> Hash {
    let ranges = crate::chunk::chunk_ranges(values.len(), chunks.max(1));
    sum_hash_of(segment_hashes(values, &ranges, segment_elems).iter().flatten())
}

/// Segment hashes of every chunk of `data`, chunk by chunk.
pub fn segment_hashes(data: &[i32], chunks: &[Range<usize>], segment_elems: usize) -> Vec<Vec<Hash>> {
    chunks
        .iter()
        .map(|c| {
            (0..segment_count(c.len(), segment_elems))
                .map(|s| hash_i32s(&data[segment_range(c, segment_elems, s)]))
                .collect()
        })
        .collect()
}

/// Lower-case hex of a hash, for logs.
pub fn hex(h: &Hash) -> String {
    h.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_i32s_is_blake3_of_le_bytes() {
        let v: Vec<i32> = (-5000..5000).map(|i| i * 7919).collect();
        assert_eq!(hash_i32s(&v), *blake3::hash(&le_bytes(&v)).as_bytes());
        assert_eq!(hash_i32s(&[]), *blake3::hash(&[]).as_bytes());
    }

    #[test]
    fn chunk_hash_depends_on_every_segment_and_order() {
        let (a, b) = ([1u8; 32], [2u8; 32]);
        assert_ne!(chunk_hash([&a, &b]), chunk_hash([&b, &a]));
        assert_ne!(chunk_hash([&a]), chunk_hash([&a, &a]));
    }
}
