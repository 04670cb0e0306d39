//! The rounding methods side by side on the two small real-data models: the quickstart's
//! digits CNN (Conv2D, SeparableConv2D, Dense, 8-bit activations) and the pretrained USPS
//! classifier (Conv2D + BatchNorm folded, Dense, float activations), per channel at W4, W3
//! and W2 on two weight schemes.
//!
//! ```sh
//! cargo run --release --example methods
//! ```
//!
//! Per setting: nearest rounding and every candidate of `Candidate::methods` (AdaRound layer
//! by layer, GPTQ, each on the quantizer's scales and on SeqMSE's, and block reconstruction
//! over the whole network as one block, on both scales), all with
//! `AdaRoundConfig::recommended()` (the quickstart's settings). Each cell: test accuracy,
//! top-1 agreement with the float model, and the run's time. Calibration: the quickstart's 256
//! unlabeled training images; test: its 450 test images. Writes `out/methods/report.json`.
//! AIMET on the same models and grids: `benches/aimet_side_by_side.py` (docs/quality.md).

use std::time::Instant;

use adaround::{layers::probe::Flow, AdaRound, Candidate, Grid, Stage};
use adaround_examples::{
    digits::{quickstart_config, Digits, FloatCnn, Granularity, QuantCnn, Scheme, Scores, FIXTURE},
    usps::{images, QuantUsps, UspsNet, WEIGHTS},
};
use burn::{
    module::{AutodiffModule, Module},
    record::{BinFileRecorder, FullPrecisionSettings},
    tensor::{backend::Backend, Int, Tensor},
};
use burn_autodiff::Autodiff;

type B = burn_ndarray::NdArray<f32>;
type Ad = Autodiff<B>;

const SCHEMES: [Scheme; 2] = [Scheme::Max, Scheme::Mse(Grid::FullRange)];
const BITWIDTHS: [u32; 3] = [4, 3, 2];

/// A model of this example: its quantized form at a setting, and its forward pass.
trait Model<Bk: Backend>: Module<Bk> + Sized {
    fn forward(&self, x: Tensor<Bk, 4>) -> Tensor<Bk, 2>;
}

impl<Bk: Backend> Model<Bk> for QuantCnn<Bk> {
    fn forward(&self, x: Tensor<Bk, 4>) -> Tensor<Bk, 2> {
        QuantCnn::forward(self, x)
    }
}

impl<Bk: Backend> Model<Bk> for QuantUsps<Bk> {
    fn forward(&self, x: Tensor<Bk, 4>) -> Tensor<Bk, 2> {
        QuantUsps::forward(self, x)
    }
}

/// The whole forward pass as one stage: block reconstruction then optimises every layer of
/// the network together against the float network's logits.
fn whole<'a, Bk: Backend, M: Model<Bk> + 'a>() -> Vec<Stage<'a, Bk, M>> {
    vec![Box::new(|m: &M, x: Flow<Bk>| match x {
        Flow::Maps(x) => Flow::Rows(m.forward(x)),
        Flow::Rows(x) => panic!("the models take images, got rows {:?}", x.dims()),
    })]
}

/// The test images, their labels and the float model's logits on them.
struct Test {
    x: Tensor<B, 4>,
    y: Tensor<B, 1, Int>,
    float: Tensor<B, 2>,
}

/// One method's outcome at one setting.
#[derive(serde::Serialize)]
struct Cell {
    method: String,
    accuracy: f64,
    agreement: f64,
    output_error: f64,
    seconds: f64,
}

fn main() {
    adaround_examples::init_logging();
    let device = Default::default();
    let (train, test) = Digits::load().split(450, 7);
    let config = quickstart_config();
    let candidates = Candidate::methods(&config, true);
    let mut json = serde_json::Map::new();

    println!("## 1. The digits CNN (the quickstart's model, {FIXTURE})");
    let recorder = BinFileRecorder::<FullPrecisionSettings>::new();
    let float = FloatCnn::<B>::new(&device)
        .load_file(FIXTURE, &recorder, &device)
        .expect("load the digits model");
    let calibration = train.images::<B>(0..256, &device);
    let x = test.images::<B>(0..test.len(), &device);
    let digits = Test {
        float: float.forward(x.clone()),
        y: test.labels::<B>(0..test.len(), &device),
        x,
    };
    let base = QuantCnn::from_float(&float, 8, Granularity::PerAxis, 8, calibration.clone());
    let rows = table::<_, QuantCnn<Ad>>(&digits, &candidates, &calibration, |scheme, bits| {
        base.clone()
            .with_weights(bits, Granularity::PerAxis, scheme)
    });
    json.insert("digits".into(), rows.into());

    println!("\n## 2. The pretrained USPS classifier ({WEIGHTS}, BatchNorm folded)");
    let (float, _) = UspsNet::<B>::load(WEIGHTS, &device).expect("import the USPS model");
    let calibration = images::<B>(&train, 0..256, &device);
    let x = images::<B>(&test, 0..test.len(), &device);
    let usps = Test {
        float: float.forward(x.clone()),
        y: test.labels::<B>(0..test.len(), &device),
        x,
    };
    let rows = table::<_, QuantUsps<Ad>>(&usps, &candidates, &calibration, |scheme, bits| {
        QuantUsps::from_float(&float, &scheme.quantizer(bits, Granularity::PerAxis))
    });
    json.insert("usps".into(), rows.into());

    let out = std::path::Path::new("out/methods");
    std::fs::create_dir_all(out).expect("out/methods");
    let path = out.join("report.json");
    std::fs::write(&path, serde_json::to_string_pretty(&json).unwrap()).expect("write");
    println!("\nreport: {}", path.display());
}

/// Runs nearest rounding and every candidate at each setting of `model(scheme, bits)`, prints
/// the table and returns its rows as JSON. `MA` is the model's type on `Autodiff<B>`, for the
/// block reconstruction's stage.
fn table<M, MA>(
    test: &Test,
    candidates: &[Candidate],
    calibration: &Tensor<B, 4>,
    model: impl Fn(Scheme, u32) -> M,
) -> Vec<serde_json::Value>
where
    M: Model<B>,
    MA: Model<Ad> + AutodiffModule<Ad, InnerModule = M>,
{
    let names: Vec<_> = candidates.iter().map(|c| c.name.as_str()).collect();
    println!("test accuracy (top-1 agreement with the float model), time of the run\n");
    println!("| per channel | nearest | {} |", names.join(" | "));
    println!("|---|---|{}", "---|".repeat(names.len()));
    let mut rows = Vec::new();
    for (scheme, bits) in SCHEMES.iter().flat_map(|&s| BITWIDTHS.map(|b| (s, b))) {
        let quantized = model(scheme, bits);
        let nearest = score(quantized.forward(test.x.clone()), test);
        let mut cells = Vec::new();
        for candidate in candidates {
            let mut run = AdaRound::new(candidate.config.clone());
            if candidate.blocks {
                run = run
                    .with_stages(whole::<B, M>())
                    .with_blocks(whole::<Ad, MA>());
            }
            let t = Instant::now();
            let (rounded, _) = run
                .run(&quantized, calibration.clone(), |m: &M, x| m.forward(x))
                .unwrap_or_else(|e| panic!("{}: {e}", candidate.name));
            let seconds = t.elapsed().as_secs_f64();
            let s = score(rounded.forward(test.x.clone()), test);
            cells.push(Cell {
                method: candidate.name.clone(),
                accuracy: s.accuracy,
                agreement: s.agreement,
                output_error: s.output_error,
                seconds,
            });
        }
        let text: Vec<_> = cells
            .iter()
            .map(|c| {
                format!(
                    "{:.2} % ({:.2} %), {:.1} s",
                    c.accuracy, c.agreement, c.seconds
                )
            })
            .collect();
        println!(
            "| W{bits} {} | {:.2} % ({:.2} %) | {} |",
            scheme.name(),
            nearest.accuracy,
            nearest.agreement,
            text.join(" | ")
        );
        rows.push(serde_json::json!({
            "bits": bits, "scheme": scheme.name(),
            "nearest": {"accuracy": nearest.accuracy, "agreement": nearest.agreement,
                        "output_error": nearest.output_error},
            "methods": cells,
        }));
    }
    rows
}

fn score(logits: Tensor<B, 2>, test: &Test) -> Scores {
    Scores::new(logits, test.y.clone(), test.float.clone())
}
