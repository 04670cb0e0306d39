//! Unit tests of the quantizers, the AdaRound quantizer and the schedules.

use burn::{
    module::Module,
    optim::{AdamConfig, GradientsParams, Optimizer},
    tensor::{backend::Backend, Tensor, TensorData, Tolerance},
};
use proptest::prelude::*;

use crate::*;

type B = TestBackend;
type AD = TestAutodiffBackend;

fn device() -> burn::tensor::Device<B> {
    Default::default()
}

/// Dense-shaped kernel `[d_input = 2, d_output = 3]`.
fn dense_w<Bk: Backend>() -> Tensor<Bk, 2> {
    Tensor::from_floats(
        [[0.5, -1.2, 0.03], [-0.25, 0.6, -0.09]],
        &Default::default(),
    )
}

fn assert_close<const D: usize>(got: Tensor<B, D>, expected: TensorData) {
    got.into_data()
        .assert_approx_eq::<f32>(&expected, Tolerance::absolute(1e-5));
}

fn max_abs<Bk: Backend, const D: usize>(t: Tensor<Bk, D>) -> f32 {
    use burn::tensor::ElementConversion;
    t.abs().max().into_scalar().elem::<f32>()
}

// import numpy as np
// w = np.array([[0.5, -1.2, 0.03], [-0.25, 0.6, -0.09]], dtype=np.float32); kmax = 7
// sf = kmax / np.abs(w).max()                                  # 5.833333
// np.clip(np.round(w * sf), -kmax, kmax) / sf
#[test]
fn should_quantize_per_tensor_with_max() {
    let q = WeightQuantizer::max(4).unwrap();
    let sf = q.scale_factor(dense_w::<B>(), 1).unwrap();
    assert_eq!(sf.dims(), [1, 1]);
    assert_close(sf, TensorData::from([[5.833333f32]]));
    assert_close(
        q.quantize(dense_w::<B>(), 1),
        TensorData::from([
            [0.5142857f32, -1.2, 0.0],
            [-0.17142858, 0.6857143, -0.17142858],
        ]),
    );
}

// sf = kmax / np.maximum(np.abs(w).max(axis=0), 1e-10)        # [14, 5.833333, 77.77777]
// np.clip(np.round(w * sf), -kmax, kmax) / sf                 # -3.5 -> -4, 3.5 -> 4 (half to even)
#[test]
fn should_quantize_per_output_channel_with_max_and_round_half_to_even() {
    let q = WeightQuantizer::max_per_axis(4).unwrap();
    let sf = q.scale_factor(dense_w::<B>(), 1).unwrap();
    assert_eq!(sf.dims(), [1, 3]);
    assert_close(sf, TensorData::from([[14.0f32, 5.833333, 77.77777]]));
    assert_close(
        q.quantize(dense_w::<B>(), 1),
        TensorData::from([
            [0.5f32, -1.2, 0.025714288],
            [-0.2857143, 0.6857143, -0.09000001],
        ]),
    );
}

// sf = kmax / (3 * w.std())                                    # 3.9501872 (population std)
// sf_axis = kmax / (3 * w.std(axis=0))                         # [6.2222223, 2.5925925, 38.888885]
#[test]
fn should_quantize_with_std_per_tensor_and_per_axis() {
    let q = WeightQuantizer::std(4, DEFAULT_STD_THRESHOLD).unwrap();
    assert_close(
        q.scale_factor(dense_w::<B>(), 1).unwrap(),
        TensorData::from([[3.9501872f32]]),
    );
    assert_close(
        q.quantize(dense_w::<B>(), 1),
        TensorData::from([
            [0.5063051f32, -1.2657628, 0.0],
            [-0.25315255, 0.5063051, 0.0],
        ]),
    );
    let q = WeightQuantizer::std_per_axis(4, 3.0).unwrap();
    assert_close(
        q.scale_factor(dense_w::<B>(), 1).unwrap(),
        TensorData::from([[6.2222223f32, 2.5925925, 38.888885]]),
    );
    assert_close(
        q.quantize(dense_w::<B>(), 1),
        TensorData::from([
            [0.48214284f32, -1.1571429, 0.025714288],
            [-0.32142857, 0.7714286, -0.077142864],
        ]),
    );
}

// k = np.array([0.3, -0.1, 0.05, 0.2], dtype=np.float32).reshape(2, 1, 1, 2)   # [c_out, c_in, kh, kw]
// sf = 3 / np.abs(k).reshape(2, -1).max(axis=1)                # [10, 15] (bitwidth 3)
// (np.clip(np.round(k * sf[:, None, None, None]), -3, 3) / sf[:, None, None, None]).ravel()
#[test]
fn should_quantize_conv_kernels_per_output_channel_on_axis_0() {
    let k = Tensor::<B, 1>::from_floats([0.3, -0.1, 0.05, 0.2], &device()).reshape([2, 1, 1, 2]);
    let q = WeightQuantizer::max_per_axis(3).unwrap();
    let sf = q.scale_factor(k.clone(), 0).unwrap();
    assert_eq!(sf.dims(), [2, 1, 1, 1]);
    assert_close(sf.reshape([2]), TensorData::from([10.0f32, 15.0]));
    assert_close(
        q.quantize(k, 0).reshape([4]),
        TensorData::from([0.3f32, -0.1, 0.06666667, 0.2]),
    );
}

/// A user-defined quantizer: `sf = kmax / (fraction * max|w|)` per channel.
fn clipped_max(weights: &[f32], channels: usize, kmax: f64, params: &[f64]) -> Vec<f32> {
    let per = weights.len() / channels;
    (0..channels)
        .map(|c| {
            let max = weights[c * per..(c + 1) * per]
                .iter()
                .fold(0f32, |m, w| m.max(w.abs()));
            (kmax / (params[0] * max.max(1e-10) as f64)) as f32
        })
        .collect()
}

// w = [[0.5, -1.2, 0.03], [-0.25, 0.6, -0.09]]; per output channel (axis 1), fraction 0.5:
// sf = 7 / (0.5 * np.float32([0.5, 1.2, 0.09])) = [28, 11.666667, 155.55554]
#[test]
fn should_quantize_with_a_user_defined_scale_function() {
    register_quantizer("clipped-max", clipped_max);
    let q = WeightQuantizer::custom("clipped-max", 4, true, vec![0.5]).unwrap();
    let sf = q.scale_factor(dense_w::<B>(), 1).unwrap();
    assert_close(sf, TensorData::from([[28.0f32, 11.666667, 155.55554]]));
    // Clipped at half the range: 0.5 * 28 = 14 -> 7 -> 0.25.
    let out: Vec<f32> = q.quantize(dense_w::<B>(), 1).into_data().to_vec().unwrap();
    assert!((out[0] - 0.25).abs() < 1e-6, "{out:?}");
    let json = serde_json::to_string(&q).unwrap();
    assert_eq!(serde_json::from_str::<WeightQuantizer>(&json).unwrap(), q);
    let ada = AdaRoundQuantizer::new(q, dense_w::<B>(), 1, &AdaRoundParams::new()).unwrap();
    assert_eq!(ada.scale_factor::<2>().dims(), [1, 3]);
    assert_eq!(
        WeightQuantizer::custom("nobody-registered-this", 4, false, vec![]),
        Err(QuantizerError::UnknownQuantizer(
            "nobody-registered-this".into()
        ))
    );
}

#[test]
fn should_reject_bad_bitwidths_and_thresholds() {
    assert_eq!(
        WeightQuantizer::max(1),
        Err(QuantizerError::InvalidBitwidth(1))
    );
    assert_eq!(
        WeightQuantizer::max_per_axis(17),
        Err(QuantizerError::InvalidBitwidth(17))
    );
    assert_eq!(
        WeightQuantizer::std(4, 0.0),
        Err(QuantizerError::InvalidThreshold(0.0))
    );
    assert!(WeightQuantizer::max(2).is_ok() && WeightQuantizer::max(16).is_ok());
    // Deserialising validates: an invalid bitwidth is a parse error, not a quantizer.
    let parsed = serde_json::from_str::<WeightQuantizer>(r#"{"kind":"Max","bitwidth":0}"#);
    let err = parsed.unwrap_err().to_string();
    assert!(err.contains("bitwidth must be in 2..=16"), "{err}");
}

#[test]
fn should_round_trip_quantizer_configs_through_json() {
    for q in [
        WeightQuantizer::Float,
        WeightQuantizer::max(8).unwrap(),
        WeightQuantizer::max_per_axis(4).unwrap(),
        WeightQuantizer::std(3, 2.5).unwrap(),
        WeightQuantizer::std_per_axis(2, 3.0).unwrap(),
    ] {
        let json = serde_json::to_string(&q).unwrap();
        assert_eq!(
            serde_json::from_str::<WeightQuantizer>(&json).unwrap(),
            q,
            "{json}"
        );
    }
    assert_eq!(
        serde_json::to_string(&WeightQuantizer::max_per_axis(4).unwrap()).unwrap(),
        r#"{"kind":"MaxPerAxis","bitwidth":4}"#
    );
}

#[test]
fn should_keep_all_zero_weights_finite() {
    let zeros = Tensor::<B, 4>::zeros([3, 2, 3, 3], &device());
    for q in [
        WeightQuantizer::max(4).unwrap(),
        WeightQuantizer::max_per_axis(4).unwrap(),
        WeightQuantizer::std(4, 3.0).unwrap(),
        WeightQuantizer::std_per_axis(4, 3.0).unwrap(),
    ] {
        let sf = q.scale_factor(zeros.clone(), 0).unwrap();
        assert!(all_finite(&sf), "{q:?}");
        assert!((max_abs(sf) - 1e3).abs() < 1e-3, "{q:?}: sf clipped to 1e3");
        let out = q.quantize(zeros.clone(), 0);
        assert!(all_finite(&out) && max_abs(out) == 0.0, "{q:?}");
        let ada = AdaRoundQuantizer::new(q, zeros.clone(), 0, &AdaRoundParams::new()).unwrap();
        assert!(all_finite(&ada.recons_weights::<4>()));
    }
}

#[test]
fn should_reject_non_finite_weights_and_the_float_quantizer() {
    let w = Tensor::<B, 2>::from_floats([[1.0, f32::NAN]], &device());
    let q = WeightQuantizer::max(4).unwrap();
    let err = AdaRoundQuantizer::new(q.clone(), w, 1, &AdaRoundParams::new()).unwrap_err();
    assert_eq!(err, QuantizerError::NonFiniteWeights);
    let w = Tensor::<B, 2>::from_floats([[1.0, f32::INFINITY]], &device());
    assert!(!all_finite(&w));
    let err = AdaRoundQuantizer::new(
        WeightQuantizer::Float,
        dense_w::<B>(),
        1,
        &AdaRoundParams::new(),
    );
    assert_eq!(err.unwrap_err(), QuantizerError::NoGrid);
    let err = q.scale_factor(dense_w::<B>(), 2).unwrap_err();
    assert_eq!(err, QuantizerError::InvalidAxis { axis: 2, rank: 2 });
}

#[test]
fn should_pass_float_weights_through_the_float_quantizer() {
    let out = WeightQuantizer::Float.quantize(dense_w::<B>(), 1);
    assert_close(out, dense_w::<B>().into_data());
}

// Straight-through: d quantize(w) / dw = 1 where w * sf is inside [-kmax, kmax].
#[test]
fn should_pass_gradients_straight_through_quantize() {
    let w = dense_w::<AD>().require_grad();
    let q = WeightQuantizer::max(4).unwrap();
    let grads = q.quantize(w.clone(), 1).sum().backward();
    let g = w.grad(&grads).expect("weights get a gradient");
    assert_close(g, TensorData::from([[1.0f32, 1.0, 1.0], [1.0, 1.0, 1.0]]));

    // Clipped entries get no gradient: a grid too small for the weights (Std, threshold 0.5).
    let w = dense_w::<AD>().require_grad();
    let q = WeightQuantizer::std(2, 0.5).unwrap();
    let grads = q.quantize(w.clone(), 1).sum().backward();
    let g: Vec<f32> = w.grad(&grads).unwrap().into_data().to_vec().unwrap();
    // sf = 1 / (0.5 * w.std()) = 3.386: |w| * sf > 1 for 0.5, -1.2 and 0.6 only.
    assert_eq!(g, vec![0.0, 0.0, 1.0, 1.0, 0.0, 1.0]);
}

// s = w * sf_axis; floor = np.floor(s); d = s - floor
// alpha = -np.log(1.2 / (d + 0.1) - 1)                     # h(alpha) == d
// h = np.clip(1 / (1 + np.exp(-alpha)) * 1.2 - 0.1, 0, 1)
// np.sum(1 - np.abs(2 * h - 1) ** 2)  -> 2.8888903 ; ** 20 -> 3.000019
#[test]
fn should_initialise_alpha_so_that_decimals_equal_the_fraction() {
    let q = WeightQuantizer::max_per_axis(4).unwrap();
    let ada = AdaRoundQuantizer::new(q, dense_w::<B>(), 1, &AdaRoundParams::new()).unwrap();
    let d: Vec<f32> = ada.decimals().into_data().to_vec().unwrap();
    let expected = [0.0f32, 0.0, 0.33333302, 0.5, 0.5, 0.0];
    for (got, want) in d.iter().zip(expected) {
        assert!((got - want).abs() < 1e-5, "decimals {d:?}");
    }
    let loss2: f32 = ada.rounding_loss(2.0).into_scalar();
    let loss20: f32 = ada.rounding_loss(20.0).into_scalar();
    assert!((loss2 - 2.8888903).abs() < 1e-4, "{loss2}");
    assert!((loss20 - 3.000019).abs() < 1e-4, "{loss20}");
    assert_eq!(ada.rounding_loss(0.0).into_scalar(), 0.0);
    // Recons == original weights (relative error < 1e-5).
    let rel = max_abs(ada.recons_weights::<2>() - dense_w::<B>()) / max_abs(dense_w::<B>());
    assert!(rel < 1e-5, "{rel}");
    let status = ada.status();
    // 0.09 * 77.77777 = 7.0000005: a tiny decimal (4.7e-7) still roams, as in NumPy.
    assert_eq!((status.roamers, status.total), (4, 6));
    assert!((status.floor_fraction - 1.0).abs() < 1e-9);
}

#[test]
fn should_reconstruct_conv_weights_at_init_for_every_quantizer() {
    let k = Tensor::<B, 4>::random(
        [4, 3, 3, 3],
        burn::tensor::Distribution::Normal(0.0, 0.2),
        &device(),
    );
    for q in [
        WeightQuantizer::max(3).unwrap(),
        WeightQuantizer::max_per_axis(4).unwrap(),
        WeightQuantizer::std(8, 3.0).unwrap(),
        WeightQuantizer::std_per_axis(2, 3.0).unwrap(),
    ] {
        let ada = AdaRoundQuantizer::new(q.clone(), k.clone(), 0, &AdaRoundParams::new()).unwrap();
        let kmax = q.kmax().unwrap() as f32;
        // Inside the grid the reconstruction is exact; outside it is clipped like quantize().
        let sf = q.scale_factor(k.clone(), 0).unwrap();
        let expected = (k.clone() * sf.clone()).clamp(-kmax, kmax) / sf;
        let err = max_abs(ada.recons_weights::<4>() - expected);
        assert!(err < 1e-5 * max_abs(k.clone()), "{q:?}: {err}");
        let status = ada.status();
        assert!((status.floor_fraction + status.ceil_fraction - 1.0).abs() < 1e-9);
    }
}

// h = clip(sigmoid(a) * 1.2 - 0.1, 0, 1);  dh/da = 1.2 s (1 - s) where 0 < h < 1
// d sum(recons)/da = dh/da / sf ;  d loss(b)/da = -b |2h-1|^(b-1) sign(2h-1) 2 dh/da
#[test]
fn should_give_analytic_gradients_for_alpha() {
    let w = Tensor::<AD, 2>::from_floats([[0.31, -0.47, 0.12], [0.22, 0.05, -0.38]], &device());
    // Std grid: no weight lands exactly on an integer, so every h(alpha) is inside (0, 1).
    let q = WeightQuantizer::std(4, 3.0).unwrap();
    let ada = AdaRoundQuantizer::new(q, w, 1, &AdaRoundParams::new()).unwrap();
    let alpha: Vec<f32> = ada.alpha.val().inner().into_data().to_vec().unwrap();
    let sf: f32 = ada.sf.val().inner().into_data().to_vec::<f32>().unwrap()[0];
    let beta = 3.0f32;

    let grads = ada.recons_weights::<2>().sum().backward();
    let g_recons: Vec<f32> = ada
        .alpha
        .grad(&grads)
        .unwrap()
        .into_data()
        .to_vec()
        .unwrap();
    let grads = ada.rounding_loss(beta as f64).backward();
    let g_loss: Vec<f32> = ada
        .alpha
        .grad(&grads)
        .unwrap()
        .into_data()
        .to_vec()
        .unwrap();

    for i in 0..alpha.len() {
        let s = 1.0 / (1.0 + (-alpha[i]).exp());
        let h_raw = s * 1.2 - 0.1;
        assert!(
            h_raw > 0.0 && h_raw < 1.0,
            "test weights stay inside the clip"
        );
        let dh = 1.2 * s * (1.0 - s);
        let u = 2.0 * h_raw - 1.0;
        let want_loss = -beta * u.abs().powf(beta - 1.0) * u.signum() * 2.0 * dh;
        assert!((g_recons[i] - dh / sf).abs() < 1e-5, "recons grad {i}");
        assert!(
            (g_loss[i] - want_loss).abs() < 1e-4,
            "loss grad {i}: {} vs {want_loss}",
            g_loss[i]
        );
    }
}

#[test]
fn should_quantize_to_nearest_in_evaluation_mode_and_hard_round_by_sign() {
    let k = Tensor::<B, 4>::random([8, 4, 3, 3], burn::tensor::Distribution::Default, &device());
    let q = WeightQuantizer::max_per_axis(3).unwrap();
    let ada = AdaRoundQuantizer::new(q.clone(), k.clone(), 0, &AdaRoundParams::new()).unwrap();
    let soft: Tensor<B, 4> = ada.quantize();
    assert!(
        max_abs(soft - k.clone()) < 1e-5,
        "training mode returns the soft weights"
    );
    let ada = ada.set_training(false);
    assert!(!ada.is_training());
    assert!(max_abs(ada.quantize::<4>() - q.quantize(k.clone(), 0)) < 1e-5);
    // At init, alpha >= 0 exactly when d >= 0.5: hard rounding is nearest up to ties.
    let hard = ada.hard_recons_weights::<4>();
    let changed = hard.not_equal(q.quantize(k, 0)).int().sum().into_scalar();
    assert!(
        changed <= 2,
        "hard rounding at init differs from nearest on {changed} weights"
    );
}

#[test]
fn should_wrap_weights_that_require_grad() {
    let w = Tensor::<AD, 2>::from_floats([[0.3, -0.2], [0.1, 0.4]], &device()).require_grad();
    let q = WeightQuantizer::max(4).unwrap();
    let ada = AdaRoundQuantizer::new(q, w, 1, &AdaRoundParams::new()).unwrap();
    let grads = ada.rounding_loss(2.0).backward();
    assert!(
        ada.alpha.grad(&grads).is_some(),
        "alpha is a trainable leaf"
    );
}

#[test]
fn should_move_decimals_to_zero_or_one_under_adam() {
    let w = Tensor::<AD, 4>::random(
        [4, 4, 3, 3],
        burn::tensor::Distribution::Normal(0.0, 0.3),
        &device(),
    );
    let q = WeightQuantizer::max_per_axis(4).unwrap();
    let mut ada = AdaRoundQuantizer::new(q, w, 0, &AdaRoundParams::new()).unwrap();
    let mut optim = AdamConfig::new().init::<AD, AdaRoundQuantizer<AD>>();
    let before: f32 = ada.rounding_loss(2.0).into_scalar();
    let roamers_before = ada.status().roamers;
    for _ in 0..200 {
        let loss = ada.rounding_loss(2.0);
        let grads = GradientsParams::from_grads(loss.backward(), &ada);
        ada = optim.step(0.1, ada, grads);
    }
    let after: f32 = ada.rounding_loss(2.0).into_scalar();
    assert!(after < 0.1 * before, "rounding loss {before} -> {after}");
    assert!(ada.status().roamers < roamers_before / 4);
    // Only alpha moved: the frozen tensors are not parameters of the optimisation.
    assert!(!ada.w_floor.is_require_grad() && !ada.sf.is_require_grad());
}

#[test]
fn should_save_adaround_state_in_the_record() {
    use burn::record::{BinBytesRecorder, FullPrecisionSettings, Recorder};
    // The asymmetric grid's offsets are saved with the rest (a record without them, written
    // before the grid existed, reads as offsets of zero).
    for q in [
        WeightQuantizer::std_per_axis(3, 2.0).unwrap(),
        WeightQuantizer::mse(2, true, Grid::Asymmetric).unwrap(),
    ] {
        let ada =
            AdaRoundQuantizer::new(q.clone(), dense_w::<B>(), 1, &AdaRoundParams::new()).unwrap();
        let asymmetric = q.grid() == Grid::Asymmetric;
        assert_eq!(ada.offset().is_some(), asymmetric);
        // Training mode rebuilds the soft weights from the record's tensors and offsets.
        for ada in [ada.clone(), ada.set_training(false)] {
            let recorder = BinBytesRecorder::<FullPrecisionSettings>::default();
            let bytes = recorder.record(ada.clone().into_record(), ()).unwrap();
            let record = recorder
                .load::<<AdaRoundQuantizer<B> as Module<B>>::Record>(bytes, &device())
                .unwrap();
            let other = WeightQuantizer::max(8).unwrap();
            let fresh =
                AdaRoundQuantizer::new(other, dense_w::<B>().neg(), 1, &AdaRoundParams::new())
                    .unwrap()
                    .load_record(record);
            assert_eq!(fresh.quantizer, q);
            assert_eq!(fresh.meta, ada.meta);
            assert!(max_abs(fresh.alpha.val() - ada.alpha.val()) == 0.0);
            assert!(max_abs(fresh.quantize::<2>() - ada.quantize::<2>()) == 0.0);
        }
    }
    let old = r#"{"axis":1,"rank":2,"training":true,"gamma":-0.1,"zeta":1.1}"#;
    let meta: AdaRoundMeta = serde_json::from_str(old).unwrap();
    assert!(meta.offsets.is_empty());
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 48,
        rng_seed: proptest::test_runner::RngSeed::Fixed(36),
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn quantized_weights_lie_on_the_integer_grid(
        bitwidth in 2u32..=8,
        c_out in 1usize..6,
        c_in in 1usize..5,
        k in 1usize..4,
        per_axis in any::<bool>(),
        scale in 0.01f32..10.0,
        seed in any::<u64>(),
    ) {
        B::seed(&device(), seed);
        let w = Tensor::<B, 4>::random([c_out, c_in, k, k], burn::tensor::Distribution::Normal(0.0, 1.0), &device())
            .mul_scalar(scale);
        let q = if per_axis {
            WeightQuantizer::max_per_axis(bitwidth).unwrap()
        } else {
            WeightQuantizer::std(bitwidth, 3.0).unwrap()
        };
        let kmax = q.kmax().unwrap() as f32;
        let sf = q.scale_factor(w.clone(), 0).unwrap();
        let ints: Vec<f32> = (q.quantize(w.clone(), 0) * sf).into_data().to_vec().unwrap();
        for v in ints {
            prop_assert!((v - v.round()).abs() < 1e-3 && v.abs() <= kmax + 1e-3, "{v} kmax {kmax}");
        }
        let ada = AdaRoundQuantizer::new(q.clone(), w.clone(), 0, &AdaRoundParams::new()).unwrap();
        let scaled: Vec<f32> = (w * ada.scale_factor::<4>()).into_data().to_vec().unwrap();
        let hard: Vec<f32> = (ada.hard_recons_weights::<4>() * ada.scale_factor::<4>()).into_data().to_vec().unwrap();
        for (s, h) in scaled.iter().zip(hard) {
            let (lo, hi) = ((s.floor()).clamp(-kmax, kmax), (s.floor() + 1.0).clamp(-kmax, kmax));
            prop_assert!((h - lo).abs() < 1e-3 || (h - hi).abs() < 1e-3, "{s} -> {h}");
        }
    }

    /// Deserialisation accepts a quantizer exactly when its parameters are valid, and what it
    /// accepts serialises back to the same value.
    #[test]
    fn deserialising_accepts_exactly_the_valid_quantizers(
        kind in 0usize..4,
        bitwidth in 0u32..80,
        threshold in prop_oneof![-5.0f64..5.0, Just(0.0), Just(f64::INFINITY)],
    ) {
        let json = match kind {
            0 => format!(r#"{{"kind":"Max","bitwidth":{bitwidth}}}"#),
            1 => format!(r#"{{"kind":"MaxPerAxis","bitwidth":{bitwidth}}}"#),
            2 => format!(r#"{{"kind":"Std","bitwidth":{bitwidth},"threshold":{threshold:?}}}"#),
            _ => format!(r#"{{"kind":"StdPerAxis","bitwidth":{bitwidth},"threshold":{threshold:?}}}"#),
        };
        let parsed = serde_json::from_str::<WeightQuantizer>(&json);
        let valid = (2..=16).contains(&bitwidth)
            && (kind < 2 || (threshold.is_finite() && threshold > 0.0));
        prop_assert_eq!(parsed.is_ok(), valid, "{}", json);
        if let Ok(q) = parsed {
            prop_assert!(q.validate().is_ok());
            let back: WeightQuantizer = serde_json::from_str(&serde_json::to_string(&q).unwrap()).unwrap();
            prop_assert_eq!(back, q);
        } else {
            // Built field by field instead, the same quantizer is refused where it is used.
            let q = match kind {
                0 => WeightQuantizer::Max { bitwidth },
                1 => WeightQuantizer::MaxPerAxis { bitwidth },
                2 => WeightQuantizer::Std { bitwidth, threshold },
                _ => WeightQuantizer::StdPerAxis { bitwidth, threshold },
            };
            prop_assert!(q.validate().is_err());
            prop_assert!(q.scale_factor(dense_w::<B>(), 1).is_err());
        }
    }

    /// The error-minimising scale is never worse than the max scale on the same grid, its
    /// integers lie on its grid (relative to the offset on the asymmetric grid), and
    /// quantizing twice gives the same weights (what AdaRound and a re-quantizing forward
    /// rely on).
    #[test]
    fn mse_quantizers_beat_max_stay_on_their_grid_and_are_idempotent(
        bitwidth in 2u32..=8,
        c_out in 1usize..5,
        n in 1usize..40,
        per_axis in any::<bool>(),
        grid in prop_oneof![Just(Grid::Symmetric), Just(Grid::FullRange), Just(Grid::Asymmetric)],
        skew in 0.0f32..2.0,
        seed in any::<u64>(),
    ) {
        B::seed(&device(), seed);
        let w = Tensor::<B, 2>::random([n, c_out], burn::tensor::Distribution::Normal(0.0, 1.0), &device());
        // A skewed distribution: the negative side longer, where the full-range grid helps.
        let w = w.clone() - w.clone().clamp_max(0.0).powi_scalar(2).mul_scalar(skew);
        let mse = WeightQuantizer::mse(bitwidth, per_axis, grid).unwrap();
        let max = if per_axis { WeightQuantizer::max_per_axis(bitwidth) } else { WeightQuantizer::max(bitwidth) }.unwrap();
        let err = |q: &WeightQuantizer| -> f32 {
            use burn::tensor::ElementConversion;
            (q.quantize(w.clone(), 1) - w.clone()).powi_scalar(2).sum().into_scalar().elem::<f32>()
        };
        if grid == Grid::Symmetric {
            prop_assert!(err(&mse) <= err(&max) * (1.0 + 1e-5) + 1e-12, "{} > {}", err(&mse), err(&max));
        }
        let (lo, hi) = mse.levels().unwrap();
        let encoding = mse.encoding(w.clone(), 1).unwrap();
        let sf = encoding.scale_factor;
        let q = mse.quantize(w.clone(), 1);
        let ints = match encoding.offset {
            Some(o) => {
                prop_assert_eq!(grid, Grid::Asymmetric);
                let offsets: Vec<f32> = o.clone().into_data().to_vec().unwrap();
                // Integer offsets that keep zero a code: zero quantizes to itself.
                for o in offsets {
                    prop_assert!(o == o.round() && -o >= lo as f32 && -o <= hi as f32, "offset {o}");
                }
                q.clone() * sf - o
            }
            None => {
                prop_assert!(grid != Grid::Asymmetric);
                q.clone() * sf
            }
        };
        let ints: Vec<f32> = ints.into_data().to_vec().unwrap();
        for v in ints {
            prop_assert!((v - v.round()).abs() < 1e-3 && v >= lo as f32 - 1e-3 && v <= hi as f32 + 1e-3, "{v} not in [{lo}, {hi}]");
        }
        let again = mse.quantize(q.clone(), 1);
        let moved = max_abs(again - q.clone()) / max_abs(q).max(1e-12);
        prop_assert!(moved < 1e-5, "re-quantizing moved weights by {moved} (relative)");
    }
}

/// On the asymmetric grid a channel of one sign gets every code on its side of zero; the
/// grids centred on zero spend half their codes on the other side.
#[test]
fn should_spend_every_code_of_the_asymmetric_grid_on_the_weights_range() {
    // Two output channels (axis 1): weights on {0, 0.5, 1, 1.5} and on their negatives.
    let values = [
        0.0f32, 0.0, 0.5, -0.5, 1.0, -1.0, 1.5, -1.5, 1.5, -1.5, 0.5, -0.5,
    ];
    let w = Tensor::<B, 2>::from_data(TensorData::new(values.to_vec(), [6, 2]), &device());
    let asymmetric = WeightQuantizer::mse(2, true, Grid::Asymmetric).unwrap();
    let q = asymmetric.quantize(w.clone(), 1);
    assert!(
        max_abs(q - w.clone()) < 1e-6,
        "four codes reproduce four values"
    );
    let offsets: Vec<f32> = asymmetric
        .encoding(w.clone(), 1)
        .unwrap()
        .offset
        .expect("the asymmetric grid has offsets")
        .into_data()
        .to_vec()
        .unwrap();
    // Codes relative to the offset are [-2, 1]: [0, 3] is offset 2, [-3, 0] offset -1.
    assert_eq!(offsets, vec![2.0, -1.0]);
    for grid in [Grid::Symmetric, Grid::FullRange] {
        let centred = WeightQuantizer::mse(2, true, grid).unwrap();
        assert!(centred.encoding(w.clone(), 1).unwrap().offset.is_none());
        assert!(
            max_abs(centred.quantize(w.clone(), 1) - w.clone()) > 0.1,
            "{grid:?}"
        );
    }
    // AdaRound on that grid starts from the same integers and rebuilds the weights.
    let ada = AdaRoundQuantizer::new(asymmetric, w.clone(), 1, &AdaRoundParams::new()).unwrap();
    assert_eq!(ada.meta.offsets, vec![2.0, -1.0]);
    assert!(max_abs(ada.hard_recons_weights::<2>() - w.clone()) < 1e-6);
    let floors: Vec<f32> = ada.w_floor.val().into_data().to_vec().unwrap();
    assert!(
        floors.iter().all(|f| (-2.0..=1.0).contains(f)),
        "{floors:?}"
    );
}

/// Roamers are neither exactly 0 nor exactly 1 (a NaN roams); the floor fraction counts
/// `h <= 0.5`; the tensor and host forms agree.
#[test]
fn rounding_status_counts_decimals() {
    let h = [0.0f32, 1.0, 0.3, 0.5, 0.7, f32::NAN, 1.0];
    let status = RoundingStatus::of_values(&h);
    assert_eq!((status.total, status.roamers), (7, 4));
    assert_eq!(status.floor_fraction, 3.0 / 7.0);
    assert_eq!(status.ceil_fraction, 4.0 / 7.0);
    let tensor = Tensor::<B, 1>::from_floats(h, &Default::default());
    assert_eq!(RoundingStatus::of_decimals(tensor.reshape([7, 1])), status);
    assert_eq!(RoundingStatus::of_values(&[]).total, 0);
}

#[test]
fn should_re_arm_on_an_encoding_and_refuse_offsets_that_do_not_fit_the_grid() {
    let params = AdaRoundParams::new();
    let w = dense_w::<B>();
    let asymmetric = WeightQuantizer::mse(3, true, Grid::Asymmetric).unwrap();
    let ada = AdaRoundQuantizer::new(asymmetric.clone(), w.clone(), 1, &params).unwrap();
    let padded = w.clone().reshape([2, 3, 1, 1]);
    // Re-armed on its own encoding: the same floor and decimals as at creation.
    let own = asymmetric.encoding(padded.clone(), 1).unwrap();
    let again = ada
        .clone()
        .with_encoding(padded.clone(), own.scale_factor.clone(), own.offset.clone())
        .unwrap();
    assert_close(again.w_floor.val(), ada.w_floor.val().into_data());
    assert_close(again.decimals(), ada.decimals().into_data());
    assert_eq!(again.meta.offsets, ada.meta.offsets);
    // Another grid (offsets one higher): `w_floor + h(alpha) + o == w sf` again.
    let shifted = own.offset.clone().unwrap() + 1.0;
    let moved = ada
        .clone()
        .with_encoding(
            padded.clone(),
            own.scale_factor.clone(),
            Some(shifted.clone()),
        )
        .unwrap();
    let scaled = padded.clone() * own.scale_factor.clone();
    assert_close(
        moved.w_floor.val() + moved.decimals() + shifted,
        scaled.into_data(),
    );
    assert_eq!(
        moved.meta.offsets,
        ada.meta.offsets.iter().map(|o| o + 1.0).collect::<Vec<_>>()
    );
    // No offset on the asymmetric grid, a fractional one, one on a centred grid.
    let sf = own.scale_factor.clone();
    assert!(matches!(
        ada.clone().with_scale_factor(padded.clone(), sf.clone()),
        Err(QuantizerError::FixedScale(_))
    ));
    let half = Some(own.offset.clone().unwrap() + 0.5);
    assert!(matches!(
        ada.clone().with_encoding(padded.clone(), sf.clone(), half),
        Err(QuantizerError::InvalidOffset(_, 3))
    ));
    let centred = WeightQuantizer::mse(3, true, Grid::FullRange).unwrap();
    let ada = AdaRoundQuantizer::new(centred, w, 1, &params).unwrap();
    assert!(matches!(
        ada.with_encoding(padded, sf.clone(), Some(sf.zeros_like())),
        Err(QuantizerError::InvalidOffset(_, 3))
    ));
}
