//! Settings chosen on validation data: each candidate AdaRound configuration on the digits
//! CNN, scored on training images that calibration does not use (never on the test images
//! the quickstart reports).
//!
//! ```sh
//! cargo run --release --example choose
//! ```
//!
//! Calibration: training images 0..256 (as the quickstart); validation: training images
//! 256..1347. The float model saw the validation images in training, so its validation
//! accuracy is high; the comparison is between roundings of the same model.

use std::time::Instant;

use adaround::{adaround, SeparableStep};
use adaround_burn::digits::{
    accuracy, quickstart_config, Digits, FloatCnn, Granularity, QuantCnn, FIXTURE,
};
use burn::{
    module::Module,
    record::{BinFileRecorder, FullPrecisionSettings},
};

type B = burn_ndarray::NdArray<f32>;

fn main() {
    let device = Default::default();
    let (train, _test) = Digits::load().split(450, 7);
    let recorder = BinFileRecorder::<FullPrecisionSettings>::new();
    let float = FloatCnn::<B>::new(&device)
        .load_file(FIXTURE, &recorder, &device)
        .expect("the committed fixture loads");
    let calibration = train.images::<B>(0..256, &device);
    let (x_val, y_val) = (
        train.images::<B>(256..train.len(), &device),
        train.labels::<B>(256..train.len(), &device),
    );
    println!(
        "validation: {} training images not used for calibration; float {:.2} %\n",
        train.len() - 256,
        accuracy(float.forward(x_val.clone()), y_val.clone())
    );
    println!("| weights | nearest | separable | AdaRound | seconds |");
    println!("|---|---|---|---|---|");
    for granularity in [Granularity::PerAxis, Granularity::PerTensor] {
        for bits in [4, 3, 2] {
            let model = QuantCnn::from_float(&float, bits, granularity, 8, calibration.clone());
            let nearest = accuracy(model.forward(x_val.clone()), y_val.clone());
            for separable in [SeparableStep::Joint, SeparableStep::Split] {
                let config = quickstart_config().with_separable(separable);
                let start = Instant::now();
                let (rounded, _) =
                    adaround(&model, calibration.clone(), |m, x| m.forward(x), &config).unwrap();
                let seconds = start.elapsed().as_secs_f64();
                let acc = accuracy(rounded.forward(x_val.clone()), y_val.clone());
                println!(
                    "| W{bits} {granularity:?} | {nearest:.2} % | {separable:?} | {acc:.2} % | {seconds:.1} |"
                );
            }
        }
    }
}
