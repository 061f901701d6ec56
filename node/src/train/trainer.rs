//! The training step, shaped for the ring: compute the loss and the gradient
//! of a micro-batch as one flat vector; apply an (averaged) flat gradient with
//! the optimizer; hash the parameters.

use super::data::Split;
use super::model::Net;
use super::optim::{Optimizer, OptimizerConfig, Schedule};
use super::params::{self, Layout};
use burn::nn::loss::CrossEntropyLossConfig;
use burn::prelude::*;
use p2p_proto::Hash;

/// The gradient of one micro-batch.
#[derive(Debug, Clone)]
pub struct StepGrad {
    /// Mean cross-entropy over the batch.
    pub loss: f32,
    /// Mean gradient over the batch, in [`Layout`] order.
    pub grad: Vec<f32>,
    pub samples: usize,
}

/// A model, its flat parameters and its optimizer.
#[derive(Debug)]
pub struct Trainer<M: Net> {
    model: M,
    device: Device,
    layout: Layout,
    params: Vec<f32>,
    optimizer: Optimizer,
    schedule: Schedule,
    clip_norm: f32,
    shape: [usize; 3],
    /// Local SGD: the inner optimizer (fresh every round) and the outer step's settings; the
    /// trainer's own `optimizer` is then the outer one.
    local: Option<(OptimizerConfig, super::config::LocalSgd)>,
}

/// Builds the input tensor `[B, C, H, W]` (values scaled to 0..1) and the label
/// tensor of the samples `idx` of `split`.
pub fn batch(split: &Split, shape: [usize; 3], idx: &[u32], device: &Device) -> (Tensor<4>, Tensor<1, Int>) {
    let per: usize = shape.iter().product();
    let mut x = Vec::with_capacity(idx.len() * per);
    let mut y = Vec::with_capacity(idx.len());
    for &i in idx {
        let i = i as usize;
        x.extend(split.images[i * per..(i + 1) * per].iter().map(|&b| f32::from(b) / 255.0));
        y.push(i64::from(split.labels[i]));
    }
    let [c, h, w] = shape;
    (
        Tensor::from_data(TensorData::new(x, [idx.len(), c, h, w]), device),
        Tensor::from_data(TensorData::new(y, [idx.len()]), device),
    )
}

impl<M: Net> Trainer<M> {
    /// `model` is built on `device` (an autodiff device); its parameters are
    /// replaced by the run's deterministic initialisation from `seed`.
    pub fn new(
        model: M,
        device: Device,
        shape: [usize; 3],
        seed: u64,
        optimizer: OptimizerConfig,
        schedule: Schedule,
        clip_norm: f32,
    ) -> Self {
        let layout = Layout::of(&model);
        let params = params::deterministic_init(&layout, seed);
        let model = params::load(model, &params, &layout, &device);
        let optimizer = Optimizer::new(optimizer, layout.total);
        Self { model, device, layout, params, optimizer, schedule, clip_norm, shape, local: None }
    }

    /// Makes this a local-SGD trainer: [`Self::local_delta`] takes `local.steps` steps with a
    /// fresh `inner` optimizer at the scheduled rate, and [`Self::apply`] applies the averaged
    /// delta with the trainer's optimizer (the outer one) at `local.outer_lr`.
    pub fn with_local(mut self, inner: OptimizerConfig, local: super::config::LocalSgd) -> Self {
        self.local = Some((inner, local));
        self
    }

    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    pub fn params(&self) -> &[f32] {
        &self.params
    }

    pub fn optimizer(&self) -> &Optimizer {
        &self.optimizer
    }

    /// Number of optimizer steps taken.
    pub fn step(&self) -> u64 {
        self.optimizer.step
    }

    /// Loss and mean gradient of the samples `idx` of `split`.
    pub fn gradient(&self, split: &Split, idx: &[u32]) -> StepGrad {
        self.gradient_of(&self.model, split, idx)
    }

    /// Loss and mean gradient of the samples `idx` of `split` at other parameters, `params`
    /// (an earlier state, for a stale gradient's audit); the trainer's own do not change.
    pub fn gradient_at(&self, params: &[f32], split: &Split, idx: &[u32]) -> StepGrad {
        let model = params::load(self.model.clone(), params, &self.layout, &self.device);
        self.gradient_of(&model, split, idx)
    }

    fn gradient_of(&self, model: &M, split: &Split, idx: &[u32]) -> StepGrad {
        let (x, y) = batch(split, self.shape, idx, &self.device);
        let logits = model.forward(x);
        let loss = CrossEntropyLossConfig::new().init(&self.device).forward(logits, y);
        let grads = loss.backward();
        let loss_value = loss.into_data().iter::<f32>().next().unwrap_or(f32::NAN);
        StepGrad { loss: loss_value, grad: params::flatten_grads(model, &grads, &self.layout), samples: idx.len() }
    }

    /// Local SGD: from the current parameters, one inner step per batch of `batches` (each
    /// gradient clipped to the run's norm, a fresh inner optimizer at the scheduled rate), and
    /// the parameters' change, current minus final, in [`Layout`] order: the pseudo-gradient
    /// the ring averages. The loss is the mean over the steps; the parameters do not change.
    /// Deterministic: the same parameters and batches give the same bits, so it is audited by
    /// recomputation like a gradient.
    pub fn local_delta(&self, split: &Split, batches: &[Vec<u32>]) -> StepGrad {
        self.local_delta_at(&self.params, self.optimizer.step, split, batches)
    }

    /// The same from other parameters, `params`, as they were after `step` outer steps (an
    /// earlier state, for a stale delta's audit); the trainer's own do not change.
    pub fn local_delta_at(&self, params: &[f32], step: u64, split: &Split, batches: &[Vec<u32>]) -> StepGrad {
        let (inner, _) = self.local.clone().expect("a local-SGD trainer");
        let lr = self.schedule.lr(step);
        let mut opt = Optimizer::new(inner, self.layout.total);
        let mut local = params.to_vec();
        let mut model = if std::ptr::eq(params, self.params.as_slice()) {
            self.model.clone()
        } else {
            params::load(self.model.clone(), params, &self.layout, &self.device)
        };
        let (mut loss, mut samples, mut steps) = (0f32, 0, 0);
        for idx in batches.iter().filter(|b| !b.is_empty()) {
            let mut g = self.gradient_of(&model, split, idx);
            p2p_proto::fixed::clip_global_norm(&mut g.grad, self.clip_norm);
            opt.apply(&mut local, &g.grad, lr);
            model = params::load(model, &local, &self.layout, &self.device);
            loss += g.loss;
            samples += g.samples;
            steps += 1;
        }
        let grad = params.iter().zip(&local).map(|(p, l)| p - l).collect();
        StepGrad { loss: loss / steps.max(1) as f32, grad, samples }
    }

    /// Clips `grad` to the global norm and applies it with the optimizer at the
    /// scheduled learning rate (local SGD: the averaged delta, at the outer rate). Every peer applying the same gradient to the
    /// same state ends with the same bits.
    pub fn apply(&mut self, grad: &[f32]) {
        let mut g = grad.to_vec();
        p2p_proto::fixed::clip_global_norm(&mut g, self.clip_norm);
        let lr = match &self.local {
            Some((_, local)) => local.outer_lr,
            None => self.schedule.lr(self.optimizer.step),
        };
        self.optimizer.apply(&mut self.params, &g, lr);
        let model = self.model.clone();
        self.model = params::load(model, &self.params, &self.layout, &self.device);
    }

    /// Restores parameters and optimizer state (from a checkpoint).
    pub fn restore(&mut self, params: Vec<f32>, optimizer: Optimizer) {
        assert_eq!(params.len(), self.layout.total);
        self.params = params;
        self.optimizer = optimizer;
        let model = self.model.clone();
        self.model = params::load(model, &self.params, &self.layout, &self.device);
    }

    pub fn param_hash(&self) -> Hash {
        params::param_hash(&self.params, &self.layout)
    }

    /// Accuracy on `split`, in batches of `batch`, without autodiff.
    pub fn evaluate(&self, split: &Split, batch_size: usize) -> f64 {
        let model = self.model.valid();
        let device = self.device.clone().inner();
        let mut correct = 0usize;
        let all: Vec<u32> = (0..split.len() as u32).collect();
        for idx in all.chunks(batch_size.max(1)) {
            let (x, y) = batch(split, self.shape, idx, &device);
            let pred = model.forward(x).argmax(1).flatten::<1>(0, 1);
            let pred: Vec<i64> = pred.into_data().iter::<i64>().collect();
            let want: Vec<i64> = y.into_data().iter::<i64>().collect();
            correct += pred.iter().zip(&want).filter(|(a, b)| a == b).count();
        }
        correct as f64 / split.len().max(1) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::model::{CnnConfig, MlpConfig, ResNetConfig};
    use crate::train::optim::{OptimizerConfig, Schedule};

    /// A split of `n` images of `shape` with a simple learnable rule (the label
    /// is the period of a stripe pattern), for shape checks only; the
    /// learning tests use real Fashion-MNIST.
    fn stripes(n: usize, shape: [usize; 3]) -> Split {
        let per: usize = shape.iter().product();
        let mut images = Vec::with_capacity(n * per);
        let mut labels = Vec::new();
        for i in 0..n {
            let q = i % 4;
            labels.push(q as u8);
            images.extend((0..per).map(|p| if (p / (q + 1)) % 2 == 0 { 200 } else { 0 }));
        }
        Split { images, labels }
    }

    fn fits<M: Net>(model: M, shape: [usize; 3]) {
        let device = Device::flex().autodiff();
        let model = model.to_device(&device);
        let split = stripes(16, shape);
        let mut t =
            Trainer::new(model, device, shape, 3, OptimizerConfig::adam(), Schedule::Constant { lr: 1e-2 }, 5.0);
        let idx: Vec<u32> = (0..16).collect();
        let first = t.gradient(&split, &idx);
        // Every parameter gets a gradient.
        for e in &t.layout().entries {
            assert!(first.grad[e.offset..e.offset + e.len].iter().any(|g| *g != 0.0), "{} has no gradient", e.name);
        }
        assert_eq!(first.grad.len(), t.layout().total);
        assert!(first.grad.iter().any(|g| *g != 0.0));
        let h0 = t.param_hash();
        for _ in 0..60 {
            let g = t.gradient(&split, &idx);
            t.apply(&g.grad);
        }
        assert_ne!(t.param_hash(), h0);
        let last = t.gradient(&split, &idx);
        assert!(last.loss < first.loss * 0.5, "{} -> {}", first.loss, last.loss);
        let acc = t.evaluate(&split, 5);

        assert!(acc > 0.9, "accuracy {acc}, loss {} -> {}", first.loss, last.loss);
    }

    #[test]
    fn a_local_delta_is_h_inner_steps_from_the_current_parameters() {
        let d = Device::flex().autodiff();
        let shape = [1, 28, 28];
        let split = stripes(64, shape);
        let local = crate::train::config::LocalSgd { steps: 4, outer_lr: 1.0, outer_momentum: 0.0 };
        let trainer = |inner: OptimizerConfig| {
            let model = MlpConfig::new(28 * 28, 10).init(&d);
            Trainer::new(model, d.clone(), shape, 3, inner, Schedule::Constant { lr: 1e-2 }, 5.0)
        };
        let t = trainer(OptimizerConfig::sgd()).with_local(OptimizerConfig::adam(), local);
        let batches: Vec<Vec<u32>> = (0..4).map(|h| (h * 16..h * 16 + 16).collect()).collect();
        let delta = t.local_delta(&split, &batches);
        // By hand: a fresh Adam stepping through the same four batches from the same start.
        let mut by_hand = trainer(OptimizerConfig::adam());
        let start = by_hand.params().to_vec();
        for b in &batches {
            let g = by_hand.gradient(&split, b);
            by_hand.apply(&g.grad);
        }
        let expected: Vec<f32> = start.iter().zip(by_hand.params()).map(|(a, b)| a - b).collect();
        assert_eq!(delta.grad, expected, "the delta is start minus the parameters after the H steps, bit for bit");
        assert_eq!(delta.samples, 64);
        // One step on the four batches together is another delta; the trainer itself did not move.
        assert_ne!(t.local_delta(&split, &[(0..64).collect()]).grad, delta.grad);
        assert_eq!(t.params(), &start[..]);
    }

    #[test]
    fn a_gradient_or_delta_of_an_earlier_state_is_recomputed_bit_for_bit_after_the_state_moved_on() {
        let d = Device::flex().autodiff();
        let shape = [1, 28, 28];
        let split = stripes(64, shape);
        let idx: Vec<u32> = (0..16).collect();
        let batches: Vec<Vec<u32>> = (0..4).map(|h| (h * 16..h * 16 + 16).collect()).collect();
        let model = MlpConfig::new(28 * 28, 10).init(&d);
        // A warm-up schedule: the inner rate depends on the outer step, which must be the old one.
        let schedule = Schedule::WarmupCosine { lr: 1e-2, min_lr: 1e-4, warmup: 4, total: 20 };
        let local = crate::train::config::LocalSgd { steps: 4, outer_lr: 1.0, outer_momentum: 0.0 };
        let mut t = Trainer::new(model, d.clone(), shape, 3, OptimizerConfig::sgd(), schedule, 5.0)
            .with_local(OptimizerConfig::adam(), local);
        let (old, old_step) = (t.params().to_vec(), t.step());
        let (gradient, delta) = (t.gradient(&split, &idx), t.local_delta(&split, &batches));
        for _ in 0..2 {
            let d = t.local_delta(&split, &batches);
            t.apply(&d.grad);
        }
        assert_ne!(t.params(), &old[..]);
        assert_eq!(t.gradient_at(&old, &split, &idx).grad, gradient.grad);
        assert_eq!(t.local_delta_at(&old, old_step, &split, &batches).grad, delta.grad);
        // At the current step instead, the inner rate differs: so does the delta.
        assert_ne!(t.local_delta_at(&old, t.step(), &split, &batches).grad, delta.grad);
    }

    #[test]
    fn every_model_trains_on_its_input_shape() {
        let d = Device::flex().autodiff();
        fits(MlpConfig::new(28 * 28, 10).init(&d), [1, 28, 28]);
        fits(CnnConfig::new(1, 28, 28, 10).with_conv1(4).with_conv2(8).with_hidden(16).init(&d), [1, 28, 28]);
        fits(ResNetConfig::new(3, 10).with_width(4).init(&d), [3, 32, 32]);
    }
}
