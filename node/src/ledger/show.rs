//! Reading the ledger for people (tables) and tools (`--json`): the
//! `contributions` and `checkpoints` commands.

use super::client::{Client, ClientError};
use alloy::primitives::{Address, B256};
use serde::Serialize;

/// Entries read per call when paging through a list.
const PAGE: u64 = 256;

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct RunInfo {
    pub run: String,
    pub config_hash: String,
    pub creator: String,
    pub epoch_rounds: u64,
    pub quorum_bps: u16,
    pub min_votes: u16,
    pub peers: u32,
    pub quorum_threshold: u32,
    pub finalized: u64,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct PeerTotals {
    pub address: String,
    pub peer_id: String,
    pub epochs: u64,
    pub rounds: u64,
    pub samples: u128,
    pub faults: u32,
}

/// One contribution record: a peer's work in an epoch, or in one stretch of it (`part`) when
/// the peer left and came back within the epoch.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct EpochRecord {
    pub epoch: u64,
    pub part: u32,
    pub rounds: u64,
    pub samples: u64,
    pub commit_root: String,
    pub block: u64,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct CheckpointRow {
    pub round: u64,
    pub param_hash: String,
    pub votes: u32,
    pub block: u64,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Contributions {
    pub run: RunInfo,
    pub peers: Vec<PeerTotals>,
    /// Its contribution records in recording order, when one peer was asked for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub epochs: Option<Vec<EpochRecord>>,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Checkpoints {
    pub run: RunInfo,
    pub checkpoints: Vec<CheckpointRow>,
    pub latest: Option<CheckpointRow>,
}

fn peer_id_text(bytes: &[u8]) -> String {
    libp2p::PeerId::from_bytes(bytes).map(|p| p.to_base58()).unwrap_or_else(|_| format!("0x{}", hex::encode(bytes)))
}

pub async fn run_info(client: &Client, run: B256) -> Result<RunInfo, ClientError> {
    let c = client.contract();
    let r = client.read(c.getRun(run).call()).await?;
    let threshold = client.read(c.quorumThreshold(run).call()).await?;
    Ok(RunInfo {
        run: run.to_string(),
        config_hash: r.configHash.to_string(),
        creator: r.creator.to_string(),
        epoch_rounds: r.epochRounds,
        quorum_bps: r.quorumBps,
        min_votes: r.minVotes,
        peers: r.peerCount,
        quorum_threshold: threshold,
        finalized: r.finalizedCount,
    })
}

async fn peer_totals(client: &Client, run: B256, peer: Address) -> Result<PeerTotals, ClientError> {
    let info = client.read(client.contract().peerInfo(run, peer).call()).await?;
    Ok(PeerTotals {
        address: peer.to_string(),
        peer_id: if info.registered { peer_id_text(&info.libp2pPeerId) } else { "(not registered)".into() },
        epochs: info.totals.epochs,
        rounds: info.totals.rounds,
        samples: info.totals.samples,
        faults: info.totals.faults,
    })
}

/// Every registered peer's totals, or one peer's totals and per-epoch records.
pub async fn contributions(client: &Client, run: B256, peer: Option<Address>) -> Result<Contributions, ClientError> {
    let info = run_info(client, run).await?;
    let c = client.contract();
    let Some(peer) = peer else {
        let mut peers = Vec::new();
        let mut offset = 0u64;
        loop {
            let page = client.read(c.peers(run, offset.try_into().unwrap(), PAGE.try_into().unwrap()).call()).await?;
            for p in &page {
                peers.push(peer_totals(client, run, *p).await?);
            }
            if (page.len() as u64) < PAGE {
                break;
            }
            offset += PAGE;
        }
        return Ok(Contributions { run: info, peers, epochs: None });
    };
    let totals = peer_totals(client, run, peer).await?;
    let mut epochs = Vec::new();
    let mut offset = 0u64;
    loop {
        let page = client
            .read(c.contributions(run, peer, offset.try_into().unwrap(), PAGE.try_into().unwrap()).call())
            .await?;
        let n = page.len() as u64;
        epochs.extend(page.into_iter().map(|r| EpochRecord {
            epoch: r.epoch,
            part: r.part,
            rounds: r.rounds,
            samples: r.samples,
            commit_root: r.commitRoot.to_string(),
            block: r.recordedAt,
        }));
        if n < PAGE {
            break;
        }
        offset += PAGE;
    }
    Ok(Contributions { run: info, peers: vec![totals], epochs: Some(epochs) })
}

/// The run's finalized checkpoints, in finalization order, and the latest one.
pub async fn checkpoints(client: &Client, run: B256) -> Result<Checkpoints, ClientError> {
    let info = run_info(client, run).await?;
    let c = client.contract();
    let mut rows = Vec::new();
    let mut offset = 0u64;
    loop {
        let page = client.read(c.checkpoints(run, offset.try_into().unwrap(), PAGE.try_into().unwrap()).call()).await?;
        let n = page.len() as u64;
        rows.extend(page.into_iter().map(|k| CheckpointRow {
            round: k.round,
            param_hash: k.paramHash.to_string(),
            votes: k.votes,
            block: k.finalizedAt,
        }));
        if n < PAGE {
            break;
        }
        offset += PAGE;
    }
    let latest = client.read(c.latestCheckpoint(run).call()).await?;
    let latest = (latest.finalizedAt != 0).then(|| CheckpointRow {
        round: latest.round,
        param_hash: latest.paramHash.to_string(),
        votes: latest.votes,
        block: latest.finalizedAt,
    });
    Ok(Checkpoints { run: info, checkpoints: rows, latest })
}

fn run_header(r: &RunInfo) -> String {
    format!(
        "run {}\n  config {}  epoch {} rounds  quorum {} bps (min {} votes; {} of {} peers now)  finalized {}\n",
        r.run, r.config_hash, r.epoch_rounds, r.quorum_bps, r.min_votes, r.quorum_threshold, r.peers, r.finalized
    )
}

/// The table `node contributions` prints.
pub fn contributions_table(c: &Contributions) -> String {
    let mut out = run_header(&c.run);
    out.push_str(&format!(
        "\n{:<42}  {:<52}  {:>6}  {:>7}  {:>10}  {:>6}\n",
        "address", "peer id", "epochs", "rounds", "samples", "faults"
    ));
    for p in &c.peers {
        out.push_str(&format!(
            "{:<42}  {:<52}  {:>6}  {:>7}  {:>10}  {:>6}\n",
            p.address, p.peer_id, p.epochs, p.rounds, p.samples, p.faults
        ));
    }
    if let Some(epochs) = &c.epochs {
        out.push_str(&format!(
            "\n{:>6}  {:>4}  {:>6}  {:>10}  {:<66}  {:>8}\n",
            "epoch", "part", "rounds", "samples", "commit root", "block"
        ));
        for e in epochs {
            out.push_str(&format!(
                "{:>6}  {:>4}  {:>6}  {:>10}  {:<66}  {:>8}\n",
                e.epoch, e.part, e.rounds, e.samples, e.commit_root, e.block
            ));
        }
    }
    out
}

/// The table `node checkpoints` prints.
pub fn checkpoints_table(c: &Checkpoints) -> String {
    let mut out = run_header(&c.run);
    out.push_str(&format!("\n{:>8}  {:<66}  {:>5}  {:>8}\n", "round", "parameter hash", "votes", "block"));
    for k in &c.checkpoints {
        out.push_str(&format!("{:>8}  {:<66}  {:>5}  {:>8}\n", k.round, k.param_hash, k.votes, k.block));
    }
    match &c.latest {
        Some(k) => out.push_str(&format!("\nlatest finalized: round {} {}\n", k.round, k.param_hash)),
        None => out.push_str("\nno checkpoint finalized yet\n"),
    }
    out
}
