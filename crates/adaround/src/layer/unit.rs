//! One quantized layer (or half of a separable one) and what it is optimised on: its held
//! inputs and targets or its streamed Gram matrices, the ReLU before the loss, and the
//! losses, errors and bias correction every step kind and the refinement share.

use adaround_layers::{probe::Flow, QuantizedLayer, QuantizedReLU};
use burn::tensor::{backend::Backend, Bool, ElementConversion, Tensor};

use crate::{
    gram::{self, Grams},
    AdaRoundError, ReconstructionLoss,
};

/// One quantized layer (or half of a separable one) with what it is optimised on.
pub(crate) struct Unit<'a, B: Backend> {
    /// Name for errors and progress.
    pub name: &'a str,
    /// The layer, not yet armed.
    pub layer: QuantizedLayer<B>,
    /// The quantized activation the outputs go through (`include_activation`).
    pub activation: Option<QuantizedReLU<B>>,
    /// The ReLU both outputs go through before the loss (`relu_loss`).
    pub relu: Option<Relu>,
    pub samples: Samples<'a, B>,
    /// Whether the targets are the float layer on these very inputs (else the Gram form
    /// carries the float kernel's residuals).
    pub same_inputs: bool,
}

/// What a unit is optimised on.
#[derive(Clone, Copy)]
pub(crate) enum Samples<'a, B: Backend> {
    /// The layer's inputs and target outputs, one per batch (targets after the unit's
    /// activation, if any; before its ReLU).
    Held {
        inputs: &'a [Flow<B>],
        targets: &'a [Flow<B>],
    },
    /// The layer's Gram matrices, accumulated batch by batch without keeping the batches
    /// (a layer with the Gram form, no activation and no ReLU): errors and bias correction
    /// come from them ([`gram::error`], [`gram::bias_shift`]).
    Streamed(&'a Grams<B>),
}

impl<B: Backend> Unit<'_, B> {
    /// The held inputs and targets (none when streamed).
    pub(crate) fn held(&self) -> (&[Flow<B>], &[Flow<B>]) {
        match self.samples {
            Samples::Held { inputs, targets } => (inputs, targets),
            Samples::Streamed(_) => (&[], &[]),
        }
    }

    /// Batches per epoch.
    pub(crate) fn batches(&self) -> usize {
        match self.samples {
            Samples::Held { inputs, .. } => inputs.len(),
            Samples::Streamed(grams) => grams.grams.len(),
        }
    }

    /// Mean over batches of `layer`'s error (this unit's layer in any state).
    pub(crate) fn error(&self, layer: &QuantizedLayer<B>) -> f64 {
        match self.samples {
            Samples::Held { inputs, targets } => layer_error(
                layer,
                (self.activation.as_ref(), self.relu),
                inputs,
                targets,
            ),
            Samples::Streamed(grams) => gram::error(&self.layer, layer, grams),
        }
    }

    /// `layer` with its bias corrected (see [`correct_bias`]).
    pub(crate) fn correct_bias(&self, layer: QuantizedLayer<B>) -> QuantizedLayer<B> {
        match self.samples {
            Samples::Held { inputs, targets } => correct_bias(layer, inputs, targets),
            Samples::Streamed(grams) => match gram::bias_shift(&self.layer, &layer, grams) {
                Some(shift) => layer.shift_bias(shift).0,
                None => layer,
            },
        }
    }
}

/// The ReLU a layer's outputs and targets go through before the loss
/// ([`relu_loss`](crate::AdaRoundConfig::relu_loss)): `clip(x, 0, max)`, without an upper
/// bound when `max` is `None`. Its gradient passes where `0 <= x <= max` (Burn's `clamp`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Relu {
    pub max: Option<f64>,
}

impl Relu {
    /// The ReLU of `t`.
    pub(crate) fn apply<B: Backend, const D: usize>(self, t: Tensor<B, D>) -> Tensor<B, D> {
        match self.max {
            Some(max) => t.clamp(0.0, max),
            None => t.clamp_min(0.0),
        }
    }

    /// The ReLU of a flow.
    pub(crate) fn flow<B: Backend>(self, f: Flow<B>) -> Flow<B> {
        f.map(|t| self.apply(t), |t| self.apply(t))
    }

    /// Where the gradient does not pass: below 0, above `max`.
    pub(crate) fn blocked<B: Backend, const D: usize>(
        self,
        t: &Tensor<B, D>,
    ) -> Tensor<B, D, Bool> {
        let below = t.clone().lower_elem(0.0);
        match self.max {
            Some(max) => below.bool_or(t.clone().greater_elem(max)),
            None => below,
        }
    }
}

/// The squared error between outputs and targets, as configured.
pub(crate) fn reconstruction_loss<B: Backend>(
    output: Flow<B>,
    target: Flow<B>,
    loss: ReconstructionLoss,
) -> Tensor<B, 1> {
    match (output, target, loss) {
        (out, target, ReconstructionLoss::Mse) => {
            (out.flatten() - target.flatten()).powi_scalar(2).mean()
        }
        (Flow::Rows(out), Flow::Rows(target), ReconstructionLoss::ChannelSum) => {
            (out - target).powi_scalar(2).sum_dim(1).mean()
        }
        (Flow::Maps(out), Flow::Maps(target), ReconstructionLoss::ChannelSum) => {
            (out - target).powi_scalar(2).sum_dim(1).mean()
        }
        (out, target, _) => panic!(
            "output {:?} and target {:?} differ",
            out.dims(),
            target.dims()
        ),
    }
}

/// `layer` on `x`, through `activation` if any.
pub(crate) fn apply<B: Backend>(
    layer: &QuantizedLayer<B>,
    activation: Option<&QuantizedReLU<B>>,
    x: Flow<B>,
) -> Flow<B> {
    let out = layer.forward_flow(x);
    match activation {
        Some(act) => act.forward_flow(out, false),
        None => out,
    }
}

/// `Err(NonFinite)` naming `layer` unless `ok`.
pub(crate) fn ensure_finite(
    ok: bool,
    layer: &str,
    what: &'static str,
) -> Result<(), AdaRoundError> {
    if ok {
        Ok(())
    } else {
        Err(AdaRoundError::NonFinite {
            layer: layer.to_string(),
            what,
        })
    }
}

/// Whether every value of every flow is finite.
pub(crate) fn flows_finite<B: Backend>(flows: &[Flow<B>]) -> bool {
    flows
        .iter()
        .all(|f| adaround_core::all_finite(&f.clone().flatten()))
}

/// Mean over batches of the MSE between the layer's outputs and the targets (both through
/// `relu`, if any).
pub(crate) fn layer_error<B: Backend>(
    layer: &QuantizedLayer<B>,
    (activation, relu): (Option<&QuantizedReLU<B>>, Option<Relu>),
    inputs: &[Flow<B>],
    targets: &[Flow<B>],
) -> f64 {
    let total: f64 = inputs
        .iter()
        .zip(targets)
        .map(|(x, t)| {
            let out = apply(layer, activation, x.clone());
            let (out, t) = match relu {
                Some(relu) => (relu.flow(out), relu.flow(t.clone())),
                None => (out, t.clone()),
            };
            let mse = reconstruction_loss(out, t, ReconstructionLoss::Mse);
            mse.into_scalar().elem::<f64>()
        })
        .sum();
    total / inputs.len() as f64
}

/// `layer` with its bias shifted by the mean, per output channel, of the targets less its
/// outputs over all batches (unchanged without a bias).
pub(crate) fn correct_bias<B: Backend>(
    layer: QuantizedLayer<B>,
    inputs: &[Flow<B>],
    targets: &[Flow<B>],
) -> QuantizedLayer<B> {
    if layer.bias().is_none() {
        return layer;
    }
    let mut count = 0usize;
    let mut sum: Option<Tensor<B, 1>> = None;
    for (x, t) in inputs.iter().zip(targets) {
        let per_channel = match (layer.forward_flow(x.clone()), t.clone()) {
            (Flow::Rows(out), Flow::Rows(t)) => {
                count += out.dims()[0];
                (t - out).sum_dim(0).flatten::<1>(0, 1)
            }
            (Flow::Maps(out), Flow::Maps(t)) => {
                let [n, _, h, w] = out.dims();
                count += n * h * w;
                (t - out)
                    .sum_dim(0)
                    .sum_dim(2)
                    .sum_dim(3)
                    .flatten::<1>(0, 3)
            }
            (out, t) => panic!("output {:?} and target {:?} differ", out.dims(), t.dims()),
        };
        sum = Some(match sum {
            Some(s) => s + per_channel,
            None => per_channel,
        });
    }
    match sum {
        Some(sum) => layer.shift_bias(sum / count.max(1) as f32).0,
        None => layer,
    }
}
