//! `testnet`: the local cluster and the all-reduce benchmark.

use clap::{Parser, Subcommand};
use testnet::{bench, cluster};

#[derive(Debug, Parser)]
#[command(name = "testnet", about = "Run a local cluster of peers, or benchmark the all-reduce")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Start a local chain with the ledger and N peers on loopback, run a bounded number of
    /// rounds, print every round and what the chain recorded.
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
    match Cli::parse().command {
        Cmd::Cluster { nodes, rounds, vector_len, run, no_chain, epoch_rounds } => {
            cluster::run(&cluster::ClusterOpts { nodes, rounds, vector_len, run, chain: !no_chain, epoch_rounds })
        }
        Cmd::Bench { peers, sizes, rounds } => bench::run(&bench::BenchOpts { peers, sizes, rounds }),
        Cmd::TcpPeer { send, recv } => bench::tcp_peer(send, recv),
    }
}
