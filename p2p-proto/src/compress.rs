//! Gradient compression that keeps sums exact: int8 with per-block scales, and
//! top-k with error feedback.
//!
//! A member compresses its fixed-point encoded gradient ([`crate::fixed`]) into
//! a *payload* of `i32` words, commits to the payload's blake3 like to any
//! vector, and the ring gathers every member's payload unchanged
//! ([`crate::ring::RingAllReduce::gather`]): every byte a member receives is
//! checked against its originator's commit, and every member decodes all the
//! payloads and adds them in integers, so all hold the same sum bit for bit.
//! Reducing compressed values hop by hop would need a requantization at every
//! hop (lossy, and each hop's rounding would be another member's to prove);
//! gathering costs `(n - 1)` payloads per member instead of `2(n - 1)/n`
//! vectors, which is fewer bytes for int8 (a quarter of the vector) below 8
//! members and for top-k at 1% (2% of it) below about a hundred.
//!
//! - **int8**: each block of `block` values gets one integer scale `s` (in
//!   fixed-point units, at most `max_units / 127`) and each value
//!   `round(x / s)` in `-127..=127`, half to even. Decoded: `q * s`.
//! - **top-k**: the `k` largest magnitudes of the gradient plus the member's
//!   residual (what earlier rounds did not send), as indices and values; the
//!   rest stays in the residual (error feedback). The residual is the member's
//!   own state, so its commit also carries the residual's blake3 and an
//!   auditor asks for the values to recompute the payload.
//!
//! Decoding checks what a bad payload could break: its length, int8 scales and
//! values within the member's range, top-k indices strictly increasing and in
//! the vector, values within range. Every decoded value is at most `max_units`
//! in magnitude, so sums of up to `max_peers` members cannot overflow.
//!
//! Both encoders keep a decoded norm within the member's norm clipping: a
//! payload above it is shrunk (each value multiplied by `limit / norm` and
//! truncated toward zero), so an honest member never commits above the bound
//! every receiver checks.

use serde::{Deserialize, Serialize};

/// Largest magnitude of an int8 value: -128 is refused, so that `|q * s| <= 127 * s`.
pub const INT8_MAX: i32 = 127;
/// Largest int8 block: a scale per 2^16 values still costs nothing, and the bound keeps a
/// run's configuration from asking for less than one scale per payload.
pub const MAX_INT8_BLOCK: u32 = 1 << 16;

/// How members compress their contributions (part of the run's configuration).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Compression {
    /// The fixed-point vector itself, all-reduced by the ring.
    #[default]
    None,
    /// int8 values with one scale per `block` values.
    Int8 { block: u32 },
    /// The `per_million` largest of every million values (at least one), with error feedback.
    TopK { per_million: u32 },
}

/// Why a payload cannot be decoded: its originator committed to something no honest member
/// produces.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CompressError {
    #[error("the payload has {got} words, {expected} expected for {values} values")]
    Length { got: usize, expected: usize, values: usize },
    #[error("block {block} has scale {scale}, outside 0..={max}")]
    Scale { block: usize, scale: i32, max: i32 },
    #[error("value {index} is -128: int8 values are within ±127")]
    Int8Range { index: usize },
    #[error("index {index} at position {at} is not after the previous one or not below {len}")]
    Index { at: usize, index: i32, len: usize },
    #[error("value {value} at position {at} is beyond ±{max}")]
    Value { at: usize, value: i32, max: i32 },
}

/// A member's compressed contribution.
#[derive(Debug, Clone, PartialEq)]
pub struct Encoded {
    /// What the member commits to and the ring gathers.
    pub payload: Vec<i32>,
    /// L2 norm of the decoded values, in units (what receivers compute with [`check`]).
    pub norm: f64,
    /// Top-k: what the member did not send, carried into its next round.
    pub residual: Option<Vec<i32>>,
}

impl Compression {
    /// Whether members send their vectors uncompressed (the ring reduces them).
    pub fn is_none(&self) -> bool {
        *self == Self::None
    }

    /// Whether members keep a residual between rounds (error feedback).
    pub fn has_residual(&self) -> bool {
        matches!(self, Self::TopK { .. })
    }

    /// Checks the settings.
    pub fn validate(&self) -> Result<(), String> {
        match *self {
            Self::None => Ok(()),
            Self::Int8 { block } if block == 0 || block > MAX_INT8_BLOCK => {
                Err(format!("an int8 block of {block} values is not within 1..={MAX_INT8_BLOCK}"))
            }
            Self::TopK { per_million } if per_million == 0 || per_million > 1_000_000 => {
                Err(format!("a top-k share of {per_million} per million is not within 1..=1000000"))
            }
            _ => Ok(()),
        }
    }

    /// Values a top-k payload of a `len`-value vector carries.
    pub fn top_k(per_million: u32, len: usize) -> usize {
        let k = (len as u128 * u128::from(per_million) / 1_000_000) as usize;
        k.max(1).min(len)
    }

    /// Words of the payload for a vector of `len` values (`len` itself uncompressed).
    pub fn payload_words(&self, len: usize) -> usize {
        match *self {
            Self::None => len,
            Self::Int8 { block } => len.div_ceil(block as usize) + len.div_ceil(4),
            Self::TopK { per_million } => 2 * Self::top_k(per_million, len),
        }
    }
}

/// Squares summed in f64 in a fixed order (value `i` of the payload's order into lane `i % 8`),
/// so the encoder and every receiver compute the same bits.
#[derive(Default)]
struct Norm {
    lanes: [f64; 8],
    i: usize,
}

impl Norm {
    fn push(&mut self, v: f64) {
        self.lanes[self.i & 7] += v;
        self.i += 1;
    }
    fn get(&self) -> f64 {
        self.lanes.iter().sum::<f64>().sqrt()
    }
}

/// `x / s` rounded half to even, for `s > 0`. The f64 quotient of two integers below 2^31
/// is within 2^-46 of the exact one while a quotient's distance to a half is either zero
/// (exactly representable) or at least 1/(2s) > 2^-32, so this is the exact integer rounding
/// on every IEEE-754 machine (in its default rounding mode), and it vectorizes where integer
/// division does not.
fn div_round(x: i32, s: i32) -> i32 {
    // Adding and subtracting 1.5·2^52 rounds half to even (the default IEEE rounding) for any
    // magnitude below 2^51, without a library call, so the loop vectorizes.
    const ROUND: f64 = 6_755_399_441_055_744.0;
    ((f64::from(x) / f64::from(s) + ROUND) - ROUND) as i32
}

/// The int8 values of a payload's value words, as bytes (value `j` is byte `j % 4` of word
/// `j / 4`, little-endian): borrowed where the machine is little-endian.
fn int8_bytes(q: &[i32]) -> std::borrow::Cow<'_, [u8]> {
    #[cfg(target_endian = "little")]
    return std::borrow::Cow::Borrowed(bytemuck::cast_slice(q));
    #[cfg(not(target_endian = "little"))]
    std::borrow::Cow::Owned(q.iter().flat_map(|w| w.to_le_bytes()).collect())
}

/// Packs int8 values into payload words.
fn pack_int8(values: &[i8], q: &mut [i32]) {
    for (w, b) in q.iter_mut().zip(values.chunks(4)) {
        let mut le = [0u8; 4];
        for (d, v) in le.iter_mut().zip(b) {
            *d = *v as u8;
        }
        *w = i32::from_le_bytes(le);
    }
}

/// Compresses `units` (a fixed-point vector, every value within ±`max_units`). `residual` is
/// the member's error feedback for top-k (none: zeros). `max_norm` (units; 0: none) bounds the
/// decoded norm.
pub fn encode(c: Compression, units: &[i32], residual: Option<&[i32]>, max_units: i32, max_norm: f64) -> Encoded {
    let len = units.len();
    let mut payload = vec![0i32; c.payload_words(len)];
    let mut residual_out = None;
    match c {
        Compression::None => payload.copy_from_slice(units),
        Compression::Int8 { block } => {
            let block = block as usize;
            let blocks = len.div_ceil(block);
            let max_scale = (max_units / INT8_MAX).max(1);
            let mut values = vec![0i8; len];
            let (scales, q) = payload.split_at_mut(blocks);
            for ((xs, vs), scale) in units.chunks(block).zip(values.chunks_mut(block)).zip(scales.iter_mut()) {
                let m = xs.iter().map(|x| x.unsigned_abs()).max().unwrap_or(0) as i64;
                let s = ((m + i64::from(INT8_MAX) - 1) / i64::from(INT8_MAX)).min(i64::from(max_scale)) as i32;
                *scale = s;
                if s > 0 {
                    for (v, &x) in vs.iter_mut().zip(xs) {
                        *v = div_round(x, s).clamp(-INT8_MAX, INT8_MAX) as i8;
                    }
                }
            }
            let norm = int8_norm(scales, bytemuck::cast_slice(&values), block);
            if max_norm > 0.0 && norm > max_norm {
                let f = max_norm / norm;
                for v in &mut values {
                    *v = (f64::from(*v) * f).trunc() as i8;
                }
            }
            pack_int8(&values, q);
        }
        Compression::TopK { per_million } => {
            let k = Compression::top_k(per_million, len);
            let mut acc: Vec<i32> = match residual {
                Some(r) => units.iter().zip(r).map(|(x, e)| x.saturating_add(*e)).collect(),
                None => units.to_vec(),
            };
            let picked = top_k_indices(&acc, k);
            let (indices, values) = payload.split_at_mut(k);
            for ((i, v), &at) in indices.iter_mut().zip(values.iter_mut()).zip(&picked) {
                *i = at as i32;
                *v = acc[at as usize].clamp(-max_units, max_units);
            }
            let norm = topk_norm(values);
            if max_norm > 0.0 && norm > max_norm {
                let f = max_norm / norm;
                for v in values.iter_mut() {
                    *v = (f64::from(*v) * f).trunc() as i32;
                }
            }
            for (&i, &v) in indices.iter().zip(values.iter()) {
                acc[i as usize] -= v;
            }
            residual_out = Some(acc);
        }
    }
    let norm = norm_of(c, &payload, len);
    Encoded { payload, norm, residual: residual_out }
}

/// The indices of the `k` largest magnitudes of `acc`, ascending; among equal magnitudes the
/// lower indices: one answer on every peer. The k-th largest magnitude is found on a copy of
/// the magnitudes (contiguous, so the selection runs at memory speed), then one pass picks.
fn top_k_indices(acc: &[i32], k: usize) -> Vec<u32> {
    if k == 0 {
        return Vec::new();
    }
    let mut mags: Vec<u32> = acc.iter().map(|v| v.unsigned_abs()).collect();
    let (_, kth, _) = mags.select_nth_unstable_by(k - 1, |a, b| b.cmp(a));
    let kth = *kth;
    let mut ties = k - acc.iter().filter(|v| v.unsigned_abs() > kth).count();
    let mut picked = Vec::with_capacity(k);
    for (i, v) in acc.iter().enumerate() {
        let m = v.unsigned_abs();
        if m > kth || (m == kth && ties > 0) {
            ties -= usize::from(m == kth);
            picked.push(i as u32);
        }
    }
    picked
}

/// The decoded norm of int8 values: each block's squares summed exactly in integers, times
/// its scale squared, the blocks in order into f64 lanes.
fn int8_norm(scales: &[i32], bytes: &[u8], block: usize) -> f64 {
    let mut n = Norm::default();
    for (s, qs) in scales.iter().zip(bytes.chunks(block)) {
        let sq: i64 = qs.iter().map(|b| i64::from(*b as i8) * i64::from(*b as i8)).sum();
        n.push(sq as f64 * f64::from(*s) * f64::from(*s));
    }
    n.get()
}

fn topk_norm(values: &[i32]) -> f64 {
    let mut n = Norm::default();
    for v in values {
        n.push(f64::from(*v) * f64::from(*v));
    }
    n.get()
}

/// The decoded norm of a payload the encoder made (unchecked), in units.
fn norm_of(c: Compression, payload: &[i32], len: usize) -> f64 {
    match c {
        Compression::None => crate::fixed::norm_units(payload),
        Compression::Int8 { block } => {
            let (scales, q) = payload.split_at(len.div_ceil(block as usize));
            int8_norm(scales, &int8_bytes(q)[..len], block as usize)
        }
        Compression::TopK { .. } => topk_norm(&payload[payload.len() / 2..]),
    }
}

/// The payload of `len` zeros, encoded without a residual: what a member with nothing to
/// contribute to a round commits to (asynchronous rounds), keeping its residual for later.
pub fn zeros(c: Compression, len: usize) -> Vec<i32> {
    encode(c, &vec![0; len], None, i32::MAX, 0.0).payload
}

/// Checks a payload of a `len`-value vector and returns its decoded norm, in units.
pub fn check(c: Compression, payload: &[i32], len: usize, max_units: i32) -> Result<f64, CompressError> {
    let expected = c.payload_words(len);
    if payload.len() != expected {
        return Err(CompressError::Length { got: payload.len(), expected, values: len });
    }
    match c {
        Compression::None => {
            if let Some((at, &value)) = payload.iter().enumerate().find(|(_, v)| v.unsigned_abs() > max_units as u32) {
                return Err(CompressError::Value { at, value, max: max_units });
            }
        }
        Compression::Int8 { block } => {
            let (scales, q) = payload.split_at(len.div_ceil(block as usize));
            let max = (max_units / INT8_MAX).max(1);
            if let Some((block, &scale)) = scales.iter().enumerate().find(|(_, s)| !(0..=max).contains(*s)) {
                return Err(CompressError::Scale { block, scale, max });
            }
            if let Some(index) = int8_bytes(q)[..len].iter().position(|b| *b == 0x80) {
                return Err(CompressError::Int8Range { index });
            }
        }
        Compression::TopK { .. } => {
            let k = payload.len() / 2;
            let mut prev = -1i64;
            for at in 0..k {
                let index = payload[at];
                if i64::from(index) <= prev || index as i64 >= len as i64 {
                    return Err(CompressError::Index { at, index, len });
                }
                prev = i64::from(index);
                let value = payload[k + at];
                if value.unsigned_abs() > max_units as u32 {
                    return Err(CompressError::Value { at, value, max: max_units });
                }
            }
        }
    }
    Ok(norm_of(c, payload, len))
}

/// Adds a payload's decoded values into `acc` (its length is the vector's); the payload must
/// have passed [`check`].
pub fn add_into(c: Compression, payload: &[i32], acc: &mut [i32]) {
    let len = acc.len();
    match c {
        Compression::None => crate::fixed::add_assign(acc, payload),
        Compression::Int8 { block } => {
            let block = block as usize;
            let (scales, q) = payload.split_at(len.div_ceil(block));
            let bytes = int8_bytes(q);
            for ((a, qs), s) in acc.chunks_mut(block).zip(bytes[..len].chunks(block)).zip(scales) {
                for (a, b) in a.iter_mut().zip(qs) {
                    *a += i32::from(*b as i8) * s;
                }
            }
        }
        Compression::TopK { .. } => {
            let (indices, values) = payload.split_at(payload.len() / 2);
            for (i, v) in indices.iter().zip(values) {
                acc[*i as usize] += v;
            }
        }
    }
}

/// The decoded vector of a checked payload.
pub fn decode(c: Compression, payload: &[i32], len: usize) -> Vec<i32> {
    let mut out = vec![0; len];
    add_into(c, payload, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MAX: i32 = i32::MAX / 256;

    fn vector(len: usize, seed: u64, scale: i32) -> Vec<i32> {
        let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        (0..len)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (s as i32) % scale.max(1)
            })
            .collect()
    }

    fn l2(v: &[i32]) -> f64 {
        v.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt()
    }

    #[test]
    fn rounding_is_half_to_even() {
        assert_eq!([div_round(5, 2), div_round(7, 2), div_round(-5, 2), div_round(-7, 2)], [2, 4, -2, -4]);
        assert_eq!([div_round(10, 4), div_round(11, 4), div_round(-11, 4), div_round(0, 3)], [2, 3, -3, 0]);
    }

    #[test]
    fn sizes() {
        assert_eq!(Compression::Int8 { block: 256 }.payload_words(1000), 4 + 250);
        assert_eq!(Compression::TopK { per_million: 10_000 }.payload_words(1000), 20);
        assert_eq!(Compression::TopK { per_million: 1 }.payload_words(1000), 2, "at least one value");
        assert_eq!(Compression::TopK { per_million: 1 }.payload_words(0), 0);
        assert!(Compression::Int8 { block: 0 }.validate().is_err());
        assert!(Compression::TopK { per_million: 2_000_000 }.validate().is_err());
    }

    /// Integer division rounded half to even, exactly.
    fn div_round_exact(x: i32, s: i32) -> i32 {
        let (x, s) = (i64::from(x), i64::from(s));
        let (q, r) = (x.div_euclid(s), x.rem_euclid(s));
        (match (2 * r).cmp(&s) {
            std::cmp::Ordering::Greater => q + 1,
            std::cmp::Ordering::Equal => q + (q & 1),
            std::cmp::Ordering::Less => q,
        }) as i32
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]
        /// The floating-point quotient rounds exactly as the integer one, ties included.
        #[test]
        fn division_rounds_exactly(x in any::<i32>(), s in 1i32..=i32::MAX, tie in 1i32..1000) {
            prop_assert_eq!(div_round(x, s), div_round_exact(x, s));
            let t = (2 * tie + 1).min(i32::MAX / 2);
            prop_assert_eq!(div_round(t, 2), div_round_exact(t, 2));
            prop_assert_eq!(div_round(-t, 2), div_round_exact(-t, 2));
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]
        /// int8: every decoded value is within half a scale of the original (or its block's
        /// largest value is at the range's cap), the payload passes its own check, and the
        /// checked norm is the encoder's.
        #[test]
        fn int8_round_trip(len in 0usize..600, block in 1u32..70, seed in any::<u64>(), scale in 1i32..MAX) {
            let c = Compression::Int8 { block };
            let x = vector(len, seed, scale);
            let e = encode(c, &x, None, MAX, 0.0);
            prop_assert_eq!(check(c, &e.payload, len, MAX), Ok(e.norm));
            let y = decode(c, &e.payload, len);
            for (b, (xs, ys)) in x.chunks(block as usize).zip(y.chunks(block as usize)).enumerate() {
                let s = e.payload[b];
                for (a, d) in xs.iter().zip(ys) {
                    prop_assert!(i64::from(*a - *d).abs() * 2 <= i64::from(s), "{} vs {} at scale {}", a, d, s);
                }
            }
            prop_assert!(e.residual.is_none());
        }

        /// top-k with error feedback: what is sent plus the residual is exactly the gradient plus
        /// the old residual, the k sent are the largest, and nothing is lost over many rounds.
        #[test]
        fn topk_keeps_everything_in_the_residual(len in 1usize..500, ppm in 1u32..300_000, seed in any::<u64>()) {
            let c = Compression::TopK { per_million: ppm };
            let x = vector(len, seed, 1 << 16);
            let r0 = vector(len, seed ^ 5, 1 << 10);
            let e = encode(c, &x, Some(&r0), MAX, 0.0);
            prop_assert_eq!(check(c, &e.payload, len, MAX), Ok(e.norm));
            let sent = decode(c, &e.payload, len);
            let r1 = e.residual.unwrap();
            for i in 0..len {
                prop_assert_eq!(sent[i] + r1[i], x[i] + r0[i]);
            }
            let k = Compression::top_k(ppm, len);
            let smallest_sent = (0..k).map(|a| e.payload[k + a].unsigned_abs()).min().unwrap();
            prop_assert!(r1.iter().all(|v| v.unsigned_abs() <= smallest_sent));
        }

        /// A norm bound holds after compression, and the residual keeps what was cut.
        #[test]
        fn the_norm_bound_holds(len in 1usize..400, seed in any::<u64>(), topk in any::<bool>()) {
            let c = if topk { Compression::TopK { per_million: 100_000 } } else { Compression::Int8 { block: 32 } };
            let x = vector(len, seed, 1 << 20);
            let limit = l2(&x) / 3.0 + 1.0;
            let e = encode(c, &x, None, MAX, limit);
            prop_assert!(e.norm <= limit * (1.0 + 1e-12), "{} > {}", e.norm, limit);
            prop_assert_eq!(check(c, &e.payload, len, MAX), Ok(e.norm));
            if let Some(r) = e.residual {
                let sent = decode(c, &e.payload, len);
                for i in 0..len {
                    prop_assert_eq!(sent[i] + r[i], x[i]);
                }
            }
        }
    }

    proptest! {
        /// The selection is the k largest magnitudes, ties to the lower index.
        #[test]
        fn top_k_picks_the_largest_ties_first(len in 1usize..300, k in 1usize..300, seed in any::<u64>(), small in any::<bool>()) {
            let k = k.min(len);
            // Small values make many ties.
            let acc = vector(len, seed, if small { 4 } else { 1 << 20 });
            let mut order: Vec<u32> = (0..len as u32).collect();
            order.sort_by(|&a, &b| acc[b as usize].unsigned_abs().cmp(&acc[a as usize].unsigned_abs()).then(a.cmp(&b)));
            let mut want = order[..k].to_vec();
            want.sort_unstable();
            prop_assert_eq!(top_k_indices(&acc, k), want);
        }
    }

    #[test]
    fn error_feedback_sends_everything_eventually() {
        // A constant gradient, one value in ten sent per round: after enough rounds the mean of
        // what was sent is the gradient (nothing is lost, only delayed).
        let c = Compression::TopK { per_million: 100_000 };
        let x: Vec<i32> = (0..100).map(|i| (i * 37 % 101) - 50).collect();
        let mut residual = vec![0; 100];
        let mut total = vec![0i64; 100];
        let rounds = 400;
        for _ in 0..rounds {
            let e = encode(c, &x, Some(&residual), MAX, 0.0);
            for (t, v) in total.iter_mut().zip(decode(c, &e.payload, 100)) {
                *t += i64::from(v);
            }
            residual = e.residual.unwrap();
        }
        for i in 0..100 {
            assert_eq!(total[i] + i64::from(residual[i]), i64::from(x[i]) * rounds);
            assert!(residual[i].abs() < 50 * 20, "residual {} at {i} stays bounded", residual[i]);
        }
    }

    #[test]
    fn bad_payloads_are_refused() {
        let len = 10;
        let int8 = Compression::Int8 { block: 4 };
        let good = encode(int8, &vector(len, 1, 1000), None, MAX, 0.0).payload;
        assert!(matches!(check(int8, &good[1..], len, MAX), Err(CompressError::Length { .. })));
        let mut p = good.clone();
        p[0] = MAX / 127 + 1;
        assert!(matches!(check(int8, &p, len, MAX), Err(CompressError::Scale { block: 0, .. })));
        p = good.clone();
        p[0] = -1;
        assert!(matches!(check(int8, &p, len, MAX), Err(CompressError::Scale { .. })));
        p = good;
        // Value 5 is byte 1 of the second value word (after 3 scales): make it 0x80.
        p[4] = (p[4] & !0xff00) | 0x8000;
        assert_eq!(check(int8, &p, len, MAX), Err(CompressError::Int8Range { index: 5 }));

        let topk = Compression::TopK { per_million: 300_000 };
        let good = encode(topk, &vector(len, 2, 1000), None, MAX, 0.0).payload;
        for (at, index) in [(1, good[0]), (0, -1), (2, 10)] {
            let mut p = good.clone();
            p[at] = index;
            assert!(matches!(check(topk, &p, len, MAX), Err(CompressError::Index { .. })), "{p:?}");
        }
        let mut p = good;
        p[4] = MAX + 1;
        assert!(matches!(check(topk, &p, len, MAX), Err(CompressError::Value { at: 1, .. })));
    }
}
