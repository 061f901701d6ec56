//! The contract client: a provider for one RPC endpoint, this peer's signing
//! key, and the calls the node makes. Every RPC is bounded in time, and every
//! failure is sorted into "the chain is unreachable" (retry later), "the
//! contract refused" (decoded custom error, readable), or other.

use super::bindings::TrainingLedger::{self, TrainingLedgerErrors, TrainingLedgerInstance};
use super::outbox::Record;
use super::{error_name, explain};
use alloy::primitives::{Address, B256, Bytes};
use alloy::providers::{DynProvider, Provider, ProviderBuilder};
use alloy::signers::local::PrivateKeySigner;
use alloy::transports::http::reqwest::Url;
use alloy::transports::{RpcError, TransportErrorKind};
use std::future::{Future, IntoFuture};
use std::path::Path;
use std::time::Duration;

/// Longest wait for one RPC call: an endpoint that hangs counts as down.
const RPC_TIMEOUT: Duration = Duration::from_secs(20);
/// How soon a receipt is polled for again, at first (a local chain mines at once); the wait
/// doubles up to [`RECEIPT_POLL_MAX`] (a public chain takes seconds a block).
const RECEIPT_POLL: Duration = Duration::from_millis(10);
const RECEIPT_POLL_MAX: Duration = Duration::from_millis(1000);

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the chain at {endpoint}: {reason}: is the RPC endpoint up? (--rpc-url)")]
    Unreachable { endpoint: String, reason: String },
    #[error("rejected by the contract with {name}: {message}")]
    Rejected { name: &'static str, message: String, error: Box<TrainingLedgerErrors> },
    #[error("no TrainingLedger contract at {address}: deploy one with `node deploy`, or check --contract")]
    NoContract { address: Address },
    #[error("{0}")]
    Key(String),
    #[error("chain: {0}")]
    Other(String),
}

impl ClientError {
    /// Worth retrying later (the endpoint or the node may come back).
    pub fn is_transient(&self) -> bool {
        matches!(self, ClientError::Unreachable { .. } | ClientError::Other(_))
    }
}

/// Whether a record is on chain already.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OnChain {
    Absent,
    /// The chain holds exactly this record.
    Same,
    /// The chain holds a different record under the same key (e.g. another vote for the round).
    Different(String),
    /// The record cannot go on chain yet, for a reason that can pass (the peer it is about has
    /// not registered yet).
    NotYet(String),
}

/// Reads the signing key: from the file `path`, or else from the `DTRAIN_ETH_KEY` environment
/// variable. The key is never logged or printed.
pub fn load_signer(path: Option<&Path>) -> Result<PrivateKeySigner, ClientError> {
    let (text, source) = match path {
        Some(p) => (
            std::fs::read_to_string(p)
                .map_err(|e| ClientError::Key(format!("cannot read the key file {}: {e}", p.display())))?,
            format!("key file {}", p.display()),
        ),
        None => match std::env::var("DTRAIN_ETH_KEY") {
            Ok(k) => (k, "DTRAIN_ETH_KEY".to_owned()),
            Err(_) => {
                return Err(ClientError::Key(
                    "no Ethereum key: pass --eth-key-file <file with a hex private key> or set DTRAIN_ETH_KEY".into(),
                ));
            }
        },
    };
    text.trim().parse::<PrivateKeySigner>().map_err(|_| {
        ClientError::Key(format!("the {source} does not hold a valid secp256k1 private key (64 hex digits)"))
    })
}

/// The RPC endpoint without credentials or path, for messages (URLs may embed API keys).
pub fn endpoint_label(url: &str) -> String {
    match url.parse::<Url>() {
        Ok(u) => format!(
            "{}://{}{}",
            u.scheme(),
            u.host_str().unwrap_or("?"),
            u.port().map(|p| format!(":{p}")).unwrap_or_default()
        ),
        Err(_) => "<invalid url>".into(),
    }
}

/// A libp2p peer id for messages.
fn peer_text(bytes: &[u8]) -> String {
    libp2p::PeerId::from_bytes(bytes).map(|p| p.to_base58()).unwrap_or_else(|_| format!("0x{}", hex::encode(bytes)))
}

/// A connection to one deployed ledger contract.
#[derive(Debug, Clone)]
pub struct Client {
    provider: DynProvider,
    contract: TrainingLedgerInstance<DynProvider>,
    account: Option<Address>,
    endpoint: String,
}

fn url(rpc_url: &str) -> Result<Url, ClientError> {
    rpc_url
        .parse()
        .map_err(|e| ClientError::Other(format!("--rpc-url `{}` is not a URL: {e}", endpoint_label(rpc_url))))
}

fn provider(rpc_url: &str, signer: Option<PrivateKeySigner>) -> Result<DynProvider, ClientError> {
    let u = url(rpc_url)?;
    Ok(match signer {
        Some(s) => ProviderBuilder::new().wallet(s).connect_http(u).erased(),
        None => ProviderBuilder::new().connect_http(u).erased(),
    })
}

/// Deploys a new ledger contract; returns its address and the deployment transaction.
pub async fn deploy(rpc_url: &str, signer: PrivateKeySigner) -> Result<(Address, B256), ClientError> {
    let endpoint = endpoint_label(rpc_url);
    let p = provider(rpc_url, Some(signer))?;
    let receipt = bounded(&endpoint, async {
        let tx = TrainingLedger::deploy_builder(p.clone()).into_transaction_request();
        let pending = p.send_transaction(tx).await.map_err(|e| classify_rpc(&endpoint, e))?;
        pending
            .with_timeout(Some(RPC_TIMEOUT))
            .get_receipt()
            .await
            .map_err(|e| ClientError::Other(format!("waiting for the deployment: {e}")))
    })
    .await?;
    let address = receipt
        .contract_address
        .filter(|_| receipt.status())
        .ok_or_else(|| ClientError::Other("the deployment transaction reverted".into()))?;
    Ok((address, receipt.transaction_hash))
}

async fn bounded<T>(endpoint: &str, f: impl Future<Output = Result<T, ClientError>>) -> Result<T, ClientError> {
    tokio::time::timeout(RPC_TIMEOUT, f).await.unwrap_or_else(|_| {
        Err(ClientError::Unreachable {
            endpoint: endpoint.to_owned(),
            reason: format!("no answer within {} s", RPC_TIMEOUT.as_secs()),
        })
    })
}

fn classify_rpc(endpoint: &str, e: RpcError<TransportErrorKind>) -> ClientError {
    if let Some(err) = e.as_error_resp().and_then(|p| p.as_decoded_interface_error::<TrainingLedgerErrors>()) {
        return rejected(err);
    }
    match e {
        RpcError::Transport(kind) => {
            ClientError::Unreachable { endpoint: endpoint.to_owned(), reason: kind.to_string() }
        }
        other => ClientError::Other(other.to_string()),
    }
}

fn rejected(err: TrainingLedgerErrors) -> ClientError {
    ClientError::Rejected { name: error_name(&err), message: explain(&err), error: Box::new(err) }
}

fn classify(endpoint: &str, e: alloy::contract::Error) -> ClientError {
    if let Some(err) = e.as_decoded_interface_error::<TrainingLedgerErrors>() {
        return rejected(err);
    }
    match e {
        alloy::contract::Error::TransportError(t) => classify_rpc(endpoint, t),
        alloy::contract::Error::ZeroData(..) => ClientError::Other(
            "the contract address holds no TrainingLedger code: deploy one with `node deploy`, or check --contract"
                .into(),
        ),
        other => ClientError::Other(other.to_string()),
    }
}

impl Client {
    /// A client for the contract at `address`; with a signer it can write, without only read.
    pub async fn connect(
        rpc_url: &str,
        signer: Option<PrivateKeySigner>,
        address: Address,
    ) -> Result<Self, ClientError> {
        let endpoint = endpoint_label(rpc_url);
        let account = signer.as_ref().map(|s| s.address());
        let provider = provider(rpc_url, signer)?;
        let contract = TrainingLedger::new(address, provider.clone());
        Ok(Self { provider, contract, account, endpoint })
    }

    /// Checks that the address holds a TrainingLedger (the chain must be reachable).
    pub async fn check_contract(&self) -> Result<(), ClientError> {
        let address = *self.contract.address();
        let code = bounded(&self.endpoint, async {
            self.provider.get_code_at(address).await.map_err(|e| classify_rpc(&self.endpoint, e))
        })
        .await?;
        if code.is_empty() {
            return Err(ClientError::NoContract { address });
        }
        // Any contract answering the ledger's views the ledger's way will do.
        match self.read(self.contract.runExists(B256::ZERO).call()).await {
            Ok(false) => Ok(()),
            Ok(true) => Err(ClientError::NoContract { address }),
            Err(e @ ClientError::Unreachable { .. }) => Err(e),
            Err(_) => Err(ClientError::NoContract { address }),
        }
    }

    pub fn address(&self) -> Address {
        *self.contract.address()
    }

    /// The signing account, if any.
    pub fn account(&self) -> Option<Address> {
        self.account
    }

    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    pub fn contract(&self) -> &TrainingLedgerInstance<DynProvider> {
        &self.contract
    }

    fn me(&self) -> Result<Address, ClientError> {
        self.account
            .ok_or_else(|| ClientError::Key("writing needs a key: pass --eth-key-file or set DTRAIN_ETH_KEY".into()))
    }

    /// Runs a contract read, bounded in time, with errors sorted.
    pub async fn read<T>(
        &self,
        f: impl IntoFuture<Output = Result<T, alloy::contract::Error>>,
    ) -> Result<T, ClientError> {
        bounded(&self.endpoint, async { f.await.map_err(|e| classify(&self.endpoint, e)) }).await
    }

    /// The nonce of this account's next transaction, pending ones included.
    pub async fn next_nonce(&self) -> Result<u64, ClientError> {
        let me = self.me()?;
        bounded(&self.endpoint, async {
            self.provider.get_transaction_count(me).pending().await.map_err(|e| classify_rpc(&self.endpoint, e))
        })
        .await
    }

    /// The account bound to the libp2p peer id `peer_id` (multihash bytes) in `run`, if any.
    pub async fn owner_of(&self, run: &[u8; 32], peer_id: &[u8]) -> Result<Option<Address>, ClientError> {
        let call = self.contract.ownerOfPeerId(B256::from(*run), Bytes::from(peer_id.to_vec()));
        let owner = self.read(call.call()).await?;
        Ok((owner != Address::ZERO).then_some(owner))
    }

    /// Whether the chain holds `record` (as written by this peer) already.
    pub async fn on_chain(&self, record: &Record) -> Result<OnChain, ClientError> {
        let me = self.me()?;
        let c = &self.contract;
        Ok(match record {
            Record::CreateRun { run, config_hash, .. } => {
                let run = B256::from(*run);
                if !self.read(c.runExists(run).call()).await? {
                    OnChain::Absent
                } else {
                    let have = self.read(c.getRun(run).call()).await?;
                    if have.configHash == B256::from(*config_hash) {
                        OnChain::Same
                    } else {
                        OnChain::Different(format!(
                            "run {run} exists with config hash {}, not ours ({}): this peer's configuration differs from the run's",
                            have.configHash,
                            B256::from(*config_hash)
                        ))
                    }
                }
            }
            Record::Register { run, peer_id } => {
                let info = self.read(c.peerInfo(B256::from(*run), me).call()).await?;
                if !info.registered {
                    OnChain::Absent
                } else if info.libp2pPeerId.as_ref() == peer_id.as_slice() {
                    OnChain::Same
                } else {
                    OnChain::Different(format!(
                        "{me} is registered in this run with another libp2p peer id: use the key and data directory that registered it"
                    ))
                }
            }
            Record::Contribution { run, epoch, part, rounds, samples, commit_root } => {
                let have = self.read(c.contributionOf(B256::from(*run), me, *epoch, *part).call()).await?;
                if have.recordedAt == 0 {
                    OnChain::Absent
                } else if (have.rounds, have.samples, have.commitRoot) == (*rounds, *samples, B256::from(*commit_root))
                {
                    OnChain::Same
                } else {
                    OnChain::Different(format!(
                        "epoch {epoch} (part {part}) is recorded with {} rounds and {} samples, not {rounds} and {samples}",
                        have.rounds, have.samples
                    ))
                }
            }
            Record::Vote { run, round, param_hash } => {
                let have = self.read(c.voteOf(B256::from(*run), *round, me).call()).await?;
                if have == B256::ZERO {
                    OnChain::Absent
                } else if have == B256::from(*param_hash) {
                    OnChain::Same
                } else {
                    OnChain::Different(format!("round {round} has our vote for {have} already"))
                }
            }
            Record::Fault { run, accused, round, kind, .. } => {
                // Reported by anyone counts: one report per fault is enough.
                let done = self
                    .read(c.isFaultReported(B256::from(*run), Address::from(*accused), *round, *kind).call())
                    .await?;
                if done { OnChain::Same } else { OnChain::Absent }
            }
            Record::FaultOf { run, peer_id, round, kind, .. } => {
                let Some(accused) = self.owner_of(run, peer_id).await? else {
                    return Ok(OnChain::NotYet(format!(
                        "peer {} is not registered in this run (yet): there is no account to report",
                        peer_text(peer_id)
                    )));
                };
                let done = self.read(c.isFaultReported(B256::from(*run), accused, *round, *kind).call()).await?;
                if done { OnChain::Same } else { OnChain::Absent }
            }
        })
    }

    /// Dry-runs `record` (eth_call from this account): a contract rejection shows up here with
    /// its decoded reason, before any gas is spent.
    pub async fn simulate(&self, record: &Record) -> Result<(), ClientError> {
        self.submit(record, None, true).await.map(|_| ())
    }

    /// Sends `record` with `nonce` (or the provider's choice); returns the transaction hash.
    pub async fn send(&self, record: &Record, nonce: Option<u64>) -> Result<B256, ClientError> {
        self.submit(record, nonce, false).await.map(|h| h.expect("sent"))
    }

    async fn submit(&self, record: &Record, nonce: Option<u64>, dry_run: bool) -> Result<Option<B256>, ClientError> {
        let me = self.me()?;
        let c = &self.contract;
        let endpoint = &self.endpoint;
        macro_rules! go {
            ($call:expr) => {{
                let call = $call.from(me);
                if dry_run {
                    bounded(endpoint, async { call.call().await.map(|_| None).map_err(|e| classify(endpoint, e)) })
                        .await
                } else {
                    let call = match nonce {
                        Some(n) => call.nonce(n),
                        None => call,
                    };
                    bounded(endpoint, async {
                        call.send().await.map(|p| Some(*p.tx_hash())).map_err(|e| classify(endpoint, e))
                    })
                    .await
                }
            }};
        }
        match record {
            Record::CreateRun { run, config_hash, epoch_rounds, quorum_bps, min_votes } => {
                go!(c.createRun(B256::from(*run), B256::from(*config_hash), *epoch_rounds, *quorum_bps, *min_votes))
            }
            Record::Register { run, peer_id } => go!(c.register(B256::from(*run), Bytes::from(peer_id.clone()))),
            Record::Contribution { run, epoch, part, rounds, samples, commit_root } => {
                go!(c.recordContribution(B256::from(*run), *epoch, *part, *rounds, *samples, B256::from(*commit_root)))
            }
            Record::Vote { run, round, param_hash } => {
                go!(c.voteCheckpoint(B256::from(*run), *round, B256::from(*param_hash)))
            }
            Record::Fault { run, accused, round, kind, evidence } => {
                go!(c.reportFault(B256::from(*run), Address::from(*accused), *round, *kind, B256::from(*evidence)))
            }
            Record::FaultOf { run, peer_id, round, kind, evidence } => {
                let accused = self.owner_of(run, peer_id).await?.ok_or_else(|| {
                    ClientError::Other(format!("peer {} is not registered in this run", peer_text(peer_id)))
                })?;
                go!(c.reportFault(B256::from(*run), accused, *round, *kind, B256::from(*evidence)))
            }
        }
    }

    /// Waits up to `timeout` for the receipt of `tx`: `Some((success, block))`, or `None` if
    /// it is not mined by then.
    pub async fn receipt(&self, tx: B256, timeout: Duration) -> Result<Option<(bool, u64)>, ClientError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut poll = RECEIPT_POLL;
        loop {
            let r = bounded(&self.endpoint, async {
                self.provider.get_transaction_receipt(tx).await.map_err(|e| classify_rpc(&self.endpoint, e))
            })
            .await?;
            if let Some(r) = r {
                return Ok(Some((r.status(), r.block_number.unwrap_or_default())));
            }
            if tokio::time::Instant::now() >= deadline {
                return Ok(None);
            }
            tokio::time::sleep(poll).await;
            poll = (poll * 2).min(RECEIPT_POLL_MAX);
        }
    }

    /// Whether the endpoint knows transaction `tx` at all (mined or waiting in its pool).
    pub async fn tx_known(&self, tx: B256) -> Result<bool, ClientError> {
        bounded(&self.endpoint, async {
            self.provider
                .get_transaction_by_hash(tx)
                .await
                .map(|t| t.is_some())
                .map_err(|e| classify_rpc(&self.endpoint, e))
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_labels_hide_credentials_and_paths() {
        assert_eq!(endpoint_label("https://user:secret@rpc.example.org/v2/APIKEY"), "https://rpc.example.org");
        assert_eq!(endpoint_label("http://127.0.0.1:8545"), "http://127.0.0.1:8545");
        assert_eq!(endpoint_label("not a url"), "<invalid url>");
    }

    #[test]
    fn a_bad_key_is_refused_without_echoing_it() {
        let dir = std::env::temp_dir().join(format!("dtrain-key-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("key");
        std::fs::write(&path, "0xnot-a-key-SECRET").unwrap();
        let err = load_signer(Some(&path)).unwrap_err().to_string();
        assert!(err.contains("does not hold a valid"), "{err}");
        assert!(!err.contains("SECRET"), "the key must never be echoed: {err}");
        std::fs::write(&path, "ac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80\n").unwrap();
        let signer = load_signer(Some(&path)).unwrap();
        assert_eq!(signer.address().to_string(), "0xf39Fd6e51aad88F6F4ce6aB8827279cffFb92266");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
