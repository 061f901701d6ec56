//! Command line of the `node` binary. Every flag can also come from the
//! environment (`DTRAIN_*`).

use alloy::primitives::{Address, B256};
use clap::{Args, Parser, Subcommand, ValueEnum};
use libp2p::Multiaddr;
use p2p_proto::message::RunId;
use std::path::PathBuf;

#[derive(Debug, Parser)]
#[command(name = "node", version, about = "A peer of the decentralized trainer")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// Log format: text for people, json for tools.
    #[arg(long, global = true, env = "DTRAIN_LOG_FORMAT", default_value = "text")]
    pub log_format: LogFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

// Parsed once per process: the size of the largest variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Join (or start) a run: discover peers, agree on rings, all-reduce each round.
    Start(StartArgs),
    /// Train alone: the single-peer baseline a distributed run is compared to.
    Train(TrainArgs),
    /// Deploy the TrainingLedger contract and print its address.
    Deploy(DeployArgs),
    /// Print a run's contribution records from the ledger.
    Contributions(ContributionsArgs),
    /// Print a run's finalized checkpoints from the ledger.
    Checkpoints(CheckpointsArgs),
    /// Print what a running node reports about itself (its `--http` endpoint's /status).
    Status(StatusArgs),
    /// Send one ledger record by hand and wait for it to be mined (peers do this themselves,
    /// through their outbox; this is for operators and scripts).
    #[command(subcommand)]
    Submit(SubmitCommand),
}

/// Parses `--run`: a run id (0x and 64 hex digits) or a run name, whose id is its blake3.
pub fn parse_run(s: &str) -> Result<RunId, String> {
    if let Some(h) = s.strip_prefix("0x") {
        let bytes = hex::decode(h).map_err(|e| format!("run id `{s}` is not hex: {e}"))?;
        let id: [u8; 32] = bytes.try_into().map_err(|_| format!("run id `{s}` must be 32 bytes (64 hex digits)"))?;
        return Ok(RunId(id));
    }
    if s.is_empty() {
        return Err("the run name is empty".into());
    }
    Ok(RunId::from_name(s))
}

/// The chain endpoint, the ledger contract, and this peer's Ethereum key.
#[derive(Debug, Clone, Args)]
pub struct ChainArgs {
    /// JSON-RPC endpoint of the chain (a local Anvil by default; any EVM chain works).
    #[arg(long, env = "DTRAIN_RPC_URL", default_value = "http://127.0.0.1:8545")]
    pub rpc_url: String,
    /// Address of the TrainingLedger contract. A peer started without it records nothing on chain.
    #[arg(long, env = "DTRAIN_CONTRACT")]
    pub contract: Option<Address>,
    /// File with this peer's hex private key (else the DTRAIN_ETH_KEY environment variable).
    /// The key is never printed or logged.
    #[arg(long, env = "DTRAIN_ETH_KEY_FILE")]
    pub eth_key_file: Option<PathBuf>,
}

impl ChainArgs {
    /// The contract address, or an error saying how to get one.
    pub fn contract(&self) -> anyhow::Result<Address> {
        self.contract.ok_or_else(|| {
            anyhow::anyhow!("no ledger contract: pass --contract <address> (deploy one with `node deploy`)")
        })
    }
}

/// How a started peer records its work on chain.
#[derive(Debug, Clone, Args)]
pub struct LedgerArgs {
    /// K: the peer records its contribution and votes its parameter hash every K rounds.
    #[arg(long, env = "DTRAIN_EPOCH_ROUNDS", default_value_t = 10)]
    pub epoch_rounds: u64,
    /// Share of registered peers (basis points) whose identical votes finalize a checkpoint.
    #[arg(long, env = "DTRAIN_QUORUM_BPS", default_value_t = 6667)]
    pub quorum_bps: u16,
    /// Fewest votes that finalize a checkpoint, whatever the share.
    #[arg(long, env = "DTRAIN_MIN_VOTES", default_value_t = 1)]
    pub min_votes: u16,
    /// On exit, wait this long for the ledger outbox to empty; what remains is sent on the
    /// next start with the same --data-dir.
    #[arg(long, env = "DTRAIN_LEDGER_FLUSH_TIMEOUT_S", default_value_t = 60)]
    pub ledger_flush_timeout_s: u64,
}

#[derive(Debug, Args)]
pub struct DeployArgs {
    #[command(flatten)]
    pub chain: ChainArgs,
}

#[derive(Debug, Args)]
pub struct ContributionsArgs {
    #[command(flatten)]
    pub chain: ChainArgs,
    /// Run id (0x...) or run name.
    #[arg(long, value_parser = parse_run)]
    pub run: RunId,
    /// Only this account, with its record for every epoch.
    #[arg(long)]
    pub peer: Option<Address>,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct CheckpointsArgs {
    #[command(flatten)]
    pub chain: ChainArgs,
    /// Run id (0x...) or run name.
    #[arg(long, value_parser = parse_run)]
    pub run: RunId,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct SubmitTarget {
    #[command(flatten)]
    pub chain: ChainArgs,
    /// Run id (0x...) or run name.
    #[arg(long, value_parser = parse_run)]
    pub run: RunId,
}

#[derive(Debug, Subcommand)]
pub enum SubmitCommand {
    /// Create a run.
    CreateRun {
        #[command(flatten)]
        target: SubmitTarget,
        #[arg(long)]
        config_hash: B256,
        #[command(flatten)]
        ledger: LedgerArgs,
    },
    /// Register this account as the libp2p peer `--peer-id` (base58).
    Register {
        #[command(flatten)]
        target: SubmitTarget,
        #[arg(long)]
        peer_id: libp2p::PeerId,
    },
    /// Record this account's contribution for an epoch.
    Contribution {
        #[command(flatten)]
        target: SubmitTarget,
        #[arg(long)]
        epoch: u64,
        /// Which of this account's records for the epoch (0 unless it left and came back within it).
        #[arg(long, default_value_t = 0)]
        part: u32,
        #[arg(long)]
        rounds: u64,
        #[arg(long)]
        samples: u64,
        #[arg(long)]
        commit_root: B256,
    },
    /// Vote a parameter hash for a round.
    Vote {
        #[command(flatten)]
        target: SubmitTarget,
        #[arg(long)]
        round: u64,
        #[arg(long)]
        param_hash: B256,
    },
    /// Report a proven fault of a registered peer.
    Fault {
        #[command(flatten)]
        target: SubmitTarget,
        #[arg(long)]
        accused: Address,
        #[arg(long)]
        round: u64,
        #[arg(long)]
        kind: u8,
        #[arg(long)]
        evidence: B256,
    },
}

/// Models `node train` and a run can use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ModelKind {
    Mlp,
    Cnn,
    Resnet,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OptimizerKind {
    Adam,
    Sgd,
}

/// Compute backends; GPU ones exist only in builds with their cargo feature.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Backend {
    /// burn's pure-Rust CPU backend (flex), bit-exact run to run.
    Cpu,
    /// Vulkan GPUs (build with `--features vulkan`).
    Vulkan,
    /// NVIDIA GPUs (build with `--features cuda`).
    Cuda,
}

#[derive(Debug, Args)]
pub struct TrainArgs {
    /// Directory with IDX (MNIST, Fashion-MNIST) or CIFAR-10 binary files.
    #[arg(long, env = "DTRAIN_DATASET", default_value = crate::train::data::DEFAULT_DATASET_DIR)]
    pub dataset: PathBuf,
    #[arg(long, env = "DTRAIN_MODEL", value_enum, default_value = "mlp")]
    pub model: ModelKind,
    #[arg(long, env = "DTRAIN_EPOCHS", default_value_t = 5)]
    pub epochs: u64,
    /// Samples per step.
    #[arg(long, env = "DTRAIN_BATCH", default_value_t = 64)]
    pub batch: usize,
    #[arg(long, env = "DTRAIN_OPTIMIZER", value_enum, default_value = "adam")]
    pub optimizer: OptimizerKind,
    /// Peak learning rate (warm-up, then cosine decay over the run).
    #[arg(long, env = "DTRAIN_LR", default_value_t = 1e-3)]
    pub lr: f64,
    /// Gradients are clipped to this global L2 norm.
    #[arg(long, env = "DTRAIN_CLIP_NORM", default_value_t = 5.0)]
    pub clip_norm: f32,
    /// Seeds the initial parameters and the sample order.
    #[arg(long, env = "DTRAIN_SEED", default_value_t = 1)]
    pub seed: u64,
    /// Use only the first N training samples (0: all).
    #[arg(long, default_value_t = 0)]
    pub train_limit: usize,
    /// Evaluate on only the first N test samples (0: all).
    #[arg(long, default_value_t = 0)]
    pub test_limit: usize,
    /// Stop after this many steps (0: after the epochs).
    #[arg(long, default_value_t = 0)]
    pub max_steps: u64,
    /// Log loss, gradient hash and parameter hash every N steps (0: only per epoch).
    #[arg(long, default_value_t = 0)]
    pub log_every: u64,
    /// Write a checkpoint (safetensors) here at the end.
    #[arg(long)]
    pub checkpoint: Option<PathBuf>,
    /// Resume from this checkpoint.
    #[arg(long)]
    pub resume: Option<PathBuf>,
    #[arg(long, env = "DTRAIN_BACKEND", value_enum, default_value = "cpu")]
    pub backend: Backend,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// The node's HTTP endpoint (its --http address).
    #[arg(long, env = "DTRAIN_HTTP", default_value = "127.0.0.1:9100")]
    pub http: String,
    /// Print the JSON as served.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct StartArgs {
    #[command(flatten)]
    pub network: NetworkArgs,
    #[command(flatten)]
    pub run: RunArgs,
    #[command(flatten)]
    pub timing: TimingArgs,
    #[command(flatten)]
    pub chain: ChainArgs,
    #[command(flatten)]
    pub ledger: LedgerArgs,
    #[command(flatten)]
    pub faults: FaultArgs,
}

/// Test hooks: they exist only in builds with the `fault-injection` feature, which release
/// builds never enable.
#[derive(Debug, Args)]
pub struct FaultArgs {
    /// Freeze in the middle of this round's all-reduce, as a peer that hangs (the tests then
    /// kill it).
    #[cfg(feature = "fault-injection")]
    #[arg(long, hide = true)]
    pub fault_pause_in_round: Option<u64>,
    /// Lie in this way every round: random-gradient, scale-1000, nan, commit-mismatch,
    /// drop-contribution, spike, corrupt-in-transit, replay, withhold (random-gradient that
    /// never reveals its values) or withhold-silent (the same, closing reveal requests
    /// unanswered); or run as an honest peer on a backend that is not bit-exact: inexact.
    #[cfg(feature = "fault-injection")]
    #[arg(long, hide = true)]
    pub fault_mode: Option<crate::driver::FaultMode>,
    /// Compute this many milliseconds longer for every gradient, as a peer on a slower device.
    #[cfg(feature = "fault-injection")]
    #[arg(long, hide = true)]
    pub fault_slow_compute_ms: Option<u64>,
}

impl FaultArgs {
    /// The round to freeze in, if any.
    pub fn pause_in_round(&self) -> Option<u64> {
        #[cfg(feature = "fault-injection")]
        return self.fault_pause_in_round;
        #[cfg(not(feature = "fault-injection"))]
        None
    }

    /// How much longer every gradient takes (zero: as long as it takes).
    pub fn slow_compute(&self) -> std::time::Duration {
        #[cfg(feature = "fault-injection")]
        return std::time::Duration::from_millis(self.fault_slow_compute_ms.unwrap_or(0));
        #[cfg(not(feature = "fault-injection"))]
        std::time::Duration::ZERO
    }

    /// The misbehaviour to act out, if any.
    pub fn mode(&self) -> Option<crate::driver::FaultMode> {
        #[cfg(feature = "fault-injection")]
        return self.fault_mode;
        #[cfg(not(feature = "fault-injection"))]
        None
    }
}

/// How ring payloads travel between neighbours.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum RingTransport {
    Direct,
    Libp2p,
}

/// Where the peer listens, whom it bootstraps from, where it keeps its state.
#[derive(Debug, Args)]
pub struct NetworkArgs {
    /// Address to listen on (repeatable).
    #[arg(long, env = "DTRAIN_LISTEN", value_delimiter = ',', default_value = "/ip4/0.0.0.0/tcp/4001")]
    pub listen: Vec<Multiaddr>,
    /// Full address of a peer already in the run, with /p2p/<peer id> (repeatable).
    #[arg(long, env = "DTRAIN_BOOTSTRAP", value_delimiter = ',')]
    pub bootstrap: Vec<Multiaddr>,
    /// How ring payloads travel: `direct` moves them over plain TCP connections beside the
    /// libp2p connection (frames stay signed and hash-checked; the connection's encryption
    /// is skipped), falling back to the libp2p stream where a neighbour's port cannot be
    /// reached; `libp2p` keeps them on encrypted libp2p streams.
    #[arg(long, env = "DTRAIN_RING_TRANSPORT", value_enum, default_value = "direct")]
    pub ring_transport: RingTransport,
    /// TCP port for direct ring payloads (0: an ephemeral one); set it to open it in a
    /// firewall. A neighbour that cannot reach it writes on the libp2p stream instead.
    #[arg(long, env = "DTRAIN_RING_PORT", default_value_t = 0)]
    pub ring_port: u16,
    /// Directory for the identity key and local state.
    #[arg(long, env = "DTRAIN_DATA_DIR", default_value = ".dtrain")]
    pub data_dir: PathBuf,
    /// Serve /metrics (Prometheus), /status (JSON) and a dashboard on this address (off by
    /// default; keep it on loopback unless a proxy guards it; port 0 picks a free one).
    #[arg(long, env = "DTRAIN_HTTP")]
    pub http: Option<std::net::SocketAddr>,
}

/// What the peer trains (for now: all-reduces) and for how long.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Name of the run; peers of one run find each other on its gossip topic.
    #[arg(long = "run", env = "DTRAIN_RUN", default_value = "demo")]
    pub run: String,
    /// Peers to wait for before the first round.
    #[arg(long, env = "DTRAIN_MIN_PEERS", default_value_t = 2)]
    pub min_peers: usize,
    /// Stop after this many rounds (0: run until stopped).
    #[arg(long, env = "DTRAIN_ROUNDS", default_value_t = 0)]
    pub rounds: u64,
    /// Length of the deterministic pseudo-random vector all-reduced each round (without --config).
    #[arg(long, env = "DTRAIN_DEMO_VECTOR_LEN", default_value_t = 1_000_000)]
    pub demo_vector_len: usize,
    /// Compress the demonstration vector (without --config) as a run would: int8 (a scale
    /// per 256 values) or topk (1% of the values, with error feedback).
    #[arg(long, env = "DTRAIN_DEMO_COMPRESSION", default_value = "none", value_parser = ["none", "int8", "topk"])]
    pub demo_compression: String,
    /// All-reduce the demonstration vector (without --config) hierarchically, in groups of
    /// this many peers (0: the plain ring); as a run's `group_size`.
    #[arg(long, env = "DTRAIN_DEMO_GROUP_SIZE", default_value_t = 0)]
    pub demo_group_size: usize,
    /// Train under this run configuration (TOML): the run id, rounds, peers and ledger
    /// settings come from it; --run, if a run id (0x...), must match it.
    #[arg(long, env = "DTRAIN_CONFIG")]
    pub config: Option<PathBuf>,
    /// Samples this peer contributes per round (with --config; default: the run's batch).
    /// Peers on faster hardware take more; the average weighs each peer by its samples.
    #[arg(long, env = "DTRAIN_BATCH")]
    pub batch: Option<usize>,
    /// The training data (with --config); its hash must match the run's.
    #[arg(long, env = "DTRAIN_DATASET", default_value = crate::train::data::DEFAULT_DATASET_DIR)]
    pub dataset: PathBuf,
    #[arg(long, env = "DTRAIN_BACKEND", value_enum, default_value = "cpu")]
    pub backend: Backend,
}

/// Failure detection and timeouts, in milliseconds. A peer whose connection closes is taken
/// as gone at once; one that hangs, after --peer-timeout-ms without a heartbeat; a ring that
/// stalls fails after the commit, step or done timeout.
#[derive(Debug, Args)]
pub struct TimingArgs {
    /// How often a peer gossips its heartbeat.
    #[arg(long, env = "DTRAIN_HEARTBEAT_MS", default_value_t = 500)]
    pub heartbeat_ms: u64,
    /// A peer silent for this long is taken as gone.
    #[arg(long, env = "DTRAIN_PEER_TIMEOUT_MS", default_value_t = 3000)]
    pub peer_timeout_ms: u64,
    /// Longest wait for every member's gradient commit (a joiner fetches the ring's state in
    /// this time).
    #[arg(long, env = "DTRAIN_COMMIT_TIMEOUT_MS", default_value_t = 10_000)]
    pub commit_timeout_ms: u64,
    /// Longest wait for the next ring segment.
    #[arg(long, env = "DTRAIN_STEP_TIMEOUT_MS", default_value_t = 10_000)]
    pub step_timeout_ms: u64,
    /// Longest wait for every member's Done once this peer holds the sum.
    #[arg(long, env = "DTRAIN_DONE_TIMEOUT_MS", default_value_t = 10_000)]
    pub done_timeout_ms: u64,
}

/// The longest timeout or interval the flags take (a day): far beyond any use, and its
/// microseconds fit every clock sum.
const MAX_TIMING_MS: u64 = 86_400_000;

impl TimingArgs {
    /// Refuses settings no ring can work with, naming the flag and what to do.
    pub fn check(&self) -> Result<(), String> {
        let flags = [
            ("--heartbeat-ms", self.heartbeat_ms),
            ("--peer-timeout-ms", self.peer_timeout_ms),
            ("--commit-timeout-ms", self.commit_timeout_ms),
            ("--step-timeout-ms", self.step_timeout_ms),
            ("--done-timeout-ms", self.done_timeout_ms),
        ];
        for (flag, ms) in flags {
            if !(1..=MAX_TIMING_MS).contains(&ms) {
                return Err(format!("{flag} {ms} must be between 1 and {MAX_TIMING_MS} (a day)"));
            }
        }
        if self.peer_timeout_ms < 2 * self.heartbeat_ms {
            return Err(format!(
                "--peer-timeout-ms {} must be at least twice --heartbeat-ms {}: a peer is taken as gone after one \
                 lost heartbeat otherwise, and rings keep failing; raise the timeout or gossip heartbeats more often",
                self.peer_timeout_ms, self.heartbeat_ms
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timing_that_no_ring_can_work_with_is_refused_naming_the_flag() {
        let t = |hb: u64, peer: u64, step: u64| TimingArgs {
            heartbeat_ms: hb,
            peer_timeout_ms: peer,
            commit_timeout_ms: 10_000,
            step_timeout_ms: step,
            done_timeout_ms: 10_000,
        };
        assert_eq!(t(500, 3000, 10_000).check(), Ok(()));
        assert!(t(500, 0, 10_000).check().unwrap_err().starts_with("--peer-timeout-ms 0"));
        assert!(t(500, 400, 10_000).check().unwrap_err().contains("at least twice --heartbeat-ms"));
        assert!(t(500, 3000, u64::MAX).check().unwrap_err().starts_with("--step-timeout-ms"));
        assert!(t(0, 3000, 10_000).check().unwrap_err().starts_with("--heartbeat-ms 0"));
    }

    #[test]
    fn start_parses_every_group() {
        let cli = Cli::try_parse_from([
            "node",
            "start",
            "--listen",
            "/ip4/127.0.0.1/tcp/0",
            "--bootstrap",
            "/ip4/127.0.0.1/tcp/4001/p2p/12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN",
            "--run",
            "r1",
            "--min-peers",
            "4",
            "--rounds",
            "5",
            "--step-timeout-ms",
            "1500",
            "--log-format",
            "json",
        ])
        .unwrap();
        let Command::Start(s) = cli.command else { panic!("start") };
        assert_eq!(s.network.listen.len(), 1);
        assert_eq!(s.network.bootstrap.len(), 1);
        assert_eq!((s.run.run.as_str(), s.run.min_peers, s.run.rounds), ("r1", 4, 5));
        assert_eq!(s.timing.step_timeout_ms, 1500);
        assert_eq!(cli.log_format, LogFormat::Json);
    }

    #[test]
    fn train_parses_with_defaults() {
        let cli =
            Cli::try_parse_from(["node", "train", "--model", "cnn", "--epochs", "2", "--optimizer", "sgd"]).unwrap();
        let Command::Train(t) = cli.command else { panic!("train") };
        assert_eq!((t.model, t.epochs, t.optimizer, t.batch), (ModelKind::Cnn, 2, OptimizerKind::Sgd, 64));
        assert_eq!(t.dataset, PathBuf::from(crate::train::data::DEFAULT_DATASET_DIR));
        assert_eq!(t.backend, Backend::Cpu);
    }

    #[test]
    fn ledger_commands_parse() {
        let cli = Cli::try_parse_from([
            "node",
            "contributions",
            "--run",
            "demo",
            "--peer",
            "0xf39Fd6e51aad88F6F4ce6aB8827279cffFb92266",
            "--contract",
            "0x5FbDB2315678afecb367f032d93F642f64180aa3",
            "--json",
        ])
        .unwrap();
        let Command::Contributions(c) = cli.command else { panic!("contributions") };
        assert_eq!(c.run, RunId::from_name("demo"));
        assert!(c.json && c.peer.is_some() && c.chain.contract.is_some());
        assert_eq!(c.chain.rpc_url, "http://127.0.0.1:8545");

        let id = format!("0x{}", "ab".repeat(32));
        let cli = Cli::try_parse_from(["node", "checkpoints", "--run", &id]).unwrap();
        let Command::Checkpoints(c) = cli.command else { panic!("checkpoints") };
        assert_eq!(c.run, RunId([0xab; 32]));
        assert!(c.chain.contract().unwrap_err().to_string().contains("node deploy"));

        let cli = Cli::try_parse_from([
            "node",
            "submit",
            "vote",
            "--run",
            "demo",
            "--round",
            "9",
            "--param-hash",
            &id,
            "--eth-key-file",
            "/k",
        ])
        .unwrap();
        let Command::Submit(SubmitCommand::Vote { round, .. }) = cli.command else { panic!("vote") };
        assert_eq!(round, 9);
    }

    #[test]
    fn bad_ledger_arguments_name_what_is_wrong() {
        let err = Cli::try_parse_from(["node", "checkpoints", "--run", "0x1234"]).unwrap_err().to_string();
        assert!(err.contains("64 hex digits"), "{err}");
        let err =
            Cli::try_parse_from(["node", "contributions", "--run", "r", "--peer", "0x12"]).unwrap_err().to_string();
        assert!(err.contains("--peer"), "{err}");
    }

    #[test]
    fn a_bad_multiaddr_is_refused_with_the_flag_named() {
        let err = Cli::try_parse_from(["node", "start", "--bootstrap", "127.0.0.1:4001"]).unwrap_err();
        assert!(err.to_string().contains("--bootstrap"), "{err}");
    }
}
