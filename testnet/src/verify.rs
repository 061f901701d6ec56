//! Checks computed outside the nodes, from the inputs alone.

/// The hash of the exact sum of every member's demo vector for `round`,
/// computed here in i64, independently of any ring, and hashed as a plain ring of
/// `members` certifies it ([`p2p_proto::hash::sum_hash`], one chunk a member).
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
    let chunks = members.len();
    p2p_proto::hash::hex(&p2p_proto::hash::sum_hash(&sum, chunks, p2p_proto::chunk::SEGMENT_ELEMS))
}

/// The commit root of a contribution record over `(round, commit digest hex)` pairs in round
/// order, as the node computes it.
pub fn commit_root(rounds: &[(u64, String)]) -> String {
    let mut h = blake3::Hasher::new();
    h.update(b"dtrain/commit-root/v1");
    for (round, commit) in rounds {
        h.update(&round.to_le_bytes());
        h.update(&hex::decode(commit).expect("a logged commit digest is hex"));
    }
    format!("0x{}", hex::encode(h.finalize().as_bytes()))
}

/// Checks a peer's on-chain contribution records (`contributions --peer --json`'s `epochs`)
/// against the rounds it logged as credited (`(round, commit digest)`), with `k` rounds per
/// epoch: no (epoch, part) twice, every logged round in exactly one record, and each record's
/// rounds and commit root those of its stretch of rounds (an epoch's parts take its rounds in
/// order). Returns the rounds on chain.
pub fn check_records(records: &[serde_json::Value], logged: &[(u64, String)], k: u64) -> Result<u64, String> {
    use std::collections::BTreeMap;
    let mut by_epoch: BTreeMap<u64, Vec<(u64, String)>> = BTreeMap::new();
    for (r, c) in logged {
        by_epoch.entry(r / k).or_default().push((*r, c.clone()));
    }
    for rounds in by_epoch.values_mut() {
        rounds.sort();
        let n = rounds.len();
        rounds.dedup_by_key(|(r, _)| *r);
        if rounds.len() != n {
            return Err("the peer logged a round twice".into());
        }
    }
    let mut parts: BTreeMap<u64, BTreeMap<u64, &serde_json::Value>> = BTreeMap::new();
    for rec in records {
        let (epoch, part) = (rec["epoch"].as_u64().unwrap_or(u64::MAX), rec["part"].as_u64().unwrap_or(u64::MAX));
        if parts.entry(epoch).or_default().insert(part, rec).is_some() {
            return Err(format!("epoch {epoch} part {part} recorded twice"));
        }
    }
    let mut total = 0;
    for (epoch, rounds) in &by_epoch {
        let Some(recs) = parts.remove(epoch) else {
            return Err(format!("epoch {epoch}: {} rounds logged, no record on chain", rounds.len()));
        };
        let mut at = 0usize;
        for (part, rec) in recs {
            let n = rec["rounds"].as_u64().unwrap_or(0) as usize;
            let Some(slice) = rounds.get(at..at + n) else {
                return Err(format!(
                    "epoch {epoch} part {part}: {n} rounds on chain, more than the {} logged",
                    rounds.len()
                ));
            };
            if rec["commit_root"].as_str() != Some(commit_root(slice).as_str()) {
                return Err(format!("epoch {epoch} part {part}: the commit root is not that of rounds {slice:?}"));
            }
            at += n;
        }
        if at != rounds.len() {
            return Err(format!("epoch {epoch}: {at} rounds on chain, {} logged", rounds.len()));
        }
        total += at as u64;
    }
    if let Some((epoch, _)) = parts.into_iter().next() {
        return Err(format!("epoch {epoch} is on chain but the peer logged no round of it"));
    }
    Ok(total)
}
