//! Greedy refinement of the hard rounding after AdaRound.
//!
//! Once AdaRound has decided every weight's rounding (down or up), the layer's loss on the
//! calibration samples is the exact quadratic form of the [Gram module](crate::gram) in the
//! rounding error `dW`. Flipping one decision of output row `o` moves `dW[o, i]` by the grid
//! step `s` (signed, towards the other neighbour) and changes the loss by
//! `2 s g[i] + s² G[i, i]`, with `g = dW[o] G + R[o]` the row's half-gradient. Each row is
//! swept, flip by flip, keeping every flip that lowers the loss and updating `g` in `O(K)`,
//! until a sweep keeps none (or [`MAX_SWEEPS`]). Every kept flip lowers the loss, so the
//! refined rounding is never worse on the calibration samples than AdaRound's.
//!
//! With bias correction to follow, the loss that matters is the one left after it: the
//! bias then absorbs each output channel's mean error, so `G` and `R` are centred on the
//! samples' mean patch and mean residual ([`Centre`]): `G - M μᵀμ`, `R - M d̄ᵀμ`.

use adaround_core::{AdaRoundQuantizer, WeightQuantizer};
use adaround_layers::{probe::Flow, LayerKind, QuantizedLayer, QuantizerSlot};
use burn::tensor::{backend::Backend, Tensor};

use crate::{
    gram::{self, Grams},
    unit::Unit,
    AdaRoundConfig, ReconstructionLoss, Refine,
};

/// Sweeps over a row at most.
pub(crate) const MAX_SWEEPS: usize = 50;

/// Largest patch size `K` refined: the sweeps hold each group's `K x K` Gram matrix in host
/// memory as `f64` (512 MiB at this size); larger layers keep AdaRound's rounding, with a
/// warning.
pub(crate) const MAX_K: usize = 8192;

/// `alpha` that puts the rectified sigmoid at exactly 0 or 1 (`h(±10)` clips for the usual
/// `gamma = -0.1`, `zeta = 1.1`; larger `|gamma|`, `zeta` still round the same way).
const SATURATED_ALPHA: f32 = 10.0;

/// The sum over batches of `G / divisor` (`[groups, K, K]`) and `R / divisor`.
pub(crate) fn summed<B: Backend>(grams: &Grams<B>) -> (Tensor<B, 3>, Option<Tensor<B, 3>>) {
    let scaled = |t: &Tensor<B, 3>, b: usize| t.clone().div_scalar(grams.divisors[b]);
    let g = (1..grams.grams.len()).fold(scaled(&grams.grams[0], 0), |acc, b| {
        acc + scaled(&grams.grams[b], b)
    });
    let r = grams.residuals.as_ref().map(|residuals| {
        (1..residuals.len()).fold(scaled(&residuals[0].0, 0), |acc, b| {
            acc + scaled(&residuals[b].0, b)
        })
    });
    (g, r)
}

/// The values of `t` as `f64`, in row-major order.
pub(crate) fn values<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f64> {
    t.into_data()
        .convert::<f64>()
        .to_vec()
        .expect("f64 data after conversion")
}

/// One row's refinement: `d` the rounding error, `s` the step to the other neighbour (0
/// where clipping makes both the same), `grad` its half-gradient, `gram` the `K x K` Gram
/// matrix; flips `flipped` where kept. Returns the number of flips kept.
fn refine_row(
    d: &mut [f64],
    s: &mut [f64],
    grad: &mut [f64],
    gram: &[f64],
    flipped: &mut [bool],
) -> usize {
    let k = d.len();
    let mut flips = 0;
    for _ in 0..MAX_SWEEPS {
        let mut kept = 0;
        for i in 0..k {
            let step = s[i];
            let curvature = step * step * gram[i * k + i];
            let change = 2.0 * step * grad[i] + curvature;
            // A margin against flips that only rounding noise calls gains.
            if step == 0.0 || change >= -1e-9 * curvature.max(f64::MIN_POSITIVE) {
                continue;
            }
            let row = &gram[i * k..(i + 1) * k];
            grad.iter_mut().zip(row).for_each(|(g, r)| *g += step * r);
            d[i] += step;
            s[i] = -step;
            flipped[i] = !flipped[i];
            kept += 1;
        }
        flips += kept;
        if kept == 0 {
            break;
        }
    }
    flips
}

/// `layer` (AdaRound armed, one kernel with a matrix form) with its hard rounding refined
/// on the loss `grams` describe, every `alpha` saturated to its decision; and the number of
/// decisions changed. Layers with another form come back as they are, with 0.
pub(crate) fn refine<B: Backend>(
    layer: QuantizedLayer<B>,
    grams: &Grams<B>,
    centred: bool,
) -> (QuantizedLayer<B>, usize) {
    let Some(matrix) = layer.matrix() else {
        return (layer, 0);
    };
    let [ada] = layer.adarounds()[..] else {
        return (layer, 0);
    };
    let (h, step_kernel, rounded) = neighbours(ada);
    let d = matrix.to_matrix(rounded) - matrix.float_matrix();
    let s = matrix.to_matrix(step_kernel);
    let [groups, rows, k] = d.dims();
    let (g, r) = summed(grams);
    let (g, r) = match centred {
        true => {
            let c = &grams.sums;
            let scale = 1.0 / (c.count as f64 * grams.divisors[0]);
            let sx = c.x.clone();
            let g = g - gram::matmul(sx.clone().swap_dims(1, 2), sx.clone()).mul_scalar(scale);
            let r = match (r, c.d0.clone()) {
                (Some(r), Some(sd)) => {
                    Some(r - gram::matmul(sd.swap_dims(1, 2), sx).mul_scalar(scale))
                }
                (r, _) => r,
            };
            (g, r)
        }
        false => (g, r),
    };
    let (gram, r) = (values(g), r.map(values));
    let (mut d, mut s) = (values(d), values(s));
    let mut flipped = vec![false; groups * rows * k];
    let mut flips = 0;
    for gi in 0..groups {
        let gram = &gram[gi * k * k..(gi + 1) * k * k];
        for o in 0..rows {
            let at = (gi * rows + o) * k;
            let dr = &mut d[at..at + k];
            // g = dW[o] G + R[o], row by row of G (contiguous).
            let mut grad = vec![0.0; k];
            for (i, &di) in dr.iter().enumerate() {
                let row = &gram[i * k..(i + 1) * k];
                grad.iter_mut().zip(row).for_each(|(g, w)| *g += di * w);
            }
            if let Some(r) = &r {
                grad.iter_mut()
                    .zip(&r[at..at + k])
                    .for_each(|(g, r)| *g += r);
            }
            let f = &mut flipped[at..at + k];
            flips += refine_row(dr, &mut s[at..at + k], &mut grad, gram, f);
        }
    }
    // Decisions changed in all (a decision may flip back in a later sweep).
    let changed = flipped.iter().filter(|&&f| f).count();
    log::trace!("{flips} flips kept, {changed} decisions changed");
    if changed == 0 && !has_roamers(ada) {
        return (layer, 0);
    }
    let device = h.device();
    let mask: Vec<f32> = flipped.iter().map(|&f| f32::from(u8::from(f))).collect();
    let mask = Tensor::<B, 1>::from_floats(mask.as_slice(), &device).reshape([groups, rows, k]);
    let mask = matrix.to_kernel(mask);
    // h XOR mask.
    let decided = (h.clone() - mask).abs();
    (with_decisions(layer, decided), changed)
}

/// `layer` with its AdaRound kernel's decisions set to `h` (0: down, 1: up; AdaRound's
/// rank-4 layout): every `alpha` saturated.
pub(crate) fn with_decisions<B: Backend>(
    layer: QuantizedLayer<B>,
    h: Tensor<B, 4>,
) -> QuantizedLayer<B> {
    with_alpha(layer, alpha_of_decisions(h, SATURATED_ALPHA))
}

/// `alpha` that starts AdaRound from given decisions: `h(±START_ALPHA)` is 0.96 or 0.04,
/// where the rectified sigmoid's slope is still 0.13, so that a decision can change.
pub(crate) const START_ALPHA: f32 = 2.0;

/// `±magnitude` from decisions `h` (0: down, 1: up).
pub(crate) fn alpha_of_decisions<B: Backend>(h: Tensor<B, 4>, magnitude: f32) -> Tensor<B, 4> {
    h.mul_scalar(2.0 * magnitude).sub_scalar(magnitude)
}

/// `layer` with its AdaRound kernel's `alpha` replaced by `alpha` (same parameter id).
pub(crate) fn with_alpha<B: Backend>(
    layer: QuantizedLayer<B>,
    alpha: Tensor<B, 4>,
) -> QuantizedLayer<B> {
    layer.map_slots(|slot| match slot {
        QuantizerSlot::AdaRound(a) => QuantizerSlot::AdaRound(a.with_alpha(alpha.clone())),
        plain => plain,
    })
}

/// Whether some `h` is strictly between 0 and 1.
fn has_roamers<B: Backend>(ada: &AdaRoundQuantizer<B>) -> bool {
    ada.status().roamers > 0
}

/// The hard decimals `h`, the signed step from the hard rounding to the other neighbour
/// (0 where the grid's clipping makes them equal, and for the max scales on the top level),
/// and the hard-rounded kernel, all in AdaRound's rank-4 layout.
fn neighbours<B: Backend>(
    ada: &AdaRoundQuantizer<B>,
) -> (Tensor<B, 4>, Tensor<B, 4>, Tensor<B, 4>) {
    let (lo, hi) = ada.levels();
    let h = ada.hard_decimals();
    let floor = ada.w_floor.val();
    let sf = ada.sf.val();
    let z = (floor.clone() + h.clone()).clamp(lo, hi);
    let other = (floor - h.clone()).add_scalar(1.0).clamp(lo, hi);
    let step = (other - z.clone()) / sf.clone();
    // The max scales derive `sf` from the largest magnitude, which the finalized layer's
    // quantizer takes again from the rounded weights: weights on the top level stay there.
    let step = match ada.quantizer {
        WeightQuantizer::Max { .. } | WeightQuantizer::MaxPerAxis { .. } => {
            let top = z.clone().abs().greater_equal_elem(hi - 0.5);
            step.mask_fill(top, 0.0)
        }
        _ => step,
    };
    let z = match ada.offset() {
        Some(o) => z + o,
        None => z,
    };
    (h, step, z / sf)
}

/// Whether `config` refines `unit`: a layer kind [`Refine`] names, with the Gram form (no
/// activation, no ReLU before the loss).
fn wanted<B: Backend>(unit: &Unit<'_, B>, config: &AdaRoundConfig) -> bool {
    let kind = match config.refine {
        Refine::Off => false,
        Refine::Dense => unit.layer.kind() == LayerKind::Dense,
        Refine::All => true,
    };
    if !(kind && unit.activation.is_none() && unit.relu.is_none() && gram::supports(&unit.layer)) {
        return false;
    }
    let k = unit.layer.matrix().map_or(0, |m| m.matrix_dims()[2]);
    if k > MAX_K {
        log::warn!(
            "{}: not refined, patch size {k} above {MAX_K} (its Gram matrix would not fit)",
            unit.name
        );
        return false;
    }
    true
}

/// The Gram matrices the refinement of `unit` needs (`None` where `config` does not refine
/// it): the step's own, else those over all samples.
pub(crate) fn grams_for<B: Backend>(
    unit: &Unit<'_, B>,
    config: &AdaRoundConfig,
    step_grams: Option<&Grams<B>>,
) -> Option<Grams<B>> {
    if !wanted(unit, config) {
        return None;
    }
    step_grams
        .cloned()
        .or_else(|| all_samples_grams(unit, config.loss))
}

/// `layer` refined on `grams` (unchanged, 0 flips, without them); with bias correction to
/// follow, on the loss it leaves (centred per channel).
pub(crate) fn apply<B: Backend>(
    unit: &Unit<'_, B>,
    config: &AdaRoundConfig,
    layer: QuantizedLayer<B>,
    grams: Option<Grams<B>>,
) -> (QuantizedLayer<B>, usize) {
    let Some(grams) = grams else {
        return (layer, 0);
    };
    let centred = config.bias_correction && unit.layer.bias().is_some();
    refine(layer, &grams, centred)
}

/// The Gram matrices of `unit` over all its samples as one batch (full batches have equal
/// divisors, so the refined rounding is that of the per-batch sum).
fn all_samples_grams<B: Backend>(unit: &Unit<'_, B>, loss: ReconstructionLoss) -> Option<Grams<B>> {
    let (inputs, targets) = unit.held();
    let inputs = [cat(inputs)];
    let targets = (!unit.same_inputs).then(|| [cat(targets)]);
    gram::grams(&unit.layer, &inputs, targets.as_ref().map(|t| &t[..]), loss)
}

/// The flows of all batches as one.
fn cat<B: Backend>(flows: &[Flow<B>]) -> Flow<B> {
    let (mut rows, mut maps) = (Vec::new(), Vec::new());
    for flow in flows {
        match flow {
            Flow::Rows(x) => rows.push(x.clone()),
            Flow::Maps(x) => maps.push(x.clone()),
        }
    }
    match (rows.is_empty(), maps.is_empty()) {
        (false, true) => Flow::Rows(Tensor::cat(rows, 0)),
        (true, false) => Flow::Maps(Tensor::cat(maps, 0)),
        _ => panic!(
            "batches of rows and maps ({} and {})",
            rows.len(),
            maps.len()
        ),
    }
}

#[cfg(test)]
mod tests {
    use adaround_core::{AdaRoundParams, Grid, WeightQuantizer};
    use adaround_layers::{QuantizedConv2dConfig, QuantizedDense, QuantizedDenseConfig};
    use burn::{
        nn::PaddingConfig2d,
        tensor::{Distribution, ElementConversion},
    };

    use super::*;
    use crate::{
        gram::tests::armed,
        unit::{reconstruction_loss, Samples},
    };

    type B = burn_autodiff::Autodiff<burn_ndarray::NdArray<f32>>;

    fn device() -> burn::tensor::Device<B> {
        Default::default()
    }

    /// The summed loss over the batches of the layer rounded by its hard decisions, its bias
    /// corrected first where `corrected`.
    fn hard_loss(
        layer: &QuantizedLayer<B>,
        data: &[(Flow<B>, Flow<B>)],
        (loss, corrected): (ReconstructionLoss, bool),
    ) -> f64 {
        let (mut rounded, _) = layer.clone().finalize(true);
        if corrected {
            let (inputs, targets): (Vec<_>, Vec<_>) = data.iter().cloned().unzip();
            rounded = crate::unit::correct_bias(rounded, &inputs, &targets);
        }
        data.iter()
            .map(|(x, t)| {
                let l = reconstruction_loss(rounded.forward_flow(x.clone()), t.clone(), loss);
                l.into_scalar().elem::<f64>()
            })
            .sum()
    }

    fn alpha(layer: &QuantizedLayer<B>) -> Vec<f32> {
        let a = layer.adarounds()[0].alpha.val();
        a.into_data().to_vec().unwrap()
    }

    /// `layer` with the decision of weight `i` (in alpha's order) reversed.
    fn flip_one(layer: &QuantizedLayer<B>, i: usize) -> QuantizedLayer<B> {
        let mut values = alpha(layer);
        values[i] = if values[i] >= 0.0 { -10.0 } else { 10.0 };
        let dims = layer.adarounds()[0].alpha.dims();
        let t = Tensor::<B, 1>::from_floats(values.as_slice(), &device()).reshape(dims);
        with_alpha(layer.clone(), t)
    }

    /// Refines `layer` (armed at random) on two batches of `x`-like inputs, for each loss and
    /// target case, plain and centred (the loss after bias correction), and checks that the
    /// loss does not rise, that the flips reported are the decisions changed, and that no
    /// single flip it may make lowers the refined loss further.
    fn assert_refines(layer: QuantizedLayer<B>, x: [Flow<B>; 2]) {
        let cases = gram::tests::target_cases(&x[0]);
        let cases = cases
            .iter()
            .flat_map(|c| [(c.clone(), false), (c.clone(), true)]);
        for (case, ((loss, shift), centred)) in cases.enumerate() {
            let layer = armed(layer.clone()).set_training(false);
            let targets: Vec<Flow<B>> = x
                .iter()
                .map(|xb| {
                    let input = match (&shift, xb) {
                        (Some(_), Flow::Rows(t)) => Flow::Rows(t.clone().mul_scalar(1.1)),
                        (Some(_), Flow::Maps(t)) => Flow::Maps(t.clone().mul_scalar(1.1)),
                        (None, flow) => flow.clone(),
                    };
                    layer.forward_float_flow(input).detach()
                })
                .collect();
            let other = shift.is_some().then_some(&targets[..]);
            let grams = gram::grams(&layer, &x, other, loss).expect("a matrix layer");
            let data: Vec<_> = x.iter().cloned().zip(targets.iter().cloned()).collect();
            assert!(layer.bias().is_some(), "centring needs a bias");
            let measure = (loss, centred);
            let before = hard_loss(&layer, &data, measure);
            let (refined, flips) = refine(layer.clone(), &grams, centred);
            let after = hard_loss(&refined, &data, measure);
            let changed = alpha(&layer)
                .iter()
                .zip(alpha(&refined))
                .filter(|(a, b)| (**a >= 0.0) != (*b >= 0.0))
                .count();
            assert_eq!(flips, changed, "case {case}: decisions changed");
            assert!(
                flips > 0,
                "case {case}: a random rounding has flips to gain"
            );
            assert!(after < before, "case {case}: {after} not below {before}");
            // Every flip the refinement may make (not those of the locked top weights).
            let (_, steps, _) = neighbours(refined.adarounds()[0]);
            let steps: Vec<f32> = steps.into_data().to_vec().unwrap();
            for i in (0..steps.len()).filter(|&i| steps[i] != 0.0) {
                let one = hard_loss(&flip_one(&refined, i), &data, measure);
                assert!(
                    one >= after * (1.0 - 1e-5),
                    "case {case}: flipping weight {i} lowers {after} to {one}"
                );
            }
        }
    }

    #[test]
    fn should_refine_dense_rounding_to_a_local_minimum() {
        B::seed(&device(), 11);
        let dense = QuantizedDenseConfig::new(12, 5)
            .with_quantizer(WeightQuantizer::max_per_axis(3).unwrap())
            .init::<B>(&device());
        let x = [0, 1].map(|_| {
            Flow::Rows(Tensor::<B, 2>::random(
                [30, 12],
                Distribution::Normal(0.5, 1.0),
                &device(),
            ))
        });
        assert_refines(QuantizedLayer::Dense(dense), x);
    }

    /// The max scales take `sf` again from the finalized kernel's largest magnitude: a flip
    /// of a channel's top weight inwards would stretch the channel's whole grid.
    /// Inputs and targets of one batch.
    type Batch = (Flow<B>, Flow<B>);

    /// A Dense layer (12 -> 5, max scale per channel, 3 bits) whose every channel has its
    /// largest magnitude alone on the top level and negative (exactly -kmax once scaled, so
    /// it can move inwards; the others at half their size), and two batches of inputs with
    /// targets from the same kernel with its top weights halved. No random numbers: the
    /// tests share the backend's generator.
    fn lone_negative_tops() -> (QuantizedDense<B>, Vec<Batch>) {
        let values = |n: usize, seed: f32| -> Vec<f32> {
            (0..n)
                .map(|i| (i as f32 * 0.731 + seed).sin() * (i as f32 * 0.37).cos())
                .collect()
        };
        let mut dense = QuantizedDenseConfig::new(12, 5)
            .with_quantizer(WeightQuantizer::max_per_axis(3).unwrap())
            .init::<B>(&device());
        let w = Tensor::<B, 1>::from_floats(values(60, 0.3).as_slice(), &device()).reshape([12, 5]);
        let top = w
            .clone()
            .abs()
            .equal(w.clone().abs().max_dim(0).expand([12, 5]));
        let w = w
            .clone()
            .mul_scalar(0.5)
            .mask_where(top.clone(), w.abs().neg());
        dense.weight = dense.weight.map(|_| w.clone());
        dense.bias = dense.bias.map(|b| b.map(|b| b.zeros_like()));
        let mut shrunk = dense.clone();
        shrunk.weight = shrunk
            .weight
            .map(|_| w.clone().mask_where(top, w.clone().div_scalar(2.0)));
        let shrunk = QuantizedLayer::Dense(shrunk);
        let data = [0.1, 0.2]
            .map(|seed| {
                let rows = Tensor::<B, 1>::from_floats(values(360, seed).as_slice(), &device());
                let x = Flow::Rows(rows.reshape([30, 12]).add_scalar(0.5));
                (x.clone(), shrunk.forward_float_flow(x))
            })
            .to_vec();
        (dense, data)
    }

    #[test]
    fn should_keep_max_scaled_top_weights_on_the_top_level() {
        let (dense, data) = lone_negative_tops();
        let (x, targets): (Vec<_>, Vec<_>) = data.iter().cloned().unzip();
        let layer = QuantizedLayer::Dense(dense)
            .with_adaround(&AdaRoundParams::new())
            .unwrap()
            .set_training(false);
        let loss = ReconstructionLoss::Mse;
        let grams = gram::grams(&layer, &x, Some(&targets), loss).unwrap();
        let data: Vec<_> = x.iter().cloned().zip(targets.iter().cloned()).collect();
        // Top weights the grid alone would let move inwards (-3 -> -2): the lock's cases.
        let ada = layer.adarounds()[0];
        let (h, step, _) = neighbours(ada);
        let floor = ada.w_floor.val();
        let z = (floor.clone() + h.clone()).clamp(-3.0, 3.0);
        let other = (floor - h).add_scalar(1.0).clamp(-3.0, 3.0);
        let tops = z.clone().abs().greater_equal_elem(2.5).float() * (other - z).abs();
        let count = |t: Tensor<B, 4>| t.sum().into_scalar().elem::<f32>();
        assert!(
            count(tops.clone()) > 0.0,
            "no top weight could move inwards"
        );
        assert_eq!(count(tops * step.abs()), 0.0, "a top weight may flip");
        let before = hard_loss(&layer, &data, (loss, false));
        let (refined, flips) = refine(layer, &grams, false);
        assert!(flips > 0);
        let after = hard_loss(&refined, &data, (loss, false));
        assert!(after < before, "{after} not below {before}");
        // The finalized kernel quantizes to itself: every channel keeps its top level.
        let (finalized, _) = refined.clone().finalize(true);
        let QuantizedLayer::Dense(d) = &finalized else {
            unreachable!()
        };
        let kernel = d.weight.val();
        let requantized = WeightQuantizer::max_per_axis(3)
            .unwrap()
            .quantize(kernel.clone(), 1);
        let gap = (requantized - kernel)
            .abs()
            .max()
            .into_scalar()
            .elem::<f32>();
        assert!(
            gap < 1e-6,
            "the finalized kernel moves by {gap} when quantized again"
        );
    }

    /// The max scale per channel as a custom quantizer, which the refinement cannot know
    /// follows the rounded weights.
    fn custom_max(w: &[f32], channels: usize, kmax: f64, _p: &[f64]) -> Vec<f32> {
        w.chunks(w.len() / channels)
            .map(|row| kmax as f32 / row.iter().fold(1e-10f32, |m, v| m.max(v.abs())))
            .collect()
    }

    #[test]
    fn should_keep_adaround_rounding_where_the_refined_layer_ends_worse_once_finalized() {
        use crate::optimize::{finish, refine_and_finish};
        adaround_core::register_quantizer("refine-test-max", custom_max);
        let custom = WeightQuantizer::Custom {
            name: "refine-test-max".into(),
            bitwidth: 3,
            per_axis: true,
            params: vec![],
        };
        let (dense, data) = lone_negative_tops();
        let (x, targets): (Vec<_>, Vec<_>) = data.into_iter().unzip();
        let mut unit = Unit {
            name: "fc",
            layer: QuantizedLayer::Dense(dense.clone()),
            activation: None,
            relu: None,
            samples: Samples::Held {
                inputs: &x,
                targets: &targets,
            },
            same_inputs: false,
        };
        let config =
            AdaRoundConfig::new(crate::Schedule::warm_cosine(10)).with_refine(Refine::Dense);
        let armed = |layer: &QuantizedLayer<B>| {
            layer
                .clone()
                .with_adaround(&AdaRoundParams::new())
                .unwrap()
                .set_training(false)
        };
        // AdaRound's rounding as the max scale's refinement leaves it: no single flip but
        // those of the top weights lowers the loss.
        let grams = grams_for(&unit, &config, None);
        let (locked, _) = apply(&unit, &config, armed(&unit.layer), grams.clone());
        let alpha = locked.adarounds()[0].alpha.val();
        // The same scales from the custom quantizer, which the refinement cannot lock.
        let mut unlocked = dense;
        unlocked.quantizer = custom.into();
        unit.layer = QuantizedLayer::Dense(unlocked);
        let rounded = with_alpha(armed(&unit.layer), alpha);
        let (refined, flips) = apply(&unit, &config, rounded.clone(), grams.clone());
        assert!(flips > 0, "the top weights flip inwards");
        let kept = finish(&unit, &config, rounded.clone()).err_final;
        let refined = finish(&unit, &config, refined).err_final;
        assert!(
            refined > kept,
            "the case: {refined} not above {kept} once finalized"
        );
        let (done, flips) = refine_and_finish(&unit, &config, rounded, grams);
        assert_eq!(flips, 0);
        assert_eq!(done.err_final, kept);
    }

    #[test]
    fn should_refine_grouped_conv_rounding_on_an_asymmetric_grid_to_a_local_minimum() {
        B::seed(&device(), 12);
        let quantizer = WeightQuantizer::mse(2, true, Grid::Asymmetric).unwrap();
        let conv = QuantizedConv2dConfig::new([4, 6], [3, 3])
            .with_groups(2)
            .with_padding(PaddingConfig2d::Same)
            .with_quantizer(quantizer)
            .init::<B>(&device());
        let x = [0, 1].map(|_| {
            Flow::Maps(Tensor::<B, 4>::random(
                [2, 4, 6, 6],
                Distribution::Normal(0.2, 1.0),
                &device(),
            ))
        });
        assert_refines(QuantizedLayer::Conv2d(conv), x);
    }
}
