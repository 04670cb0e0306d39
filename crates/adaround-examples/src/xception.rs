//! A mini-XCEPTION-size model (Arriaga et al. 2017, the FER-2013 network): a stem of two
//! Conv2D + BatchNorm + ReLU, four residual modules of two SeparableConv2D + BatchNorm with
//! a strided 1x1 Conv2D + BatchNorm shortcut, a 3x3 Conv2D classifier and global average
//! pooling; 64x64x1 input, 7 classes. 8 separable and 7 Conv2D layers.
//!
//! [`MiniXception`] is the float model as a Burn user has it (burn-nn layers, BatchNorm
//! after every convolution); [`QuantXception::from_float`] folds each BatchNorm into its
//! convolution and wraps the folded layers with weight quantizers, the order the reference
//! uses (fold, then quantize, then AdaRound).

use adaround::{
    layers::{FoldBatchNorm, QuantizedConv2d, QuantizedSeparableConv2d},
    WeightQuantizer,
};
use burn::{
    module::{Module, Param},
    nn::{
        conv::{Conv2d, Conv2dConfig},
        BatchNorm, BatchNormConfig, PaddingConfig2d,
    },
    tensor::{activation::relu, backend::Backend, module::max_pool2d, Distribution, Tensor},
};

/// Channels of the four residual modules.
pub const MODULE_CHANNELS: [usize; 4] = [16, 32, 64, 128];
/// Classes of the classifier.
pub const CLASSES: usize = 7;

/// A Conv2D followed by a BatchNorm.
#[derive(Module, Debug)]
pub struct ConvBn<B: Backend> {
    /// The convolution (no bias, as in the original).
    pub conv: Conv2d<B>,
    /// Its BatchNorm.
    pub bn: BatchNorm<B>,
}

/// A SeparableConv2D (depthwise + pointwise burn-nn convolutions) followed by a BatchNorm.
#[derive(Module, Debug)]
pub struct SepBn<B: Backend> {
    /// The depthwise 3x3 convolution.
    pub depthwise: Conv2d<B>,
    /// The pointwise 1x1 convolution.
    pub pointwise: Conv2d<B>,
    /// The BatchNorm after the pointwise convolution.
    pub bn: BatchNorm<B>,
}

/// One residual module.
#[derive(Module, Debug)]
pub struct Block<B: Backend> {
    /// Strided 1x1 shortcut.
    pub shortcut: ConvBn<B>,
    /// First separable conv (followed by ReLU).
    pub sep1: SepBn<B>,
    /// Second separable conv.
    pub sep2: SepBn<B>,
}

/// The float mini-XCEPTION.
#[derive(Module, Debug)]
pub struct MiniXception<B: Backend> {
    /// The two stem convolutions.
    pub stem: Vec<ConvBn<B>>,
    /// The four residual modules.
    pub blocks: Vec<Block<B>>,
    /// The 3x3 classifier convolution (with bias, no BatchNorm).
    pub head: Conv2d<B>,
}

/// A BatchNorm with random (trained-looking) statistics and affine parameters.
fn random_bn<B: Backend>(c: usize, device: &B::Device) -> BatchNorm<B> {
    let mut bn = BatchNormConfig::new(c).init(device);
    let r = |d| Tensor::<B, 1>::random([c], d, device);
    bn.gamma = Param::from_tensor(r(Distribution::Uniform(0.5, 1.5)));
    bn.beta = Param::from_tensor(r(Distribution::Normal(0.0, 0.2)));
    bn.running_mean = burn::module::RunningState::new(r(Distribution::Normal(0.0, 0.2)));
    bn.running_var = burn::module::RunningState::new(r(Distribution::Uniform(0.5, 2.0)));
    bn
}

fn conv_bn<B: Backend>(
    [c_in, c_out]: [usize; 2],
    kernel: usize,
    stride: usize,
    padding: PaddingConfig2d,
    device: &B::Device,
) -> ConvBn<B> {
    ConvBn {
        conv: Conv2dConfig::new([c_in, c_out], [kernel, kernel])
            .with_stride([stride, stride])
            .with_padding(padding)
            .with_bias(false)
            .init(device),
        bn: random_bn(c_out, device),
    }
}

fn sep_bn<B: Backend>([c_in, c_out]: [usize; 2], device: &B::Device) -> SepBn<B> {
    SepBn {
        depthwise: Conv2dConfig::new([c_in, c_in], [3, 3])
            .with_groups(c_in)
            .with_padding(PaddingConfig2d::Same)
            .with_bias(false)
            .init(device),
        pointwise: Conv2dConfig::new([c_in, c_out], [1, 1])
            .with_bias(false)
            .init(device),
        bn: random_bn(c_out, device),
    }
}

/// 3x3 max pooling, stride 2, Keras `same` padding on even sizes.
fn pool<B: Backend>(x: Tensor<B, 4>) -> Tensor<B, 4> {
    max_pool2d(x, [3, 3], [2, 2], [1, 1], [1, 1], false)
}

impl<B: Backend> MiniXception<B> {
    /// A model with random weights and BatchNorm statistics.
    pub fn new(device: &B::Device) -> Self {
        let stem = vec![
            conv_bn([1, 8], 3, 1, PaddingConfig2d::Valid, device),
            conv_bn([8, 8], 3, 1, PaddingConfig2d::Valid, device),
        ];
        let mut c_in = 8;
        let blocks = MODULE_CHANNELS
            .iter()
            .map(|&c| {
                let block = Block {
                    shortcut: conv_bn([c_in, c], 1, 2, PaddingConfig2d::Valid, device),
                    sep1: sep_bn([c_in, c], device),
                    sep2: sep_bn([c, c], device),
                };
                c_in = c;
                block
            })
            .collect();
        let head = Conv2dConfig::new([c_in, CLASSES], [3, 3])
            .with_padding(PaddingConfig2d::Same)
            .init(device);
        let model = Self { stem, blocks, head };
        // Burn initializes parameters lazily, and a clone taken before would initialize
        // again, differently: fix the values now.
        let _ = model.devices();
        model
    }

    /// Logits `[batch, 7]` of `[batch, 1, 64, 64]` images.
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 2> {
        let mut x = x;
        for l in &self.stem {
            x = relu(l.bn.forward(l.conv.forward(x)));
        }
        for b in &self.blocks {
            let shortcut = b.shortcut.bn.forward(b.shortcut.conv.forward(x.clone()));
            let y = b
                .sep1
                .bn
                .forward(b.sep1.pointwise.forward(b.sep1.depthwise.forward(x)));
            let y = relu(y);
            let y = b
                .sep2
                .bn
                .forward(b.sep2.pointwise.forward(b.sep2.depthwise.forward(y)));
            x = pool(y) + shortcut;
        }
        self.head.forward(x).mean_dim(3).mean_dim(2).flatten(1, 3)
    }
}

/// One residual module, BatchNorm folded.
#[derive(Module, Debug)]
pub struct QuantBlock<B: Backend> {
    /// Strided 1x1 shortcut.
    pub shortcut: QuantizedConv2d<B>,
    /// First separable conv.
    pub sep1: QuantizedSeparableConv2d<B>,
    /// Second separable conv.
    pub sep2: QuantizedSeparableConv2d<B>,
}

/// The mini-XCEPTION with BatchNorms folded and quantized weights.
#[derive(Module, Debug)]
pub struct QuantXception<B: Backend> {
    /// The stem convolutions.
    pub stem: Vec<QuantizedConv2d<B>>,
    /// The residual modules.
    pub blocks: Vec<QuantBlock<B>>,
    /// The classifier convolution.
    pub head: QuantizedConv2d<B>,
}

impl<B: Backend> QuantXception<B> {
    /// Folds every BatchNorm of `float` and quantizes every kernel with `quantizer` (the
    /// depthwise kernels too, per channel).
    pub fn from_float(float: &MiniXception<B>, quantizer: &WeightQuantizer) -> Self {
        let conv = |l: &ConvBn<B>| {
            let folded = l
                .conv
                .clone()
                .fold_batch_norm(&l.bn)
                .expect("channels match");
            QuantizedConv2d::from_conv2d(folded, quantizer.clone())
        };
        let sep = |l: &SepBn<B>| {
            let pointwise = l
                .pointwise
                .clone()
                .fold_batch_norm(&l.bn)
                .expect("channels match");
            QuantizedSeparableConv2d::from_conv2d_pair(
                l.depthwise.clone(),
                pointwise,
                quantizer.clone(),
                quantizer.clone(),
            )
        };
        Self {
            stem: float.stem.iter().map(conv).collect(),
            blocks: float
                .blocks
                .iter()
                .map(|b| QuantBlock {
                    shortcut: conv(&b.shortcut),
                    sep1: sep(&b.sep1),
                    sep2: sep(&b.sep2),
                })
                .collect(),
            head: QuantizedConv2d::from_conv2d(float.head.clone(), quantizer.clone()),
        }
    }

    /// Logits `[batch, 7]` of `[batch, 1, 64, 64]` images.
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 2> {
        let mut x = x;
        for l in &self.stem {
            x = relu(l.forward(x));
        }
        for b in &self.blocks {
            let shortcut = b.shortcut.forward(x.clone());
            let y = relu(b.sep1.forward(x));
            x = pool(b.sep2.forward(y)) + shortcut;
        }
        self.head.forward(x).mean_dim(3).mean_dim(2).flatten(1, 3)
    }
}
