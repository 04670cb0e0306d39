//! A user-defined weight quantizer plugged into the layers of a model, then AdaRound on top.
//!
//! ```sh
//! cargo run --release --example custom_quantizer
//! ```
//!
//! The quantizer clips each output channel at a percentile of `|w|` instead of its maximum
//! (outliers then saturate, and the rest of the weights get a finer grid). It is one
//! function registered under a name; the layer's configuration stays plain, serializable data
//! (`{"kind": "Custom", "name": "percentile", ...}`).

use adaround::{core::register_quantizer, AdaRound, WeightQuantizer};
use adaround_examples::digits::{
    accuracy, quickstart_config, Digits, FloatCnn, Granularity, QuantCnn, FIXTURE,
};
use burn::{
    module::Module,
    record::{BinFileRecorder, FullPrecisionSettings},
};

type Backend = burn_ndarray::NdArray<f32>;

/// `sf = kmax / percentile(|w|, params[0])` per channel (rows of `weights`).
fn percentile(weights: &[f32], channels: usize, kmax: f64, params: &[f64]) -> Vec<f32> {
    let per = weights.len() / channels;
    (0..channels)
        .map(|c| {
            let mut row: Vec<f32> = weights[c * per..(c + 1) * per]
                .iter()
                .map(|w| w.abs())
                .collect();
            row.sort_by(f32::total_cmp);
            let rank = ((params[0] / 100.0) * (per - 1) as f64).round() as usize;
            (kmax / row[rank.min(per - 1)].max(1e-10) as f64) as f32
        })
        .collect()
}

fn main() {
    // 1. Register the quantizer's scale function once per process.
    register_quantizer("percentile", percentile);
    let q = WeightQuantizer::custom("percentile", 3, true, vec![99.0]).unwrap();
    println!(
        "## 1. A custom quantizer\n{}",
        serde_json::to_string(&q).unwrap()
    );

    // 2. The quickstart's float model and data.
    let device = Default::default();
    let recorder = BinFileRecorder::<FullPrecisionSettings>::new();
    let float = FloatCnn::<Backend>::new(&device)
        .load_file(FIXTURE, &recorder, &device)
        .unwrap();
    let (train, test) = Digits::load().split(450, 7);
    let x_test = test.images::<burn_ndarray::NdArray<f32>>(0..test.len(), &device);
    let y_test = test.labels::<burn_ndarray::NdArray<f32>>(0..test.len(), &device);
    let calibration = train.images::<Backend>(0..256, &device);
    println!(
        "\n## 2. Float model: {:.2} %",
        accuracy(float.forward(x_test.clone()), y_test.clone())
    );

    // 3. W3 with the max quantizer vs the custom one, nearest and AdaRound.
    let config = quickstart_config();
    println!("\n## 3. W3 test accuracy\n| quantizer | nearest | AdaRound |\n|---|---|---|");
    let base = QuantCnn::from_float(&float, 3, Granularity::PerAxis, 8, calibration.clone());
    let mut custom = base.clone();
    custom.conv.quantizer = q.clone().into();
    custom.sep.quantizer = q.clone().into();
    custom.fc.quantizer = q.into();
    for (name, model) in [("MaxPerAxis", base), ("percentile 99 (custom)", custom)] {
        let nearest = accuracy(model.forward(x_test.clone()), y_test.clone());
        let (rounded, _) = AdaRound::new(config.clone())
            .run(&model, calibration.clone(), |m, x| m.forward(x))
            .unwrap();
        let ada = accuracy(rounded.forward(x_test.clone()), y_test.clone());
        println!("| {name} | {nearest:.2} % | {ada:.2} % |");
    }
}
