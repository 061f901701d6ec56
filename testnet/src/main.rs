//! `testnet`: the local cluster and the all-reduce benchmark.

use clap::{Parser, Subcommand};
use std::time::Duration;
use testnet::{bench, chaos, cluster, sim, train};

#[derive(Debug, Parser)]
#[command(name = "testnet", about = "Run a local cluster of peers, or benchmark the all-reduce")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
    /// Keep every node's log (JSON lines) in this directory, one file per node.
    #[arg(long, global = true)]
    log_dir: Option<std::path::PathBuf>,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// A local chain with the ledger, and N peers on loopback that train a real model on
    /// Fashion-MNIST together; prints progress, the final test accuracy and what the chain
    /// recorded.
    Train {
        #[arg(long, default_value_t = 3)]
        nodes: usize,
        #[arg(long, default_value_t = 900)]
        rounds: u64,
        /// Samples per peer per round.
        #[arg(long, default_value_t = 64)]
        batch: usize,
        /// mlp, cnn or resnet (resnet needs CIFAR-10).
        #[arg(long, default_value = "mlp")]
        model: String,
        #[arg(long, default_value_t = 2e-3)]
        lr: f64,
        /// Rounds per on-chain epoch (K).
        #[arg(long, default_value_t = 100)]
        epoch_rounds: u64,
        /// Evaluate on the test split every N rounds.
        #[arg(long, default_value_t = 300)]
        eval_every: u64,
        /// Audit one round in this many: every peer recomputes another's gradient (0: none).
        #[arg(long, default_value_t = 1)]
        audit_every: u64,
        /// Skip the local chain: no Anvil, nothing recorded.
        #[arg(long)]
        no_chain: bool,
        /// Where the run's report (Markdown and JSON) is written.
        #[arg(long, default_value = "testnet-report")]
        report_dir: std::path::PathBuf,
        /// Local SGD: optimizer steps per peer per round, then an all-reduce of the parameter
        /// deltas (1: one gradient per round).
        #[arg(long, default_value_t = 1)]
        local_steps: u64,
        /// Outer learning rate of local SGD (default 1.0: FedAvg).
        #[arg(long)]
        outer_lr: Option<f64>,
        /// Outer momentum of local SGD (default 0).
        #[arg(long)]
        outer_momentum: Option<f32>,
        /// Gradient compression: int8 (a scale per 256 values) or topk (with error feedback).
        #[arg(long, value_parser = ["none", "int8", "topk"])]
        compression: Option<String>,
        /// topk: the share of values each peer sends per round (default 0.01).
        #[arg(long)]
        topk_fraction: Option<f64>,
        /// Asynchronous rounds: a peer whose gradient is not ready this many milliseconds after
        /// most other peers committed commits nothing and adds its gradient to a later round.
        #[arg(long)]
        async_threshold_ms: Option<u64>,
        /// Asynchronous rounds: how many rounds late a gradient may still join (default 2).
        #[arg(long)]
        max_staleness: Option<u64>,
        /// Make the last peer this many milliseconds slower per gradient, as a slower device
        /// (testnet built with `--features fault-injection` only).
        #[arg(long)]
        slow_peer_ms: Option<u64>,
        /// Hierarchical rounds: rings of this many peers, then rings across the groups (the
        /// peers left over are attached to groups; absent, or fewer than two groups: one ring).
        #[arg(long)]
        group_size: Option<usize>,
    },
    /// A local chain with the ledger and N peers on loopback that all-reduce a deterministic
    /// demonstration vector (exact sums anyone can recompute); prints every round and what
    /// the chain recorded.
    Cluster {
        #[arg(long, default_value_t = 3)]
        nodes: usize,
        #[arg(long, default_value_t = 10)]
        rounds: u64,
        #[arg(long, default_value_t = 1_000_000)]
        vector_len: usize,
        #[arg(long, default_value = "testnet")]
        run: String,
        /// Skip the local chain: no Anvil, nothing recorded.
        #[arg(long)]
        no_chain: bool,
        /// Rounds per on-chain epoch (K).
        #[arg(long, default_value_t = 5)]
        epoch_rounds: u64,
    },
    /// Peers train on a local chain while they are killed (SIGKILL) or stopped (SIGTERM) at
    /// random and restarted from their data directories; then checks that they held the same
    /// parameters, that the finalized checkpoints are their hashes, and that the chain shows
    /// exactly the rounds each did; reports recovery times.
    Chaos {
        #[arg(long, default_value_t = 5)]
        nodes: usize,
        /// How long peers are killed and restarted.
        #[arg(long, default_value_t = 600)]
        duration_s: u64,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Mean seconds between two stops.
        #[arg(long, default_value_t = 8.0)]
        mean_interval_s: f64,
        /// Longest seconds a stopped peer stays down.
        #[arg(long, default_value_t = 15)]
        max_downtime_s: u64,
        /// Stops never leave fewer live peers than this.
        #[arg(long, default_value_t = 2)]
        min_alive: usize,
        /// Share of stops that are SIGTERM (clean leaves), in percent; the rest are SIGKILL.
        #[arg(long, default_value_t = 25)]
        graceful_percent: u64,
        /// Samples per peer per round.
        #[arg(long, default_value_t = 32)]
        batch: usize,
        /// Rounds per on-chain epoch (K).
        #[arg(long, default_value_t = 50)]
        epoch_rounds: u64,
        /// Write every node process's log to this directory (JSON lines).
        #[arg(long)]
        logs: Option<std::path::PathBuf>,
    },
    /// All-reduce between N node processes next to the TCP ceiling of this machine.
    Bench {
        #[arg(long, default_value_t = 4)]
        peers: usize,
        /// Vector sizes in values (f32), comma separated.
        #[arg(long, value_delimiter = ',', default_values_t = [1usize << 20, 16 << 20, 64 << 20])]
        sizes: Vec<usize>,
        #[arg(long, default_value_t = 5)]
        rounds: u64,
        /// Also run torch.distributed's all-reduce (gloo backend) on the same sizes and peer
        /// count with this Python interpreter (`testnet/gloo/setup` makes one with torch).
        #[arg(long)]
        gloo: Option<std::path::PathBuf>,
        /// Also run Open MPI's MPI_Allreduce (its TCP transport on loopback) on the same sizes
        /// and peer count with this binary (`testnet/mpi/setup` builds it).
        #[arg(long)]
        mpi: Option<std::path::PathBuf>,
        /// How node processes move ring payloads (`direct` or `libp2p`).
        #[arg(long, default_value = "direct")]
        ring_transport: String,
        /// Also all-reduce compressed vectors (int8, topk; comma separated) and report their
        /// effective bandwidth (f32 bytes over time) next to the uncompressed ring.
        #[arg(long, value_delimiter = ',', value_parser = ["int8", "topk"])]
        compression: Vec<String>,
    },
    /// Rounds of 16 to 1,000 peers on simulated WAN links (ring, hierarchical, local SGD),
    /// with failures; calibrated on this machine and checked against the real all-reduce.
    Simulate(sim::SimOpts),
    /// One peer of the TCP ceiling measurement (started by `bench`).
    #[command(hide = true)]
    TcpPeer {
        #[arg(long)]
        send: u64,
        #[arg(long)]
        recv: u64,
        #[arg(long, default_value_t = 0)]
        span: usize,
    },
}

fn main() -> anyhow::Result<()> {
    testnet::process::stop_on_signals();
    let cli = Cli::parse();
    if let Some(dir) = &cli.log_dir {
        testnet::process::keep_logs_in(dir)
            .map_err(|e| anyhow::anyhow!("cannot keep node logs in {}: {e}; pass another --log-dir", dir.display()))?;
    }
    match cli.command {
        Cmd::Train {
            nodes,
            rounds,
            batch,
            model,
            lr,
            epoch_rounds,
            eval_every,
            audit_every,
            no_chain,
            report_dir,
            local_steps,
            outer_lr,
            outer_momentum,
            compression,
            topk_fraction,
            async_threshold_ms,
            max_staleness,
            slow_peer_ms,
            group_size,
        } => train::run(&train::TrainOpts {
            nodes,
            rounds,
            batch,
            model,
            lr,
            epoch_rounds,
            eval_every,
            audit_every,
            chain: !no_chain,
            report_dir,
            local_steps,
            outer_lr,
            outer_momentum,
            compression,
            topk_fraction,
            async_threshold_ms,
            max_staleness,
            slow_peer_ms,
            group_size,
        }),
        Cmd::Cluster { nodes, rounds, vector_len, run, no_chain, epoch_rounds } => {
            cluster::run(&cluster::ClusterOpts { nodes, rounds, vector_len, run, chain: !no_chain, epoch_rounds })
        }
        Cmd::Chaos {
            nodes,
            duration_s,
            seed,
            mean_interval_s,
            max_downtime_s,
            min_alive,
            graceful_percent,
            batch,
            epoch_rounds,
            logs,
        } => chaos::run(&chaos::ChaosOpts {
            nodes,
            duration: Duration::from_secs(duration_s),
            seed,
            mean_interval: Duration::from_secs_f64(mean_interval_s.max(0.1)),
            max_downtime: Duration::from_secs(max_downtime_s.max(1)),
            min_alive,
            graceful_percent: graceful_percent.min(100),
            batch,
            epoch_rounds,
            logs,
        }),
        Cmd::Simulate(opts) => sim::run(&opts),
        Cmd::Bench { peers, sizes, rounds, gloo, mpi, ring_transport, compression } => {
            bench::run(&bench::BenchOpts { peers, sizes, rounds, gloo, mpi, ring_transport, compression })
        }
        Cmd::TcpPeer { send, recv, span } => bench::tcp_peer(send, recv, span),
    }
}
