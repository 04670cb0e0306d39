//! Settings chosen on validation data: each candidate AdaRound configuration and weight
//! scheme on the digits CNN, scored on training images that calibration does not use (never
//! on the test images the quickstart reports).
//!
//! ```sh
//! cargo run --release --example choose            # schemes x iterations, split separable step
//! cargo run --release --example choose -- --joint # split vs joint separable step
//! ```
//!
//! Calibration: training images 0..256 (as the quickstart); validation: training images
//! 256..1347. The float model saw the validation images in training, so its validation
//! accuracy is high; the comparison is between roundings of the same model.

use std::time::Instant;

use adaround::{adaround, AdaRoundConfig, SeparableStep};
use adaround_examples::digits::{
    accuracy, quickstart_config, short_config, Digits, FloatCnn, Granularity, QuantCnn, Scheme,
    FIXTURE,
};
use burn::{
    module::Module,
    record::{BinFileRecorder, FullPrecisionSettings},
    tensor::{Int, Tensor},
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
    let val = (
        train.images::<B>(256..train.len(), &device),
        train.labels::<B>(256..train.len(), &device),
    );
    println!(
        "validation: {} training images not used for calibration; float {:.2} %\n",
        train.len() - 256,
        accuracy(float.forward(val.0.clone()), val.1.clone())
    );
    let base = QuantCnn::from_float(&float, 8, Granularity::PerAxis, 8, calibration.clone());
    if std::env::args().any(|a| a == "--joint") {
        separable_steps(&base, &calibration, &val);
    } else {
        schemes(&base, &calibration, &val);
    }
}

/// One AdaRound run: validation accuracy and seconds.
fn score(
    model: &QuantCnn<B>,
    calibration: &Tensor<B, 4>,
    (x, y): &(Tensor<B, 4>, Tensor<B, 1, Int>),
    config: &AdaRoundConfig,
) -> (f64, f64) {
    let start = Instant::now();
    let (rounded, _) = adaround(model, calibration.clone(), |m, x| m.forward(x), config).unwrap();
    let seconds = start.elapsed().as_secs_f64();
    (accuracy(rounded.forward(x.clone()), y.clone()), seconds)
}

/// Weight schemes (scale rule and grid) at 1 000 and 4 000 iterations per layer.
fn schemes(
    base: &QuantCnn<B>,
    calibration: &Tensor<B, 4>,
    val: &(Tensor<B, 4>, Tensor<B, 1, Int>),
) {
    let (short, long) = (short_config(), quickstart_config());
    println!("| weights | scheme | nearest | AdaRound 1000 it | AdaRound 4000 it | seconds (1000 / 4000) |");
    println!("|---|---|---|---|---|---|");
    for granularity in [Granularity::PerAxis, Granularity::PerTensor] {
        for bits in [4, 3, 2] {
            for scheme in Scheme::ALL {
                let model = base.clone().with_weights(bits, granularity, scheme);
                let nearest = accuracy(model.forward(val.0.clone()), val.1.clone());
                let (short, s1) = score(&model, calibration, val, &short);
                let (long, s2) = score(&model, calibration, val, &long);
                println!(
                    "| W{bits} {granularity:?} | {} | {nearest:.2} % | {short:.2} % | {long:.2} % | {s1:.1} / {s2:.1} |",
                    scheme.name()
                );
            }
        }
    }
}

/// The separable convolution as one problem (joint) or two (split).
fn separable_steps(
    base: &QuantCnn<B>,
    calibration: &Tensor<B, 4>,
    val: &(Tensor<B, 4>, Tensor<B, 1, Int>),
) {
    println!("| weights | nearest | separable | AdaRound | seconds |");
    println!("|---|---|---|---|---|");
    for granularity in [Granularity::PerAxis, Granularity::PerTensor] {
        for bits in [4, 3, 2] {
            let model = base.clone().with_weight_bits(bits, granularity);
            let nearest = accuracy(model.forward(val.0.clone()), val.1.clone());
            for separable in [SeparableStep::Joint, SeparableStep::Split] {
                let config = short_config().with_separable(separable);
                let (acc, seconds) = score(&model, calibration, val, &config);
                println!(
                    "| W{bits} {granularity:?} | {nearest:.2} % | {separable:?} | {acc:.2} % | {seconds:.1} |"
                );
            }
        }
    }
}
