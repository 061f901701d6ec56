//! Parameters as one flat f32 vector, the form the ring all-reduces.
//!
//! **Order.** Parameters appear in the order burn's module visitor walks them:
//! the model struct's fields in declaration order, depth first (for the MLP:
//! `fc1.weight, fc1.bias, fc2.weight, fc2.bias, fc3.weight, fc3.bias`), each
//! tensor's values in row-major order. [`Layout`] records that order once, with
//! every parameter's id, shape and offset, and every flatten or load uses it.
//!
//! **Hash.** [`param_hash`] is blake3 over, for each parameter in order, its
//! rank, its dimensions and its values as little-endian f32 bits: equal
//! parameters give equal hashes on every machine.

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::prelude::*;
use burn::tensor::Gradients;
use p2p_proto::Hash;
use std::collections::HashMap;

/// One parameter's place in the flat vector.
#[derive(Debug, Clone)]
pub struct Entry {
    pub id: ParamId,
    /// Dotted module path, such as `fc1.weight`.
    pub name: String,
    pub shape: Vec<usize>,
    pub offset: usize,
    pub len: usize,
}

/// Where each parameter lives in the flat vector.
#[derive(Debug, Clone, Default)]
pub struct Layout {
    pub entries: Vec<Entry>,
    pub total: usize,
    index: HashMap<ParamId, usize>,
}

impl Layout {
    /// The layout of `model`'s float parameters, in visit order.
    pub fn of<M: Module>(model: &M) -> Self {
        struct V<'a> {
            layout: &'a mut Layout,
            path: Vec<String>,
        }
        impl ModuleVisitor for V<'_> {
            fn enter_module(&mut self, name: &str, _: &str) {
                self.path.push(name.to_owned());
            }
            fn exit_module(&mut self, _: &str, _: &str) {
                self.path.pop();
            }
            fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<D>>) {
                let shape = p.val().dims().to_vec();
                let len = shape.iter().product();
                let l = &mut *self.layout;
                l.index.insert(p.id, l.entries.len());
                let name = self.path.join(".");
                l.entries.push(Entry { id: p.id, name, shape, offset: l.total, len });
                l.total += len;
            }
        }
        let mut layout = Layout::default();
        model.visit(&mut V { layout: &mut layout, path: Vec::new() });
        layout
    }

    fn entry(&self, id: &ParamId) -> &Entry {
        &self.entries[self.index[id]]
    }
}

/// Reads the parameters of `model` into one vector.
pub fn flatten<M: Module>(model: &M, layout: &Layout) -> Vec<f32> {
    struct V<'a> {
        layout: &'a Layout,
        out: &'a mut [f32],
    }
    impl ModuleVisitor for V<'_> {
        fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<D>>) {
            let e = self.layout.entry(&p.id);
            let values = p.val().into_data().try_into_vec::<f32>().expect("float parameters are f32");
            self.out[e.offset..e.offset + e.len].copy_from_slice(&values);
        }
    }
    let mut out = vec![0.0; layout.total];
    model.visit(&mut V { layout, out: &mut out });
    out
}

/// Reads the gradient of every parameter into one vector (zero where a
/// parameter got no gradient).
pub fn flatten_grads<M: Module>(model: &M, grads: &Gradients, layout: &Layout) -> Vec<f32> {
    struct V<'a> {
        layout: &'a Layout,
        grads: &'a Gradients,
        out: &'a mut [f32],
    }
    impl ModuleVisitor for V<'_> {
        fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<D>>) {
            let e = self.layout.entry(&p.id);
            if let Some(g) = p.val().grad(self.grads) {
                let values = g.into_data().try_into_vec::<f32>().expect("float gradients are f32");
                self.out[e.offset..e.offset + e.len].copy_from_slice(&values);
            }
        }
    }
    let mut out = vec![0.0; layout.total];
    model.visit(&mut V { layout, grads, out: &mut out });
    out
}

/// Writes `flat` into `model`'s parameters (ids kept), as tensors that track
/// gradients on an autodiff device.
pub fn load<M: Module>(model: M, flat: &[f32], layout: &Layout, device: &Device) -> M {
    assert_eq!(flat.len(), layout.total, "a flat vector of the model's size");
    struct Map<'a> {
        layout: &'a Layout,
        flat: &'a [f32],
        device: &'a Device,
    }
    impl ModuleMapper for Map<'_> {
        fn map_float<const D: usize>(&mut self, p: Param<Tensor<D>>) -> Param<Tensor<D>> {
            let e = self.layout.entry(&p.id);
            let data = TensorData::new(self.flat[e.offset..e.offset + e.len].to_vec(), e.shape.clone());
            let device = self.device.clone();
            p.map(move |_| {
                let t = Tensor::<D>::from_data(data, &device);
                if device.is_autodiff() { t.require_grad() } else { t }
            })
        }
    }
    model.map(&mut Map { layout, flat, device })
}

/// blake3 over the parameters in canonical order (see the module docs).
pub fn param_hash(flat: &[f32], layout: &Layout) -> Hash {
    let mut h = blake3::Hasher::new();
    h.update(b"dtrain/params/v1");
    let mut buf = Vec::new();
    for e in &layout.entries {
        h.update(&(e.shape.len() as u32).to_le_bytes());
        for d in &e.shape {
            h.update(&(*d as u64).to_le_bytes());
        }
        buf.clear();
        buf.extend(flat[e.offset..e.offset + e.len].iter().flat_map(|v| v.to_le_bytes()));
        h.update(&buf);
    }
    *h.finalize().as_bytes()
}

/// Initial parameters that every peer of a run computes identically, whatever
/// its backend's random generator: uniform in `±1/sqrt(fan_in)` (burn's
/// default for linear and convolution layers), drawn from
/// `blake3(seed ‖ parameter index)`. A weight's fan-in is the product of its
/// dimensions but the output one (burn stores linear weights as `[in, out]`
/// and convolution weights as `[out, in, kh, kw]`); a bias uses its layer's.
pub fn deterministic_init(layout: &Layout, seed: u64) -> Vec<f32> {
    let mut out = vec![0.0f32; layout.total];
    let mut fan_in = 1usize;
    for (i, e) in layout.entries.iter().enumerate() {
        fan_in = match e.shape.len() {
            1 => fan_in,
            2 => e.shape[0],
            _ => e.shape[1..].iter().product(),
        };
        let bound = 1.0 / (fan_in.max(1) as f64).sqrt();
        let mut h = blake3::Hasher::new();
        h.update(b"dtrain/init/v1");
        h.update(&seed.to_le_bytes());
        h.update(&(i as u64).to_le_bytes());
        let mut xof = h.finalize_xof();
        let mut b = [0u8; 4];
        for v in &mut out[e.offset..e.offset + e.len] {
            xof.fill(&mut b);
            let u = f64::from(u32::from_le_bytes(b)) / f64::from(u32::MAX); // [0, 1]
            *v = ((2.0 * u - 1.0) * bound) as f32;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::model::MlpConfig;

    #[test]
    fn flatten_load_round_trip_and_the_hash_sees_every_parameter() {
        let device = Device::flex();
        let model = MlpConfig::new(12, 3).with_hidden1(5).with_hidden2(4).init(&device);
        let layout = Layout::of(&model);
        assert_eq!(layout.total, 12 * 5 + 5 + 5 * 4 + 4 + 4 * 3 + 3);
        let names: Vec<&str> = layout.entries.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(names, ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias", "fc3.weight", "fc3.bias"]);
        let init = deterministic_init(&layout, 7);
        assert_eq!(init, deterministic_init(&layout, 7));
        assert_ne!(init, deterministic_init(&layout, 8));
        let model = load(model, &init, &layout, &device);
        assert_eq!(flatten(&model, &layout), init);
        // Any single parameter, changed by one ulp, changes the hash.
        let h = param_hash(&init, &layout);
        for i in 0..init.len() {
            let mut p = init.clone();
            p[i] = f32::from_bits(p[i].to_bits() ^ 1);
            assert_ne!(param_hash(&p, &layout), h, "parameter {i}");
        }
    }
}
