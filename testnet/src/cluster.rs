//! `testnet cluster`: N peers on this machine, one bootstrap, a bounded number
//! of rounds, and a report of what every peer computed.

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
}

/// Starts the peers, waits for them to finish, prints the rounds.
pub fn run(o: &ClusterOpts) -> anyhow::Result<()> {
    if o.nodes == 0 || o.rounds == 0 {
        bail!("--nodes and --rounds must be at least 1");
    }
    let rounds = o.rounds.to_string();
    let (min, len) = (o.nodes.to_string(), o.vector_len.to_string());
    let flags = ["--run", o.run.as_str(), "--min-peers", &min, "--rounds", &rounds, "--demo-vector-len", &len];
    println!(
        "starting {} peers on 127.0.0.1 (run '{}', {} rounds, vector of {} values)",
        o.nodes, o.run, o.rounds, o.vector_len
    );
    let first = Node::start("peer-0", &flags);
    let boot = first.address();
    println!("peer-0  {}  (bootstrap)", boot);
    let mut nodes = vec![first];
    for i in 1..o.nodes {
        let mut f = flags.to_vec();
        f.extend(["--bootstrap", boot.as_str()]);
        let n = Node::start(&format!("peer-{i}"), &f);
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
    let deadline = std::time::Instant::now() + Duration::from_secs(60 + 30 * o.rounds);
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
        let mut running = 0;
        for n in &mut nodes {
            running += usize::from(n.is_running());
        }
        if running == 0 {
            break;
        }
        if std::time::Instant::now() > deadline {
            bail!("the cluster did not finish in time; {printed} of {} rounds completed", o.rounds);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let codes: Vec<Option<i32>> = nodes.iter_mut().map(|n| n.wait_exit(Duration::from_secs(10))).collect();
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
    Ok(())
}
