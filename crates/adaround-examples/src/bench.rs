//! The benchmark behind `cargo bench` and `cargo run --release --example bench`: time per
//! AdaRound step, direct vs Gram path, on the layers of the performance issue, and the full
//! calibration time of the quickstart model.
//!
//! A step is what the driver runs: forward with the soft AdaRound weights, reconstruction
//! loss against the float output (MSE), rounding loss, gradient (analytic in the fused step
//! of Dense and Conv2D, autodiff for the separable conv), Adam on alpha. It is timed
//! through the public driver: runs of one layer with `N1` and `n2` iterations (`n2` chosen
//! for about 1.5 s of steps), the time difference over `n2 - N1` (capture and setup cancel
//! out), the faster of two measurements of each. `benches/adaround_step.py` runs the
//! same loop in PyTorch on the same shapes.

use std::{path::PathBuf, time::Instant};

use crate::digits::{Digits, FloatCnn, Granularity, QuantCnn, FIXTURE};
use adaround::{
    layers::{
        QuantizedConv2d, QuantizedConv2dConfig, QuantizedDense, QuantizedDenseConfig,
        QuantizedSeparableConv2d, QuantizedSeparableConv2dConfig,
    },
    AdaRound, AdaRoundConfig, BetaDecay, Elementwise, LossPath, PerformanceConfig, RunConfig,
    Schedule, WeightQuantizer,
};
use burn::{
    module::Module,
    nn::PaddingConfig2d,
    record::{BinFileRecorder, FullPrecisionSettings},
    tensor::{backend::Backend, Distribution, Tensor},
};

/// Iterations of the shorter run; the longer one adds enough for about
/// [`TIMED_SECONDS`] of steps (at least 100).
const N1: usize = 20;
const TIMED_SECONDS: f64 = 1.5;

/// Where the benchmark's fused steps run (`bench --elementwise auto|device|host|resident`;
/// default `Auto`).
static ELEMENTWISE: std::sync::OnceLock<Elementwise> = std::sync::OnceLock::new();

/// Sets where the benchmark's fused steps run, once, before any measurement.
pub fn set_elementwise(elementwise: Elementwise) {
    ELEMENTWISE
        .set(elementwise)
        .expect("the placement is set once, before any run");
}

fn elementwise() -> Elementwise {
    *ELEMENTWISE.get().unwrap_or(&Elementwise::Auto)
}

/// The quickstart's settings ([`short_config`](crate::digits::short_config)) with the
/// benchmark's placement.
fn short_config() -> AdaRoundConfig {
    crate::digits::short_config()
        .with_performance(PerformanceConfig::new().with_elementwise(elementwise()))
}

pub(crate) fn config(iterations: usize, path: LossPath, batch: usize) -> AdaRoundConfig {
    AdaRoundConfig::new(Schedule::Iterations {
        iterations,
        warm_start: 0.0,
        decay: BetaDecay::Cosine,
    })
    .with_batch_size(Some(batch))
    .with_never_worse(false)
    .with_run(RunConfig::new().with_log_every(iterations))
    .with_performance(
        PerformanceConfig::new()
            .with_path(path)
            .with_elementwise(elementwise()),
    )
}

/// Seconds per step of the driver's loop on `model`.
pub fn per_step<B: Backend, M: Module<B>, const D: usize>(
    model: &M,
    samples: Tensor<B, D>,
    forward: impl Fn(&M, Tensor<B, D>) -> Tensor<B, D> + Copy,
    path: LossPath,
    batch: usize,
) -> (f64, String) {
    let time = |n: usize| {
        let start = Instant::now();
        let (_, report) = AdaRound::new(config(n, path, batch))
            .run(model, samples.clone(), forward)
            .unwrap();
        (
            start.elapsed().as_secs_f64(),
            format!("{:?}", report.layers[0].path),
        )
    };
    // Warm-up, then a first estimate from two run lengths (setup cancels out; fast steps
    // need many iterations).
    let _ = time(N1);
    let estimate = ((time(N1 + 200).0 - time(N1).0) / 200.0).max(1e-6);
    let n2 = N1 + ((TIMED_SECONDS / estimate) as usize).clamp(100, 100_000);
    // The faster of two measurements of each run: other processes only ever add time.
    let t1 = time(N1).0.min(time(N1).0);
    let (t2a, used) = time(n2);
    let t2 = t2a.min(time(n2).0);
    ((t2 - t1) / (n2 - N1) as f64, used)
}

/// Runs the benchmark on backend `B`, prints the tables and writes
/// `out/bench/bench-<backend>.json`.
pub fn run<B: Backend>(device: &B::Device, backend_name: &str) -> serde_json::Value {
    B::seed(device, 1);
    let rows = step_rows::<B>(device);
    let totals = quickstart_totals::<B>(device);
    println!("allocator: {}\n", crate::ALLOCATOR);
    println!("| layer | path | ms / step |");
    println!("|---|---|---|");
    for (layer, path, s) in &rows {
        println!("| {layer} | {path} | {:.3} |", s * 1e3);
    }
    println!("\n| quickstart model, W4, 3 layers x 1000 iterations | paths | seconds |");
    println!("|---|---|---|");
    for (choice, paths, s) in &totals {
        println!("| path {choice} | {paths} | {s:.2} |");
    }
    let json = serde_json::json!({
        "backend": backend_name,
        "allocator": crate::ALLOCATOR,
        "steps": rows.iter().map(|(l, p, s)| serde_json::json!({"layer": l, "path": p, "ms_per_step": s * 1e3})).collect::<Vec<_>>(),
        "quickstart": totals.iter().map(|(c, p, s)| serde_json::json!({"path": c, "layers": p, "seconds": s})).collect::<Vec<_>>(),
    });
    write_json(&format!("bench-{}", slug(backend_name)), &json);
    json
}

/// Seconds per step of each layer kind on each path: `(layer, path taken, seconds)`.
fn step_rows<B: Backend>(device: &B::Device) -> Vec<(String, String, f64)> {
    let q = WeightQuantizer::max_per_axis(4).unwrap();
    let mut rows: Vec<(String, String, f64)> = Vec::new();

    // Dense 512 -> 512, 1024 samples (one batch).
    let dense: QuantizedDense<B> = QuantizedDenseConfig::new(512, 512)
        .with_quantizer(q.clone())
        .init(device);
    let x = Tensor::<B, 2>::random([1024, 512], Distribution::Normal(0.0, 1.0), device);
    for path in [LossPath::Direct, LossPath::Gram] {
        let (s, used) = per_step(&dense, x.clone(), |m, x| m.forward(x), path, 1024);
        rows.push(("Dense 512->512, 1024 samples".into(), used, s));
    }

    // Conv2D 32 -> 32, 3x3, same, 16x16 maps, batch 32.
    let conv: QuantizedConv2d<B> = QuantizedConv2dConfig::new([32, 32], [3, 3])
        .with_padding(PaddingConfig2d::Same)
        .with_quantizer(q.clone())
        .init(device);
    let maps = Tensor::<B, 4>::random([32, 32, 16, 16], Distribution::Normal(0.0, 1.0), device);
    for path in [LossPath::Direct, LossPath::Gram] {
        let (s, used) = per_step(&conv, maps.clone(), |m, x| m.forward(x), path, 32);
        rows.push(("Conv2D 32->32 3x3, 16x16, batch 32".into(), used, s));
    }

    // SeparableConv2D 32 -> 64 (direct path: no single quadratic form).
    let sep: QuantizedSeparableConv2d<B> = QuantizedSeparableConv2dConfig::new([32, 64], [3, 3])
        .with_padding(PaddingConfig2d::Same)
        .with_quantizer(q)
        .init(device);
    let (s, used) = per_step(&sep, maps, |m, x| m.forward(x), LossPath::Auto, 32);
    rows.push((
        "SeparableConv2D 32->64 3x3, 16x16, batch 32".into(),
        used,
        s,
    ));
    rows
}

/// The quickstart's W4 per-channel model and its 256 calibration images.
fn quickstart_model<B: Backend>(device: &B::Device) -> (QuantCnn<B>, Tensor<B, 4>) {
    let recorder = BinFileRecorder::<FullPrecisionSettings>::new();
    let float = FloatCnn::<B>::new(device)
        .load_file(FIXTURE, &recorder, device)
        .unwrap();
    let (train, _) = Digits::load().split(450, 7);
    let calibration = train.images::<B>(0..256, device);
    let model = QuantCnn::from_float(&float, 4, Granularity::PerAxis, 8, calibration.clone());
    (model, calibration)
}

/// The quickstart model, all layers, the benchmark's fixed settings ([`short_config`]
/// (crate::digits::short_config)), on the direct path and on the automatic choice:
/// `(path choice, paths taken, seconds)`.
fn quickstart_totals<B: Backend>(device: &B::Device) -> Vec<(String, String, f64)> {
    let (model, calibration) = quickstart_model::<B>(device);
    let config = short_config();
    let mut totals = Vec::new();
    for path in [LossPath::Direct, LossPath::Auto] {
        let start = Instant::now();
        let (_, report) = AdaRound::new(
            config
                .clone()
                .with_performance(config.performance.clone().with_path(path)),
        )
        .run(&model, calibration.clone(), |m, x| m.forward(x))
        .unwrap();
        let paths: Vec<String> = report
            .layers
            .iter()
            .map(|l| format!("{}:{:?}", l.name, l.path))
            .collect();
        totals.push((
            format!("{path:?}"),
            paths.join(" "),
            start.elapsed().as_secs_f64(),
        ));
    }
    totals
}

/// The quickstart model calibrated `runs` times in a row on the automatic path, seconds
/// each: the first run includes what a backend does once (a GPU backend compiles its
/// kernels), the later ones what it does on every run.
pub fn quickstart_runs<B: Backend>(device: &B::Device, runs: usize) -> Vec<f64> {
    let (model, calibration) = quickstart_model::<B>(device);
    let config = short_config();
    (0..runs)
        .map(|_| {
            let start = Instant::now();
            AdaRound::new(config.clone())
                .run(&model, calibration.clone(), |m, x| m.forward(x))
                .unwrap();
            start.elapsed().as_secs_f64()
        })
        .collect()
}

/// A file-name slug of a backend name: lowercase letters and digits.
fn slug(backend_name: &str) -> String {
    backend_name
        .to_lowercase()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .collect()
}

/// Writes `json` to `out/bench/{name}.json` and prints the path.
fn write_json(name: &str, json: &serde_json::Value) {
    let out = PathBuf::from("out/bench");
    std::fs::create_dir_all(&out).unwrap();
    let path = out.join(format!("{name}.json"));
    std::fs::write(&path, serde_json::to_string_pretty(json).unwrap()).unwrap();
    println!("\n{}", path.display());
}

/// The mini-XCEPTION-size model ([`crate::xception`], random weights and BatchNorm
/// statistics, folded): AdaRound at W4 per channel with the quickstart's configuration
/// (1000 iterations per layer) on `samples` random 64x64 images, each `separable` choice.
/// Prints per-layer seconds; returns the total seconds of each run.
pub fn xception<B: Backend>(
    device: &B::Device,
    samples: usize,
    separable: &[adaround::SeparableStep],
) -> Vec<(String, f64)> {
    use crate::xception::{MiniXception, QuantXception};
    B::seed(device, 5);
    let float = MiniXception::<B>::new(device);
    let quantizer = WeightQuantizer::max_per_axis(4).unwrap();
    let model = QuantXception::from_float(&float, &quantizer);
    let x = Tensor::<B, 4>::random([samples, 1, 64, 64], Distribution::Normal(0.0, 1.0), device);
    let mut totals = Vec::new();
    for &choice in separable {
        let config = short_config().with_separable(choice);
        let (rounded, report) = AdaRound::new(config)
            .with_progress(|p| {
                if let adaround::Progress::LayerFinished {
                    index,
                    layers,
                    report,
                } = p
                {
                    eprintln!(
                        "[{}/{layers}] {} {:.2} s",
                        index + 1,
                        report.name,
                        report.seconds
                    );
                }
            })
            .run(&model, x.clone(), |m, x| m.forward(x))
            .unwrap();
        // Random weights on random images: top-1 agreement is not meaningful, the output
        // error relative to the float output is.
        let f = float.forward(x.clone());
        let rel = |m: &QuantXception<B>| relative_error(m.forward(x.clone()), f.clone());
        let (nearest, ada) = (rel(&model), rel(&rounded));
        println!("\n| mini-XCEPTION W4 layer ({choice:?}) | kind | path | fused | error before -> after | seconds |");
        println!("|---|---|---|---|---|---|");
        for l in &report.layers {
            println!(
                "| {} | {:?} | {:?} | {} | {:.5} -> {:.5} | {:.2} |",
                l.name, l.kind, l.path, l.fused, l.err_before, l.err_final, l.seconds
            );
        }
        println!(
            "| total | | | | model output error relative to float: nearest {nearest:.2e}, AdaRound {ada:.2e} | **{:.1}** |",
            report.seconds
        );
        totals.push((format!("{choice:?}"), report.seconds));
    }
    totals
}

/// `||a - b||² / ||b||²`.
fn relative_error<B: Backend>(a: Tensor<B, 2>, b: Tensor<B, 2>) -> f64 {
    let num = (a - b.clone()).powi_scalar(2).sum().into_scalar();
    let den = b.powi_scalar(2).sum().into_scalar();
    use burn::tensor::ElementConversion;
    num.elem::<f64>() / den.elem::<f64>()
}

/// One point of [`scaling`]: a Conv2D 3x3 (same) on 16x16 maps.
struct Point {
    samples: usize,
    c_in: usize,
    c_out: usize,
}

impl Point {
    fn new(samples: usize, c_in: usize, c_out: usize) -> Self {
        Self {
            samples,
            c_in,
            c_out,
        }
    }

    /// Patch size `K`.
    fn k(&self) -> usize {
        self.c_in * 9
    }

    /// Bytes the direct (fused) step holds: every sample's im2col patch rows and targets.
    fn direct_bytes(&self) -> usize {
        self.samples * 16 * 16 * (self.k() + self.c_out) * 4
    }

    /// Bytes the Gram step holds: one `K x K` matrix (one batch of all samples).
    fn gram_bytes(&self) -> usize {
        self.k() * self.k() * 4
    }
}

/// How the cost of a step grows: ms per step of the direct and Gram paths (both fused) of a
/// Conv2D 3x3 on 16x16 maps, one batch of all samples per step, against calibration samples,
/// output channels and patch size `K = 9 C_in`, with the bytes each path holds (from the
/// shapes). Prints the tables, writes `out/bench/scaling-<backend>.json` and one SVG per sweep
/// (`out/bench/scaling-{samples,channels,k}.svg`).
pub fn scaling<B: Backend>(device: &B::Device, backend_name: &str) -> serde_json::Value {
    B::seed(device, 3);
    let sweeps: [(&str, &str, Vec<Point>); 3] = [
        (
            "samples",
            "calibration samples (C_in 32, C_out 32)",
            [32, 64, 128, 256, 512]
                .map(|samples| Point::new(samples, 32, 32))
                .into(),
        ),
        (
            "channels",
            "output channels (64 samples, C_in 32)",
            [16, 32, 64, 128]
                .map(|c_out| Point::new(64, 32, c_out))
                .into(),
        ),
        (
            "k",
            "patch size K = 9 C_in (64 samples, C_out 32)",
            [8, 16, 32, 64].map(|c_in| Point::new(64, c_in, 32)).into(),
        ),
    ];
    let mut json = Vec::new();
    for (sweep, what, points) in &sweeps {
        json.extend(scaling_sweep::<B>(
            device,
            backend_name,
            sweep,
            what,
            points,
        ));
    }
    let json = serde_json::json!({ "backend": backend_name, "points": json });
    write_json(&format!("scaling-{}", slug(backend_name)), &json);
    json
}

/// One sweep of [`scaling`]: its table, its plot (`out/bench/scaling-{sweep}.svg`) and its
/// points as JSON.
fn scaling_sweep<B: Backend>(
    device: &B::Device,
    backend_name: &str,
    sweep: &str,
    what: &str,
    points: &[Point],
) -> Vec<serde_json::Value> {
    println!("\n### Step time against {what}, {backend_name}\n");
    println!("| samples | C_in | C_out | K | direct ms / step | Gram ms / step | direct / Gram | direct MiB held | Gram MiB held |");
    println!("|---|---|---|---|---|---|---|---|---|");
    let q = WeightQuantizer::max_per_axis(4).unwrap();
    let (mut direct, mut gram, mut labels, mut json) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for p in points {
        let conv: QuantizedConv2d<B> = QuantizedConv2dConfig::new([p.c_in, p.c_out], [3, 3])
            .with_padding(PaddingConfig2d::Same)
            .with_quantizer(q.clone())
            .init(device);
        let maps = Tensor::<B, 4>::random(
            [p.samples, p.c_in, 16, 16],
            Distribution::Normal(0.0, 1.0),
            device,
        );
        let mut ms = [LossPath::Direct, LossPath::Gram].map(|path| {
            per_step(&conv, maps.clone(), |m, x| m.forward(x), path, p.samples).0 * 1e3
        });
        ms.iter_mut().for_each(|v| *v = (*v * 1e4).round() / 1e4);
        let mib = |b: usize| b as f64 / (1 << 20) as f64;
        println!(
            "| {} | {} | {} | {} | {:.3} | {:.3} | {:.1}x | {:.2} | {:.3} |",
            p.samples,
            p.c_in,
            p.c_out,
            p.k(),
            ms[0],
            ms[1],
            ms[0] / ms[1],
            mib(p.direct_bytes()),
            mib(p.gram_bytes())
        );
        labels.push(match sweep {
            "samples" => p.samples.to_string(),
            "channels" => p.c_out.to_string(),
            _ => p.k().to_string(),
        });
        direct.push(ms[0]);
        gram.push(ms[1]);
        json.push(serde_json::json!({
            "sweep": sweep, "samples": p.samples, "c_in": p.c_in, "c_out": p.c_out, "k": p.k(),
            "direct_ms": ms[0], "gram_ms": ms[1],
            "direct_bytes": p.direct_bytes(), "gram_bytes": p.gram_bytes(),
        }));
    }
    let svg = crate::svg::bars(
        &format!("AdaRound step of a Conv2D 3x3 against {what}, {backend_name}"),
        &labels,
        &[("direct (fused)", direct), ("Gram (fused)", gram)],
        "ms per step",
    );
    let file = PathBuf::from("out/bench").join(format!("scaling-{sweep}.svg"));
    std::fs::create_dir_all("out/bench").unwrap();
    std::fs::write(&file, svg).unwrap();
    println!("\n{}", file.display());
    json
}
