//! Fashion-MNIST: a separable CNN trained in float, then W4/W3/W2 weights with per-tensor and
//! per-axis quantizers, nearest vs AdaRound on the full 10 000-image test set.
//!
//! ```sh
//! sudo apt-get install dataset-fashion-mnist     # IDX files under /usr/share/datasets/fashion-mnist/
//! cargo run --release --example fashion_mnist [-- DIR]
//! cargo run --release --example fashion_mnist -- --float out/fashion_mnist/float.bin --validate
//! ```
//!
//! Sections: 1. load the data; 2. train the float CNN (Conv2D -> SeparableConv2D ->
//! SeparableConv2D -> Dense) on the first 20 000 training images for 2 epochs; 3. convert to
//! quantized layers (8-bit activations); 4. nearest and AdaRound at each bitwidth and
//! granularity; 5. the table, `out/fashion_mnist/report.json` and the charts.
//!
//! It also writes the float model (`out/fashion_mnist/float.bin`, which `--float` loads
//! instead of training again, and in PyTorch's layout `float.json`), and the report holds
//! the activation ranges and each setting's classes per test image, for the side-by-side with
//! AIMET (`benches/aimet_side_by_side.py --model fashion`). `--validate` scores variants of
//! the AdaRound configuration on 5 000 training images that neither training nor calibration
//! uses (`--only NAME,..` picks variants; block reconstruction, GPTQ and SeqMSE's scales among
//! them, and the one with the highest agreement is named), without looking at the test images. The test
//! run uses `AdaRoundConfig::recommended()`, whose [`Refine::Dense`] `--validate` chose here
//! too; `--refine off|all` runs it with another [`AdaRoundConfig::refine`]; `--blocks` with
//! block reconstruction (`AdaRound::with_blocks`: the body's three convolutions together,
//! then the classifier); `--seqmse` on SeqMSE's scales (`ScaleSearch::SeqMse`).

use std::{io::Read, path::PathBuf, time::Instant};

use adaround::{
    layers::probe::Flow,
    layers::{
        QuantizedConv2d, QuantizedDense, QuantizedReLU, QuantizedReLUConfig,
        QuantizedSeparableConv2d,
    },
    AdaRound, AdaRoundConfig, AdaRoundReport, Grid, Refine, RoundingMethod, ScaleSearch, Schedule,
    Stage, WeightQuantizer,
};
use adaround_examples::{
    digits::{
        accuracy, agreement, output_error, refine_named, result_json, Granularity, Scheme, Scores,
    },
    svg, tensor_json,
};
use burn::{
    module::{AutodiffModule, Module},
    nn::{
        conv::{Conv2d, Conv2dConfig},
        loss::CrossEntropyLossConfig,
        Linear, LinearConfig, PaddingConfig2d, Relu,
    },
    optim::{AdamConfig, GradientsParams, Optimizer},
    record::{BinFileRecorder, FullPrecisionSettings},
    tensor::{
        backend::{AutodiffBackend, Backend},
        ElementConversion, Int, Tensor, TensorData,
    },
};

type Autodiff = burn_autodiff::Autodiff<burn_ndarray::NdArray<f32>>;

const DEFAULT_DIR: &str = "/usr/share/datasets/fashion-mnist";
const TRAIN_IMAGES: usize = 20_000;
const EPOCHS: usize = 2;
const CALIBRATION: usize = 1024;

/// Images (`28 * 28` bytes each) and labels.
struct Split {
    images: Vec<u8>,
    labels: Vec<u8>,
}

impl Split {
    fn len(&self) -> usize {
        self.labels.len()
    }

    fn images<B: Backend>(
        &self,
        range: std::ops::Range<usize>,
        device: &B::Device,
    ) -> Tensor<B, 4> {
        let n = range.len();
        let pixels: Vec<f32> = self.images[range.start * 784..range.end * 784]
            .iter()
            .map(|&p| p as f32 / 255.0)
            .collect();
        Tensor::from_data(TensorData::new(pixels, [n, 1, 28, 28]), device)
    }

    fn labels<B: Backend>(
        &self,
        range: std::ops::Range<usize>,
        device: &B::Device,
    ) -> Tensor<B, 1, Int> {
        let labels: Vec<i64> = self.labels[range].iter().map(|&l| l as i64).collect();
        Tensor::from_data(TensorData::from(labels.as_slice()), device)
    }
}

fn read_idx(path: &std::path::Path, magic: u32) -> Result<(Vec<usize>, Vec<u8>), String> {
    let file = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut bytes = Vec::new();
    flate2::read::GzDecoder::new(file)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let word = |i: usize| u32::from_be_bytes(bytes[4 * i..4 * i + 4].try_into().unwrap());
    if bytes.len() < 8 || word(0) != magic {
        return Err(format!(
            "{}: not an IDX file with magic {magic}",
            path.display()
        ));
    }
    let rank = (magic & 0xff) as usize;
    let dims: Vec<usize> = (1..=rank).map(|i| word(i) as usize).collect();
    let data = bytes[4 * (rank + 1)..].to_vec();
    if data.len() != dims.iter().product::<usize>() {
        return Err(format!(
            "{}: {} bytes for dims {dims:?}",
            path.display(),
            data.len()
        ));
    }
    Ok((dims, data))
}

fn load(dir: &std::path::Path, prefix: &str) -> Result<Split, String> {
    let (_, images) = read_idx(&dir.join(format!("{prefix}-images-idx3-ubyte.gz")), 2051)?;
    let (_, labels) = read_idx(&dir.join(format!("{prefix}-labels-idx1-ubyte.gz")), 2049)?;
    Ok(Split { images, labels })
}

/// The float CNN: Conv2D 1->16 3x3 -> ReLU -> SepConv 16->32 3x3/2 -> ReLU
/// -> SepConv 32->64 3x3/2 -> ReLU -> Dense 64*7*7 -> 10.
#[derive(Module, Debug)]
struct FloatNet<B: Backend> {
    conv: Conv2d<B>,
    dw1: Conv2d<B>,
    pw1: Conv2d<B>,
    dw2: Conv2d<B>,
    pw2: Conv2d<B>,
    fc: Linear<B>,
    relu: Relu,
}

fn depthwise<B: Backend>(c: usize, device: &B::Device) -> Conv2d<B> {
    Conv2dConfig::new([c, c], [3, 3])
        .with_groups(c)
        .with_stride([2, 2])
        .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
        .with_bias(false)
        .init(device)
}

impl<B: Backend> FloatNet<B> {
    fn new(device: &B::Device) -> Self {
        Self {
            conv: Conv2dConfig::new([1, 16], [3, 3])
                .with_padding(PaddingConfig2d::Same)
                .init(device),
            dw1: depthwise(16, device),
            pw1: Conv2dConfig::new([16, 32], [1, 1]).init(device),
            dw2: depthwise(32, device),
            pw2: Conv2dConfig::new([32, 64], [1, 1]).init(device),
            fc: LinearConfig::new(64 * 7 * 7, 10).init(device),
            relu: Relu::new(),
        }
    }

    fn activations(&self, x: Tensor<B, 4>) -> [Tensor<B, 4>; 3] {
        let a1 = self.relu.forward(self.conv.forward(x));
        let a2 = self
            .relu
            .forward(self.pw1.forward(self.dw1.forward(a1.clone())));
        let a3 = self
            .relu
            .forward(self.pw2.forward(self.dw2.forward(a2.clone())));
        [a1, a2, a3]
    }

    fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 2> {
        let [_, _, a3] = self.activations(x);
        self.fc.forward(a3.flatten(1, 3))
    }
}

/// The same CNN made of quantized layers.
#[derive(Module, Debug)]
struct QuantNet<B: Backend> {
    conv: QuantizedConv2d<B>,
    act1: QuantizedReLU<B>,
    sep1: QuantizedSeparableConv2d<B>,
    act2: QuantizedReLU<B>,
    sep2: QuantizedSeparableConv2d<B>,
    act3: QuantizedReLU<B>,
    fc: QuantizedDense<B>,
}

impl<B: Backend> QuantNet<B> {
    fn from_float(float: &FloatNet<B>, calibration: Tensor<B, 4>) -> Self {
        let [a1, a2, a3] = float.activations(calibration);
        let act = |a: Tensor<B, 4>| {
            let max: f32 = a.max().into_scalar().elem();
            QuantizedReLUConfig::new()
                .with_bitwidth(8)
                .with_max_value(max as f64)
                .init()
        };
        let q = WeightQuantizer::Float;
        Self {
            conv: QuantizedConv2d::from_conv2d(float.conv.clone(), q.clone()),
            act1: act(a1),
            sep1: QuantizedSeparableConv2d::from_conv2d_pair(
                float.dw1.clone(),
                float.pw1.clone(),
                q.clone(),
                q.clone(),
            ),
            act2: act(a2),
            sep2: QuantizedSeparableConv2d::from_conv2d_pair(
                float.dw2.clone(),
                float.pw2.clone(),
                q.clone(),
                q.clone(),
            ),
            act3: act(a3),
            fc: QuantizedDense::from_linear(float.fc.clone(), q),
        }
    }

    /// Every weight quantizer at `bits`: per-axis (depthwise per tensor, SPEC defaults) or
    /// per-tensor everywhere; the max scale on the symmetric grid, or with `mse` the
    /// error-minimising scale on that grid.
    fn with_weights(mut self, bits: u32, per_axis: bool, mse: Option<Grid>) -> Self {
        let quantizer = |per_axis: bool| {
            match (mse, per_axis) {
                (Some(grid), _) => WeightQuantizer::mse(bits, per_axis, grid),
                (None, true) => WeightQuantizer::max_per_axis(bits),
                (None, false) => WeightQuantizer::max(bits),
            }
            .unwrap()
        };
        let tensor = quantizer(false);
        let main = quantizer(per_axis);
        self.conv.quantizer = main.clone().into();
        for sep in [&mut self.sep1, &mut self.sep2] {
            sep.quantizer_dw = tensor.clone().into();
            sep.quantizer = main.clone().into();
        }
        self.fc.quantizer = main.into();
        self
    }

    fn body(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let x = self.act1.forward(self.conv.forward(x));
        let x = self.act2.forward(self.sep1.forward(x));
        self.act3.forward(self.sep2.forward(x))
    }

    fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 2> {
        self.fc.forward(self.body(x).flatten(1, 3))
    }

    /// The forward pass as two blocks for block reconstruction: the three convolutions with
    /// their activations, then the classifier.
    fn stages<'a>() -> Vec<Stage<'a, B, Self>> {
        let maps = |x: Flow<B>| match x {
            Flow::Maps(t) => t,
            Flow::Rows(_) => unreachable!("the stages pass maps"),
        };
        vec![
            Box::new(move |m: &Self, x: Flow<B>| Flow::Maps(m.body(maps(x)))),
            Box::new(move |m: &Self, x: Flow<B>| Flow::Rows(m.fc.forward(maps(x).flatten(1, 3)))),
        ]
    }
}

/// The command line: `[DIR] [--float PATH] [--refine off|dense|all] [--blocks] [--seqmse]
/// [--validate [--only NAME,..]]`.
struct Args {
    dir: PathBuf,
    /// A float model saved by an earlier run (`out/fashion_mnist/float.bin`), instead of
    /// training one.
    float: Option<String>,
    /// Score configuration variants on validation images instead of the test run.
    validate: bool,
    /// With `validate`, the variants to run (comma-separated names).
    only: Option<String>,
    /// The test run's [`AdaRoundConfig::refine`]: the preset's (`Dense`) unless given.
    refine: Refine,
    /// Block reconstruction (`--blocks`): the body and the classifier as two blocks,
    /// `BlockConfig`'s defaults.
    blocks: bool,
    /// SeqMSE's scales (`--seqmse`, [`ScaleSearch::SeqMse`]).
    seqmse: bool,
}

impl Args {
    fn parse() -> Self {
        let mut args = Args {
            dir: PathBuf::from(DEFAULT_DIR),
            float: None,
            validate: false,
            only: None,
            refine: AdaRoundConfig::recommended().refine,
            blocks: false,
            seqmse: false,
        };
        let mut it = std::env::args().skip(1);
        while let Some(a) = it.next() {
            match a.as_str() {
                "--float" => args.float = it.next(),
                "--validate" => args.validate = true,
                "--blocks" => args.blocks = true,
                "--seqmse" => args.seqmse = true,
                "--only" => args.only = it.next(),
                "--refine" => {
                    let name = it.next();
                    args.refine = match name.as_deref().and_then(refine_named) {
                        Some(refine) => refine,
                        None => {
                            eprintln!("--refine takes off, dense or all, got {name:?}");
                            std::process::exit(2);
                        }
                    }
                }
                _ if a.starts_with("--") => {
                    eprintln!(
                        "unknown option {a}: [DIR] [--float PATH] [--refine off|dense|all] [--blocks] [--seqmse] [--validate [--only NAME,..]]"
                    );
                    std::process::exit(2);
                }
                _ => args.dir = PathBuf::from(a),
            }
        }
        args
    }
}

/// Every setting of the run: (bits, per axis, `Some(grid)` for the error-minimising scale
/// or `None` for the max scale); W4 with the max scale only.
fn settings() -> Vec<(u32, bool, Option<Grid>)> {
    let grids = [None, Some(Grid::FullRange), Some(Grid::Asymmetric)];
    let mut out = Vec::new();
    for grid in grids {
        for per_axis in [true, false] {
            for bits in [4, 3, 2] {
                if grid.is_none() || bits < 4 {
                    out.push((bits, per_axis, grid));
                }
            }
        }
    }
    out
}

/// `W3 per-axis mse full-range` and the like.
fn label(bits: u32, per_axis: bool, mse: Option<Grid>) -> String {
    format!(
        "W{bits} {}{}",
        if per_axis { "per-axis" } else { "per-tensor" },
        match mse {
            None => "",
            Some(Grid::Asymmetric) => " mse asymmetric",
            Some(_) => " mse full-range",
        }
    )
}

fn main() {
    let args = Args::parse();
    let dir = args.dir.clone();
    let (train, test) = match (load(&dir, "train"), load(&dir, "t10k")) {
        (Ok(train), Ok(test)) => (train, test),
        (Err(e), _) | (_, Err(e)) => {
            eprintln!("Fashion-MNIST not found: {e}");
            eprintln!("Install it with `sudo apt-get install dataset-fashion-mnist` (files under {DEFAULT_DIR}),");
            eprintln!("or pass the folder holding the four IDX .gz files: cargo run --release --example fashion_mnist -- DIR");
            std::process::exit(2);
        }
    };
    run::<Autodiff>(&args, &Default::default(), train, test);
}

/// The logits of `model` on the images `range` of `split`, 1 000 at a time.
fn logits<B: Backend>(
    model: impl Fn(Tensor<B, 4>) -> Tensor<B, 2>,
    split: &Split,
    range: std::ops::Range<usize>,
    device: &B::Device,
) -> Tensor<B, 2> {
    let mut logits = Vec::new();
    for start in range.clone().step_by(1000) {
        logits.push(model(
            split.images::<B>(start..(start + 1000).min(range.end), device),
        ));
    }
    Tensor::cat(logits, 0)
}

/// The float model's kernels and biases in PyTorch's layout (Linear kernels `[out, in]`).
fn float_json<B: Backend>(model: &FloatNet<B>) -> serde_json::Value {
    let conv = |c: &Conv2d<B>, name: &str, json: &mut serde_json::Map<_, _>| {
        json.insert(format!("{name}.weight"), tensor_json(c.weight.val()));
        if let Some(b) = &c.bias {
            json.insert(format!("{name}.bias"), tensor_json(b.val()));
        }
    };
    let mut json = serde_json::Map::new();
    conv(&model.conv, "conv", &mut json);
    conv(&model.dw1, "dw1", &mut json);
    conv(&model.pw1, "pw1", &mut json);
    conv(&model.dw2, "dw2", &mut json);
    conv(&model.pw2, "pw2", &mut json);
    json.insert(
        "fc.weight".into(),
        tensor_json(model.fc.weight.val().transpose()),
    );
    let bias = model.fc.bias.as_ref().expect("the Dense layer has a bias");
    json.insert("fc.bias".into(), tensor_json(bias.val()));
    json.into()
}

/// Trains the float CNN on the first [`TRAIN_IMAGES`] training images (section 2).
fn train_float<B: AutodiffBackend>(train: &Split, device: &B::Device) -> FloatNet<B> {
    println!("\n## 2. Train the float CNN on {TRAIN_IMAGES} images, {EPOCHS} epochs");
    B::seed(device, 3);
    let mut model = FloatNet::<B>::new(device);
    let mut optim = AdamConfig::new().init();
    let loss_fn = CrossEntropyLossConfig::new().init(device);
    for epoch in 1..=EPOCHS {
        let mut total = 0.0;
        for start in (0..TRAIN_IMAGES).step_by(64) {
            let x = train.images::<B>(start..start + 64, device);
            let y = train.labels::<B>(start..start + 64, device);
            let loss = loss_fn.forward(model.forward(x), y);
            total += loss.clone().into_scalar().elem::<f64>();
            let grads = GradientsParams::from_grads(loss.backward(), &model);
            model = optim.step(2e-3, model, grads);
        }
        println!(
            "epoch {epoch}: mean loss {:.4}",
            total / (TRAIN_IMAGES / 64) as f64
        );
    }
    model
}

/// The float model: trained (and saved to `out/fashion_mnist/float.bin`), or with
/// `--float PATH` loaded from an earlier run's file.
fn float_model<B: AutodiffBackend>(
    args: &Args,
    train: &Split,
    out: &std::path::Path,
    device: &B::Device,
) -> FloatNet<B> {
    let recorder = BinFileRecorder::<FullPrecisionSettings>::new();
    if let Some(path) = &args.float {
        println!("\n## 2. The float CNN of an earlier run: {path}");
        return FloatNet::new(device)
            .load_file(path, &recorder, device)
            .unwrap_or_else(|e| panic!("{path}: {e}"));
    }
    let start = Instant::now();
    let model = train_float(train, device);
    println!("trained in {:.0} s", start.elapsed().as_secs_f64());
    model
        .clone()
        .save_file(out.join("float"), &recorder)
        .expect("out/fashion_mnist/float.bin");
    model
}

/// The validation images: training images neither training (the first [`TRAIN_IMAGES`]) nor
/// calibration uses.
const VALIDATION: std::ops::Range<usize> = 40_000..45_000;

/// `--validate`: variants of the preset, each over every setting, scored on the validation
/// images: accuracy, agreement with the float model and output error against it, summed over
/// the settings, and the settings whose accuracy ends below nearest rounding's.
fn validate<B: Backend>(
    float: &FloatNet<B>,
    train: &Split,
    only: Option<&str>,
    device: &B::Device,
) {
    let (calibration, quant) = convert(float, train, device);
    let labels = train.labels::<B>(VALIDATION, device);
    let reference = logits(|x| float.forward(x), train, VALIDATION, device);
    // The preset before `Refine::Dense` joined it; the variants change it.
    let unrefined = || AdaRoundConfig::recommended().with_refine(Refine::Off);
    let variants = [
        ("without refinement", unrefined()),
        ("10 000 iterations", {
            let mut c = unrefined();
            c.schedule = Schedule::warm_cosine(10_000);
            c
        }),
        ("refine dense (the preset)", AdaRoundConfig::recommended()),
        ("refine all", unrefined().with_refine(Refine::All)),
        ("ReLU loss", unrefined().with_relu_loss(true)),
        ("learning rate 3e-3", unrefined().with_learning_rate(3e-3)),
        (
            "RD_REG 0.01",
            unrefined().with_params(unrefined().params.with_reg(0.01)),
        ),
        ("batch 64", unrefined().with_batch_size(Some(64))),
        (
            "without bias correction",
            unrefined().with_bias_correction(false),
        ),
    ];
    println!(
        "\n## Validation: {} training images (float {:.2} %); W2 accuracy per setting, sums over the {} settings",
        VALIDATION.len(),
        accuracy(reference.clone(), labels.clone()),
        settings().len()
    );
    let w2: Vec<String> = settings()
        .into_iter()
        .filter(|s| s.0 == 2)
        .map(|(b, p, m)| label(b, p, m))
        .collect();
    println!("| variant | {} | sum accuracy | sum agreement | sum output error | below nearest | seconds |", w2.join(" | "));
    println!("|---|{}---|---|---|---|---|", "---|".repeat(w2.len()));
    // Each setting's model and nearest rounding's accuracy, the same for every variant.
    let models: Vec<_> = settings()
        .into_iter()
        .map(|(bits, per_axis, mse)| {
            let model = quant.clone().with_weights(bits, per_axis, mse);
            let out = logits(|x| model.forward(x), train, VALIDATION, device);
            (bits, model, accuracy(out, labels.clone()))
        })
        .collect();
    // The methods: the preset layer-wise, with block reconstruction (`true`: the blocks
    // given), GPTQ, and each on SeqMSE's scales.
    let seqmse = || AdaRoundConfig::recommended().with_scale_search(ScaleSearch::SeqMse);
    let methods = [
        ("block reconstruction", AdaRoundConfig::recommended(), true),
        (
            "GPTQ",
            AdaRoundConfig::recommended().with_method(RoundingMethod::Gptq),
            false,
        ),
        ("SeqMSE + AdaRound", seqmse(), false),
        ("SeqMSE + block reconstruction", seqmse(), true),
        (
            "SeqMSE + GPTQ",
            seqmse().with_method(RoundingMethod::Gptq),
            false,
        ),
    ];
    let variants = variants
        .into_iter()
        .map(|(name, config)| (name, config, false));
    let mut best: Option<(&str, f64)> = None;
    for (name, config, blocks) in variants.chain(methods) {
        if only.is_some_and(|o| !o.split(',').any(|n| n == name)) {
            continue;
        }
        let (mut w2, mut acc, mut agree, mut error, mut below, mut seconds) =
            (Vec::new(), 0.0, 0.0, 0.0, 0, 0.0);
        for (bits, model, nearest) in &models {
            let mut adaround = AdaRound::new(config.clone());
            if blocks {
                adaround = adaround
                    .with_stages(QuantNet::stages())
                    .with_blocks(QuantNet::<burn_autodiff::Autodiff<B>>::stages());
            }
            let (rounded, report) = adaround
                .run(model, calibration.clone(), |m, x| m.forward(x))
                .expect("AdaRound");
            let out = logits(|x| rounded.forward(x), train, VALIDATION, device);
            let a = accuracy(out.clone(), labels.clone());
            if *bits == 2 {
                w2.push(format!("{a:.2}"));
            }
            acc += a;
            below += usize::from(a < *nearest);
            agree += agreement(out.clone(), reference.clone());
            error += output_error(out, reference.clone());
            seconds += report.seconds;
        }
        println!(
            "| {name} | {} | {acc:.2} | {agree:.2} | {error:.4} | {below} | {seconds:.0} |",
            w2.join(" | ")
        );
        if best.is_none_or(|(_, a)| agree > a) {
            best = Some((name, agree));
        }
    }
    if let Some((name, agree)) = best {
        println!("\nchosen on the validation images: {name} (the highest summed agreement with the float model, {agree:.2})");
    }
}

/// The calibration images and the quantized model of the float one (section 3).
fn convert<B: Backend>(
    float: &FloatNet<B>,
    train: &Split,
    device: &B::Device,
) -> (Tensor<B, 4>, QuantNet<B>) {
    println!(
        "\n## 3. Convert to quantized layers ({CALIBRATION} calibration images, 8-bit activations)"
    );
    let calibration = train.images::<B>(TRAIN_IMAGES..TRAIN_IMAGES + CALIBRATION, device);
    let quant = QuantNet::from_float(float, calibration.clone());
    (calibration, quant)
}

fn run<B: AutodiffBackend>(args: &Args, device: &B::Device, train: Split, test: Split) {
    let out = PathBuf::from("out/fashion_mnist");
    std::fs::create_dir_all(&out).unwrap();
    // 1. Data
    println!(
        "## 1. Load data\nFashion-MNIST: {} train / {} test images of 28x28",
        train.len(),
        test.len()
    );
    // 2. Float model
    let float = float_model::<B>(args, &train, &out, device).valid();
    if args.validate {
        return validate(&float, &train, args.only.as_deref(), device);
    }
    let labels = test.labels::<B::InnerBackend>(0..test.len(), device);
    let float_logits = logits(|x| float.forward(x), &test, 0..test.len(), device);
    let float_acc = accuracy(float_logits.clone(), labels.clone());
    std::fs::write(out.join("float.json"), float_json(&float).to_string()).unwrap();
    println!("float test accuracy: {float_acc:.2} %");

    // 3. Convert
    let (calibration, quant) = convert(&float, &train, device);

    // 4. Nearest vs AdaRound
    println!("\n## 4. Nearest vs AdaRound");
    let mut config = AdaRoundConfig::recommended().with_refine(args.refine);
    if args.seqmse {
        config.scale_search = ScaleSearch::SeqMse;
    }
    let mut rows = Vec::new();
    let mut reports: Vec<(String, AdaRoundReport)> = Vec::new();
    // Per setting, for the report: its grid, both roundings' agreement with the float model
    // and output error against it, and AdaRound's class per test image.
    let mut results = Vec::new();
    for (bits, per_axis, mse) in settings() {
        let label = label(bits, per_axis, mse);
        let model = quant.clone().with_weights(bits, per_axis, mse);
        let score = |logits| Scores::new(logits, labels.clone(), float_logits.clone());
        let nearest_scores = score(logits(|x| model.forward(x), &test, 0..test.len(), device));
        let mut adaround = AdaRound::new(config.clone());
        if args.blocks {
            adaround = adaround
                .with_stages(QuantNet::stages())
                .with_blocks(QuantNet::<burn_autodiff::Autodiff<B::InnerBackend>>::stages());
        }
        let (rounded, report) = adaround
            .run(&model, calibration.clone(), |m, x| m.forward(x))
            .expect("AdaRound");
        let ada_scores = score(logits(|x| rounded.forward(x), &test, 0..test.len(), device));
        let (nearest, ada) = (nearest_scores.accuracy, ada_scores.accuracy);
        let recovered = if float_acc > nearest {
            100.0 * (ada - nearest) / (float_acc - nearest)
        } else {
            100.0
        };
        println!(
            "{label}: nearest {nearest:.2} % -> AdaRound {ada:.2} % ({:.0} s)",
            report.seconds
        );
        let granularity = if per_axis {
            Granularity::PerAxis
        } else {
            Granularity::PerTensor
        };
        let scheme = mse.map_or(Scheme::Max, Scheme::Mse);
        let mut result = result_json(
            bits,
            granularity,
            scheme,
            &nearest_scores,
            &ada_scores,
            report.seconds,
        );
        result["weights"] = label.clone().into();
        result["recovered_percent"] = recovered.into();
        results.push(result);
        rows.push((label.clone(), nearest, ada, recovered, report.seconds));
        reports.push((label, report));
    }

    // 5. Results
    println!(
        "\n## 5. Results (test accuracy, {} images; float {float_acc:.2} %)",
        test.len()
    );
    println!("| weights | nearest | AdaRound | of the loss recovered | AdaRound time |");
    println!("|---|---|---|---|---|");
    for (label, nearest, ada, recovered, secs) in &rows {
        println!("| {label} | {nearest:.2} % | {ada:.2} % | {recovered:.0} % | {secs:.0} s |");
    }
    let json = serde_json::json!({
        "float_accuracy": float_acc,
        "activation_max": [quant.act1.max_value, quant.act2.max_value, quant.act3.max_value],
        "results": results,
        "reports": reports.iter().map(|(l, r)| serde_json::json!({"weights": l, "report": r})).collect::<Vec<_>>(),
    });
    std::fs::write(
        out.join("report.json"),
        serde_json::to_string_pretty(&json).unwrap(),
    )
    .unwrap();
    let labels: Vec<String> = rows.iter().map(|r| r.0.clone()).collect();
    let chart = svg::bars(
        &format!("Fashion-MNIST test accuracy (float {float_acc:.1} %)"),
        &labels,
        &[
            ("nearest", rows.iter().map(|r| r.1).collect()),
            ("AdaRound", rows.iter().map(|r| r.2).collect()),
        ],
        "accuracy %",
    );
    std::fs::write(out.join("accuracy.svg"), chart).unwrap();
    if let Some((label, report)) = reports.iter().find(|(l, _)| l == "W2 per-axis") {
        let k = &report.layers.last().unwrap().kernels[0];
        let chart = svg::histograms(
            &format!("{label} Dense: decimals h(alpha) before and after AdaRound"),
            &[("before", &k.decimals_before), ("after", &k.decimals_after)],
        );
        std::fs::write(out.join("decimals.svg"), chart).unwrap();
    }
    println!(
        "\nreport: {}\ncharts: {} {}",
        out.join("report.json").display(),
        out.join("accuracy.svg").display(),
        out.join("decimals.svg").display()
    );
}
