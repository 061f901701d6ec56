//! The models, built from a burn `Config` whose JSON is hashed into the run id.
//!
//! None of them has state outside its parameters (no batch norm running
//! statistics): every peer's model is fully described by the parameters the
//! ring keeps identical.

use burn::module::Module;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::pool::{AdaptiveAvgPool2d, AdaptiveAvgPool2dConfig, MaxPool2d, MaxPool2dConfig};
use burn::nn::{Linear, LinearConfig, PaddingConfig2d, Relu};
use burn::prelude::*;
use serde::{Deserialize, Serialize};

/// A model that maps a batch of images `[B, C, H, W]` to class logits `[B, K]`.
pub trait Net: Module + Sized {
    fn forward(&self, images: Tensor<4>) -> Tensor<2>;
}

/// Which model, with its sizes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum ModelConfig {
    Mlp(MlpConfig),
    Cnn(CnnConfig),
    Resnet(ResNetConfig),
}

impl ModelConfig {
    /// The default config of `name` (mlp, cnn, resnet) for images of `shape`.
    pub fn named(name: &str, shape: [usize; 3], classes: usize) -> Option<Self> {
        Some(match name {
            "mlp" => Self::Mlp(MlpConfig::new(shape.iter().product(), classes)),
            "cnn" => Self::Cnn(CnnConfig::new(shape[0], shape[1], shape[2], classes)),
            "resnet" => Self::Resnet(ResNetConfig::new(shape[0], classes)),
            _ => return None,
        })
    }

    /// blake3 of the config's canonical JSON; part of the run id.
    pub fn hash(&self) -> p2p_proto::Hash {
        let json = serde_json::to_vec(self).expect("configs serialize");
        *blake3::keyed_hash(blake3::hash(b"dtrain/model-config/v1").as_bytes(), &json).as_bytes()
    }
}

/// A multi-layer perceptron on flattened images.
#[derive(Config, Debug, PartialEq)]
pub struct MlpConfig {
    pub inputs: usize,
    pub classes: usize,
    #[config(default = 256)]
    pub hidden1: usize,
    #[config(default = 128)]
    pub hidden2: usize,
}

#[derive(Module, Debug)]
pub struct Mlp {
    fc1: Linear,
    fc2: Linear,
    fc3: Linear,
    act: Relu,
}

impl MlpConfig {
    pub fn init(&self, device: &Device) -> Mlp {
        Mlp {
            fc1: LinearConfig::new(self.inputs, self.hidden1).init(device),
            fc2: LinearConfig::new(self.hidden1, self.hidden2).init(device),
            fc3: LinearConfig::new(self.hidden2, self.classes).init(device),
            act: Relu::new(),
        }
    }
}

impl Net for Mlp {
    fn forward(&self, images: Tensor<4>) -> Tensor<2> {
        let x = images.flatten(1, 3);
        let x = self.act.forward(self.fc1.forward(x));
        let x = self.act.forward(self.fc2.forward(x));
        self.fc3.forward(x)
    }
}

/// Two convolution blocks and a classifier, for 28x28 inputs.
#[derive(Config, Debug, PartialEq)]
pub struct CnnConfig {
    pub channels: usize,
    pub height: usize,
    pub width: usize,
    pub classes: usize,
    #[config(default = 32)]
    pub conv1: usize,
    #[config(default = 64)]
    pub conv2: usize,
    #[config(default = 128)]
    pub hidden: usize,
}

#[derive(Module, Debug)]
pub struct Cnn {
    conv1: Conv2d,
    conv2: Conv2d,
    fc1: Linear,
    fc2: Linear,
    pool: MaxPool2d,
    act: Relu,
}

impl CnnConfig {
    pub fn init(&self, device: &Device) -> Cnn {
        let conv = |i, o| Conv2dConfig::new([i, o], [3, 3]).with_padding(PaddingConfig2d::Same).init(device);
        let flat = self.conv2 * (self.height / 4) * (self.width / 4);
        Cnn {
            conv1: conv(self.channels, self.conv1),
            conv2: conv(self.conv1, self.conv2),
            fc1: LinearConfig::new(flat, self.hidden).init(device),
            fc2: LinearConfig::new(self.hidden, self.classes).init(device),
            pool: MaxPool2dConfig::new([2, 2]).with_strides([2, 2]).init(),
            act: Relu::new(),
        }
    }
}

impl Net for Cnn {
    fn forward(&self, images: Tensor<4>) -> Tensor<2> {
        let x = self.pool.forward(self.act.forward(self.conv1.forward(images)));
        let x = self.pool.forward(self.act.forward(self.conv2.forward(x)));
        let x = self.act.forward(self.fc1.forward(x.flatten(1, 3)));
        self.fc2.forward(x)
    }
}

/// A small residual network for 32x32 colour images (CIFAR-10): a stem, three
/// stages of one residual block each (the last two halve the resolution), global
/// average pooling and a linear classifier.
#[derive(Config, Debug, PartialEq)]
pub struct ResNetConfig {
    pub channels: usize,
    pub classes: usize,
    #[config(default = 16)]
    pub width: usize,
}

#[derive(Module, Debug)]
pub struct Block {
    conv1: Conv2d,
    conv2: Conv2d,
    /// 1x1 projection when the block changes width or resolution.
    skip: Option<Conv2d>,
    act: Relu,
}

impl Block {
    fn new(i: usize, o: usize, stride: usize, device: &Device) -> Self {
        let pad = PaddingConfig2d::Explicit(1, 1, 1, 1);
        Block {
            conv1: Conv2dConfig::new([i, o], [3, 3])
                .with_stride([stride, stride])
                .with_padding(pad.clone())
                .init(device),
            conv2: Conv2dConfig::new([o, o], [3, 3]).with_padding(pad).init(device),
            skip: (i != o || stride != 1)
                .then(|| Conv2dConfig::new([i, o], [1, 1]).with_stride([stride, stride]).init(device)),
            act: Relu::new(),
        }
    }

    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let y = self.conv2.forward(self.act.forward(self.conv1.forward(x.clone())));
        let skip = match &self.skip {
            Some(s) => s.forward(x),
            None => x,
        };
        self.act.forward(y + skip)
    }
}

#[derive(Module, Debug)]
pub struct ResNet {
    stem: Conv2d,
    blocks: Vec<Block>,
    pool: AdaptiveAvgPool2d,
    fc: Linear,
    act: Relu,
}

impl ResNetConfig {
    pub fn init(&self, device: &Device) -> ResNet {
        let w = self.width;
        ResNet {
            stem: Conv2dConfig::new([self.channels, w], [3, 3]).with_padding(PaddingConfig2d::Same).init(device),
            blocks: vec![
                Block::new(w, w, 1, device),
                Block::new(w, 2 * w, 2, device),
                Block::new(2 * w, 4 * w, 2, device),
            ],
            pool: AdaptiveAvgPool2dConfig::new([1, 1]).init(),
            fc: LinearConfig::new(4 * w, self.classes).init(device),
            act: Relu::new(),
        }
    }
}

impl Net for ResNet {
    fn forward(&self, images: Tensor<4>) -> Tensor<2> {
        let mut x = self.act.forward(self.stem.forward(images));
        for b in &self.blocks {
            x = b.forward(x);
        }
        self.fc.forward(self.pool.forward(x).flatten(1, 3))
    }
}
