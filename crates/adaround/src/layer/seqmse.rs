//! SeqMSE (AIMET's sequential MSE): each output channel's scale chosen by the layer's output
//! error on the calibration samples instead of by the weights' own error, before AdaRound
//! (or GPTQ) rounds on that grid.
//!
//! For a candidate scale factor `s` of an output row `w` (the kernel as a matrix, one row
//! per output channel), nearest rounding gives `dw = clip(round(w s), lo, hi) / s - w` and
//! the layer's loss on the Gram form ([`gram`](crate::gram)) is, up to a constant,
//!
//! `e(s) = dw G dwᵀ + 2 dw rᵀ`
//!
//! (`G` the input patches' Gram matrix, `r` the row's residual against targets from other
//! inputs, zero otherwise): one matrix product per candidate for the whole layer, whatever
//! the number of samples. The candidates are AIMET's, the clipping ranges `k / N` of the
//! row's `max |w|` for `k = 1..=N` ([`CANDIDATES`]; their scale factors capped at the
//! quantizers' [`MAX_SCALE_FACTOR`]), and the quantizer's own scale; a
//! per-tensor quantizer gets one scale for the whole kernel (the candidate with the lowest
//! summed error). AdaRound then starts from the floor and fractional part on that grid.
//!
//! Only quantizers whose finalized kernel keeps the searched grid take part: the MSE
//! quantizer on the grids centred on zero up to 8 bits (it recovers any such grid from the
//! rounded weights exactly) and the max quantizers (the clipped weights sit on the grid's
//! top level, from which they take the scale again). Others keep their own scale.

use adaround_core::{Grid, QuantizerError, WeightQuantizer, MAX_SCALE_FACTOR};
use adaround_layers::{QuantizedLayer, QuantizerSlot};
use burn::tensor::{backend::Backend, Tensor, TensorData};

use crate::{
    gram::{self, Grams},
    refine::{self, values},
};

/// Number of clipping ranges tried per channel, `k / N * max |w|` for `k = 1..=N` (AIMET's
/// `num_candidates` is 20; twice as fine here, for steps of 2.5 % of the range).
pub const CANDIDATES: usize = 40;

/// Whether SeqMSE can set `quantizer`'s scale (see the [module docs](self)).
pub(crate) fn supports(quantizer: &WeightQuantizer) -> bool {
    match quantizer {
        WeightQuantizer::Max { .. } | WeightQuantizer::MaxPerAxis { .. } => true,
        WeightQuantizer::Mse { bitwidth, grid, .. } => *bitwidth <= 8 && *grid != Grid::Asymmetric,
        _ => false,
    }
}

/// What SeqMSE chose for a layer: the mean ratio of the chosen clipping range to `max |w|`
/// over the channels, and the layer's summed loss (less its constant) with nearest
/// rounding at the quantizer's own scales and at the chosen ones.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Choice {
    pub mean_ratio: f64,
    pub own_error: f64,
    pub chosen_error: f64,
}

fn f32s(v: &[f64]) -> Vec<f32> {
    v.iter().map(|&x| x as f32).collect()
}

/// The per-row loss of nearest rounding at scale factors `sf` (`[groups, rows, 1]`, or one
/// value): `dw G dwᵀ + 2 dw rᵀ`, `[groups, rows, 1]`.
fn row_errors<B: Backend>(
    w: &Tensor<B, 3>,
    sf: Tensor<B, 3>,
    (lo, hi): (f64, f64),
    (g, r): (&Tensor<B, 3>, Option<&Tensor<B, 3>>),
) -> Tensor<B, 3> {
    let q = (w.clone() * sf.clone()).round().clamp(lo, hi) / sf;
    let dw = q - w.clone();
    let dg = gram::matmul(dw.clone(), g.clone());
    let dg = match r {
        Some(r) => dg + r.clone().mul_scalar(2.0),
        None => dg,
    };
    (dw * dg).sum_dim(2)
}

/// The scale factors SeqMSE chooses for the kernel `w` (`[groups, rows, K]`) quantized on
/// `levels`, from its own scale factors `own` (`[groups, rows, 1]`): one per row
/// (`per_axis`) or one for all, in row order; with the loss of each candidate kept.
pub(crate) fn search<B: Backend>(
    w: &Tensor<B, 3>,
    own: Tensor<B, 3>,
    (levels, per_axis): ((f64, f64), bool),
    (g, r): (&Tensor<B, 3>, Option<&Tensor<B, 3>>),
) -> (Vec<f64>, Choice) {
    let [groups, rows, _] = w.dims();
    let hi = levels.1;
    let max = if per_axis {
        w.clone().abs().max_dim(2)
    } else {
        w.clone()
            .abs()
            .max()
            .reshape([1, 1, 1])
            .expand([groups, rows, 1])
    }
    .clamp_min(adaround_core::MIN_RANGE);
    // Losses per row, candidates in order: the own scale first (it wins ties).
    let mut scales = vec![values(own.clone())];
    scales.extend((1..=CANDIDATES).map(|k| {
        let range = max.clone().mul_scalar(k as f64 / CANDIDATES as f64);
        // The quantizers cap their scale factors; so does the search (a channel of tiny
        // weights keeps the capped scale, which the finalized quantizer takes again).
        values(range.recip().mul_scalar(hi).clamp_max(MAX_SCALE_FACTOR))
    }));
    let errors: Vec<Vec<f64>> = scales
        .iter()
        .map(|sf| {
            let sf = Tensor::from_data(TensorData::new(f32s(sf), [groups, rows, 1]), &w.device());
            values(row_errors(w, sf, levels, (g, r)))
        })
        .collect();
    let n = groups * rows;
    let best = |errs: &dyn Fn(usize) -> f64| {
        (0..scales.len()).fold(0, |b, c| if errs(c) < errs(b) { c } else { b })
    };
    let chosen: Vec<usize> = if per_axis {
        (0..n).map(|i| best(&|c| errors[c][i])).collect()
    } else {
        vec![best(&|c| errors[c].iter().sum()); n]
    };
    let sf: Vec<f64> = chosen
        .iter()
        .enumerate()
        .map(|(i, &c)| scales[c][i])
        .collect();
    let maxes = values(max);
    let choice = Choice {
        // At most 1: the capped scale of a channel of tiny weights spans more than its max.
        mean_ratio: (0..n)
            .map(|i| (hi / (sf[i] * maxes[i])).min(1.0))
            .sum::<f64>()
            / n.max(1) as f64,
        own_error: errors[0].iter().sum(),
        chosen_error: chosen.iter().enumerate().map(|(i, &c)| errors[c][i]).sum(),
    };
    let sf = if per_axis { sf } else { vec![sf[0]] };
    (sf, choice)
}

/// `layer` (AdaRound armed, one kernel with a matrix form and a quantizer SeqMSE
/// [supports]) re-armed on the scales SeqMSE chooses on the loss `grams` describe; `None`
/// where it has another form (the caller keeps the quantizer's scale).
pub(crate) fn rescale<B: Backend>(
    layer: QuantizedLayer<B>,
    grams: &Grams<B>,
) -> Option<Result<(QuantizedLayer<B>, Choice), QuantizerError>> {
    let matrix = layer.matrix()?;
    let [ada] = layer.adarounds()[..] else {
        return None;
    };
    if !supports(&ada.quantizer) || ada.offset().is_some() {
        return None;
    }
    let w = matrix.float_matrix();
    let own = matrix.to_matrix(ada.w_floor.val().zeros_like() + ada.sf.val());
    let [groups, rows, _] = w.dims();
    let own = own.narrow(2, 0, 1);
    let (g, r) = refine::summed(grams);
    let per_axis = ada.quantizer.is_per_axis();
    let (sf, choice) = search(&w, own, (ada.levels(), per_axis), (&g, r.as_ref()));
    debug_assert!(sf.len() == groups * rows || sf.len() == 1);
    let shape = ada.sf.dims();
    let sf = Tensor::<B, 1>::from_data(TensorData::new(f32s(&sf), [sf.len()]), &w.device());
    let weights = matrix.to_kernel(w);
    let armed = ada.clone().with_scale_factor(weights, sf.reshape(shape));
    Some(armed.map(|armed| {
        let mut armed = Some(armed);
        let layer = layer.map_slots(&mut |slot| match slot {
            QuantizerSlot::AdaRound(_) => {
                QuantizerSlot::AdaRound(armed.take().expect("one AdaRound kernel"))
            }
            plain => plain,
        });
        (layer, choice)
    }))
}

#[cfg(test)]
mod tests {
    use adaround_core::AdaRoundParams;
    use adaround_layers::{probe::Flow, QuantizedDenseConfig};
    use burn::tensor::Distribution;

    use super::*;
    use crate::ReconstructionLoss;

    type B = burn_ndarray::NdArray<f32>;

    fn device() -> burn::tensor::Device<B> {
        Default::default()
    }

    fn host(t: Tensor<B, 2>) -> Vec<f64> {
        values(t)
    }

    /// A Dense layer 16 -> 6 quantized by `quantizer`, and correlated inputs (a non-diagonal
    /// Gram matrix): 64 rows, and the same rows moved by noise (the float model's inputs).
    fn case(quantizer: WeightQuantizer) -> (QuantizedLayer<B>, Tensor<B, 2>, Tensor<B, 2>) {
        B::seed(&device(), 17);
        let layer = QuantizedDenseConfig::new(16, 6)
            .with_quantizer(quantizer)
            .init::<B>(&device());
        let _ = burn::module::Module::devices(&layer);
        let z = Tensor::<B, 2>::random([64, 16], Distribution::Normal(0.0, 1.0), &device());
        let mix = Tensor::<B, 2>::random([16, 16], Distribution::Normal(0.0, 0.5), &device());
        let x = z.matmul(mix);
        let other = x.clone() + x.random_like(Distribution::Normal(0.0, 0.2));
        (QuantizedLayer::Dense(layer), x, other)
    }

    /// Per output channel, `sum_n ((x Q)_nj - (t W)_nj)^2` for the kernel `w` (`[16, 6]`)
    /// rounded to nearest at the channels' scale factors `sf` (the bias cancels).
    fn output_errors(
        w: &Tensor<B, 2>,
        sf: &[f64],
        (lo, hi): (f64, f64),
        (x, t): (&Tensor<B, 2>, &Tensor<B, 2>),
    ) -> Vec<f64> {
        let sf =
            Tensor::<B, 1>::from_data(TensorData::new(f32s(sf), [6]), &device()).reshape([1, 6]);
        let q = (w.clone() * sf.clone()).round().clamp(lo, hi) / sf;
        let diff = x.clone().matmul(q) - t.clone().matmul(w.clone());
        host(diff.square().sum_dim(0))
    }

    /// The chosen scale factor of each channel, read back from the re-armed layer.
    fn chosen(layer: &QuantizedLayer<B>) -> Vec<f64> {
        values(layer.adarounds()[0].sf.val())
    }

    #[test]
    fn should_choose_the_scale_with_the_lowest_layer_output_error_among_its_candidates() {
        let quantizers = [
            WeightQuantizer::max_per_axis(3).unwrap(),
            WeightQuantizer::mse(3, true, Grid::FullRange).unwrap(),
        ];
        for quantizer in quantizers {
            let (layer, x, other) = case(quantizer.clone());
            let QuantizedLayer::Dense(dense) = &layer else {
                unreachable!()
            };
            let w = dense.weight.val();
            let levels = quantizer.levels().unwrap();
            let own = values(quantizer.scale_factor(w.clone(), 1).unwrap());
            let maxes = host(w.clone().abs().max_dim(0));
            let mut candidates = vec![own.clone()];
            candidates.extend((1..=CANDIDATES).map(|k| {
                let ratio = k as f64 / CANDIDATES as f64;
                maxes.iter().map(|m| levels.1 / (ratio * m)).collect()
            }));
            // Targets from the same inputs, then from other inputs (the residual term).
            for targets in [None, Some(other.clone())] {
                let t = targets.clone().unwrap_or_else(|| x.clone());
                let float_targets = targets.map(|t| vec![layer.forward_float_flow(Flow::Rows(t))]);
                let grams = gram::grams(
                    &layer,
                    &[Flow::Rows(x.clone())],
                    float_targets.as_deref(),
                    ReconstructionLoss::Mse,
                )
                .unwrap();
                let armed = layer.clone().with_adaround(&AdaRoundParams::new()).unwrap();
                let (rescaled, choice) = rescale(armed, &grams).unwrap().unwrap();
                let sf = chosen(&rescaled);
                let errors = output_errors(&w, &sf, levels, (&x, &t));
                for c in &candidates {
                    let other = output_errors(&w, c, levels, (&x, &t));
                    for (j, (e, o)) in errors.iter().zip(&other).enumerate() {
                        assert!(*e <= o * (1.0 + 1e-4) + 1e-6, "channel {j}: {e} above {o}");
                    }
                }
                let own_total: f64 = output_errors(&w, &own, levels, (&x, &t)).iter().sum();
                assert!(
                    errors.iter().sum::<f64>() < 0.95 * own_total,
                    "{quantizer:?}: the search improves on the quantizer's own scales"
                );
                assert!(choice.chosen_error < choice.own_error);
                assert!(choice.mean_ratio > 0.0 && choice.mean_ratio <= 1.0);
            }
        }
    }

    #[test]
    fn should_keep_the_searched_grid_once_finalized() {
        for quantizer in [
            WeightQuantizer::max_per_axis(3).unwrap(),
            WeightQuantizer::mse(3, true, Grid::FullRange).unwrap(),
            WeightQuantizer::mse(4, false, Grid::Symmetric).unwrap(),
        ] {
            let (layer, x, _) = case(quantizer.clone());
            let grams =
                gram::grams(&layer, &[Flow::Rows(x)], None, ReconstructionLoss::Mse).unwrap();
            let armed = layer.clone().with_adaround(&AdaRoundParams::new()).unwrap();
            let (rescaled, _) = rescale(armed, &grams).unwrap().unwrap();
            let ada = rescaled.adarounds()[0].clone();
            let nearest: Tensor<B, 2> = ada.hard_recons_weights();
            let (finalized, _) = rescaled.set_training(false).finalize(true);
            let QuantizedLayer::Dense(dense) = finalized else {
                unreachable!()
            };
            let kept = dense.weight.val();
            let diff = host((kept.clone() - nearest.clone()).abs().max_dim(0));
            assert!(
                diff.iter().all(|d| *d < 1e-6),
                "{quantizer:?}: finalized kernel moved by {diff:?}"
            );
            // And the finalized quantizer applied again leaves it where it is.
            let again = quantizer.quantize(kept.clone(), 1);
            let moved = host((again - kept).abs().max_dim(0));
            assert!(moved.iter().all(|d| *d < 1e-6), "{quantizer:?}: {moved:?}");
        }
    }

    #[test]
    fn should_leave_quantizers_that_keep_their_own_scale() {
        let (layer, x, _) = case(WeightQuantizer::std_per_axis(3, 3.0).unwrap());
        let grams = gram::grams(&layer, &[Flow::Rows(x)], None, ReconstructionLoss::Mse).unwrap();
        let armed = layer.with_adaround(&AdaRoundParams::new()).unwrap();
        assert!(rescale(armed, &grams).is_none());
    }
}
