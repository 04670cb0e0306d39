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

use adaround_layers::{probe::Flow, MatrixLayer, QuantizedLayer};
use burn::tensor::{backend::Backend, Tensor};

use crate::ReconstructionLoss;

/// Which way a layer's reconstruction loss is computed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum LossPath {
    /// Choose the Gram path when it is exact for the layer and cheaper (more output
    /// positions per batch than patch size `K`), else the direct path.
    Auto,
    /// Run the layer on its cached inputs at every step.
    Direct,
    /// Use the precomputed Gram matrices where exact (Dense and Conv2D without
    /// `include_activation`); the direct path elsewhere.
    Gram,
}

/// The Gram matrices of one layer, one per batch: `[groups, K, K]`, and the divisor that
/// turns `sum(dW ⊙ (dW G))` into the configured loss.
#[derive(Clone)]
pub(crate) struct Grams<B: Backend> {
    pub grams: Vec<Tensor<B, 3>>,
    pub divisors: Vec<f64>,
    /// With targets from other inputs, per batch: `R = D0ᵀ X` (`[groups, C_out / groups,
    /// K]`) and `c0 = sum(D0²)` (see the [module docs](self)).
    pub residuals: Option<Vec<Residual<B>>>,
}

/// `R = D0ᵀ X` and `c0 = sum(D0²)` of one batch.
pub(crate) type Residual<B> = (Tensor<B, 3>, Tensor<B, 1>);

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
        }
    }
}

/// Whether the Gram form exists for `layer` (the caller checks activation and targets).
pub(crate) fn supports<B: Backend>(layer: &QuantizedLayer<B>) -> bool {
    layer.matrix().is_some()
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
    let layer = layer.matrix()?;
    let residuals = other_targets.map(|targets| {
        let w = layer.float_matrix().swap_dims(1, 2);
        let residual = |(x, t): (&Flow<B>, &Flow<B>)| {
            let (x, t) = rows_less_bias(layer, x, t);
            let d0 = matmul(x.clone(), w.clone()) - t;
            (matmul(d0.clone().swap_dims(1, 2), x), d0.square().sum())
        };
        let batch = |(x, t): (&Flow<B>, &Flow<B>)| {
            chunks(layer, x)
                .map(|(start, n)| residual((&narrow(x, start, n), &narrow(t, start, n))))
                .reduce(|(r, c), (r2, c2)| (r + r2, c + c2))
                .expect("a batch holds a sample")
        };
        inputs.iter().zip(targets).map(batch).collect()
    });
    let [groups, rows, _] = layer.matrix_dims();
    let gram = |x: &Flow<B>| {
        chunks(layer, x)
            .map(|(start, n)| layer.gram(&narrow(x, start, n)))
            .reduce(|a, b| a + b)
            .expect("a batch holds a sample")
    };
    let grams = inputs.iter().map(gram).collect();
    let divisors = inputs
        .iter()
        .map(|input| {
            let positions = layer.positions(&input.dims());
            match loss {
                ReconstructionLoss::Mse => (positions * groups * rows) as f64,
                ReconstructionLoss::ChannelSum => positions as f64,
            }
        })
        .collect();
    Some(Grams {
        grams,
        divisors,
        residuals,
    })
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
    use crate::optimize::reconstruction_loss;

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
        for (groups, c_out) in [(4, 8), (2, 6)] {
            let conv = QuantizedConv2dConfig::new([4, c_out], [3, 3])
                .with_groups(groups)
                .with_padding(PaddingConfig2d::Same)
                .with_quantizer(WeightQuantizer::max(3).unwrap())
                .init::<B>(&device());
            assert_agree(QuantizedLayer::Conv2d(conv), Flow::Maps(x.clone()));
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
