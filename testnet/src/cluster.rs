//! `testnet cluster`: a local Anvil with the ledger contract, N peers on this
//! machine with one bootstrap, a bounded number of rounds, and a report of what
//! every peer computed and what the chain recorded.

use crate::chain::{self, Anvil};
use crate::process::{Node, Round};
use crate::verify::expected_sum_hash;
use anyhow::bail;
use std::collections::BTreeMap;
use std::time::Duration;

/// What the cluster runs.
#[derive(Debug, Clone)]
pub struct ClusterOpts {
    pub nodes: usize,
    pub rounds: u64,
    pub vector_len: usize,
    pub run: String,
    /// Record on a local Anvil chain (started and stopped here).
    pub chain: bool,
    /// K: rounds per on-chain epoch.
    pub epoch_rounds: u64,
}

/// Starts the peers, waits for them to finish, prints the rounds.
pub fn run(o: &ClusterOpts) -> anyhow::Result<()> {
    if o.nodes == 0 || o.rounds == 0 {
        bail!("--nodes and --rounds must be at least 1");
    }
    let rounds = o.rounds.to_string();
    let (min, len) = (o.nodes.to_string(), o.vector_len.to_string());
    let flags = ["--run", o.run.as_str(), "--min-peers", &min, "--rounds", &rounds, "--demo-vector-len", &len];
    let ledger = if o.chain {
        let anvil = Anvil::start();
        if anvil.accounts.len() <= o.nodes {
            bail!(
                "Anvil has {} dev accounts: at most {} peers can record on chain",
                anvil.accounts.len(),
                anvil.accounts.len() - 1
            );
        }
        let contract = chain::deploy(&anvil);
        println!("anvil   {}  ledger contract {contract}", anvil.url);
        Some((anvil, contract))
    } else {
        None
    };
    let chain_flags = |i: usize| -> Vec<String> {
        let Some((anvil, contract)) = &ledger else { return Vec::new() };
        let key = anvil.key_file(i + 1);
        let k = o.epoch_rounds.to_string();
        ["--rpc-url", &anvil.url, "--contract", contract, "--eth-key-file", key.to_str().unwrap(), "--epoch-rounds", &k]
            .map(String::from)
            .to_vec()
    };
    println!(
        "starting {} peers on 127.0.0.1 (run '{}', {} rounds, vector of {} values)",
        o.nodes, o.run, o.rounds, o.vector_len
    );
    let start = |i: usize, boot: Option<&str>| {
        let mut f: Vec<String> = flags.iter().map(|s| s.to_string()).collect();
        f.extend(chain_flags(i));
        if let Some(b) = boot {
            f.extend(["--bootstrap".to_owned(), b.to_owned()]);
        }
        let refs: Vec<&str> = f.iter().map(String::as_str).collect();
        Node::start(&format!("peer-{i}"), &refs)
    };
    let first = start(0, None);
    let boot = first.address();
    println!("peer-0  {}  (bootstrap)", boot);
    let mut nodes = vec![first];
    for i in 1..o.nodes {
        let n = start(i, Some(&boot));
        println!("peer-{i}  {}", n.address());
        nodes.push(n);
    }
    let ids: Vec<String> = nodes.iter().map(Node::peer_id).collect();
    let names: BTreeMap<&str, String> =
        ids.iter().enumerate().map(|(i, id)| (id.as_str(), format!("peer-{i}"))).collect();

    println!(
        "\n{:>5}  {:>4}  {:<18} {:>6} {:>6} {:>10} {:>10} {:>10}",
        "round", "ring", "sum hash", "agree", "exact", "reduce ms", "round ms", "MiB/peer"
    );
    let mut printed = 0u64;
    let mut exact_all = true;
    let deadline = std::time::Instant::now() + Duration::from_secs(120 + 30 * o.rounds);
    loop {
        let all: Vec<Vec<Round>> = nodes.iter().map(Node::rounds).collect();
        while printed < o.rounds {
            let got: Vec<&Round> = all.iter().filter_map(|rs| rs.iter().find(|r| r.round == printed)).collect();
            if got.len() < nodes.len() {
                break;
            }
            let r = got[0];
            let agree = got.iter().all(|g| g.result_hash == r.result_hash);
            let exact = expected_sum_hash(&o.run, r.round, &r.members, r.len) == r.result_hash;
            exact_all &= agree && exact;
            let max = |f: fn(&Round) -> u64| got.iter().map(|g| f(g)).max().unwrap_or(0);
            println!(
                "{:>5}  {:>4}  {:<18} {:>6} {:>6} {:>10.1} {:>10.1} {:>10.2}",
                r.round,
                r.members.len(),
                format!("{}…", &r.result_hash[..16]),
                if agree { "yes" } else { "NO" },
                if exact { "yes" } else { "NO" },
                max(|g| g.reduce_us) as f64 / 1e3,
                max(|g| g.round_us) as f64 / 1e3,
                max(|g| g.bytes_sent) as f64 / (1 << 20) as f64,
            );
            printed += 1;
        }
        if !crate::process::any_running(&mut nodes) {
            break;
        }
        if crate::process::interrupted() {
            bail!("interrupted");
        }
        if std::time::Instant::now() > deadline {
            bail!("the cluster did not finish in time; {printed} of {} rounds completed", o.rounds);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let codes: Vec<Option<i32>> = nodes.iter_mut().map(|n| n.wait_exit(Duration::from_secs(90))).collect();
    println!();
    for (i, n) in nodes.iter().enumerate() {
        let found: Vec<String> = n.discovered().iter().filter_map(|p| names.get(p.as_str()).cloned()).collect();
        println!("peer-{i}: {} rounds, found through Kademlia: {}", n.rounds().len(), found.join(", "));
    }
    if printed < o.rounds || codes.iter().any(|c| *c != Some(0)) {
        nodes.iter().for_each(Node::dump);
        bail!("not every peer completed every round (exit codes {codes:?})");
    }
    if !exact_all {
        bail!("some round's sum differed between peers or from the exact sum");
    }
    println!("\nall {} peers held the same, exact sum in every one of {} rounds", o.nodes, o.rounds);
    if let Some((anvil, contract)) = &ledger {
        let done: Vec<u64> = nodes.iter().map(|n| n.rounds().len() as u64).collect();
        let hashes: BTreeMap<u64, String> = nodes[0].rounds().into_iter().map(|r| (r.round, r.result_hash)).collect();
        // A demonstration round counts one sample.
        let addresses: Vec<String> = (1..=nodes.len()).map(|i| anvil.accounts[i].address.clone()).collect();
        report_chain(anvil, contract, &o.run, &addresses, &done, &done, &hashes)?;
    }
    Ok(())
}

/// Prints what the chain recorded and checks it against what the peers did: peer `i` (account
/// `addresses[i]`) completed `done[i]` rounds of `samples_per_round[i]` samples, and `hashes`
/// holds the hash all peers agreed on at each round; the finalized checkpoints must be
/// rounds of `hashes`, with those hashes.
pub fn report_chain(
    anvil: &Anvil,
    contract: &str,
    run: &str,
    addresses: &[String],
    done: &[u64],
    samples: &[u64],
    hashes: &BTreeMap<u64, String>,
) -> anyhow::Result<serde_json::Value> {
    let show = |args: &[&str]| -> anyhow::Result<String> {
        let mut all = args.to_vec();
        all.extend(["--rpc-url", &anvil.url, "--contract", contract]);
        let out = chain::node_command(&all);
        if !out.status.success() {
            bail!("node {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    println!("\non chain (node contributions --run {run}):\n");
    print!("{}", show(&["contributions", "--run", run])?);
    println!("\non chain (node checkpoints --run {run}):\n");
    print!("{}", show(&["checkpoints", "--run", run])?);

    let totals: serde_json::Value = serde_json::from_str(&show(&["contributions", "--run", run, "--json"])?)?;
    let checkpoints: serde_json::Value = serde_json::from_str(&show(&["checkpoints", "--run", run, "--json"])?)?;
    let run_id = totals["run"]["run"].as_str().unwrap_or_default().to_owned();
    let mut ok = true;
    println!();
    for (i, done) in done.iter().enumerate() {
        let address = &addresses[i];
        let expected = samples[i];
        let row = totals["peers"]
            .as_array()
            .and_then(|ps| ps.iter().find(|p| p["address"].as_str().is_some_and(|a| a.eq_ignore_ascii_case(address))));
        let rounds = row.and_then(|r| r["rounds"].as_u64()).unwrap_or(0);
        let samples = row.and_then(|r| r["samples"].as_u64()).unwrap_or(0);
        let same = rounds == *done && samples == expected;
        ok &= same;
        println!(
            "peer-{i}: completed {done} rounds ({expected} samples); on chain {rounds} rounds ({samples} samples){}",
            if same { "" } else { "  MISMATCH" }
        );
    }
    let finalized = checkpoints["checkpoints"].as_array().cloned().unwrap_or_default();
    ok &= !finalized.is_empty();
    for c in &finalized {
        let round = c["round"].as_u64().unwrap_or(u64::MAX);
        let held = hashes.get(&round).map(|h| format!("0x{h}"));
        let same = held.as_deref() == c["param_hash"].as_str();
        ok &= same;
        println!(
            "checkpoint at round {round}: {}",
            if same { "the hash every peer held" } else { "DIFFERS from the peers' hash" }
        );
    }
    let cast_path = &chain::ensure_tools().cast;
    let cast = cast_path.strip_prefix(chain::repo_root()).unwrap_or(cast_path).display().to_string();
    println!("\nthe same with cast (while a chain runs at {}):", anvil.url);
    // Runs `cast call <contract> <signature> <args>` and prints the command and its answer.
    let cast_call = |signature: &str, args: &[&str], fields: &str| -> anyhow::Result<()> {
        let mut all = vec!["call", contract, signature];
        all.extend_from_slice(args);
        all.extend(["--rpc-url", &anvil.url]);
        let out = std::process::Command::new(cast_path).args(&all).output()?;
        println!("  {cast} {}\n    -> {fields} = {}", quote(&all), String::from_utf8_lossy(&out.stdout).trim());
        Ok(())
    };
    for address in addresses {
        cast_call(
            "totalsOf(bytes32,address)((uint64,uint64,uint128,uint32))",
            &[&run_id, address],
            "(epochs, rounds, samples, faults)",
        )?;
    }
    cast_call("latestCheckpoint(bytes32)((uint64,bytes32,uint32,uint64))", &[&run_id], "(round, hash, votes, block)")?;
    if !ok {
        bail!("the chain does not match what the peers did");
    }
    println!("\nthe chain records exactly the rounds and samples each peer contributed, and the hashes they agreed on");
    Ok(serde_json::json!({"contributions": totals, "checkpoints": checkpoints}))
}

pub(crate) fn quote(args: &[&str]) -> String {
    args.iter().map(|a| if a.contains('(') { format!("'{a}'") } else { (*a).to_owned() }).collect::<Vec<_>>().join(" ")
}
