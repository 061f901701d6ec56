//! The node's own HTTP endpoint (`--http <addr>`, off by default): `/metrics`
//! in the Prometheus text format, `/status` as JSON, `/chain` (the run's
//! contribution totals and finalized checkpoints, read from the contract
//! through this node), and `/`, a dashboard page that draws them. GET only, one request per connection, requests capped at
//! [`MAX_REQUEST`] bytes; anything else gets a 4xx naming what is wrong.

use crate::ledger::client::Client;
use crate::ledger::show;
use crate::ledger::task::LedgerHandle;
use crate::metrics::{self, Metrics};
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, info};

/// A GET request line and its headers fit in this.
const MAX_REQUEST: usize = 8 * 1024;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest the chain may take to answer `/chain` (within [`REQUEST_TIMEOUT`]).
const CHAIN_TIMEOUT: Duration = Duration::from_secs(8);
/// Connections served at once; more wait.
const MAX_CONNECTIONS: usize = 32;
const DASHBOARD: &str = include_str!("dashboard.html");

/// What the endpoint reads from.
#[derive(Debug, Clone)]
pub struct Sources {
    pub metrics: Metrics,
    pub ledger: Option<LedgerHandle>,
    /// The contract and the run, for `/chain`.
    pub chain: Option<(Client, [u8; 32])>,
}

/// Binds `addr` and serves until the process ends; returns the bound address.
pub async fn serve(addr: SocketAddr, sources: Sources) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    info!(addr = %bound, "http endpoint listening: /metrics, /status, / (dashboard)");
    let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    tokio::spawn(async move {
        loop {
            let Ok(slot) = slots.clone().acquire_owned().await else { return };
            let (stream, from) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors, say: wait rather than spin.
                    debug!(reason = %e, "http accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let sources = sources.clone();
            tokio::spawn(async move {
                let _slot = slot;
                if let Err(e) = tokio::time::timeout(REQUEST_TIMEOUT, answer(stream, &sources)).await {
                    debug!(%from, reason = %e, "http request timed out");
                }
            });
        }
    });
    Ok(bound)
}

async fn answer(mut stream: TcpStream, sources: &Sources) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        if buf.len() >= MAX_REQUEST {
            respond(&mut stream, 431, "text/plain", b"request headers too large\n").await?;
            // Read (a bounded amount of) what the client still sends, so that closing does not
            // reset the connection before it reads the answer.
            let mut left = 1 << 20;
            while left > 0 {
                match tokio::time::timeout(Duration::from_millis(500), stream.read(&mut chunk)).await {
                    Ok(Ok(n)) if n > 0 => left -= n.min(left),
                    _ => break,
                }
            }
            return Ok(());
        }
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let head = String::from_utf8_lossy(&buf);
    let mut parts = head.lines().next().unwrap_or_default().split(' ');
    let (method, target) = (parts.next().unwrap_or_default(), parts.next().unwrap_or_default());
    if method != "GET" {
        return respond(&mut stream, 405, "text/plain", b"only GET is served\n").await;
    }
    let path = target.split('?').next().unwrap_or_default();
    match path {
        "/metrics" => {
            let s = status(sources).await;
            respond(&mut stream, 200, "text/plain; version=0.0.4", metrics::prometheus(&s).as_bytes()).await
        }
        "/status" => {
            let s = status(sources).await;
            let json = serde_json::to_vec(&s).expect("the status serializes");
            respond(&mut stream, 200, "application/json", &json).await
        }
        "/chain" => {
            let (code, json) = chain(sources).await;
            respond(&mut stream, code, "application/json", json.to_string().as_bytes()).await
        }
        "/" | "/index.html" => respond(&mut stream, 200, "text/html; charset=utf-8", DASHBOARD.as_bytes()).await,
        _ => respond(&mut stream, 404, "text/plain", b"not found: try /metrics, /status or /\n").await,
    }
}

/// The run's contribution totals and finalized checkpoints, as the contract holds them now.
async fn chain(sources: &Sources) -> (u16, serde_json::Value) {
    let Some((client, run)) = &sources.chain else {
        return (404, serde_json::json!({"error": "this node records nothing on chain (started without --contract)"}));
    };
    let run = alloy::primitives::B256::from(*run);
    let read = async {
        let contributions = show::contributions(client, run, None).await?;
        let checkpoints = show::checkpoints(client, run).await?;
        Ok::<_, crate::ledger::client::ClientError>((contributions, checkpoints))
    };
    match tokio::time::timeout(CHAIN_TIMEOUT, read).await {
        Ok(Ok((contributions, checkpoints))) => {
            (200, serde_json::json!({"contributions": contributions, "checkpoints": checkpoints}))
        }
        Ok(Err(e)) => (503, serde_json::json!({"error": format!("cannot read the ledger: {e}")})),
        Err(_) => (503, serde_json::json!({"error": "the chain did not answer in time"})),
    }
}

/// The metrics, with the ledger outbox read now.
async fn status(sources: &Sources) -> metrics::Status {
    let mut s = sources.metrics.snapshot();
    if let Some(ledger) = sources.ledger.clone() {
        s.outbox = tokio::task::spawn_blocking(move || ledger.depth()).await.ok().flatten();
    }
    s
}

async fn respond(stream: &mut TcpStream, code: u16, content_type: &str, body: &[u8]) -> std::io::Result<()> {
    let reason = match code {
        200 => "OK",
        404 => "Not Found",
        405 => "Method Not Allowed",
        503 => "Service Unavailable",
        _ => "Request Header Fields Too Large",
    };
    let head = format!(
        "HTTP/1.1 {code} {reason}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\ncache-control: no-store\r\n\
         connection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body).await?;
    stream.shutdown().await
}

/// GETs `path` from a node's endpoint at `addr`: the body of a 200 answer.
pub async fn get(addr: &str, path: &str) -> Result<Vec<u8>, String> {
    let fail = |e: std::io::Error| format!("cannot read {path} from {addr}: {e}");
    let mut stream = tokio::time::timeout(REQUEST_TIMEOUT, TcpStream::connect(addr))
        .await
        .map_err(|_| format!("{addr} did not accept a connection in time"))?
        .map_err(|e| format!("cannot connect to {addr} ({e}): is the node started with --http {addr}?"))?;
    stream
        .write_all(format!("GET {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n\r\n").as_bytes())
        .await
        .map_err(fail)?;
    let mut all = Vec::new();
    tokio::time::timeout(REQUEST_TIMEOUT, stream.read_to_end(&mut all))
        .await
        .map_err(|_| format!("{addr} did not answer in time"))?
        .map_err(fail)?;
    let split = all.windows(4).position(|w| w == b"\r\n\r\n").ok_or_else(|| format!("{addr} sent no HTTP answer"))?;
    let head = String::from_utf8_lossy(&all[..split]);
    if !head.starts_with("HTTP/1.1 200") {
        return Err(format!("{addr} answered {}", head.lines().next().unwrap_or_default()));
    }
    Ok(all[split + 4..].to_vec())
}
