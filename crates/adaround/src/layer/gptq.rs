//! GPTQ ([Frantar et al. 2022](https://arxiv.org/abs/2210.17323)) on the Gram path: a rounding
//! of its own, in seconds per layer instead of AdaRound's thousands of steps.
//!
//! The layer's loss is the quadratic form of the [Gram module](crate::gram),
//! `(W~ - W*) H (W~ - W*)ᵀ + const` per output row, with `H = G` summed over the batches and
//! `W* = W - R G⁻¹` the float weights that fit the targets best (`W` itself when the targets
//! come from the same inputs). GPTQ rounds each row's weights one input column at a time and
//! moves the columns not yet rounded so that they absorb the rounding error as well as `H`
//! allows: with `U` the upper Cholesky factor of `H⁻¹` (damped: `H + λ I`, `λ` a hundredth of
//! the mean diagonal), the error `e = (w_j - q_j) / U_jj` is subtracted as `e U_j,k` from
//! every later column `k`. On a diagonal `H` nothing moves and GPTQ is nearest rounding.
//!
//! Each weight is rounded to one of AdaRound's two candidates, the grid levels just below
//! and above its float weight (clipped to the grid's range), whichever is nearer to the
//! moved weight: the result is an AdaRound rounding (hard decisions), which the refinement
//! and the finalizing step take as they take AdaRound's. With the max scales, weights on the
//! grid's top level keep it (the finalized quantizer derives its scale from them).

use adaround_core::WeightQuantizer;
use adaround_layers::QuantizedLayer;
use burn::tensor::{backend::Backend, Tensor};
use rayon::prelude::*;

use crate::{
    gram::Grams,
    refine::{self, values},
};

/// Damping of `H`, relative to its mean diagonal (GPTQ's default).
const DAMP: f64 = 0.01;

/// `layer` (AdaRound armed, one kernel with a matrix form) with every `alpha` saturated to
/// GPTQ's decision on the loss `grams` describe; unchanged where it has another form.
pub(crate) fn round<B: Backend>(layer: QuantizedLayer<B>, grams: &Grams<B>) -> QuantizedLayer<B> {
    let Some(matrix) = layer.matrix() else {
        return layer;
    };
    let [ada] = layer.adarounds()[..] else {
        return layer;
    };
    let (lo, hi) = ada.levels();
    let full = |t: Tensor<B, 4>| matrix.to_matrix(ada.w_floor.val().zeros_like() + t);
    let sf = full(ada.sf.val());
    // Positions on the grid, in steps: `w sf - o`.
    let x = matrix.float_matrix() * sf.clone();
    let x = match ada.offset() {
        Some(o) => x - full(o),
        None => x,
    };
    let floor = values(matrix.to_matrix(ada.w_floor.val()));
    let (g, r) = refine::summed(grams);
    // The float weights that fit the targets best, in steps: `x - sf (R G⁻¹)` (below).
    let r = r.map(|r| values(r * sf.clone()));
    let [groups, rows, k] = matrix.matrix_dims();
    let (g, x) = (values(g), values(x));
    let max_scale = matches!(
        ada.quantizer,
        WeightQuantizer::Max { .. } | WeightQuantizer::MaxPerAxis { .. }
    );
    let rows_rounding = RowRounding {
        levels: (lo, hi),
        max_scale,
    };
    let mut h = vec![0f32; groups * rows * k];

    for gi in 0..groups {
        let (l, u) = factors(&g[gi * k * k..(gi + 1) * k * k], k);
        let at = gi * rows * k..(gi + 1) * rows * k;
        let mut target = x[at.clone()].to_vec();
        if let Some(r) = &r {
            // x* = x - (sf R) H⁻¹, row by row (H symmetric).
            for (row, r) in target.chunks_mut(k).zip(r[at.clone()].chunks(k)) {
                let shift = solve(&l, r, k);
                row.iter_mut().zip(shift).for_each(|(x, s)| *x -= s);
            }
        }
        h[at.clone()]
            .par_chunks_mut(k)
            .zip(target.par_chunks_mut(k))
            .zip(floor[at.clone()].par_chunks(k))
            .zip(x[at].par_chunks(k))
            .for_each(|(((h, w), floor), x0)| rows_rounding.row(w, (floor, x0), &u, h));
    }
    let h = Tensor::<B, 1>::from_floats(h.as_slice(), &sf.device()).reshape([groups, rows, k]);
    let h = matrix.to_kernel(h);
    refine::with_decisions(layer, h)
}

/// The grid the rows are rounded on.
struct RowRounding {
    levels: (f64, f64),
    /// Weights on the top level keep it.
    max_scale: bool,
}

impl RowRounding {
    /// Rounds one row in place: `w` the moved weights in steps (from the target), `floor`
    /// and `x0` AdaRound's floor and the float position of each weight, `u` the upper
    /// Cholesky factor of `H⁻¹` (row-major); writes the decisions (1: up) to `h`.
    fn row(&self, w: &mut [f64], (floor, x0): (&[f64], &[f64]), u: &[f64], h: &mut [f32]) {
        let k = w.len();
        let (lo, hi) = self.levels;
        for j in 0..k {
            let down = floor[j].clamp(lo, hi);
            let up = (floor[j] + 1.0).clamp(lo, hi);
            let nearest_up = x0[j] - floor[j] >= 0.5;
            let top = self.max_scale && {
                let z = if nearest_up { up } else { down };
                z.abs() >= hi - 0.5
            };
            let choose_up = if top {
                nearest_up
            } else {
                (w[j] - up).abs() < (w[j] - down).abs()
            };
            let q = if choose_up { up } else { down };
            h[j] = f32::from(u8::from(choose_up));
            let e = (w[j] - q) / u[j * k + j];
            for (wk, uk) in w[j + 1..].iter_mut().zip(&u[j * k + j + 1..(j + 1) * k]) {
                *wk -= e * uk;
            }
        }
    }
}

/// The lower Cholesky factor `L` of the damped Gram matrix `H + λ I` of one group (a zero
/// diagonal entry, an input that is always 0, set to 1) and the upper Cholesky factor `U` of
/// its inverse (`H⁻¹ = Uᵀ U`), both row-major. Where `H` is not positive definite in
/// floating point, the damping grows.
fn factors(g: &[f64], k: usize) -> (Vec<f64>, Vec<f64>) {
    let mean = (0..k).map(|i| g[i * k + i]).sum::<f64>() / k as f64;
    let mut damp = DAMP * mean.max(f64::MIN_POSITIVE);
    loop {
        let mut hm = g.to_vec();
        for i in 0..k {
            if hm[i * k + i] == 0.0 {
                hm[i * k + i] = 1.0;
            }
            hm[i * k + i] += damp;
        }
        if let Some(l) = cholesky(&hm, k) {
            let inverse = inverse_from_cholesky(&l, k);
            if let Some(l2) = cholesky(&inverse, k) {
                // U = L2ᵀ.
                let mut u = vec![0.0; k * k];
                for i in 0..k {
                    for j in 0..=i {
                        u[j * k + i] = l2[i * k + j];
                    }
                }
                return (l, u);
            }
        }
        damp *= 10.0;
    }
}

/// The lower Cholesky factor `L` of `a` (`a = L Lᵀ`, row-major), `None` if `a` is not
/// positive definite.
fn cholesky(a: &[f64], k: usize) -> Option<Vec<f64>> {
    let mut l = vec![0.0; k * k];
    for i in 0..k {
        for j in 0..=i {
            let dot: f64 = (0..j).map(|p| l[i * k + p] * l[j * k + p]).sum();
            let v = a[i * k + j] - dot;
            if i == j {
                if v <= 0.0 || !v.is_finite() {
                    return None;
                }
                l[i * k + i] = v.sqrt();
            } else {
                l[i * k + j] = v / l[j * k + j];
            }
        }
    }
    Some(l)
}

/// `a⁻¹ = L⁻ᵀ L⁻¹` from the lower Cholesky factor `L` of `a`.
fn inverse_from_cholesky(l: &[f64], k: usize) -> Vec<f64> {
    // M = L⁻¹, lower triangular, by forward substitution column by column.
    let mut m = vec![0.0; k * k];
    for c in 0..k {
        for i in c..k {
            let rhs = if i == c { 1.0 } else { 0.0 };
            let dot: f64 = (c..i).map(|p| l[i * k + p] * m[p * k + c]).sum();
            m[i * k + c] = (rhs - dot) / l[i * k + i];
        }
    }
    // a⁻¹[i][j] = sum_p M[p][i] M[p][j], p >= max(i, j).
    let mut inv = vec![0.0; k * k];
    inv.par_chunks_mut(k).enumerate().for_each(|(i, row)| {
        for (j, v) in row.iter_mut().enumerate() {
            *v = (i.max(j)..k).map(|p| m[p * k + i] * m[p * k + j]).sum();
        }
    });
    inv
}

/// `r H⁻¹` for one row `r`, from the lower Cholesky factor `L` of `H` (symmetric).
fn solve(l: &[f64], r: &[f64], k: usize) -> Vec<f64> {
    // L y = r, then Lᵀ z = y.
    let mut y = vec![0.0; k];
    for i in 0..k {
        let dot: f64 = (0..i).map(|p| l[i * k + p] * y[p]).sum();
        y[i] = (r[i] - dot) / l[i * k + i];
    }
    let mut z = vec![0.0; k];
    for i in (0..k).rev() {
        let dot: f64 = (i + 1..k).map(|p| l[p * k + i] * z[p]).sum();
        z[i] = (y[i] - dot) / l[i * k + i];
    }
    z
}

#[cfg(test)]
mod tests {
    use adaround_core::AdaRoundParams;
    use adaround_layers::{probe::Flow, QuantizedDenseConfig};
    use burn::tensor::{Distribution, ElementConversion};

    use super::*;
    use crate::{
        gram::{self, Sums},
        ReconstructionLoss,
    };

    type B = burn_ndarray::NdArray<f32>;

    fn device() -> burn::tensor::Device<B> {
        Default::default()
    }

    fn dense() -> QuantizedLayer<B> {
        let layer = QuantizedDenseConfig::new(12, 6)
            .with_quantizer(WeightQuantizer::max_per_axis(3).unwrap())
            .init::<B>(&device());
        // Burn initializes parameters lazily: clones taken before would draw their own.
        let _ = burn::module::Module::devices(&layer);
        QuantizedLayer::Dense(layer)
    }

    fn armed(layer: &QuantizedLayer<B>) -> QuantizedLayer<B> {
        layer
            .clone()
            .with_adaround(&AdaRoundParams::new())
            .unwrap()
            .set_training(false)
    }

    fn decisions(layer: &QuantizedLayer<B>) -> Vec<f32> {
        let h = layer.adarounds()[0].hard_decimals();
        h.into_data().to_vec().unwrap()
    }

    /// Nearest rounding's decisions: up where the float weight's decimals are at least 0.5.
    fn nearest(layer: &QuantizedLayer<B>) -> Vec<f32> {
        let ada = &armed(layer).adarounds()[0].clone();
        let d = ada.decimals();
        d.greater_equal_elem(0.5)
            .float()
            .into_data()
            .to_vec()
            .unwrap()
    }

    #[test]
    fn should_round_to_nearest_on_a_diagonal_gram_matrix() {
        B::seed(&device(), 21);
        let layer = dense();
        let diagonal: Vec<f32> = (0..12 * 12)
            .map(|i| {
                if i % 13 == 0 {
                    1.0 + (i / 13) as f32
                } else {
                    0.0
                }
            })
            .collect();
        let g = Tensor::<B, 1>::from_floats(diagonal.as_slice(), &device()).reshape([1, 12, 12]);
        let grams = Grams {
            grams: vec![g],
            divisors: vec![1.0],
            residuals: None,
            sums: Sums {
                x: Tensor::zeros([1, 1, 12], &device()),
                d0: None,
                count: 1,
            },
        };
        let rounded = round(armed(&layer), &grams);
        assert_eq!(decisions(&rounded), nearest(&layer));
    }

    #[test]
    fn should_lower_the_loss_below_nearest_rounding_on_correlated_inputs() {
        B::seed(&device(), 22);
        let layer = dense();
        // Correlated inputs: a shared component on every feature.
        let common = Tensor::<B, 2>::random([64, 1], Distribution::Normal(0.0, 1.0), &device());
        let own = Tensor::<B, 2>::random([64, 12], Distribution::Normal(0.0, 0.3), &device());
        let x = [Flow::Rows(own + common)];
        for other in [false, true] {
            let targets = [layer.forward_float_flow(match (&x[0], other) {
                (Flow::Rows(t), true) => Flow::Rows(t.clone().mul_scalar(1.05)),
                (flow, _) => flow.clone(),
            })];
            let t = other.then_some(&targets[..]);
            let grams = gram::grams(&layer, &x, t, ReconstructionLoss::Mse).unwrap();
            let loss =
                |l: &QuantizedLayer<B>| -> f64 { gram::error(&layer, l, &grams).elem::<f64>() };
            let rounded = round(armed(&layer), &grams);
            let (gptq, _) = rounded.finalize(true);
            let near = loss(&layer);
            assert!(
                loss(&gptq) < 0.8 * near,
                "other inputs {other}: GPTQ {} vs nearest {near}",
                loss(&gptq)
            );
        }
    }
}
