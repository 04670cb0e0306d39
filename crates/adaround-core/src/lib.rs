//! Weight quantizers and the AdaRound quantizer as [Burn](https://burn.dev) modules.
//!
//! - [`WeightQuantizer`]: symmetric uniform quantizers (per tensor or per output channel,
//!   max- or standard-deviation-based) and the float pass-through, as serializable data.
//! - [`AdaRoundQuantizer`]: wraps a quantizer and its weights with a trainable `alpha` per
//!   weight that learns whether the weight rounds down or up
//!   ([Nagel et al. 2020, "Up or Down? Adaptive Rounding for Post-Training
//!   Quantization"](https://arxiv.org/abs/2004.10568)).
//!
//! ```
//! use adaround_core::{AdaRoundParams, AdaRoundQuantizer, WeightQuantizer};
//! use burn::tensor::Tensor;
//! type B = burn_ndarray::NdArray<f32>;
//!
//! let device = Default::default();
//! // A Dense kernel [d_input, d_output]: output channels on axis 1.
//! let w = Tensor::<B, 2>::from_floats([[0.5, -1.2, 0.03], [-0.25, 0.6, -0.09]], &device);
//! let q = WeightQuantizer::max_per_axis(4).unwrap();
//! let nearest = q.quantize(w.clone(), 1);
//!
//! let ada = AdaRoundQuantizer::new(q, w.clone(), 1, &AdaRoundParams::new()).unwrap();
//! // At creation the soft weights are the float weights...
//! let soft: Tensor<B, 2> = ada.recons_weights();
//! assert!(soft.sub(w).abs().max().into_scalar() < 1e-6);
//! // ...and in evaluation mode the quantizer rounds them to nearest.
//! let hard: Tensor<B, 2> = ada.set_training(false).quantize();
//! assert!(hard.sub(nearest).abs().max().into_scalar() < 1e-6);
//! ```
#![warn(missing_docs)]

mod adaround;
mod custom;
mod error;
mod persistent;
mod quantizer;
mod rounding;

pub use adaround::{
    AdaRoundMeta, AdaRoundParams, AdaRoundQuantizer, AdaRoundQuantizerRecord, RoundingStatus,
};
pub use custom::{register_quantizer, ScaleFn};
pub use error::QuantizerError;
pub(crate) use quantizer::Encoding;
pub use quantizer::{
    all_finite, Grid, WeightQuantizer, DEFAULT_STD_THRESHOLD, MAX_SCALE_FACTOR, MIN_RANGE,
};
pub use rounding::{Decimals, Numeric, Rounding};

#[doc(hidden)]
pub mod __private {
    pub use serde_json;
}

#[cfg(test)]
mod tests;

/// Backend of the unit tests.
#[cfg(test)]
pub type TestBackend = burn_ndarray::NdArray<f32>;
/// Autodiff backend of the unit tests.
#[cfg(test)]
pub type TestAutodiffBackend = burn_autodiff::Autodiff<TestBackend>;
