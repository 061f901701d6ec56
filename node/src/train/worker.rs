//! The compute worker of a training peer: one OS thread owns the model, its
//! flat parameters and the optimizer, and serves jobs in order (gradient of a
//! micro-batch, apply an averaged gradient, evaluate, save a checkpoint). The
//! async side awaits replies and never blocks on compute; jobs run in the
//! order they were sent, so a gradient asked for after an apply is computed on
//! the updated parameters.

use super::checkpoint;
use super::config::RunConfig;
use super::data::Dataset;
use super::model::{ModelConfig, Net};
use super::optim::{OptimizerConfig, Schedule};
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

enum Job {
    Gradient { start: u64, batch: usize, weight: f32, reply: oneshot::Sender<Gradient> },
    Apply { grad: Vec<f32>, reply: oneshot::Sender<Hash> },
    Evaluate { reply: oneshot::Sender<f64> },
    Save { path: PathBuf, reply: oneshot::Sender<Result<Hash, String>> },
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
        let model = ModelConfig::named(&cfg.model, ds.shape, ds.classes)
            .ok_or_else(|| anyhow::anyhow!("unknown model {}", cfg.model))?;
        let (tx, rx) = mpsc::channel();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let cfg = cfg.clone();
        std::thread::Builder::new().name("compute".into()).spawn(move || match model {
            ModelConfig::Mlp(c) => serve(c.init(&device), device, &cfg, &ds, rx, ready_tx),
            ModelConfig::Cnn(c) => serve(c.init(&device), device, &cfg, &ds, rx, ready_tx),
            ModelConfig::Resnet(c) => serve(c.init(&device), device, &cfg, &ds, rx, ready_tx),
        })?;
        let (params, initial_hash) = ready_rx.recv().map_err(|_| WorkerGone)?;
        Ok(Self { tx, params, initial_hash })
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
        self.ask(move |reply| Job::Gradient { start, batch, weight, reply })
    }

    /// Applies the ring's averaged gradient; resolves to the new parameter hash.
    pub fn apply(&self, grad: Vec<f32>) -> Reply<Hash> {
        self.ask(move |reply| Job::Apply { grad, reply })
    }

    /// Test accuracy of the parameters as they are when the job runs.
    pub fn evaluate(&self) -> Reply<f64> {
        self.ask(move |reply| Job::Evaluate { reply })
    }

    /// Writes a checkpoint of the state as it is when the job runs; resolves to its parameter hash.
    pub fn save(&self, path: PathBuf) -> Reply<Result<Hash, String>> {
        self.ask(move |reply| Job::Save { path, reply })
    }
}

fn serve<M: Net>(
    model: M,
    device: Device,
    cfg: &RunConfig,
    ds: &Dataset,
    rx: mpsc::Receiver<Job>,
    ready: std::sync::mpsc::Sender<(usize, Hash)>,
) {
    let optimizer = if cfg.optimizer == "sgd" { OptimizerConfig::sgd() } else { OptimizerConfig::adam() };
    let total = cfg.rounds;
    let schedule = Schedule::WarmupCosine { lr: cfg.lr, min_lr: cfg.lr * 0.01, warmup: (total / 20).max(1), total };
    let mut t = Trainer::new(model, device, ds.shape, cfg.seed, optimizer, schedule, cfg.clip_norm);
    let mut sampler = Sampler::new(ds.hash, cfg.seed, ds.train.len());
    let _ = ready.send((t.layout().total, t.param_hash()));
    let mut hash = t.param_hash();
    for job in rx {
        match job {
            Job::Gradient { start, batch, weight, reply } => {
                let began = Instant::now();
                let idx = sampler.stream(start, batch);
                let g = t.gradient(&ds.train, &idx);
                let weighted = g.grad.iter().map(|v| v * weight).collect();
                let _ = reply.send(Gradient {
                    weighted,
                    loss: g.loss,
                    samples: g.samples,
                    param_hash: hash,
                    compute_us: began.elapsed().as_micros() as u64,
                });
            }
            Job::Apply { grad, reply } => {
                t.apply(&grad);
                hash = t.param_hash();
                let _ = reply.send(hash);
            }
            Job::Evaluate { reply } => {
                let _ = reply.send(t.evaluate(&ds.test, 1000));
            }
            Job::Save { path, reply } => {
                let r =
                    checkpoint::save(&path, t.layout(), t.params(), t.optimizer(), t.step()).map_err(|e| e.to_string());
                let _ = reply.send(r);
            }
        }
    }
}
