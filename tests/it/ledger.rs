//! The on-chain ledger against a real Anvil: peers register, record their
//! contributions every K rounds and vote their hashes; checkpoints finalize by
//! quorum; the node's commands read it all back; rejected writes are explained;
//! and a chain outage loses nothing and duplicates nothing.

use std::collections::BTreeMap;
use std::time::Duration;
use tests::{Anvil, Node, Round, TempDir, check_records, deploy, ledger_json, node_command, wait_until};

const K: u64 = 2;

fn chain_flags(anvil: &Anvil, contract: &str, account: usize) -> Vec<String> {
    vec![
        "--rpc-url".into(),
        anvil.url.clone(),
        "--contract".into(),
        contract.into(),
        "--eth-key-file".into(),
        anvil.key_file(account).to_str().unwrap().into(),
        "--epoch-rounds".into(),
        K.to_string(),
    ]
}

fn start(name: &str, run: &str, min_peers: usize, rounds: u64, chain: &[String], bootstrap: Option<&str>) -> Node {
    start_in(name, TempDir::new(name), run, min_peers, rounds, chain, bootstrap)
}

fn start_in(
    name: &str,
    dir: TempDir,
    run: &str,
    min_peers: usize,
    rounds: u64,
    chain: &[String],
    bootstrap: Option<&str>,
) -> Node {
    let mut flags: Vec<String> = [
        "--run",
        run,
        "--min-peers",
        &min_peers.to_string(),
        "--rounds",
        &rounds.to_string(),
        "--demo-vector-len",
        "20000",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    flags.extend(chain.iter().cloned());
    if let Some(b) = bootstrap {
        flags.extend(["--bootstrap".to_owned(), b.to_owned()]);
    }
    let refs: Vec<&str> = flags.iter().map(String::as_str).collect();
    Node::start_in(name, dir, &refs)
}

/// Checks the chain against what each node logged: per peer, the totals and every epoch's
/// record (rounds, samples, commit root) equal the rounds it completed; every epoch's last
/// round is a finalized checkpoint holding the hash all peers logged.
fn assert_ledger_matches(anvil: &Anvil, contract: &str, run: &str, nodes: &[(&Node, usize)], rounds: u64) {
    let all = ledger_json(anvil, contract, &["contributions", "--run", run]);
    assert_eq!(all["peers"].as_array().unwrap().len(), nodes.len(), "registered peers: {all}");
    let mut hashes: BTreeMap<u64, String> = BTreeMap::new();
    for (node, account) in nodes {
        let events = node.events("round complete");
        let done: Vec<Round> = node.rounds();
        assert_eq!(done.len() as u64, rounds, "{} completed every round", node.name);
        for r in &done {
            let prev = hashes.insert(r.round, r.result_hash.clone());
            if prev.as_ref().is_some_and(|p| *p != r.result_hash) {
                nodes.iter().for_each(|(n, _)| n.dump());
            }
            assert!(prev.is_none_or(|p| p == r.result_hash), "peers disagree at round {}", r.round);
        }
        let address = &anvil.accounts[*account].address;
        let mine = ledger_json(anvil, contract, &["contributions", "--run", run, "--peer", address]);
        let totals = &mine["peers"][0];
        assert_eq!(totals["rounds"], rounds, "{}: on-chain rounds equal the rounds it completed", node.name);
        // A demonstration round's contribution counts one sample.
        assert_eq!(totals["samples"], rounds, "{}: on-chain samples", node.name);
        assert_eq!(totals["epochs"], rounds.div_ceil(K), "{}: one record per epoch", node.name);
        assert_eq!(totals["peer_id"], node.peer_id(), "{}: bound to its libp2p peer id", node.name);
        // Every record's rounds and commit root are those the node logged, none twice.
        let logged: Vec<(u64, String)> =
            events.iter().map(|v| (v["round"].as_u64().unwrap(), v["commit"].as_str().unwrap().to_owned())).collect();
        let on_chain = check_records(mine["epochs"].as_array().unwrap(), &logged, K)
            .unwrap_or_else(|e| panic!("{}: {e}", node.name));
        assert_eq!(on_chain, rounds);
    }
    let cps = ledger_json(anvil, contract, &["checkpoints", "--run", run]);
    let finalized: BTreeMap<u64, String> = cps["checkpoints"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| (c["round"].as_u64().unwrap(), c["param_hash"].as_str().unwrap().to_owned()))
        .collect();
    let expected: BTreeMap<u64, String> = hashes
        .iter()
        .filter(|(r, _)| (*r + 1) % K == 0 || **r + 1 == rounds)
        .map(|(r, h)| (*r, format!("0x{h}")))
        .collect();
    assert_eq!(finalized, expected, "finalized checkpoints are exactly the epoch ends, with the peers' hashes");
    assert_eq!(cps["latest"]["round"], rounds - 1);
}

#[test]
fn peers_record_contributions_and_finalize_checkpoints_on_anvil() {
    let anvil = Anvil::start();
    let contract = deploy(&anvil);
    let run = "it-ledger";
    let rounds = 6;
    let a = start("ledger-a", run, 3, rounds, &chain_flags(&anvil, &contract, 1), None);
    let boot = a.address();
    let b = start("ledger-b", run, 3, rounds, &chain_flags(&anvil, &contract, 2), Some(&boot));
    let c = start("ledger-c", run, 3, rounds, &chain_flags(&anvil, &contract, 3), Some(&boot));
    let mut nodes = [a, b, c];
    for n in &mut nodes {
        let code = n.wait_exit(Duration::from_secs(180));
        if code != Some(0) {
            n.dump();
        }
        assert_eq!(code, Some(0), "{} exits cleanly after flushing its outbox", n.name);
        assert_eq!(n.events("ledger outbox flushed").len(), 1, "{} flushed its outbox", n.name);
    }
    let [a, b, c] = &nodes;
    assert_ledger_matches(&anvil, &contract, run, &[(a, 1), (b, 2), (c, 3)], rounds);

    // The run on chain: created once, by one of the peers, with their configuration.
    let info = &ledger_json(&anvil, &contract, &["checkpoints", "--run", run])["run"];
    assert_eq!(info["epoch_rounds"], K);
    assert_eq!(info["peers"], 3);
    let creators: Vec<&str> = (1..=3).map(|i| anvil.accounts[i].address.as_str()).collect();
    assert!(creators.iter().any(|c| c.eq_ignore_ascii_case(info["creator"].as_str().unwrap())), "{info}");

    // Writes the contract refuses come back as readable messages, with nothing recorded.
    let submit = |account: usize, what: &[&str]| {
        let key = anvil.key_file(account);
        let mut args = vec!["submit"];
        args.extend_from_slice(what);
        args.extend(["--run", run, "--rpc-url", &anvil.url, "--contract", &contract]);
        args.extend(["--eth-key-file", key.to_str().unwrap()]);
        let out = node_command(&args);
        (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let root = format!("0x{}", "11".repeat(32));
    let contribution = ["contribution", "--epoch", "0", "--rounds", "1", "--samples", "5", "--commit-root", &root];
    let (ok, err) = submit(9, &contribution);
    assert!(!ok, "an unregistered address cannot record");
    assert!(err.contains("NotRegistered") && err.contains("is not a registered peer"), "{err}");
    let (ok, err) = submit(1, &contribution);
    assert!(!ok, "a second record for an epoch is refused");
    assert!(
        err.contains("ContributionExists") && err.contains("already recorded its contribution for epoch 0"),
        "{err}"
    );
    let (ok, err) = submit(2, &["vote", "--round", "1", "--param-hash", &root]);
    assert!(!ok, "a second vote for a round is refused");
    assert!(err.contains("AlreadyVoted") && err.contains("one vote per peer and round"), "{err}");
    assert!(!err.contains(&anvil.accounts[2].key[2..]), "the key never appears in output");
    // Nothing changed.
    assert_ledger_matches(&anvil, &contract, run, &[(a, 1), (b, 2), (c, 3)], rounds);
}

#[test]
fn a_chain_outage_loses_no_record_and_duplicates_none() {
    let state_dir = TempDir::new("anvil-state");
    let state = state_dir.path().join("state.json");
    let mut anvil = Anvil::start_with_state(&state);
    let contract = deploy(&anvil);
    let run = "it-ledger-outage";
    let rounds = 8;
    // Three peers register while the chain is up, but wait for a fourth before round 0.
    let a = start("outage-a", run, 4, rounds, &chain_flags(&anvil, &contract, 1), None);
    let boot = a.address();
    let b = start("outage-b", run, 4, rounds, &chain_flags(&anvil, &contract, 2), Some(&boot));
    let c = start("outage-c", run, 4, rounds, &chain_flags(&anvil, &contract, 3), Some(&boot));
    let registered = wait_until(Duration::from_secs(60), || {
        let v = ledger_json(&anvil, &contract, &["contributions", "--run", run]);
        (v["peers"].as_array().map_or(0, Vec::len) == 3).then_some(())
    });
    assert!(registered.is_some(), "three peers registered");

    // The chain goes down; the fourth peer arrives and all four train through the outage.
    anvil.stop();
    let d = start("outage-d", run, 4, rounds, &chain_flags(&anvil, &contract, 4), Some(&boot));
    let mut nodes = [a, b, c, d];
    for n in &nodes {
        let done = wait_until(Duration::from_secs(120), || (!n.events("all rounds done").is_empty()).then_some(()));
        if done.is_none() {
            n.dump();
        }
        assert!(done.is_some(), "{} trained every round while the chain was down", n.name);
    }
    for n in &mut nodes {
        assert!(n.is_running(), "{} waits for its outbox instead of exiting", n.name);
        assert!(
            !n.events("ledger writes wait in the outbox; training goes on").is_empty(),
            "{} noticed the outage",
            n.name
        );
        assert!(n.events("ledger outbox flushed").is_empty(), "{} cannot have flushed yet", n.name);
    }

    // The chain comes back with its state: every waiting record lands, once.
    anvil.restart();
    for n in &mut nodes {
        let code = n.wait_exit(Duration::from_secs(120));
        if code != Some(0) {
            n.dump();
        }
        assert_eq!(code, Some(0), "{} flushed its outbox and exited", n.name);
        assert!(!n.events("chain reachable again").is_empty(), "{} saw the chain return", n.name);
    }
    let [a, b, c, d] = &nodes;
    assert_ledger_matches(&anvil, &contract, run, &[(a, 1), (b, 2), (c, 3), (d, 4)], rounds);
}

#[test]
fn records_left_in_the_outbox_are_sent_when_the_node_restarts() {
    let state_dir = TempDir::new("anvil-state");
    let state = state_dir.path().join("state.json");
    let mut anvil = Anvil::start_with_state(&state);
    let contract = deploy(&anvil);
    // The chain is down for the whole run; the peers give up waiting for it after 2 s.
    anvil.stop();
    let run = "it-ledger-restart";
    let rounds = 4;
    let chain = |i| {
        let mut f = chain_flags(&anvil, &contract, i);
        f.extend(["--ledger-flush-timeout-s".to_owned(), "2".to_owned()]);
        f
    };
    // The chain comes back on the same URL, so the flags hold for the restart too.
    let (flags_a, flags_b) = (chain(1), chain(2));
    let mut a = start("restart-a", run, 2, rounds, &flags_a, None);
    let boot = a.address();
    let mut b = start("restart-b", run, 2, rounds, &flags_b, Some(&boot));
    for n in [&mut a, &mut b] {
        let code = n.wait_exit(Duration::from_secs(120));
        if code != Some(0) {
            n.dump();
        }
        assert_eq!(code, Some(0), "{} trained and exited", n.name);
        assert_eq!(n.rounds().len() as u64, rounds);
        let left = n.events_containing("ledger records still wait in the outbox");
        assert_eq!(left.len(), 1, "{} kept its records for later", n.name);
    }

    // The chain is back; each peer restarts from its data directory. A third peer is
    // required before any round, so the restarted peers only send what their outbox holds.
    anvil.restart();
    let a_again = start_in("restart-a2", a.take_dir(), run, 3, rounds, &flags_a, None);
    let boot = a_again.address();
    let b_again = start_in("restart-b2", b.take_dir(), run, 3, rounds, &flags_b, Some(&boot));
    let landed = wait_until(Duration::from_secs(60), || {
        let v = ledger_json(&anvil, &contract, &["checkpoints", "--run", run]);
        let epochs: u64 = [1, 2]
            .iter()
            .map(|i| {
                let p = ledger_json(
                    &anvil,
                    &contract,
                    &["contributions", "--run", run, "--peer", &anvil.accounts[*i].address],
                );
                p["peers"][0]["epochs"].as_u64().unwrap_or(0)
            })
            .sum();
        (v["checkpoints"].as_array().map_or(0, Vec::len) == 2 && epochs == 4).then_some(())
    });
    if landed.is_none() {
        a_again.dump();
        b_again.dump();
    }
    assert!(landed.is_some(), "the restarted peers sent what their outboxes held");
    for n in [&a_again, &b_again] {
        assert!(n.rounds().is_empty(), "{} ran no round after the restart", n.name);
        assert!(!n.events("recorded on chain").is_empty(), "{} sent its records after the restart", n.name);
    }
    // The chain shows exactly the work of the first run, once.
    assert_ledger_matches(&anvil, &contract, run, &[(&a, 1), (&b, 2)], rounds);
}
