//! The demonstration workload used until a model supplies gradients: a
//! deterministic pseudo-random vector per (run, round, peer), so anyone can
//! recompute what every peer contributed and check the sum.

use crate::message::RunId;

/// Values in `[-1, 1)` drawn from blake3's extendable output keyed by
/// `(run, round, peer)`.
pub fn demo_vector(run: RunId, round: u64, peer: &str, len: usize) -> Vec<f32> {
    let mut h = blake3::Hasher::new();
    h.update(b"dtrain/demo-vector/v1");
    h.update(&run.0);
    h.update(&round.to_le_bytes());
    h.update(peer.as_bytes());
    let mut xof = h.finalize_xof();
    let mut out = Vec::with_capacity(len);
    let mut buf = [0u8; 4096];
    while out.len() < len {
        xof.fill(&mut buf);
        let take = ((len - out.len()) * 4).min(buf.len());
        out.extend(buf[..take].chunks_exact(4).map(|b| {
            // 24 random bits -> [-1, 1), exactly representable in f32.
            let u = u32::from_le_bytes([b[0], b[1], b[2], b[3]]) >> 8;
            (u as f32 / (1u32 << 23) as f32) - 1.0
        }));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_and_distinct() {
        let run = RunId::from_name("demo");
        let a = demo_vector(run, 1, "p", 5000);
        assert_eq!(a, demo_vector(run, 1, "p", 5000));
        assert_ne!(a, demo_vector(run, 2, "p", 5000));
        assert_ne!(a, demo_vector(run, 1, "q", 5000));
        assert_eq!(&demo_vector(run, 1, "p", 10)[..], &a[..10]);
        assert!(a.iter().all(|v| (-1.0..1.0).contains(v)));
    }
}
