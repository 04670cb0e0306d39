//! A model trained by someone else, end to end: the USPS digit classifier of the `ccexam`
//! package on PyPI (PyTorch, Conv2D + BatchNorm, MIT licence), imported from its `.pth`
//! file, BatchNorms folded, AdaRounded at W4/W3/W2, evaluated on real handwritten digits.
//!
//! ```sh
//! cargo run --release --example pretrained
//! ```
//!
//! The weights are committed (`examples/data/pretrained/usps.pth`; `fetch.sh` there fetches
//! them again from PyPI and checks them); nothing is downloaded at run time. The model was
//! trained on USPS (16x16); the images here are the UCI digits (8x8, other writers)
//! upsampled to 16x16, so the float model's accuracy is a transfer accuracy. Calibration:
//! 256 unlabeled training images; test: the quickstart's 450 test images. Weights only are
//! quantized (per output channel); activations stay float.

use adaround::{adaround, AdaRoundReport, Grid};
use adaround_examples::{
    digits::{accuracy, quickstart_config, Digits, Granularity, Scheme},
    usps::{images, QuantUsps, UspsNet, WEIGHTS},
};
use burn::tensor::Tensor;

type B = burn_ndarray::NdArray<f32>;

fn agreement(a: Tensor<B, 2>, b: Tensor<B, 2>) -> f64 {
    let n = a.dims()[0] as f64;
    let same: i64 = a.argmax(1).equal(b.argmax(1)).int().sum().into_scalar();
    100.0 * same as f64 / n
}

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

    println!("\n## 3. Fold BatchNorm, quantize (per channel), AdaRound");
    let config = quickstart_config();
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
        let (rounded, report) =
            adaround(&model, calibration.clone(), |m, x| m.forward(x), &config).expect("AdaRound");
        let ada = rounded.forward(x_test.clone());
        let weights = format!("W{bits} {}", scheme.name());
        rows.push((
            weights.clone(),
            accuracy(nearest.clone(), y_test.clone()),
            agreement(nearest, float_logits.clone()),
            accuracy(ada.clone(), y_test.clone()),
            agreement(ada, float_logits.clone()),
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
    for (weights, nearest, agree_n, ada, agree_a, seconds) in &rows {
        println!(
            "| {weights} | {float_acc:.2} % | {nearest:.2} % | **{ada:.2} %** | {agree_n:.2} % | {agree_a:.2} % | {seconds:.1} s |"
        );
    }
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
