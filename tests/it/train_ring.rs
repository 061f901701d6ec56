//! Distributed training end to end: peers train a real model on real
//! Fashion-MNIST through the verified ring, hold identical parameters after
//! every round, and the chain records exactly their work and their hashes; and
//! a ring of N peers with batch B trains like one peer with batch N·B.

use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;
use tests::{Anvil, Node, TempDir, deploy, ensure_fashion_mnist, ledger_json, run_node};

fn write_config(dir: &TempDir, text: &str) -> String {
    let path = dir.path().join("run.toml");
    std::fs::write(&path, text).unwrap();
    path.to_str().unwrap().to_owned()
}

/// Starts a training peer with the run's configuration file, or (`config` = `0x<run id>`)
/// with only the run id, fetching the configuration from its bootstrap peer.
fn start_peer(name: &str, config: &str, extra: &[String], bootstrap: Option<&str>) -> Node {
    let data = ensure_fashion_mnist().to_str().unwrap().to_owned();
    let how = if config.starts_with("0x") { "--run" } else { "--config" };
    let mut flags = vec![how.to_owned(), config.to_owned(), "--dataset".to_owned(), data];
    flags.extend(extra.iter().cloned());
    if let Some(b) = bootstrap {
        flags.extend(["--bootstrap".to_owned(), b.to_owned()]);
    }
    let refs: Vec<&str> = flags.iter().map(String::as_str).collect();
    Node::start(name, &refs)
}

fn wait_all(nodes: &mut [Node], secs: u64) {
    for n in nodes.iter_mut() {
        let code = n.wait_exit(Duration::from_secs(secs));
        if code != Some(0) {
            n.dump();
        }
        assert_eq!(code, Some(0), "{} finished its rounds and exited", n.name);
    }
}

/// Per round, the parameter hash a node logged after applying it.
fn trained(n: &Node) -> BTreeMap<u64, Value> {
    n.events("round trained").into_iter().map(|e| (e["round"].as_u64().unwrap(), e)).collect()
}

#[test]
fn three_peers_with_different_batches_train_identically_and_the_chain_records_their_work() {
    let anvil = Anvil::start();
    let contract = deploy(&anvil);
    let dir = TempDir::new("train-ring");
    let (rounds, batch, k) = (12u64, 32u64, 4u64);
    // Each round trains on the three batches together.
    let ring_samples = 16 + 32 + 48;
    let config = write_config(
        &dir,
        &format!(
            "name = \"it-train\"\nmodel = \"mlp\"\nbatch = {batch}\nrounds = {rounds}\nepoch_rounds = {k}\n\
             min_peers = 3\nlr = 0.003\neval_every = {rounds}\n"
        ),
    );
    // Heterogeneous peers: each contributes its own batch; the average weighs them by it.
    let batches = [16u64, 32, 48];
    let chain = |i: usize| -> Vec<String> {
        let key = anvil.key_file(i);
        let b = batches[i - 1].to_string();
        ["--rpc-url", &anvil.url, "--contract", &contract, "--eth-key-file", key.to_str().unwrap(), "--batch", &b]
            .map(String::from)
            .to_vec()
    };
    let a = start_peer("train-a", &config, &chain(1), None);
    let boot = a.address();
    let b = start_peer("train-b", &config, &chain(2), Some(&boot));
    // The third peer knows only the run id: it fetches the configuration from its bootstrap
    // peer and checks that it hashes to that id.
    let run_id = tests::wait_until(Duration::from_secs(60), || {
        a.events("training run").first().and_then(|e| e["run_id"].as_str().map(String::from))
    })
    .expect("the first peer logged its run id");
    let c = start_peer("train-c", &run_id, &chain(3), Some(&boot));
    let mut nodes = [a, b, c];
    wait_all(&mut nodes, 300);

    // Every round, every peer holds the same parameters.
    let per_node: Vec<BTreeMap<u64, Value>> = nodes.iter().map(trained).collect();
    for (n, t) in nodes.iter().zip(&per_node) {
        assert_eq!(t.len() as u64, rounds, "{} trained every round", n.name);
    }
    let hash = |r: u64| per_node[0][&r]["param_hash"].as_str().unwrap().to_owned();
    for r in 0..rounds {
        for t in &per_node[1..] {
            assert_eq!(t[&r]["param_hash"], per_node[0][&r]["param_hash"], "peers diverged at round {r}");
        }
    }
    for t in &per_node {
        assert!(t.values().all(|e| e["samples"] == ring_samples), "every round used every peer's batch");
    }
    // It learns: the loss falls and the test accuracy is far above chance.
    let loss = |r: u64| per_node.iter().map(|t| t[&r]["loss"].as_f64().unwrap()).sum::<f64>() / 3.0;
    let (first, last) = ((0..3).map(loss).sum::<f64>(), (rounds - 3..rounds).map(loss).sum::<f64>());
    assert!(last < first * 0.9, "the loss did not fall: {first} -> {last}");
    let acc = nodes[0].events("evaluated");
    assert!(acc.last().unwrap()["accuracy"].as_f64().unwrap() > 0.4, "{acc:?}");

    // The chain: each peer's totals are the rounds and samples it trained on; the finalized
    // checkpoints are the epoch ends, with the parameter hash every peer held.
    assert_eq!(nodes[2].events("configuration received; it hashes to the run id").len(), 1);
    for (i, n) in nodes.iter().enumerate() {
        let address = &anvil.accounts[i + 1].address;
        let mine = ledger_json(&anvil, &contract, &["contributions", "--run", &run_id, "--peer", address]);
        let done = per_node[i].len() as u64;
        assert_eq!(mine["peers"][0]["rounds"], done, "{}: on-chain rounds", n.name);
        assert_eq!(mine["peers"][0]["samples"], done * batches[i], "{}: on-chain samples", n.name);
        assert_eq!(mine["peers"][0]["epochs"], rounds / k, "{}: one record per epoch", n.name);
    }
    let cps = ledger_json(&anvil, &contract, &["checkpoints", "--run", &run_id]);
    let finalized: Vec<(u64, String)> = cps["checkpoints"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| (c["round"].as_u64().unwrap(), c["param_hash"].as_str().unwrap().to_owned()))
        .collect();
    let expected: Vec<(u64, String)> =
        (0..rounds).filter(|r| (r + 1) % k == 0).map(|r| (r, format!("0x{}", hash(r)))).collect();
    assert_eq!(finalized, expected, "finalized checkpoints hold the peers' parameter hashes");
    // Each peer saved a local checkpoint at every finalized round, with that hash.
    for n in &nodes {
        let saved: BTreeMap<u64, String> = n
            .events("checkpoint saved")
            .iter()
            .map(|e| (e["round"].as_u64().unwrap(), format!("0x{}", e["param_hash"].as_str().unwrap())))
            .collect();
        for (r, h) in &expected {
            assert_eq!(saved.get(r), Some(h), "{} saved the checkpoint of round {r}", n.name);
        }
    }
}

fn load_params(path: &Path) -> BTreeMap<String, Vec<f32>> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .filter(|(name, _)| name.starts_with("model."))
        .map(|(name, t)| {
            let v = t.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
            (name, v)
        })
        .collect()
}

/// Two peers with batches 8 and 24 train like one peer with batch 32 on the same samples in
/// the same order. Not bit for bit: each peer's share of the mean is rounded to the fixed-point grid
/// (q = 2^-20) before the exact integer sum, and floats sum batches of 8, 24 and 32 in other
/// orders. With SGD the difference stays at that scale; the bound below is
/// steps × peak lr × 1/(1 − momentum) × N × q.
#[test]
fn a_ring_of_two_with_batches_8_and_24_trains_like_one_peer_with_batch_32() {
    let dir = TempDir::new("equivalence");
    let (rounds, lr) = (10u64, 0.05f64);
    let config = write_config(
        &dir,
        &format!(
            "name = \"it-equivalence\"\nmodel = \"mlp\"\nbatch = 16\nrounds = {rounds}\nepoch_rounds = {rounds}\n\
             min_peers = 2\noptimizer = \"sgd\"\nlr = {lr}\n"
        ),
    );
    // Batches of 8 and 24: the same 32 samples per round as one peer with 32, weighted 1/4
    // and 3/4 (equal batches would not show a wrong weighting).
    let a = start_peer("eq-a", &config, &["--batch".to_owned(), "8".to_owned()], None);
    let boot = a.address();
    let b = start_peer("eq-b", &config, &["--batch".to_owned(), "24".to_owned()], Some(&boot));
    let mut nodes = [a, b];
    wait_all(&mut nodes, 300);
    let ring_path = nodes[0]
        .events("checkpoint saved")
        .iter()
        .find(|e| e["round"] == rounds - 1)
        .map(|e| e["path"].as_str().unwrap().to_owned())
        .expect("the last round's checkpoint");
    let ring = load_params(Path::new(&ring_path));

    let single_path = dir.path().join("single.safetensors");
    let data = ensure_fashion_mnist().to_str().unwrap().to_owned();
    let (code, _) = run_node(&[
        "train",
        "--dataset",
        &data,
        "--model",
        "mlp",
        "--batch",
        "32",
        "--epochs",
        "1",
        "--max-steps",
        &rounds.to_string(),
        "--optimizer",
        "sgd",
        "--lr",
        &lr.to_string(),
        "--checkpoint",
        single_path.to_str().unwrap(),
    ]);
    assert_eq!(code, Some(0));
    let single = load_params(&single_path);
    assert_eq!(ring.keys().collect::<Vec<_>>(), single.keys().collect::<Vec<_>>());

    let q = 2f64.powi(-20);
    let bound = rounds as f64 * lr * 10.0 * 2.0 * q;
    let mut max_diff = 0f64;
    for (name, r) in &ring {
        for (x, y) in r.iter().zip(&single[name]) {
            max_diff = max_diff.max(f64::from((x - y).abs()));
        }
    }
    assert!(max_diff <= bound, "ring and single-peer parameters differ by {max_diff}, more than the bound {bound}");
    // Both moved away from the shared initial parameters, by far more than they differ: the
    // comparison is not vacuous.
    let initial = nodes[0].events("training run")[0]["param_hash"].as_str().unwrap().to_owned();
    assert_ne!(initial, nodes[0].events("round trained").last().unwrap()["param_hash"].as_str().unwrap());
    let spread = ring.values().chain(single.values()).flatten().map(|v| f64::from(v.abs())).fold(0.0, f64::max);
    assert!(spread > 1000.0 * bound, "parameters are too small for the comparison to mean anything");
    eprintln!("ring vs single peer: max |Δ| = {max_diff:e} (bound {bound:e})");
}
