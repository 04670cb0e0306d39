//! Backend switching on a residual model: one generic `run::<B>()`, executed on
//! `Autodiff<NdArray>` (CPU) and, with the `wgpu` feature, on `Autodiff<Wgpu>` (GPU).
//!
//! ```sh
//! cargo run --release --example backends                                   # NdArray
//! cargo run --release -p adaround-examples --features wgpu --example backends -- --backend wgpu # + Wgpu
//! cargo run --release -p adaround-examples --features wgpu --example backends -- --backend all
//! ```
//!
//! The model has a skip connection (`y = relu(conv2(relu(conv1(x))) + relu(conv1(x)))`): the
//! driver finds its layers by running its own `forward`, as for any graph.

use std::time::Instant;

use adaround::{
    layers::{
        QuantizedConv2d, QuantizedConv2dConfig, QuantizedDense, QuantizedDenseConfig,
        QuantizedReLU, QuantizedReLUConfig,
    },
    AdaRound, AdaRoundConfig, BetaDecay, ReconstructionLoss, Schedule, WeightQuantizer,
};
use adaround_examples::digits::{accuracy, Digits};
use burn::{
    module::{AutodiffModule, Module},
    nn::{loss::CrossEntropyLossConfig, PaddingConfig2d},
    optim::{AdamConfig, GradientsParams, Optimizer},
    tensor::{
        backend::{AutodiffBackend, Backend},
        Tensor,
    },
};

/// A residual CNN made of quantized layers.
#[derive(Module, Debug)]
struct Residual<B: Backend> {
    stem: QuantizedConv2d<B>,
    body: QuantizedConv2d<B>,
    act: QuantizedReLU<B>,
    head: QuantizedDense<B>,
}

impl<B: Backend> Residual<B> {
    fn new(device: &B::Device) -> Self {
        let conv = |c: [usize; 2]| {
            QuantizedConv2dConfig::new(c, [3, 3])
                .with_padding(PaddingConfig2d::Same)
                .with_quantizer(WeightQuantizer::Float)
                .init(device)
        };
        Self {
            stem: conv([1, 16]),
            body: conv([16, 16]),
            act: QuantizedReLUConfig::new()
                .with_bitwidth(8)
                .with_max_value(4.0)
                .init(),
            head: QuantizedDenseConfig::new(16 * 8 * 8, 10)
                .with_quantizer(WeightQuantizer::Float)
                .init(device),
        }
    }

    fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 2> {
        let x = self.act.forward(self.stem.forward(x));
        let y = self.act.forward(self.body.forward(x.clone()) + x);
        self.head.forward(y.flatten(1, 3))
    }

    fn with_weight_bits(mut self, bits: u32) -> Self {
        let q = WeightQuantizer::max_per_axis(bits).unwrap();
        self.stem.quantizer = q.clone().into();
        self.body.quantizer = q.clone().into();
        self.head.quantizer = q.into();
        self
    }
}

/// Trains in float, quantizes to W3, AdaRounds; returns the seconds AdaRound took.
fn run<B: AutodiffBackend>(name: &str, device: &B::Device) -> f64 {
    println!("\n## {name}");
    B::seed(device, 11);
    let (train, test) = Digits::load().split(450, 7);
    let mut model = Residual::<B>::new(device);
    let mut optim = AdamConfig::new().init();
    let loss_fn = CrossEntropyLossConfig::new().init(device);
    let start = Instant::now();
    for _ in 0..10 {
        for s in (0..train.len() - 63).step_by(64) {
            let loss = loss_fn.forward(
                model.forward(train.images(s..s + 64, device)),
                train.labels(s..s + 64, device),
            );
            let grads = GradientsParams::from_grads(loss.backward(), &model);
            model = optim.step(3e-3, model, grads);
        }
    }
    let x_test = test.images::<B::InnerBackend>(0..test.len(), device);
    let y_test = test.labels::<B::InnerBackend>(0..test.len(), device);
    let float_acc = accuracy(model.valid().forward(x_test.clone()), y_test.clone());
    println!(
        "float: {float_acc:.2} % (trained in {:.1} s)",
        start.elapsed().as_secs_f64()
    );

    // AdaRound takes the inference model (`valid()`): it wraps the layer it optimises in
    // autodiff itself where needed.
    let quant = model.valid().with_weight_bits(3);
    let nearest = accuracy(quant.forward(x_test.clone()), y_test.clone());
    let config = AdaRoundConfig::new(Schedule::Iterations {
        iterations: 500,
        warm_start: 0.2,
        decay: BetaDecay::Cosine,
    })
    .with_batch_size(Some(32))
    .with_loss(ReconstructionLoss::ChannelSum)
    .with_learning_rate(1e-2);
    let calibration = train.images::<B::InnerBackend>(0..256, device);
    let (rounded, report) = AdaRound::new(config.clone())
        .run(&quant, calibration, |m, x| m.forward(x))
        .expect("AdaRound");
    let ada = accuracy(rounded.forward(x_test), y_test);
    for l in &report.layers {
        println!(
            "  {:<5} {:?} path, error {:.5} -> {:.5}",
            l.name, l.path, l.err_before, l.err_final
        );
    }
    println!(
        "W3: nearest {nearest:.2} % -> AdaRound {ada:.2} % in {:.1} s",
        report.seconds
    );
    report.seconds
}

/// Prints the adapter wgpu picked (cubecl logs it at info level).
struct AdapterLog;

impl log::Log for AdapterLog {
    fn enabled(&self, metadata: &log::Metadata) -> bool {
        metadata.level() <= log::Level::Info && metadata.target().starts_with("cubecl_wgpu")
    }

    fn log(&self, record: &log::Record) {
        if self.enabled(record.metadata()) {
            println!("wgpu: {}", record.args());
        }
    }

    fn flush(&self) {}
}

fn main() {
    let _ = log::set_logger(&AdapterLog).map(|()| log::set_max_level(log::LevelFilter::Info));
    let args: Vec<String> = std::env::args().collect();
    let backend = args
        .iter()
        .position(|a| a == "--backend")
        .and_then(|i| args.get(i + 1))
        .map(String::as_str)
        .unwrap_or("ndarray");
    let mut times = Vec::new();
    if matches!(backend, "ndarray" | "all") {
        let t = run::<burn_autodiff::Autodiff<burn_ndarray::NdArray<f32>>>(
            "Autodiff<NdArray>",
            &Default::default(),
        );
        times.push(("Autodiff<NdArray>", t));
    }
    if matches!(backend, "wgpu" | "all") {
        #[cfg(feature = "wgpu")]
        {
            let device = burn_wgpu::WgpuDevice::default();
            println!("\nwgpu device: {device:?}");
            let t = run::<burn_autodiff::Autodiff<burn_wgpu::Wgpu>>("Autodiff<Wgpu>", &device);
            times.push(("Autodiff<Wgpu>", t));
        }
        #[cfg(not(feature = "wgpu"))]
        {
            eprintln!("the wgpu backend needs the `wgpu` feature: cargo run --release -p adaround-examples --features wgpu --example backends -- --backend wgpu");
            std::process::exit(2);
        }
    }
    if times.is_empty() {
        eprintln!("unknown backend `{backend}`: use ndarray, wgpu or all");
        std::process::exit(2);
    }
    println!("\n| backend | AdaRound time (3 layers x 500 iterations) |\n|---|---|");
    for (name, t) in times {
        println!("| {name} | {t:.1} s |");
    }
}
