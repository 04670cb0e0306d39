//! Weights in, weights out, resume: the digits CNN from a PyTorch-layout SafeTensors file to
//! AdaRounded 4-bit weights as JSON integers and as Burn quantized tensors.
//!
//! ```sh
//! cargo run --release --example interop
//! ```
//!
//! 1. Writes the committed float model as a SafeTensors file in PyTorch's names and layouts
//!    (what a PyTorch user would hand over), then loads it with `WeightImport`.
//! 2. AdaRound at W4 (per tensor), checkpointed after each layer and stopped after one layer,
//!    then resumed from the checkpoint; the result equals an uninterrupted run.
//! 3. Integer export (JSON) and Burn-native `Q8S` tensors, then a save/load of the record.
//!
//! Files go to `out/interop/`.

use adaround::{
    export_integers,
    import::{Layout, WeightImport},
    layers::AdaRoundLayer,
    store::{BurnToPyTorchAdapter, ModuleSnapshot, SafetensorsStore},
    AdaRound, RunConfig,
};
use adaround_examples::digits::{
    accuracy, quickstart_config, Digits, FloatCnn, Granularity, QuantCnn, FIXTURE,
};
use burn::{
    module::Module,
    record::{BinFileRecorder, FullPrecisionSettings},
    tensor::{quantization::QuantValue, Tensor},
};

type Backend = burn_ndarray::NdArray<f32>;
type Inference = burn_ndarray::NdArray<f32>;

const OUT: &str = "out/interop";

fn main() {
    std::fs::create_dir_all(OUT).unwrap();
    let device = Default::default();
    let (train, test) = Digits::load().split(450, 7);
    let x_test = test.images::<Inference>(0..test.len(), &device);
    let y_test = test.labels::<Inference>(0..test.len(), &device);
    let calibration = train.images::<Backend>(0..256, &device);

    // 1. A PyTorch-layout file: Linear weights as [out, in], the separable pair under `sep.`.
    let recorder = BinFileRecorder::<FullPrecisionSettings>::new();
    let trained = FloatCnn::<Backend>::new(&device)
        .load_file(FIXTURE, &recorder, &device)
        .unwrap();
    let file = format!("{OUT}/digits_float.safetensors");
    let mut store = SafetensorsStore::from_file(&file)
        .with_to_adapter(BurnToPyTorchAdapter)
        .with_key_remapping(r"^(depthwise|pointwise)\.", "sep.$1.")
        .overwrite(true);
    trained.save_into(&mut store).unwrap();

    // Read it back into a fresh model, renaming `sep.*` to the model's fields.
    let mut store = SafetensorsStore::from_file(&file)
        .with_key_remapping(r"^sep\.(depthwise|pointwise)\.", "$1.");
    let (float, report) = WeightImport::new(Layout::PyTorch)
        .load(&FloatCnn::<Backend>::new(&device), &mut store)
        .unwrap();
    println!("## 1. Weights in: {file}");
    println!("| model tensor | file tensor (after key remapping) | shape |\n|---|---|---|");
    for l in &report.loaded {
        println!("| {} | {} | {:?} |", l.tensor, l.from, l.shape);
    }
    let float_acc = accuracy(float.forward(x_test.clone()), y_test.clone());
    let trained_acc = accuracy(trained.forward(x_test.clone()), y_test.clone());
    println!(
        "Float accuracy: {float_acc:.2} % (the model that wrote the file: {trained_acc:.2} %)"
    );

    // 2. AdaRound at W4, one layer per call, resumed from the checkpoint.
    let model = QuantCnn::from_float(&float, 4, Granularity::PerTensor, 8, calibration.clone());
    let nearest = accuracy(model.forward(x_test.clone()), y_test.clone());
    let checkpoint = format!("{OUT}/checkpoint");
    let _ = std::fs::remove_dir_all(&checkpoint);
    let config = quickstart_config();
    let boxed = config.clone().with_run(
        RunConfig::new()
            .with_checkpoint(Some(checkpoint.clone()))
            .with_stop_after(Some(1)),
    );
    println!("\n## 2. AdaRound W4, checkpointed in {checkpoint}");
    let mut calls = 0;
    let (rounded, report) = loop {
        calls += 1;
        let (m, r) = AdaRound::new(boxed.clone())
            .run(&model, calibration.clone(), |m, x| m.forward(x))
            .unwrap();
        println!("call {calls}: {} / 3 layers done", r.layers.len());
        if r.layers.len() == 3 {
            break (m, r);
        }
    };
    let (straight, _) = AdaRound::new(config.clone())
        .run(&model, calibration.clone(), |m, x| m.forward(x))
        .unwrap();
    let same = rounded
        .forward(x_test.clone())
        .equal(straight.forward(x_test.clone()))
        .all()
        .into_scalar();
    let ada = accuracy(rounded.forward(x_test.clone()), y_test.clone());
    println!(
        "Accuracy: nearest {nearest:.2} %, AdaRound {ada:.2} % ({} of {} weights rounded \
         otherwise than nearest); resumed run identical to an uninterrupted one: {same}",
        report.changed(),
        report.weights()
    );
    assert!(
        same,
        "the resumed run must end where the uninterrupted run ends"
    );

    // 3. Weights out: integers as JSON, and Burn quantized tensors.
    let sample = Tensor::<Inference, 4>::zeros([1, 1, 8, 8], &device);
    let integers = export_integers(&rounded, sample, |m, x| m.forward(x)).unwrap();
    let json = format!("{OUT}/integers.json");
    std::fs::write(&json, integers.to_json()).unwrap();
    println!("\n## 3. Weights out\nIntegers: {json}");
    for k in &integers.kernels {
        let max = k.integers.iter().map(|q| q.abs()).max().unwrap_or(0);
        let bias = k
            .bias
            .as_ref()
            .map_or(String::new(), |b| format!(", bias of {}", b.len()));
        println!(
            "- {} {}: shape {:?}, {} bits, |q| <= {max}{bias}",
            k.layer, k.kernel, k.shape, k.bitwidth
        );
    }

    let mut native = rounded.clone();
    native.conv = native.conv.into_burn_quantized(QuantValue::Q8S).unwrap();
    native.sep = native.sep.into_burn_quantized(QuantValue::Q8S).unwrap();
    native.fc = native.fc.into_burn_quantized(QuantValue::Q8S).unwrap();
    let native_logits = native.forward(x_test.clone());
    let rounded_logits = rounded.forward(x_test.clone());
    let diff: f32 = (native_logits.clone() - rounded_logits.clone())
        .abs()
        .max()
        .into_scalar();
    let agree: i64 = native_logits
        .clone()
        .argmax(1)
        .equal(rounded_logits.argmax(1))
        .int()
        .sum()
        .into_scalar();
    let native_acc = accuracy(native_logits, y_test.clone());
    let record = format!("{OUT}/digits_w4_q8s");
    native.clone().save_file(&record, &recorder).unwrap();
    let reloaded = QuantCnn::<Inference>::from_float(
        &FloatCnn::new(&device),
        4,
        Granularity::PerTensor,
        8,
        x_test.clone(),
    )
    .load_file(&record, &recorder, &device)
    .unwrap();
    let reloaded_acc = accuracy(reloaded.forward(x_test.clone()), y_test);
    println!(
        "Burn Q8S tensors ({:?}):\n- accuracy {native_acc:.2} %, same prediction as the \
         AdaRounded model on {agree} / {} images, largest logit difference {diff:.1e} (weights \
         one f32 rounding apart can move an 8-bit activation by a step)\n- saved to \
         {record}.bin, loaded into a fresh model: {reloaded_acc:.2} %",
        native.conv.weight.val().dtype(),
        test.len()
    );
}
