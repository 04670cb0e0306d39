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
//! On the [asymmetric](adaround_core::Grid::Asymmetric) grid a candidate is a clipped range
//! `k / N` of `[min(w, 0), max(w, 0)]` with the integer offset that puts its low end on the
//! grid's lowest level, and `dw = (clip(round(w s - o), lo, hi) + o) / s - w`.
//!
//! Only quantizers whose finalized kernel keeps the searched grid take part: the MSE
//! quantizer on every grid up to 8 bits (it recovers any such grid from the rounded weights
//! exactly; on the asymmetric grid the levels, with an offset that may differ) and the max
//! quantizers (the clipped weights sit on the grid's top level, from which they take the
//! scale again). Others keep their own scale.

use adaround_core::{QuantizerError, WeightQuantizer, MAX_SCALE_FACTOR};
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
        WeightQuantizer::Mse { bitwidth, .. } => *bitwidth <= 8,
        _ => false,
    }
}

/// What SeqMSE chose for a layer: the mean ratio of the chosen clipping range to the
/// weights' range (`max |w|`, or `max(w, 0) - min(w, 0)` on the asymmetric grid) over the
/// channels, and the layer's summed loss (less its constant) with nearest rounding at the
/// quantizer's own scales and at the chosen ones.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Choice {
    pub mean_ratio: f64,
    pub own_error: f64,
    pub chosen_error: f64,
}

fn f32s(v: &[f64]) -> Vec<f32> {
    v.iter().map(|&x| x as f32).collect()
}

/// The per-row loss of nearest rounding at scale factors `sf` and integer offsets `o`
/// (`[groups, rows, 1]`; `None` on the grids centred on zero):
/// `dw = (clip(round(w sf - o), lo, hi) + o) / sf - w`, `dw G dwᵀ + 2 dw rᵀ`,
/// `[groups, rows, 1]`.
fn row_errors<B: Backend>(
    w: &Tensor<B, 3>,
    (sf, o): (Tensor<B, 3>, Option<Tensor<B, 3>>),
    (lo, hi): (f64, f64),
    (g, r): (&Tensor<B, 3>, Option<&Tensor<B, 3>>),
) -> Tensor<B, 3> {
    let z = w.clone() * sf.clone();
    let q = match o {
        Some(o) => (z - o.clone()).round().clamp(lo, hi) + o,
        None => z.round().clamp(lo, hi),
    } / sf;
    let dw = q - w.clone();
    let dg = gram::matmul(dw.clone(), g.clone());
    let dg = match r {
        Some(r) => dg + r.clone().mul_scalar(2.0),
        None => dg,
    };
    (dw * dg).sum_dim(2)
}

/// A grid per row: scale factors and integer offsets (empty on the grids centred on zero).
#[derive(Clone, Debug, Default)]
pub(crate) struct RowGrids {
    pub sf: Vec<f64>,
    pub offsets: Vec<f64>,
}

/// SeqMSE's candidate grids of every row of `w` (`[groups, rows, K]`) on `levels`, after
/// the quantizer's own (`own`): the clipping ranges `k / N` of the row's range (of the
/// whole kernel's: not `per_axis`) for `k = 1..=N`, scale factors capped at
/// [`MAX_SCALE_FACTOR`]. Centred grids: `sf = hi / (k/N max |w|)`. Asymmetric grid (`own`
/// has offsets): the range `[min(w, 0), max(w, 0)]` clipped to `k/N` of itself,
/// `sf = (hi - lo) / range`, the offset putting its low end on `lo` (as the quantizer's own
/// search places it). Also each row's scale factor for its whole range, for the chosen ratio.
fn candidates<B: Backend>(
    w: &Tensor<B, 3>,
    own: RowGrids,
    (lo, hi): (f64, f64),
    per_axis: bool,
) -> (Vec<RowGrids>, Vec<f64>) {
    let [groups, rows, _] = w.dims();
    let reduce = |t: Tensor<B, 3>, max: bool| {
        let t = if per_axis { t } else { t.reshape([1, 1, -1]) };
        let r = if max { t.max_dim(2) } else { t.min_dim(2) };
        let r = values(r);
        (0..groups * rows)
            .map(|i| r[i % r.len()])
            .collect::<Vec<_>>()
    };
    let asymmetric = !own.offsets.is_empty();
    let (low, high) = if asymmetric {
        (
            reduce(w.clone().clamp_max(0.0), false),
            reduce(w.clone().clamp_min(0.0), true),
        )
    } else {
        (vec![0.0; groups * rows], reduce(w.clone().abs(), true))
    };
    // The scale factor that spreads each row's whole range over the grid (uncapped).
    let codes = if asymmetric { hi - lo } else { hi };
    let whole: Vec<f64> = (0..groups * rows)
        .map(|i| codes / (high[i] - low[i]).max(adaround_core::MIN_RANGE))
        .collect();
    let mut grids = vec![own];
    grids.extend((1..=CANDIDATES).map(|k| {
        let kept = k as f64 / CANDIDATES as f64;
        // The quantizers cap their scale factors; so does the search (a channel of tiny
        // weights keeps the capped scale, which the finalized quantizer takes again).
        let sf: Vec<f64> = whole
            .iter()
            .map(|s| (s / kept).min(MAX_SCALE_FACTOR))
            .collect();
        let offsets = if asymmetric {
            (0..sf.len())
                .map(|i| ((low[i] * kept * sf[i]).round_ties_even() - lo).clamp(-hi, -lo))
                .collect()
        } else {
            Vec::new()
        };
        RowGrids { sf, offsets }
    }));
    (grids, whole)
}

/// The grids SeqMSE chooses for the kernel `w` (`[groups, rows, K]`) quantized on
/// `levels`, from its own grids `own` (one per row): one per row (`per_axis`) or one for
/// all, in row order; with the loss of each candidate kept.
pub(crate) fn search<B: Backend>(
    w: &Tensor<B, 3>,
    own: RowGrids,
    (levels, per_axis): ((f64, f64), bool),
    (g, r): (&Tensor<B, 3>, Option<&Tensor<B, 3>>),
) -> (RowGrids, Choice) {
    let [groups, rows, _] = w.dims();
    let asymmetric = !own.offsets.is_empty();
    // Losses per row, candidates in order: the own grid first (it wins ties).
    let (grids, whole) = candidates(w, own, levels, per_axis);
    let column = |v: &[f64]| {
        Tensor::<B, 3>::from_data(TensorData::new(f32s(v), [groups, rows, 1]), &w.device())
    };
    let errors: Vec<Vec<f64>> = grids
        .iter()
        .map(|c| {
            let o = asymmetric.then(|| column(&c.offsets));
            values(row_errors(w, (column(&c.sf), o), levels, (g, r)))
        })
        .collect();
    let n = groups * rows;
    let best = |errs: &dyn Fn(usize) -> f64| {
        (0..grids.len()).fold(0, |b, c| if errs(c) < errs(b) { c } else { b })
    };
    let chosen: Vec<usize> = if per_axis {
        (0..n).map(|i| best(&|c| errors[c][i])).collect()
    } else {
        vec![best(&|c| errors[c].iter().sum()); n]
    };
    let pick = |f: &dyn Fn(&RowGrids) -> &Vec<f64>| -> Vec<f64> {
        let v: Vec<f64> = (0..n).map(|i| f(&grids[chosen[i]])[i]).collect();
        if per_axis {
            v
        } else {
            vec![v[0]]
        }
    };
    let sf = pick(&|c| &c.sf);
    let offsets = if asymmetric {
        pick(&|c| &c.offsets)
    } else {
        Vec::new()
    };
    let choice = Choice {
        // At most 1: the capped scale of a channel of tiny weights spans more than its range.
        mean_ratio: (0..n)
            .map(|i| (whole[i] / grids[chosen[i]].sf[i]).min(1.0))
            .sum::<f64>()
            / n.max(1) as f64,
        own_error: errors[0].iter().sum(),
        chosen_error: chosen.iter().enumerate().map(|(i, &c)| errors[c][i]).sum(),
    };
    (RowGrids { sf, offsets }, choice)
}

/// `layer` (AdaRound armed, one kernel with a matrix form and a quantizer SeqMSE
/// [supports]) re-armed on the grids SeqMSE chooses on the loss `grams` describe; `None`
/// where it has another form (the caller keeps the quantizer's scale).
pub(crate) fn rescale<B: Backend>(
    layer: QuantizedLayer<B>,
    grams: &Grams<B>,
) -> Option<Result<(QuantizedLayer<B>, Choice), QuantizerError>> {
    let matrix = layer.matrix()?;
    let [ada] = layer.adarounds()[..] else {
        return None;
    };
    if !supports(&ada.quantizer) {
        return None;
    }
    let w = matrix.float_matrix();
    let per_row = |t: Tensor<B, 4>| {
        values(
            matrix
                .to_matrix(ada.w_floor.val().zeros_like() + t)
                .narrow(2, 0, 1),
        )
    };
    let own = RowGrids {
        sf: per_row(ada.sf.val()),
        offsets: ada.offset().map(per_row).unwrap_or_default(),
    };
    let (g, r) = refine::summed(grams);
    let per_axis = ada.quantizer.is_per_axis();
    let (grids, choice) = search(&w, own, (ada.levels(), per_axis), (&g, r.as_ref()));
    let shape = ada.sf.dims();
    let tensor = |v: &[f64]| {
        Tensor::<B, 1>::from_data(TensorData::new(f32s(v), [v.len()]), &w.device()).reshape(shape)
    };
    let offset = (!grids.offsets.is_empty()).then(|| tensor(&grids.offsets));
    let weights = matrix.to_kernel(w.clone());
    let armed = ada
        .clone()
        .with_encoding(weights, tensor(&grids.sf), offset);
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
    use adaround_core::{AdaRoundParams, Grid};
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
    /// rounded to nearest on the channels' grids (scale factors, offsets or none; the bias
    /// cancels).
    fn output_errors(
        w: &Tensor<B, 2>,
        (sf, o): (&[f64], &[f64]),
        (lo, hi): (f64, f64),
        (x, t): (&Tensor<B, 2>, &Tensor<B, 2>),
    ) -> Vec<f64> {
        let row = |v: &[f64]| {
            Tensor::<B, 1>::from_data(TensorData::new(f32s(v), [6]), &device()).reshape([1, 6])
        };
        let sf = row(sf);
        let o = if o.is_empty() {
            sf.zeros_like()
        } else {
            row(o)
        };
        let q = ((w.clone() * sf.clone() - o.clone()).round().clamp(lo, hi) + o) / sf;
        let diff = x.clone().matmul(q) - t.clone().matmul(w.clone());
        host(diff.square().sum_dim(0))
    }

    /// The chosen grid of each channel (scale factors, offsets), read back from the re-armed
    /// layer.
    fn chosen(layer: &QuantizedLayer<B>) -> (Vec<f64>, Vec<f64>) {
        let ada = &layer.adarounds()[0];
        (
            values(ada.sf.val()),
            ada.meta.offsets.iter().map(|&o| f64::from(o)).collect(),
        )
    }

    /// Every grid SeqMSE tries for the Dense kernel `w` (`[16, 6]`, channels on axis 1),
    /// computed here from its definition: the quantizer's own, then the clipping ranges
    /// `k / N` of `max |w|` (centred grids) or of `[min(w, 0), max(w, 0)]` (asymmetric).
    fn all_candidates(quantizer: &WeightQuantizer, w: &Tensor<B, 2>) -> Vec<(Vec<f64>, Vec<f64>)> {
        let (lo, hi) = quantizer.levels().unwrap();
        let own = quantizer.encoding(w.clone(), 1).unwrap();
        let own_offsets = own.offset.map(values).unwrap_or_default();
        let asymmetric = !own_offsets.is_empty();
        let mut all = vec![(values(own.scale_factor), own_offsets)];
        let maxes = host(w.clone().abs().max_dim(0));
        let highs = host(w.clone().clamp_min(0.0).max_dim(0));
        let lows = host(w.clone().clamp_max(0.0).min_dim(0));
        all.extend((1..=CANDIDATES).map(|k| {
            let kept = k as f64 / CANDIDATES as f64;
            if !asymmetric {
                return (maxes.iter().map(|m| hi / (kept * m)).collect(), Vec::new());
            }
            let sf: Vec<f64> = (0..6)
                .map(|j| (hi - lo) / (kept * (highs[j] - lows[j])))
                .collect();
            let o = (0..6)
                .map(|j| ((lows[j] * kept * sf[j]).round_ties_even() - lo).clamp(-hi, -lo))
                .collect();
            (sf, o)
        }));
        all
    }

    #[test]
    fn should_choose_the_scale_with_the_lowest_layer_output_error_among_its_candidates() {
        let quantizers = [
            WeightQuantizer::max_per_axis(3).unwrap(),
            WeightQuantizer::mse(3, true, Grid::FullRange).unwrap(),
            WeightQuantizer::mse(3, true, Grid::Asymmetric).unwrap(),
        ];
        for quantizer in quantizers {
            let (layer, x, other) = case(quantizer.clone());
            let QuantizedLayer::Dense(dense) = &layer else {
                unreachable!()
            };
            let w = dense.weight.val();
            let levels = quantizer.levels().unwrap();
            let candidates = all_candidates(&quantizer, &w);
            let own = &candidates[0];
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
                let (sf, o) = chosen(&rescaled);
                assert_eq!(
                    o.is_empty(),
                    own.1.is_empty(),
                    "{quantizer:?}: offsets kept"
                );
                let errors = output_errors(&w, (&sf, &o), levels, (&x, &t));
                for (c_sf, c_o) in &candidates {
                    let other = output_errors(&w, (c_sf, c_o), levels, (&x, &t));
                    for (j, (e, o)) in errors.iter().zip(&other).enumerate() {
                        assert!(*e <= o * (1.0 + 1e-4) + 1e-6, "channel {j}: {e} above {o}");
                    }
                }
                let own_total: f64 = output_errors(&w, (&own.0, &own.1), levels, (&x, &t))
                    .iter()
                    .sum();
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
            WeightQuantizer::mse(3, true, Grid::Asymmetric).unwrap(),
            WeightQuantizer::mse(4, false, Grid::Asymmetric).unwrap(),
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
