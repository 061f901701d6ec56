//! `node`: parses the command line, sets up logging, and runs the peer.

use alloy::primitives::B256;
use anyhow::Context;
use clap::Parser;
use node::cli::{ChainArgs, Cli, Command, LogFormat, StartArgs, SubmitCommand};
use node::driver::{self, Compute, DriverConfig, Resume, TrainSpec};
use node::ledger::client::{self, Client, ClientError};
use node::ledger::outbox::{Outbox, Record};
use node::ledger::{show, task};
use node::train::config::{ConfigError, RunConfig};
use node::train::data;
use node::train::worker::Worker;
use node::{config_io, net, store::Store};
use p2p_proto::FixedPoint;
use p2p_proto::chunk::SEGMENT_ELEMS;
use p2p_proto::compress::Compression;
use p2p_proto::membership::MembershipConfig;
use p2p_proto::message::{RunId, StateTag};
use p2p_proto::round::RoundConfig;
use std::sync::Arc;
use std::time::Duration;
use tracing::{info, warn};
use tracing_subscriber::EnvFilter;

/// Ring segments and whole gradients (megabytes each) are allocated and freed all round long.
/// glibc's allocator maps and unmaps such buffers (or trims its heaps) each time, and the
/// page faults of touching them again cost as much as the work done on them; mimalloc keeps
/// freed memory for reuse.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,libp2p=warn"));
    let fmt = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Json => fmt.json().flatten_event(true).init(),
        LogFormat::Text => fmt.compact().init(),
    }
    let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    match cli.command {
        Command::Start(args) => runtime.block_on(start(args)),
        Command::Train(args) => node::train::run::run(args),
        Command::Deploy(args) => runtime.block_on(deploy(args.chain)),
        Command::Contributions(args) => runtime.block_on(async {
            let client = Client::connect(&args.chain.rpc_url, None, args.chain.contract()?).await?;
            let c = show::contributions(&client, B256::from(args.run.0), args.peer).await?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&c)?);
            } else {
                print!("{}", show::contributions_table(&c));
            }
            Ok(())
        }),
        Command::Checkpoints(args) => runtime.block_on(async {
            let client = Client::connect(&args.chain.rpc_url, None, args.chain.contract()?).await?;
            let c = show::checkpoints(&client, B256::from(args.run.0)).await?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&c)?);
            } else {
                print!("{}", show::checkpoints_table(&c));
            }
            Ok(())
        }),
        Command::Submit(cmd) => runtime.block_on(submit(cmd)),
        Command::Status(args) => runtime.block_on(async {
            let body = node::http::get(&args.http, "/status").await.map_err(|e| anyhow::anyhow!(e))?;
            if args.json {
                println!("{}", String::from_utf8_lossy(&body));
            } else {
                let s: node::metrics::Status =
                    serde_json::from_slice(&body).context("the endpoint's /status is not a node's status")?;
                print!("{}", node::metrics::table(&s));
            }
            Ok(())
        }),
    }
}

async fn deploy(chain: ChainArgs) -> anyhow::Result<()> {
    let signer = client::load_signer(chain.eth_key_file.as_deref())?;
    let deployer = signer.address();
    let (address, tx) = client::deploy(&chain.rpc_url, signer).await?;
    info!(%address, %tx, %deployer, endpoint = %client::endpoint_label(&chain.rpc_url), "ledger contract deployed");
    println!("{address}");
    Ok(())
}

/// Sends one record by hand: dry run first, so a rejection is explained before gas is spent.
async fn submit(cmd: SubmitCommand) -> anyhow::Result<()> {
    let (target, record) = match cmd {
        SubmitCommand::CreateRun { target, config_hash, ledger } => {
            let r = Record::CreateRun {
                run: target.run.0,
                config_hash: config_hash.0,
                epoch_rounds: ledger.epoch_rounds,
                quorum_bps: ledger.quorum_bps,
                min_votes: ledger.min_votes,
            };
            (target, r)
        }
        SubmitCommand::Register { target, peer_id } => {
            let r = Record::Register { run: target.run.0, peer_id: peer_id.to_bytes() };
            (target, r)
        }
        SubmitCommand::Contribution { target, epoch, part, rounds, samples, commit_root } => {
            let r =
                Record::Contribution { run: target.run.0, epoch, part, rounds, samples, commit_root: commit_root.0 };
            (target, r)
        }
        SubmitCommand::Vote { target, round, param_hash } => {
            let r = Record::Vote { run: target.run.0, round, param_hash: param_hash.0 };
            (target, r)
        }
        SubmitCommand::Fault { target, accused, round, kind, evidence } => {
            let r = Record::Fault { run: target.run.0, accused: accused.0.0, round, kind, evidence: evidence.0 };
            (target, r)
        }
    };
    let signer = client::load_signer(target.chain.eth_key_file.as_deref())?;
    let client = Client::connect(&target.chain.rpc_url, Some(signer), target.chain.contract()?).await?;
    client.simulate(&record).await?;
    let tx = client.send(&record, None).await?;
    match client.receipt(tx, Duration::from_secs(120)).await? {
        Some((true, block)) => {
            println!("{} recorded in block {block}, transaction {tx}", record.kind());
            Ok(())
        }
        Some((false, block)) => {
            anyhow::bail!("transaction {tx} reverted in block {block}: run the command again to see why")
        }
        None => {
            anyhow::bail!("transaction {tx} was not mined within 120 s: check the chain, then `node contributions`")
        }
    }
}

/// What the ledger records about the run.
struct RunOnChain {
    config_hash: [u8; 32],
    epoch_rounds: u64,
    quorum_bps: u16,
    min_votes: u16,
}

/// Connects the ledger for `node start`, when a contract is given: the handle of the ledger
/// task, and the client (for reads).
async fn start_ledger(
    args: &StartArgs,
    store: &Store,
    run: RunId,
    on_chain: &RunOnChain,
    peer_id: libp2p::PeerId,
) -> anyhow::Result<Option<(task::LedgerHandle, Client)>> {
    let Some(address) = args.chain.contract else {
        info!("no --contract: this peer records nothing on chain");
        return Ok(None);
    };
    let signer = client::load_signer(args.chain.eth_key_file.as_deref())?;
    let account = signer.address();
    let client = Client::connect(&args.chain.rpc_url, Some(signer), address).await?;
    match client.check_contract().await {
        Ok(()) => {}
        Err(e @ ClientError::Unreachable { .. }) => {
            warn!(reason = %e, "chain unreachable at start; ledger records wait in the outbox")
        }
        Err(e) => return Err(e.into()),
    }
    let outbox = Outbox::new(store.database())?;
    let cfg = task::LedgerConfig {
        run: run.0,
        config_hash: on_chain.config_hash,
        epoch_rounds: on_chain.epoch_rounds,
        quorum_bps: on_chain.quorum_bps,
        min_votes: on_chain.min_votes,
        peer_id: peer_id.to_bytes(),
    };
    info!(%account, contract = %address, endpoint = client.endpoint(), epoch_rounds = cfg.epoch_rounds, "recording on chain");
    Ok(Some((task::spawn(client.clone(), outbox, cfg)?, client)))
}

/// The local checkpoints of this run in `dir` (`round-<r>.safetensors`), newest first.
fn local_checkpoints(dir: &std::path::Path) -> Vec<(u64, std::path::PathBuf)> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    let mut found: Vec<(u64, std::path::PathBuf)> = entries
        .filter_map(Result::ok)
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let round = name.strip_prefix("round-")?.strip_suffix(".safetensors")?.parse::<u64>().ok()?;
            Some((round, e.path()))
        })
        .collect();
    found.sort_by_key(|(r, _)| std::cmp::Reverse(*r));
    found
}

/// A restarted training peer resumes from its newest local checkpoint of the run, unless the
/// chain finalized another hash for that round (then it starts over and catches up from its
/// peers). Peers further on hand it their state when it joins them.
async fn resume_from_checkpoint(spec: &TrainSpec, run: RunId, chain: Option<&Client>) -> Option<Resume> {
    // The newest checkpoint that loads (a damaged one is skipped for the one before).
    let (mut usable, candidates) = (None, local_checkpoints(&spec.checkpoint_dir));
    let tried = candidates.len();
    for (round, path) in candidates {
        match spec.worker.load(path.clone()).await {
            Ok(Ok(c)) => match c.cursor {
                Some(cursor) => {
                    usable = Some((round, path, cursor, c));
                    break;
                }
                None => {
                    warn!(path = %path.display(), "the local checkpoint has no sample cursor (not written by a ring); trying an older one")
                }
            },
            Ok(Err(e)) => {
                warn!(path = %path.display(), reason = %e, "cannot load the local checkpoint; trying an older one")
            }
            Err(_) => return None,
        }
    }
    let Some((round, path, cursor, c)) = usable else {
        if tried > 0 {
            warn!(dir = %spec.checkpoint_dir.display(), tried, "no local checkpoint could be used; starting over");
        }
        return None;
    };
    if let Some(client) = chain {
        let call = client.contract().checkpointOf(B256::from(run.0), round);
        match tokio::time::timeout(Duration::from_secs(5), client.read(call.call())).await {
            Ok(Ok(k)) if k.finalizedAt != 0 && k.paramHash.0 != c.param_hash => {
                warn!(
                    round,
                    local = %p2p_proto::hash::hex(&c.param_hash),
                    chain = %k.paramHash,
                    "the local checkpoint differs from the chain's finalized checkpoint; starting over"
                );
                return None;
            }
            Ok(Ok(k)) if k.finalizedAt != 0 => {
                info!(round, "the local checkpoint matches the chain's finalized checkpoint")
            }
            Ok(Ok(_)) => info!(
                round,
                "no finalized checkpoint on chain for this round; the local checkpoint is checked by the ring's commits"
            ),
            Ok(Err(e)) => warn!(reason = %e, "cannot ask the chain about the local checkpoint"),
            Err(_) => warn!("the chain did not answer about the local checkpoint"),
        }
    }
    match spec.worker.restore(c.params, c.optimizer, None).await {
        Ok(Ok(hash)) => {
            info!(round, path = %path.display(), param_hash = %p2p_proto::hash::hex(&hash), cursor, "resumed from the local checkpoint");
            Some(Resume { state: StateTag { round: round + 1, param_hash: hash }, cursor })
        }
        Ok(Err(e)) => {
            warn!(reason = %e, "cannot resume from the local checkpoint; starting over");
            None
        }
        Err(_) => None,
    }
}

/// The configuration every peer of a demonstration run must share, hashed for the ledger.
fn demo_config_hash(args: &StartArgs) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    h.update(b"dtrain/demo-config/v1");
    h.update(&(args.run.demo_vector_len as u64).to_le_bytes());
    h.update(&args.ledger.epoch_rounds.to_le_bytes());
    h.update(&args.ledger.quorum_bps.to_le_bytes());
    h.update(&args.ledger.min_votes.to_le_bytes());
    if args.run.demo_compression != "none" {
        h.update(args.run.demo_compression.as_bytes());
    }
    if args.run.demo_group_size > 0 {
        h.update(b"groups");
        h.update(&(args.run.demo_group_size as u64).to_le_bytes());
    }
    h.finalize().into()
}

/// What a started peer does: train under a run configuration, or all-reduce the demo vector.
struct Plan {
    /// Samples this peer contributes per round.
    batch: usize,
    compute: Compute,
    on_chain: RunOnChain,
    rounds: u64,
    min_peers: usize,
    /// One attempt in this many is audited (0: none).
    audit_every: u64,
    /// Relative distance audits allow (0: bit-exact).
    audit_tolerance: f64,
    /// The run's fixed-point format (with its coordinate-wise clipping, if any).
    fixed: FixedPoint,
    /// Every gradient's norm is clipped to this before weighting (none: not checked).
    clip_norm: Option<f32>,
    /// How contributions are compressed.
    compression: Compression,
    /// Asynchronous rounds: the threshold and the largest staleness (none: synchronous).
    asynchronous: Option<(Duration, u64)>,
    /// Hierarchical rounds' group size (0: the plain ring).
    group_size: usize,
}

/// The run configuration from `--config`, bound to this peer's dataset and build.
fn load_config(args: &StartArgs) -> anyhow::Result<Option<(RunConfig, data::Dataset)>> {
    let Some(path) = &args.run.config else { return Ok(None) };
    let cfg = RunConfig::load(path)?;
    let ds = data::load(&args.run.dataset)?;
    Ok(Some((cfg.bind(&ds)?, ds)))
}

fn demo_plan(args: &StartArgs) -> Plan {
    Plan {
        compute: Compute::Demo { len: args.run.demo_vector_len },
        batch: 1,
        on_chain: RunOnChain {
            config_hash: demo_config_hash(args),
            epoch_rounds: args.ledger.epoch_rounds,
            quorum_bps: args.ledger.quorum_bps,
            min_votes: args.ledger.min_votes,
        },
        rounds: args.run.rounds,
        min_peers: args.run.min_peers,
        // The demonstration vector has no gradient to recompute.
        audit_every: 0,
        audit_tolerance: 0.0,
        compression: match args.run.demo_compression.as_str() {
            "int8" => Compression::Int8 { block: node::train::config::DEFAULT_INT8_BLOCK },
            "topk" => Compression::TopK { per_million: (node::train::config::DEFAULT_TOPK_FRACTION * 1e6) as u32 },
            _ => Compression::None,
        },
        asynchronous: None,
        group_size: args.run.demo_group_size,
        fixed: FixedPoint::default(),
        clip_norm: None,
    }
}

fn train_plan(args: &StartArgs, cfg: &RunConfig, ds: data::Dataset) -> anyhow::Result<Plan> {
    let run = cfg.run_id();

    let device = node::train::run::device(args.run.backend)?;
    let worker = Worker::spawn_slowed(cfg, Arc::new(ds), device, args.faults.slow_compute())?;
    let batch = args.run.batch.unwrap_or(cfg.batch);
    if batch == 0 || batch > node::train::config::MAX_BATCH {
        anyhow::bail!(
            "--batch {batch} is out of range: use 1 to {} samples per step (local_steps for more per round)",
            node::train::config::MAX_BATCH
        );
    }
    // With local SGD a member trains on `local_steps` batches per round: that is the work its
    // commit, the ring's weights, the sample stream and the chain count.
    let round_samples = batch * cfg.local_steps as usize;
    if round_samples > u32::MAX as usize {
        anyhow::bail!("--batch {batch} times local_steps {} is out of range", cfg.local_steps);
    }
    info!(
        run_id = %format!("0x{}", hex::encode(run.0)),
        name = %cfg.name,
        config_hash = %format!("0x{}", hex::encode(cfg.hash())),
        model = %cfg.model,
        params = worker.params,
        param_hash = %p2p_proto::hash::hex(&worker.initial_hash),
        batch,
        local_steps = cfg.local_steps,
        compression = cfg.compression.as_deref().unwrap_or("none"),
        rounds = cfg.rounds,
        "training run"
    );
    let spec = TrainSpec {
        worker,
        batch: round_samples,
        default_batch: cfg.batch * cfg.local_steps as usize,
        most_samples: (node::train::config::MAX_BATCH * cfg.local_steps as usize) as u64,
        eval_every: cfg.eval_every,
        epoch_rounds: cfg.epoch_rounds,
        // Per run: a data directory may have served several runs.
        checkpoint_dir: args.network.data_dir.join("checkpoints").join(&hex::encode(run.0)[..16]),
    };
    std::fs::create_dir_all(&spec.checkpoint_dir)?;
    Ok(Plan {
        compute: Compute::Train(spec),
        batch: round_samples,
        on_chain: RunOnChain {
            config_hash: cfg.hash(),
            epoch_rounds: cfg.epoch_rounds,
            quorum_bps: cfg.quorum_bps,
            min_votes: cfg.min_votes,
        },
        rounds: cfg.rounds,
        min_peers: cfg.min_peers,
        audit_every: cfg.audit_every,
        audit_tolerance: cfg.audit_tolerance(),
        compression: cfg.compression().map_err(|e| anyhow::anyhow!(e))?,
        asynchronous: cfg.asynchronous(),
        group_size: cfg.group_size.unwrap_or(0),
        fixed: match cfg.clip_value {
            Some(c) => FixedPoint::default().with_clip(c)?,
            None => FixedPoint::default(),
        },
        clip_norm: Some(cfg.clip_norm),
    })
}

/// Peer ids of the bootstrap addresses (those that name one).
fn bootstrap_peers(args: &StartArgs) -> Vec<libp2p::PeerId> {
    args.network
        .bootstrap
        .iter()
        .filter_map(|a| {
            a.iter().find_map(|p| match p {
                libp2p::multiaddr::Protocol::P2p(id) => Some(id),
                _ => None,
            })
        })
        .collect()
}

async fn start(args: StartArgs) -> anyhow::Result<()> {
    args.timing.check().map_err(|e| anyhow::anyhow!(e))?;
    let max_peers = p2p_proto::fixed::DEFAULT_MAX_PEERS as usize;
    if !(1..=max_peers).contains(&args.run.min_peers) {
        anyhow::bail!(
            "--min-peers {} must be between 1 and {max_peers}, the most peers a ring holds",
            args.run.min_peers
        );
    }
    let store = Store::open(&args.network.data_dir)?;
    let key = store.identity()?;
    let peer_id = key.public().to_peer_id();
    // The run: from --config; or, for `--run 0x<id>` alone, fetched from the bootstrap peers
    // once the network is up; or the demonstration run named by --run.
    let local = load_config(&args)?;
    let join_by_id = local.is_none() && args.run.run.starts_with("0x");
    let run = match &local {
        Some((cfg, _)) => {
            let run = cfg.run_id();
            if args.run.run.starts_with("0x") {
                let expected = node::cli::parse_run(&args.run.run).map_err(|e| anyhow::anyhow!(e))?;
                if expected != run {
                    let actual = format!("0x{}", hex::encode(run.0));
                    return Err(ConfigError::RunMismatch { actual, expected: args.run.run.clone() }.into());
                }
            }
            run
        }
        None => node::cli::parse_run(&args.run.run).map_err(|e| anyhow::anyhow!(e))?,
    };
    info!(%peer_id, run = %run, data_dir = %args.network.data_dir.display(), "starting");
    let bootstrap = bootstrap_peers(&args);
    let (handle, events, event_loop) = net::new(
        key.clone(),
        net::NetConfig {
            listen: args.network.listen.clone(),
            bootstrap: args.network.bootstrap.clone(),
            topic: run.topic(),
            direct_ring: args.network.ring_transport == node::cli::RingTransport::Direct,
            ring_port: args.network.ring_port,
        },
    )?;
    let net_task = tokio::spawn(event_loop.run());
    let config = match local {
        Some(c) => Some(c),
        None if join_by_id => {
            info!(peers = bootstrap.len(), "fetching the run's configuration from the bootstrap peers");
            let cfg = config_io::fetch(handle.control(), &bootstrap, run, Duration::from_secs(60)).await?;
            info!(name = %cfg.name, "configuration received; it hashes to the run id");
            let ds = data::load(&args.run.dataset)?;
            Some((cfg.bind(&ds)?, ds))
        }
        None => None,
    };
    let plan = match config {
        Some((cfg, ds)) => {
            let plan = train_plan(&args, &cfg, ds)?;
            config_io::serve(handle.control(), run, &cfg);
            plan
        }
        None => demo_plan(&args),
    };
    let (ledger, chain) = match start_ledger(&args, &store, run, &plan.on_chain, peer_id).await? {
        Some((l, c)) => (Some(l), Some(c)),
        None => (None, None),
    };
    let resume = match &plan.compute {
        Compute::Train(spec) => resume_from_checkpoint(spec, run, chain.as_ref()).await,
        Compute::Demo { .. } => None,
    };
    let fixed = plan.fixed;
    let metrics = node::metrics::Metrics::new(&peer_id.to_string(), &run.to_string());
    if let Some(addr) = args.network.http {
        let sources = node::http::Sources {
            metrics: metrics.clone(),
            ledger: ledger.clone(),
            chain: chain.clone().map(|c| (c, run.0)),
        };
        node::http::serve(addr, sources).await.with_context(|| format!("cannot serve --http on {addr}"))?;
    }
    let t = &args.timing;
    if let Some((threshold, _)) = plan.asynchronous
        && threshold.as_millis() >= u128::from(t.commit_timeout_ms)
    {
        anyhow::bail!(
            "the run's async_threshold_ms ({} ms) must be below --commit-timeout-ms ({} ms): a slow peer would time \
             out before it commits nothing; raise --commit-timeout-ms or lower the threshold",
            threshold.as_millis(),
            t.commit_timeout_ms
        );
    }
    let cfg = DriverConfig {
        run,
        membership: MembershipConfig {
            heartbeat_us: t.heartbeat_ms * 1000,
            peer_timeout_us: t.peer_timeout_ms * 1000,
            min_peers: plan.min_peers,
            max_peers: fixed.max_peers() as usize,
            batch: plan.batch as u32,
        },
        round: RoundConfig {
            commit_timeout_us: t.commit_timeout_ms * 1000,
            step_timeout_us: t.step_timeout_ms * 1000,
            done_timeout_us: t.done_timeout_ms * 1000,
            republish_us: 1_000_000,
            segment_elems: SEGMENT_ELEMS,
            max_peers: fixed.max_peers() as usize,
            audit_every: plan.audit_every,
            max_units: fixed.max_units(),
            max_norm_units: plan.clip_norm.map_or(0.0, |c| f64::from(c) * f64::from(1u32 << fixed.scale_bits())),
            compression: plan.compression,
            max_staleness: plan.asynchronous.map_or(0, |(_, s)| s),
            group_size: plan.group_size,
        },
        async_threshold: plan.asynchronous.map(|(t, _)| t),
        fixed,
        audit_tolerance: plan.audit_tolerance,
        compute: plan.compute,
        rounds: (plan.rounds > 0).then_some(plan.rounds),
        identity: key,
        open_timeout: Duration::from_millis(t.step_timeout_ms),
        ledger: ledger.clone(),
        chain,
        resume,
        pause_in_round: args.faults.pause_in_round(),
        fault: args.faults.mode(),
        metrics,
    };
    let summary = driver::run(cfg, handle.clone(), events, shutdown_signal()).await;
    // A second Ctrl-C or SIGTERM stops at once; what the outbox holds is sent on the next start.
    tokio::spawn(async {
        shutdown_signal().await;
        warn!("second stop signal: exiting now; the ledger outbox is kept for the next start");
        std::process::exit(130);
    });
    info!(completed = summary.rounds_completed, failed = summary.rounds_failed, syncs = summary.syncs, "stopped");
    if let Some(ledger) = ledger {
        let wait = Duration::from_secs(args.ledger.ledger_flush_timeout_s);
        info!(timeout_s = wait.as_secs(), "flushing the ledger outbox");
        match ledger.finish(wait).await {
            Some(d) => info!(done = d.done, rejected = d.rejected, "ledger outbox flushed"),
            None => warn!(
                timeout_s = wait.as_secs(),
                "ledger records still wait in the outbox; they are sent when this node next starts with this --data-dir"
            ),
        }
    }
    // Let the last gossip (our Done) leave before the swarm goes away.
    tokio::time::sleep(Duration::from_millis(500)).await;
    drop(handle);
    net_task.abort();
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
