//! Strategies beyond one gradient per round. Local SGD: each member takes several optimizer
//! steps of its own per round and the ring averages the parameter deltas. All peers end every
//! round identical, the loss falls, every delta is audited by recomputation and holds, the
//! ring moves as many bytes per round as with one gradient (so H times fewer per sample), and
//! the chain records every local step's samples. Compression (int8 with per-block scales,
//! top-k with error feedback): peers stay identical, learn, every compressed payload is
//! audited (top-k with the residual its commit names), and each peer sends exactly the
//! compressed payloads. Local SGD also runs over hierarchical rounds.

use serde_json::Value;
use std::collections::BTreeMap;
use std::time::Duration;
use tests::{Anvil, Node, TempDir, deploy, ensure_fashion_mnist, ledger_json};

/// Starts `peers` training peers of the run in `config` (peer `i` with `flags(i)` added), the
/// first one the others' bootstrap, and waits until all trained their rounds and exited.
fn run_peers(name: &str, config: &std::path::Path, peers: usize, flags: impl Fn(usize) -> Vec<String>) -> Vec<Node> {
    let data = ensure_fashion_mnist().to_str().unwrap().to_owned();
    let start = |i: usize, boot: Option<&str>| {
        let mut f: Vec<String> = ["--config", config.to_str().unwrap(), "--dataset", &data].map(String::from).to_vec();
        f.extend(flags(i));
        if let Some(b) = boot {
            f.extend(["--bootstrap".to_owned(), b.to_owned()]);
        }
        let refs: Vec<&str> = f.iter().map(String::as_str).collect();
        Node::start(&format!("{name}-{i}"), &refs)
    };
    let first = start(0, None);
    let boot = first.address();
    let mut nodes = vec![first];
    for i in 1..peers {
        nodes.push(start(i, Some(&boot)));
    }
    for n in nodes.iter_mut() {
        let code = n.wait_exit(Duration::from_secs(300));
        if code != Some(0) {
            n.dump();
        }
        assert_eq!(code, Some(0), "{} trained every round and exited", n.name);
    }
    nodes
}

fn trained(n: &Node) -> BTreeMap<u64, Value> {
    n.events("round trained").into_iter().map(|e| (e["round"].as_u64().unwrap(), e)).collect()
}

/// A local chain with the ledger, and `peers` training peers of the run `it-{name}` with
/// `settings` (TOML lines) recording on it (peer `i` with `flags(i)` added), run to the end.
fn chain_run(
    name: &str,
    settings: &str,
    peers: usize,
    flags: impl Fn(usize) -> Vec<String>,
) -> (Anvil, String, Vec<Node>) {
    let anvil = Anvil::start();
    let contract = deploy(&anvil);
    let dir = TempDir::new(name);
    let config = dir.path().join("run.toml");
    std::fs::write(&config, format!("name = \"it-{name}\"\nmodel = \"mlp\"\nmin_peers = {peers}\n{settings}\n"))
        .unwrap();
    let nodes = run_peers(name, &config, peers, |i| {
        let mut f = anvil.peer_flags(&contract, i + 1);
        f.extend(flags(i));
        f
    });
    (anvil, contract, nodes)
}

/// The chain records for every peer of `nodes` (peer `i` on the chain's account `i + 1`)
/// `rounds` rounds and `samples(i)` samples.
fn chain_counts(anvil: &Anvil, contract: &str, nodes: &[Node], rounds: u64, samples: impl Fn(usize) -> u64) {
    let run_id = nodes[0].events("training run")[0]["run_id"].as_str().unwrap().to_owned();
    for (i, n) in nodes.iter().enumerate() {
        let address = &anvil.accounts[i + 1].address;
        let mine = ledger_json(anvil, contract, &["contributions", "--run", &run_id, "--peer", address]);
        assert_eq!(mine["peers"][0]["rounds"], rounds, "{}: on-chain rounds", n.name);
        assert_eq!(mine["peers"][0]["samples"], samples(i), "{}: on-chain samples", n.name);
    }
}

/// Each peer's `round trained` events, by round, after checking that every peer trained all
/// `rounds` and held the same parameters after each.
fn identical_every_round(nodes: &[Node], rounds: u64) -> Vec<BTreeMap<u64, Value>> {
    let per_node: Vec<BTreeMap<u64, Value>> = nodes.iter().map(trained).collect();
    for (n, t) in nodes.iter().zip(&per_node) {
        assert_eq!(t.len() as u64, rounds, "{} trained every round", n.name);
    }
    for r in 0..rounds {
        for t in &per_node[1..] {
            assert_eq!(t[&r]["param_hash"], per_node[0][&r]["param_hash"], "peers diverged at round {r}");
        }
    }
    per_node
}

#[test]
fn local_sgd_peers_stay_identical_learn_and_the_chain_counts_every_local_step() {
    let (rounds, batch, steps, k, peers) = (8u64, 32u64, 4u64, 4u64, 3usize);
    let settings = format!(
        "batch = {batch}\nrounds = {rounds}\nepoch_rounds = {k}\nlr = 0.003\neval_every = {rounds}\n\
         local_steps = {steps}\nouter_lr = 0.8\nouter_momentum = 0.5"
    );
    let (anvil, contract, nodes) = chain_run("local-sgd", &settings, peers, |_| Vec::new());

    let per_node: Vec<BTreeMap<u64, Value>> = nodes.iter().map(trained).collect();
    let ring_samples = peers as u64 * steps * batch;
    for (n, t) in nodes.iter().zip(&per_node) {
        assert_eq!(t.len() as u64, rounds, "{} trained every round", n.name);
        assert!(t.values().all(|e| e["samples"] == ring_samples), "{}: every round counts H batches per peer", n.name);
    }
    for r in 0..rounds {
        for t in &per_node[1..] {
            assert_eq!(t[&r]["param_hash"], per_node[0][&r]["param_hash"], "peers diverged at round {r}");
        }
    }
    let distinct: std::collections::BTreeSet<String> =
        per_node[0].values().map(|e| e["param_hash"].as_str().unwrap().to_owned()).collect();
    assert_eq!(distinct.len() as u64, rounds, "every round moved the parameters");

    // It learns: with 4 local steps a round, 8 rounds are 32 steps of each peer.
    let loss = |r: u64| per_node.iter().map(|t| t[&r]["loss"].as_f64().unwrap()).sum::<f64>() / peers as f64;
    let (first, last) = (loss(0) + loss(1), loss(rounds - 2) + loss(rounds - 1));
    assert!(last < first * 0.8, "the loss did not fall: {first} -> {last}");
    let acc = nodes[0].events("evaluated");
    assert!(acc.last().unwrap()["accuracy"].as_f64().unwrap() > 0.6, "{acc:?}");

    for n in &nodes {
        // Every delta was recomputed by an auditor and matched its commit bit for bit.
        let done = n.events("round complete");
        assert!(done.iter().all(|e| !e["audited"].as_str().unwrap_or_default().is_empty()), "{}: audited", n.name);
        assert!(n.events_containing("audit failed").is_empty(), "{}", n.name);
        // The ring moves the model once per round, whatever the local steps: 2(N-1)/N of it.
        let params = n.events("training run")[0]["params"].as_u64().unwrap();
        let sent = done.iter().map(|e| e["bytes_sent"].as_u64().unwrap()).max().unwrap();
        let expected = 4 * params * 2 * (peers as u64 - 1) / peers as u64;
        assert!(sent.abs_diff(expected) <= 32, "{}: {sent} bytes a round, expected about {expected}", n.name);
    }

    // The chain: rounds, and the samples of every local step.
    chain_counts(&anvil, &contract, &nodes, rounds, |_| rounds * steps * batch);
}

/// Three peers train with `compression` (extra run settings in `extra`), audited every round,
/// and return their logs.
fn compressed_run(name: &str, extra: &str, rounds: u64) -> Vec<Node> {
    let dir = TempDir::new(name);
    let config = dir.path().join("run.toml");
    std::fs::write(
        &config,
        format!(
            "name = \"it-{name}\"\nmodel = \"mlp\"\nbatch = 32\nrounds = {rounds}\nmin_peers = 3\nlr = 0.003\n\
             eval_every = {rounds}\naudit_every = 1\n{extra}\n"
        ),
    )
    .unwrap();
    run_peers(name, &config, 3, |_| Vec::new())
}

/// What every compressed run must show: identical parameters after every round, a falling
/// loss, every payload audited and holding, and `payload_words` words sent to each of the
/// other two peers per round.
fn check_compressed_run(nodes: &[Node], rounds: u64, payload_words: impl Fn(u64) -> u64) {
    let per_node = identical_every_round(nodes, rounds);
    let loss = |r: u64| per_node.iter().map(|t| t[&r]["loss"].as_f64().unwrap()).sum::<f64>() / 3.0;
    let (first, last) = ((0..3).map(loss).sum::<f64>(), (rounds - 3..rounds).map(loss).sum::<f64>());
    assert!(last < first * 0.8, "the loss did not fall: {first} -> {last}");
    for n in nodes {
        let done = n.events("round complete");
        assert!(done.iter().all(|e| !e["audited"].as_str().unwrap_or_default().is_empty()), "{}: audited", n.name);
        let failed = n.events("round failed");
        assert!(
            failed.iter().all(|e| !e["reason"].as_str().unwrap_or_default().contains("audit")),
            "{}: an audit did not hold: {failed:?}",
            n.name
        );
        let params = n.events("training run")[0]["params"].as_u64().unwrap();
        let want = 2 * 4 * payload_words(params);
        assert!(done.iter().all(|e| e["bytes_sent"] == want), "{}: {want} bytes sent per round", n.name);
        assert!(want < 4 * params * 4 / 3, "less than the uncompressed ring sends");
    }
}

#[test]
fn int8_compressed_peers_stay_identical_and_learn() {
    let rounds = 16;
    let nodes = compressed_run("int8", "compression = \"int8\"", rounds);
    // One 4-byte scale per 256 values, then the values a byte each.
    check_compressed_run(&nodes, rounds, |params| params.div_ceil(256) + params.div_ceil(4));
}

#[test]
fn topk_compressed_peers_stay_identical_and_learn() {
    let rounds = 16;
    let nodes = compressed_run("topk", "compression = \"topk\"\ntopk_fraction = 0.05", rounds);
    // An index and a value per sent value.
    check_compressed_run(&nodes, rounds, |params| 2 * (params * 50_000 / 1_000_000));
    for n in &nodes {
        // Auditors recomputed payloads with the residual each commit names (revealed on request).
        assert!(n.events_containing("not revealed").is_empty(), "{}", n.name);
        // Every member's residual was what its previous round left it.
        let failed = n.events("round failed");
        assert!(failed.iter().all(|e| !e["reason"].as_str().unwrap_or_default().contains("residual")), "{failed:?}");
    }
}

#[test]
fn asynchronous_rounds_go_on_without_a_slow_peer_and_count_its_stale_gradients_exactly() {
    asynchronous_run("async", 1, 3, "");
}

#[test]
fn asynchronous_local_sgd_counts_a_slow_peers_stale_deltas_exactly() {
    asynchronous_run("async-local", 2, 3, "");
}

/// Asynchronous rounds in a hierarchy (two groups of two): the same, and every round that had
/// all four peers ran in groups.
#[test]
fn asynchronous_hierarchical_rounds_count_a_slow_peers_stale_gradients_exactly() {
    asynchronous_run("async-hier", 1, 4, "\ngroup_size = 2");
}

/// Asynchronous rounds with top-k compression: the slow peer's stale gradients are compressed
/// with its residual, its empty commits are the payload of zeros with its residual kept, and
/// every payload is audited exactly, with the residual its commit names.
#[test]
fn asynchronous_topk_compressed_rounds_count_a_slow_peers_stale_gradients_exactly() {
    asynchronous_run("async-topk", 1, 3, "\ncompression = \"topk\"\ntopk_fraction = 0.05");
}

/// `peers` peers train asynchronously (with `local_steps` steps a round, and `extra` in the
/// run's settings), the last one 150 ms slower a round: all stay identical and learn, the
/// ring goes on without the slow peer, its stale and empty commits are audited and hold, and
/// the chain counts exactly the samples every peer's commits carried.
fn asynchronous_run(name: &str, local_steps: u64, peers: usize, extra: &str) {
    let rounds = 12u64;
    let batch = 32 * local_steps;
    let settings = format!(
        "batch = 32\nrounds = {rounds}\nepoch_rounds = 4\nlr = 0.003\neval_every = {rounds}\naudit_every = 1\n\
         async_threshold_ms = 100\nlocal_steps = {local_steps}{extra}"
    );
    // The last peer takes 150 ms longer a round than the others (its gradient job, local steps
    // and all), as a slower device: past the 100 ms threshold, so it is never in time, and by
    // less than the threshold twice, so its work is ready by the next round (stale by one,
    // whatever the machine's speed).
    let slow_flags = |i: usize| match i + 1 == peers {
        true => vec!["--fault-slow-compute-ms".to_owned(), "150".to_owned()],
        false => Vec::new(),
    };
    let (anvil, contract, nodes) = chain_run(name, &settings, peers, slow_flags);
    let slow = &nodes[peers - 1];

    let per_node = identical_every_round(&nodes, rounds);
    // The ring did not wait for the slow peer: it committed nothing in some rounds, and its
    // gradients joined later ones, weighted by their staleness.
    let skipped = slow.events_containing("committing nothing this round");
    let stale: Vec<Value> = slow.events("stale gradient counted");
    assert!(!skipped.is_empty(), "the slow peer never let the ring go on without it");
    assert!(!stale.is_empty(), "none of the slow peer's gradients joined a later round");
    assert!(stale.iter().all(|e| (1..=2).contains(&e["staleness"].as_u64().unwrap())), "{stale:?}");
    let own: Vec<u64> = per_node.iter().map(|t| t.values().map(|e| e["own_samples"].as_u64().unwrap()).sum()).collect();
    for (n, o) in nodes.iter().zip(&own).take(peers - 1) {
        assert_eq!(*o, rounds * batch, "{}: a fast peer contributes every round", n.name);
    }
    assert!(own[peers - 1] < rounds * batch && own[peers - 1] >= stale.len() as u64 * batch, "{own:?}");
    // Every member's commit, stale and empty ones included, was recomputed by an auditor and held.
    // A peer behind the ring (its commit empty or stale) audits nobody, so the ring does not
    // wait for its slow compute (unless its target is the only peer not behind, which nobody
    // else can audit); every other peer audits every round.
    let slow_id = slow.peer_id();
    let mut stale_audited = 0;
    let behind_in = |i: usize, round: u64| {
        per_node[i][&round]["own_samples"] == 0
            || nodes[i].events("stale gradient counted").iter().any(|e| e["round"].as_u64() == Some(round))
    };
    for (i, n) in nodes.iter().enumerate() {
        let done = n.events("round complete");
        for e in &done {
            let round = e["round"].as_u64().unwrap();
            let behind = behind_in(i, round);
            // Unless nobody else can stand in: its target is the only member not behind.
            let alone = (0..peers).filter(|j| !behind_in(*j, round)).count() == 1;
            let audited = !e["audited"].as_str().unwrap_or_default().is_empty();
            assert_eq!(audited, !behind || alone, "{} round {round}: it audits exactly when it is not behind", n.name);
        }
        assert!(n.events_containing("audit failed").is_empty(), "{}", n.name);
        assert!(n.events_containing("audit could not finish").is_empty(), "{}", n.name);
        stale_audited += done
            .iter()
            .filter(|e| e["audited"].as_str() == Some(slow_id.as_str()))
            .filter(|e| stale.iter().any(|s| s["round"] == e["round"]))
            .count();
    }
    assert!(stale_audited > 0, "no stale gradient was audited");
    // And every member's commit was recomputed in every round: a peer behind audits nobody, a
    // stand-in (the next member not behind) audits its target besides its own.
    let mut audited: BTreeMap<u64, std::collections::BTreeSet<String>> = BTreeMap::new();
    for n in &nodes {
        for e in n.events("round complete") {
            let names = [&e["audited"], &e["audited_also"]].map(|v| v.as_str().unwrap_or_default().to_owned());
            let set = audited.entry(e["round"].as_u64().unwrap()).or_default();
            set.extend(names.iter().flat_map(|s| s.split(',')).filter(|s| !s.is_empty()).map(String::from));
        }
    }
    for e in nodes[0].events("round complete") {
        let members: std::collections::BTreeSet<String> =
            e["members"].as_str().unwrap().split(',').map(String::from).collect();
        let round = e["round"].as_u64().unwrap();
        assert_eq!(audited[&round], members, "round {round}: every member's commit audited");
    }
    // It learns: the fast peers' loss falls.
    let loss = |r: u64| per_node[..peers - 1].iter().map(|t| t[&r]["loss"].as_f64().unwrap()).sum::<f64>();
    let (first, last) = (loss(0) + loss(1), loss(rounds - 2) + loss(rounds - 1));
    assert!(last < first * 0.8, "the loss did not fall: {first} -> {last}");

    if extra.contains("compression") {
        for n in &nodes {
            let params = n.events("training run")[0]["params"].as_u64().unwrap();
            let done = n.events("round complete");
            // Each member sends the other two payloads of an index and a value per sent value.
            let want = 2 * 4 * 2 * (params * 50_000 / 1_000_000);
            assert!(done.iter().all(|e| e["bytes_sent"] == want), "{}: {want} bytes sent per round", n.name);
            // Auditors recomputed payloads with the residual each commit names, and every
            // member's residual was what its previous round left it (kept through empty commits).
            assert!(n.events_containing("not revealed").is_empty(), "{}", n.name);
            let failed = n.events("round failed");
            assert!(
                failed.iter().all(|e| !e["reason"].as_str().unwrap_or_default().contains("residual")),
                "{failed:?}"
            );
        }
    }
    if extra.contains("group_size") {
        for n in &nodes {
            let done = n.events("round complete");
            assert!(!done.is_empty() && done.iter().all(|e| e["groups"] == 2), "{}: every round in two groups", n.name);
        }
    }

    // The chain counts every peer's rounds, and exactly the samples its commits carried.
    chain_counts(&anvil, &contract, &nodes, rounds, |i| own[i]);
}

/// Five peers train in hierarchical rounds, groups of two: every round runs in two groups,
/// the fifth peer attached to the first (it sends its chunks to their holders and receives the
/// sum from them); all peers hold the same parameters after every round, the loss falls,
/// every gradient is audited by recomputation and holds, each peer moves what the hierarchy
/// should (its group ring's share, its ring across groups', its attached peer's copies), and
/// the chain records every peer's rounds and samples exactly.
#[test]
fn hierarchical_peers_stay_identical_learn_and_the_chain_counts_every_round() {
    let (rounds, batch, k, peers, g) = (10u64, 32u64, 5u64, 5usize, 2u64);
    let settings = format!(
        "batch = {batch}\nrounds = {rounds}\nepoch_rounds = {k}\nlr = 0.003\neval_every = {rounds}\naudit_every = 1\n\
         group_size = {g}"
    );
    let (anvil, contract, nodes) = chain_run("hier", &settings, peers, |_| Vec::new());
    let per_node = identical_every_round(&nodes, rounds);
    let loss = |r: u64| per_node.iter().map(|t| t[&r]["loss"].as_f64().unwrap()).sum::<f64>() / peers as f64;
    let (first, last) = ((0..3).map(loss).sum::<f64>(), (rounds - 3..rounds).map(loss).sum::<f64>());
    assert!(last < first * 0.8, "the loss did not fall: {first} -> {last}");

    let groups = peers as u64 / g;
    for n in &nodes {
        let done = n.events("round complete");
        assert_eq!(done.len() as u64, rounds, "{}: one complete attempt a round", n.name);
        assert!(done.iter().all(|e| e["groups"] == groups), "{}: every round in {groups} groups", n.name);
        assert!(done.iter().all(|e| !e["audited"].as_str().unwrap_or_default().is_empty()), "{}: audited", n.name);
        assert!(n.events_containing("audit failed").is_empty(), "{}", n.name);
        // In its group ring a peer sends 2(g-1)/g of the vector; across groups, 2(L-1)/L of
        // its 1/g of it; to the attached peer (the fifth, with the first group) its 1/g. The
        // attached peer sends its vector once.
        let params = n.events("training run")[0]["params"].as_u64().unwrap();
        let vector = 4 * params;
        let core = vector * 2 * (g - 1) / g + vector / g * 2 * (groups - 1) / groups;
        for e in &done {
            let expected = match e["position"].as_u64().unwrap() {
                4 => vector,
                p if p < g => core + vector / g,
                _ => core,
            };
            let sent = e["bytes_sent"].as_u64().unwrap();
            assert!(sent.abs_diff(expected) <= 64, "{}: {sent} bytes a round, expected about {expected}", n.name);
        }
    }
    chain_counts(&anvil, &contract, &nodes, rounds, |_| rounds * batch);
}

/// Local SGD over hierarchical rounds (the combination for many peers on slow links): four
/// peers in two groups of two take 4 optimizer steps of their own per round and all-reduce the
/// parameter deltas through the hierarchy; they hold the same parameters after every round,
/// every round runs in 2 groups, the loss falls, every delta is audited by recomputation and
/// holds, and the chain records every local step's samples.
#[test]
fn local_sgd_over_hierarchical_rounds_stays_identical_learns_and_is_counted() {
    let (rounds, batch, steps, k, peers) = (8u64, 32u64, 4u64, 4u64, 4usize);
    let settings = format!(
        "batch = {batch}\nrounds = {rounds}\nepoch_rounds = {k}\nlr = 0.003\neval_every = {rounds}\n\
         local_steps = {steps}\nouter_lr = 0.8\nouter_momentum = 0.5\naudit_every = 1\ngroup_size = 2"
    );
    let (anvil, contract, nodes) = chain_run("local-sgd-hier", &settings, peers, |_| Vec::new());
    let per_node = identical_every_round(&nodes, rounds);
    let ring_samples = peers as u64 * steps * batch;
    for (n, t) in nodes.iter().zip(&per_node) {
        assert!(t.values().all(|e| e["samples"] == ring_samples), "{}: every round counts H batches per peer", n.name);
    }
    let loss = |r: u64| per_node.iter().map(|t| t[&r]["loss"].as_f64().unwrap()).sum::<f64>() / peers as f64;
    let (first, last) = (loss(0) + loss(1), loss(rounds - 2) + loss(rounds - 1));
    assert!(last < first * 0.8, "the loss did not fall: {first} -> {last}");
    for n in &nodes {
        let done = n.events("round complete");
        assert_eq!(done.len() as u64, rounds, "{}: one complete attempt a round", n.name);
        assert!(done.iter().all(|e| e["groups"] == 2), "{}: every round in 2 groups", n.name);
        assert!(done.iter().all(|e| !e["audited"].as_str().unwrap_or_default().is_empty()), "{}: audited", n.name);
        assert!(n.events_containing("audit failed").is_empty(), "{}", n.name);
    }
    chain_counts(&anvil, &contract, &nodes, rounds, |_| rounds * steps * batch);
}
