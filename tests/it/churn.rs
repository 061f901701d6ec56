//! Peers come and go while a run trains: one is killed in the middle of an
//! all-reduce and the others go on without it; it comes back from its data
//! directory, fetches the ring's state and trains with them again; a fifth peer
//! joins the same way; the chain goes down and comes back. Through all of it,
//! every peer that trains a round holds the same parameters after it, and the
//! chain shows exactly the rounds each peer did, none twice, and nothing of the
//! round that the killed peer never finished.

use serde_json::Value;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use tests::{Anvil, Node, TempDir, check_records, deploy, ensure_fashion_mnist, event_time, ledger_json, wait_until};

/// Rounds per on-chain epoch in these tests.
const K: u64 = 4;
const BATCH: u64 = 16;

fn write_config(dir: &TempDir, name: &str, rounds: u64, min_peers: usize) -> String {
    let path = dir.path().join("run.toml");
    let text = format!(
        "name = \"{name}\"\nmodel = \"mlp\"\nbatch = {BATCH}\nrounds = {rounds}\nepoch_rounds = {K}\n\
         min_peers = {min_peers}\nlr = 0.003\neval_every = 0\n"
    );
    std::fs::write(&path, text).unwrap();
    path.to_str().unwrap().to_owned()
}

/// Flags of a training peer recording on chain with dev account `account`. The timeouts are
/// long on purpose: a peer that dies must be noticed by its closed connection or its
/// announcement, not by waiting them out.
fn peer_flags(anvil: &Anvil, contract: &str, account: usize, how: &[&str], bootstrap: Option<&str>) -> Vec<String> {
    let data = ensure_fashion_mnist().to_str().unwrap().to_owned();
    let key = anvil.key_file(account);
    let mut f: Vec<String> = how.iter().map(|s| s.to_string()).collect();
    f.extend(
        [
            "--dataset",
            &data,
            "--rpc-url",
            &anvil.url,
            "--contract",
            contract,
            "--eth-key-file",
            key.to_str().unwrap(),
            "--heartbeat-ms",
            "300",
            "--peer-timeout-ms",
            "20000",
            "--commit-timeout-ms",
            "20000",
            "--step-timeout-ms",
            "20000",
            "--done-timeout-ms",
            "20000",
            "--ledger-flush-timeout-s",
            "120",
        ]
        .map(String::from),
    );
    if let Some(b) = bootstrap {
        f.extend(["--bootstrap".to_owned(), b.to_owned()]);
    }
    f
}

fn start(name: &str, dir: Option<TempDir>, flags: &[String]) -> Node {
    let refs: Vec<&str> = flags.iter().map(String::as_str).collect();
    match dir {
        Some(d) => Node::start_in(name, d, &refs),
        None => Node::start(name, &refs),
    }
}

/// Per round, what a node logged after training it: (parameter hash, commit digest, samples).
type Trained = BTreeMap<u64, (String, String, u64)>;

fn trained(n: &Node) -> Trained {
    n.events("round trained")
        .iter()
        .map(|e| {
            let s = |k: &str| e[k].as_str().unwrap().to_owned();
            (e["round"].as_u64().unwrap(), (s("param_hash"), s("commit"), e["own_samples"].as_u64().unwrap()))
        })
        .collect()
}

fn dump_all(nodes: &[&Node]) {
    nodes.iter().for_each(|n| n.dump());
}

/// Waits until `f` holds, or dumps every log and fails with `what`.
fn expect(nodes: &[&Node], secs: u64, what: &str, mut f: impl FnMut() -> bool) {
    if wait_until(Duration::from_secs(secs), || f().then_some(())).is_none() {
        dump_all(nodes);
        panic!("{what} (waited {secs} s)");
    }
}

/// Every round trained by more than one of `logs` left them with the same parameters.
fn assert_identical(logs: &[(&str, Trained)]) -> usize {
    let mut by_round: BTreeMap<u64, Vec<(&str, &String)>> = BTreeMap::new();
    for (name, t) in logs {
        for (r, (h, _, _)) in t {
            by_round.entry(*r).or_default().push((name, h));
        }
    }
    let mut shared = 0;
    for (r, held) in &by_round {
        assert!(held.iter().all(|(_, h)| *h == held[0].1), "peers hold different parameters after round {r}: {held:?}");
        shared += usize::from(held.len() > 1);
    }
    shared
}

#[test]
fn a_peer_killed_mid_all_reduce_is_survived_resyncs_on_restart_and_a_fifth_joins() {
    let anvil = Anvil::start();
    let contract = deploy(&anvil);
    let dir = TempDir::new("churn");
    let config = write_config(&dir, "it-churn", 1_000_000, 4);
    // The fourth peer freezes in the middle of round 6's all-reduce; the test then kills it.
    const PAUSE: u64 = 6;
    let a = start("churn-a", None, &peer_flags(&anvil, &contract, 1, &["--config", &config], None));
    let boot = a.address();
    let b = start("churn-b", None, &peer_flags(&anvil, &contract, 2, &["--config", &config], Some(&boot)));
    let c = start("churn-c", None, &peer_flags(&anvil, &contract, 3, &["--config", &config], Some(&boot)));
    let mut d_flags = peer_flags(&anvil, &contract, 4, &["--config", &config], Some(&boot));
    d_flags.extend(["--fault-pause-in-round".to_owned(), PAUSE.to_string()]);
    let mut d = start("churn-d", None, &d_flags);
    let d_id = d.peer_id();
    let run_id = wait_until(Duration::from_secs(60), || {
        a.events("training run").first().and_then(|e| e["run_id"].as_str().map(String::from))
    })
    .expect("the first peer logged its run id");

    // 1. The fourth peer stops in the middle of the all-reduce of round 6; it is killed there.
    expect(&[&a, &b, &c, &d], 180, "the fourth peer never reached the middle of round 6", || {
        !d.events("test hook: pausing in the middle of the all-reduce").is_empty()
    });
    d.kill();
    let killed = Instant::now();
    let d_dir = d.take_dir();
    let d_before = trained(&d);
    assert!(!d_before.contains_key(&PAUSE), "the killed peer never finished round {PAUSE}");

    // 2. The three survivors complete that round without it, in a bounded time: they notice
    //    the closed connections at once (all timeouts are 20 s here).
    const RECOVERY: Duration = Duration::from_secs(10);
    let survivors = [&a, &b, &c];
    expect(&survivors, RECOVERY.as_secs(), "the survivors did not complete round 6 without the killed peer", || {
        survivors.iter().all(|n| n.rounds().iter().any(|r| r.round == PAUSE && !r.members.contains(&d_id)))
    });
    let recovery = killed.elapsed();
    eprintln!("survivors completed round {PAUSE} without the killed peer {} ms after the kill", recovery.as_millis());
    assert!(recovery < RECOVERY);
    for n in survivors {
        let r = n.rounds().into_iter().find(|r| r.round == PAUSE).unwrap();
        assert_eq!(r.members.len(), 3, "{}: round {PAUSE} ran with the three survivors", n.name);
        assert!(r.attempt >= 1, "the first attempt, with the killed peer, failed");
    }

    // 3. The killed peer restarts from its data directory: same identity, no new registration;
    //    it resumes from its checkpoint, fetches the ring's state and trains with the others.
    //    A damaged checkpoint newer than its last good one (a disk fault, say) is skipped.
    let run_dir = std::fs::read_dir(d_dir.path().join("checkpoints")).unwrap().next().unwrap().unwrap().path();
    let good: Vec<String> = std::fs::read_dir(&run_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.ends_with(".safetensors"))
        .collect();
    assert_eq!(good, vec!["round-3.safetensors"], "the killed peer saved its checkpoint at the end of epoch 0");
    std::fs::write(run_dir.join("round-5.safetensors"), b"not a checkpoint").unwrap();
    let d2 = start("churn-d2", Some(d_dir), &peer_flags(&anvil, &contract, 4, &["--config", &config], Some(&boot)));
    assert_eq!(d2.peer_id(), d_id, "a restart keeps the peer id");
    let all4 = [&a, &b, &c, &d2];
    expect(&all4, 120, "the restarted peer did not rejoin the ring", || {
        trained(&d2).len() >= 3 && !d2.events("state restored").is_empty()
    });
    let resumed = d2.events("resumed from the local checkpoint");
    assert_eq!(resumed.len(), 1, "it resumed from its own checkpoint first");
    assert_eq!(resumed[0]["round"], 3, "from its last good checkpoint: {}", resumed[0]);
    let skipped = d2.events("cannot load the local checkpoint; trying an older one");
    assert!(skipped.len() == 1 && skipped[0]["path"].as_str().unwrap().ends_with("round-5.safetensors"), "{skipped:?}");
    // Its pending credit for the attempt it was killed in is dropped: the peers it asks (the
    // server and the other live peers) agree the ring certified round 6 with another attempt.
    expect(&all4, 30, "the restarted peer did not settle its pending credit", || {
        d2.events("pending credit dropped: the ring did not certify that attempt with this peer")
            .iter()
            .any(|e| e["round"].as_u64() == Some(PAUSE))
    });
    let settled = &d2.events("pending credits settled by what most peers that answered know")[0];
    assert!(settled["answers"].as_u64().unwrap() >= 2, "the server and other peers answered: {settled}");
    assert_eq!(settled["not_certified"].as_u64(), Some(1), "{settled}");
    assert!(
        d2.events("credit recovered: the ring certified this round while this peer was away").is_empty(),
        "no credit for the killed attempt"
    );

    // 4. A fifth peer joins with only the run id, and catches up the same way.
    let e = start("churn-e", None, &peer_flags(&anvil, &contract, 5, &["--run", &run_id], Some(&boot)));
    let all5 = [&a, &b, &c, &d2, &e];
    expect(&all5, 120, "the fifth peer did not join the ring", || {
        trained(&e).len() >= 3 && a.rounds().iter().any(|r| r.members.len() == 5)
    });
    assert_eq!(e.events("state restored").len(), 1, "the fifth peer fetched the ring's state once");

    // 5. Graceful leave: the fifth peer is asked to stop; it finishes its round, says it
    //    leaves, flushes its outbox and exits 0, and the others go on at once (no timeout).
    let mut e = e;
    let e_id = e.peer_id();
    e.terminate();
    let code = e.wait_exit(Duration::from_secs(150));
    if code != Some(0) {
        e.dump();
    }
    assert_eq!(code, Some(0), "a peer asked to stop exits 0");
    assert_eq!(e.events("ledger outbox flushed").len(), 1, "it flushed its ledger outbox before exiting");
    let e_last = trained(&e).keys().max().copied().unwrap();
    let left = event_time(&e.events("leaving the run")[0]).unwrap();
    expect(&[&a, &b, &c, &d2], 20, "the others did not go on after the fifth peer left", || {
        [&a, &b, &c].iter().all(|n| n.rounds().iter().any(|r| r.round > e_last && !r.members.contains(&e_id)))
    });
    let next = a
        .events("round complete")
        .iter()
        .find(|ev| ev["round"].as_u64().unwrap() > e_last && !ev["members"].as_str().unwrap().contains(&e_id))
        .and_then(event_time)
        .unwrap();
    eprintln!("the others completed a round without the leaver {:.0} ms after it left", (next - left) * 1000.0);
    assert!(next - left < 5.0, "the others waited {:.1} s: they did not notice the leave", next - left);

    // Everyone stops the same way.
    let mut rest = [a, b, c, d2];
    for n in rest.iter_mut() {
        n.terminate();
    }
    for n in rest.iter_mut() {
        let code = n.wait_exit(Duration::from_secs(150));
        if code != Some(0) {
            n.dump();
        }
        assert_eq!(code, Some(0), "{} left cleanly", n.name);
    }
    let [a, b, c, d2] = &rest;

    // Every round any two peers trained left them with the same parameters, across the kill,
    // the restart and the join.
    let mut d_all = d_before.clone();
    d_all.extend(trained(d2));
    let logs = [("a", trained(a)), ("b", trained(b)), ("c", trained(c)), ("d", d_all.clone()), ("e", trained(&e))];
    let shared = assert_identical(&logs);
    assert!(shared > 10, "the peers trained rounds together");
    let d_after: Vec<u64> = trained(d2).keys().copied().collect();
    assert!(d_after[0] > PAUSE, "after its restart the peer trained only rounds the ring had not done");

    // The chain: each peer's records are exactly the rounds it trained, none twice, with the
    // commit roots of its logged commits; the killed peer's unfinished round is not there.
    let accounts = [1, 2, 3, 4, 5];
    for ((name, t), account) in logs.iter().zip(accounts) {
        let address = &anvil.accounts[account].address;
        let mine = ledger_json(&anvil, &contract, &["contributions", "--run", &run_id, "--peer", address]);
        let logged: Vec<(u64, String)> = t.iter().map(|(r, (_, c, _))| (*r, c.clone())).collect();
        let on_chain = check_records(mine["epochs"].as_array().unwrap(), &logged, K)
            .unwrap_or_else(|err| panic!("peer {name}: {err}"));
        assert_eq!(on_chain, t.len() as u64, "peer {name}: on-chain rounds");
        assert_eq!(mine["peers"][0]["rounds"], t.len() as u64, "peer {name}: on-chain total rounds");
        assert_eq!(mine["peers"][0]["samples"], t.len() as u64 * BATCH, "peer {name}: on-chain samples");
    }
    let all = ledger_json(&anvil, &contract, &["contributions", "--run", &run_id]);
    assert_eq!(all["peers"].as_array().unwrap().len(), 5, "five peers registered, the restarted one once");
    // Finalized checkpoints hold the hash the peers held at that round.
    let cps = ledger_json(&anvil, &contract, &["checkpoints", "--run", &run_id]);
    let finalized = cps["checkpoints"].as_array().unwrap();
    assert!(!finalized.is_empty());
    for cp in finalized {
        let r = cp["round"].as_u64().unwrap();
        let held = logs.iter().find_map(|(_, t)| t.get(&r).map(|(h, _, _)| format!("0x{h}")));
        assert_eq!(held.as_deref(), cp["param_hash"].as_str(), "checkpoint of round {r}");
    }
}

#[test]
fn the_chain_going_down_and_up_during_training_loses_and_duplicates_nothing() {
    let state_dir = TempDir::new("anvil-state");
    let state = state_dir.path().join("state.json");
    let mut anvil = Anvil::start_with_state(&state);
    let contract = deploy(&anvil);
    let dir = TempDir::new("chain-outage");
    let rounds = 48;
    let config = write_config(&dir, "it-train-outage", rounds, 3);
    let a = start("outage-train-a", None, &peer_flags(&anvil, &contract, 1, &["--config", &config], None));
    let boot = a.address();
    let b = start("outage-train-b", None, &peer_flags(&anvil, &contract, 2, &["--config", &config], Some(&boot)));
    let c = start("outage-train-c", None, &peer_flags(&anvil, &contract, 3, &["--config", &config], Some(&boot)));
    let nodes = [&a, &b, &c];
    // Some epochs land, then the chain goes down in the middle of training.
    expect(&nodes, 180, "no record landed before the outage", || {
        nodes.iter().all(|n| n.events("recorded on chain").iter().any(|e| e["kind"] == "contribution"))
    });
    anvil.stop();
    let down_at: Vec<u64> = nodes.iter().map(|n| trained(n).len() as u64).collect();
    // Training goes on while the chain is down.
    expect(&nodes, 120, "training stopped with the chain", || {
        nodes.iter().zip(&down_at).all(|(n, at)| trained(n).len() as u64 >= at + 2 * K)
    });
    for n in nodes {
        assert!(
            !n.events("ledger writes wait in the outbox; training goes on").is_empty(),
            "{} saw the outage",
            n.name
        );
    }
    anvil.restart();
    let mut nodes = [a, b, c];
    for n in nodes.iter_mut() {
        let code = n.wait_exit(Duration::from_secs(180));
        if code != Some(0) {
            n.dump();
        }
        assert_eq!(code, Some(0), "{} finished, flushed its outbox and exited", n.name);
    }
    let run_id = nodes[0].events("training run")[0]["run_id"].as_str().unwrap().to_owned();
    let logs: Vec<(&str, Trained)> = nodes.iter().map(|n| (n.name.as_str(), trained(n))).collect();
    assert_identical(&logs);
    for ((name, t), account) in logs.iter().zip([1, 2, 3]) {
        assert_eq!(t.len() as u64, rounds, "{name} trained every round");
        let address = &anvil.accounts[account].address;
        let mine: Value = ledger_json(&anvil, &contract, &["contributions", "--run", &run_id, "--peer", address]);
        let logged: Vec<(u64, String)> = t.iter().map(|(r, (_, c, _))| (*r, c.clone())).collect();
        let on_chain =
            check_records(mine["epochs"].as_array().unwrap(), &logged, K).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(on_chain, rounds, "{name}: every round on chain once");
        assert_eq!(mine["peers"][0]["epochs"], rounds / K, "{name}: one record per epoch");
    }
}
