//! Unit tests of the quantized layers.

use adaround_core::{AdaRoundParams, AdaRoundQuantizer, WeightQuantizer};
use burn::{
    module::Module,
    nn::{
        conv::{Conv2d, Conv2dConfig},
        LinearConfig, PaddingConfig2d,
    },
    record::{BinBytesRecorder, FullPrecisionSettings, Recorder},
    tensor::{backend::Backend, Distribution, ElementConversion, Tensor},
};

use crate::*;

type B = TestBackend;
type AD = TestAutodiffBackend;

fn device() -> burn::tensor::Device<B> {
    Default::default()
}

fn max_diff<Bk: Backend, const D: usize>(a: Tensor<Bk, D>, b: Tensor<Bk, D>) -> f32 {
    assert_eq!(a.dims(), b.dims());
    (a - b).abs().max().into_scalar().elem::<f32>()
}

/// Burn initializes parameters lazily: a clone taken before the first use would be
/// initialized again, differently. Materialize before cloning.
fn init<Bk: Backend, M: Module<Bk>>(module: M) -> M {
    let _ = module.devices();
    module
}

fn q4() -> WeightQuantizer {
    WeightQuantizer::max_per_axis(4).unwrap()
}

fn depthwise_pair<Bk: Backend>(
    c_in: usize,
    mult: usize,
    c_out: usize,
    pad: PaddingConfig2d,
) -> (Conv2d<Bk>, Conv2d<Bk>) {
    let d = Default::default();
    let dw = init(
        Conv2dConfig::new([c_in, c_in * mult], [3, 3])
            .with_groups(c_in)
            .with_padding(pad)
            .with_bias(false)
            .init(&d),
    );
    let pw = init(Conv2dConfig::new([c_in * mult, c_out], [1, 1]).init(&d));
    (dw, pw)
}

#[test]
fn should_match_float_layers_with_the_pass_through_quantizer() {
    B::seed(&device(), 1);
    let linear = init(LinearConfig::new(6, 5).init::<B>(&device()));
    let x = Tensor::<B, 3>::random([2, 4, 6], Distribution::Default, &device());
    let dense = QuantizedDense::from_linear(linear.clone(), WeightQuantizer::Float);
    assert!(max_diff(dense.forward(x.clone()), linear.forward(x)) < 1e-5);

    let conv = init(
        Conv2dConfig::new([3, 4], [3, 3])
            .with_stride([2, 1])
            .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
            .init::<B>(&device()),
    );
    let x = Tensor::<B, 4>::random([2, 3, 7, 6], Distribution::Default, &device());
    let qconv = QuantizedConv2d::from_conv2d(conv.clone(), WeightQuantizer::Float);
    assert!(max_diff(qconv.forward(x.clone()), conv.forward(x.clone())) < 1e-5);

    let (dw, pw) = depthwise_pair::<B>(3, 2, 5, PaddingConfig2d::Valid);
    let sep = QuantizedSeparableConv2d::from_conv2d_pair(
        dw.clone(),
        pw.clone(),
        WeightQuantizer::Float,
        WeightQuantizer::Float,
    );
    assert!(max_diff(sep.forward(x.clone()), pw.forward(dw.forward(x))) < 1e-5);
}

#[test]
fn should_fold_a_depthwise_bias_into_the_pointwise_bias() {
    let d = device();
    let dw = init(
        Conv2dConfig::new([3, 3], [3, 3])
            .with_groups(3)
            .init::<B>(&d),
    );
    let pw = init(Conv2dConfig::new([3, 4], [1, 1]).init::<B>(&d));
    let x = Tensor::<B, 4>::random([2, 3, 6, 6], Distribution::Default, &d);
    let sep = QuantizedSeparableConv2d::from_conv2d_pair(
        dw.clone(),
        pw.clone(),
        WeightQuantizer::Float,
        WeightQuantizer::Float,
    );
    assert!(max_diff(sep.forward(x.clone()), pw.forward(dw.forward(x))) < 1e-5);
}

#[test]
fn should_match_float_layers_run_on_weights_quantized_by_hand() {
    let d = device();
    let linear = init(LinearConfig::new(6, 5).init::<B>(&d));
    let x = Tensor::<B, 2>::random([4, 6], Distribution::Default, &d);
    let dense = QuantizedDense::from_linear(linear.clone(), q4());
    // By hand: per output channel (axis 1 of [d_in, d_out]), kmax = 7.
    let w = linear.weight.val();
    let sf = w.clone().abs().max_dim(0).powi_scalar(-1).mul_scalar(7.0);
    let wq = (w * sf.clone()).round().clamp(-7.0, 7.0) / sf;
    let expected = x.clone().matmul(wq) + linear.bias.as_ref().unwrap().val().unsqueeze();
    assert!(max_diff(dense.forward(x), expected) < 1e-5);

    let conv = init(Conv2dConfig::new([3, 4], [3, 3]).init::<B>(&d));
    let qconv = QuantizedConv2d::from_conv2d(conv.clone(), WeightQuantizer::max(3).unwrap());
    let k = conv.weight.val();
    let sf = 3.0 / k.clone().abs().max().into_scalar();
    let kq = k.mul_scalar(sf).round().clamp(-3.0, 3.0).div_scalar(sf);
    let mut hand = conv.clone();
    hand.weight = hand.weight.map(|_| kq);
    let x = Tensor::<B, 4>::random([2, 3, 6, 6], Distribution::Default, &d);
    assert!(max_diff(qconv.forward(x.clone()), hand.forward(x)) < 1e-5);
}

// Keras "same": total = max((ceil(n / s) - 1) * s + k - n, 0), top = total // 2, the rest at
// the bottom. x = np.arange(1, 17).reshape(4, 4), 3x3 kernel of ones, stride 2:
// total = 1 -> pad (0, 1): out = [[1+2+3+5+6+7+9+10+11, 3+4+7+8+11+12], [9+10+11+13+14+15, 11+12+15+16]]
//                              = [[54, 45], [72, 54]]     (symmetric padding would give 14 at [0, 0])
// x = np.arange(1, 26).reshape(5, 5), stride 1: total = 2 -> (1, 1): out[0,0] = 1+2+6+7 = 16,
// out[2,2] = 7+8+9+12+13+14+17+18+19 = 117.
#[test]
fn should_pad_same_like_keras_on_even_and_odd_sizes() {
    assert_eq!(same_padding(4, 3, 2, 1), (0, 1));
    assert_eq!(same_padding(5, 3, 1, 1), (1, 1));
    assert_eq!(same_padding(6, 4, 1, 1), (1, 2));
    assert_eq!(same_padding(5, 3, 1, 2), (2, 2));
    let d = device();
    let conv = |stride: usize| {
        let mut c = init(
            QuantizedConv2dConfig::new([1, 1], [3, 3])
                .with_stride([stride, stride])
                .with_padding(PaddingConfig2d::Same)
                .with_bias(false)
                .with_quantizer(WeightQuantizer::Float)
                .init::<B>(&d),
        );
        c.weight = c.weight.map(|w| w.ones_like());
        c
    };
    let x = Tensor::<B, 1, burn::tensor::Int>::arange(1..17, &d)
        .float()
        .reshape([1, 1, 4, 4]);
    let y: Vec<f32> = conv(2).forward(x).into_data().to_vec().unwrap();
    assert_eq!(y, vec![54.0, 45.0, 72.0, 54.0]);
    let x = Tensor::<B, 1, burn::tensor::Int>::arange(1..26, &d)
        .float()
        .reshape([1, 1, 5, 5]);
    let y: Vec<f32> = conv(1).forward(x).into_data().to_vec().unwrap();
    assert_eq!((y.len(), y[0], y[12]), (25, 16.0, 117.0));
}

#[test]
fn should_pass_gradients_to_inputs_and_through_the_ste_to_weights() {
    let d = Default::default();
    let conv = init(
        QuantizedConv2dConfig::new([2, 3], [3, 3])
            .with_quantizer(q4())
            .init::<AD>(&d),
    );
    let x = Tensor::<AD, 4>::random([2, 2, 5, 5], Distribution::Default, &d).require_grad();
    let grads = conv.forward(x.clone()).sum().backward();
    let gx = x.grad(&grads).expect("input gradient");
    let gw = conv
        .weight
        .grad(&grads)
        .expect("weight gradient through the STE");
    assert!(gx.abs().sum().into_scalar() > 0.0);
    // Straight-through: the weight gradient equals the float layer's (same input, sum loss).
    let x2 = x.clone().detach();
    let grads_float = conv.forward_float(x2).sum().backward();
    let gw_float = conv.weight.grad(&grads_float).unwrap();
    assert!(max_diff(gw, gw_float) < 1e-4);

    let sep = init(
        QuantizedSeparableConv2dConfig::new([2, 4], [3, 3])
            .with_quantizer(q4())
            .init::<AD>(&d),
    );
    let grads = sep.forward(x.clone()).sum().backward();
    assert!(sep.weight_dw.grad(&grads).is_some() && sep.weight.grad(&grads).is_some());
    let dense = init(
        QuantizedDenseConfig::new(5, 3)
            .with_quantizer(q4())
            .init::<AD>(&d),
    );
    let xr = Tensor::<AD, 2>::random([4, 5], Distribution::Default, &d).require_grad();
    let grads = dense.forward(xr.clone()).sum().backward();
    assert!(xr.grad(&grads).is_some() && dense.weight.grad(&grads).is_some());
}

#[test]
fn should_leave_weights_and_outputs_unchanged_when_quantizers_are_swapped() {
    let d = device();
    let conv = init(
        QuantizedConv2dConfig::new([3, 4], [3, 3])
            .with_quantizer(q4())
            .init::<B>(&d),
    );
    let x = Tensor::<B, 4>::random([2, 3, 6, 6], Distribution::Default, &d);
    let before = conv.forward(x.clone());
    let w_before = conv.weight.val();
    let layer = QuantizedLayer::Conv2d(conv.clone())
        .with_adaround(&AdaRoundParams::new())
        .unwrap();
    let QuantizedLayer::Conv2d(mut armed) = layer.set_training(false) else {
        unreachable!()
    };
    assert!(armed.quantizer.adaround().is_some());
    assert_eq!(max_diff(armed.weight.val(), w_before.clone()), 0.0);
    // AdaRound at init in evaluation mode is nearest rounding.
    assert!(max_diff(armed.forward(x.clone()), before.clone()) < 1e-5);
    // Put the original back: the same outputs, bit for bit.
    let original = armed.quantizer.quantizer().clone();
    armed.quantizer = original.into();
    assert_eq!(max_diff(armed.forward(x.clone()), before), 0.0);
    assert_eq!(max_diff(armed.weight.val(), w_before), 0.0);
}

#[test]
fn should_quantize_relu_outputs_to_levels() {
    // levels = 2^2 - 1 = 3, step = 3 / 3 = 1: y = clip(ceil(x - 0.5), 0, 3)
    let config = QuantizedReLUConfig::new()
        .with_bitwidth(2)
        .with_max_value(3.0);
    let relu = config.init::<B>();
    let x = Tensor::<B, 1>::from_floats([-1.0, 0.2, 0.6, 1.5, 2.7, 9.0], &device());
    let y: Vec<f32> = relu.forward(x).into_data().to_vec().unwrap();
    assert_eq!(y, vec![0.0, 0.0, 1.0, 1.0, 3.0, 3.0]);
    // Straight-through gradient inside the range, zero where clipped.
    let x = Tensor::<AD, 1>::from_floats([-1.0, 0.6, 1.5, 9.0], &Default::default()).require_grad();
    let grads = config.init::<AD>().forward(x.clone()).sum().backward();
    let g: Vec<f32> = x.grad(&grads).unwrap().into_data().to_vec().unwrap();
    assert_eq!(g, vec![0.0, 1.0, 1.0, 0.0]);
}

#[test]
#[should_panic = "QuantizedDense expects 6 input features, got 5"]
fn should_panic_on_wrong_dense_features() {
    let dense = QuantizedDenseConfig::new(6, 2).init::<B>(&device());
    dense.forward(Tensor::<B, 2>::zeros([3, 5], &device()));
}

#[test]
#[should_panic = "QuantizedDense expects an input of rank >= 2"]
fn should_panic_on_rank_1_dense_input() {
    let dense = QuantizedDenseConfig::new(6, 2).init::<B>(&device());
    dense.forward(Tensor::<B, 1>::zeros([6], &device()));
}

#[test]
#[should_panic = "QuantizedConv2d expects 3 input channels, got 2"]
fn should_panic_on_wrong_conv_channels() {
    let conv = QuantizedConv2dConfig::new([3, 4], [3, 3]).init::<B>(&device());
    conv.forward(Tensor::<B, 4>::zeros([1, 2, 5, 5], &device()));
}

#[test]
#[should_panic = "QuantizedSeparableConv2d expects 4 input channels, got 3"]
fn should_panic_on_wrong_separable_channels() {
    let sep = QuantizedSeparableConv2dConfig::new([4, 4], [3, 3]).init::<B>(&device());
    sep.forward(Tensor::<B, 4>::zeros([1, 3, 5, 5], &device()));
}

#[test]
#[should_panic = "QuantizedDense expects a valid quantizer, got Max { bitwidth: 0 }"]
fn should_panic_on_a_dense_quantizer_built_with_bitwidth_0() {
    QuantizedDenseConfig::new(4, 2)
        .with_quantizer(WeightQuantizer::Max { bitwidth: 0 })
        .init::<B>(&device());
}

#[test]
#[should_panic = "QuantizedConv2d expects a valid quantizer"]
fn should_panic_on_a_conv_quantizer_built_with_a_negative_threshold() {
    QuantizedConv2dConfig::new([2, 2], [3, 3])
        .with_quantizer(WeightQuantizer::Std {
            bitwidth: 4,
            threshold: -1.0,
        })
        .init::<B>(&device());
}

#[test]
#[should_panic = "QuantizedSeparableConv2d expects a valid quantizer, got MaxPerAxis { bitwidth: 17 }"]
fn should_panic_on_a_depthwise_quantizer_built_with_bitwidth_17() {
    QuantizedSeparableConv2dConfig::new([2, 4], [3, 3])
        .with_quantizer_dw(Some(WeightQuantizer::MaxPerAxis { bitwidth: 17 }))
        .init::<B>(&device());
}

#[test]
fn should_refuse_relu_records_with_invalid_values() {
    for bad in [
        r#"{"bitwidth":0,"max_value":6.0}"#,
        r#"{"bitwidth":17,"max_value":6.0}"#,
        r#"{"bitwidth":4,"max_value":0.0}"#,
        r#"{"bitwidth":4,"max_value":-1.0}"#,
    ] {
        assert!(
            serde_json::from_str::<QuantizedReLURecord>(bad).is_err(),
            "{bad}"
        );
    }
    let good: QuantizedReLURecord =
        serde_json::from_str(r#"{"bitwidth":4,"max_value":6.0}"#).unwrap();
    assert_eq!((good.bitwidth, good.max_value), (4, 6.0));
}

fn roundtrip<M: Module<B>>(module: M, fresh: M) -> M {
    let recorder = BinBytesRecorder::<FullPrecisionSettings>::default();
    let bytes = recorder.record(module.into_record(), ()).unwrap();
    fresh.load_record(recorder.load(bytes, &device()).unwrap())
}

#[test]
fn should_round_trip_every_layer_kind_through_a_record() {
    let d = device();
    let x = Tensor::<B, 4>::random([2, 3, 6, 6], Distribution::Default, &d);
    let xr = Tensor::<B, 2>::random([2, 6], Distribution::Default, &d);

    let dense = init(
        QuantizedDenseConfig::new(6, 3)
            .with_quantizer(WeightQuantizer::std(3, 2.0).unwrap())
            .init::<B>(&d),
    );
    let loaded = roundtrip(dense.clone(), QuantizedDenseConfig::new(6, 3).init(&d));
    assert_eq!(loaded.quantizer.quantizer(), dense.quantizer.quantizer());
    assert_eq!(max_diff(loaded.forward(xr.clone()), dense.forward(xr)), 0.0);

    let conv = init(
        QuantizedConv2dConfig::new([3, 4], [3, 3])
            .with_quantizer(q4())
            .init::<B>(&d),
    );
    let loaded = roundtrip(
        conv.clone(),
        QuantizedConv2dConfig::new([3, 4], [3, 3]).init(&d),
    );
    assert_eq!(loaded.quantizer.quantizer(), &q4());
    assert_eq!(
        max_diff(loaded.forward(x.clone()), conv.forward(x.clone())),
        0.0
    );

    // A separable conv with AdaRound in its slots (evaluation mode) loads into plain slots.
    let sep = init(
        QuantizedSeparableConv2dConfig::new([3, 5], [3, 3])
            .with_quantizer(q4())
            .with_quantizer_dw(Some(WeightQuantizer::max(3).unwrap()))
            .init::<B>(&d),
    );
    let QuantizedLayer::SeparableConv2d(armed) = QuantizedLayer::SeparableConv2d(sep)
        .with_adaround(&AdaRoundParams::new())
        .unwrap()
        .set_training(false)
    else {
        unreachable!()
    };
    let loaded = roundtrip(
        armed.clone(),
        QuantizedSeparableConv2dConfig::new([3, 5], [3, 3]).init(&d),
    );
    let ada: &AdaRoundQuantizer<B> = loaded
        .quantizer_dw
        .adaround()
        .expect("AdaRound state restored");
    assert_eq!(ada.quantizer, WeightQuantizer::max(3).unwrap());
    assert!(!ada.is_training());
    assert_eq!(
        max_diff(loaded.forward(x.clone()), armed.forward(x.clone())),
        0.0
    );

    // The activation's bitwidth and calibrated range are part of the record.
    let relu = QuantizedReLUConfig::new()
        .with_bitwidth(3)
        .with_max_value(0.37)
        .init();
    let loaded = roundtrip(relu.clone(), QuantizedReLUConfig::new().init());
    assert_eq!(loaded, relu);
    assert_eq!(max_diff(loaded.forward(x.clone()), relu.forward(x)), 0.0);
}

#[test]
fn should_copy_the_pointwise_quantizer_to_the_depthwise_slot_by_default() {
    let sep = QuantizedSeparableConv2dConfig::new([3, 5], [3, 3])
        .with_quantizer(q4())
        .init::<B>(&device());
    assert_eq!(sep.quantizer_dw.quantizer(), &q4());
}

/// A BatchNorm with non-trivial statistics and affine parameters.
fn trained_bn(c: usize) -> burn::nn::BatchNorm<B> {
    use burn::module::{Param, RunningState};
    let mut bn = burn::nn::BatchNormConfig::new(c).init::<B>(&device());
    let r = |d| Tensor::<B, 1>::random([c], d, &device());
    bn.gamma = Param::from_tensor(r(Distribution::Uniform(0.5, 2.0)));
    bn.beta = Param::from_tensor(r(Distribution::Normal(0.0, 1.0)));
    bn.running_mean = RunningState::new(r(Distribution::Normal(0.0, 1.0)));
    bn.running_var = RunningState::new(r(Distribution::Uniform(0.1, 3.0)));
    bn
}

#[test]
fn should_fold_batch_norm_exactly_into_every_layer_kind() {
    B::seed(&device(), 21);
    let x4 = Tensor::<B, 4>::random([2, 4, 7, 7], Distribution::Normal(0.0, 1.0), &device());
    let x2 = Tensor::<B, 2>::random([9, 6], Distribution::Normal(0.0, 1.0), &device());
    let float = WeightQuantizer::Float;

    let bn = trained_bn(5);
    let conv = init(
        Conv2dConfig::new([4, 5], [3, 3])
            .with_bias(false)
            .init::<B>(&device()),
    );
    let expected = bn.forward(conv.forward(x4.clone()));
    let folded = conv.clone().fold_batch_norm(&bn).unwrap();
    assert!(max_diff(folded.forward(x4.clone()), expected.clone()) < 1e-5);
    let quantized = QuantizedConv2d::from_conv2d(conv, float.clone()).fold_batch_norm(&bn);
    assert!(max_diff(quantized.unwrap().forward(x4.clone()), expected.clone()) < 1e-5);

    let (dw, pw) = depthwise_pair::<B>(4, 2, 5, PaddingConfig2d::Same);
    let sep = QuantizedSeparableConv2d::from_conv2d_pair(dw, pw, float.clone(), float.clone());
    let expected = bn.forward(sep.forward(x4.clone()));
    let folded = sep.fold_batch_norm(&bn).unwrap();
    assert!(max_diff(folded.forward(x4.clone()), expected) < 1e-5);

    let bn1 = trained_bn(3);
    let linear = init(LinearConfig::new(6, 3).init::<B>(&device()));
    // BatchNorm over features: rows as [n, features, 1].
    let norm = |y: Tensor<B, 2>| bn1.forward(y.unsqueeze_dim::<3>(2)).squeeze_dim::<2>(2);
    let expected = norm(linear.forward(x2.clone()));
    let folded = linear.clone().fold_batch_norm(&bn1).unwrap();
    assert!(max_diff(folded.forward(x2.clone()), expected.clone()) < 1e-5);
    let quantized = QuantizedDense::from_linear(linear, float).fold_batch_norm(&bn1);
    assert!(max_diff(quantized.unwrap().forward(x2), expected) < 1e-5);
}

#[test]
fn should_refuse_to_fold_a_mismatched_or_armed_layer() {
    let bn = trained_bn(5);
    let conv = QuantizedConv2dConfig::new([4, 6], [3, 3]).init::<B>(&device());
    assert_eq!(
        conv.clone().fold_batch_norm(&bn).unwrap_err(),
        FoldError::Channels { layer: 6, norm: 5 }
    );
    let bn = trained_bn(6);
    let armed = QuantizedLayer::Conv2d(conv)
        .with_adaround(&AdaRoundParams::new())
        .unwrap();
    let QuantizedLayer::Conv2d(armed) = armed else {
        unreachable!()
    };
    assert_eq!(
        armed.fold_batch_norm(&bn).unwrap_err(),
        FoldError::AdaRoundArmed
    );
}

/// Statistics without a finite affine map are refused, naming the channel, on every layer
/// kind; so is a fold that overflows the kernel.
#[test]
fn should_refuse_batch_norm_statistics_without_a_finite_map() {
    use burn::module::RunningState;
    let conv = || QuantizedConv2dConfig::new([4, 6], [3, 3]).init::<B>(&device());
    let with = |var: f32, epsilon: f64| {
        let mut bn = trained_bn(6);
        let mut values = bn.running_var.value().into_data().to_vec::<f32>().unwrap();
        values[2] = var;
        bn.running_var = RunningState::new(Tensor::from_floats(values.as_slice(), &device()));
        bn.epsilon = epsilon;
        bn
    };
    // A NaN epsilon spoils every channel: the first is named.
    for (var, epsilon, first) in [(0.0, 0.0, 2), (-1.0, 1e-5, 2), (1.0, f64::NAN, 0)] {
        let bn = with(var, epsilon);
        let err = conv().fold_batch_norm(&bn).unwrap_err();
        match err {
            FoldError::Statistics { channel, .. } => assert_eq!(channel, first, "{var} {epsilon}"),
            other => panic!("expected Statistics, got {other:?}"),
        }
        let linear = init(LinearConfig::new(3, 6).init::<B>(&device()));
        match linear.fold_batch_norm(&bn).unwrap_err() {
            FoldError::Statistics { channel, .. } => assert_eq!(channel, first),
            other => panic!("expected Statistics, got {other:?}"),
        }
    }
    // A tiny variance: a finite map whose scale overflows the kernel.
    let bn = with(1e-44, 0.0);
    let mut layer = conv();
    layer.weight = layer.weight.map(|w| w.mul_scalar(1e30));
    assert_eq!(
        layer.fold_batch_norm(&bn).unwrap_err(),
        FoldError::NonFinite { channel: 2 }
    );
}

#[test]
fn should_split_and_join_a_separable_conv_without_changing_its_output() {
    B::seed(&device(), 22);
    let x = Tensor::<B, 4>::random([2, 4, 9, 8], Distribution::Normal(0.0, 1.0), &device());
    let sep = init(
        QuantizedSeparableConv2dConfig::new([4, 6], [3, 3])
            .with_depth_multiplier(2)
            .with_stride([2, 1])
            .with_padding(PaddingConfig2d::Same)
            .with_quantizer(q4())
            .init::<B>(&device()),
    );
    let expected = sep.forward(x.clone());
    let (dw, pw) = sep.clone().split();
    assert_eq!(dw.groups, 4);
    assert!(max_diff(pw.forward(dw.forward(x.clone())), expected.clone()) < 1e-5);
    let joined = QuantizedSeparableConv2d::join(dw, pw);
    assert!(max_diff(joined.forward(x), expected) < 1e-6);
}

#[test]
fn kernel_roles_are_typed_and_serialize_as_their_names() {
    let sep: QuantizedSeparableConv2d<B> = QuantizedSeparableConv2dConfig::new([4, 6], [3, 3])
        .with_quantizer(q4())
        .init(&device());
    let dense: QuantizedDense<B> = QuantizedDenseConfig::new(4, 3)
        .with_quantizer(q4())
        .init(&device());
    let roles = |layer: QuantizedLayer<B>| -> Vec<(KernelRole, usize)> {
        layer
            .kernels()
            .iter()
            .map(|k| (k.role, k.weight.shape().num_elements()))
            .collect()
    };
    assert_eq!(
        roles(QuantizedLayer::SeparableConv2d(sep.clone())),
        [
            (KernelRole::Depthwise, 4 * 9),
            (KernelRole::Pointwise, 6 * 4)
        ]
    );
    assert_eq!(
        roles(QuantizedLayer::Dense(dense)),
        [(KernelRole::Kernel, 12)]
    );
    // The finalize report names its kernels by role, in kernel order.
    let (_, changes) = QuantizedLayer::SeparableConv2d(sep)
        .with_adaround(&AdaRoundParams::new())
        .unwrap()
        .finalize(true);
    let names: Vec<KernelRole> = changes.iter().map(|c| c.kernel).collect();
    assert_eq!(names, [KernelRole::Depthwise, KernelRole::Pointwise]);
    // JSON (reports, integer exports) keeps the names of the string form.
    for (role, name) in [
        (KernelRole::Kernel, "kernel"),
        (KernelRole::Depthwise, "depthwise"),
        (KernelRole::Pointwise, "pointwise"),
    ] {
        assert_eq!(serde_json::to_string(&role).unwrap(), format!("\"{name}\""));
        assert_eq!(
            serde_json::from_str::<KernelRole>(&format!("\"{name}\"")).unwrap(),
            role
        );
        assert_eq!(role.to_string(), name);
    }
    assert!(serde_json::from_str::<KernelRole>("\"bias\"").is_err());
}

/// The matrix form reproduces the layer: `X W^T + b` on the rows is the float forward, the
/// positions are the rows' count, the Gram matrix is `X^T X`, and the matrix layout of the
/// kernel round-trips.
#[test]
fn should_reproduce_the_float_forward_from_the_matrix_form() {
    B::seed(&device(), 11);
    let check = |layer: QuantizedLayer<B>, x: probe::Flow<B>| {
        let m = layer.matrix().expect("Dense and Conv2D have a matrix form");
        let y = layer.forward_float_flow(x.clone());
        let (rows, targets) = m.rows(&x, &y);
        let [groups, c_g, k] = m.matrix_dims();
        let positions = m.positions(&x.dims());
        assert_eq!(rows.dims(), [groups, positions, k]);
        assert_eq!(targets.dims(), [groups, positions, c_g]);
        let bias = m.bias().map_or_else(
            || targets.zeros_like(),
            |b| b.reshape([groups, 1, c_g]) + targets.zeros_like(),
        );
        let product = rows.clone().matmul(m.float_matrix().swap_dims(1, 2)) + bias;
        assert!(max_diff(product, targets) < 1e-4, "{:?}", layer.kind());
        let sums = rows.clone().sum_dim(1);
        let gram = rows.clone().swap_dims(1, 2).matmul(rows);
        let (m_gram, m_sums) = m.gram(&x);
        assert!(max_diff(m_gram, gram) < 1e-3, "{:?}", layer.kind());
        assert!(max_diff(m_sums, sums) < 1e-3, "{:?}", layer.kind());
        let kernel = &layer.kernels()[0];
        let w = kernel.weight.clone();
        assert_eq!(
            max_diff(m.to_kernel(m.to_matrix(w.clone())), w.clone()),
            0.0
        );
        // The delta is the quantization error of the kernel, in the matrix layout.
        let quantized = kernel.slot.apply(w, kernel.axis);
        let error = m.to_matrix(quantized) - m.float_matrix();
        assert!(error.clone().abs().max().into_scalar().elem::<f32>() > 0.0);
        assert!(max_diff(m.delta_matrix(), error) < 1e-6);
    };
    let dense = QuantizedDenseConfig::new(6, 5)
        .with_quantizer(q4())
        .init::<B>(&device());
    let x = Tensor::<B, 2>::random([7, 6], Distribution::Normal(0.0, 1.0), &device());
    check(QuantizedLayer::Dense(dense), probe::Flow::Rows(x));
    let x = Tensor::<B, 4>::random([2, 4, 9, 8], Distribution::Normal(0.0, 1.0), &device());
    for (padding, stride, dilation, groups) in [
        (PaddingConfig2d::Valid, [1, 1], [1, 1], 1),
        (PaddingConfig2d::Same, [2, 2], [1, 1], 2),
        (PaddingConfig2d::Same, [1, 1], [2, 2], 4),
        (PaddingConfig2d::Explicit(1, 2, 0, 1), [2, 1], [1, 1], 1),
    ] {
        let conv = QuantizedConv2dConfig::new([4, 8], [3, 3])
            .with_padding(padding)
            .with_stride(stride)
            .with_dilation(dilation)
            .with_groups(groups)
            .with_quantizer(q4())
            .init::<B>(&device());
        check(QuantizedLayer::Conv2d(conv), probe::Flow::Maps(x.clone()));
    }
    let sep = QuantizedSeparableConv2dConfig::new([4, 6], [3, 3]).init::<B>(&device());
    assert!(QuantizedLayer::SeparableConv2d(sep).matrix().is_none());
}

#[test]
fn should_shift_the_bias_of_a_layer_that_has_one_and_refuse_one_that_has_none() {
    let dense = QuantizedLayer::Dense(init(
        QuantizedDenseConfig::new(3, 2)
            .with_quantizer(q4())
            .init::<B>(&device()),
    ));
    let (id, before) = dense.bias().expect("a bias by default");
    let delta = Tensor::<B, 1>::from_floats([0.5, -1.0], &device());
    let (shifted, had) = dense.clone().shift_bias(delta.clone());
    assert!(had);
    let (same_id, after) = shifted.bias().unwrap();
    assert_eq!(id, same_id, "the parameter keeps its id");
    assert_eq!(max_diff(after, before.clone() + delta.clone()), 0.0);
    assert_eq!(shifted.param_values().len(), 2, "kernel and bias");
    let kernel_diff = max_diff(
        shifted.kernel_values()[0].1.clone(),
        dense.kernel_values()[0].1.clone(),
    );
    assert_eq!(kernel_diff, 0.0, "the kernel is unchanged");

    let no_bias = QuantizedLayer::Dense(init(
        QuantizedDenseConfig::new(3, 2)
            .with_bias(false)
            .with_quantizer(q4())
            .init::<B>(&device()),
    ));
    assert!(no_bias.bias().is_none());
    let (refused, had) = no_bias.shift_bias(delta);
    assert!(!had, "no bias to shift");
    assert!(refused.bias().is_none());
    assert_eq!(refused.param_values().len(), 1);
}
