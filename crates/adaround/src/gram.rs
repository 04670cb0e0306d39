//! The exact Gram-matrix form of the reconstruction loss.
//!
//! Without an activation after the layer and with targets computed from the same inputs,
//! the bias cancels and the loss is a quadratic form in `dW = W~ - W`: with `X` the layer's
//! input patches (im2col for a convolution, rows for a Dense layer) and `G = X^T X`
//! (`K x K`, `K = channels_in / groups * kh * kw`),
//!
//! `sum((W~ x - W x)^2) = sum(dW ⊙ (dW G))` (one `G` per group of a grouped convolution).
//!
//! `G` is computed once per batch; a step then costs `O(C_out * K^2)` whatever the number of
//! samples and positions. The loss and its gradient are those of the direct path up to
//! floating-point rounding.

use adaround_layers::{probe::Flow, QuantizedLayer};
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
    /// `include_activation`, targets from the same inputs); the direct path elsewhere.
    Gram,
}

/// The Gram matrices of one layer, one per batch: `[groups, K, K]`, and the divisor that
/// turns `sum(dW ⊙ (dW G))` into the configured loss.
pub(crate) struct Grams<B: Backend> {
    pub grams: Vec<Tensor<B, 3>>,
    pub divisors: Vec<f64>,
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

/// The Gram matrices of `layer` on each batch of `inputs`; `None` without a
/// [`MatrixLayer`](adaround_layers::MatrixLayer) form.
pub(crate) fn grams<B: Backend>(
    layer: &QuantizedLayer<B>,
    inputs: &[Flow<B>],
    loss: ReconstructionLoss,
) -> Option<Grams<B>> {
    let layer = layer.matrix()?;
    let [groups, rows, _] = layer.matrix_dims();
    let grams = inputs.iter().map(|input| layer.gram(input)).collect();
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
    Some(Grams { grams, divisors })
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
    let gram = grams.grams[b].clone();
    let [groups, rows, k] = d.dims();
    let quad = if groups == 1 {
        // A plain 2-D matmul: backends parallelise it better than a batch of one.
        let d = d.reshape([rows, k]);
        (d.clone().matmul(gram.reshape([k, k])) * d).sum()
    } else {
        (d.clone().matmul(gram) * d).sum()
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

    /// Loss and alpha gradient, direct and Gram, for `loss`.
    fn both(
        layer: &QuantizedLayer<B>,
        x: Flow<B>,
        loss: ReconstructionLoss,
    ) -> [(f32, Vec<f32>); 2] {
        let target = layer.forward_float_flow(x.clone()).detach();
        let alpha = |l: &QuantizedLayer<B>| l.adarounds()[0].alpha.clone();
        let direct = reconstruction_loss(layer.forward_flow(x.clone()), target, loss);
        let grams = grams(layer, &[x], loss).expect("a matrix layer");
        let gram = super::loss(layer, &grams, 0);
        [direct, gram].map(|l| {
            let value: f32 = l.clone().into_scalar();
            let g = alpha(layer).grad(&l.backward()).unwrap();
            (value, g.into_data().to_vec().unwrap())
        })
    }

    fn assert_agree(layer: QuantizedLayer<B>, x: Flow<B>) {
        for loss in [ReconstructionLoss::Mse, ReconstructionLoss::ChannelSum] {
            let [(d, gd), (g, gg)] = both(&armed(layer.clone()), x.clone(), loss);
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
