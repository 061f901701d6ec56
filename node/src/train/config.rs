//! The configuration of a training run, which every peer of the run shares:
//! model, data, optimizer, batch, rounds, the ledger's epoch and quorum, and
//! the compute build. Its blake3 is the run's configuration hash (recorded on
//! chain) and keys the run id, so peers with another configuration land in
//! another run, and a peer whose dataset differs is refused before it trains.

use super::data::Dataset;
use p2p_proto::Hash;
use p2p_proto::compress::Compression;
use p2p_proto::message::RunId;
use serde::{Deserialize, Serialize};
use std::path::Path;

/// The compute build: bit-exact gradients hold only between identical builds (burn's flex
/// backend gives other bits with and without `simd`), so it is part of the configuration.
pub fn compute_build() -> String {
    let mut features = vec!["flex", "simd", "rayon"];
    if cfg!(feature = "vulkan") {
        features.push("vulkan");
    }
    if cfg!(feature = "cuda") {
        features.push("cuda");
    }
    format!("burn-0.22.1/{}", features.join("+"))
}

/// The audit tolerance of a run on a GPU build that does not state one: GPU kernels sum in an
/// order that varies from device to device, so gradients differ in their last bits.
pub const GPU_AUDIT_TOLERANCE: f64 = 1e-3;

/// A run's configuration, as written in its TOML file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    /// A name for people; the run id is derived from the whole configuration.
    pub name: String,
    /// mlp, cnn or resnet.
    pub model: String,
    /// blake3 of the decoded dataset (hex). Filled in from the creator's dataset when absent.
    #[serde(default)]
    pub dataset_hash: Option<String>,
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// adam or sgd.
    #[serde(default = "default_optimizer")]
    pub optimizer: String,
    #[serde(default = "default_lr")]
    pub lr: f64,
    #[serde(default = "default_clip_norm")]
    pub clip_norm: f32,
    /// Samples per peer per round.
    pub batch: usize,
    /// Rounds in the run: one optimizer step each.
    pub rounds: u64,
    /// K: rounds per on-chain epoch (one contribution record and one vote per peer).
    #[serde(default = "default_epoch_rounds")]
    pub epoch_rounds: u64,
    #[serde(default = "default_quorum_bps")]
    pub quorum_bps: u16,
    #[serde(default = "default_min_votes")]
    pub min_votes: u16,
    /// Peers the first round waits for.
    #[serde(default = "default_min_peers")]
    pub min_peers: usize,
    /// Evaluate on the test split every N rounds (0: only at the end).
    #[serde(default)]
    pub eval_every: u64,
    /// One attempt in this many is audited: every member recomputes another's gradient and
    /// checks it against its commit (0: no audits).
    #[serde(default = "default_audit_every")]
    pub audit_every: u64,
    /// Robust aggregation: the largest contribution one member may make to one coordinate of
    /// the averaged gradient (coordinate-wise clipping: honest members clip to it, receivers
    /// refuse a partial sum of k contributions beyond k times it, audits hold every member to
    /// it exactly). Absent: the fixed-point range (±8) is the only bound.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clip_value: Option<f32>,
    /// Audits within a tolerance: the relative L2 distance an audited member's committed
    /// gradient may have from the auditor's recomputation (the member reveals its values on
    /// request). 0: bit-exact audits against the commit's hashes, the default on the CPU
    /// backend; absent on a GPU build: [`GPU_AUDIT_TOLERANCE`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audit_tolerance: Option<f64>,
    /// The compute build every peer must run (see [`compute_build`]); filled in when absent.
    #[serde(default)]
    pub compute: Option<String>,
    /// Local SGD (FedAvg, DiLoCo): each member takes this many optimizer steps of its own on
    /// consecutive batches, from the round's parameters, with a fresh inner optimizer (the
    /// run's `optimizer` and `lr`); the ring then averages the parameter deltas and the outer
    /// optimizer (SGD with `outer_momentum`, at `outer_lr`) applies them. 1: one gradient
    /// per round, all-reduced (data-parallel SGD). Cuts the bytes per sample by this factor,
    /// for slow links.
    #[serde(default = "default_local_steps", skip_serializing_if = "is_one")]
    pub local_steps: u64,
    /// Learning rate of the outer step in local SGD (1.0 with no momentum: FedAvg).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outer_lr: Option<f64>,
    /// Momentum of the outer step in local SGD (DiLoCo uses 0.9 with an outer lr of 0.7).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outer_momentum: Option<f32>,
    /// Gradient compression: "int8" (one scale per `compression_block` values) or "topk"
    /// (the `topk_fraction` largest values, with error feedback). Compressed contributions are
    /// committed, gathered around the ring and decoded by every member. Absent: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compression: Option<String>,
    /// int8: values per scale (default [`DEFAULT_INT8_BLOCK`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compression_block: Option<u32>,
    /// topk: the share of values each member sends per round (default [`DEFAULT_TOPK_FRACTION`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topk_fraction: Option<f64>,
    /// Asynchronous rounds: a member whose gradient is not ready this many milliseconds after
    /// most of the other members of the ring committed does not stall the ring: it commits nothing
    /// for the round (zeros, no samples) and contributes the gradient to a later round,
    /// weighted down by its staleness ([`p2p_proto::audit::staleness_weight`]), still
    /// committed and audited by recomputation on the parameters it was computed on. Absent:
    /// synchronous rounds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub async_threshold_ms: Option<u64>,
    /// Asynchronous rounds: how many rounds late a gradient may still join the sum (default
    /// [`DEFAULT_MAX_STALENESS`]); an older one is dropped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_staleness: Option<u64>,
    /// Hierarchical rounds: the ring is cut into groups of this many consecutive members (the
    /// ring's order is a stable hash), each group reduces its vectors in its own ring, member
    /// `j` of every group all-reduces the group sums' chunk `j` in a ring across groups, and
    /// the groups gather the result: `2(g - 1) + 2(n/g - 1)` steps rather than `2(n - 1)`
    /// ([`p2p_proto::hier`]). The `n mod g` members left over are attached to the groups in
    /// turn (each sends its chunks to their holders and gets the sum from them); a ring of
    /// fewer than `2g` members, or `g` below 2, runs as the plain ring. Absent: the plain ring.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group_size: Option<usize>,
}

/// Asynchronous rounds' default bound on staleness.
pub const DEFAULT_MAX_STALENESS: u64 = 2;
/// Largest `max_staleness`: every peer keeps the parameters of this many rounds to audit with.
pub const MAX_STALENESS: u64 = 8;

/// int8 compression's default block: a 4-byte scale per 256 values costs 1.6% of the payload.
pub const DEFAULT_INT8_BLOCK: u32 = 256;
/// top-k compression's default share of values: 1%.
pub const DEFAULT_TOPK_FRACTION: f64 = 0.01;

fn default_local_steps() -> u64 {
    1
}
fn is_one(v: &u64) -> bool {
    *v == 1
}

/// Local SGD's settings, when a run uses it ([`RunConfig::local_sgd`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LocalSgd {
    pub steps: u64,
    pub outer_lr: f64,
    pub outer_momentum: f32,
}

/// Largest `local_steps`: far beyond any useful value, and it bounds an audit's recomputation.
pub const MAX_LOCAL_STEPS: u64 = 1000;

/// Largest batch a peer computes in one step: what an auditor recomputes in one step of a
/// member's work, so a member announcing more (or fault evidence claiming more) is refused
/// rather than making every auditor build a batch of any size.
pub const MAX_BATCH: usize = 1 << 14;

fn default_seed() -> u64 {
    1
}
fn default_optimizer() -> String {
    "adam".into()
}
fn default_lr() -> f64 {
    1e-3
}
fn default_clip_norm() -> f32 {
    5.0
}
fn default_epoch_rounds() -> u64 {
    10
}
fn default_quorum_bps() -> u16 {
    6667
}
fn default_min_votes() -> u16 {
    1
}
fn default_min_peers() -> usize {
    2
}
fn default_audit_every() -> u64 {
    1
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read the run configuration {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("the run configuration {path} is invalid: {reason}")]
    Invalid { path: String, reason: String },
    #[error(
        "this peer's dataset hashes to {local}, but the run trains on {expected}: point --dataset at the run's dataset"
    )]
    DatasetMismatch { local: String, expected: String },
    #[error(
        "this node's compute build is {local}, but the run uses {expected}: peers of a run must run the same build"
    )]
    BuildMismatch { local: String, expected: String },
    #[error("the configuration hashes to run {actual}, but --run asks for {expected}: use the run's own configuration")]
    RunMismatch { actual: String, expected: String },
}

impl RunConfig {
    /// Reads and checks a TOML configuration file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let p = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: p.clone(), source })?;
        let cfg: RunConfig =
            toml::from_str(&text).map_err(|e| ConfigError::Invalid { path: p.clone(), reason: e.to_string() })?;
        cfg.validate().map_err(|reason| ConfigError::Invalid { path: p, reason })?;
        Ok(cfg)
    }

    /// Parses and checks a configuration received from a peer (JSON).
    pub fn from_json(bytes: &[u8]) -> Result<Self, String> {
        let cfg: RunConfig = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<(), String> {
        if !matches!(self.model.as_str(), "mlp" | "cnn" | "resnet") {
            return Err(format!("model `{}` is not one of mlp, cnn, resnet", self.model));
        }
        if !matches!(self.optimizer.as_str(), "adam" | "sgd") {
            return Err(format!("optimizer `{}` is not one of adam, sgd", self.optimizer));
        }
        if self.batch == 0 || self.rounds == 0 || self.epoch_rounds == 0 || self.min_peers == 0 {
            return Err("batch, rounds, epoch_rounds and min_peers must be at least 1".into());
        }
        let max_peers = p2p_proto::fixed::DEFAULT_MAX_PEERS as usize;
        if self.min_peers > max_peers {
            return Err(format!(
                "min_peers {} is above {max_peers}, the most peers a ring holds: the first ring would never form",
                self.min_peers
            ));
        }
        if self.batch > MAX_BATCH {
            return Err(format!(
                "batch {} is above {MAX_BATCH}, the most a peer computes in one step: use local_steps for more samples \
                 per round",
                self.batch
            ));
        }
        if !(self.lr.is_finite() && self.lr > 0.0 && self.clip_norm.is_finite() && self.clip_norm > 0.0) {
            return Err("lr and clip_norm must be positive".into());
        }
        if let Some(c) = self.clip_value
            && let Err(e) = p2p_proto::FixedPoint::default().with_clip(c)
        {
            return Err(e.to_string());
        }
        if let Some(t) = self.audit_tolerance
            && !(t.is_finite() && (0.0..1.0).contains(&t))
        {
            return Err(format!("audit_tolerance {t} is not in [0, 1) (a relative L2 distance; 0: bit-exact)"));
        }
        if !(1..=MAX_LOCAL_STEPS).contains(&self.local_steps) {
            return Err(format!("local_steps {} is not in 1..={MAX_LOCAL_STEPS}", self.local_steps));
        }
        if let Some(lr) = self.outer_lr
            && !(lr.is_finite() && lr > 0.0 && lr <= 10.0)
        {
            return Err(format!("outer_lr {lr} is not in (0, 10]"));
        }
        if let Some(m) = self.outer_momentum
            && !(m.is_finite() && (0.0..1.0).contains(&m))
        {
            return Err(format!("outer_momentum {m} is not in [0, 1)"));
        }
        if self.local_steps == 1 && (self.outer_lr.is_some() || self.outer_momentum.is_some()) {
            return Err("outer_lr and outer_momentum apply to local SGD only: set local_steps above 1".into());
        }
        let compression = self.compression()?;
        compression.validate()?;
        if let Some(s) = self.max_staleness {
            if self.async_threshold_ms.is_none() {
                return Err("max_staleness applies to asynchronous rounds only: set async_threshold_ms".into());
            }
            if !(1..=MAX_STALENESS).contains(&s) {
                return Err(format!("max_staleness {s} is not in 1..={MAX_STALENESS}"));
            }
        }
        if let Some(g) = self.group_size {
            if g < 2 {
                return Err(format!("group_size {g} is below 2: leave it out for the plain ring"));
            }
            if !compression.is_none() {
                return Err("group_size cannot be combined with compression yet (compressed payloads are \
                            gathered, not reduced): choose one of them"
                    .into());
            }
        }
        if !compression.is_none() && self.audit_tolerance() > 0.0 {
            return Err(format!(
                "compression {} needs bit-exact audits: leave audit_tolerance out (a GPU build cannot \
                 compress yet)",
                self.compression.as_deref().unwrap_or_default()
            ));
        }
        if self.quorum_bps == 0 || self.quorum_bps > 10_000 || self.min_votes == 0 {
            return Err("quorum_bps must be in 1..=10000 and min_votes at least 1".into());
        }
        if let Some(h) = &self.dataset_hash
            && (h.len() != 64 || hex::decode(h).is_err())
        {
            return Err(format!("dataset_hash `{h}` is not 64 hex digits"));
        }
        Ok(())
    }

    /// Binds the configuration to this peer's dataset and build: fills in what is absent,
    /// refuses what differs.
    pub fn bind(mut self, ds: &Dataset) -> Result<Self, ConfigError> {
        let local = hex::encode(ds.hash);
        match &self.dataset_hash {
            Some(expected) if *expected != local => {
                return Err(ConfigError::DatasetMismatch { local, expected: expected.clone() });
            }
            Some(_) => {}
            None => self.dataset_hash = Some(local),
        }
        let build = compute_build();
        match &self.compute {
            Some(expected) if *expected != build => {
                return Err(ConfigError::BuildMismatch { local: build, expected: expected.clone() });
            }
            Some(_) => {}
            None => self.compute = Some(build),
        }
        Ok(self)
    }

    /// Asynchronous rounds' settings, if the run uses them: the threshold and the largest
    /// staleness.
    pub fn asynchronous(&self) -> Option<(std::time::Duration, u64)> {
        self.async_threshold_ms
            .map(|ms| (std::time::Duration::from_millis(ms), self.max_staleness.unwrap_or(DEFAULT_MAX_STALENESS)))
    }

    /// Local SGD's settings, if the run uses it (`local_steps` above 1).
    pub fn local_sgd(&self) -> Option<LocalSgd> {
        (self.local_steps > 1).then(|| LocalSgd {
            steps: self.local_steps,
            outer_lr: self.outer_lr.unwrap_or(1.0),
            outer_momentum: self.outer_momentum.unwrap_or(0.0),
        })
    }

    /// How members compress their contributions.
    pub fn compression(&self) -> Result<Compression, String> {
        let c = match self.compression.as_deref() {
            None | Some("none") => Compression::None,
            Some("int8") => Compression::Int8 { block: self.compression_block.unwrap_or(DEFAULT_INT8_BLOCK) },
            Some("topk") => {
                let f = self.topk_fraction.unwrap_or(DEFAULT_TOPK_FRACTION);
                if !(f.is_finite() && f > 0.0 && f <= 1.0) {
                    return Err(format!("topk_fraction {f} is not in (0, 1]"));
                }
                Compression::TopK { per_million: ((f * 1e6).round() as u32).max(1) }
            }
            Some(other) => return Err(format!("compression `{other}` is not one of none, int8, topk")),
        };
        if self.compression_block.is_some() && !matches!(c, Compression::Int8 { .. }) {
            return Err("compression_block applies to compression = \"int8\" only".into());
        }
        if self.topk_fraction.is_some() && !matches!(c, Compression::TopK { .. }) {
            return Err("topk_fraction applies to compression = \"topk\" only".into());
        }
        Ok(c)
    }

    /// The relative distance audits allow (0: bit-exact), as stated or as the build needs.
    pub fn audit_tolerance(&self) -> f64 {
        let gpu = self.compute.as_deref().is_some_and(|c| c.contains("vulkan") || c.contains("cuda"));
        self.audit_tolerance.unwrap_or(if gpu { GPU_AUDIT_TOLERANCE } else { 0.0 })
    }

    /// blake3 of the configuration (after [`RunConfig::bind`]): what the chain records.
    pub fn hash(&self) -> Hash {
        let json = serde_json::to_vec(self).expect("the configuration serializes");
        let mut h = blake3::Hasher::new();
        h.update(b"dtrain/run-config/v1");
        h.update(&json);
        h.finalize().into()
    }

    /// The run id: derived from the configuration hash.
    pub fn run_id(&self) -> RunId {
        let mut h = blake3::Hasher::new();
        h.update(b"dtrain/run-id/v1");
        h.update(&self.hash());
        RunId(h.finalize().into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#"
        name = "fashion"
        model = "mlp"
        batch = 32
        rounds = 100
    "#;

    fn write(name: &str, text: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("dtrain-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn every_field_keys_the_run_id() {
        let cfg = RunConfig::load(&write("a.toml", BASE)).unwrap();
        assert_eq!((cfg.optimizer.as_str(), cfg.epoch_rounds, cfg.min_peers), ("adam", 10, 2));
        let mut other = cfg.clone();
        other.lr *= 2.0;
        assert_ne!(cfg.run_id(), other.run_id());
        let mut other = cfg.clone();
        other.dataset_hash = Some("00".repeat(32));
        assert_ne!(cfg.run_id(), other.run_id());
        assert_eq!(cfg.run_id(), RunConfig::load(&write("b.toml", BASE)).unwrap().run_id());
    }

    #[test]
    fn the_json_a_peer_serves_round_trips_to_the_same_run() {
        let mut cfg = RunConfig::load(&write("g.toml", BASE)).unwrap();
        cfg.dataset_hash = Some("ab".repeat(32));
        cfg.compute = Some(compute_build());
        let json = serde_json::to_vec(&cfg).unwrap();
        assert_eq!(RunConfig::from_json(&json).unwrap().run_id(), cfg.run_id());
        assert!(RunConfig::from_json(b"{\"name\": 1}").is_err());
        let bad = String::from_utf8(json).unwrap().replace("\"mlp\"", "\"gpt\"");
        assert!(RunConfig::from_json(bad.as_bytes()).unwrap_err().contains("gpt"));
    }

    #[test]
    fn bad_configurations_name_the_fault() {
        let err = RunConfig::load(&write("c.toml", &BASE.replace("mlp", "gpt"))).unwrap_err().to_string();
        assert!(err.contains("model `gpt`"), "{err}");
        let err = RunConfig::load(&write("d.toml", &format!("{BASE}\nbatchsize = 3"))).unwrap_err().to_string();
        assert!(err.contains("batchsize"), "{err}");
        let err =
            RunConfig::load(&write("f.toml", &BASE.replace("batch = 32", "batch = 16385"))).unwrap_err().to_string();
        assert!(err.contains("batch 16385 is above 16384") && err.contains("local_steps"), "{err}");
        let err = RunConfig::load(&write("e.toml", &BASE.replace("batch = 32", "batch = 0"))).unwrap_err().to_string();
        assert!(err.contains("at least 1"), "{err}");
        let err = RunConfig::load(&write("f.toml", &format!("{BASE}\ndataset_hash = \"xyz\""))).unwrap_err();
        assert!(err.to_string().contains("64 hex digits"), "{err}");
        let err = RunConfig::load(&write("h.toml", &format!("{BASE}\naudit_tolerance = 1.5"))).unwrap_err();
        assert!(err.to_string().contains("audit_tolerance 1.5"), "{err}");
        let err = RunConfig::load(&write("k.toml", &format!("{BASE}\nlocal_steps = 0"))).unwrap_err();
        assert!(err.to_string().contains("local_steps 0"), "{err}");
        let err = RunConfig::load(&write("l.toml", &format!("{BASE}\nouter_lr = 0.7"))).unwrap_err();
        assert!(err.to_string().contains("local SGD only"), "{err}");
        let err = RunConfig::load(&write("m.toml", &format!("{BASE}\nlocal_steps = 4\nouter_momentum = 1.0")));
        assert!(err.unwrap_err().to_string().contains("outer_momentum 1"));
        let err = RunConfig::load(&write("o.toml", &format!("{BASE}\nmin_peers = 300"))).unwrap_err();
        assert!(err.to_string().contains("min_peers 300 is above 256"), "{err}");
        assert!(RunConfig::load(&write("p.toml", &format!("{BASE}\nmin_peers = 256"))).is_ok());
    }

    #[test]
    fn local_sgd_is_off_by_default_and_keys_the_run_id() {
        let plain = RunConfig::load(&write("n.toml", BASE)).unwrap();
        assert_eq!(plain.local_sgd(), None);
        // A run without local SGD serializes as before: its id does not change.
        assert!(!String::from_utf8(serde_json::to_vec(&plain).unwrap()).unwrap().contains("local_steps"));
        let local = RunConfig::load(&write("o.toml", &format!("{BASE}\nlocal_steps = 8"))).unwrap();
        assert_eq!(local.local_sgd(), Some(LocalSgd { steps: 8, outer_lr: 1.0, outer_momentum: 0.0 }));
        assert_ne!(plain.run_id(), local.run_id());
    }

    #[test]
    fn hierarchical_rounds_are_off_by_default_checked_and_key_the_run_id() {
        let plain = RunConfig::load(&write("h1.toml", BASE)).unwrap();
        assert!(!String::from_utf8(serde_json::to_vec(&plain).unwrap()).unwrap().contains("group_size"));
        let hier = RunConfig::load(&write("h2.toml", &format!("{BASE}\ngroup_size = 4"))).unwrap();
        assert_eq!(hier.group_size, Some(4));
        assert_ne!(plain.run_id(), hier.run_id());
        let err = RunConfig::load(&write("h3.toml", &format!("{BASE}\ngroup_size = 1"))).unwrap_err();
        assert!(err.to_string().contains("group_size 1 is below 2"), "{err}");
        let err =
            RunConfig::load(&write("h4.toml", &format!("{BASE}\ngroup_size = 2\ncompression = \"topk\""))).unwrap_err();
        assert!(err.to_string().contains("cannot be combined with compression"), "{err}");
        // Asynchronous rounds only change what members commit: any topology reduces it.
        let asy =
            RunConfig::load(&write("h5.toml", &format!("{BASE}\ngroup_size = 2\nasync_threshold_ms = 100"))).unwrap();
        assert_eq!(asy.group_size, Some(2));
        assert!(asy.asynchronous().is_some());
    }

    #[test]
    fn asynchronous_rounds_are_off_by_default_bounded_and_key_the_run_id() {
        let plain = RunConfig::load(&write("s.toml", BASE)).unwrap();
        assert_eq!(plain.asynchronous(), None);
        assert!(!String::from_utf8(serde_json::to_vec(&plain).unwrap()).unwrap().contains("async"));
        let asy = RunConfig::load(&write("t.toml", &format!("{BASE}\nasync_threshold_ms = 250"))).unwrap();
        assert_eq!(asy.asynchronous(), Some((std::time::Duration::from_millis(250), DEFAULT_MAX_STALENESS)));
        assert_ne!(plain.run_id(), asy.run_id());
        let err = RunConfig::load(&write("u.toml", &format!("{BASE}\nmax_staleness = 1"))).unwrap_err();
        assert!(err.to_string().contains("set async_threshold_ms"), "{err}");
        let err = RunConfig::load(&write("v.toml", &format!("{BASE}\nasync_threshold_ms = 9\nmax_staleness = 99")));
        assert!(err.unwrap_err().to_string().contains("max_staleness 99"));
        // Asynchronous rounds take compression: the run is both, and another run.
        let both =
            RunConfig::load(&write("w.toml", &format!("{BASE}\nasync_threshold_ms = 250\ncompression = \"topk\"")))
                .unwrap();
        assert_eq!(both.asynchronous(), asy.asynchronous());
        assert!(both.compression().is_ok_and(|c| c.has_residual()));
        assert_ne!(both.run_id(), asy.run_id());
    }

    #[test]
    fn compression_is_off_by_default_and_keys_the_run_id() {
        let plain = RunConfig::load(&write("p.toml", BASE)).unwrap();
        assert_eq!(plain.compression(), Ok(Compression::None));
        assert!(!String::from_utf8(serde_json::to_vec(&plain).unwrap()).unwrap().contains("compression"));
        let int8 = RunConfig::load(&write("q.toml", &format!("{BASE}\ncompression = \"int8\""))).unwrap();
        assert_eq!(int8.compression(), Ok(Compression::Int8 { block: DEFAULT_INT8_BLOCK }));
        let topk = format!("{BASE}\ncompression = \"topk\"\ntopk_fraction = 0.05");
        let topk = RunConfig::load(&write("r.toml", &topk)).unwrap();
        assert_eq!(topk.compression(), Ok(Compression::TopK { per_million: 50_000 }));
        assert!(plain.run_id() != int8.run_id() && int8.run_id() != topk.run_id());
        for (bad, why) in [
            ("compression = \"zip\"", "compression `zip`"),
            ("compression = \"int8\"\ncompression_block = 0", "int8 block of 0"),
            ("compression = \"topk\"\ntopk_fraction = 2.0", "topk_fraction 2"),
            ("topk_fraction = 0.1", "\"topk\" only"),
            ("compression = \"int8\"\naudit_tolerance = 1e-3", "bit-exact audits"),
        ] {
            let err = RunConfig::load(&write("s.toml", &format!("{BASE}\n{bad}"))).unwrap_err().to_string();
            assert!(err.contains(why), "{bad}: {err}");
        }
    }

    #[test]
    fn audits_are_bit_exact_on_the_cpu_build_and_within_a_tolerance_on_gpu_builds() {
        let mut cfg = RunConfig::load(&write("i.toml", BASE)).unwrap();
        cfg.compute = Some("burn-0.22.1/flex+simd+rayon".into());
        assert_eq!(cfg.audit_tolerance(), 0.0);
        cfg.compute = Some("burn-0.22.1/flex+simd+rayon+vulkan".into());
        assert_eq!(cfg.audit_tolerance(), GPU_AUDIT_TOLERANCE);
        let stated = RunConfig::load(&write("j.toml", &format!("{BASE}\naudit_tolerance = 1e-4"))).unwrap();
        assert_eq!(stated.audit_tolerance(), 1e-4);
        assert_ne!(stated.run_id(), RunConfig::load(&write("k.toml", BASE)).unwrap().run_id());
    }
}
