//! Quantized Dense, Conv2D and SeparableConv2D layers, and a quantized ReLU, for
//! [Burn](https://burn.dev), with swappable weight quantizers.
//!
//! Each layer keeps its float weights and applies the quantizer of each kernel on every
//! forward; the bias stays float. A [`QuantizerSlot`] holds a plain
//! [`WeightQuantizer`](adaround_core::WeightQuantizer) (the float pass-through included) or
//! an [`AdaRoundQuantizer`](adaround_core::AdaRoundQuantizer); swapping it never changes the
//! float weights, and the slot is saved with the layer's record.
//!
//! ```
//! use adaround_core::WeightQuantizer;
//! use adaround_layers::{QuantizedConv2dConfig, QuantizedDense, QuantizedReLUConfig};
//! use burn::nn::{LinearConfig, PaddingConfig2d};
//! use burn::tensor::Tensor;
//! type B = burn_ndarray::NdArray<f32>;
//!
//! let device = Default::default();
//! let conv = QuantizedConv2dConfig::new([3, 8], [3, 3])
//!     .with_padding(PaddingConfig2d::Same)
//!     .with_quantizer(WeightQuantizer::max_per_axis(4).unwrap())
//!     .init::<B>(&device);
//! let relu = QuantizedReLUConfig::new().with_bitwidth(4).init();
//! // Or from a float layer the model already has:
//! let linear = LinearConfig::new(8, 10).init::<B>(&device);
//! let dense = QuantizedDense::from_linear(linear, WeightQuantizer::max_per_axis(4).unwrap());
//!
//! let x = Tensor::<B, 4>::ones([2, 3, 5, 5], &device);
//! let y = relu.forward(conv.forward(x)).mean_dim(3).mean_dim(2).flatten::<2>(1, 3);
//! assert_eq!(dense.forward(y).dims(), [2, 10]);
//! ```
#![warn(missing_docs)]

mod checks;
mod conv2d;
mod dense;
pub mod file_layout;
mod fold;
mod layer;
pub mod native;
/// The forward probe the `adaround` driver installs to find and capture layers. Internal:
/// public only because the driver is another crate; not part of the API.
#[doc(hidden)]
pub mod probe;
mod relu;
mod separable;
mod slot;

pub use conv2d::{same_padding, QuantizedConv2d, QuantizedConv2dConfig, CONV_AXIS};
pub use dense::{QuantizedDense, QuantizedDenseConfig, DENSE_AXIS};
pub use fold::{FoldBatchNorm, FoldError};
pub use layer::{
    file_names, AdaRoundLayer, Kernel, KernelChange, KernelRole, LayerKind, MatrixLayer,
    QuantizedLayer,
};
pub use native::NativeQuantError;
pub use relu::{QuantizedReLU, QuantizedReLUConfig, QuantizedReLURecord};
pub use separable::{QuantizedSeparableConv2d, QuantizedSeparableConv2dConfig};
pub use slot::{QuantizerSlot, QuantizerSlotRecord};

#[cfg(test)]
mod tests;

/// Backend of the unit tests.
#[cfg(test)]
pub type TestBackend = burn_ndarray::NdArray<f32>;
/// Autodiff backend of the unit tests.
#[cfg(test)]
pub type TestAutodiffBackend = burn_autodiff::Autodiff<TestBackend>;
