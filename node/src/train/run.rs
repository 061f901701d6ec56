//! `node train`: the single-peer baseline. Trains on the whole batch alone,
//! with the same sampler, step and optimizer a ring member uses, shows a
//! progress bar, and evaluates on the test split after every epoch.

use super::checkpoint;
use super::data::{self, Dataset};
use super::model::{ModelConfig, Net};
use super::optim::{OptimizerConfig, Schedule};
use super::shard::Sampler;
use super::trainer::Trainer;
use crate::cli::{Backend, ModelKind, OptimizerKind, TrainArgs};
use anyhow::{Context, bail};
use burn::prelude::Device;
use indicatif::{ProgressBar, ProgressStyle};
use p2p_proto::hash::{hash_i32s, hex};
use std::time::Instant;
use tracing::info;

/// The compute device for `backend`, with autodiff.
pub fn device(backend: Backend) -> anyhow::Result<Device> {
    let base = match backend {
        Backend::Cpu => Device::flex(),
        #[cfg(feature = "vulkan")]
        Backend::Vulkan => Device::vulkan(Default::default()),
        #[cfg(feature = "cuda")]
        Backend::Cuda => Device::cuda(0),
        #[allow(unreachable_patterns)]
        other => bail!(
            "this node was built without the {other:?} backend: rebuild with `--features {}`",
            format!("{other:?}").to_lowercase()
        ),
    };
    Ok(base.autodiff())
}

pub fn run(args: TrainArgs) -> anyhow::Result<()> {
    let mut ds = data::load(&args.dataset)?;
    if args.train_limit > 0 {
        ds.train = ds.train.take(args.train_limit);
    }
    if args.test_limit > 0 {
        ds.test = ds.test.take(args.test_limit);
    }
    let name = match args.model {
        ModelKind::Mlp => "mlp",
        ModelKind::Cnn => "cnn",
        ModelKind::Resnet => "resnet",
    };
    let config = ModelConfig::named(name, ds.shape, ds.classes).context("known model")?;
    let device = device(args.backend)?;
    info!(
        dataset = %args.dataset.display(),
        dataset_hash = %hex(&ds.hash),
        train = ds.train.len(),
        test = ds.test.len(),
        model = name,
        model_hash = %hex(&config.hash()),
        "training alone"
    );
    match config {
        ModelConfig::Mlp(c) => train(c.init(&device), device, &ds, &args),
        ModelConfig::Cnn(c) => train(c.init(&device), device, &ds, &args),
        ModelConfig::Resnet(c) => train(c.init(&device), device, &ds, &args),
    }
}

fn train<M: Net>(model: M, device: Device, ds: &Dataset, a: &TrainArgs) -> anyhow::Result<()> {
    if a.batch == 0 || a.batch > ds.train.len() {
        bail!("--batch {} must be between 1 and the {} training samples", a.batch, ds.train.len());
    }
    if !(a.lr.is_finite() && a.lr > 0.0) {
        bail!(
            "--lr {} must be a positive number (a zero rate trains nothing, a negative one away from the data)",
            a.lr
        );
    }
    if !(a.clip_norm.is_finite() && a.clip_norm > 0.0) {
        bail!("--clip-norm {} must be a positive number (gradients are scaled to at most that norm)", a.clip_norm);
    }
    if a.epochs == 0 {
        bail!("--epochs 0 trains nothing: give at least 1");
    }
    let steps_per_epoch = (ds.train.len() / a.batch) as u64;
    let mut total = steps_per_epoch * a.epochs;
    if a.max_steps > 0 {
        total = total.min(a.max_steps);
    }
    let optimizer = match a.optimizer {
        OptimizerKind::Adam => OptimizerConfig::adam(),
        OptimizerKind::Sgd => OptimizerConfig::sgd(),
    };
    let schedule = Schedule::WarmupCosine { lr: a.lr, min_lr: a.lr * 0.01, warmup: (total / 20).max(1), total };
    let mut t = Trainer::new(model, device, ds.shape, a.seed, optimizer, schedule, a.clip_norm);
    if let Some(path) = &a.resume {
        let c = checkpoint::load(path, t.layout())?;
        if std::mem::discriminant(&c.optimizer.config) != std::mem::discriminant(&t.optimizer().config) {
            bail!(
                "{} holds the state of {:?}, not of the --optimizer asked for ({:?}): resume with the optimizer it \
                 was trained with",
                path.display(),
                c.optimizer.config,
                t.optimizer().config
            );
        }
        info!(path = %path.display(), step = c.optimizer.step, param_hash = %hex(&c.param_hash), "resumed");
        t.restore(c.params, c.optimizer);
    }
    info!(params = t.layout().total, param_hash = %hex(&t.param_hash()), steps = total, "model ready");
    let mut sampler = Sampler::new(ds.hash, a.seed, ds.train.len());
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} steps  {msg}  [{elapsed_precise} < {eta_precise}]")
            .expect("valid template"),
    );
    let start = Instant::now();
    let mut window = (0.0f64, 0u64);
    while t.step() < total {
        let step = t.step();
        let idx = sampler.stream(step * a.batch as u64, a.batch);
        let g = t.gradient(&ds.train, &idx);
        if !g.loss.is_finite() {
            bail!("the loss became {} at step {step}: lower --lr or --clip-norm", g.loss);
        }
        t.apply(&g.grad);
        window = (window.0 + f64::from(g.loss), window.1 + 1);
        let samples_per_s = ((step + 1) * a.batch as u64) as f64 / start.elapsed().as_secs_f64();
        bar.set_message(format!("loss {:.4}  {samples_per_s:.0} samples/s", window.0 / window.1 as f64));
        bar.inc(1);
        if a.log_every > 0 && (step + 1) % a.log_every == 0 {
            let gbits: Vec<i32> = g.grad.iter().map(|v| v.to_bits() as i32).collect();
            info!(
                step = step + 1,
                loss = g.loss,
                grad_hash = %hex(&hash_i32s(&gbits)),
                param_hash = %hex(&t.param_hash()),
                "step"
            );
        }
        let done_epoch = (step + 1) % steps_per_epoch == 0;
        if done_epoch || step + 1 == total {
            let acc = t.evaluate(&ds.test, 1000);
            bar.println(format!(
                "epoch {:>3}  step {:>6}  loss {:.4}  test accuracy {:.2}%  {samples_per_s:.0} samples/s",
                (step + 1).div_ceil(steps_per_epoch),
                step + 1,
                window.0 / window.1 as f64,
                100.0 * acc
            ));
            info!(
                epoch = (step + 1).div_ceil(steps_per_epoch),
                step = step + 1,
                loss = window.0 / window.1 as f64,
                accuracy = acc,
                samples_per_s,
                elapsed_s = start.elapsed().as_secs_f64(),
                "evaluated"
            );
            window = (0.0, 0);
        }
    }
    bar.finish_and_clear();
    if let Some(path) = &a.checkpoint {
        let h = checkpoint::save(path, t.layout(), t.params(), t.optimizer(), t.step(), None)?;
        info!(path = %path.display(), param_hash = %hex(&h), "checkpoint written");
    }
    info!(steps = t.step(), param_hash = %hex(&t.param_hash()), elapsed_s = start.elapsed().as_secs_f64(), "training done");
    Ok(())
}
