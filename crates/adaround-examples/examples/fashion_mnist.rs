//! Fashion-MNIST: a separable CNN trained in float, then W4/W3/W2 weights with per-tensor and
//! per-axis quantizers, nearest vs AdaRound on the full 10 000-image test set.
//!
//! ```sh
//! sudo apt-get install dataset-fashion-mnist     # IDX files under /usr/share/datasets/fashion-mnist/
//! cargo run --release --example fashion_mnist [-- DIR]
//! ```
//!
//! Sections: 1. load the data; 2. train the float CNN (Conv2D -> SeparableConv2D ->
//! SeparableConv2D -> Dense) on the first 20 000 training images for 2 epochs; 3. convert to
//! quantized layers (8-bit activations); 4. nearest and AdaRound at each bitwidth and
//! granularity; 5. the table, `out/fashion_mnist/report.json` and the charts.

use std::{io::Read, path::PathBuf, time::Instant};

use adaround::{
    adaround,
    layers::{
        QuantizedConv2d, QuantizedDense, QuantizedReLU, QuantizedReLUConfig,
        QuantizedSeparableConv2d,
    },
    AdaRoundConfig, AdaRoundReport, Grid, WeightQuantizer,
};
use adaround_examples::{digits::accuracy, svg};
use burn::{
    module::{AutodiffModule, Module},
    nn::{
        conv::{Conv2d, Conv2dConfig},
        loss::CrossEntropyLossConfig,
        Linear, LinearConfig, PaddingConfig2d, Relu,
    },
    optim::{AdamConfig, GradientsParams, Optimizer},
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

    fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 2> {
        let x = self.act1.forward(self.conv.forward(x));
        let x = self.act2.forward(self.sep1.forward(x));
        let x = self.act3.forward(self.sep2.forward(x));
        self.fc.forward(x.flatten(1, 3))
    }
}

fn main() {
    let dir = std::env::args()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_DIR));
    let (train, test) = match (load(&dir, "train"), load(&dir, "t10k")) {
        (Ok(train), Ok(test)) => (train, test),
        (Err(e), _) | (_, Err(e)) => {
            eprintln!("Fashion-MNIST not found: {e}");
            eprintln!("Install it with `sudo apt-get install dataset-fashion-mnist` (files under {DEFAULT_DIR}),");
            eprintln!("or pass the folder holding the four IDX .gz files: cargo run --release --example fashion_mnist -- DIR");
            std::process::exit(2);
        }
    };
    run::<Autodiff>(&Default::default(), train, test);
}

fn eval<B: Backend>(
    model: impl Fn(Tensor<B, 4>) -> Tensor<B, 2>,
    test: &Split,
    device: &B::Device,
) -> f64 {
    let mut logits = Vec::new();
    for start in (0..test.len()).step_by(1000) {
        logits.push(model(
            test.images::<B>(start..(start + 1000).min(test.len()), device),
        ));
    }
    accuracy(
        Tensor::cat(logits, 0),
        test.labels::<B>(0..test.len(), device),
    )
}

fn run<B: AutodiffBackend>(device: &B::Device, train: Split, test: Split) {
    let out = PathBuf::from("out/fashion_mnist");
    std::fs::create_dir_all(&out).unwrap();
    // 1. Data
    println!(
        "## 1. Load data\nFashion-MNIST: {} train / {} test images of 28x28",
        train.len(),
        test.len()
    );

    // 2. Float model
    println!("\n## 2. Train the float CNN on {TRAIN_IMAGES} images, {EPOCHS} epochs");
    let start = Instant::now();
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
    let float = model;
    let float_acc = eval(|x| float.valid().forward(x), &test, device);
    println!(
        "float test accuracy: {float_acc:.2} %  (trained in {:.0} s)",
        start.elapsed().as_secs_f64()
    );

    // 3. Convert
    println!(
        "\n## 3. Convert to quantized layers ({CALIBRATION} calibration images, 8-bit activations)"
    );
    let calibration =
        train.images::<B::InnerBackend>(TRAIN_IMAGES..TRAIN_IMAGES + CALIBRATION, device);
    let quant = QuantNet::from_float(&float.valid(), calibration.clone());

    // 4. Nearest vs AdaRound
    println!("\n## 4. Nearest vs AdaRound");
    let config = AdaRoundConfig::recommended();
    let mut rows = Vec::new();
    let mut reports: Vec<(String, AdaRoundReport)> = Vec::new();
    let grids = [None, Some(Grid::FullRange), Some(Grid::Asymmetric)];
    let settings = grids
        .into_iter()
        .flat_map(|grid| [(true, grid), (false, grid)]);
    for (per_axis, mse) in settings {
        for bits in [4, 3, 2] {
            if mse.is_some() && bits == 4 {
                continue;
            }
            let label = format!(
                "W{bits} {}{}",
                if per_axis { "per-axis" } else { "per-tensor" },
                match mse {
                    None => "",
                    Some(Grid::Asymmetric) => " mse asymmetric",
                    Some(_) => " mse full-range",
                }
            );
            let model = quant.clone().with_weights(bits, per_axis, mse);
            let nearest = eval(|x| model.forward(x), &test, device);
            let (rounded, report) =
                adaround(&model, calibration.clone(), |m, x| m.forward(x), &config)
                    .expect("AdaRound");
            let ada = eval(|x| rounded.forward(x), &test, device);
            let recovered = if float_acc > nearest {
                100.0 * (ada - nearest) / (float_acc - nearest)
            } else {
                100.0
            };
            println!(
                "{label}: nearest {nearest:.2} % -> AdaRound {ada:.2} % ({:.0} s)",
                report.seconds
            );
            rows.push((label.clone(), nearest, ada, recovered, report.seconds));
            reports.push((label, report));
        }
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
        "results": rows.iter().map(|(l, n, a, r, s)| serde_json::json!({
            "weights": l, "nearest_accuracy": n, "adaround_accuracy": a, "recovered_percent": r, "seconds": s
        })).collect::<Vec<_>>(),
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
