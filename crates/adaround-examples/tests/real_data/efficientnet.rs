//! EfficientNet-Lite0 float parity with PyTorch: the imported model (and the same model with
//! BatchNorm folded into the project's quantized layers, quantizers off) gives PyTorch's
//! logits on four committed 224x224 crops (`benches/efficientnet/parity_fixture.py` wrote
//! them with torch). Needs the weights from `examples/data/efficientnet/fetch.sh`: ignored
//! by the plain test command, run by `.ci/run` after the fetch (`-- --ignored`).

use std::io::Read;

use adaround::WeightQuantizer;
use adaround_examples::efficientnet::{
    normalise, weights_path, weights_path_in, EfficientNetLite0, QuantEfficientNet,
};
use burn::tensor::Tensor;

type B = burn_ndarray::NdArray<f32>;

const ROOT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../..");
const FIXTURE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/data/efficientnet_parity"
);

fn fixture() -> (Vec<u8>, Vec<Vec<f32>>) {
    let mut pixels = Vec::new();
    let gz = std::fs::File::open(format!("{FIXTURE}.bin.gz")).unwrap();
    flate2::read::GzDecoder::new(gz)
        .read_to_end(&mut pixels)
        .unwrap();
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(format!("{FIXTURE}.json")).unwrap()).unwrap();
    let logits = serde_json::from_value(json["logits"].clone()).unwrap();
    (pixels, logits)
}

fn max_abs_diff(ours: Tensor<B, 2>, theirs: &[Vec<f32>]) -> f32 {
    let ours = ours.into_data().to_vec::<f32>().unwrap();
    let theirs: Vec<f32> = theirs.iter().flatten().copied().collect();
    assert_eq!(ours.len(), theirs.len());
    ours.iter()
        .zip(&theirs)
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()))
}

#[test]
#[ignore = "needs the weights: bash crates/adaround-examples/examples/data/efficientnet/fetch.sh"]
fn should_give_pytorchs_logits_float_and_folded() {
    // Tests run in the crate's folder: the fetched data lie under the repository root.
    let path = match std::env::var_os("ADAROUND_EFFICIENTNET_DATA") {
        Some(_) => weights_path(),
        None => weights_path_in(&std::path::Path::new(ROOT).join("out/data/efficientnet")),
    };
    let path = path.unwrap_or_else(|e| panic!("{e}"));
    let device = Default::default();
    let (float, report) = EfficientNetLite0::<B>::load(&path, &device).unwrap();
    assert_eq!(
        report.loaded.len(),
        247,
        "every tensor but num_batches_tracked"
    );
    let (pixels, torch) = fixture();
    let x = normalise::<B>(&pixels, &device);
    assert_eq!(x.dims(), [4, 3, 224, 224]);
    let logits = float.forward(x.clone());
    let torch_top1: Vec<i64> = torch
        .iter()
        .map(|row| {
            let best = row
                .iter()
                .enumerate()
                .max_by(|a, b| a.1.total_cmp(b.1))
                .unwrap();
            best.0 as i64
        })
        .collect();
    assert_eq!(
        torch_top1,
        [285, 967, 657, 698],
        "the fixture's classes (cat, espresso, ...)"
    );
    let top1 = logits
        .clone()
        .argmax(1)
        .into_data()
        .to_vec::<i64>()
        .unwrap();
    assert_eq!(top1, torch_top1);
    let diff = max_abs_diff(logits, &torch);
    assert!(
        diff <= 1e-3,
        "float model: logits differ from PyTorch's by {diff}"
    );

    let folded = QuantEfficientNet::from_float(&float, &WeightQuantizer::Float, None);
    let diff = max_abs_diff(folded.forward(x), &torch);
    assert!(
        diff <= 1e-3,
        "folded model: logits differ from PyTorch's by {diff}"
    );
}
