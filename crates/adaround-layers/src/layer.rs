use adaround_core::{AdaRoundParams, AdaRoundQuantizer, QuantizerError};
use burn::{
    module::{Module, Param, ParamId},
    tensor::{backend::Backend, Tensor},
};
use serde::{Deserialize, Serialize};

use crate::{
    conv2d::CONV_AXIS, dense::DENSE_AXIS, probe::Flow, QuantizedConv2d, QuantizedDense,
    QuantizedSeparableConv2d, QuantizerSlot,
};

/// Any quantized neural layer: what a driver optimises one at a time.
#[allow(clippy::large_enum_variant)] // Burn modules are held by value (as burn-nn's `Activation`); tensors inside are shared handles
#[derive(Module, Debug)]
pub enum QuantizedLayer<B: Backend> {
    /// A [`QuantizedDense`].
    Dense(QuantizedDense<B>),
    /// A [`QuantizedConv2d`].
    Conv2d(QuantizedConv2d<B>),
    /// A [`QuantizedSeparableConv2d`].
    SeparableConv2d(QuantizedSeparableConv2d<B>),
}

/// The kind of a [`QuantizedLayer`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum LayerKind {
    /// Dense.
    Dense,
    /// Conv2D.
    Conv2d,
    /// SeparableConv2D.
    SeparableConv2d,
}

/// Which kernel of a layer: the one kernel of a Dense or Conv2D layer, or one of the two of
/// a separable convolution. Serialized (reports, integer exports) as `"kernel"`,
/// `"depthwise"` and `"pointwise"`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KernelRole {
    /// The kernel of a Dense or Conv2D layer.
    Kernel,
    /// The depthwise kernel of a separable convolution.
    Depthwise,
    /// The pointwise kernel of a separable convolution.
    Pointwise,
}

impl KernelRole {
    /// `"kernel"`, `"depthwise"` or `"pointwise"`, as serialized.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Kernel => "kernel",
            Self::Depthwise => "depthwise",
            Self::Pointwise => "pointwise",
        }
    }
}

impl core::fmt::Display for KernelRole {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How the rounding of one kernel changed when AdaRound was finalized.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct KernelChange {
    /// Which kernel of the layer.
    pub kernel: KernelRole,
    /// Quantized weights that differ from nearest rounding of the original weights.
    pub changed: usize,
    /// Number of weights.
    pub total: usize,
}

/// Replaces the slot by AdaRound over `weight`.
fn arm<B: Backend, const D: usize>(
    weight: &Param<Tensor<B, D>>,
    slot: QuantizerSlot<B>,
    axis: usize,
    params: &AdaRoundParams,
) -> Result<QuantizerSlot<B>, QuantizerError> {
    let q = slot.quantizer().clone();
    Ok(AdaRoundQuantizer::new(q, weight.val(), axis, params)?.into())
}

/// Writes the rounded weights into `weight` and restores the original quantizer.
fn finalize_kernel<B: Backend, const D: usize>(
    weight: Param<Tensor<B, D>>,
    slot: QuantizerSlot<B>,
    axis: usize,
    hard: bool,
    role: KernelRole,
) -> (Param<Tensor<B, D>>, QuantizerSlot<B>, KernelChange) {
    let total = weight.shape().num_elements();
    match slot {
        QuantizerSlot::Plain(q) => (
            weight,
            QuantizerSlot::Plain(q),
            KernelChange {
                kernel: role,
                changed: 0,
                total,
            },
        ),
        QuantizerSlot::AdaRound(ada) => {
            let rounded: Tensor<B, D> = if hard {
                ada.hard_recons_weights()
            } else {
                ada.recons_weights()
            };
            let rounded = rounded.detach();
            let q = ada.quantizer;
            let before = q.quantize(weight.val().detach(), axis);
            let after = q.quantize(rounded.clone(), axis);
            let changed = before.not_equal(after).int().sum().into_scalar();
            let changed = burn::tensor::ElementConversion::elem::<i64>(changed) as usize;
            let weight = weight.map(|_| rounded);
            (
                weight,
                QuantizerSlot::Plain(q),
                KernelChange {
                    kernel: role,
                    changed,
                    total,
                },
            )
        }
    }
}

fn set_training<B: Backend>(slot: QuantizerSlot<B>, training: bool) -> QuantizerSlot<B> {
    match slot {
        QuantizerSlot::AdaRound(ada) => QuantizerSlot::AdaRound(ada.set_training(training)),
        plain => plain,
    }
}

impl<B: Backend> QuantizedLayer<B> {
    /// The kind of layer.
    pub fn kind(&self) -> LayerKind {
        match self {
            Self::Dense(_) => LayerKind::Dense,
            Self::Conv2d(_) => LayerKind::Conv2d,
            Self::SeparableConv2d(_) => LayerKind::SeparableConv2d,
        }
    }

    /// Applies the layer as its slots say (quantized, or AdaRound's weights), without
    /// reporting to any probe.
    pub fn forward_flow(&self, input: Flow<B>) -> Flow<B> {
        self.run(input, false)
    }

    /// Applies the layer with its float kernels.
    pub fn forward_float_flow(&self, input: Flow<B>) -> Flow<B> {
        self.run(input, true)
    }

    fn run(&self, input: Flow<B>, float: bool) -> Flow<B> {
        match (self, input) {
            (Self::Dense(l), Flow::Rows(x)) => Flow::Rows(l.forward_with(x, float)),
            (Self::Conv2d(l), Flow::Maps(x)) => Flow::Maps(l.forward_with(x, float)),
            (Self::SeparableConv2d(l), Flow::Maps(x)) => Flow::Maps(l.forward_with(x, float)),
            (layer, input) => panic!(
                "{:?} layer cannot take an input of shape {:?}",
                layer.kind(),
                input.dims()
            ),
        }
    }

    /// The layer's kernels: `(role, parameter id, number of weights)`.
    pub fn kernels(&self) -> Vec<(KernelRole, ParamId, usize)> {
        let role = KernelRole::Kernel;
        match self {
            Self::Dense(l) => vec![(role, l.weight.id, l.weight.shape().num_elements())],
            Self::Conv2d(l) => vec![(role, l.weight.id, l.weight.shape().num_elements())],
            Self::SeparableConv2d(l) => vec![
                (
                    KernelRole::Depthwise,
                    l.weight_dw.id,
                    l.weight_dw.shape().num_elements(),
                ),
                (
                    KernelRole::Pointwise,
                    l.weight.id,
                    l.weight.shape().num_elements(),
                ),
            ],
        }
    }

    /// The float kernels, flattened, with their parameter ids.
    pub fn kernel_values(&self) -> Vec<(ParamId, Tensor<B, 1>)> {
        let flat4 = |p: &Param<Tensor<B, 4>>| (p.id, p.val().flatten(0, 3));
        match self {
            Self::Dense(l) => vec![(l.weight.id, l.weight.val().flatten(0, 1))],
            Self::Conv2d(l) => vec![flat4(&l.weight)],
            Self::SeparableConv2d(l) => vec![flat4(&l.weight_dw), flat4(&l.weight)],
        }
    }

    /// Whether any kernel is quantized (not the float pass-through).
    pub fn is_quantizing(&self) -> bool {
        self.slots().iter().any(|s| s.quantizer().is_quantizing())
    }

    /// The quantizer slots, in kernel order.
    pub fn slots(&self) -> Vec<&QuantizerSlot<B>> {
        match self {
            Self::Dense(l) => vec![&l.quantizer],
            Self::Conv2d(l) => vec![&l.quantizer],
            Self::SeparableConv2d(l) => vec![&l.quantizer_dw, &l.quantizer],
        }
    }

    /// The AdaRound quantizers in the slots, in kernel order.
    pub fn adarounds(&self) -> Vec<&AdaRoundQuantizer<B>> {
        self.slots()
            .into_iter()
            .filter_map(|s| s.adaround())
            .collect()
    }

    /// Puts an AdaRound quantizer, wrapping the current one, in every quantizing slot.
    pub fn with_adaround(self, params: &AdaRoundParams) -> Result<Self, QuantizerError> {
        let arm4 = |w: &Param<Tensor<B, 4>>, s: QuantizerSlot<B>| -> Result<_, QuantizerError> {
            if s.quantizer().is_quantizing() {
                arm(w, s, CONV_AXIS, params)
            } else {
                Ok(s)
            }
        };
        Ok(match self {
            Self::Dense(mut l) => {
                if l.quantizer.quantizer().is_quantizing() {
                    l.quantizer = arm(&l.weight, l.quantizer, DENSE_AXIS, params)?;
                }
                Self::Dense(l)
            }
            Self::Conv2d(mut l) => {
                l.quantizer = arm4(&l.weight, l.quantizer)?;
                Self::Conv2d(l)
            }
            Self::SeparableConv2d(mut l) => {
                l.quantizer_dw = arm4(&l.weight_dw, l.quantizer_dw)?;
                l.quantizer = arm4(&l.weight, l.quantizer)?;
                Self::SeparableConv2d(l)
            }
        })
    }

    /// Sets every AdaRound quantizer to training (soft) or evaluation (quantized) mode.
    pub fn set_training(self, training: bool) -> Self {
        match self {
            Self::Dense(mut l) => {
                l.quantizer = set_training(l.quantizer, training);
                Self::Dense(l)
            }
            Self::Conv2d(mut l) => {
                l.quantizer = set_training(l.quantizer, training);
                Self::Conv2d(l)
            }
            Self::SeparableConv2d(mut l) => {
                l.quantizer_dw = set_training(l.quantizer_dw, training);
                l.quantizer = set_training(l.quantizer, training);
                Self::SeparableConv2d(l)
            }
        }
    }

    /// Writes AdaRound's rounded weights (`hard`: `1[alpha >= 0]`) into the float kernels,
    /// restores the original quantizers, and counts the quantized weights that differ from
    /// nearest rounding of the previous kernels.
    pub fn finalize(self, hard: bool) -> (Self, Vec<KernelChange>) {
        match self {
            Self::Dense(mut l) => {
                let (w, s, c) =
                    finalize_kernel(l.weight, l.quantizer, DENSE_AXIS, hard, KernelRole::Kernel);
                (l.weight, l.quantizer) = (w, s);
                (Self::Dense(l), vec![c])
            }
            Self::Conv2d(mut l) => {
                let (w, s, c) =
                    finalize_kernel(l.weight, l.quantizer, CONV_AXIS, hard, KernelRole::Kernel);
                (l.weight, l.quantizer) = (w, s);
                (Self::Conv2d(l), vec![c])
            }
            Self::SeparableConv2d(mut l) => {
                let (w, s, c_dw) = finalize_kernel(
                    l.weight_dw,
                    l.quantizer_dw,
                    CONV_AXIS,
                    hard,
                    KernelRole::Depthwise,
                );
                (l.weight_dw, l.quantizer_dw) = (w, s);
                let (w, s, c_pw) = finalize_kernel(
                    l.weight,
                    l.quantizer,
                    CONV_AXIS,
                    hard,
                    KernelRole::Pointwise,
                );
                (l.weight, l.quantizer) = (w, s);
                (Self::SeparableConv2d(l), vec![c_dw, c_pw])
            }
        }
    }
}
