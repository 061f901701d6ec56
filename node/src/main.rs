//! `node`: parses the command line, sets up logging, and runs the peer.

use anyhow::Context;
use clap::Parser;
use node::cli::{Cli, Command, LogFormat, StartArgs};
use node::driver::{self, DriverConfig};
use node::{net, store::Store};
use p2p_proto::FixedPoint;
use p2p_proto::chunk::SEGMENT_ELEMS;
use p2p_proto::membership::MembershipConfig;
use p2p_proto::message::RunId;
use p2p_proto::round::RoundConfig;
use std::time::Duration;
use tracing::info;
use tracing_subscriber::EnvFilter;

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
    }
}

async fn start(args: StartArgs) -> anyhow::Result<()> {
    let store = Store::open(&args.network.data_dir)?;
    let key = store.identity()?;
    let run = RunId::from_name(&args.run.run);
    info!(peer_id = %key.public().to_peer_id(), run = %run, data_dir = %args.network.data_dir.display(), "starting");
    let (handle, events, event_loop) = net::new(
        key,
        net::NetConfig { listen: args.network.listen, bootstrap: args.network.bootstrap, topic: run.topic() },
    )?;
    let net_task = tokio::spawn(event_loop.run());
    let fixed = FixedPoint::default();
    let t = &args.timing;
    let cfg = DriverConfig {
        run,
        membership: MembershipConfig {
            heartbeat_us: t.heartbeat_ms * 1000,
            peer_timeout_us: t.peer_timeout_ms * 1000,
            min_peers: args.run.min_peers,
            max_peers: fixed.max_peers() as usize,
        },
        round: RoundConfig {
            commit_timeout_us: t.commit_timeout_ms * 1000,
            step_timeout_us: t.step_timeout_ms * 1000,
            done_timeout_us: t.done_timeout_ms * 1000,
            republish_us: 1_000_000,
            segment_elems: SEGMENT_ELEMS,
            max_peers: fixed.max_peers() as usize,
        },
        fixed,
        demo_len: args.run.demo_vector_len,
        rounds: (args.run.rounds > 0).then_some(args.run.rounds),
        open_timeout: Duration::from_millis(t.step_timeout_ms),
    };
    let summary = driver::run(cfg, handle.clone(), events, shutdown_signal()).await;
    info!(completed = summary.rounds_completed, failed = summary.rounds_failed, "stopped");
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
