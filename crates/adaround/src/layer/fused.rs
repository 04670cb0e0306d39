//! The fused AdaRound step: loss, analytic gradient and Adam on the inner backend.
//!
//! For a Dense or Conv2D layer without a following activation, the step's gradient has a
//! closed form, so it runs without autodiff, with the kernel laid out as a matrix
//! `[groups, C_out / groups, K]` (`K = C_in / groups * kh * kw`):
//!
//! - `s = sigmoid(alpha)`, `u = s (zeta - gamma) + gamma`, `h = clip(u, 0, 1)`,
//!   `z = w_floor + h`, `W~ = (clip(z, lo, hi) + o) / sf` (the grid's levels; `o` the
//!   asymmetric grid's integer offsets, else 0), `dW = W~ - W`;
//! - Gram path: `rec = sum(dW ⊙ dW G) / n`, `dL/dW~ = 2 dW G / n`; direct path on cached
//!   im2col patches `X` and targets `T` (bias removed): `E = X W~ᵀ - T` (patches `X` and targets as rows), `rec = sum(E²) / n`,
//!   `dL/dW~ = 2 Eᵀ X / n`;
//! - rounding loss `reg * sum(1 - |2h - 1|^beta)`, `d/dh = -2 beta reg |2h - 1|^(beta-1) sign(2h - 1)`;
//! - `dL/dalpha = (dL/dW~ 1[lo <= z <= hi] / sf + dR/dh) 1[0 <= u <= 1] (zeta - gamma) s (1 - s)`
//!   (the clamps pass gradient inside their bounds, bounds included, as Burn's `clamp` does);
//! - the caller's `SimpleOptimizer` on plain tensors (Burn's own Adam by default).
//!
//! It computes what the autodiff step computes, with fewer and cheaper operations; the two
//! agree to floating-point rounding (tested).

use adaround_core::{Decimals, Rounding, RoundingStatus};
use adaround_layers::{probe::Flow, MatrixLayer, QuantizedLayer, QuantizerSlot};
use burn::tensor::{backend::Backend, DType, Tensor, TensorData};

use crate::{
    gram::{self, matmul},
    host::{self, View},
    place::{place, Place},
    step::{AlphaOptimizer, Losses, Step},
    unit::Relu,
    Elementwise, ReconstructionLoss,
};

/// Largest im2col cache of the direct fused path; above it the autodiff step runs.
pub(crate) const MAX_PATCH_BYTES: usize = 512 << 20;

/// What the reconstruction loss is computed from, one entry per batch.
enum Data<B: Backend> {
    /// `[groups, K, K]` Gram matrices, and the residuals of targets from other inputs.
    Gram(Vec<Tensor<B, 3>>, Option<Vec<gram::Residual<B>>>),
    /// `[groups, M, K]` patches and `[groups, M, C_out / groups]` targets minus the bias, one
    /// row per output position. With a ReLU before the loss, the targets are through it
    /// instead, and the `[groups, 1, C_out / groups]` bias is what the outputs add first.
    Direct(
        Vec<(Tensor<B, 3>, Tensor<B, 3>)>,
        Option<(Relu, Tensor<B, 3>)>,
    ),
}

/// What one step asks of [`Fused::loss_and_gradient`].
#[derive(Clone, Copy)]
struct Ask {
    /// The batch.
    b: usize,
    /// The rounding loss's exponent, `None` in the warm start.
    beta: Option<f64>,
    /// The rounding loss's weight.
    reg: f64,
    /// Also compute the losses (their reductions are skipped otherwise).
    report: bool,
}

/// A kernel-shaped tensor (`[groups, C_out / groups, K]`).
type Matrix<B> = Tensor<B, 3>;

/// A layer under optimisation by the fused step.
pub(crate) struct Fused<B: Backend> {
    layer: QuantizedLayer<B>,
    alpha: Matrix<B>,
    w_floor: Matrix<B>,
    sf: Matrix<B>,
    /// `o / sf`, what the asymmetric grid's offsets add to `W~`.
    shift: Option<Matrix<B>>,
    weight: Matrix<B>,
    levels: (f64, f64),
    rounding: Rounding,
    optimizer: Box<dyn AlphaOptimizer<B>>,
    data: Data<B>,
    divisors: Vec<f64>,
    /// The kernel's constants in host memory, where the elementwise work runs there.
    host: Option<host::Kernel>,
    /// The whole step's state in host memory ([`Elementwise::Resident`]).
    resident: Option<Resident>,
    /// `(reg, learning rate)`.
    pub(crate) rates: (f64, f64),
}

/// The state of a host-resident step: the rounding variables, Adam's moments and the loss's
/// data, all in host memory, in the matrix layout `[groups, rows, K]`.
struct Resident {
    alpha: Vec<f32>,
    adam: host::Adam,
    data: HostData,
    /// `[groups, rows, K]`.
    dims: [usize; 3],
}

/// Where a step on `data` for a `dims` kernel runs; `resident`: whether its kernel and
/// optimizer allow the host-resident step. Host-resident only where the data also fits in
/// [`MAX_RESIDENT_BYTES`]; elsewhere where `elementwise` goes without it (`Resident` asked
/// for: `Host`; `Auto`: the device on NdArray).
fn step_place<B: Backend>(
    elementwise: Elementwise,
    device: &B::Device,
    data: &Data<B>,
    dims: [usize; 3],
    resident: bool,
) -> Place {
    let weights = dims.iter().product();
    let work = step_work(data, dims);
    place::<B>(
        elementwise,
        device,
        (weights, work),
        resident && HostData::fits(data),
    )
}

/// [`Data`] in host memory.
enum HostData {
    /// Per batch: `[groups, K, K]` Gram matrices, and the residuals `R` (`[groups, rows, K]`)
    /// and `c0` where the targets come from other inputs.
    Gram(Vec<Vec<f32>>, Option<Vec<(Vec<f32>, f64)>>),
    /// Per batch: `[groups, M, K]` patches, `[groups, M, rows]` targets minus the bias, and
    /// `M`; with a ReLU, the targets through it and the `[groups, rows]` bias.
    Direct(Vec<(Vec<f32>, Vec<f32>, usize)>, Option<(Relu, Vec<f32>)>),
}

/// Largest loss data (bytes) a host-resident step copies to host memory.
const MAX_RESIDENT_BYTES: usize = 256 << 20;

impl HostData {
    /// Whether `data` fits in [`MAX_RESIDENT_BYTES`].
    fn fits<B: Backend>(data: &Data<B>) -> bool {
        let bytes: usize = match data {
            Data::Gram(grams, residuals) => {
                grams
                    .iter()
                    .map(|g| g.shape().num_elements())
                    .sum::<usize>()
                    + residuals
                        .as_ref()
                        .map_or(0, |r| r.iter().map(|(r, _)| r.shape().num_elements()).sum())
            }
            Data::Direct(batches, _) => batches
                .iter()
                .map(|(x, t)| x.shape().num_elements() + t.shape().num_elements())
                .sum(),
        } * 4;
        bytes <= MAX_RESIDENT_BYTES
    }

    /// The device data in host memory (the caller checked that it [fits](Self::fits)).
    fn of<B: Backend>(data: &Data<B>) -> Self {
        match data {
            Data::Gram(grams, residuals) => Self::Gram(
                grams.iter().map(|g| host_values(g.clone())).collect(),
                residuals.as_ref().map(|residuals| {
                    residuals
                        .iter()
                        .map(|(r, c0)| (host_values(r.clone()), host_values(c0.clone())[0] as f64))
                        .collect()
                }),
            ),
            Data::Direct(batches, relu) => Self::Direct(
                batches
                    .iter()
                    .map(|(x, t)| (host_values(x.clone()), host_values(t.clone()), x.dims()[1]))
                    .collect(),
                relu.as_ref()
                    .map(|(relu, bias)| (*relu, host_values(bias.clone()))),
            ),
        }
    }
}

impl HostData {
    /// [`Fused::reconstruction`] in host memory on batch `b` of a `[groups, rows, K]` kernel:
    /// the loss times `n` (when `report`) and `n / 2` times its gradient with respect to W~,
    /// from `sent` (`W~ - W` on the Gram path, `W~` on the direct path).
    fn reconstruction(
        &self,
        b: usize,
        sent: &[f32],
        [groups, rows, k]: [usize; 3],
        report: bool,
    ) -> (Option<f64>, Vec<f32>) {
        let mut grad_w = vec![0f32; sent.len()];
        let w = rows * k;
        let sum = |terms: &mut dyn Iterator<Item = f32>| terms.map(f64::from).sum::<f64>();
        let rec = match self {
            Self::Gram(grams, residuals) => {
                for g in 0..groups {
                    host::matmul_into(
                        &mut grad_w[g * w..(g + 1) * w],
                        View::new(&sent[g * w..(g + 1) * w], rows, k),
                        View::new(&grams[b][g * k * k..(g + 1) * k * k], k, k),
                    );
                }
                match residuals {
                    // Gradient `dW G + R`, loss `sum(dW ⊙ (dW G + 2 R)) + c0`.
                    Some(residuals) => {
                        let (r, c0) = &residuals[b];
                        grad_w.iter_mut().zip(r).for_each(|(g, r)| *g += r);
                        report.then(|| {
                            let terms = sent.iter().zip(&grad_w).zip(r);
                            sum(&mut terms.map(|((&d, &g), &r)| d * (g + r))) + c0
                        })
                    }
                    None => {
                        report.then(|| sum(&mut sent.iter().zip(&grad_w).map(|(&d, &g)| d * g)))
                    }
                }
            }
            Self::Direct(batches, relu) => {
                let (x, t, m) = &batches[b];
                let m = *m;
                // `E = X W~ᵀ - T`, gradient `Eᵀ X`; with a ReLU, `E = relu(X W~ᵀ + b) - T`
                // and the gradient `(E ⊙ mask)ᵀ X`, the mask where the ReLU passes.
                let mut e = vec![0f32; groups * m * rows];
                let mut squares = 0f64;
                for g in 0..groups {
                    let x = View::new(&x[g * m * k..(g + 1) * m * k], m, k);
                    let out = &mut e[g * m * rows..(g + 1) * m * rows];
                    host::matmul_into(out, x, View::new(&sent[g * w..(g + 1) * w], rows, k).t());
                    let t = &t[g * m * rows..(g + 1) * m * rows];
                    match relu {
                        None => out.iter_mut().zip(t).for_each(|(e, t)| *e -= t),
                        Some((relu, bias)) => {
                            let bias = &bias[g * rows..(g + 1) * rows];
                            let hi = relu.max.map_or(f32::INFINITY, |max| max as f32);
                            for (row, t) in out.chunks_exact_mut(rows).zip(t.chunks_exact(rows)) {
                                for ((e, &t), &bias) in row.iter_mut().zip(t).zip(bias) {
                                    let z = *e + bias;
                                    let d = z.clamp(0.0, hi) - t;
                                    squares += f64::from(d * d);
                                    *e = if (0.0..=hi).contains(&z) { d } else { 0.0 };
                                }
                            }
                        }
                    }
                    host::matmul_into(
                        &mut grad_w[g * w..(g + 1) * w],
                        View::new(out, m, rows).t(),
                        x,
                    );
                }
                match relu {
                    None => report.then(|| sum(&mut e.iter().map(|&e| e * e))),
                    Some(_) => report.then_some(squares),
                }
            }
        };
        (rec, grad_w)
    }
}

/// The weighted rounding loss at `alpha` as a one-value tensor (`None` in the warm start), as
/// the host paths report it.
fn host_rounding_loss<B: Backend>(
    kernel: &host::Kernel,
    alpha: &[f32],
    (beta, reg): (Option<f64>, f64),
    device: &B::Device,
) -> Option<Tensor<B, 1>> {
    beta.map(|beta| {
        let loss = match beta {
            0.0 => 0.0,
            beta => kernel.rounding_loss(alpha, beta, reg),
        };
        Tensor::from_floats([loss as f32], device)
    })
}

/// Multiply-adds of one fused step on `data` for a `[groups, rows, K]` kernel.
fn step_work<B: Backend>(data: &Data<B>, [groups, rows, k]: [usize; 3]) -> usize {
    let per_group = match data {
        Data::Gram(..) => rows.saturating_mul(k).saturating_mul(k),
        // `X W~ᵀ` and `Eᵀ X`.
        Data::Direct(batches, _) => batches.first().map_or(0, |(x, _)| {
            2usize
                .saturating_mul(x.dims()[1])
                .saturating_mul(k)
                .saturating_mul(rows)
        }),
    };
    per_group.saturating_mul(groups)
}

/// Bytes of the im2col patches of the direct fused path on `inputs`.
pub(crate) fn patch_bytes<B: Backend>(layer: &QuantizedLayer<B>, inputs: &[Flow<B>]) -> usize {
    let (k, positions) = gram::sizes(layer, &inputs[0]);
    let groups = layer.matrix().map_or(1, |m| m.matrix_dims()[0]);
    k.saturating_mul(positions)
        .saturating_mul(groups)
        .saturating_mul(4)
        .saturating_mul(inputs.len())
}

impl<B: Backend> Fused<B> {
    /// Takes over `layer` (AdaRound armed in its single slot), to step with `optimizer`.
    /// `grams`: use its Gram matrices; else the direct path on `inputs` and `targets`.
    /// `elementwise`: where the step runs ([`host`] memory only for `f32` kernels);
    /// `default_adam`: whether `optimizer` is Burn's Adam with its defaults, which a
    /// host-resident step runs itself.
    pub(crate) fn new(
        layer: QuantizedLayer<B>,
        (inputs, targets): (&[Flow<B>], &[Flow<B>]),
        grams: Option<&gram::Grams<B>>,
        (loss, relu): (ReconstructionLoss, Option<Relu>),
        (optimizer, elementwise, default_adam): (Box<dyn AlphaOptimizer<B>>, Elementwise, bool),
    ) -> Self {
        let ada = layer.adarounds()[0].clone();
        let levels = ada.levels();
        let matrix = matrix_of(&layer);
        let alpha = matrix.to_matrix(ada.alpha.val());
        let w_floor = matrix.to_matrix(ada.w_floor.val());
        let sf = matrix.to_matrix(ada.sf.val());
        let shift = ada.offset().map(|o| matrix.to_matrix(o) / sf.clone());
        let weight = matrix.float_matrix();
        let (data, divisors) = match grams {
            Some(g) => (
                Data::Gram(g.grams.clone(), g.residuals.clone()),
                g.divisors.clone(),
            ),
            None => direct_data(matrix, inputs, targets, loss, relu),
        };
        let f32_kernel = alpha.dtype() == DType::F32;
        let dims = alpha.dims();
        let place = step_place(
            elementwise,
            &alpha.device(),
            &data,
            dims,
            default_adam && f32_kernel,
        );
        // `step_place` chose `Resident` only where the data fits.
        let resident = (place == Place::Resident).then(|| Resident {
            alpha: host_values(alpha.clone()),
            adam: host::Adam::burn_default(),
            data: HostData::of(&data),
            dims,
        });
        // The device copies of a resident step's data are not used again.
        let data = match resident {
            Some(_) => Data::Gram(Vec::new(), None),
            None => data,
        };
        let on_host = place != Place::Device && f32_kernel;
        let host = on_host.then(|| host::Kernel {
            w_floor: host_values(w_floor.clone()),
            // `sf` broadcasts (per channel or per tensor): one value per weight here.
            inv_sf: host_values(alpha.zeros_like() + sf.clone().recip()),
            weight: host_values(weight.clone()),
            shift: shift
                .clone()
                .map(|shift| host_values(alpha.zeros_like() + shift)),
            levels: (levels.0 as f32, levels.1 as f32),
            rounding: ada.rounding(),
        });
        Self {
            rounding: ada.rounding(),
            layer,
            alpha,
            w_floor,
            sf,
            shift,
            weight,
            levels,
            optimizer,
            data,
            divisors,
            host,
            resident,
            rates: (0.0, 0.0),
        }
    }

    /// The rounding variables (from host memory in a resident step).
    fn current_alpha(&self) -> Matrix<B> {
        match &self.resident {
            Some(resident) => Tensor::from_data(
                TensorData::new(resident.alpha.clone(), resident.dims),
                &self.alpha.device(),
            ),
            None => self.alpha.clone(),
        }
    }

    /// One step entirely in host memory ([`Elementwise::Resident`]): the formulas of
    /// [`Self::device_loss_and_gradient`] and Burn's Adam.
    fn resident_step(&mut self, ask: Ask) -> Option<Losses<B>> {
        let Ask {
            b,
            beta,
            reg,
            report,
        } = ask;
        let (kernel, resident) = match (&self.host, &mut self.resident) {
            (Some(kernel), Some(resident)) => (kernel, resident),
            _ => unreachable!("a resident step has its kernel in host memory"),
        };
        let n = self.divisors[b];
        let pass = host::Pass {
            beta,
            reg,
            n,
            difference: matches!(resident.data, HostData::Gram(..)),
        };
        let (sent, coefficients) = kernel.forward(&resident.alpha, pass);
        let (rec, grad_w) = resident
            .data
            .reconstruction(b, &sent, resident.dims, report);
        let grad = coefficients.backward(grad_w);
        let device = self.alpha.device();
        let losses = rec.map(|rec| {
            let round = host_rounding_loss(kernel, &resident.alpha, (beta, reg), &device);
            (Tensor::from_floats([(rec / n) as f32], &device), round)
        });
        resident.adam.step(self.rates.1, &mut resident.alpha, &grad);
        losses
    }

    /// The rectified sigmoid at `alpha`.
    fn decimals(&self, alpha: Matrix<B>) -> Decimals<Matrix<B>> {
        self.rounding.decimals(alpha)
    }

    /// The gradient of the step's loss with respect to alpha (in the matrix layout), and
    /// when `report` the losses of [`Step::step`] (their reductions are skipped otherwise;
    /// the gradient is the same either way).
    fn loss_and_gradient(&self, ask: Ask) -> (Option<Losses<B>>, Matrix<B>) {
        match &self.host {
            Some(kernel) => self.host_loss_and_gradient(kernel, ask),
            None => self.device_loss_and_gradient(ask),
        }
    }

    /// The reconstruction loss (when `report`) and `n / 2` times its gradient with respect
    /// to W~, from `sent`: `W~ - W` on the Gram path, `W~` on the direct path.
    fn reconstruction(
        &self,
        b: usize,
        sent: Matrix<B>,
        report: bool,
    ) -> (Option<Tensor<B, 1>>, Matrix<B>) {
        let n = self.divisors[b];
        // Tensors are moved, not cloned, wherever a value has no later use: a backend can
        // then update them in place instead of allocating.
        match &self.data {
            Data::Gram(grams, residuals) => {
                let dw = sent;
                let dg = matmul(dw.clone(), grams[b].clone());
                match residuals {
                    // Targets from other inputs: gradient `dW G + R`, loss
                    // `sum(dW ⊙ (dW G + 2 R)) + c0`.
                    Some(residuals) => {
                        let (r, c0) = residuals[b].clone();
                        let grad = dg + r.clone();
                        let rec =
                            report.then(|| ((dw * (grad.clone() + r)).sum() + c0).div_scalar(n));
                        (rec, grad)
                    }
                    None => (report.then(|| (dw * dg.clone()).sum().div_scalar(n)), dg),
                }
            }
            Data::Direct(batches, relu) => {
                let (x, t) = &batches[b];
                // Patches and targets are cached as rows (`[g, M, K]`, `[g, M, r]`): the
                // errors are `E = X W~ᵀ - T` and the gradient `Eᵀ X`, so no product
                // transposes a large operand. With a ReLU, `E = relu(X W~ᵀ + b) - T`, and
                // the gradient takes `E` only where the ReLU passes.
                let out = matmul(x.clone(), sent.swap_dims(1, 2));
                let (e, passed) = match relu {
                    None => {
                        let e = out - t.clone();
                        (e.clone(), e)
                    }
                    Some((relu, bias)) => {
                        let z = out + bias.clone();
                        let blocked = relu.blocked(&z);
                        let e = relu.apply(z) - t.clone();
                        (e.clone(), e.mask_fill(blocked, 0.0))
                    }
                };
                let grad = matmul(passed.swap_dims(1, 2), x.clone());
                (report.then(|| e.square().sum().div_scalar(n)), grad)
            }
        }
    }

    /// [`Self::loss_and_gradient`] with the elementwise work in host memory.
    fn host_loss_and_gradient(
        &self,
        kernel: &host::Kernel,
        ask: Ask,
    ) -> (Option<Losses<B>>, Matrix<B>) {
        let Ask {
            b,
            beta,
            reg,
            report,
        } = ask;
        let (dims, device) = (self.alpha.dims(), self.alpha.device());
        let pass = host::Pass {
            beta,
            reg,
            n: self.divisors[b],
            difference: matches!(self.data, Data::Gram(..)),
        };
        let alpha = host_values(self.alpha.clone());
        let (sent, coefficients) = kernel.forward(&alpha, pass);
        let sent = Tensor::from_data(TensorData::new(sent, dims), &device);
        let (rec, grad_w) = self.reconstruction(b, sent, report);
        let grad = coefficients.backward(host_values(grad_w));
        let grad = Tensor::from_data(TensorData::new(grad, dims), &device);
        let losses = rec.map(|rec| {
            (
                rec,
                host_rounding_loss(kernel, &alpha, (beta, reg), &device),
            )
        });
        (losses, grad)
    }

    /// [`Self::loss_and_gradient`] as tensor operations of the backend.
    fn device_loss_and_gradient(&self, ask: Ask) -> (Option<Losses<B>>, Matrix<B>) {
        let Ask {
            b,
            beta,
            reg,
            report,
        } = ask;
        let (lo, hi) = self.levels;
        let Decimals { s, u, h } = self.decimals(self.alpha.clone());
        let outside_h = u.not_equal(h.clone());
        let z = self.w_floor.clone() + h.clone();
        let zc = z.clone().clamp(lo, hi);
        let outside_z = z.not_equal(zc.clone());
        let soft = zc / self.sf.clone();
        let soft = match &self.shift {
            Some(shift) => soft + shift.clone(),
            None => soft,
        };
        let n = self.divisors[b];
        let sent = match self.data {
            Data::Gram(..) => soft - self.weight.clone(),
            Data::Direct(..) => soft,
        };
        // `grad_w` is `n / 2` times the gradient with respect to W~ (the factor is applied
        // once, at the end).
        let (rec, grad_w) = self.reconstruction(b, sent, report);
        let mut grad_h = (grad_w / self.sf.clone()).mask_fill(outside_z, 0.0);
        let round = match beta {
            Some(beta) if beta != 0.0 => {
                let loss = report.then(|| Rounding::regulariser(h.clone(), beta).sum());
                let slope = Rounding::regulariser_slope(h, beta);
                grad_h = grad_h - slope.mul_scalar(beta * reg * n);
                loss.map(|l| Some(l.mul_scalar(reg)))
            }
            Some(_) => report.then(|| Some(Tensor::zeros([1], &self.weight.device()))),
            None => report.then_some(None),
        };
        let ds = {
            let square = s.clone().square();
            s - square
        };
        let grad = (grad_h * ds)
            .mask_fill(outside_h, 0.0)
            .mul_scalar(2.0 / n * self.rounding.stretch());

        (rec.zip(round), grad)
    }

    /// The layer with the current alphas.
    pub(crate) fn layer(&self) -> QuantizedLayer<B> {
        let alpha = matrix_of(&self.layer).to_kernel(self.current_alpha());
        self.layer.clone().map_slots(|slot| match slot {
            QuantizerSlot::AdaRound(ada) => QuantizerSlot::AdaRound(ada.with_alpha(alpha.clone())),
            plain => plain,
        })
    }
}

impl<B: Backend> Step<B> for Fused<B> {
    fn step(&mut self, b: usize, beta: Option<f64>, report: bool) -> Option<Losses<B>> {
        let (reg, lr) = self.rates;
        let ask = Ask {
            b,
            beta,
            reg,
            report,
        };
        if self.resident.is_some() {
            return self.resident_step(ask);
        }
        let (losses, grad) = self.loss_and_gradient(ask);
        self.alpha = self.optimizer.step(lr, self.alpha.clone(), grad);
        losses
    }

    fn status(&self) -> Vec<RoundingStatus> {
        vec![RoundingStatus::of_decimals(
            self.decimals(self.current_alpha()).h,
        )]
    }

    fn into_layer(self: Box<Self>) -> QuantizedLayer<B> {
        self.layer()
    }
}

/// The values of an `f32` tensor, in host memory.
fn host_values<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.into_data()
        .into_vec::<f32>()
        .expect("the host elementwise path runs only on f32 kernels")
}

/// The matrix form of a layer the fused step took over.
fn matrix_of<B: Backend>(layer: &QuantizedLayer<B>) -> &dyn MatrixLayer<B> {
    layer
        .matrix()
        .expect("the fused step is chosen only for layers with a matrix form")
}

/// The direct path's data: per batch, `[groups, M, K]` patches and `[groups, M, rows]`
/// targets minus the bias (one row per output position), and the loss divisor.
fn direct_data<B: Backend>(
    layer: &dyn MatrixLayer<B>,
    inputs: &[Flow<B>],
    targets: &[Flow<B>],
    loss: ReconstructionLoss,
    relu: Option<Relu>,
) -> (Data<B>, Vec<f64>) {
    let [groups, rows, _] = layer.matrix_dims();
    let mut batches = Vec::with_capacity(inputs.len());
    let mut divisors = Vec::with_capacity(inputs.len());
    // The bias the outputs add before the ReLU (zeros without one).
    let relu = relu.map(|relu| {
        let bias = match layer.bias() {
            Some(b) => b.reshape([groups, 1, rows]),
            None => Tensor::zeros([groups, 1, rows], &layer.float_matrix().device()),
        };
        (relu, bias)
    });
    for (x, t) in inputs.iter().zip(targets) {
        let (x, t) = gram::rows_less_bias(layer, x, t);
        let t = match &relu {
            Some((relu, bias)) => relu.apply(t + bias.clone()),
            None => t,
        };
        let positions = t.dims()[1];
        divisors.push(match loss {
            ReconstructionLoss::Mse => (positions * groups * rows) as f64,
            ReconstructionLoss::ChannelSum => positions as f64,
        });
        batches.push((x, t));
    }
    (Data::Direct(batches, relu), divisors)
}

#[cfg(test)]
mod tests {
    use adaround_core::WeightQuantizer;
    use adaround_layers::{
        probe::Flow, QuantizedConv2dConfig, QuantizedDenseConfig, QuantizedLayer,
    };
    use burn::{
        nn::PaddingConfig2d,
        optim::AdamConfig,
        tensor::{backend::Backend, Distribution, Tensor},
    };

    use super::*;
    use crate::{
        gram::tests::{armed, target_cases},
        step::{Optimizers, SimpleOptimizers},
        unit::reconstruction_loss,
    };

    type B = burn_autodiff::Autodiff<burn_ndarray::NdArray<f32>>;

    fn device() -> burn::tensor::Device<B> {
        Default::default()
    }

    fn values<const D: usize>(t: Tensor<impl Backend, D>) -> Vec<f32> {
        t.into_data().convert::<f32>().to_vec().unwrap()
    }

    /// The ReLUs before the loss the tests try: none, unbounded, bounded.
    const RELUS: [Option<Relu>; 3] = [
        None,
        Some(Relu { max: None }),
        Some(Relu { max: Some(0.7) }),
    ];

    /// The fused losses and gradient against autodiff's, on the Gram and the direct data,
    /// with targets from the same inputs and from other inputs (the float model's); on the
    /// direct data also with a ReLU before the loss.
    fn assert_matches_autodiff(layer: QuantizedLayer<B>, x: Flow<B>) {
        let (beta, reg) = (4.0, 0.01);
        let cases = target_cases(&x)
            .into_iter()
            .flat_map(|case| RELUS.map(|relu| (case.clone(), relu)));
        for ((loss, target_x), relu) in cases {
            let layer = armed(layer.clone());
            let other = target_x.is_some();
            let target = layer
                .forward_float_flow(target_x.unwrap_or_else(|| x.clone()))
                .detach();
            let through = |f: Flow<B>| match relu {
                Some(r) => r.flow(f),
                None => f,
            };
            let rec = reconstruction_loss(
                through(layer.forward_flow(x.clone())),
                through(target.clone()),
                loss,
            );
            let round = layer.adarounds()[0].rounding_loss(beta).mul_scalar(reg);
            let alpha = layer.adarounds()[0].alpha.clone();
            let expected = values(
                alpha
                    .grad(&(rec.clone() + round.clone()).backward())
                    .unwrap(),
            );
            let (rec, round): (f32, f32) = (rec.into_scalar(), round.into_scalar());

            let targets = std::slice::from_ref(&target);
            let grams = gram::grams(
                &layer,
                std::slice::from_ref(&x),
                other.then_some(targets),
                loss,
            )
            .unwrap();
            let places = [Elementwise::Device, Elementwise::Host];
            // The Gram form exists only without a ReLU.
            let data = match relu {
                None => vec![Some(&grams), None],
                Some(_) => vec![None],
            };
            for (grams, elementwise) in data.into_iter().flat_map(|g| places.map(|p| (g, p))) {
                let optimizer = SimpleOptimizers(|| AdamConfig::new().build())
                    .fused()
                    .unwrap();
                let fused = Fused::new(
                    layer.clone(),
                    (std::slice::from_ref(&x), std::slice::from_ref(&target)),
                    grams,
                    (loss, relu),
                    (optimizer, elementwise, false),
                );
                assert_eq!(fused.host.is_some(), elementwise == Elementwise::Host);
                let offsets = &layer.adarounds()[0].meta.offsets;
                assert_eq!(fused.shift.is_some(), !offsets.is_empty());
                let (losses, grad) = fused.loss_and_gradient(Ask {
                    b: 0,
                    beta: Some(beta),
                    reg,
                    report: true,
                });
                let (f_rec, f_round) = losses.expect("report asked");
                let (f_rec, f_round): (f32, f32) =
                    (f_rec.into_scalar(), f_round.unwrap().into_scalar());
                // Without the report, the same gradient bit for bit.
                let (none, quiet) = fused.loss_and_gradient(Ask {
                    b: 0,
                    beta: Some(beta),
                    reg,
                    report: false,
                });
                assert!(none.is_none());
                assert_eq!(
                    values(matrix_of(&fused.layer).to_kernel(quiet)),
                    values(matrix_of(&fused.layer).to_kernel(grad.clone()))
                );
                let path = match (grams.is_some(), other) {
                    (true, false) => "Gram",
                    (true, true) => "Gram with residuals",
                    (false, _) => "direct",
                };
                let path = format!("{path}, {elementwise:?}, {relu:?}");
                assert!(rec > 0.0);
                assert!(
                    (f_rec - rec).abs() <= 1e-4 * rec,
                    "{loss:?} {path}: {f_rec} vs {rec}"
                );
                assert!(
                    (f_round - round).abs() <= 1e-5 * round,
                    "{f_round} vs {round}"
                );
                let got = values(matrix_of(&fused.layer).to_kernel(grad));
                let scale = expected.iter().fold(0f32, |m, v| m.max(v.abs()));
                let diff = got
                    .iter()
                    .zip(&expected)
                    .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
                assert!(scale > 0.0);
                assert!(
                    diff <= 1e-3 * scale,
                    "{loss:?} {path}: gradients differ by {diff} (scale {scale})"
                );
            }
            match relu {
                None => {
                    for grams in [Some(&grams), None] {
                        assert_resident_matches_device(&layer, (&x, &target), grams, (loss, None));
                    }
                }
                Some(_) => {
                    assert_resident_matches_device(&layer, (&x, &target), None, (loss, relu))
                }
            }
        }
    }

    /// Six steps of the host-resident step (host products and Adam) against six of the
    /// device step with Burn's Adam: the same rounding variables and losses, through the
    /// warm start and the rounding loss.
    fn assert_resident_matches_device(
        layer: &QuantizedLayer<B>,
        (x, target): (&Flow<B>, &Flow<B>),
        grams: Option<&gram::Grams<B>>,
        loss: (ReconstructionLoss, Option<Relu>),
    ) {
        let data = (std::slice::from_ref(x), std::slice::from_ref(target));
        let [mut on_device, mut resident] =
            [(Elementwise::Device, false), (Elementwise::Resident, true)].map(
                |(place, default_adam)| {
                    let optimizer = SimpleOptimizers(|| AdamConfig::new().build())
                        .fused()
                        .unwrap();
                    let mut fused = Fused::new(
                        layer.clone(),
                        data,
                        grams,
                        loss,
                        (optimizer, place, default_adam),
                    );
                    fused.rates = (0.01, 0.05);
                    fused
                },
            );
        assert!(on_device.resident.is_none());
        assert!(resident.resident.is_some(), "forced resident step");
        let betas = [None, None, Some(8.0), Some(6.0), Some(4.0), Some(2.0)];
        for (i, beta) in betas.into_iter().enumerate() {
            let report = i == 2 || i == 5;
            let d = on_device.step(0, beta, report);
            let r = resident.step(0, beta, report);
            assert_eq!(d.is_some(), report);
            if let (Some((d_rec, d_round)), Some((r_rec, r_round))) = (d, r) {
                let (d_rec, r_rec): (f32, f32) = (d_rec.into_scalar(), r_rec.into_scalar());
                assert!(d_rec > 0.0);
                assert!(
                    (d_rec - r_rec).abs() <= 1e-4 * d_rec,
                    "{loss:?}: step {i} reconstruction {r_rec} vs {d_rec}"
                );
                let (d_round, r_round): (f32, f32) = (
                    d_round.unwrap().into_scalar(),
                    r_round.unwrap().into_scalar(),
                );
                assert!(
                    (d_round - r_round).abs() <= 1e-4 * d_round.abs().max(1e-6),
                    "{loss:?}: step {i} rounding {r_round} vs {d_round}"
                );
            }
        }
        let (d, r) = (
            values(on_device.current_alpha()),
            values(resident.current_alpha()),
        );
        let start = values(matrix_of(layer).to_matrix(layer.adarounds()[0].alpha.val()));
        let moved = d
            .iter()
            .zip(&start)
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        let diff = d
            .iter()
            .zip(&r)
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(
            moved > 0.1,
            "the steps move the rounding variables ({moved})"
        );
        assert!(
            diff <= 1e-3 * moved,
            "{loss:?}: alphas differ by {diff} (moved {moved})"
        );
        // The status and the layer read the resident step's variables.
        let (ds, rs) = (on_device.status()[0], resident.status()[0]);
        assert_eq!((ds.total, ds.roamers), (rs.total, rs.roamers));
        let layer_alpha = values(Box::new(resident).into_layer().adarounds()[0].alpha.val());
        let kernel_r = values(matrix_of(layer).to_kernel(Tensor::from_floats(
            TensorData::new(r, layer_alpha_dims(layer)),
            &device(),
        )));
        assert_eq!(layer_alpha, kernel_r);
    }

    /// The matrix layout's dimensions of `layer`'s kernel.
    fn layer_alpha_dims(layer: &QuantizedLayer<B>) -> [usize; 3] {
        matrix_of(layer)
            .to_matrix(layer.adarounds()[0].alpha.val())
            .dims()
    }

    #[test]
    fn should_compute_the_autodiff_loss_and_gradient_on_dense_layers() {
        B::seed(&device(), 11);
        let x = Tensor::<B, 2>::random([40, 12], Distribution::Normal(0.5, 1.0), &device());
        for quantizer in [
            WeightQuantizer::max_per_axis(3).unwrap(),
            WeightQuantizer::max(2).unwrap(),
            WeightQuantizer::mse(2, true, adaround_core::Grid::Asymmetric).unwrap(),
            WeightQuantizer::mse(3, false, adaround_core::Grid::Asymmetric).unwrap(),
        ] {
            let dense = QuantizedDenseConfig::new(12, 7)
                .with_quantizer(quantizer)
                .init::<B>(&device());
            assert_matches_autodiff(QuantizedLayer::Dense(dense), Flow::Rows(x.clone()));
        }
    }

    #[test]
    fn should_compute_the_autodiff_loss_and_gradient_on_conv2d_variants() {
        B::seed(&device(), 12);
        let x = Tensor::<B, 4>::random([3, 4, 9, 8], Distribution::Normal(0.2, 1.0), &device());
        let variants = [
            (PaddingConfig2d::Valid, [1, 1], [1, 1], 1, 5),
            (PaddingConfig2d::Same, [2, 2], [1, 1], 1, 5),
            (PaddingConfig2d::Same, [1, 1], [2, 2], 2, 6),
            (PaddingConfig2d::Explicit(1, 2, 0, 1), [2, 1], [1, 1], 4, 8),
        ];
        for (padding, stride, dilation, groups, c_out) in variants {
            let conv = QuantizedConv2dConfig::new([4, c_out], [3, 3])
                .with_padding(padding)
                .with_stride(stride)
                .with_dilation(dilation)
                .with_groups(groups)
                .with_quantizer(WeightQuantizer::max_per_axis(4).unwrap())
                .init::<B>(&device());
            assert_matches_autodiff(QuantizedLayer::Conv2d(conv), Flow::Maps(x.clone()));
        }
    }

    /// A step whose loss data exceeds [`MAX_RESIDENT_BYTES`] is not host-resident: `Auto`
    /// takes the place it would take without it (the device, on NdArray).
    #[test]
    fn should_not_run_host_resident_on_data_over_the_limit() {
        type N = burn_ndarray::NdArray<f32>;
        let d = Default::default();
        let side = 1 + (((MAX_RESIDENT_BYTES / 4) as f64).sqrt() as usize);
        let large = Data::<N>::Gram(vec![Tensor::zeros([1, side, side], &d)], None);
        let small = Data::<N>::Gram(vec![Tensor::zeros([1, side - 1, side - 1], &d)], None);
        assert!(!HostData::fits(&large));
        assert!(HostData::fits(&small));
        let place = |e: Elementwise, data: &Data<N>, resident: bool| {
            step_place::<N>(e, &d, data, [1, 64, side], resident)
        };
        assert_eq!(place(Elementwise::Auto, &large, true), Place::Device);
        assert_eq!(place(Elementwise::Auto, &small, true), Place::Resident);
        assert_eq!(place(Elementwise::Auto, &small, false), Place::Device);
        assert_eq!(place(Elementwise::Resident, &large, true), Place::Host);
    }
}
