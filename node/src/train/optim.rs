//! Optimizers over the flat parameter vector: SGD with momentum and Adam, with
//! a learning-rate schedule. Their state is flat vectors too, so a checkpoint
//! stores it as plain tensors, and every peer applying the same averaged
//! gradient to the same state computes the same bits (element-wise f32
//! arithmetic in a fixed order).

use serde::{Deserialize, Serialize};

/// Which optimizer, with its hyper-parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum OptimizerConfig {
    Sgd { momentum: f32, weight_decay: f32 },
    Adam { beta1: f32, beta2: f32, epsilon: f32, weight_decay: f32 },
}

impl OptimizerConfig {
    pub fn sgd() -> Self {
        Self::Sgd { momentum: 0.9, weight_decay: 0.0 }
    }

    pub fn adam() -> Self {
        Self::Adam { beta1: 0.9, beta2: 0.999, epsilon: 1e-8, weight_decay: 0.0 }
    }
}

/// Learning rate as a function of the step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Schedule {
    Constant {
        lr: f64,
    },
    /// Linear warm-up over `warmup` steps, then cosine decay to `min_lr` at `total`.
    WarmupCosine {
        lr: f64,
        min_lr: f64,
        warmup: u64,
        total: u64,
    },
}

impl Schedule {
    pub fn lr(&self, step: u64) -> f64 {
        match *self {
            Schedule::Constant { lr } => lr,
            Schedule::WarmupCosine { lr, min_lr, warmup, total } => {
                if step < warmup {
                    lr * (step + 1) as f64 / warmup as f64
                } else {
                    let span = total.saturating_sub(warmup).max(1) as f64;
                    let t = ((step - warmup) as f64 / span).min(1.0);
                    min_lr + 0.5 * (lr - min_lr) * (1.0 + (std::f64::consts::PI * t).cos())
                }
            }
        }
    }
}

/// Optimizer state: the step count and the per-parameter moments.
#[derive(Debug, Clone, PartialEq)]
pub struct Optimizer {
    pub config: OptimizerConfig,
    pub step: u64,
    /// SGD: velocity; Adam: first moment.
    pub m: Vec<f32>,
    /// Adam: second moment (empty for SGD).
    pub v: Vec<f32>,
}

impl Optimizer {
    pub fn new(config: OptimizerConfig, len: usize) -> Self {
        let v = if matches!(config, OptimizerConfig::Adam { .. }) { vec![0.0; len] } else { Vec::new() };
        Self { config, step: 0, m: vec![0.0; len], v }
    }

    /// Applies one update with gradient `g` and learning rate `lr` to `params`.
    pub fn apply(&mut self, params: &mut [f32], g: &[f32], lr: f64) {
        assert_eq!(params.len(), g.len());
        let lr = lr as f32;
        self.step = self.step.saturating_add(1);
        match self.config {
            OptimizerConfig::Sgd { momentum, weight_decay } => {
                for ((p, &g), m) in params.iter_mut().zip(g).zip(&mut self.m) {
                    let g = g + weight_decay * *p;
                    *m = momentum * *m + g;
                    *p -= lr * *m;
                }
            }
            OptimizerConfig::Adam { beta1, beta2, epsilon, weight_decay } => {
                let t = i32::try_from(self.step).unwrap_or(i32::MAX);
                let c1 = 1.0 - beta1.powi(t);
                let c2 = 1.0 - beta2.powi(t);
                for (((p, &g), m), v) in params.iter_mut().zip(g).zip(&mut self.m).zip(&mut self.v) {
                    let g = g + weight_decay * *p;
                    *m = beta1 * *m + (1.0 - beta1) * g;
                    *v = beta2 * *v + (1.0 - beta2) * g * g;
                    let mhat = *m / c1;
                    let vhat = *v / c2;
                    *p -= lr * mhat / (vhat.sqrt() + epsilon);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Both optimizers minimise a quadratic, and are deterministic.
    #[test]
    fn optimizers_descend_and_repeat_bit_for_bit() {
        for cfg in [OptimizerConfig::sgd(), OptimizerConfig::adam()] {
            let run = || {
                let mut p = vec![3.0f32, -2.0, 0.5];
                let mut o = Optimizer::new(cfg.clone(), 3);
                for _ in 0..300 {
                    let g: Vec<f32> = p.iter().map(|x| 2.0 * x).collect();
                    o.apply(&mut p, &g, 0.05);
                }
                p
            };
            let p = run();
            assert!(p.iter().all(|x| x.abs() < 0.05), "{cfg:?}: {p:?}");
            assert_eq!(
                p.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                run().iter().map(|x| x.to_bits()).collect::<Vec<_>>()
            );
        }
    }

    #[test]
    fn warmup_then_cosine() {
        let s = Schedule::WarmupCosine { lr: 1.0, min_lr: 0.0, warmup: 10, total: 110 };
        assert!((s.lr(0) - 0.1).abs() < 1e-12);
        assert!((s.lr(9) - 1.0).abs() < 1e-12);
        assert!((s.lr(60) - 0.5).abs() < 1e-12);
        assert!(s.lr(110).abs() < 1e-12);
        assert!(s.lr(500).abs() < 1e-12);
    }
}
