//! Fixed-point encoding of gradients, so that a ring sum is exact.
//!
//! Floating-point addition is not associative: the same gradients summed in
//! another order give other bits, and a ring sums in a different order at every
//! peer. Instead each value is clipped, scaled by `2^scale_bits`, rounded to the
//! nearest integer (ties to even) and carried as an `i32`. Integer sums are exact,
//! associative and commutative, so every peer holds the same bits.
//!
//! - Precision: decoding loses at most `2^-(scale_bits+1)` per value (half a unit).
//! - Range: one peer's value is clipped to `±max_units` units, where
//!   `max_units = floor(i32::MAX / max_peers)`. The sum of at most `max_peers`
//!   values is therefore within `±i32::MAX` and can never overflow; a ring larger
//!   than `max_peers` is refused ([`FixedPoint::check_ring_size`]).
//!
//! With the defaults (`scale_bits = 20`, `max_peers = 256`) a value is kept to
//! within 4.8e-7 and clipped at ±8.0, which is above the largest element a
//! gradient clipped to a global norm of 8 can have.
//!
//! Robust aggregation: [`FixedPoint::with_clip`] lowers the bound to a chosen
//! `±clip` (coordinate-wise clipping). Honest members clip to it when encoding,
//! and every receiver refuses a partial sum of k contributions beyond `k * clip`
//! ([`crate::ring::RingParams::max_units`]), so one coordinate of a ring's sum
//! never exceeds `n * clip`, whatever a liar sends; in audited attempts the sum
//! checks ([`crate::sumcheck`]) hold every member to exactly its clipped values.

use serde::{Deserialize, Serialize};

/// Default number of fractional bits.
pub const DEFAULT_SCALE_BITS: u32 = 20;
/// Default largest ring the encoding is sized for.
pub const DEFAULT_MAX_PEERS: u32 = 256;

/// Why values could not be encoded, or a ring cannot use this encoding.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum FixedPointError {
    #[error("scale_bits {0} is out of range: use 0..=30")]
    ScaleBits(u32),
    #[error("max_peers {0} is out of range: use 1..=65536")]
    MaxPeers(u32),
    #[error("value at index {index} is not finite ({value}): the gradient holds NaN or infinity")]
    NotFinite { index: usize, value: f32 },
    #[error("clip_value {0} is not a positive number of at least one unit ({1})")]
    Clip(f32, f64),
    #[error("a ring of {size} peers exceeds the {max} the fixed-point range is sized for: raise max_peers")]
    RingTooLarge { size: usize, max: u32 },
}

/// The fixed-point format of a run: every peer must use the same one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct FixedPoint {
    scale_bits: u32,
    max_peers: u32,
    /// Coordinate-wise clipping bound, in units (`None`: the range is the bound).
    #[serde(default)]
    clip_units: Option<i32>,
}

impl Default for FixedPoint {
    fn default() -> Self {
        Self { scale_bits: DEFAULT_SCALE_BITS, max_peers: DEFAULT_MAX_PEERS, clip_units: None }
    }
}

impl FixedPoint {
    /// A format with `scale_bits` fractional bits whose sums of up to `max_peers`
    /// values cannot overflow.
    pub fn new(scale_bits: u32, max_peers: u32) -> Result<Self, FixedPointError> {
        if scale_bits > 30 {
            return Err(FixedPointError::ScaleBits(scale_bits));
        }
        if max_peers == 0 || max_peers > 65536 {
            return Err(FixedPointError::MaxPeers(max_peers));
        }
        Ok(Self { scale_bits, max_peers, clip_units: None })
    }

    /// The same format, every value clipped to `±clip` (at least one unit, at most the range).
    pub fn with_clip(self, clip: f32) -> Result<Self, FixedPointError> {
        let units = f64::from(clip) * self.scale();
        if !(clip.is_finite() && units >= 1.0) {
            return Err(FixedPointError::Clip(clip, 1.0 / self.scale()));
        }
        let range = i32::MAX / self.max_peers as i32;
        Ok(Self { clip_units: Some((units.floor().min(f64::from(range))) as i32), ..self })
    }

    pub fn scale_bits(&self) -> u32 {
        self.scale_bits
    }

    pub fn max_peers(&self) -> u32 {
        self.max_peers
    }

    fn scale(&self) -> f64 {
        f64::from(1u32 << self.scale_bits)
    }

    /// Largest magnitude of one encoded value, in units.
    pub fn max_units(&self) -> i32 {
        let range = i32::MAX / self.max_peers as i32;
        self.clip_units.map_or(range, |c| c.min(range))
    }

    /// Largest magnitude of one value; larger values are clipped to it.
    pub fn max_value(&self) -> f64 {
        f64::from(self.max_units()) / self.scale()
    }

    /// Largest error of a decoded value that was within range: half a unit.
    pub fn max_rounding_error(&self) -> f64 {
        0.5 / self.scale()
    }

    /// Checks that a ring of `size` peers cannot overflow a sum.
    pub fn check_ring_size(&self, size: usize) -> Result<(), FixedPointError> {
        if size > self.max_peers as usize {
            return Err(FixedPointError::RingTooLarge { size, max: self.max_peers });
        }
        Ok(())
    }

    /// Encodes one value: scale (exact, a power of two), clip to
    /// `±max_units`, round half to even. Returns whether it was clipped.
    ///
    /// Rounding uses the classic exact trick: adding and subtracting 1.5·2^52
    /// rounds an f64 below 2^51 in magnitude to the nearest integer, ties to
    /// even, in IEEE arithmetic (the default rounding mode, which Rust never
    /// changes), and compiles to two additions on every x86-64 and ARM CPU.
    #[inline]
    fn encode_one(&self, x: f32, scale: f64, max: f64) -> (i32, bool) {
        const ROUND: f64 = 6_755_399_441_055_744.0; // 1.5 * 2^52
        let y = f64::from(x) * scale;
        let clipped = y.abs() > max;
        let r = (y.clamp(-max, max) + ROUND) - ROUND;
        (r as i32, clipped)
    }

    /// Encodes `values`, appending to `out`; returns how many values were clipped.
    /// A NaN or infinite value is an error and leaves `out` as it was.
    pub fn encode_into(&self, values: &[f32], out: &mut Vec<i32>) -> Result<usize, FixedPointError> {
        let (scale, max) = (self.scale(), f64::from(self.max_units()));
        let start = out.len();
        out.resize(start + values.len(), 0);
        // One branch-free pass over plain slices, so the compiler vectorizes it; the
        // offending index is looked for only when there is one.
        let (mut clipped, mut finite) = (0usize, true);
        for (o, &x) in out[start..].iter_mut().zip(values) {
            let (v, c) = self.encode_one(x, scale, max);
            *o = v;
            clipped += usize::from(c);
            finite &= x.is_finite();
        }
        if !finite {
            out.truncate(start);
            let index = values.iter().position(|v| !v.is_finite()).expect("a value is not finite");
            return Err(FixedPointError::NotFinite { index, value: values[index] });
        }
        Ok(clipped)
    }

    /// Encodes `values` into a new vector.
    pub fn encode(&self, values: &[f32]) -> Result<Vec<i32>, FixedPointError> {
        let mut out = Vec::with_capacity(values.len());
        self.encode_into(values, &mut out)?;
        Ok(out)
    }

    /// Decodes integers (one peer's values or a sum of them) back to f32.
    pub fn decode(&self, units: &[i32]) -> Vec<f32> {
        let inv = 1.0 / self.scale();
        units.iter().map(|&u| (f64::from(u) * inv) as f32).collect()
    }
}

/// Adds `other` into `acc` element by element. Wrapping arithmetic is exact and
/// order-independent modulo 2^32; within the range [`FixedPoint`] guarantees it
/// never wraps, so the sum is the true sum.
#[inline]
pub fn add_assign(acc: &mut [i32], other: &[i32]) {
    debug_assert_eq!(acc.len(), other.len());
    for (a, b) in acc.iter_mut().zip(other) {
        *a = a.wrapping_add(*b);
    }
}

/// Adds little-endian encoded integers (a ring payload) into `acc`.
#[inline]
pub fn add_assign_le_bytes(acc: &mut [i32], bytes: &[u8]) {
    debug_assert_eq!(acc.len() * 4, bytes.len());
    for (a, b) in acc.iter_mut().zip(bytes.chunks_exact(4)) {
        *a = a.wrapping_add(i32::from_le_bytes([b[0], b[1], b[2], b[3]]));
    }
}

/// Lanes of [`sum_squares`]: independent sums the compiler keeps in vector registers.
const LANES: usize = 8;

/// The L2 norm of encoded values, in units: squares summed in f64 in a fixed order every
/// peer follows (value `i` into lane `i % 8`, the lanes added in order at the end), so every
/// peer computes the same bits; eight lanes instead of one running sum let it vectorize.
pub fn norm_units(values: &[i32]) -> f64 {
    let mut lanes = [0f64; LANES];
    let blocks = values.chunks_exact(LANES);
    let rest = blocks.remainder();
    for block in blocks {
        for (l, &v) in lanes.iter_mut().zip(block) {
            *l += f64::from(v) * f64::from(v);
        }
    }
    for (l, &v) in lanes.iter_mut().zip(rest) {
        *l += f64::from(v) * f64::from(v);
    }
    lanes.iter().sum::<f64>().sqrt()
}

/// [`norm_units`] squared, of little-endian encoded values (a ring payload).
pub fn sum_squares_le_bytes(bytes: &[u8]) -> f64 {
    let mut lanes = [0f64; LANES];
    let blocks = bytes.chunks_exact(4 * LANES);
    let rest = blocks.remainder();
    for block in blocks {
        for (l, b) in lanes.iter_mut().zip(block.chunks_exact(4)) {
            let v = f64::from(i32::from_le_bytes([b[0], b[1], b[2], b[3]]));
            *l += v * v;
        }
    }
    for (l, b) in lanes.iter_mut().zip(rest.chunks_exact(4)) {
        let v = f64::from(i32::from_le_bytes([b[0], b[1], b[2], b[3]]));
        *l += v * v;
    }
    lanes.iter().sum()
}

/// Clips `values` in place so their L2 norm is at most `max_norm`; returns the
/// norm before clipping. The norm is summed in f64 in index order, so every peer
/// computes the same bits.
pub fn clip_global_norm(values: &mut [f32], max_norm: f32) -> f64 {
    let norm = values.iter().map(|&v| f64::from(v) * f64::from(v)).sum::<f64>().sqrt();
    if norm > f64::from(max_norm) && norm > 0.0 {
        let k = (f64::from(max_norm) / norm) as f32;
        values.iter_mut().for_each(|v| *v *= k);
    }
    norm
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn precision_edge_is_half_a_unit() {
        let fp = FixedPoint::default();
        let unit = 1.0 / f64::from(1u32 << DEFAULT_SCALE_BITS);
        // Exactly half a unit rounds to even (0), just above half rounds up.
        let half = (unit / 2.0) as f32;
        assert_eq!(fp.encode(&[half]).unwrap(), vec![0]);
        assert_eq!(fp.encode(&[(unit * 1.5) as f32]).unwrap(), vec![2]);
        assert_eq!(fp.encode(&[-half]).unwrap(), vec![0]);
        let above = f32::from_bits(half.to_bits() + 1);
        assert_eq!(fp.encode(&[above]).unwrap(), vec![1]);
        assert_eq!(fp.max_rounding_error(), unit / 2.0);
    }

    #[test]
    fn range_edge_clips_exactly_at_max_value() {
        let fp = FixedPoint::default();
        assert_eq!(fp.max_units(), i32::MAX / 256);
        assert!((fp.max_value() - 8.0).abs() < 1e-5);
        let at = fp.max_value() as f32;
        let enc = fp.encode(&[at, 1e9, -1e9, f32::MAX, f32::MIN]).unwrap();
        assert!(enc[0] <= fp.max_units() && enc[0] >= fp.max_units() - 1);
        assert_eq!(&enc[1..], &[fp.max_units(), -fp.max_units(), fp.max_units(), -fp.max_units()]);
        let mut out = Vec::new();
        assert_eq!(fp.encode_into(&[0.0, 100.0, -100.0], &mut out).unwrap(), 2);
    }

    #[test]
    fn overflow_edge_max_peers_fit_and_the_next_sum_overflows() {
        for max_peers in [1u32, 2, 3, 7, 256, 1000, 65536] {
            let fp = FixedPoint::new(16, max_peers).unwrap();
            let m = fp.max_units();
            // max_peers peers all at either end of the range: exact, no overflow.
            let top = (0..max_peers).try_fold(0i32, |acc, _| acc.checked_add(m));
            let bottom = (0..max_peers).try_fold(0i32, |acc, _| acc.checked_sub(m));
            assert_eq!(top.map(i64::from), Some(i64::from(m) * i64::from(max_peers)));
            assert_eq!(bottom.map(i64::from), Some(-i64::from(m) * i64::from(max_peers)));
            // The bound is tight: the smallest number of peers whose top values
            // overflow is just past what max_units allows.
            let first_overflow = (i32::MAX / m) as u32 + 1;
            assert!(first_overflow > max_peers);
            let k = first_overflow - 1;
            assert!((0..first_overflow).try_fold(0i32, |acc, _| acc.checked_add(m)).is_none());
            assert!((0..k).try_fold(0i32, |acc, _| acc.checked_add(m)).is_some());
            assert!(fp.check_ring_size(max_peers as usize).is_ok());
            assert_eq!(
                fp.check_ring_size(max_peers as usize + 1),
                Err(FixedPointError::RingTooLarge { size: max_peers as usize + 1, max: max_peers })
            );
        }
        // With the default format one more peer at the top of the range overflows.
        let fp = FixedPoint::default();
        assert!((0..=fp.max_peers()).try_fold(0i32, |acc, _| acc.checked_add(fp.max_units())).is_none());
    }

    #[test]
    fn coordinate_clipping_bounds_every_value_and_the_range_check() {
        let fp = FixedPoint::default().with_clip(0.05).unwrap();
        assert_eq!(fp.max_units(), (0.05f64 * f64::from(1u32 << DEFAULT_SCALE_BITS)).floor() as i32);
        let enc = fp.encode(&[0.04, -0.04, 0.5, -7.0, 1e9]).unwrap();
        assert_eq!(fp.decode(&enc[2..]), vec![fp.max_value() as f32, -fp.max_value() as f32, fp.max_value() as f32]);
        assert!((fp.decode(&enc[..1])[0] - 0.04).abs() < 1e-6, "values within the bound are kept");
        // The bound never exceeds the range, and a bound below one unit, zero, or not finite is refused.
        assert_eq!(FixedPoint::default().with_clip(1e6).unwrap().max_units(), FixedPoint::default().max_units());
        for bad in [0.0, -1.0, 1e-9, f32::NAN, f32::INFINITY] {
            assert!(matches!(FixedPoint::default().with_clip(bad), Err(FixedPointError::Clip(..))), "{bad}");
        }
    }

    #[test]
    fn non_finite_is_an_error_naming_the_index() {
        let fp = FixedPoint::default();
        let mut out = vec![5];
        let err = fp.encode_into(&[0.5, f32::NAN], &mut out).unwrap_err();
        assert!(matches!(err, FixedPointError::NotFinite { index: 1, .. }));
        assert_eq!(out, vec![5], "nothing appended on error");
        assert!(fp.encode(&[f32::INFINITY]).is_err());
    }

    #[test]
    fn bad_formats_are_refused() {
        assert_eq!(FixedPoint::new(31, 4), Err(FixedPointError::ScaleBits(31)));
        assert_eq!(FixedPoint::new(20, 0), Err(FixedPointError::MaxPeers(0)));
    }

    #[test]
    fn clip_global_norm_scales_down_only() {
        let mut v = vec![3.0f32, 4.0];
        assert_eq!(clip_global_norm(&mut v, 10.0), 5.0);
        assert_eq!(v, vec![3.0, 4.0]);
        clip_global_norm(&mut v, 1.0);
        assert!((v[0] - 0.6).abs() < 1e-6 && (v[1] - 0.8).abs() < 1e-6);
    }

    proptest! {
        /// The fast rounding equals round-half-to-even followed by clipping, on
        /// arbitrary values and on exact ties.
        #[test]
        fn rounding_matches_round_ties_even(x in any::<f32>().prop_filter("finite", |x| x.is_finite()), k in -4096i32..4096) {
            let fp = FixedPoint::default();
            let max = f64::from(fp.max_units());
            let reference = |v: f32| (f64::from(v) * fp.scale()).round_ties_even().clamp(-max, max) as i32;
            let tie = (f64::from(k) + 0.5) / fp.scale();
            for v in [x, tie as f32, -(tie as f32), x / 1e6] {
                prop_assert_eq!(fp.encode(&[v]).unwrap()[0], reference(v), "{}", v);
            }
        }

        #[test]
        fn round_trip_within_half_a_unit(xs in proptest::collection::vec(-8.0f32..8.0, 0..200)) {
            let fp = FixedPoint::default();
            let back = fp.decode(&fp.encode(&xs).unwrap());
            for (x, y) in xs.iter().zip(&back) {
                // Half a unit from rounding plus f32 output rounding.
                let tol = fp.max_rounding_error() + f64::from(f32::EPSILON) * f64::from(x.abs());
                prop_assert!((f64::from(*x) - f64::from(*y)).abs() <= tol, "{} -> {}", x, y);
            }
        }

        #[test]
        fn sums_are_order_independent(
            vs in proptest::collection::vec(proptest::collection::vec(-8.0f32..8.0, 16), 1..40),
            seed in any::<u64>(),
        ) {
            let fp = FixedPoint::default();
            let enc: Vec<Vec<i32>> = vs.iter().map(|v| fp.encode(v).unwrap()).collect();
            let mut a = vec![0i32; 16];
            enc.iter().for_each(|e| add_assign(&mut a, e));
            let mut order: Vec<usize> = (0..enc.len()).collect();
            let mut s = seed | 1;
            for i in (1..order.len()).rev() {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                order.swap(i, (s >> 33) as usize % (i + 1));
            }
            let mut b = vec![0i32; 16];
            order.iter().for_each(|&i| add_assign(&mut b, &enc[i]));
            prop_assert_eq!(&a, &b);
            // And it is the true sum, computed in i64.
            for j in 0..16 {
                let exact: i64 = enc.iter().map(|e| i64::from(e[j])).sum();
                prop_assert_eq!(i64::from(a[j]), exact);
            }
        }
    }
}
