//! A model trained by someone else: the USPS digit classifier shipped in the `ccexam` package
//! on PyPI (MIT licence; `examples/data/pretrained/`), a PyTorch CNN with BatchNorm:
//!
//! `Conv2d(1, 32, 3, pad 1) -> BatchNorm -> ReLU -> MaxPool 2 -> Conv2d(32, 64, 3, pad 1)
//! -> BatchNorm -> ReLU -> MaxPool 2 -> Linear(1024, 128) -> ReLU -> Linear(128, 10)`
//!
//! on 16x16 grayscale digits normalised with mean 0.2471 and standard deviation 0.2994.
//! [`UspsNet`] is the float model in burn-nn layers, filled from the `.pth` file by
//! [`adaround::import::WeightImport`]; [`QuantUsps`] folds its BatchNorms and quantizes it.
//! The evaluation data here are the UCI digits (8x8, real handwriting from other writers),
//! upsampled to 16x16: the model was not trained on them, so its float accuracy is that of
//! a transfer, and the quantized models are compared with it.

use adaround::{
    import::{ImportError, ImportReport, Layout, WeightImport},
    layers::{FoldBatchNorm, QuantizedConv2d, QuantizedDense},
    store::PytorchStore,
    WeightQuantizer,
};
use burn::{
    module::Module,
    nn::{
        conv::{Conv2d, Conv2dConfig},
        BatchNorm, BatchNormConfig, Linear, LinearConfig, PaddingConfig2d,
    },
    tensor::{activation::relu, backend::Backend, module::max_pool2d, Tensor},
};

use crate::digits::Digits;

/// The committed weights file (`examples/data/pretrained/fetch.sh` fetches it again).
pub const WEIGHTS: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/examples/data/pretrained/usps.pth"
);

/// The float model, as trained (burn-nn layers).
#[derive(Module, Debug)]
pub struct UspsNet<B: Backend> {
    /// `features.0`.
    pub conv1: Conv2d<B>,
    /// `features.1`.
    pub bn1: BatchNorm<B>,
    /// `features.4`.
    pub conv2: Conv2d<B>,
    /// `features.5`.
    pub bn2: BatchNorm<B>,
    /// `classifier.1`.
    pub fc1: Linear<B>,
    /// `classifier.4`.
    pub fc2: Linear<B>,
}

fn pool<B: Backend>(x: Tensor<B, 4>) -> Tensor<B, 4> {
    max_pool2d(x, [2, 2], [2, 2], [0, 0], [1, 1], false)
}

impl<B: Backend> UspsNet<B> {
    /// The architecture, with initial weights (to be loaded).
    pub fn new(device: &B::Device) -> Self {
        let conv = |c: [usize; 2]| {
            Conv2dConfig::new(c, [3, 3])
                .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
                .init(device)
        };
        Self {
            conv1: conv([1, 32]),
            bn1: BatchNormConfig::new(32).init(device),
            conv2: conv([32, 64]),
            bn2: BatchNormConfig::new(64).init(device),
            fc1: LinearConfig::new(64 * 4 * 4, 128).init(device),
            fc2: LinearConfig::new(128, 10).init(device),
        }
    }

    /// Reads the PyTorch `state_dict` at `path` (PyTorch layouts, BatchNorm names mapped).
    #[allow(clippy::result_large_err)] // the library's own error type, returned as it is
    pub fn load(path: &str, device: &B::Device) -> Result<(Self, ImportReport), ImportError> {
        let mut store = PytorchStore::from_file(path)
            .with_key_remapping(r"^features\.0\.", "conv1.")
            .with_key_remapping(r"^features\.1\.", "bn1.")
            .with_key_remapping(r"^features\.4\.", "conv2.")
            .with_key_remapping(r"^features\.5\.", "bn2.")
            .with_key_remapping(r"^classifier\.1\.", "fc1.")
            .with_key_remapping(r"^classifier\.4\.", "fc2.");
        // `num_batches_tracked` of the BatchNorms has no counterpart in Burn.
        WeightImport::new(Layout::PyTorch)
            .allow_unused(true)
            .load(&Self::new(device), &mut store)
    }

    /// Logits `[n, 10]` of `[n, 1, 16, 16]` images.
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 2> {
        let x = pool(relu(self.bn1.forward(self.conv1.forward(x))));
        let x = pool(relu(self.bn2.forward(self.conv2.forward(x))));
        let x = relu(self.fc1.forward(x.flatten(1, 3)));
        self.fc2.forward(x)
    }
}

/// The model with BatchNorms folded and weight quantizers.
#[derive(Module, Debug)]
pub struct QuantUsps<B: Backend> {
    /// Conv 1 with BatchNorm 1 folded.
    pub conv1: QuantizedConv2d<B>,
    /// Conv 2 with BatchNorm 2 folded.
    pub conv2: QuantizedConv2d<B>,
    /// Hidden dense layer.
    pub fc1: QuantizedDense<B>,
    /// Output layer.
    pub fc2: QuantizedDense<B>,
}

impl<B: Backend> QuantUsps<B> {
    /// Folds the BatchNorms (exactly), then wraps every layer with `quantizer`: the order of
    /// the reference (fold, quantize, AdaRound).
    pub fn from_float(float: &UspsNet<B>, quantizer: &WeightQuantizer) -> Self {
        let fold = |conv: &Conv2d<B>, bn: &BatchNorm<B>| {
            let folded = conv.clone().fold_batch_norm(bn).expect("channels match");
            QuantizedConv2d::from_conv2d(folded, quantizer.clone())
        };
        Self {
            conv1: fold(&float.conv1, &float.bn1),
            conv2: fold(&float.conv2, &float.bn2),
            fc1: QuantizedDense::from_linear(float.fc1.clone(), quantizer.clone()),
            fc2: QuantizedDense::from_linear(float.fc2.clone(), quantizer.clone()),
        }
    }

    /// Logits `[n, 10]` of `[n, 1, 16, 16]` images.
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 2> {
        let x = pool(relu(self.conv1.forward(x)));
        let x = pool(relu(self.conv2.forward(x)));
        let x = relu(self.fc1.forward(x.flatten(1, 3)));
        self.fc2.forward(x)
    }
}

/// UCI digit images `range` as the model's input: 8x8 upsampled to 16x16 (each pixel
/// repeated 2x2), normalised as in training.
pub fn images<B: Backend>(
    digits: &Digits,
    range: std::ops::Range<usize>,
    device: &B::Device,
) -> Tensor<B, 4> {
    let x = digits.images::<B>(range, device);
    let n = x.dims()[0];
    let x = x
        .reshape([n, 1, 8, 1, 8, 1])
        .expand([n, 1, 8, 2, 8, 2])
        .reshape([n, 1, 16, 16]);
    x.sub_scalar(0.2471).div_scalar(0.2994)
}
