//! Quickstart: AdaRound on real data (the UCI optical digits), notebook-like.
//!
//! ```sh
//! cargo run --release --example quickstart
//! ```
//!
//! Sections:
//!
//! 1. load the digits;
//! 2. the small float CNN (Conv2D, SeparableConv2D, Dense), trained by this example and
//!    committed as `examples/data/digits_cnn.bin` (multi-threaded training is not
//!    bit-reproducible; the committed model makes every number below reproducible);
//! 3. convert it to quantized layers;
//! 4. nearest rounding at W4/W3/W2, with the reference's weight scheme (scale from
//!    `max |w|`, symmetric grid) and the error-minimising scale on the full-range and the
//!    asymmetric grids;
//! 5. AdaRound at the same bitwidths and schemes;
//! 6. the results table, the report JSON and two SVG charts under `out/quickstart/`.
//!
//! `--train` trains a new float model (about 5 s) instead of loading the committed one;
//! `--write-fixture` trains and saves it as the new committed model. `--order K` gives
//! AdaRound the same calibration images in another fixed order
//! ([`calibration_order`](adaround_examples::digits::calibration_order)) and writes
//! `report_order{K}.json` (no charts): the spread over orders is what this project has for
//! AIMET's random seeds (`benches/aimet_side_by_side.py --orders`).

use std::{path::PathBuf, time::Instant};

use adaround::{AdaRound, AdaRoundReport, Grid};
use adaround_examples::{
    digits::{
        accuracy, order_arg, quickstart_config, report_name, result_json, train_float, Digits,
        FloatCnn, Granularity, QuantCnn, Scheme, Scores, FIXTURE,
    },
    svg,
};
use burn::{
    module::{AutodiffModule, Module},
    record::{BinFileRecorder, FullPrecisionSettings},
    tensor::backend::AutodiffBackend,
};

type Backend = burn_autodiff::Autodiff<burn_ndarray::NdArray<f32>>;

const TEST_SIZE: usize = 450;
const CALIBRATION: usize = 256;
const BITWIDTHS: [u32; 3] = [4, 3, 2];
const ACTIVATION_BITS: u32 = 8;

/// The weight schemes compared: the reference's (max scale, symmetric grid), the one chosen
/// on validation data (`cargo run --release --example choose`), and the asymmetric grid
/// (integer offsets) with the same scale rule.
const SCHEMES: [Scheme; 3] = [
    Scheme::Max,
    Scheme::Mse(Grid::FullRange),
    Scheme::Mse(Grid::Asymmetric),
];

fn main() {
    let write_fixture = std::env::args().any(|a| a == "--write-fixture");
    let train = write_fixture || std::env::args().any(|a| a == "--train");
    run::<Backend>(&Default::default(), train, write_fixture);
}

fn run<B: AutodiffBackend>(device: &B::Device, train_new: bool, write_fixture: bool) {
    let out = PathBuf::from("out/quickstart");
    std::fs::create_dir_all(&out).expect("create out/quickstart");

    // 1. Load data
    println!("## 1. Load data");
    let digits = Digits::load();
    let (train, test) = digits.split(TEST_SIZE, 7);
    println!(
        "UCI digits: {} images of 8x8, {} train / {} test",
        digits.len(),
        train.len(),
        test.len()
    );
    let x_test = test.images::<B::InnerBackend>(0..test.len(), device);
    let y_test = test.labels::<B::InnerBackend>(0..test.len(), device);

    // 2. The float CNN
    println!("\n## 2. The float CNN (Conv2D -> SeparableConv2D -> Dense)");
    let float = if train_new {
        let start = Instant::now();
        let float = train_float::<B>(&train, device);
        println!("trained in {:.1} s", start.elapsed().as_secs_f64());
        float
    } else {
        let recorder = BinFileRecorder::<FullPrecisionSettings>::new();
        println!("loading {FIXTURE} (trained by this example; --train to retrain)");
        FloatCnn::<B>::new(device)
            .load_file(FIXTURE, &recorder, device)
            .expect("load the fixture")
    };
    let float_logits = float.valid().forward(x_test.clone());
    let float_acc = accuracy(float_logits.clone(), y_test.clone());
    println!("float test accuracy: {float_acc:.2} %");
    if write_fixture {
        let recorder = BinFileRecorder::<FullPrecisionSettings>::new();
        float
            .valid()
            .save_file(FIXTURE, &recorder)
            .expect("write the fixture");
        println!("wrote {FIXTURE}");
    }

    // 3. Convert to quantized layers
    println!("\n## 3. Convert to quantized layers");
    let calibration = train.images::<B::InnerBackend>(0..CALIBRATION, device);
    // AdaRound runs on the inference model (BatchNorm, if any, in inference mode).
    let quant = QuantCnn::from_float(
        &float.valid(),
        8,
        Granularity::PerAxis,
        ACTIVATION_BITS,
        calibration.clone(),
    );
    println!(
        "conv {:?} | separable dw {:?} pw {:?} | dense {:?}; activations {ACTIVATION_BITS} bits (max {:.2}, {:.2})",
        quant.conv.weight.dims(),
        quant.sep.weight_dw.dims(),
        quant.sep.weight.dims(),
        quant.fc.weight.dims(),
        quant.act1.max_value,
        quant.act2.max_value
    );
    println!("calibration: {CALIBRATION} unlabeled training images");

    // 4. Nearest rounding
    println!("\n## 4. Nearest rounding");
    let mut rows = Vec::new();
    for granularity in [Granularity::PerAxis, Granularity::PerTensor] {
        for scheme in SCHEMES {
            for bits in BITWIDTHS {
                let model = quant.clone().with_weights(bits, granularity, scheme);
                let logits = model.forward(x_test.clone());
                let scores = Scores::new(logits, y_test.clone(), float_logits.clone());
                println!(
                    "W{bits} {} {}: {:.2} % (agreement with float {:.2} %)",
                    granularity.name(),
                    scheme.name(),
                    scores.accuracy,
                    scores.agreement
                );
                rows.push((granularity, scheme, bits, scores));
            }
        }
    }

    // 5. AdaRound
    println!("\n## 5. AdaRound");
    let config = quickstart_config();
    let (order, samples) = order_arg(calibration.clone());
    let mut results = Vec::new();
    let mut reports: Vec<(String, AdaRoundReport)> = Vec::new();
    for (granularity, scheme, bits, nearest) in rows {
        let model = quant.clone().with_weights(bits, granularity, scheme);
        let (rounded, report) = AdaRound::new(config.clone())
            .run(&model, samples.clone(), |m, x| m.forward(x))
            .expect("AdaRound");
        let logits = rounded.forward(x_test.clone());
        let acc = Scores::new(logits, y_test.clone(), float_logits.clone());
        let weights = format!("W{bits} {} {}", granularity.name(), scheme.name());
        println!("{weights}: {:.1} s", report.seconds);
        for l in &report.layers {
            println!(
                "  {:<5} quantization error: {:.6} -> {:.6}   changed weights: {} / {}{}",
                l.name,
                l.err_before,
                l.err_final,
                l.changed(),
                l.weights,
                if l.kept_nearest {
                    "   (nearest kept)"
                } else {
                    ""
                }
            );
        }
        if let Some(check) = &report.model {
            println!("  {check}");
        }
        results.push((granularity, scheme, bits, nearest, acc, report.seconds));
        reports.push((weights, report));
    }

    // 6. Results
    println!("\n## 6. Results (test accuracy, {} images)", test.len());
    println!(
        "| weights | granularity | scale, grid | float | nearest | AdaRound | agreement nearest | agreement AdaRound | AdaRound time |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for (granularity, scheme, bits, nearest, ada, secs) in &results {
        println!(
            "| W{bits} | {} | {} | {float_acc:.2} % | {:.2} % | {:.2} % | {:.2} % | {:.2} % | {secs:.1} s |",
            granularity.name(),
            scheme.name(),
            nearest.accuracy,
            ada.accuracy,
            nearest.agreement,
            ada.agreement
        );
    }
    let json = serde_json::json!({
        "float_accuracy": float_acc,
        "calibration_order": order,
        "results": results.iter().map(|(granularity, scheme, b, n, a, s)| {
            result_json(*b, *granularity, *scheme, n, a, *s)
        }).collect::<Vec<_>>(),
        "reports": reports.iter().map(|(w, r)| serde_json::json!({ "weights": w, "report": r })).collect::<Vec<_>>(),
    });
    let report_path = out.join(report_name(order));
    std::fs::write(&report_path, serde_json::to_string_pretty(&json).unwrap()).unwrap();
    println!("\nreport: {}", report_path.display());
    if order > 0 {
        return;
    }
    let reference: Vec<_> = reports
        .iter()
        .filter(|(w, _)| w.ends_with("per-channel max"))
        .cloned()
        .collect();
    for path in write_charts(&out, &reference) {
        println!("chart:  {}", path.display());
    }
}

fn write_charts(out: &std::path::Path, reports: &[(String, AdaRoundReport)]) -> Vec<PathBuf> {
    let mut paths = Vec::new();
    // Per-layer error at each bitwidth, relative to nearest rounding (errors span 5 decades).
    let mut labels = Vec::new();
    let (mut before, mut after) = (Vec::new(), Vec::new());
    for (weights, report) in reports {
        let bits = weights.split(' ').next().unwrap_or_default();
        for l in &report.layers {
            labels.push(format!("{bits} {}", l.name));
            before.push(1.0);
            after.push(l.err_final / l.err_before);
        }
    }
    let chart = svg::bars(
        "Per-layer quantization error relative to nearest rounding",
        &labels,
        &[("nearest", before), ("AdaRound", after)],
        "MSE / MSE(nearest)",
    );
    let path = out.join("layer_errors.svg");
    std::fs::write(&path, chart).unwrap();
    paths.push(path);
    // Decimals of the Dense layer at the lowest bitwidth: mass moves to 0 and 1.
    if let Some((weights, report)) = reports.last() {
        let bits = weights.split(' ').next().unwrap_or_default();
        if let Some(layer) = report.layers.last() {
            let k = &layer.kernels[0];
            let chart = svg::histograms(
                &format!(
                    "{bits} {}: decimals h(alpha) before and after AdaRound",
                    layer.name
                ),
                &[
                    ("before (w * sf - floor)", &k.decimals_before),
                    ("after", &k.decimals_after),
                ],
            );
            let path = out.join("decimals.svg");
            std::fs::write(&path, chart).unwrap();
            paths.push(path);
        }
    }
    paths
}
