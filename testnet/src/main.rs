//! `testnet`: the local cluster and the all-reduce benchmark.

use clap::{Parser, Subcommand};
use testnet::{bench, cluster, train};

#[derive(Debug, Parser)]
#[command(name = "testnet", about = "Run a local cluster of peers, or benchmark the all-reduce")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
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
        /// Skip the local chain: no Anvil, nothing recorded.
        #[arg(long)]
        no_chain: bool,
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
    /// All-reduce between N node processes next to the TCP ceiling of this machine.
    Bench {
        #[arg(long, default_value_t = 4)]
        peers: usize,
        /// Vector sizes in values (f32), comma separated.
        #[arg(long, value_delimiter = ',', default_values_t = [1usize << 20, 16 << 20, 64 << 20])]
        sizes: Vec<usize>,
        #[arg(long, default_value_t = 5)]
        rounds: u64,
    },
    /// One peer of the TCP ceiling measurement (started by `bench`).
    #[command(hide = true)]
    TcpPeer {
        #[arg(long)]
        send: u64,
        #[arg(long)]
        recv: u64,
    },
}

fn main() -> anyhow::Result<()> {
    testnet::process::stop_on_signals();
    match Cli::parse().command {
        Cmd::Train { nodes, rounds, batch, model, lr, epoch_rounds, eval_every, no_chain } => {
            train::run(&train::TrainOpts {
                nodes,
                rounds,
                batch,
                model,
                lr,
                epoch_rounds,
                eval_every,
                chain: !no_chain,
            })
        }
        Cmd::Cluster { nodes, rounds, vector_len, run, no_chain, epoch_rounds } => {
            cluster::run(&cluster::ClusterOpts { nodes, rounds, vector_len, run, chain: !no_chain, epoch_rounds })
        }
        Cmd::Bench { peers, sizes, rounds } => bench::run(&bench::BenchOpts { peers, sizes, rounds }),
        Cmd::TcpPeer { send, recv } => bench::tcp_peer(send, recv),
    }
}
