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
//! vectors, which is less for the ratios here up to a few dozen members.
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
    /// L2 norm of the decoded values, in units ([`norm`]).
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
    fn push(&mut self, v: i64) {
        let v = v as f64;
        self.lanes[self.i & 7] += v * v;
        self.i += 1;
    }
    fn get(&self) -> f64 {
        self.lanes.iter().sum::<f64>().sqrt()
    }
}

/// `x / s` rounded half to even, for `s > 0`.
fn div_round(x: i32, s: i32) -> i32 {
    let (q, r) = (x.div_euclid(s), x.rem_euclid(s));
    match (2 * i64::from(r)).cmp(&i64::from(s)) {
        std::cmp::Ordering::Greater => q + 1,
        std::cmp::Ordering::Equal => q + (q & 1),
        std::cmp::Ordering::Less => q,
    }
}

fn int8_at(q: &[i32], j: usize) -> i8 {
    q[j / 4].to_le_bytes()[j % 4] as i8
}

fn set_int8(q: &mut [i32], j: usize, v: i8) {
    let mut b = q[j / 4].to_le_bytes();
    b[j % 4] = v as u8;
    q[j / 4] = i32::from_le_bytes(b);
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
            let (scales, q) = payload.split_at_mut(blocks);
            for (b, xs) in units.chunks(block).enumerate() {
                let m = xs.iter().map(|x| x.unsigned_abs()).max().unwrap_or(0) as i64;
                let s = ((m + i64::from(INT8_MAX) - 1) / i64::from(INT8_MAX)).min(i64::from(max_scale)) as i32;
                scales[b] = s;
                if s > 0 {
                    for (j, &x) in xs.iter().enumerate() {
                        set_int8(q, b * block + j, div_round(x, s).clamp(-INT8_MAX, INT8_MAX) as i8);
                    }
                }
            }
        }
        Compression::TopK { per_million } => {
            let k = Compression::top_k(per_million, len);
            let mut acc: Vec<i32> = match residual {
                Some(r) => units.iter().zip(r).map(|(x, e)| x.saturating_add(*e)).collect(),
                None => units.to_vec(),
            };
            let mut order: Vec<u32> = (0..len as u32).collect();
            if k > 0 && k < len {
                // Largest magnitude first, ties to the lower index: one answer on every peer.
                order.select_nth_unstable_by(k - 1, |&a, &b| {
                    acc[b as usize].unsigned_abs().cmp(&acc[a as usize].unsigned_abs()).then(a.cmp(&b))
                });
            }
            let mut picked = order[..k].to_vec();
            picked.sort_unstable();
            for (at, &i) in picked.iter().enumerate() {
                let v = acc[i as usize].clamp(-max_units, max_units);
                payload[at] = i as i32;
                payload[k + at] = v;
                acc[i as usize] -= v;
            }
            residual_out = Some(acc);
        }
    }
    let mut norm = norm_of(c, &payload, len);
    if max_norm > 0.0 && norm > max_norm {
        shrink(c, &mut payload, len, max_norm / norm, residual_out.as_mut());
        norm = norm_of(c, &payload, len);
    }
    Encoded { payload, norm, residual: residual_out }
}

/// Multiplies every value by `f` (< 1), truncated toward zero; top-k's residual keeps the
/// difference.
fn shrink(c: Compression, payload: &mut [i32], len: usize, f: f64, residual: Option<&mut Vec<i32>>) {
    let cut = |v: i32| (f64::from(v) * f).trunc() as i32;
    match c {
        Compression::None => payload.iter_mut().for_each(|v| *v = cut(*v)),
        Compression::Int8 { block } => {
            let q = &mut payload[len.div_ceil(block as usize)..];
            for j in 0..len {
                let v = cut(i32::from(int8_at(q, j)));
                set_int8(q, j, v as i8);
            }
        }
        Compression::TopK { .. } => {
            let k = payload.len() / 2;
            let residual = residual.expect("top-k keeps a residual");
            for at in 0..k {
                let (i, v) = (payload[at] as usize, payload[k + at]);
                let w = cut(v);
                residual[i] += v - w;
                payload[k + at] = w;
            }
        }
    }
}

/// The decoded norm of a payload the encoder made (unchecked).
fn norm_of(c: Compression, payload: &[i32], len: usize) -> f64 {
    let mut n = Norm::default();
    for_each(c, payload, len, |_, v| n.push(i64::from(v)));
    n.get()
}

/// Calls `f(index, value)` for every decoded value the payload carries, in payload order.
fn for_each(c: Compression, payload: &[i32], len: usize, mut f: impl FnMut(usize, i32)) {
    match c {
        Compression::None => payload.iter().enumerate().for_each(|(i, v)| f(i, *v)),
        Compression::Int8 { block } => {
            let block = block as usize;
            let (scales, q) = payload.split_at(len.div_ceil(block));
            for (j, word) in q.iter().enumerate() {
                for (b, byte) in word.to_le_bytes().into_iter().enumerate() {
                    let i = 4 * j + b;
                    if i < len {
                        f(i, i32::from(byte as i8) * scales[i / block]);
                    }
                }
            }
        }
        Compression::TopK { .. } => {
            let k = payload.len() / 2;
            for at in 0..k {
                f(payload[at] as usize, payload[k + at]);
            }
        }
    }
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
            if let Some(index) = (0..len).find(|&j| int8_at(q, j) == i8::MIN) {
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
    for_each(c, payload, len, |i, v| acc[i] += v);
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
        set_int8(&mut p[3..], 5, i8::MIN);
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
