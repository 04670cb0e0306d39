//! Folding a BatchNorm into the layer before it.
//!
//! In inference a BatchNorm is the per-channel affine map `y = x * scale + shift`, with
//! `scale = gamma / sqrt(running_var + epsilon)` and `shift = beta - running_mean * scale`.
//! Folded into the layer before it, each output channel's kernel is multiplied by `scale`
//! and the bias becomes `b * scale + shift`: one layer computes what the two computed.
//!
//! The order the reference (cnn2snn) and AIMET use, and the one to follow: **fold first**,
//! then choose the quantizers (their scale factors see the folded kernels), then AdaRound.
//! Quantizing before folding would round kernels that the fold then rescales off the grid.

use std::fmt;

use burn::{
    module::Param,
    nn::{conv::Conv2d, BatchNorm, Linear},
    tensor::{backend::Backend, Tensor},
};

use crate::{QuantizedConv2d, QuantizedDense, QuantizedSeparableConv2d, QuantizerSlot};

/// Why a BatchNorm could not be folded.
#[derive(Clone, Debug, PartialEq)]
pub enum FoldError {
    /// The BatchNorm normalises another number of channels than the layer outputs.
    Channels {
        /// Output channels of the layer.
        layer: usize,
        /// Features of the BatchNorm.
        norm: usize,
    },
    /// The layer's quantizer is an armed AdaRound quantizer, whose rounding state belongs to
    /// the unfolded kernel: fold before quantizing.
    AdaRoundArmed,
    /// A channel's statistics give no finite affine map: `running_var + epsilon` is not
    /// positive and finite, or `gamma`, `beta` or `running_mean` is NaN or infinite.
    Statistics {
        /// The first such channel.
        channel: usize,
        /// Its running variance.
        running_var: f32,
        /// The BatchNorm's epsilon.
        epsilon: f64,
    },
    /// The folded kernel or bias of a channel overflows to a non-finite value.
    NonFinite {
        /// The first such channel.
        channel: usize,
    },
}

impl fmt::Display for FoldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Channels { layer, norm } => write!(
                f,
                "the BatchNorm has {norm} features but the layer outputs {layer} channels"
            ),
            Self::AdaRoundArmed => write!(
                f,
                "the layer's quantizer is an armed AdaRound quantizer; fold before quantizing"
            ),
            Self::Statistics {
                channel,
                running_var,
                epsilon,
            } => write!(
                f,
                "BatchNorm channel {channel} has no finite affine map (running_var \
                 {running_var}, epsilon {epsilon}, or a non-finite gamma, beta or mean)"
            ),
            Self::NonFinite { channel } => write!(
                f,
                "folding makes channel {channel}'s kernel or bias non-finite (overflow)"
            ),
        }
    }
}

impl std::error::Error for FoldError {}

/// A layer into which a following BatchNorm can be folded exactly.
///
/// ```
/// # use adaround_layers::{FoldBatchNorm, QuantizedConv2dConfig};
/// # use burn::nn::BatchNormConfig;
/// # type B = burn_ndarray::NdArray<f32>;
/// let device = Default::default();
/// let conv = QuantizedConv2dConfig::new([3, 8], [3, 3]).init::<B>(&device);
/// let norm = BatchNormConfig::new(8).init::<B>(&device);
/// // conv then norm (in inference) == folded
/// let folded = conv.fold_batch_norm(&norm).unwrap();
/// ```
pub trait FoldBatchNorm<B: Backend>: Sized {
    /// The layer followed by `norm` (in inference mode, with its running statistics) as one
    /// layer. `norm` itself is not changed.
    fn fold_batch_norm(self, norm: &BatchNorm<B>) -> Result<Self, FoldError>;
}

fn host<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.into_data().convert::<f32>().to_vec().expect("f32 values")
}

/// Refuses statistics without a finite affine map, naming the first such channel.
fn check_statistics<B: Backend>(norm: &BatchNorm<B>) -> Result<(), FoldError> {
    let var = host(norm.running_var.value());
    let others = [
        host(norm.gamma.val()),
        host(norm.beta.val()),
        host(norm.running_mean.value()),
    ];
    let bad = |c: usize| {
        let denom = var[c] as f64 + norm.epsilon;
        !(denom > 0.0 && denom.is_finite()) || others.iter().any(|o| !o[c].is_finite())
    };
    match (0..var.len()).find(|&c| bad(c)) {
        Some(channel) => Err(FoldError::Statistics {
            channel,
            running_var: var[channel],
            epsilon: norm.epsilon,
        }),
        None => Ok(()),
    }
}

/// The first channel (along `axis`) of `weight` or `bias` holding a non-finite value.
fn non_finite_channel<B: Backend, const D: usize>(
    weight: &Tensor<B, D>,
    bias: &Tensor<B, 1>,
    axis: usize,
) -> Option<usize> {
    let dims = weight.dims();
    let inner: usize = dims[axis + 1..].iter().product();
    let channels = dims[axis];
    let w = host(weight.clone());
    let in_weight = w.iter().position(|v| !v.is_finite());
    let in_bias = host(bias.clone()).iter().position(|v| !v.is_finite());
    in_weight.map(|i| (i / inner) % channels).or(in_bias)
}

/// `(scale, shift)` of `norm` in inference.
fn affine<B: Backend>(norm: &BatchNorm<B>) -> (Tensor<B, 1>, Tensor<B, 1>) {
    let mean = norm.running_mean.value();
    let var = norm.running_var.value();
    let scale = norm.gamma.val() / var.add_scalar(norm.epsilon).sqrt();
    let shift = norm.beta.val() - mean * scale.clone();
    (scale, shift)
}

/// A kernel and its bias.
type Folded<B, const D: usize> = (Param<Tensor<B, D>>, Option<Param<Tensor<B, 1>>>);

/// Scales `weight` along `axis` (of `D`) by `scale` and folds the shift into `bias`.
fn fold<B: Backend, const D: usize>(
    weight: Param<Tensor<B, D>>,
    bias: Option<Param<Tensor<B, 1>>>,
    axis: usize,
    norm: &BatchNorm<B>,
) -> Result<Folded<B, D>, FoldError> {
    let channels = weight.dims()[axis];
    let features = norm.gamma.dims()[0];
    if channels != features {
        return Err(FoldError::Channels {
            layer: channels,
            norm: features,
        });
    }
    check_statistics(norm)?;
    let (scale, shift) = affine(norm);
    let mut shape = [1; D];
    shape[axis] = channels;
    let factor = scale.clone().reshape(shape);
    let weight = weight.map(|w| w * factor);
    let bias = match bias {
        Some(b) => b.map(|b| b * scale + shift),
        None => Param::from_tensor(shift),
    };
    if let Some(channel) = non_finite_channel(&weight.val(), &bias.val(), axis) {
        return Err(FoldError::NonFinite { channel });
    }
    Ok((weight, Some(bias)))
}

fn check_plain<B: Backend>(slot: &QuantizerSlot<B>) -> Result<(), FoldError> {
    match slot.adaround() {
        Some(_) => Err(FoldError::AdaRoundArmed),
        None => Ok(()),
    }
}

impl<B: Backend> FoldBatchNorm<B> for QuantizedConv2d<B> {
    fn fold_batch_norm(mut self, norm: &BatchNorm<B>) -> Result<Self, FoldError> {
        check_plain(&self.quantizer)?;
        (self.weight, self.bias) = fold(self.weight, self.bias, 0, norm)?;
        Ok(self)
    }
}

impl<B: Backend> FoldBatchNorm<B> for QuantizedSeparableConv2d<B> {
    /// Folds into the pointwise kernel and the bias; the depthwise kernel is unchanged.
    fn fold_batch_norm(mut self, norm: &BatchNorm<B>) -> Result<Self, FoldError> {
        check_plain(&self.quantizer)?;
        check_plain(&self.quantizer_dw)?;
        (self.weight, self.bias) = fold(self.weight, self.bias, 0, norm)?;
        Ok(self)
    }
}

impl<B: Backend> FoldBatchNorm<B> for QuantizedDense<B> {
    fn fold_batch_norm(mut self, norm: &BatchNorm<B>) -> Result<Self, FoldError> {
        check_plain(&self.quantizer)?;
        (self.weight, self.bias) = fold(self.weight, self.bias, 1, norm)?;
        Ok(self)
    }
}

impl<B: Backend> FoldBatchNorm<B> for Conv2d<B> {
    fn fold_batch_norm(mut self, norm: &BatchNorm<B>) -> Result<Self, FoldError> {
        (self.weight, self.bias) = fold(self.weight, self.bias, 0, norm)?;
        Ok(self)
    }
}

impl<B: Backend> FoldBatchNorm<B> for Linear<B> {
    fn fold_batch_norm(mut self, norm: &BatchNorm<B>) -> Result<Self, FoldError> {
        (self.weight, self.bias) = fold(self.weight, self.bias, 1, norm)?;
        Ok(self)
    }
}
