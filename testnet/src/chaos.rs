//! `testnet chaos`: a training run on a local chain in which peers are killed
//! (SIGKILL) or stopped (SIGTERM) at random moments and restarted from their
//! data directories after a random downtime, for a bounded time, from a seed.
//!
//! At the end every peer is brought back, trains with the others, and is
//! stopped cleanly; then the run is checked: every round that two peers
//! trained left them with the same parameter hash, every finalized checkpoint
//! on chain is a hash the peers held at that round, and each peer's records on
//! chain are exactly the rounds it trained (across all its restarts), none
//! twice. It reports the rounds completed, the kills survived, how long the
//! ring took to complete a round without a killed peer, and how long a
//! restarted peer took to train with the ring again.

use crate::chain::{self, Account, Anvil};
use crate::process::{Node, TempDir, ensure_fashion_mnist, event_time, interrupted, wait_until};
use crate::verify::check_records;
use anyhow::{Context, bail};
use std::collections::BTreeMap;
use std::time::{Duration, Instant, SystemTime};

/// What the chaos run does.
#[derive(Debug, Clone)]
pub struct ChaosOpts {
    pub nodes: usize,
    pub duration: Duration,
    pub seed: u64,
    /// Mean time between two kills.
    pub mean_interval: Duration,
    /// Longest time a killed peer stays down.
    pub max_downtime: Duration,
    /// Kills never leave fewer live peers than this.
    pub min_alive: usize,
    /// Share of stops that are SIGTERM (a clean leave) rather than SIGKILL, in percent.
    pub graceful_percent: u64,
    pub batch: usize,
    pub epoch_rounds: u64,
    /// Write every process's log here (`peer-<i>.<life>.jsonl`).
    pub logs: Option<std::path::PathBuf>,
}

/// splitmix64: a small, seeded, reproducible generator.
#[derive(Debug)]
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// One peer: every process it has been, and its data directory while it is down.
#[derive(Debug)]
struct Slot {
    name: String,
    key: std::path::PathBuf,
    lives: Vec<Node>,
    /// The data directory, while no process holds it.
    parked: Option<TempDir>,
    /// When it comes back, while it is down.
    back_at: Option<Instant>,
}

impl Slot {
    fn alive(&self) -> bool {
        self.parked.is_none() && self.back_at.is_none()
    }

    fn current(&self) -> &Node {
        self.lives.last().expect("a slot has been started")
    }
}

/// A stop the run survived.
#[derive(Debug)]
struct Stop {
    slot: usize,
    peer_id: String,
    /// Seconds since 1970, the clock of the nodes' log timestamps.
    at: f64,
    graceful: bool,
}

fn unix_now() -> f64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

fn median(v: &mut [f64]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

pub fn run(o: &ChaosOpts) -> anyhow::Result<()> {
    if o.nodes < 2 || o.min_alive == 0 || o.min_alive >= o.nodes {
        bail!("--nodes must be at least 2 and --min-alive between 1 and nodes - 1");
    }
    let data = ensure_fashion_mnist().to_str().context("utf-8 path")?.to_owned();
    let anvil = Anvil::start();
    let contract = chain::deploy(&anvil);
    let accounts: Vec<Account> = anvil.fund_peers(o.nodes);
    let dir = TempDir::new("testnet-chaos");
    let config = dir.path().join("run.toml");
    let k = o.epoch_rounds;
    std::fs::write(
        &config,
        format!(
            "name = \"chaos-{}\"\nmodel = \"mlp\"\nbatch = {}\nrounds = 1000000\nepoch_rounds = {k}\nmin_peers = {}\n\
             lr = 0.002\neval_every = 0\n",
            o.seed, o.batch, o.min_alive
        ),
    )?;
    println!(
        "chaos: {} peers training an MLP on Fashion-MNIST for {} s, seed {}; a peer is stopped every {:.0} s on \
         average ({}% SIGTERM, the rest SIGKILL) and restarted after up to {} s; at least {} stay up",
        o.nodes,
        o.duration.as_secs(),
        o.seed,
        o.mean_interval.as_secs_f64(),
        o.graceful_percent,
        o.max_downtime.as_secs(),
        o.min_alive
    );
    println!("anvil {}  ledger {contract}", anvil.url);
    let flags = |slot: &Slot, boot: &[String]| -> Vec<String> {
        let mut f: Vec<String> = [
            "--config",
            config.to_str().unwrap_or_default(),
            "--dataset",
            &data,
            "--rpc-url",
            &anvil.url,
            "--contract",
            &contract,
            "--eth-key-file",
            slot.key.to_str().unwrap_or_default(),
            "--heartbeat-ms",
            "300",
            "--ledger-flush-timeout-s",
            "120",
        ]
        .map(String::from)
        .to_vec();
        for b in boot {
            f.extend(["--bootstrap".to_owned(), b.clone()]);
        }
        f
    };
    let mut slots: Vec<Slot> = (0..o.nodes)
        .map(|i| Slot {
            name: format!("peer-{i}"),
            key: anvil.write_key(&format!("peer-{i}.key"), &accounts[i]),
            lives: Vec::new(),
            parked: Some(TempDir::new(&format!("chaos-{i}"))),
            back_at: None,
        })
        .collect();
    // Brings a slot up, bootstrapping from every live peer.
    let start = |slots: &mut Vec<Slot>, i: usize| {
        let boot: Vec<String> = slots.iter().filter(|s| s.alive()).map(|s| s.current().address()).collect();
        let f = flags(&slots[i], &boot);
        let refs: Vec<&str> = f.iter().map(String::as_str).collect();
        let life = slots[i].lives.len();
        let d = slots[i].parked.take().expect("a parked data directory");
        slots[i].back_at = None;
        let node = Node::start_in(&format!("{}.{life}", slots[i].name), d, &refs);
        slots[i].lives.push(node);
    };
    for i in 0..o.nodes {
        start(&mut slots, i);
    }
    let began = Instant::now();
    wait_until(Duration::from_secs(180), || {
        slots.iter().all(|s| !s.current().events("round trained").is_empty()).then_some(())
    })
    .ok_or_else(|| anyhow::anyhow!("the peers did not start training"))?;
    println!("training started after {:.1} s; chaos begins", began.elapsed().as_secs_f64());

    let mut rng = Rng(o.seed);
    let mut stops: Vec<Stop> = Vec::new();
    let mut restarts: Vec<(usize, usize, f64)> = Vec::new();
    let chaos_began = Instant::now();
    let mut next_stop = chaos_began + o.mean_interval.mul_f64(-rng.unit().max(1e-9).ln());
    while chaos_began.elapsed() < o.duration && !interrupted() {
        let now = Instant::now();
        for i in 0..slots.len() {
            if slots[i].back_at.is_some_and(|t| now >= t) {
                start(&mut slots, i);
                restarts.push((i, slots[i].lives.len() - 1, unix_now()));
            }
        }
        if now >= next_stop {
            let alive: Vec<usize> = (0..slots.len()).filter(|i| slots[*i].alive()).collect();
            if alive.len() > o.min_alive {
                let i = alive[rng.below(alive.len())];
                let graceful = rng.below(100) < o.graceful_percent as usize;
                let peer_id = slots[i].current().peer_id();
                let at = unix_now();
                let node = slots[i].lives.last_mut().expect("alive");
                if graceful {
                    node.terminate();
                    node.wait_exit(Duration::from_secs(150));
                }
                let d = node.take_dir();
                let down = o.max_downtime.mul_f64(0.1 + 0.9 * rng.unit());
                slots[i].parked = Some(d);
                slots[i].back_at = Some(Instant::now() + down);
                println!(
                    "{:>6.1} s  {} {} ({} live); back in {:.1} s",
                    chaos_began.elapsed().as_secs_f64(),
                    if graceful { "stopped (SIGTERM)" } else { "killed (SIGKILL)" },
                    slots[i].name,
                    alive.len() - 1,
                    down.as_secs_f64()
                );
                stops.push(Stop { slot: i, peer_id, at, graceful });
            }
            next_stop = Instant::now() + o.mean_interval.mul_f64(-rng.unit().max(1e-9).ln());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    if interrupted() {
        bail!("interrupted");
    }
    // Everyone comes back and trains together, then everyone leaves cleanly.
    for i in 0..slots.len() {
        if !slots[i].alive() {
            start(&mut slots, i);
            restarts.push((i, slots[i].lives.len() - 1, unix_now()));
        }
    }
    println!(
        "chaos over after {:.0} s: every peer is back; waiting for all of them to train together",
        o.duration.as_secs_f64()
    );
    let together = wait_until(Duration::from_secs(300), || {
        let n = slots.len();
        slots.iter().all(|s| s.current().rounds().iter().filter(|r| r.members.len() == n).count() >= 3).then_some(())
    });
    if together.is_none() {
        println!("warning: not every peer trained in a ring of all {} within 300 s", slots.len());
    }
    for s in slots.iter_mut() {
        s.lives.last_mut().expect("alive").terminate();
    }
    let mut clean = true;
    for s in slots.iter_mut() {
        let node = s.lives.last_mut().expect("alive");
        let code = node.wait_exit(Duration::from_secs(180));
        if code != Some(0) {
            node.dump();
            clean = false;
        }
    }

    if let Some(dir) = &o.logs {
        std::fs::create_dir_all(dir)?;
        for n in slots.iter().flat_map(|s| &s.lives) {
            n.save_log(&dir.join(format!("{}.jsonl", n.name)))?;
        }
        println!("logs written to {}", dir.display());
    }
    // The checks. The work each peer did is every round the ring certified with it as a
    // member (any peer's "round complete"); its commit digests come from its own logs of the
    // round, or of the credit it recovered after coming back.
    type Logged = BTreeMap<u64, (String, String)>;
    let events = |s: &Slot, message: &str| -> Vec<serde_json::Value> {
        s.lives.iter().flat_map(|n| n.events(message)).collect()
    };
    let logged: Vec<Logged> = slots
        .iter()
        .map(|s| {
            events(s, "round trained")
                .iter()
                .map(|e| {
                    let f = |k: &str| e[k].as_str().unwrap_or_default().to_owned();
                    (e["round"].as_u64().unwrap_or(u64::MAX), (f("param_hash"), f("commit")))
                })
                .collect()
        })
        .collect();
    let ids: Vec<String> = slots.iter().map(|s| s.lives[0].peer_id()).collect();
    let mut work: Vec<BTreeMap<u64, Option<String>>> = vec![BTreeMap::new(); slots.len()];
    for s in &slots {
        for e in events(s, "round complete") {
            let members = e["members"].as_str().unwrap_or_default();
            for (i, id) in ids.iter().enumerate() {
                if members.split(',').any(|m| m == id) {
                    work[i].entry(e["round"].as_u64().unwrap_or(u64::MAX)).or_insert(None);
                }
            }
        }
    }
    for (i, s) in slots.iter().enumerate() {
        for e in events(s, "round complete")
            .iter()
            .chain(&events(s, "credit recovered: the ring certified this round while this peer was away"))
        {
            if let Some(c) = work[i].get_mut(&e["round"].as_u64().unwrap_or(u64::MAX)) {
                *c = e["commit"].as_str().map(String::from);
            }
        }
    }
    let mut by_round: BTreeMap<u64, Vec<&String>> = BTreeMap::new();
    for l in &logged {
        for (r, (h, _)) in l {
            by_round.entry(*r).or_default().push(h);
        }
    }
    let diverged: Vec<u64> =
        by_round.iter().filter(|(_, hs)| hs.iter().any(|h| *h != hs[0])).map(|(r, _)| *r).collect();
    let shared = by_round.values().filter(|hs| hs.len() > 1).count();
    let run_id = slots[0].lives[0].events("training run")[0]["run_id"].as_str().unwrap_or_default().to_owned();
    let cps = chain::ledger_json(&anvil, &contract, &["checkpoints", "--run", &run_id]);
    let finalized = cps["checkpoints"].as_array().cloned().unwrap_or_default();
    let bad_checkpoints: Vec<u64> = finalized
        .iter()
        .filter(|c| {
            let r = c["round"].as_u64().unwrap_or(u64::MAX);
            let held = by_round.get(&r).map(|hs| format!("0x{}", hs[0]));
            held.as_deref() != c["param_hash"].as_str()
        })
        .map(|c| c["round"].as_u64().unwrap_or(u64::MAX))
        .collect();
    let mut ledger_errors = Vec::new();
    let mut total_rounds = 0u64;
    for (i, w) in work.iter().enumerate() {
        let mine =
            chain::ledger_json(&anvil, &contract, &["contributions", "--run", &run_id, "--peer", &accounts[i].address]);
        let unknown: Vec<u64> = w.iter().filter(|(_, c)| c.is_none()).map(|(r, _)| *r).collect();
        if !unknown.is_empty() {
            ledger_errors.push(format!("{}: no commit digest logged for certified rounds {unknown:?}", slots[i].name));
            continue;
        }
        let list: Vec<(u64, String)> = w.iter().map(|(r, c)| (*r, c.clone().unwrap_or_default())).collect();
        match check_records(mine["epochs"].as_array().map(Vec::as_slice).unwrap_or_default(), &list, k) {
            Ok(n)
                if n == w.len() as u64
                    && mine["peers"][0]["rounds"] == n
                    && mine["peers"][0]["samples"] == n * o.batch as u64 =>
            {
                total_rounds += n
            }
            Ok(n) => {
                ledger_errors.push(format!("{}: {n} rounds in records, totals {}", slots[i].name, mine["peers"][0]))
            }
            Err(e) => ledger_errors.push(format!("{}: {e}", slots[i].name)),
        }
    }
    let recovered: usize = slots
        .iter()
        .map(|s| events(s, "credit recovered: the ring certified this round while this peer was away").len())
        .sum();

    // Recovery: from a stop to the first round the others completed without that peer; rejoin:
    // from a restart to the first round the restarted process trained.
    let mut recovery: Vec<f64> = stops
        .iter()
        .filter_map(|s| {
            slots
                .iter()
                .enumerate()
                .filter(|(i, _)| *i != s.slot)
                .flat_map(|(_, slot)| slot.lives.iter().flat_map(|n| n.events("round complete")))
                .filter(|e| !e["members"].as_str().unwrap_or_default().contains(&s.peer_id))
                .filter_map(|e| event_time(&e))
                .filter(|t| *t > s.at)
                .min_by(f64::total_cmp)
                .map(|t| t - s.at)
        })
        .collect();
    let mut rejoin: Vec<f64> = restarts
        .iter()
        .filter_map(|(slot, life, at)| {
            let n = &slots[*slot].lives[*life];
            n.events("round trained").first().and_then(event_time).map(|t| t - at)
        })
        .collect();
    let rounds_completed = by_round.keys().next_back().map_or(0, |r| r + 1);
    let completions: Vec<serde_json::Value> = slots.iter().flat_map(|s| events(s, "round complete")).collect();
    let mut round_s: Vec<f64> = completions.iter().filter_map(|e| e["round_us"].as_f64()).map(|us| us / 1e6).collect();
    let times: Vec<f64> = completions.iter().filter_map(event_time).collect();
    let span = times.iter().copied().fold(f64::MIN, f64::max) - times.iter().copied().fold(f64::MAX, f64::min);
    let syncs: usize = slots.iter().flat_map(|s| &s.lives).map(|n| n.events("state restored").len()).sum();
    let graceful = stops.iter().filter(|s| s.graceful).count();
    println!("\nchaos report (seed {}, {} peers, {} s of chaos)", o.seed, o.nodes, o.duration.as_secs());
    println!(
        "  rounds completed            {rounds_completed} ({:.1} rounds/s over {:.0} s; median round {:.1} ms)",
        rounds_completed as f64 / span.max(1e-9),
        span,
        1000.0 * median(&mut round_s)
    );
    println!(
        "  stops survived              {} ({} SIGKILL, {graceful} SIGTERM); restarts {}",
        stops.len(),
        stops.len() - graceful,
        restarts.len()
    );
    println!(
        "  ring recovery after a stop  median {:.2} s, max {:.2} s (n = {})",
        median(&mut recovery),
        recovery.iter().copied().fold(0.0, f64::max),
        recovery.len()
    );
    println!(
        "  rejoin after a restart      median {:.2} s, max {:.2} s (n = {}; process start, discovery, state fetch)",
        median(&mut rejoin),
        rejoin.iter().copied().fold(0.0, f64::max),
        rejoin.len()
    );
    println!("  states fetched from peers   {syncs}");
    println!(
        "  agreement                   {} ({shared} rounds trained by two or more peers)",
        if diverged.is_empty() {
            "every peer held the same parameters after every round".to_owned()
        } else {
            format!("DIVERGED at rounds {diverged:?}")
        }
    );
    println!(
        "  finalized checkpoints       {} of {} are hashes the peers held",
        finalized.len() - bad_checkpoints.len(),
        finalized.len()
    );
    println!(
        "  contributions on chain      {}",
        if ledger_errors.is_empty() {
            format!(
                "exactly the rounds the ring certified with each peer ({total_rounds} peer-rounds, {recovered} \
                 credited after a restart), none twice"
            )
        } else {
            format!("MISMATCH: {}", ledger_errors.join("; "))
        }
    );
    if !clean
        || !diverged.is_empty()
        || !bad_checkpoints.is_empty()
        || !ledger_errors.is_empty()
        || finalized.is_empty()
    {
        bail!("the chaos run failed its checks");
    }
    println!("\nall checks passed");
    Ok(())
}
