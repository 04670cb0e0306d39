//! The UCI optical digits set (embedded) and the quickstart's small CNN, float and quantized.

use std::io::Read;

use adaround::{
    layers::{
        QuantizedConv2d, QuantizedDense, QuantizedReLU, QuantizedReLUConfig,
        QuantizedSeparableConv2d,
    },
    Grid, WeightQuantizer,
};
use burn::{
    module::Module,
    nn::loss::CrossEntropyLossConfig,
    nn::{
        conv::{Conv2d, Conv2dConfig},
        Linear, LinearConfig, PaddingConfig2d, Relu,
    },
    optim::{AdamConfig, GradientsParams, Optimizer},
    tensor::{
        backend::{AutodiffBackend, Backend},
        ElementConversion, Int, Tensor, TensorData,
    },
};

const DIGITS_GZ: &[u8] = include_bytes!("../examples/data/digits.csv.gz");

/// Path of the committed float model of the quickstart.
pub const FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/data/digits_cnn.bin");

/// Images (`64` pixels in `0..=16`, row-major 8x8) and labels (`0..=9`).
#[derive(Clone, Debug, Default)]
pub struct Digits {
    /// Pixels, 64 per image.
    pub images: Vec<[f32; 64]>,
    /// Labels.
    pub labels: Vec<u8>,
}

impl Digits {
    /// The 1797 embedded images.
    pub fn load() -> Self {
        let mut text = String::new();
        flate2::read::GzDecoder::new(DIGITS_GZ)
            .read_to_string(&mut text)
            .expect("the embedded digits file is valid gzip");
        let mut digits = Self::default();
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            let values: Vec<f32> = line.split(',').map(|v| v.trim().parse().unwrap()).collect();
            assert_eq!(values.len(), 65, "64 pixels and a label per line");
            digits.images.push(values[..64].try_into().unwrap());
            digits.labels.push(values[64] as u8);
        }
        digits
    }

    /// Number of images.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// Whether there is no image.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// A deterministic shuffled split: `(train, test)` with `test_size` test images.
    pub fn split(&self, test_size: usize, seed: u64) -> (Self, Self) {
        let order = lcg_permutation(self.len(), lcg_step(seed));
        let pick = |idx: &[usize]| Self {
            images: idx.iter().map(|&i| self.images[i]).collect(),
            labels: idx.iter().map(|&i| self.labels[i]).collect(),
        };
        let (test, train) = order.split_at(test_size);
        (pick(train), pick(test))
    }

    /// Images `[n, 1, 8, 8]` scaled to `[0, 1]`, for images `range`.
    pub fn images<B: Backend>(
        &self,
        range: std::ops::Range<usize>,
        device: &B::Device,
    ) -> Tensor<B, 4> {
        let n = range.len();
        let flat: Vec<f32> = self.images[range]
            .iter()
            .flatten()
            .map(|p| p / 16.0)
            .collect();
        Tensor::from_data(TensorData::new(flat, [n, 1, 8, 8]), device)
    }

    /// Labels of images `range`.
    pub fn labels<B: Backend>(
        &self,
        range: std::ops::Range<usize>,
        device: &B::Device,
    ) -> Tensor<B, 1, Int> {
        let labels: Vec<i64> = self.labels[range].iter().map(|&l| l as i64).collect();
        Tensor::from_data(TensorData::from(labels.as_slice()), device)
    }
}

/// Channels of the CNN: conv `1 -> C1`, separable `C1 -> C2` (stride 2), dense `C2*4*4 -> 10`.
pub const C1: usize = 16;
/// See [`C1`].
pub const C2: usize = 32;

/// The float CNN: Conv2D 3x3 -> ReLU -> SeparableConv2D 3x3 / 2 (depthwise + pointwise)
/// -> ReLU -> Dense.
#[derive(Module, Debug)]
pub struct FloatCnn<B: Backend> {
    /// Conv2D `1 -> C1`, 3x3, same.
    pub conv: Conv2d<B>,
    /// Depthwise 3x3, stride 2, same.
    pub depthwise: Conv2d<B>,
    /// Pointwise 1x1 `C1 -> C2`.
    pub pointwise: Conv2d<B>,
    /// Dense `C2 * 16 -> 10`.
    pub fc: Linear<B>,
    /// ReLU.
    pub relu: Relu,
}

impl<B: Backend> FloatCnn<B> {
    /// A new, randomly initialized model.
    pub fn new(device: &B::Device) -> Self {
        Self {
            conv: Conv2dConfig::new([1, C1], [3, 3])
                .with_padding(PaddingConfig2d::Same)
                .init(device),
            depthwise: Conv2dConfig::new([C1, C1], [3, 3])
                .with_groups(C1)
                .with_stride([2, 2])
                .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
                .with_bias(false)
                .init(device),
            pointwise: Conv2dConfig::new([C1, C2], [1, 1]).init(device),
            fc: LinearConfig::new(C2 * 16, 10).init(device),
            relu: Relu::new(),
        }
    }

    /// The two hidden activations, for calibrating the quantized ReLUs.
    pub fn activations(&self, x: Tensor<B, 4>) -> (Tensor<B, 4>, Tensor<B, 4>) {
        let a1 = self.relu.forward(self.conv.forward(x));
        let a2 = self
            .relu
            .forward(self.pointwise.forward(self.depthwise.forward(a1.clone())));
        (a1, a2)
    }

    /// Logits `[n, 10]` of images `[n, 1, 8, 8]`.
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 2> {
        let (_, a2) = self.activations(x);
        self.fc.forward(a2.flatten(1, 3))
    }
}

/// The same CNN made of quantized layers.
#[derive(Module, Debug)]
pub struct QuantCnn<B: Backend> {
    /// Quantized Conv2D.
    pub conv: QuantizedConv2d<B>,
    /// Quantized ReLU after the conv.
    pub act1: QuantizedReLU<B>,
    /// Quantized SeparableConv2D.
    pub sep: QuantizedSeparableConv2d<B>,
    /// Quantized ReLU after the separable conv.
    pub act2: QuantizedReLU<B>,
    /// Quantized Dense.
    pub fc: QuantizedDense<B>,
}

/// How to quantize the weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Granularity {
    /// One scale factor per output channel (the reference's defaults: the depthwise kernel per tensor).
    PerAxis,
    /// One scale factor per tensor, for every kernel.
    PerTensor,
}

/// How weights are mapped to integers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scheme {
    /// The reference's: `sf = kmax / max |w|`, the symmetric grid `[-kmax, kmax]`.
    Max,
    /// The error-minimising scale ([`WeightQuantizer::Mse`]) on `grid`.
    Mse(Grid),
}

impl Scheme {
    /// Every scheme, the reference's first.
    pub const ALL: [Scheme; 4] = [
        Scheme::Max,
        Scheme::Mse(Grid::Symmetric),
        Scheme::Mse(Grid::FullRange),
        Scheme::Mse(Grid::Asymmetric),
    ];

    /// A short name: `max`, `mse symmetric`, `mse full-range`, `mse asymmetric`.
    pub fn name(&self) -> &'static str {
        match self {
            Scheme::Max => "max",
            Scheme::Mse(Grid::Symmetric) => "mse symmetric",
            Scheme::Mse(Grid::FullRange) => "mse full-range",
            Scheme::Mse(Grid::Asymmetric) => "mse asymmetric",
        }
    }

    /// The quantizer for `bits` bits at `granularity`.
    pub fn quantizer(&self, bits: u32, granularity: Granularity) -> WeightQuantizer {
        let per_axis = granularity == Granularity::PerAxis;
        let q = match (self, per_axis) {
            (Scheme::Max, true) => WeightQuantizer::max_per_axis(bits),
            (Scheme::Max, false) => WeightQuantizer::max(bits),
            (Scheme::Mse(grid), _) => WeightQuantizer::mse(bits, per_axis, *grid),
        };
        q.expect("bitwidth in 2..=16")
    }
}

impl Granularity {
    /// `per-channel` or `per-tensor`.
    pub fn name(&self) -> &'static str {
        match self {
            Granularity::PerAxis => "per-channel",
            Granularity::PerTensor => "per-tensor",
        }
    }
}

impl<B: Backend> QuantCnn<B> {
    /// Converts the float model: weights at `bits` bits, activations at `act_bits` bits with
    /// their largest value calibrated on `calibration` images.
    pub fn from_float(
        float: &FloatCnn<B>,
        bits: u32,
        granularity: Granularity,
        act_bits: u32,
        calibration: Tensor<B, 4>,
    ) -> Self {
        let (a1, a2) = float.activations(calibration);
        let act = |a: Tensor<B, 4>| {
            let max: f32 = burn::tensor::ElementConversion::elem(a.max().into_scalar());
            QuantizedReLUConfig::new()
                .with_bitwidth(act_bits)
                .with_max_value(max as f64)
                .init()
        };
        let (main, dw) = quantizers(bits, granularity);
        Self {
            conv: QuantizedConv2d::from_conv2d(float.conv.clone(), main.clone()),
            act1: act(a1),
            sep: QuantizedSeparableConv2d::from_conv2d_pair(
                float.depthwise.clone(),
                float.pointwise.clone(),
                dw,
                main.clone(),
            ),
            act2: act(a2),
            fc: QuantizedDense::from_linear(float.fc.clone(), main),
        }
    }

    /// The same model with every weight quantizer set for `bits` bits.
    pub fn with_weight_bits(self, bits: u32, granularity: Granularity) -> Self {
        self.with_weights(bits, granularity, Scheme::Max)
    }

    /// The same model with every weight quantizer set for `bits` bits on `scheme`.
    pub fn with_weights(mut self, bits: u32, granularity: Granularity, scheme: Scheme) -> Self {
        let main = scheme.quantizer(bits, granularity);
        let dw = main.clone();
        self.conv.quantizer = main.clone().into();
        self.sep.quantizer_dw = dw.into();
        self.sep.quantizer = main.clone().into();
        self.fc.quantizer = main.into();
        self
    }

    /// Logits `[n, 10]`.
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 2> {
        let x = self.act1.forward(self.conv.forward(x));
        let x = self.act2.forward(self.sep.forward(x));
        self.fc.forward(x.flatten(1, 3))
    }
}

fn quantizers(bits: u32, granularity: Granularity) -> (WeightQuantizer, WeightQuantizer) {
    // The depthwise kernel gets the main quantizer, as `QuantizedSeparableConv2dConfig` does.
    let q = Scheme::Max.quantizer(bits, granularity);
    (q.clone(), q)
}

/// Top-1 accuracy (in %) of `logits` against `labels`.
pub fn accuracy<B: Backend>(logits: Tensor<B, 2>, labels: Tensor<B, 1, Int>) -> f64 {
    let n = labels.dims()[0];
    let predicted = logits.argmax(1).reshape([n]);
    let correct: i64 =
        burn::tensor::ElementConversion::elem(predicted.equal(labels).int().sum().into_scalar());
    100.0 * correct as f64 / n as f64
}

/// One step of the 64-bit LCG the examples shuffle with.
fn lcg_step(state: u64) -> u64 {
    state
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407)
}

/// `0..n` shuffled by Fisher-Yates with the 64-bit LCG started at `state`: the same order on
/// every machine.
pub fn lcg_permutation(n: usize, mut state: u64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        state = lcg_step(state);
        order.swap(i, (state >> 33) as usize % (i + 1));
    }
    order
}

/// The calibration samples in order `order`: as given for 0, else shuffled by
/// [`lcg_permutation`] (a fixed shuffle per order, the same on every machine). The examples'
/// `--order K` and `choose --orders K` measure how far the order of the samples alone (which
/// samples share a batch, which batch comes first) moves the results.
pub fn calibration_order<B: Backend, const D: usize>(
    samples: Tensor<B, D>,
    order: usize,
) -> Tensor<B, D> {
    if order == 0 {
        return samples;
    }
    let n = samples.dims()[0];
    let idx: Vec<i64> = lcg_permutation(n, 0x9E37_79B9_7F4A_7C15u64.wrapping_mul(order as u64 + 1))
        .into_iter()
        .map(|i| i as i64)
        .collect();
    let idx = Tensor::<B, 1, Int>::from_data(idx.as_slice(), &samples.device());
    samples.select(0, idx)
}

/// The `K` of an example's `--order K` argument (0, the given order, without one) and the
/// calibration samples in that order (said on the console when not the given one).
pub fn order_arg<B: Backend, const D: usize>(samples: Tensor<B, D>) -> (usize, Tensor<B, D>) {
    let order = std::env::args()
        .skip_while(|a| a != "--order")
        .nth(1)
        .map_or(0, |k| k.parse().expect("--order K: a non-negative integer"));
    if order > 0 {
        println!("calibration order {order}");
    }
    (order, calibration_order(samples, order))
}

/// The [`Refine`](adaround::Refine) an example's `--refine off|dense|all` names (`None` for
/// another word).
pub fn refine_named(name: &str) -> Option<adaround::Refine> {
    match name {
        "off" => Some(adaround::Refine::Off),
        "dense" => Some(adaround::Refine::Dense),
        "all" => Some(adaround::Refine::All),
        _ => None,
    }
}

/// The file an example writes its report to: `report.json` for the given order,
/// `report_order{K}.json` for order `K`.
pub fn report_name(order: usize) -> String {
    match order {
        0 => "report.json".into(),
        k => format!("report_order{k}.json"),
    }
}

/// The mean squared difference between `logits` and `reference` (the model output error
/// against the float model, finer than [`agreement`]).
pub fn output_error<B: Backend>(logits: Tensor<B, 2>, reference: Tensor<B, 2>) -> f64 {
    let mse = (logits - reference).powi_scalar(2).mean().into_scalar();
    burn::tensor::ElementConversion::elem(mse)
}

/// The share (%) of rows on which `logits` and `reference` pick the same class (top-1
/// agreement of a quantized model with the float model).
pub fn agreement<B: Backend>(logits: Tensor<B, 2>, reference: Tensor<B, 2>) -> f64 {
    let n = logits.dims()[0];
    let same: i64 = burn::tensor::ElementConversion::elem(
        logits
            .argmax(1)
            .equal(reference.argmax(1))
            .int()
            .sum()
            .into_scalar(),
    );
    100.0 * same as f64 / n as f64
}

/// The class each row of `logits` picks (top-1), as the reports write it: with the test
/// labels, side-by-side scripts compare two models image by image.
pub fn predictions<B: Backend>(logits: Tensor<B, 2>) -> Vec<i64> {
    let n = logits.dims()[0];
    let classes = logits.argmax(1).reshape([n]).into_data().convert::<i64>();
    classes.to_vec().expect("i64 classes")
}

/// A rounded model's logits on the test images, scored: accuracy against the labels,
/// agreement with and output error against the float model's logits, and the class per image.
pub struct Scores {
    /// Top-1 accuracy, %.
    pub accuracy: f64,
    /// Top-1 agreement with the float model, %.
    pub agreement: f64,
    /// Mean squared difference from the float model's logits.
    pub output_error: f64,
    /// The class each image gets.
    pub predictions: Vec<i64>,
}

impl Scores {
    /// Scores `logits` against `labels` and the float model's `reference` logits.
    pub fn new<B: Backend>(
        logits: Tensor<B, 2>,
        labels: Tensor<B, 1, Int>,
        reference: Tensor<B, 2>,
    ) -> Self {
        Self {
            accuracy: accuracy(logits.clone(), labels),
            agreement: agreement(logits.clone(), reference.clone()),
            output_error: output_error(logits.clone(), reference),
            predictions: predictions(logits),
        }
    }
}

/// One setting's entry in an example report's `results`, under the names the side-by-side
/// scripts read: its bits, granularity, scale and grid, nearest rounding's and AdaRound's
/// scores (AdaRound's classes per image too) and AdaRound's seconds.
pub fn result_json(
    bits: u32,
    granularity: Granularity,
    scheme: Scheme,
    nearest: &Scores,
    adaround: &Scores,
    seconds: f64,
) -> serde_json::Value {
    let (scale, grid) = match scheme {
        Scheme::Max => ("max", Grid::Symmetric),
        Scheme::Mse(grid) => ("mse", grid),
    };
    serde_json::json!({
        "bits": bits, "granularity": granularity.name(), "scale": scale, "grid": grid,
        "nearest_accuracy": nearest.accuracy, "adaround_accuracy": adaround.accuracy,
        "nearest_agreement": nearest.agreement, "adaround_agreement": adaround.agreement,
        "nearest_output_error": nearest.output_error,
        "adaround_output_error": adaround.output_error, "seconds": seconds,
        "adaround_predictions": adaround.predictions,
    })
}

/// The AdaRound configuration of the quickstart and the examples built on it:
/// [`AdaRoundConfig::recommended`](adaround::AdaRoundConfig::recommended) (4 000 iterations,
/// mean squared error against the float model's activations, chosen on held-out validation
/// images by the `choose` example).
pub fn quickstart_config() -> adaround::AdaRoundConfig {
    adaround::AdaRoundConfig::recommended()
}

/// The benchmark's fixed per-model configuration, kept the same across versions so that its
/// timings compare: 1 000 iterations per layer (warm start and cosine decay), batches of 32,
/// channel-summed loss against the float layer on the quantized inputs, learning rate 1e-2,
/// rounding-loss weight 0.01 (the recommended preset before the held-out sweep of the
/// `choose` example), and the model-level guard.
pub fn short_config() -> adaround::AdaRoundConfig {
    adaround::AdaRoundConfig::new(adaround::Schedule::warm_cosine(1000))
        .with_batch_size(Some(32))
        .with_loss(adaround::ReconstructionLoss::ChannelSum)
        .with_learning_rate(1e-2)
        .with_model_guard(adaround::ModelGuard::KeepBetter)
}

/// The quickstart's float CNN trained on `train` (30 epochs of Adam, batches of 64, seed 42;
/// about 5 s on two cores). Multi-threaded training is not bit-reproducible.
pub fn train_float<B: AutodiffBackend>(train: &Digits, device: &B::Device) -> FloatCnn<B> {
    B::seed(device, 42);
    let mut model = FloatCnn::<B>::new(device);
    let mut optim = AdamConfig::new().init();
    let loss_fn = CrossEntropyLossConfig::new().init(device);
    let batch = 64;
    for epoch in 1..=30 {
        let mut total = 0.0;
        for start in (0..train.len() - batch + 1).step_by(batch) {
            let x = train.images::<B>(start..start + batch, device);
            let y = train.labels::<B>(start..start + batch, device);
            let loss = loss_fn.forward(model.forward(x), y);
            total += loss.clone().into_scalar().elem::<f64>();
            let grads = GradientsParams::from_grads(loss.backward(), &model);
            model = optim.step(3e-3, model, grads);
        }
        if epoch % 10 == 0 {
            println!(
                "epoch {epoch:>2}: mean loss {:.4}",
                total / (train.len() / batch) as f64
            );
        }
    }
    model
}
