//! `testnet train` (the README's first command): a local Anvil with the ledger
//! contract, N peers on loopback that train a real model on real Fashion-MNIST
//! through the verified ring, then the final test accuracy, each peer's
//! on-chain totals, the finalized checkpoints, and the same read with `cast`.

use crate::chain::{self, Anvil};
use crate::cluster::report_chain;
use crate::process::{Node, TempDir, ensure_fashion_mnist};
use anyhow::bail;
use serde_json::Value;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// What the training testnet runs.
#[derive(Debug, Clone)]
pub struct TrainOpts {
    pub nodes: usize,
    pub rounds: u64,
    /// Samples per peer per round.
    pub batch: usize,
    pub model: String,
    pub lr: f64,
    /// K: rounds per on-chain epoch.
    pub epoch_rounds: u64,
    pub eval_every: u64,
    /// One round in this many is audited (0: none).
    pub audit_every: u64,
    /// Record on a local Anvil chain.
    pub chain: bool,
    /// Where the run's report (JSON and Markdown) goes.
    pub report_dir: std::path::PathBuf,
    /// Local SGD: optimizer steps per peer per round (1: one gradient per round).
    pub local_steps: u64,
    /// Outer learning rate and momentum of local SGD (the run's defaults when absent).
    pub outer_lr: Option<f64>,
    pub outer_momentum: Option<f32>,
    /// Gradient compression: int8 or topk (none when absent).
    pub compression: Option<String>,
    /// top-k's share of values sent per round (the run's default when absent).
    pub topk_fraction: Option<f64>,
    /// Asynchronous rounds: how long the ring waits for a slow peer's gradient once every
    /// other peer committed (synchronous when absent).
    pub async_threshold_ms: Option<u64>,
    /// Asynchronous rounds: how many rounds late a gradient may join (the run's default when
    /// absent).
    pub max_staleness: Option<u64>,
    /// Make the last peer this many milliseconds slower per gradient, as a slower device
    /// (needs the node's test hooks: a build with the `fault-injection` feature).
    pub slow_peer_ms: Option<u64>,
    /// Hierarchical rounds' group size (one ring when absent).
    pub group_size: Option<usize>,
}

/// What a node logs once its HTTP endpoint is up.
pub const HTTP_LISTENING: &str = "http endpoint listening: /metrics, /status, / (dashboard)";

fn trained(n: &Node) -> BTreeMap<u64, Value> {
    n.events("round trained").into_iter().map(|e| (e["round"].as_u64().unwrap_or(u64::MAX), e)).collect()
}

pub fn run(o: &TrainOpts) -> anyhow::Result<()> {
    if o.nodes == 0 || o.rounds == 0 || o.batch == 0 || o.epoch_rounds == 0 {
        bail!("--nodes, --rounds, --batch and --epoch-rounds must be at least 1");
    }
    let data = ensure_fashion_mnist().to_str().expect("utf-8 path").to_owned();
    let ledger = if o.chain {
        let anvil = Anvil::start();
        let contract = chain::deploy(&anvil);
        let accounts = anvil.fund_peers(o.nodes);
        println!(
            "anvil   {}  ledger contract {contract}; {} peer accounts funded with 100 ETH each",
            anvil.url, o.nodes
        );
        Some((anvil, contract, accounts))
    } else {
        None
    };
    let dir = TempDir::new("testnet-train");
    let config = dir.path().join("run.toml");
    let config_text = format!(
        "name = \"testnet\"\nmodel = \"{}\"\nbatch = {}\nrounds = {}\nepoch_rounds = {}\nmin_peers = {}\n\
         lr = {}\neval_every = {}\naudit_every = {}\n",
        o.model, o.batch, o.rounds, o.epoch_rounds, o.nodes, o.lr, o.eval_every, o.audit_every
    );
    let mut config_text = config_text;
    if o.local_steps > 1 {
        config_text += &format!("local_steps = {}\n", o.local_steps);
        if let Some(lr) = o.outer_lr {
            config_text += &format!("outer_lr = {lr}\n");
        }
        if let Some(m) = o.outer_momentum {
            config_text += &format!("outer_momentum = {m}\n");
        }
    }
    if let Some(c) = &o.compression {
        config_text += &format!("compression = \"{c}\"\n");
    }
    if let Some(f) = o.topk_fraction {
        config_text += &format!("topk_fraction = {f}\n");
    }
    if let Some(t) = o.async_threshold_ms {
        config_text += &format!("async_threshold_ms = {t}\n");
    }
    if let Some(s) = o.max_staleness {
        config_text += &format!("max_staleness = {s}\n");
    }
    if let Some(g) = o.group_size {
        config_text += &format!("group_size = {g}\n");
    }
    if o.slow_peer_ms.is_some() && !cfg!(feature = "fault-injection") {
        bail!("--slow-peer-ms needs the node's test hooks: build testnet with --features fault-injection");
    }
    std::fs::write(&config, &config_text)?;
    println!(
        "starting {} peers on 127.0.0.1: {} on Fashion-MNIST, {} rounds of {} samples per peer, K = {}",
        o.nodes, o.model, o.rounds, o.batch, o.epoch_rounds
    );
    let start = |i: usize, boot: Option<&str>| {
        let mut f: Vec<String> =
            ["--config", config.to_str().expect("utf-8 path"), "--dataset", &data].map(String::from).to_vec();
        if let Some((anvil, contract, accounts)) = &ledger {
            let key = anvil.write_key(&format!("peer-{i}.key"), &accounts[i]);
            f.extend(
                ["--rpc-url", &anvil.url, "--contract", contract, "--eth-key-file", key.to_str().expect("utf-8 path")]
                    .map(String::from),
            );
        }
        if let Some(b) = boot {
            f.extend(["--bootstrap".to_owned(), b.to_owned()]);
        }
        if let Some(ms) = o.slow_peer_ms.filter(|_| i + 1 == o.nodes) {
            f.extend(["--fault-slow-compute-ms".to_owned(), ms.to_string()]);
        }
        // Every peer serves its metrics and dashboard on a free loopback port.
        f.extend(["--http".to_owned(), "127.0.0.1:0".to_owned()]);
        let refs: Vec<&str> = f.iter().map(String::as_str).collect();
        Node::start(&format!("peer-{i}"), &refs)
    };
    let first = start(0, None);
    let boot = first.address();
    println!("peer-0  {boot}  (bootstrap)");
    let mut nodes = vec![first];
    for i in 1..o.nodes {
        let n = start(i, Some(&boot));
        println!("peer-{i}  {}", n.address());
        nodes.push(n);
    }
    let run_id = crate::process::wait_until(Duration::from_secs(120), || {
        nodes[0].events("training run").first().and_then(|e| e["run_id"].as_str().map(String::from))
    })
    .ok_or_else(|| anyhow::anyhow!("peer-0 did not start training"))?;
    println!("run {run_id}");
    if let Some(addr) = crate::process::wait_until(Duration::from_secs(30), || {
        nodes[0].events(HTTP_LISTENING).first().and_then(|e| e["addr"].as_str().map(String::from))
    }) {
        println!("dashboard http://{addr}/  (and /metrics, /status; or: node status --http {addr})");
    }
    println!();
    println!(
        "{:>6}  {:>4}  {:>8}  {:<18} {:>6} {:>10} {:>9}",
        "round", "ring", "loss", "parameter hash", "agree", "samples/s", "MiB/peer"
    );

    let every = (o.rounds / 20).max(1);
    let mut printed = 0u64;
    let mut evals_shown = 0usize;
    let mut agree_all = true;
    // The clock starts once the first peer has loaded the data and built its model.
    let began = Instant::now();
    let deadline = began + Duration::from_secs(300 + 10 * o.rounds);
    loop {
        let per: Vec<BTreeMap<u64, Value>> = nodes.iter().map(trained).collect();
        while printed < o.rounds && per.iter().all(|t| t.contains_key(&printed)) {
            let r = printed;
            let hashes: Vec<&str> = per.iter().map(|t| t[&r]["param_hash"].as_str().unwrap_or("")).collect();
            let agree = hashes.iter().all(|h| *h == hashes[0]);
            agree_all &= agree;
            if r.is_multiple_of(every) || r + 1 == o.rounds || !agree {
                let loss =
                    per.iter().map(|t| t[&r]["loss"].as_f64().unwrap_or(f64::NAN)).sum::<f64>() / per.len() as f64;
                let e = &per[0][&r];
                println!(
                    "{:>6}  {:>4}  {:>8.4}  {:<18} {:>6} {:>10.0} {:>9.2}",
                    r,
                    e["ring_size"],
                    loss,
                    format!("{}…", &hashes[0][..hashes[0].len().min(16)]),
                    if agree { "yes" } else { "NO" },
                    e["samples_per_s"].as_f64().unwrap_or(0.0),
                    e["bytes_sent"].as_f64().unwrap_or(0.0) / f64::from(1 << 20)
                );
            }
            printed += 1;
        }
        let evals = nodes[0].events("evaluated");
        for e in &evals[evals_shown..] {
            println!(
                "        test accuracy after round {}: {:.2}%  at {:.1} s",
                e["round"],
                100.0 * e["accuracy"].as_f64().unwrap_or(0.0),
                began.elapsed().as_secs_f64()
            );
        }
        evals_shown = evals.len();
        if !crate::process::any_running(&mut nodes) {
            break;
        }
        if crate::process::interrupted() {
            bail!("interrupted");
        }
        if Instant::now() > deadline {
            bail!("the run did not finish in time; {printed} of {} rounds trained", o.rounds);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let codes: Vec<Option<i32>> = nodes.iter_mut().map(|n| n.wait_exit(Duration::from_secs(90))).collect();
    if printed < o.rounds || codes.iter().any(|c| *c != Some(0)) {
        nodes.iter().for_each(Node::dump);
        bail!("not every peer trained every round (exit codes {codes:?})");
    }
    if !agree_all {
        bail!("the peers' parameters diverged");
    }
    let accuracy = nodes[0].events("evaluated").last().and_then(|e| e["accuracy"].as_f64()).unwrap_or(0.0);
    // The samples every peer's commits carried (in an asynchronous run a slow peer's gradients
    // join later rounds, or none).
    let own: Vec<u64> =
        nodes.iter().map(|n| trained(n).values().map(|e| e["own_samples"].as_u64().unwrap_or(0)).sum()).collect();
    let samples: u64 = own.iter().sum();
    if o.async_threshold_ms.is_some() {
        for (n, s) in nodes.iter().zip(&own) {
            let late = n.events("stale gradient counted").len();
            let empty = n.events_containing("committing nothing this round").len();
            if late + empty > 0 {
                println!(
                    "{}: {s} samples; {late} gradients joined a later round, {empty} commits carried none",
                    n.name
                );
            }
        }
    }
    println!(
        "\nall {} peers held the same parameters after every one of {} rounds; final test accuracy {:.2}% \
         ({samples} samples in {:.1} s)",
        o.nodes,
        o.rounds,
        100.0 * accuracy,
        began.elapsed().as_secs_f64()
    );
    let mut report = crate::report::skeleton(&run_id, &config_text);
    report["rounds"] = o.rounds.into();
    report["seconds"] = began.elapsed().as_secs_f64().into();
    fill_report(&mut report, &nodes, &codes, every);
    let checked = match &ledger {
        Some((anvil, contract, accounts)) => {
            let done: Vec<u64> = nodes.iter().map(|n| trained(n).len() as u64).collect();
            // Every round's samples, or in an asynchronous run those each peer's commits
            // carried (a slow peer's gradients join later rounds, or none).
            let samples: Vec<u64> = match o.async_threshold_ms {
                None => done.iter().map(|d| d * o.batch as u64 * o.local_steps).collect(),
                Some(_) => own.clone(),
            };
            let addresses: Vec<String> = accounts.iter().map(|a| a.address.clone()).collect();
            let hashes: BTreeMap<u64, String> = trained(&nodes[0])
                .into_iter()
                .map(|(r, e)| (r, e["param_hash"].as_str().unwrap_or_default().to_owned()))
                .collect();
            report_chain(anvil, contract, &run_id, &addresses, &done, &samples, &hashes)
                .map(|chain| report["chain"] = chain)
        }
        None => Ok(()),
    };
    let name = run_id.trim_start_matches("0x").chars().take(16).collect::<String>();
    let [json, md, html] = crate::report::write(&o.report_dir, &name, &report)?;
    println!("\nreport: {}, {} and {}", md.display(), html.display(), json.display());
    checked
}

/// The peers, curves, throughput and faults of a finished run, from the peers' logs.
fn fill_report(report: &mut Value, nodes: &[Node], codes: &[Option<i32>], every: u64) {
    let per: Vec<BTreeMap<u64, Value>> = nodes.iter().map(trained).collect();
    report["peers"] = nodes
        .iter()
        .zip(&per)
        .zip(codes)
        .map(|((n, t), code)| serde_json::json!({"name": n.name, "peer_id": n.peer_id(), "rounds": t.len(), "exit": code}))
        .collect();
    report["accuracy"] = nodes[0]
        .events("evaluated")
        .iter()
        .map(|e| serde_json::json!({"round": e["round"], "accuracy": e["accuracy"]}))
        .collect();
    report["loss"] = per[0]
        .keys()
        .filter(|r| r.is_multiple_of(every) || Some(*r) == per[0].keys().last())
        .map(|r| {
            let losses: Vec<f64> = per.iter().filter_map(|t| t.get(r).and_then(|e| e["loss"].as_f64())).collect();
            serde_json::json!({"round": r, "loss": losses.iter().sum::<f64>() / losses.len().max(1) as f64})
        })
        .collect();
    let rounds: Vec<&Value> = per[0].values().collect();
    let mean = |f: &dyn Fn(&Value) -> f64| rounds.iter().map(|e| f(e)).sum::<f64>() / rounds.len().max(1) as f64;
    let mut secs: Vec<f64> = rounds
        .iter()
        .map(|e| e["samples"].as_f64().unwrap_or(0.0) / e["samples_per_s"].as_f64().unwrap_or(f64::INFINITY))
        .collect();
    secs.sort_by(f64::total_cmp);
    report["throughput"] = serde_json::json!({
        "samples_per_s": mean(&|e| e["samples_per_s"].as_f64().unwrap_or(0.0)),
        "median_round_s": secs.get(secs.len() / 2).copied().unwrap_or(0.0),
        "mib_per_peer_round": mean(&|e| e["bytes_sent"].as_f64().unwrap_or(0.0)) / f64::from(1 << 20),
    });
    // Warnings, by message and how many times each peer logged it.
    let mut warnings: BTreeMap<String, u64> = BTreeMap::new();
    for n in nodes {
        for e in n.events_containing("") {
            if e["level"] == "WARN" {
                *warnings.entry(e["message"].as_str().unwrap_or_default().to_owned()).or_default() += 1;
            }
        }
    }
    report["warnings"] = serde_json::json!(warnings);
    // Attempts that failed and were redone, as each peer saw them.
    report["failed_attempts"] = nodes
        .iter()
        .flat_map(|n| {
            n.events("round failed").into_iter().map(move |e| {
                serde_json::json!({"seen_by": n.name, "round": e["round"], "attempt": e["attempt"], "reason": e["reason"]})
            })
        })
        .collect();
    report["faults"] = nodes
        .iter()
        .flat_map(|n| {
            n.events("fault proven: the peer is kept out of rings").into_iter().map(move |e| {
                serde_json::json!({"seen_by": n.name, "round": e["round"], "accused": e["accused"], "kind": e["kind"], "reason": e["reason"]})
            })
        })
        .collect();
}
