//! The compute worker of a training peer: one OS thread owns the model, its
//! flat parameters and the optimizer, and serves jobs in order (gradient of a
//! micro-batch, apply an averaged gradient, evaluate, save a checkpoint, take
//! or restore a snapshot of the whole state for peers that join late). The
//! async side awaits replies and never blocks on compute; jobs run in the
//! order they were sent, so a gradient asked for after an apply is computed on
//! the updated parameters.

use super::checkpoint::{self, Checkpoint};
use super::config::RunConfig;
use super::data::Dataset;
use super::model::{ModelConfig, Net};
use super::optim::{Optimizer, OptimizerConfig, Schedule};
use super::shard::Sampler;
use super::trainer::Trainer;
use burn::prelude::Device;
use p2p_proto::Hash;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::mpsc;
use std::time::Instant;
use tokio::sync::oneshot;

/// A micro-batch's gradient, scaled by the peer's weight in the ring's average.
#[derive(Debug)]
pub struct Gradient {
    pub weighted: Vec<f32>,
    pub loss: f32,
    pub samples: usize,
    /// Hash of the parameters the gradient was computed on.
    pub param_hash: Hash,
    pub compute_us: u64,
}

/// The whole training state: what a joiner needs to train on from here.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub params: Vec<f32>,
    pub optimizer: Optimizer,
    pub param_hash: Hash,
    pub optimizer_hash: Hash,
}

enum Job {
    Gradient {
        start: u64,
        batch: usize,
        weight: f32,
        at: Option<Hash>,
        reply: oneshot::Sender<Gradient>,
    },
    Apply {
        grad: Vec<f32>,
        reply: oneshot::Sender<Hash>,
    },
    Evaluate {
        reply: oneshot::Sender<f64>,
    },
    Save {
        path: PathBuf,
        round: u64,
        cursor: u64,
        reply: oneshot::Sender<Result<Hash, String>>,
    },
    Snapshot {
        reply: oneshot::Sender<Snapshot>,
    },
    Restore {
        params: Vec<f32>,
        optimizer: Optimizer,
        expected: Option<Hash>,
        reply: oneshot::Sender<Result<Hash, String>>,
    },
    Load {
        path: PathBuf,
        reply: oneshot::Sender<Result<Checkpoint, String>>,
    },
}

/// A job's reply; the job is queued when this is created, not when it is awaited.
pub type Reply<T> = std::pin::Pin<Box<dyn Future<Output = Result<T, WorkerGone>> + Send>>;

/// Handle to the compute thread; cheap to clone.
#[derive(Debug, Clone)]
pub struct Worker {
    tx: mpsc::Sender<Job>,
    /// Parameters in the model.
    pub params: usize,
    /// Hash of the initial parameters.
    pub initial_hash: Hash,
    /// The optimizer (its kind tells how many moment vectors a state carries).
    pub optimizer: OptimizerConfig,
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Job")
    }
}

/// Why the worker is gone: the compute thread panicked (its message is in the log).
#[derive(Debug, thiserror::Error)]
#[error("the compute thread stopped")]
pub struct WorkerGone;

impl Worker {
    /// Starts the compute thread for `cfg` on `device` (an autodiff device).
    pub fn spawn(cfg: &RunConfig, ds: Arc<Dataset>, device: Device) -> anyhow::Result<Self> {
        Self::spawn_slowed(cfg, ds, device, std::time::Duration::ZERO)
    }

    /// The same, taking `delay` longer for every gradient (a test hook: a slower device).
    pub fn spawn_slowed(
        cfg: &RunConfig,
        ds: Arc<Dataset>,
        device: Device,
        delay: std::time::Duration,
    ) -> anyhow::Result<Self> {
        let optimizer = optimizer_config(cfg);
        let model = ModelConfig::named(&cfg.model, ds.shape, ds.classes)
            .ok_or_else(|| anyhow::anyhow!("unknown model {}", cfg.model))?;
        let (tx, rx) = mpsc::channel();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let cfg = cfg.clone();
        std::thread::Builder::new().name("compute".into()).spawn(move || match model {
            ModelConfig::Mlp(c) => serve(c.init(&device), device, &cfg, &ds, rx, ready_tx, delay),
            ModelConfig::Cnn(c) => serve(c.init(&device), device, &cfg, &ds, rx, ready_tx, delay),
            ModelConfig::Resnet(c) => serve(c.init(&device), device, &cfg, &ds, rx, ready_tx, delay),
        })?;
        let (params, initial_hash) = ready_rx.recv().map_err(|_| WorkerGone)?;
        Ok(Self { tx, params, initial_hash, optimizer })
    }

    /// Queues `job` now (so jobs run in the order they were asked for) and returns its reply.
    fn ask<T: Send + 'static>(&self, job: impl FnOnce(oneshot::Sender<T>) -> Job) -> Reply<T> {
        let (reply, rx) = oneshot::channel();
        let sent = self.tx.send(job(reply)).is_ok();
        Box::pin(async move {
            if !sent {
                return Err(WorkerGone);
            }
            rx.await.map_err(|_| WorkerGone)
        })
    }

    /// Gradient of the `batch` samples at stream position `start`, times `weight`.
    pub fn gradient(&self, start: u64, batch: usize, weight: f32) -> Reply<Gradient> {
        self.ask(move |reply| Job::Gradient { start, batch, weight, at: None, reply })
    }

    /// The same at the parameters whose hash is `at`: the current ones or, in an asynchronous
    /// run, one of the last `max_staleness` states before them (to audit a stale gradient). Its
    /// `param_hash` names the parameters it was computed on: the current ones where `at` is
    /// none of those.
    pub fn gradient_at(&self, start: u64, batch: usize, weight: f32, at: Hash) -> Reply<Gradient> {
        self.ask(move |reply| Job::Gradient { start, batch, weight, at: Some(at), reply })
    }

    /// Applies the ring's averaged gradient; resolves to the new parameter hash.
    pub fn apply(&self, grad: Vec<f32>) -> Reply<Hash> {
        self.ask(move |reply| Job::Apply { grad, reply })
    }

    /// Test accuracy of the parameters as they are when the job runs.
    pub fn evaluate(&self) -> Reply<f64> {
        self.ask(move |reply| Job::Evaluate { reply })
    }

    /// Writes a checkpoint of the state as it is when the job runs (after `round`, with the
    /// sample-stream `cursor` after it); resolves to its parameter hash.
    pub fn save(&self, path: PathBuf, round: u64, cursor: u64) -> Reply<Result<Hash, String>> {
        self.ask(move |reply| Job::Save { path, round, cursor, reply })
    }

    /// The whole state as it is when the job runs (after the applies queued before it).
    pub fn snapshot(&self) -> Reply<Snapshot> {
        self.ask(move |reply| Job::Snapshot { reply })
    }

    /// Replaces the state (one fetched from a peer, or read from a checkpoint); resolves to
    /// the new parameter hash, recomputed from the values.
    pub fn restore(
        &self,
        params: Vec<f32>,
        optimizer: Optimizer,
        expected: Option<Hash>,
    ) -> Reply<Result<Hash, String>> {
        self.ask(move |reply| Job::Restore { params, optimizer, expected, reply })
    }

    /// Reads a checkpoint of this model (checked against its recorded hashes), without
    /// restoring it.
    pub fn load(&self, path: PathBuf) -> Reply<Result<Checkpoint, String>> {
        self.ask(move |reply| Job::Load { path, reply })
    }

    /// Moment vectors the optimizer keeps (SGD with momentum: 1, Adam: 2).
    pub fn moments(&self) -> u8 {
        match self.optimizer {
            OptimizerConfig::Sgd { .. } => 1,
            OptimizerConfig::Adam { .. } => 2,
        }
    }
}

/// The optimizer whose state the peers share (checkpoints, state sync): the run's, or with
/// local SGD the outer one (SGD with the outer momentum).
fn optimizer_config(cfg: &RunConfig) -> OptimizerConfig {
    match cfg.local_sgd() {
        Some(l) => OptimizerConfig::Sgd { momentum: l.outer_momentum, weight_decay: 0.0 },
        None => inner_config(cfg),
    }
}

/// The run's optimizer (with local SGD: the one each member steps with inside a round).
fn inner_config(cfg: &RunConfig) -> OptimizerConfig {
    if cfg.optimizer == "sgd" { OptimizerConfig::sgd() } else { OptimizerConfig::adam() }
}

fn serve<M: Net>(
    model: M,
    device: Device,
    cfg: &RunConfig,
    ds: &Dataset,
    rx: mpsc::Receiver<Job>,
    ready: std::sync::mpsc::Sender<(usize, Hash)>,
    delay: std::time::Duration,
) {
    let optimizer = optimizer_config(cfg);
    let total = cfg.rounds;
    let schedule = Schedule::WarmupCosine { lr: cfg.lr, min_lr: cfg.lr * 0.01, warmup: (total / 20).max(1), total };
    let mut t = Trainer::new(model, device, ds.shape, cfg.seed, optimizer, schedule, cfg.clip_norm);
    if let Some(local) = cfg.local_sgd() {
        t = t.with_local(inner_config(cfg), local);
    }
    let mut sampler = Sampler::new(ds.hash, cfg.seed, ds.train.len());
    let _ = ready.send((t.layout().total, t.param_hash()));
    let mut hash = t.param_hash();
    // Asynchronous runs: the states before the current one that a stale gradient may be of.
    let keep = cfg.asynchronous().map_or(0, |(_, s)| s as usize);
    let mut earlier: std::collections::VecDeque<(Hash, Vec<f32>, u64)> = Default::default();
    for job in rx {
        match job {
            Job::Gradient { start, batch, weight, at, reply } => {
                let began = Instant::now();
                if !delay.is_zero() {
                    std::thread::sleep(delay);
                }
                let old = at.filter(|h| *h != hash).and_then(|h| earlier.iter().find(|(e, _, _)| *e == h));
                let mut g = match cfg.local_sgd() {
                    // `batch` is this member's samples for the whole round: one slice of the
                    // stream per local step, split the same way at every peer.
                    Some(l) => {
                        let steps = l.steps as usize;
                        let batches: Vec<Vec<u32>> = (0..steps)
                            .map(|h| {
                                let r = p2p_proto::chunk::chunk_range(batch, steps, h);
                                sampler.stream(start + r.start as u64, r.len())
                            })
                            .collect();
                        match old {
                            Some((_, params, step)) => t.local_delta_at(params, *step, &ds.train, &batches),
                            None => t.local_delta(&ds.train, &batches),
                        }
                    }
                    None => match old {
                        Some((_, params, _)) => t.gradient_at(params, &ds.train, &sampler.stream(start, batch)),
                        None => t.gradient(&ds.train, &sampler.stream(start, batch)),
                    },
                };
                // Each member's gradient is clipped before it is weighted: a commit to a larger
                // norm proves a lie ([`p2p_proto::audit::norm_exceeds`]).
                p2p_proto::fixed::clip_global_norm(&mut g.grad, cfg.clip_norm);
                let weighted = g.grad.iter().map(|v| v * weight).collect();
                let _ = reply.send(Gradient {
                    weighted,
                    loss: g.loss,
                    samples: g.samples,
                    param_hash: old.map_or(hash, |(h, _, _)| *h),
                    compute_us: began.elapsed().as_micros() as u64,
                });
            }
            Job::Apply { grad, reply } => {
                if keep > 0 {
                    earlier.push_back((hash, t.params().to_vec(), t.step()));
                    if earlier.len() > keep {
                        earlier.pop_front();
                    }
                }
                t.apply(&grad);
                hash = t.param_hash();
                let _ = reply.send(hash);
            }
            Job::Evaluate { reply } => {
                let _ = reply.send(t.evaluate(&ds.test, 1000));
            }
            Job::Save { path, round, cursor, reply } => {
                let r = checkpoint::save(&path, t.layout(), t.params(), t.optimizer(), round, Some(cursor))
                    .map_err(|e| e.to_string());
                let _ = reply.send(r);
            }
            Job::Snapshot { reply } => {
                let _ = reply.send(Snapshot {
                    params: t.params().to_vec(),
                    optimizer: t.optimizer().clone(),
                    param_hash: hash,
                    optimizer_hash: checkpoint::optimizer_hash(t.optimizer()),
                });
            }
            Job::Restore { params, optimizer, expected, reply } => {
                let total = t.layout().total;
                let fits = params.len() == total
                    && optimizer.m.len() == total
                    && (optimizer.v.is_empty() || optimizer.v.len() == total)
                    && optimizer.config == t.optimizer().config;
                if !fits {
                    let _ = reply.send(Err(format!(
                        "the state does not fit this model: {} parameters and {}/{} moments for {total}, optimizer {:?}",
                        params.len(),
                        optimizer.m.len(),
                        optimizer.v.len(),
                        optimizer.config
                    )));
                    continue;
                }
                // Checked before they replace this peer's own: a state other than announced
                // leaves it as it was.
                if let Some(want) = expected {
                    let got = crate::train::params::param_hash(&params, t.layout());
                    if got != want {
                        let (got, want) = (p2p_proto::hash::hex(&got), p2p_proto::hash::hex(&want));
                        let _ = reply.send(Err(format!("the parameters hash to {got}, not the {want} announced")));
                        continue;
                    }
                }
                t.restore(params, optimizer);
                hash = t.param_hash();
                earlier.clear();
                let _ = reply.send(Ok(hash));
            }
            Job::Load { path, reply } => {
                let _ = reply.send(checkpoint::load(&path, t.layout()).map_err(|e| e.to_string()));
            }
        }
    }
}
