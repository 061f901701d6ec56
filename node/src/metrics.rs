//! What a node tells people watching it: counters and recent history, kept by
//! the driver as rounds go, served by [`crate::http`] as Prometheus text
//! (`/metrics`) and JSON (`/status`), and printed by `node status`.

use serde::{Deserialize, Serialize};
use std::collections::VecDeque;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// Rounds of loss, accuracy and speed kept for the curves.
const HISTORY: usize = 2000;
/// Recent faults kept.
const FAULTS: usize = 50;

/// One completed round, as this peer saw it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoundPoint {
    pub round: u64,
    pub ring_size: usize,
    /// Mean loss of this peer's micro-batch.
    pub loss: Option<f64>,
    /// Test accuracy after the round, when it was evaluated.
    pub accuracy: Option<f64>,
    /// The ring's samples per second of round time.
    pub samples_per_s: f64,
    pub round_s: f64,
}

/// A fault this peer proved (or attested) and acted on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FaultRow {
    pub round: u64,
    pub peer: String,
    pub kind: String,
    pub reason: String,
}

/// What this peer knows of another.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PeerRow {
    pub peer: String,
    /// training, forming, syncing, joining, leaving, gone, or kept out.
    pub state: String,
    pub last_seen_s: f64,
}

/// Records of the ledger outbox, by status.
pub use crate::ledger::outbox::Depth as Outbox;

/// Everything `/status` shows.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Status {
    pub peer: String,
    pub run: String,
    pub uptime_s: f64,
    /// The round this peer trains next.
    pub round: u64,
    pub rounds_completed: u64,
    pub rounds_failed: u64,
    /// Members of the last ring this peer completed a round in.
    pub ring: Vec<String>,
    pub peers: Vec<PeerRow>,
    pub round_s: f64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    /// Ring frames refused: bytes not matching their hash, bad signatures, replays, values out
    /// of range.
    pub frames_refused: u64,
    pub audits: u64,
    pub audits_failed: u64,
    pub faults_total: u64,
    pub faults: Vec<FaultRow>,
    pub samples_trained: u64,
    pub loss: Option<f64>,
    pub accuracy: Option<f64>,
    pub samples_per_s: f64,
    /// None when the peer records nothing on chain.
    pub outbox: Option<Outbox>,
    pub history: Vec<RoundPoint>,
}

/// The live metrics of a node: cheap to clone, shared between the driver and the HTTP server.
#[derive(Debug, Clone)]
pub struct Metrics {
    inner: Arc<Mutex<Inner>>,
}

#[derive(Debug)]
struct Inner {
    started: Instant,
    status: Status,
    history: VecDeque<RoundPoint>,
    faults: VecDeque<FaultRow>,
}

impl Metrics {
    pub fn new(peer: &str, run: &str) -> Self {
        let status = Status { peer: peer.to_owned(), run: run.to_owned(), ..Status::default() };
        let inner = Inner { started: Instant::now(), status, history: VecDeque::new(), faults: VecDeque::new() };
        Self { inner: Arc::new(Mutex::new(inner)) }
    }

    /// Changes the counters.
    pub fn update(&self, f: impl FnOnce(&mut Status)) {
        f(&mut self.inner.lock().expect("metrics").status);
    }

    /// A round this peer trained; its accuracy may follow with [`Metrics::evaluated`].
    pub fn trained(&self, point: RoundPoint) {
        let mut m = self.inner.lock().expect("metrics");
        m.status.loss = point.loss;
        m.status.samples_per_s = point.samples_per_s;
        if m.history.len() >= HISTORY {
            m.history.pop_front();
        }
        m.history.push_back(point);
    }

    pub fn evaluated(&self, round: u64, accuracy: f64) {
        let mut m = self.inner.lock().expect("metrics");
        m.status.accuracy = Some(accuracy);
        if let Some(p) = m.history.iter_mut().rev().find(|p| p.round == round) {
            p.accuracy = Some(accuracy);
        }
    }

    pub fn fault(&self, row: FaultRow) {
        let mut m = self.inner.lock().expect("metrics");
        m.status.faults_total += 1;
        if m.faults.len() >= FAULTS {
            m.faults.pop_front();
        }
        m.faults.push_back(row);
    }

    /// Everything, as of now.
    pub fn snapshot(&self) -> Status {
        let m = self.inner.lock().expect("metrics");
        let mut s = m.status.clone();
        s.uptime_s = m.started.elapsed().as_secs_f64();
        s.history = m.history.iter().cloned().collect();
        s.faults = m.faults.iter().rev().cloned().collect();
        s
    }
}

/// `status` in the Prometheus text exposition format (version 0.0.4).
pub fn prometheus(s: &Status) -> String {
    let mut out = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, samples: &[(&str, f64)]| {
        let _ = writeln!(out, "# HELP dtrain_{name} {help}");
        let _ = writeln!(out, "# TYPE dtrain_{name} {kind}");
        for (labels, v) in samples {
            let v = if v.is_finite() { format!("{v}") } else { "NaN".to_owned() };
            let _ = writeln!(out, "dtrain_{name}{labels} {v}");
        }
    };
    let g = |v: u64| v as f64;
    metric("rounds_completed_total", "counter", "Rounds this peer completed.", &[("", g(s.rounds_completed))]);
    metric("rounds_failed_total", "counter", "Attempts that failed here.", &[("", g(s.rounds_failed))]);
    metric("round", "gauge", "The round this peer trains next.", &[("", g(s.round))]);
    metric("ring_size", "gauge", "Members of the last completed ring.", &[("", s.ring.len() as f64)]);
    metric("round_seconds", "gauge", "Duration of the last completed round.", &[("", s.round_s)]);
    metric("bytes_sent_total", "counter", "Ring payload bytes sent.", &[("", g(s.bytes_sent))]);
    metric("bytes_received_total", "counter", "Ring payload bytes received.", &[("", g(s.bytes_received))]);
    metric(
        "frames_refused_total",
        "counter",
        "Ring frames refused: hash or signature failures, replays, values out of range.",
        &[("", g(s.frames_refused))],
    );
    metric("audits_total", "counter", "Audits this peer ran and finished.", &[("", g(s.audits))]);
    metric("audits_failed_total", "counter", "Audits that proved a lie.", &[("", g(s.audits_failed))]);
    metric("faults_total", "counter", "Faults proven or attested and acted on.", &[("", g(s.faults_total))]);
    metric("samples_trained_total", "counter", "Samples of the rings' rounds.", &[("", g(s.samples_trained))]);
    metric("samples_per_second", "gauge", "The ring's samples per second, last round.", &[("", s.samples_per_s)]);
    metric("loss", "gauge", "Loss of this peer's last micro-batch.", &[("", s.loss.unwrap_or(f64::NAN))]);
    metric("accuracy", "gauge", "Test accuracy at the last evaluation.", &[("", s.accuracy.unwrap_or(f64::NAN))]);
    let live = s.peers.iter().filter(|p| p.state != "gone").count();
    metric("peers", "gauge", "Peers this peer knows and hears from.", &[("", live as f64)]);
    if let Some(o) = &s.outbox {
        metric(
            "outbox_records",
            "gauge",
            "Ledger outbox records by status.",
            &[
                ("{status=\"pending\"}", o.pending as f64),
                ("{status=\"sent\"}", o.sent as f64),
                ("{status=\"done\"}", o.done as f64),
                ("{status=\"rejected\"}", o.rejected as f64),
            ],
        );
        metric(
            "chain_lag_records",
            "gauge",
            "Records not yet confirmed on chain (pending or sent).",
            &[("", (o.pending + o.sent) as f64)],
        );
    }
    metric("uptime_seconds", "gauge", "Seconds since the node started.", &[("", s.uptime_s)]);
    out
}

/// `status` as a terminal table, for `node status`.
pub fn table(s: &Status) -> String {
    let mut out = String::new();
    let opt = |v: Option<f64>, f: &dyn Fn(f64) -> String| v.map_or_else(|| "-".to_owned(), f);
    let rows: Vec<(&str, String)> = vec![
        ("peer", s.peer.clone()),
        ("run", s.run.clone()),
        ("uptime", format!("{:.0} s", s.uptime_s)),
        ("next round", s.round.to_string()),
        ("rounds completed", s.rounds_completed.to_string()),
        ("failed attempts", s.rounds_failed.to_string()),
        ("ring", format!("{} members", s.ring.len())),
        ("last round", format!("{:.3} s", s.round_s)),
        ("loss", opt(s.loss, &|v| format!("{v:.4}"))),
        ("accuracy", opt(s.accuracy, &|v| format!("{:.2}%", 100.0 * v))),
        ("samples/s", format!("{:.0}", s.samples_per_s)),
        ("sent / received", format!("{:.1} / {:.1} MB", s.bytes_sent as f64 / 1e6, s.bytes_received as f64 / 1e6)),
        ("frames refused", s.frames_refused.to_string()),
        ("audits (failed)", format!("{} ({})", s.audits, s.audits_failed)),
        ("faults", s.faults_total.to_string()),
        (
            "ledger outbox",
            s.outbox.as_ref().map_or_else(
                || "no chain".to_owned(),
                |o| format!("{} pending, {} sent, {} on chain, {} rejected", o.pending, o.sent, o.done, o.rejected),
            ),
        ),
    ];
    for (k, v) in rows {
        let _ = writeln!(out, "{k:<18} {v}");
    }
    let _ = writeln!(out, "\n{:<54} {:<9} last seen", "peer", "state");
    for p in &s.peers {
        let _ = writeln!(out, "{:<54} {:<9} {:.1} s ago", p.peer, p.state, p.last_seen_s);
    }
    if !s.faults.is_empty() {
        let _ = writeln!(out, "\n{:<7} {:<54} {:<20} reason", "round", "peer", "kind");
        for f in &s.faults {
            let _ = writeln!(out, "{:<7} {:<54} {:<20} {}", f.round, f.peer, f.kind, f.reason);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_exposition_names_every_sample_after_its_help_and_type() {
        let m = Metrics::new("p", "r");
        m.update(|s| {
            s.rounds_completed = 3;
            s.outbox = Some(Outbox { pending: 2, sent: 1, done: 5, rejected: 0 });
        });
        m.trained(RoundPoint {
            round: 2,
            ring_size: 3,
            loss: Some(0.5),
            accuracy: None,
            samples_per_s: 100.0,
            round_s: 0.2,
        });
        m.evaluated(2, 0.8);
        let s = m.snapshot();
        assert_eq!(s.history[0].accuracy, Some(0.8));
        let text = prometheus(&s);
        assert!(text.contains("dtrain_rounds_completed_total 3\n"), "{text}");
        assert!(text.contains("dtrain_outbox_records{status=\"pending\"} 2\n"), "{text}");
        assert!(text.contains("dtrain_chain_lag_records 3\n"), "{text}");
        assert!(text.contains("dtrain_loss 0.5\n"), "{text}");
        let mut typed = std::collections::HashSet::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                typed.insert(rest.split(' ').next().unwrap().to_owned());
            } else if !line.starts_with("# HELP ") {
                let name = line.split(['{', ' ']).next().unwrap();
                assert!(typed.contains(name), "{name} has no TYPE line before it");
                line.rsplit(' ').next().unwrap().parse::<f64>().unwrap();
            }
        }
    }
}
