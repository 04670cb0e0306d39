//! Weights in (SafeTensors and PyTorch files, Burn / PyTorch / Keras layouts) and out
//! (Burn-native quantized tensors). Fixtures and the scripts that wrote them: `tests/data/`.

use adaround::{
    import::{ImportError, Layout, WeightImport},
    layers::{
        AdaRoundLayer, KernelRole, NativeQuantError, QuantizedConv2d, QuantizedConv2dConfig,
        QuantizedDense, QuantizedDenseConfig, QuantizedReLU, QuantizedReLUConfig,
        QuantizedSeparableConv2d, QuantizedSeparableConv2dConfig,
    },
    store::{ModuleSnapshot, PytorchStore, SafetensorsStore},
    AdaRound, AdaRoundConfig, ReconstructionLoss, Schedule, WeightQuantizer,
};
use burn::{
    module::Module,
    nn::PaddingConfig2d,
    record::{BinBytesRecorder, FullPrecisionSettings, Recorder},
    tensor::{backend::Backend, quantization::QuantValue, DType, Distribution, Tensor, TensorData},
};
use safetensors::{serialize, tensor::TensorView, Dtype};

type B = burn_ndarray::NdArray<f32>;

const DATA: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data");

fn values<const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.into_data().convert::<f32>().to_vec().unwrap()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// The Keras model of `tests/data/keras_tiny.py`, from our layers (float quantizers).
#[derive(Module, Debug)]
struct KerasTiny<B: Backend> {
    sep: QuantizedSeparableConv2d<B>,
    conv: QuantizedConv2d<B>,
    dil: QuantizedConv2d<B>,
    dense: QuantizedDense<B>,
}

impl<B: Backend> KerasTiny<B> {
    fn new(device: &B::Device) -> Self {
        let f = WeightQuantizer::Float;
        Self {
            sep: QuantizedSeparableConv2dConfig::new([3, 4], [3, 3])
                .with_depth_multiplier(2)
                .with_stride([2, 2])
                .with_padding(PaddingConfig2d::Same)
                .with_quantizer(f.clone())
                .init(device),
            conv: QuantizedConv2dConfig::new([4, 5], [3, 2])
                .with_stride([2, 1])
                .with_padding(PaddingConfig2d::Same)
                .with_quantizer(f.clone())
                .init(device),
            dil: QuantizedConv2dConfig::new([5, 6], [3, 3])
                .with_dilation([2, 2])
                .with_padding(PaddingConfig2d::Same)
                .with_quantizer(f.clone())
                .init(device),
            dense: QuantizedDenseConfig::new(6, 3)
                .with_quantizer(f)
                .init(device),
        }
    }

    fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 2> {
        let h = self.dil.forward(self.conv.forward(self.sep.forward(x)));
        self.dense.forward(h.mean_dim(3).mean_dim(2).flatten(1, 3))
    }
}

fn read_io(name: &str) -> Tensor<B, 4> {
    let mut store = SafetensorsStore::from_file(format!("{DATA}/keras_tiny_io.safetensors"));
    let snapshot = adaround::store::ModuleStore::get_snapshot(&mut store, name)
        .unwrap()
        .unwrap();
    let data = snapshot.to_data().unwrap();
    let mut shape = data.shape.to_vec();
    shape.resize(4, 1);
    let values: Vec<f32> = data.convert::<f32>().to_vec().unwrap();
    Tensor::from_data(TensorData::new(values, shape), &Default::default())
}

#[test]
fn should_give_keras_outputs_after_loading_keras_weights_with_same_padding_and_separable_convs() {
    let device = Default::default();
    let model = KerasTiny::<B>::new(&device);
    let mut store = SafetensorsStore::from_file(format!("{DATA}/keras_tiny.safetensors"));
    let (model, report) = WeightImport::new(Layout::Keras)
        .load(&model, &mut store)
        .unwrap();
    assert_eq!(report.loaded.len(), 9);
    assert!(report.unused.is_empty());
    let sep = report
        .loaded
        .iter()
        .find(|l| l.tensor == "sep.weight_dw")
        .unwrap();
    assert_eq!(sep.from, "sep.depthwise_kernel");
    assert_eq!(sep.shape, vec![6, 1, 3, 3]);

    // Keras is channels-last: [2, 7, 7, 3] -> [2, 3, 7, 7].
    let input = read_io("input").permute([0, 3, 1, 2]);
    let expected = values(read_io("output"));
    let output = values(model.forward(input));
    let diff = max_abs_diff(&output, &expected);
    assert!(
        diff < 1e-5,
        "outputs differ from Keras by {diff}: {output:?} vs {expected:?}"
    );
}

#[derive(Module, Debug)]
struct TorchTiny<B: Backend> {
    fc: QuantizedDense<B>,
    conv: QuantizedConv2d<B>,
}

fn torch_tiny(device: &burn::tensor::Device<B>) -> TorchTiny<B> {
    TorchTiny {
        fc: QuantizedDenseConfig::new(4, 3).init(device),
        conv: QuantizedConv2dConfig::new([1, 2], [3, 3]).init(device),
    }
}

#[test]
fn should_load_a_pytorch_state_dict_with_linear_weights_transposed() {
    let device = Default::default();
    let model = torch_tiny(&device);
    let mut store = PytorchStore::from_file(format!("{DATA}/torch_tiny.pt"));
    let (model, report) = WeightImport::new(Layout::PyTorch)
        .load(&model, &mut store)
        .unwrap();
    assert_eq!(report.loaded.len(), 4);

    // fc.weight[o, i] = o + i / 10 in PyTorch's [out, in]; Burn's is [in, out].
    let fc = values(model.fc.weight.val());
    for i in 0..4 {
        for o in 0..3 {
            assert_eq!(fc[i * 3 + o], o as f32 + i as f32 / 10.0, "fc[{i}, {o}]");
        }
    }
    assert_eq!(values(model.fc.bias.unwrap().val()), vec![0.0, -1.0, -2.0]);
    let conv = values(model.conv.weight.val());
    let expected: Vec<f32> = (0..18).map(|k| 0.01 * k as f32).collect();
    assert!(max_abs_diff(&conv, &expected) < 1e-7);
    assert_eq!(values(model.conv.bias.unwrap().val()), vec![0.5, -0.5]);
}

#[test]
fn should_round_trip_a_model_through_a_safetensors_file_in_burn_layout() {
    let device = Default::default();
    let model = torch_tiny(&device);
    let mut out = SafetensorsStore::from_bytes(None);
    model.save_into(&mut out).unwrap();
    let bytes = out.get_bytes().unwrap();

    let fresh = torch_tiny(&device);
    let mut store = SafetensorsStore::from_bytes(Some(bytes));
    let (loaded, report) = WeightImport::new(Layout::Burn)
        .load(&fresh, &mut store)
        .unwrap();
    assert_eq!(report.loaded.len(), 4);
    assert_eq!(
        values(loaded.fc.weight.val()),
        values(model.fc.weight.val())
    );
    assert_eq!(
        values(loaded.conv.weight.val()),
        values(model.conv.weight.val())
    );
    assert_ne!(values(fresh.fc.weight.val()), values(model.fc.weight.val()));
}

/// A SafeTensors file in memory: `(name, shape, values)` as f32, or raw bytes with a dtype.
fn file(tensors: &[(&str, Vec<usize>, Vec<f32>)]) -> SafetensorsStore {
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(n, s, v)| {
            let b = v.iter().flat_map(|x| x.to_le_bytes()).collect();
            (n.to_string(), s.clone(), b)
        })
        .collect();
    let views: Vec<(String, TensorView)> = bytes
        .iter()
        .map(|(n, s, b)| {
            (
                n.clone(),
                TensorView::new(Dtype::F32, s.clone(), b).unwrap(),
            )
        })
        .collect();
    SafetensorsStore::from_bytes(Some(serialize(views, None).unwrap()))
}

fn good_tensors() -> Vec<(&'static str, Vec<usize>, Vec<f32>)> {
    vec![
        ("fc.weight", vec![3, 4], vec![0.5; 12]),
        ("fc.bias", vec![3], vec![0.1; 3]),
        ("conv.weight", vec![2, 1, 3, 3], vec![0.2; 18]),
        ("conv.bias", vec![2], vec![0.3; 2]),
    ]
}

fn load(tensors: Vec<(&str, Vec<usize>, Vec<f32>)>, import: WeightImport) -> Option<ImportError> {
    let model = torch_tiny(&Default::default());
    import.load(&model, &mut file(&tensors)).err()
}

#[test]
fn should_refuse_wrong_shapes_missing_names_non_finite_values_and_unused_tensors_by_name() {
    let pytorch = || WeightImport::new(Layout::PyTorch);
    assert_eq!(load(good_tensors(), pytorch()), None);

    // fc.weight in Burn's layout where PyTorch's is expected.
    let mut t = good_tensors();
    t[0] = ("fc.weight", vec![4, 3], vec![0.5; 12]);
    let error = load(t, pytorch()).unwrap();
    assert_eq!(
        error,
        ImportError::Shape {
            tensor: "fc.weight".into(),
            from: "fc.weight".into(),
            layout: Layout::PyTorch,
            found: vec![4, 3],
            expected: vec![4, 3],
            detail: ", i.e. [3, 4] in the file".into(),
        }
    );
    assert!(error.to_string().contains("fc.weight"), "{error}");

    let mut t = good_tensors();
    t.remove(3);
    assert_eq!(
        load(t, pytorch()),
        Some(ImportError::Missing {
            tensor: "conv.bias".into(),
            tried: vec!["conv.bias".into()],
        })
    );

    let mut t = good_tensors();
    t[1].2[2] = f32::NAN;
    match load(t, pytorch()) {
        Some(ImportError::NonFinite {
            tensor,
            index,
            value,
            ..
        }) => {
            assert_eq!((tensor.as_str(), index), ("fc.bias", 2));
            assert!(value.is_nan());
        }
        other => panic!("expected NonFinite, got {other:?}"),
    }

    let mut t = good_tensors();
    t.push(("fc.extra", vec![1], vec![1.0]));
    assert_eq!(
        load(t.clone(), pytorch()),
        Some(ImportError::Unused(vec!["fc.extra".into()]))
    );
    let model = torch_tiny(&Default::default());
    let (_, report) = pytorch()
        .allow_unused(true)
        .load(&model, &mut file(&t))
        .unwrap();
    assert_eq!(report.unused, vec!["fc.extra".to_string()]);

    // A Keras kernel of the wrong rank names the tensor and the file layout it expects.
    let keras = vec![
        ("fc.kernel", vec![4, 3], vec![0.5; 12]),
        ("fc.bias", vec![3], vec![0.1; 3]),
        ("conv.kernel", vec![18], vec![0.2; 18]),
        ("conv.bias", vec![2], vec![0.3; 2]),
    ];
    match load(keras, WeightImport::new(Layout::Keras)) {
        Some(ImportError::Shape { tensor, detail, .. }) => {
            assert_eq!(tensor, "conv.weight");
            assert_eq!(detail, ", i.e. [3, 3, 1, 2] in the file");
        }
        other => panic!("expected Shape, got {other:?}"),
    }

    let missing_file = WeightImport::new(Layout::Burn).load(
        &torch_tiny(&Default::default()),
        &mut SafetensorsStore::from_file(format!("{DATA}/no_such_file.safetensors")),
    );
    assert!(matches!(missing_file, Err(ImportError::Store(_))));
}

#[test]
fn should_refuse_integer_tensors_as_weights() {
    let ints: Vec<u8> = (0..12i32).flat_map(|x| x.to_le_bytes()).collect();
    let floats: Vec<(String, Vec<usize>, Vec<u8>)> = good_tensors()
        .into_iter()
        .skip(1)
        .map(|(n, s, v)| {
            (
                n.to_string(),
                s,
                v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            )
        })
        .collect();
    let mut views = vec![(
        "fc.weight".to_string(),
        TensorView::new(Dtype::I32, vec![3, 4], &ints).unwrap(),
    )];
    for (n, s, b) in &floats {
        views.push((
            n.clone(),
            TensorView::new(Dtype::F32, s.clone(), b).unwrap(),
        ));
    }
    let mut store = SafetensorsStore::from_bytes(Some(serialize(views, None).unwrap()));
    let result =
        WeightImport::new(Layout::PyTorch).load(&torch_tiny(&Default::default()), &mut store);
    assert!(
        matches!(&result, Err(ImportError::DType { tensor, dtype: DType::I32, .. }) if tensor == "fc.weight"),
        "{:?}",
        result.map(|_| ())
    );
}

/// Conv -> ReLU -> conv -> pooled dense, for AdaRound and conversion to Burn's quantized tensors.
#[derive(Module, Debug)]
struct Small<B: Backend> {
    conv1: QuantizedConv2d<B>,
    act: QuantizedReLU<B>,
    conv2: QuantizedConv2d<B>,
    fc: QuantizedDense<B>,
}

impl<B: Backend> Small<B> {
    fn new(bits: u32, device: &B::Device) -> Self {
        Self {
            conv1: QuantizedConv2dConfig::new([2, 8], [3, 3])
                .with_padding(PaddingConfig2d::Same)
                .with_quantizer(WeightQuantizer::max_per_axis(bits).unwrap())
                .init(device),
            act: QuantizedReLUConfig::new().with_bitwidth(8).init(),
            conv2: QuantizedConv2dConfig::new([8, 8], [3, 3])
                .with_padding(PaddingConfig2d::Same)
                .with_quantizer(WeightQuantizer::max_per_axis(bits).unwrap())
                .init(device),
            fc: QuantizedDenseConfig::new(8, 4)
                .with_quantizer(WeightQuantizer::max(bits).unwrap())
                .init(device),
        }
    }

    fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 2> {
        let h = self
            .act
            .forward(self.conv2.forward(self.act.forward(self.conv1.forward(x))));
        self.fc.forward(h.mean_dim(3).mean_dim(2).flatten(1, 3))
    }

    fn into_burn_quantized(self, value: QuantValue) -> Result<Self, NativeQuantError> {
        Ok(Self {
            conv1: self.conv1.into_burn_quantized(value)?,
            act: self.act,
            conv2: self.conv2.into_burn_quantized(value)?,
            fc: self.fc.into_burn_quantized(value)?,
        })
    }
}

fn assert_burn_quantized_like<const D: usize>(native: Tensor<B, D>, kernel: Tensor<B, D>) {
    assert!(
        matches!(native.dtype(), DType::QFloat(_)),
        "not a Burn quantized tensor: {:?}",
        native.dtype()
    );
    let deq = values(native.dequantize());
    let ours = values(kernel);
    for (d, w) in deq.iter().zip(&ours) {
        // One f32 rounding apart at most: Burn computes q * (1 / sf), the layer q / sf.
        assert!((d - w).abs() <= w.abs() * f32::EPSILON, "{d} vs {w}");
    }
}

#[test]
fn should_run_adarounded_layers_on_burn_quantized_tensors_with_the_same_integers_and_outputs() {
    let _seed = seeded();
    let device = Default::default();
    let model = Small::<B>::new(4, &device);
    let samples = Tensor::<B, 4>::random([64, 2, 6, 6], Distribution::Normal(0.0, 1.0), &device);
    let config = AdaRoundConfig::new(Schedule::epochs(5))
        .with_batch_size(Some(32))
        .with_loss(ReconstructionLoss::ChannelSum);
    let (rounded, _) = AdaRound::new(config.clone())
        .run(&model, samples, |m, x| m.forward(x))
        .unwrap();

    let native = rounded
        .clone()
        .into_burn_quantized(QuantValue::Q8S)
        .unwrap();
    assert!(matches!(
        native.conv1.quantizer.quantizer(),
        WeightQuantizer::Float
    ));
    assert_burn_quantized_like(native.conv1.weight.val(), rounded.conv1.quantized_weight());
    assert_burn_quantized_like(native.conv2.weight.val(), rounded.conv2.quantized_weight());
    assert_burn_quantized_like(native.fc.weight.val(), rounded.fc.quantized_weight());

    // The integers are the layer's own: 4-bit, so |q| <= 7 although stored as Q8S.
    let export =
        adaround::export_integers(&rounded, Tensor::zeros([1, 2, 6, 6], &device), |m, x| {
            m.forward(x)
        })
        .unwrap();
    let conv1 = &export.kernels[0];
    let deq = values(native.conv1.weight.val().dequantize());
    for (k, (q, d)) in conv1.integers.iter().zip(&deq).enumerate() {
        let sf = conv1.scale_factors[k / (2 * 9)];
        assert!(q.abs() <= 7);
        assert_eq!((d * sf).round() as i32, *q, "weight {k}");
    }

    let x = Tensor::<B, 4>::random([4, 2, 6, 6], Distribution::Normal(0.0, 1.0), &device);
    let ours = values(rounded.forward(x.clone()));
    let burn = values(native.forward(x.clone()));
    assert!(max_abs_diff(&ours, &burn) < 1e-5, "{ours:?} vs {burn:?}");

    // A saved record keeps the quantized tensors and the activation's range.
    let recorder = BinBytesRecorder::<FullPrecisionSettings>::new();
    let bytes = recorder.record(native.clone().into_record(), ()).unwrap();
    let record = recorder.load(bytes, &device).unwrap();
    let mut fresh = Small::<B>::new(2, &device);
    fresh.act = QuantizedReLUConfig::new()
        .with_bitwidth(3)
        .with_max_value(0.5)
        .init();
    let reloaded = fresh.load_record(record);
    assert_eq!(
        reloaded.act, native.act,
        "the activation's range is in the record"
    );
    assert!(matches!(
        reloaded.conv1.weight.val().dtype(),
        DType::QFloat(_)
    ));
    assert_eq!(values(reloaded.forward(x)), burn);
}

#[test]
fn should_refuse_kernels_burn_cannot_hold() {
    let device = Default::default();
    let per_column = QuantizedDenseConfig::new(8, 4)
        .with_quantizer(WeightQuantizer::max_per_axis(4).unwrap())
        .init::<B>(&device);
    assert_eq!(
        per_column.into_burn_quantized(QuantValue::Q8S).unwrap_err(),
        NativeQuantError::NotBlocks {
            kernel: KernelRole::Kernel,
            shape: vec![8, 4],
        }
    );
    let float = QuantizedDenseConfig::new(8, 4)
        .with_quantizer(WeightQuantizer::Float)
        .init::<B>(&device);
    assert_eq!(
        float.into_burn_quantized(QuantValue::Q8S).unwrap_err(),
        NativeQuantError::NotQuantizing {
            kernel: KernelRole::Kernel
        }
    );
    let eight_bit = QuantizedConv2dConfig::new([2, 4], [3, 3])
        .with_quantizer(WeightQuantizer::max(8).unwrap())
        .init::<B>(&device);
    assert_eq!(
        eight_bit.into_burn_quantized(QuantValue::Q4S).unwrap_err(),
        NativeQuantError::Range {
            kernel: KernelRole::Kernel,
            bitwidth: 8,
            value: QuantValue::Q4S,
        }
    );
    // The full-range grid's -2^(b-1) needs a full-range Burn type.
    let full_range = || {
        QuantizedConv2dConfig::new([2, 4], [3, 3])
            .with_quantizer(WeightQuantizer::mse(2, true, adaround::Grid::FullRange).unwrap())
            .init::<B>(&device)
    };
    assert_eq!(
        full_range()
            .into_burn_quantized(QuantValue::Q2S)
            .unwrap_err(),
        NativeQuantError::Range {
            kernel: KernelRole::Kernel,
            bitwidth: 2,
            value: QuantValue::Q2S,
        }
    );
    // Burn's quantized tensors have no zero point.
    let asymmetric = QuantizedConv2dConfig::new([2, 4], [3, 3])
        .with_quantizer(WeightQuantizer::mse(4, true, adaround::Grid::Asymmetric).unwrap())
        .init::<B>(&device);
    assert_eq!(
        asymmetric.into_burn_quantized(QuantValue::Q8F).unwrap_err(),
        NativeQuantError::Asymmetric {
            kernel: KernelRole::Kernel
        }
    );
    let conv = full_range();
    let expected = conv.quantized_weight();
    let native = conv.into_burn_quantized(QuantValue::Q8F).unwrap();
    assert_burn_quantized_like(native.weight.val(), expected);
    let sep = QuantizedSeparableConv2dConfig::new([3, 4], [3, 3])
        .with_quantizer(WeightQuantizer::max_per_axis(8).unwrap())
        .init::<B>(&device);
    // Read before cloning: a lazily initialized parameter initializes again in a clone.
    let (dw, pw) = sep.quantized_weights();
    let native = sep.into_burn_quantized(QuantValue::Q8S).unwrap();
    assert_burn_quantized_like(native.weight_dw.val(), dw);
    assert_burn_quantized_like(native.weight.val(), pw);
}

/// Seeds the backend (tests in this binary that draw random numbers run one at a time).
fn seeded() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let guard = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    <B as Backend>::seed(&Default::default(), 7);
    guard
}
