//! The exact Gram-matrix form of the reconstruction loss.
//!
//! Without an activation after the layer and with targets computed from the same inputs,
//! the bias cancels and the loss is a quadratic form in `dW = W~ - W`: with `X` the layer's
//! input patches (im2col for a convolution, rows for a Dense layer) and `G = X^T X`
//! (`K x K`, `K = channels_in / groups * kh * kw`),
//!
//! `sum((W~ x - W x)^2) = sum(dW ⊙ (dW G))` (one `G` per group of a grouped convolution).
//!
//! With targets `T` from other inputs (the float model's activations, [`Target::FloatModel`]
//! (crate::Target::FloatModel)), the float kernel leaves a residual `D0 = X Wᵀ + b - T` on
//! these inputs, and with `R = D0ᵀ X` (`C_out x K`) and `c0 = sum(D0²)`, both once per batch,
//!
//! `sum((X W~ᵀ + b - T)^2) = sum(dW ⊙ (dW G)) + 2 sum(dW ⊙ R) + c0`, gradient `2 (dW G + R)`.
//!
//! `G` is computed once per batch; a step then costs `O(C_out * K^2)` whatever the number of
//! samples and positions. The loss and its gradient are those of the direct path up to
//! floating-point rounding.

use adaround_layers::{probe::Flow, MatrixLayer, QuantizedConv2d, QuantizedLayer};
use burn::tensor::{backend::Backend, ops::PadMode, ElementConversion, Tensor, TensorData};
use rayon::prelude::*;

use crate::{LossPath, ReconstructionLoss};

/// The Gram matrices of one layer, one per batch: `[groups, K, K]`, and the divisor that
/// turns `sum(dW ⊙ (dW G))` into the configured loss.
#[derive(Clone)]
pub(crate) struct Grams<B: Backend> {
    pub grams: Vec<Tensor<B, 3>>,
    pub divisors: Vec<f64>,
    /// With targets from other inputs, per batch: `R = D0ᵀ X` (`[groups, C_out / groups,
    /// K]`) and `c0 = sum(D0²)` (see the [module docs](self)).
    pub residuals: Option<Vec<Residual<B>>>,
    /// Over all batches.
    pub sums: Sums<B>,
}

/// `R = D0ᵀ X` and `c0 = sum(D0²)` of one batch.
pub(crate) type Residual<B> = (Tensor<B, 3>, Tensor<B, 1>);

/// Sums over the rows (output positions) of all batches: of the input patches (`[groups, 1,
/// K]`), of the float kernel's residuals `D0` with targets from other inputs (`[groups, 1,
/// C_out / groups]`), and their number `M` per group. With them the Gram form also gives the
/// error after a change of bias, and the bias correction itself ([`error`], [`bias_shift`]).
#[derive(Clone)]
pub(crate) struct Sums<B: Backend> {
    pub x: Tensor<B, 3>,
    pub d0: Option<Tensor<B, 3>>,
    pub count: usize,
}

impl<B: Backend> Sums<B> {
    fn add(self, other: Self) -> Self {
        Self {
            x: self.x + other.x,
            d0: self.d0.zip(other.d0).map(|(a, b)| a + b),
            count: self.count + other.count,
        }
    }
}

impl<B: Backend> Grams<B> {
    /// The same matrices on another backend.
    pub(crate) fn map<C: Backend>(
        self,
        f: impl Fn(Tensor<B, 3>) -> Tensor<C, 3>,
        g: impl Fn(Tensor<B, 1>) -> Tensor<C, 1>,
    ) -> Grams<C> {
        Grams {
            grams: self.grams.into_iter().map(&f).collect(),
            divisors: self.divisors,
            residuals: self
                .residuals
                .map(|r| r.into_iter().map(|(r, c)| (f(r), g(c))).collect()),
            sums: Sums {
                x: f(self.sums.x),
                d0: self.sums.d0.map(&f),
                count: self.sums.count,
            },
        }
    }

    /// These batches followed by `other`'s.
    pub(crate) fn join(mut self, other: Self) -> Self {
        self.grams.extend(other.grams);
        self.divisors.extend(other.divisors);
        self.residuals = self.residuals.zip(other.residuals).map(|(mut a, b)| {
            a.extend(b);
            a
        });
        self.sums = self.sums.add(other.sums);
        self
    }

    /// The sums over all batches of `G`, `R` and `c0` (not divided).
    fn totals(&self) -> (Tensor<B, 3>, Option<Residual<B>>) {
        let add3 = |a: Tensor<B, 3>, b: &Tensor<B, 3>| a + b.clone();
        let g = self.grams[1..].iter().fold(self.grams[0].clone(), add3);
        let r = self.residuals.as_ref().map(|rs| {
            let (r0, c0) = rs[0].clone();
            rs[1..].iter().fold((r0, c0), |(r, c), (r2, c2)| {
                (r + r2.clone(), c + c2.clone())
            })
        });
        (g, r)
    }
}

/// The change of `layer` from `reference` (the layer the Gram matrices were computed for): its
/// kernel as it computes now (quantized, AdaRound's weights or rounded) less the reference's
/// float kernel, `[groups, C_out / groups, K]`, and its bias less the reference's,
/// `[groups, C_out / groups, 1]` (`None` without a bias).
fn change<B: Backend>(
    reference: &dyn MatrixLayer<B>,
    layer: &dyn MatrixLayer<B>,
) -> (Tensor<B, 3>, Option<Tensor<B, 3>>) {
    let [groups, rows, _] = reference.matrix_dims();
    let dw = layer.float_matrix() + layer.delta_matrix() - reference.float_matrix();
    let db = reference
        .bias()
        .zip(layer.bias())
        .map(|(b, b2)| (b2 - b).reshape([groups, rows, 1]));
    (dw, db)
}

/// `dW s_xᵀ + s_d0ᵀ` (`[groups, C_out / groups, 1]`): the sum over all rows of the outputs'
/// errors before the change of bias.
fn summed_error<B: Backend>(dw: Tensor<B, 3>, sums: &Sums<B>) -> Tensor<B, 3> {
    let e = matmul(dw, sums.x.clone().swap_dims(1, 2));
    match &sums.d0 {
        Some(d0) => e + d0.clone().swap_dims(1, 2),
        None => e,
    }
}

/// The mean squared error over all batches of `layer`'s outputs against the targets, from
/// the Gram matrices of `reference` (`layer` before any change: the same float kernel
/// and bias) alone: with `dW` and `e` the changes of kernel and bias ([`change`]),
///
/// `sum((X W~ᵀ + b + e - T)²) = sum(dW ⊙ (dW G + 2 R)) + c0 + 2 e · (dW s_xᵀ + s_d0ᵀ) + M |e|²`,
///
/// divided by the number of outputs `M x C_out`. Equals the direct error on the same
/// batches (equal batches: the mean of the batches' errors) up to floating-point rounding.
pub(crate) fn error<B: Backend>(
    reference: &QuantizedLayer<B>,
    layer: &QuantizedLayer<B>,
    grams: &Grams<B>,
) -> f64 {
    let (reference, layer) = (matrix_of(reference), matrix_of(layer));
    let [groups, rows, _] = reference.matrix_dims();
    let (dw, db) = change(reference, layer);
    let (g, residual) = grams.totals();
    let dg = matmul(dw.clone(), g);
    let mut total = match residual {
        Some((r, c0)) => (dw.clone() * (dg + r.mul_scalar(2.0))).sum() + c0,
        None => (dw.clone() * dg).sum(),
    };
    if let Some(e) = db {
        let count = grams.sums.count as f64;
        let cross = (e.clone() * summed_error(dw, &grams.sums))
            .sum()
            .mul_scalar(2.0);
        total = total + cross + e.square().sum().mul_scalar(count);
    }
    let outputs = grams.sums.count * groups * rows;
    // A sum of squares: a negative total is floating-point cancellation around zero.
    (total.into_scalar().elem::<f64>() / outputs as f64).max(0.0)
}

/// The shift of `layer`'s bias that makes its outputs' mean error over all batches zero in
/// every output channel (bias correction), `[C_out]`; `None` without a bias. See [`error`].
pub(crate) fn bias_shift<B: Backend>(
    reference: &QuantizedLayer<B>,
    layer: &QuantizedLayer<B>,
    grams: &Grams<B>,
) -> Option<Tensor<B, 1>> {
    let (reference, layer) = (matrix_of(reference), matrix_of(layer));
    let (dw, db) = change(reference, layer);
    let e = db?;
    let mean = summed_error(dw, &grams.sums).div_scalar(grams.sums.count as f64);
    Some((mean + e).neg().flatten(0, 2))
}

fn matrix_of<B: Backend>(layer: &QuantizedLayer<B>) -> &dyn MatrixLayer<B> {
    layer
        .matrix()
        .expect("Gram matrices exist only for layers with a matrix form")
}

/// Whether the Gram form exists for `layer` (the caller checks activation and targets).
pub(crate) fn supports<B: Backend>(layer: &QuantizedLayer<B>) -> bool {
    layer.matrix().is_some()
}

/// Whether `path` puts `layer` (with no activation or ReLU before the loss) on `input`'s
/// batches on the Gram path: a layer with the Gram form, and for [`LossPath::Auto`] more
/// output positions per batch than its patch size `K` (a step is then cheaper).
pub(crate) fn chosen<B: Backend>(
    layer: &QuantizedLayer<B>,
    input: &Flow<B>,
    path: LossPath,
) -> bool {
    let (k, positions) = sizes(layer, input);
    supports(layer)
        && match path {
            LossPath::Gram => true,
            LossPath::Auto => positions > k,
            LossPath::Direct => false,
        }
}

/// Patch size `K` and output positions per batch `M` of the layer on `input`.
pub(crate) fn sizes<B: Backend>(layer: &QuantizedLayer<B>, input: &Flow<B>) -> (usize, usize) {
    match layer.matrix() {
        Some(m) => (m.matrix_dims()[2], m.positions(&input.dims())),
        None => (usize::MAX, 0),
    }
}

/// The Gram matrices of `layer` on each batch of `inputs`, with the residuals of the float
/// kernel against `targets` when these come from other inputs; `None` without a
/// [`MatrixLayer`] form.
pub(crate) fn grams<B: Backend>(
    layer: &QuantizedLayer<B>,
    inputs: &[Flow<B>],
    other_targets: Option<&[Flow<B>]>,
    loss: ReconstructionLoss,
) -> Option<Grams<B>> {
    let matrix = layer.matrix()?;
    let [groups, rows, _] = matrix.matrix_dims();
    let divisor = |positions: usize| match loss {
        ReconstructionLoss::Mse => (positions * groups * rows) as f64,
        ReconstructionLoss::ChannelSum => positions as f64,
    };
    let conv = depthwise(layer);
    let batch = |b: usize| {
        let x = &inputs[b];
        let t = other_targets.map(|t| &t[b]);
        let positions = matrix.positions(&x.dims());
        let (gram, residual, sums) = match conv {
            Some(conv) => depthwise_stats(conv, x, t),
            None => patch_stats(matrix, x, t),
        };
        Grams {
            grams: vec![gram],
            divisors: vec![divisor(positions)],
            residuals: residual.map(|r| vec![r]),
            sums: Sums {
                count: positions,
                ..sums
            },
        }
    };
    Some((1..inputs.len()).map(batch).fold(batch(0), Grams::join))
}

/// One batch's Gram matrix, residuals (with `target`) and [`Sums`], from the input patches
/// in chunks of samples: any [`MatrixLayer`].
fn patch_stats<B: Backend>(
    layer: &dyn MatrixLayer<B>,
    x: &Flow<B>,
    target: Option<&Flow<B>>,
) -> (Tensor<B, 3>, Option<Residual<B>>, Sums<B>) {
    let residual = target.map(|t| {
        let w = layer.float_matrix().swap_dims(1, 2);
        let residual = |(x, t): (&Flow<B>, &Flow<B>)| {
            let (x, t) = rows_less_bias(layer, x, t);
            let d0 = matmul(x.clone(), w.clone()) - t;
            let sum = d0.clone().sum_dim(1);
            (
                matmul(d0.clone().swap_dims(1, 2), x),
                d0.square().sum(),
                sum,
            )
        };
        chunks(layer, x)
            .map(|(start, n)| residual((&narrow(x, start, n), &narrow(t, start, n))))
            .reduce(|(r, c, s), (r2, c2, s2)| (r + r2, c + c2, s + s2))
            .expect("a batch holds a sample")
    });
    let (gram, x_sums) = chunks(layer, x)
        .map(|(start, n)| layer.gram(&narrow(x, start, n)))
        .reduce(|(g, s), (g2, s2)| (g + g2, s + s2))
        .expect("a batch holds a sample");
    let (residual, d0) = match residual {
        Some((r, c0, d0)) => (Some((r, c0)), Some(d0)),
        None => (None, None),
    };
    let sums = Sums {
        x: x_sums,
        d0,
        count: 0,
    };
    (gram, residual, sums)
}

/// The layer as a depthwise convolution (one input and one output channel per group), if
/// it is one.
fn depthwise<B: Backend>(layer: &QuantizedLayer<B>) -> Option<&QuantizedConv2d<B>> {
    match layer {
        QuantizedLayer::Conv2d(conv) => {
            let [c_out, c_in_per_group, _, _] = conv.weight.dims();
            (conv.groups > 1 && c_in_per_group == 1 && c_out == conv.groups).then_some(conv)
        }
        _ => None,
    }
}

/// The Gram matrices `[C, K, K]` of a depthwise convolution on `input`, with `target` the
/// float kernel's residuals `R = D0ᵀ X` (`[C, 1, K]`) and `c0 = sum(D0²)`, and the
/// [`Sums`] (`count` left to the caller), computed in
/// host memory, each channel a task on rayon's threads, without building patches: on the
/// CPU backends a batched product of thousands of `K x K` matrices (`K = kh * kw`) costs
/// far more than its arithmetic. Sums in `f64`.
fn depthwise_stats<B: Backend>(
    conv: &QuantizedConv2d<B>,
    input: &Flow<B>,
    target: Option<&Flow<B>>,
) -> (Tensor<B, 3>, Option<Residual<B>>, Sums<B>) {
    let Flow::Maps(x) = input.clone().detach() else {
        panic!("a convolution takes maps")
    };
    let device = x.device();
    let [n, c, h, w] = x.dims();
    let [_, _, kh, kw] = conv.weight.dims();
    let ((top, bottom), (left, right)) = conv.padding_pairs([h, w]);
    let x = if top + bottom + left + right > 0 {
        x.pad([(top, bottom), (left, right)], PadMode::Constant(0.0))
    } else {
        x
    };
    let (hp, wp) = (h + top + bottom, w + left + right);
    let ([sh, sw], [dh, dw]) = (conv.stride, conv.dilation);
    let window = Window {
        input: [n, c, hp, wp],
        output: [
            (hp - (kh - 1) * dh - 1) / sh + 1,
            (wp - (kw - 1) * dw - 1) / sw + 1,
        ],
        kernel: [kh, kw],
        stride: conv.stride,
        dilation: conv.dilation,
    };
    let host = |t: Tensor<B, 1>| -> Vec<f32> {
        t.into_data().convert::<f32>().to_vec().expect("f32 values")
    };
    let xs = host(x.flatten(0, 3));
    let t = target.map(|t| match t {
        Flow::Maps(t) => host(t.clone().detach().flatten(0, 3)),
        Flow::Rows(_) => panic!("a convolution's targets are maps"),
    });
    let weights = host(conv.weight.val().detach().flatten(0, 3));
    let bias = conv.bias.as_ref().map(|b| host(b.val().detach()));
    let per_channel: Vec<ChannelStats> = (0..c)
        .into_par_iter()
        .map(|ch| {
            let b = bias.as_ref().map_or(0.0, |b| b[ch] as f64);
            window.channel(ch, &xs, (&weights, b), t.as_deref())
        })
        .collect();
    let k = kh * kw;
    let tensor = |values: Vec<f32>, shape: [usize; 3]| {
        Tensor::<B, 3>::from_data(TensorData::new(values, shape), &device)
    };
    let flat = |part: fn(&ChannelStats) -> &[f64]| -> Vec<f32> {
        per_channel
            .iter()
            .flat_map(|s| part(s).iter().map(|&v| v as f32))
            .collect()
    };
    let residual = t.as_ref().map(|_| {
        let c0: f64 = per_channel.iter().map(|s| s.c0).sum();
        let c0 = Tensor::<B, 1>::from_data(TensorData::new(vec![c0 as f32], [1]), &device);
        (tensor(flat(|s| &s.r), [c, 1, k]), c0)
    });
    let sums = Sums {
        x: tensor(flat(|s| &s.x), [c, 1, k]),
        d0: t.map(|_| tensor(flat(|s| std::slice::from_ref(&s.d0)), [c, 1, 1])),
        count: 0,
    };
    (tensor(flat(|s| &s.g), [c, k, k]), residual, sums)
}

/// A depthwise convolution over a padded input: `[n, c, h, w]` in, `[h', w']` out.
struct Window {
    input: [usize; 4],
    output: [usize; 2],
    kernel: [usize; 2],
    stride: [usize; 2],
    dilation: [usize; 2],
}

/// One channel's Gram matrix `G` (`K x K`, row-major) and patch sums (`K`), and with targets
/// its residual product `R` (`K`), `c0` and the residuals' sum.
struct ChannelStats {
    g: Vec<f64>,
    x: Vec<f64>,
    r: Vec<f64>,
    c0: f64,
    d0: f64,
}

impl Window {
    /// Channel `ch`'s statistics on the padded input `xs`, its float kernel (all channels'
    /// kernels, `K` each) and bias, and the targets (all channels) if any.
    fn channel(
        &self,
        ch: usize,
        xs: &[f32],
        (weights, bias): (&[f32], f64),
        targets: Option<&[f32]>,
    ) -> ChannelStats {
        let [n, c, hp, wp] = self.input;
        let [ho, wo] = self.output;
        let [kh, kw] = self.kernel;
        let ([sh, sw], [dh, dw]) = (self.stride, self.dilation);
        let k = kh * kw;
        let mut s = ChannelStats {
            g: vec![0.0; k * k],
            x: vec![0.0; k],
            r: vec![0.0; k],
            c0: 0.0,
            d0: 0.0,
        };
        let mut v = vec![0f64; k];
        let kernel = &weights[ch * k..(ch + 1) * k];
        for img in 0..n {
            let plane = &xs[(img * c + ch) * hp * wp..(img * c + ch + 1) * hp * wp];
            for oh in 0..ho {
                for ow in 0..wo {
                    for i in 0..kh {
                        let row = (oh * sh + i * dh) * wp + ow * sw;
                        for j in 0..kw {
                            v[i * kw + j] = plane[row + j * dw] as f64;
                        }
                    }
                    s.x.iter_mut().zip(&v).for_each(|(s, x)| *s += x);
                    // The lower triangle; mirrored below.
                    for a in 0..k {
                        let va = v[a];
                        for (g, vb) in s.g[a * k..=a * k + a].iter_mut().zip(&v[..=a]) {
                            *g += va * vb;
                        }
                    }
                    if let Some(t) = targets {
                        let out: f64 = kernel.iter().zip(&v).map(|(&w, &x)| w as f64 * x).sum();
                        let d0 = out + bias - t[((img * c + ch) * ho + oh) * wo + ow] as f64;
                        s.c0 += d0 * d0;
                        s.d0 += d0;
                        s.r.iter_mut().zip(&v).for_each(|(r, x)| *r += d0 * x);
                    }
                }
            }
        }
        for a in 0..k {
            for b in a + 1..k {
                s.g[a * k + b] = s.g[b * k + a];
            }
        }
        s
    }
}

/// Most patch values (`samples x positions x K` per group) built at once for a Gram matrix:
/// larger batches are taken in chunks of samples, so that the patches stay in cache-sized
/// pieces and their memory does not grow with the batch (16 MiB of `f32`).
const MAX_PATCH_VALUES: usize = 1 << 22;

/// `(start, samples)` of the chunks of `input` whose patches hold at most
/// [`MAX_PATCH_VALUES`] values (at least one sample each).
fn chunks<B: Backend>(
    layer: &dyn MatrixLayer<B>,
    input: &Flow<B>,
) -> impl Iterator<Item = (usize, usize)> {
    let dims = input.dims();
    let n = dims[0];
    let [groups, _, k] = layer.matrix_dims();
    let per_sample = (layer.positions(&dims) / n.max(1)) * groups * k;
    let step = (MAX_PATCH_VALUES / per_sample.max(1)).clamp(1, n.max(1));
    (0..n)
        .step_by(step)
        .map(move |start| (start, step.min(n - start)))
}

/// Samples `start..start + n` of `flow`.
fn narrow<B: Backend>(flow: &Flow<B>, start: usize, n: usize) -> Flow<B> {
    if start == 0 && n == flow.dims()[0] {
        return flow.clone();
    }
    flow.clone()
        .map(|t| t.narrow(0, start, n), |t| t.narrow(0, start, n))
}

/// The input patches `[groups, M, K]` and the targets less the bias `[groups, M, C_out /
/// groups]` as rows, one per output position.
pub(crate) fn rows_less_bias<B: Backend>(
    layer: &dyn MatrixLayer<B>,
    input: &Flow<B>,
    target: &Flow<B>,
) -> (Tensor<B, 3>, Tensor<B, 3>) {
    let [groups, rows, _] = layer.matrix_dims();
    let (x, t) = layer.rows(input, target);
    match layer.bias() {
        Some(b) => (x, t - b.reshape([groups, 1, rows])),
        None => (x, t),
    }
}

/// `a · b` per group, as a plain 2-D matmul for one group (backends parallelise it better).
pub(crate) fn matmul<B: Backend>(a: Tensor<B, 3>, b: Tensor<B, 3>) -> Tensor<B, 3> {
    let [g, r, k] = a.dims();
    let [_, _, c] = b.dims();
    if g == 1 {
        a.reshape([r, k])
            .matmul(b.reshape([k, c]))
            .reshape([1, r, c])
    } else {
        a.matmul(b)
    }
}

/// The reconstruction loss of `layer` on batch `b`, from its Gram matrix.
pub(crate) fn loss<B: Backend>(
    layer: &QuantizedLayer<B>,
    grams: &Grams<B>,
    b: usize,
) -> Tensor<B, 1> {
    let d = layer
        .matrix()
        .expect("Gram matrices exist only for layers with a matrix form")
        .delta_matrix();
    let dg = matmul(d.clone(), grams.grams[b].clone());
    let quad = match &grams.residuals {
        Some(residuals) => {
            let (r, c0) = residuals[b].clone();
            (d * (dg + r.mul_scalar(2.0))).sum() + c0
        }
        None => (d * dg).sum(),
    };
    quad.div_scalar(grams.divisors[b])
}

#[cfg(test)]
pub(crate) mod tests {
    use adaround_core::{AdaRoundParams, WeightQuantizer};
    use adaround_layers::{
        probe::Flow, QuantizedConv2dConfig, QuantizedDenseConfig, QuantizedLayer, QuantizerSlot,
    };
    use burn::{
        module::Param,
        nn::PaddingConfig2d,
        tensor::{backend::Backend, Distribution, Tensor},
    };

    use super::*;
    use crate::unit::reconstruction_loss;

    type B = burn_autodiff::Autodiff<burn_ndarray::NdArray<f32>>;

    /// Arms AdaRound and moves every alpha off its initial value (where `W~ == W`).
    pub(crate) fn armed(layer: QuantizedLayer<B>) -> QuantizedLayer<B> {
        let layer = layer.with_adaround(&AdaRoundParams::new()).unwrap();
        let perturb = |slot: QuantizerSlot<B>| match slot {
            QuantizerSlot::AdaRound(mut ada) => {
                let alpha = ada.alpha.val().detach();
                let noise = alpha.random_like(Distribution::Normal(0.0, 1.0));
                // A fresh leaf (Burn cannot track the result of ops as a parameter).
                let moved = Tensor::from_data((alpha + noise).into_data(), &device());
                ada.alpha = Param::from_tensor(moved);
                QuantizerSlot::AdaRound(ada)
            }
            plain => plain,
        };
        layer.map_slots(perturb)
    }

    /// Loss and alpha gradient, direct and Gram, for `loss`; the targets are the float
    /// layer on `target_x` (other inputs) or on `x`.
    fn both(
        layer: &QuantizedLayer<B>,
        x: Flow<B>,
        target_x: Option<Flow<B>>,
        loss: ReconstructionLoss,
    ) -> [(f32, Vec<f32>); 2] {
        let other = target_x.is_some();
        let target = layer
            .forward_float_flow(target_x.unwrap_or_else(|| x.clone()))
            .detach();
        let alpha = |l: &QuantizedLayer<B>| l.adarounds()[0].alpha.clone();
        let direct = reconstruction_loss(layer.forward_flow(x.clone()), target.clone(), loss);
        let targets = [target];
        let grams =
            grams(layer, &[x], other.then_some(&targets[..]), loss).expect("a matrix layer");
        assert_eq!(grams.residuals.is_some(), other);
        let gram = super::loss(layer, &grams, 0);
        [direct, gram].map(|l| {
            let value: f32 = l.clone().into_scalar();
            let g = alpha(layer).grad(&l.backward()).unwrap();
            (value, g.into_data().to_vec().unwrap())
        })
    }

    /// Each loss with targets from the same inputs (`None`), then from other inputs: `x`
    /// shifted by noise, as the float model's activations differ from the quantized model's.
    pub(crate) fn target_cases(x: &Flow<B>) -> Vec<(ReconstructionLoss, Option<Flow<B>>)> {
        fn noisy<const D: usize>(t: &Tensor<B, D>) -> Tensor<B, D> {
            t.clone() + t.random_like(Distribution::Normal(0.0, 0.3))
        }
        let shifted = match x {
            Flow::Rows(t) => Flow::Rows(noisy(t)),
            Flow::Maps(t) => Flow::Maps(noisy(t)),
        };
        [ReconstructionLoss::Mse, ReconstructionLoss::ChannelSum]
            .into_iter()
            .flat_map(|loss| [(loss, None), (loss, Some(shifted.clone()))])
            .collect()
    }

    fn assert_agree(layer: QuantizedLayer<B>, x: Flow<B>) {
        for (loss, target_x) in target_cases(&x) {
            let [(d, gd), (g, gg)] = both(&armed(layer.clone()), x.clone(), target_x, loss);
            assert!(d > 0.0, "the perturbed rounding has a loss");
            assert!(
                (d - g).abs() <= 1e-4 * d.abs(),
                "{loss:?}: direct {d} vs Gram {g}"
            );
            let scale = gd.iter().fold(0f32, |m, v| m.max(v.abs()));
            let diff = gd
                .iter()
                .zip(&gg)
                .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(
                diff <= 1e-3 * scale,
                "{loss:?}: gradients differ by {diff} (scale {scale})"
            );
        }
    }

    fn device() -> burn::tensor::Device<B> {
        Default::default()
    }

    #[test]
    fn should_match_the_direct_loss_and_gradient_on_dense() {
        B::seed(&device(), 3);
        let dense = QuantizedDenseConfig::new(12, 7)
            .with_quantizer(WeightQuantizer::max_per_axis(3).unwrap())
            .init::<B>(&device());
        let x = Tensor::<B, 2>::random([40, 12], Distribution::Normal(0.5, 1.0), &device());
        assert_agree(QuantizedLayer::Dense(dense), Flow::Rows(x));
    }

    #[test]
    fn should_match_the_direct_loss_and_gradient_on_conv2d_variants() {
        B::seed(&device(), 4);
        let x = Tensor::<B, 4>::random([3, 4, 9, 8], Distribution::Normal(0.2, 1.0), &device());
        let variants = [
            (PaddingConfig2d::Valid, [1, 1], [1, 1]),
            (PaddingConfig2d::Same, [2, 2], [1, 1]), // Keras same, asymmetric on even sizes
            (PaddingConfig2d::Same, [1, 1], [2, 2]),
            (PaddingConfig2d::Explicit(1, 2, 0, 1), [2, 1], [1, 1]),
        ];
        for (padding, stride, dilation) in variants {
            let conv = QuantizedConv2dConfig::new([4, 5], [3, 3])
                .with_padding(padding)
                .with_stride(stride)
                .with_dilation(dilation)
                .with_quantizer(WeightQuantizer::max_per_axis(4).unwrap())
                .init::<B>(&device());
            assert_agree(QuantizedLayer::Conv2d(conv), Flow::Maps(x.clone()));
        }
    }

    #[test]
    fn should_match_the_direct_loss_and_gradient_on_depthwise_and_grouped_convs() {
        B::seed(&device(), 5);
        let x = Tensor::<B, 4>::random([2, 4, 7, 7], Distribution::Normal(0.0, 1.0), &device());
        for (groups, c_out) in [(4, 8), (2, 6), (4, 4)] {
            let conv = QuantizedConv2dConfig::new([4, c_out], [3, 3])
                .with_groups(groups)
                .with_padding(PaddingConfig2d::Same)
                .with_quantizer(WeightQuantizer::max(3).unwrap())
                .init::<B>(&device());
            assert_agree(QuantizedLayer::Conv2d(conv), Flow::Maps(x.clone()));
        }
    }

    /// A depthwise variant: padding, kernel, stride, dilation.
    type Variant = (PaddingConfig2d, [usize; 2], [usize; 2], [usize; 2]);

    fn depthwise_variants() -> Vec<Variant> {
        vec![
            (PaddingConfig2d::Same, [3, 3], [2, 2], [1, 1]),
            (PaddingConfig2d::Same, [5, 5], [1, 1], [1, 1]),
            (
                PaddingConfig2d::Explicit(2, 1, 0, 1),
                [3, 2],
                [1, 2],
                [2, 1],
            ),
            (PaddingConfig2d::Valid, [3, 3], [1, 1], [1, 1]),
        ]
    }

    fn depthwise_conv((padding, kernel, stride, dilation): Variant) -> QuantizedLayer<B> {
        let conv = QuantizedConv2dConfig::new([5, 5], kernel)
            .with_groups(5)
            .with_padding(padding)
            .with_stride(stride)
            .with_dilation(dilation)
            .with_quantizer(WeightQuantizer::max_per_axis(3).unwrap())
            .init::<B>(&device());
        QuantizedLayer::Conv2d(conv)
    }

    #[test]
    fn should_compute_depthwise_grams_in_host_memory_as_from_the_patches() {
        B::seed(&device(), 6);
        let x = Tensor::<B, 4>::random([3, 5, 9, 8], Distribution::Normal(0.3, 1.0), &device());
        let t_x = x.clone() + x.random_like(Distribution::Normal(0.0, 0.3));
        for variant in depthwise_variants() {
            let layer = depthwise_conv(variant.clone());
            assert!(depthwise(&layer).is_some(), "{variant:?}");
            let inputs = [Flow::Maps(x.clone())];
            let targets = [layer.forward_float_flow(Flow::Maps(t_x.clone()))];
            let loss = ReconstructionLoss::Mse;
            let host = grams(&layer, &inputs, Some(&targets), loss).unwrap();
            let (pg, residual, sums) =
                patch_stats(layer.matrix().unwrap(), &inputs[0], Some(&targets[0]));
            let (hr, hc) = host.residuals.unwrap().remove(0);
            let (pr, pc) = residual.unwrap();
            let pairs = [
                (host.grams[0].clone().flatten::<1>(0, 2), pg.flatten(0, 2)),
                (hr.flatten(0, 2), pr.flatten(0, 2)),
                (hc, pc),
                (host.sums.x.flatten(0, 2), sums.x.flatten(0, 2)),
                (
                    host.sums.d0.unwrap().flatten(0, 2),
                    sums.d0.unwrap().flatten(0, 2),
                ),
            ];
            for (h, p) in pairs {
                let scale: f32 = p.clone().abs().max().into_scalar();
                let diff: f32 = (h - p).abs().max().into_scalar();
                assert!(
                    diff <= 1e-4 * scale,
                    "{variant:?}: differ by {diff} (scale {scale})"
                );
            }
        }
    }

    #[test]
    fn should_match_the_direct_loss_and_gradient_on_depthwise_convs_in_host_memory() {
        B::seed(&device(), 7);
        let x = Tensor::<B, 4>::random([3, 5, 9, 8], Distribution::Normal(0.3, 1.0), &device());
        // Stride 1: Burn 0.21's autodiff cannot take the direct path's gradient through a
        // strided grouped convolution; the test above covers strides.
        for variant in depthwise_variants().into_iter().filter(|v| v.2 == [1, 1]) {
            assert_agree(depthwise_conv(variant), Flow::Maps(x.clone()));
        }
    }

    /// `(gram, direct)` differ by at most `tol` of the direct value's scale.
    fn assert_close(gram: f64, direct: f64, tol: f64, what: &str) {
        assert!(
            (gram - direct).abs() <= tol * direct.abs().max(1e-12),
            "{what}: Gram {gram} vs direct {direct}"
        );
    }

    #[test]
    fn should_give_the_direct_errors_and_bias_correction_from_the_streamed_grams() {
        use crate::unit::{correct_bias, layer_error};
        B::seed(&device(), 9);
        let maps =
            |n| Tensor::<B, 4>::random([n, 4, 9, 8], Distribution::Normal(0.3, 1.0), &device());
        let conv = |groups: usize, c_out: usize, stride: usize| {
            QuantizedConv2dConfig::new([4, c_out], [3, 3])
                .with_groups(groups)
                .with_padding(PaddingConfig2d::Same)
                .with_stride([stride, stride])
                .with_quantizer(WeightQuantizer::max_per_axis(3).unwrap())
                .init::<B>(&device())
        };
        let dense = QuantizedDenseConfig::new(12, 7)
            .with_quantizer(WeightQuantizer::max_per_axis(3).unwrap())
            .init::<B>(&device());
        let rows = |n| Tensor::<B, 2>::random([n, 12], Distribution::Normal(0.5, 1.0), &device());
        let cases: Vec<(QuantizedLayer<B>, Vec<Flow<B>>)> = vec![
            (
                QuantizedLayer::Conv2d(conv(1, 5, 2)),
                (0..3).map(|_| Flow::Maps(maps(2))).collect(),
            ),
            (
                QuantizedLayer::Conv2d(conv(2, 6, 1)),
                (0..2).map(|_| Flow::Maps(maps(3))).collect(),
            ),
            // Depthwise: the host path.
            (
                QuantizedLayer::Conv2d(conv(4, 4, 2)),
                (0..3).map(|_| Flow::Maps(maps(2))).collect(),
            ),
            (
                QuantizedLayer::Dense(dense),
                (0..3).map(|_| Flow::Rows(rows(10))).collect(),
            ),
        ];
        for (c, (layer, inputs)) in cases.into_iter().enumerate() {
            for (loss, shift) in target_cases(&inputs[0]) {
                let targets: Vec<Flow<B>> = inputs
                    .iter()
                    .map(|x| {
                        let x = match (&shift, x) {
                            (Some(_), Flow::Maps(t)) => Flow::Maps(t.clone().mul_scalar(1.1)),
                            (Some(_), Flow::Rows(t)) => Flow::Rows(t.clone().mul_scalar(1.1)),
                            (None, x) => x.clone(),
                        };
                        layer.forward_float_flow(x)
                    })
                    .collect();
                let other = shift.is_some().then_some(&targets[..]);
                // Streamed: one batch at a time, joined.
                let grams = (0..inputs.len())
                    .map(|b| {
                        let t = other.map(|t| &t[b..b + 1]);
                        grams(&layer, &inputs[b..b + 1], t, loss).unwrap()
                    })
                    .reduce(Grams::join)
                    .unwrap();
                assert_eq!(grams.grams.len(), inputs.len());
                let soft = armed(layer.clone()).set_training(false);
                let (rounded, _) = soft.clone().finalize(true);
                let corrected = correct_bias(rounded.clone(), &inputs, &targets);
                let what = format!("case {c}, {loss:?}, other inputs {}", shift.is_some());
                for (name, l) in [
                    ("nearest", &layer),
                    ("armed", &soft),
                    ("rounded", &rounded),
                    ("corrected", &corrected),
                ] {
                    let direct = layer_error(l, (None, None), &inputs, &targets);
                    assert!(direct > 0.0, "{what}: {name} has an error");
                    assert_close(
                        error(&layer, l, &grams),
                        direct,
                        1e-4,
                        &format!("{what}, {name}"),
                    );
                }
                let shift = bias_shift(&layer, &rounded, &grams).expect("a bias");
                let shifted = rounded.clone().shift_bias(shift).0;
                let bias = |l: &QuantizedLayer<B>| -> Vec<f32> {
                    l.bias().unwrap().1.into_data().to_vec().unwrap()
                };
                for (g, d) in bias(&shifted).into_iter().zip(bias(&corrected)) {
                    assert!(
                        (g - d).abs() <= 1e-4 * (1.0 + d.abs()),
                        "{what}: bias {g} vs {d}"
                    );
                }
            }
        }
    }

    #[test]
    fn should_pick_gram_only_where_it_is_exact_and_cheaper() {
        let dense = |n: usize| {
            let l = QuantizedDenseConfig::new(16, 4).init::<B>(&device());
            let x = Flow::Rows(Tensor::<B, 2>::zeros([n, 16], &device()));
            (QuantizedLayer::Dense(l), x)
        };
        let (l, x) = dense(64);
        assert_eq!(sizes(&l, &x), (16, 64));
        let (l, x) = dense(8);
        assert_eq!(sizes(&l, &x), (16, 8));
        assert!(supports(&l));
    }
}
