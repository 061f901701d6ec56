//! Checks computed outside the nodes, from the inputs alone.

/// The hash of the exact sum of every member's demo vector for `round`,
/// computed here in i64, independently of any ring.
pub fn expected_sum_hash(run: &str, round: u64, members: &[String], len: usize) -> String {
    let run = p2p_proto::RunId::from_name(run);
    let fp = p2p_proto::FixedPoint::default();
    let mut sum = vec![0i64; len];
    for m in members {
        let v = fp.encode(&p2p_proto::demo::demo_vector(run, round, m, len)).expect("finite");
        for (s, x) in sum.iter_mut().zip(v) {
            *s += i64::from(x);
        }
    }
    let sum: Vec<i32> = sum.into_iter().map(|s| i32::try_from(s).expect("no overflow")).collect();
    p2p_proto::hash::hex(&p2p_proto::hash::hash_i32s(&sum))
}
