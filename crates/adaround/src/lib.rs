//! AdaRound (adaptive rounding) post-training weight quantization for
//! [Burn](https://burn.dev) models, on any backend.
//!
//! Nearest rounding of weights to a 4-bit grid and below loses much of a model's accuracy.
//! AdaRound ([Nagel et al. 2020](https://arxiv.org/abs/2004.10568)) learns, layer by
//! layer, whether each weight rounds down or up, from a few hundred unlabeled samples.
//!
//! Build the model from [`adaround_layers`] (or convert its float layers), then call
//! [`AdaRound`] with calibration samples and the model's own forward:
//!
//! ```
//! use adaround::{AdaRound, AdaRoundConfig, Schedule, WeightQuantizer};
//! use adaround::layers::{QuantizedDense, QuantizedDenseConfig, QuantizedReLU, QuantizedReLUConfig};
//! use burn::{module::Module, tensor::{backend::Backend, Distribution, Tensor}};
//!
//! #[derive(Module, Debug)]
//! struct Mlp<B: Backend> {
//!     fc1: QuantizedDense<B>,
//!     act: QuantizedReLU<B>,
//!     fc2: QuantizedDense<B>,
//! }
//!
//! impl<B: Backend> Mlp<B> {
//!     fn forward(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
//!         self.fc2.forward(self.act.forward(self.fc1.forward(x)))
//!     }
//! }
//!
//! type B = burn_ndarray::NdArray<f32>;
//! let device = Default::default();
//! let q = WeightQuantizer::max_per_axis(3).unwrap();
//! let model = Mlp::<B> {
//!     fc1: QuantizedDenseConfig::new(8, 16).with_quantizer(q.clone()).init(&device),
//!     act: QuantizedReLUConfig::new().with_bitwidth(8).init(),
//!     fc2: QuantizedDenseConfig::new(16, 4).with_quantizer(q).init(&device),
//! };
//! let samples = Tensor::<B, 2>::random([64, 8], Distribution::Normal(0.0, 1.0), &device);
//!
//! let config = AdaRoundConfig::new(Schedule::epochs(50)).with_learning_rate(1e-2);
//! let (rounded, report) = AdaRound::new(config)
//!     .run(&model, samples, |m, x| m.forward(x))
//!     .unwrap();
//!
//! assert_eq!(report.layers.len(), 2);
//! assert_eq!(report.layers[0].name, "fc1");
//! for layer in &report.layers {
//!     assert!(layer.err_final <= layer.err_before);
//! }
//! # let _ = rounded;
//! ```
#![warn(missing_docs)]

mod capture;
mod config;
mod error;
mod io;
mod layer;
mod progress;
mod report;
mod run;
mod schedule;

pub use choose::{Candidate, CandidateScore, MethodChoice};
pub use io::import;
use io::{checkpoint, export, params};
use layer::{fused, gptq, gram, host, optimize, place, refine, seqmse, step, unit};
use run::{block, choose, discover, driver, guard, site, stages};

pub use adaround_core::{
    AdaRoundParams, AdaRoundQuantizer, Grid, QuantizerError, RoundingStatus, WeightQuantizer,
};
pub use config::{
    AdaRoundConfig, BlockConfig, BlockInit, Elementwise, FinalRounding, LossPath, ModelGuard,
    PerformanceConfig, ReconstructionLoss, Refine, RoundingMethod, RunConfig, ScaleSearch,
    SeparableStep, Target,
};
pub use driver::AdaRound;
pub use error::AdaRoundError;
pub use export::{export_integers, AimetEncoding, IntegerExport, IntegerKernel, INTEGER_FORMAT};
pub use guard::ModelOutput;
pub use progress::Progress;
pub use report::{
    AdaRoundReport, KernelReport, LayerReport, ModelCheck, ScaleOutcome, StepLog, HISTOGRAM_BINS,
};
pub use schedule::{BetaDecay, Schedule};
pub use stages::Stage;

/// The README's examples, compiled and run as doctests.
#[doc = include_str!("../../../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;

/// The guide's examples (`docs/guide.md`), compiled and run as doctests.
#[doc = include_str!("../../../docs/guide.md")]
#[cfg(doctest)]
pub struct GuideDoctests;

/// Backends re-exported for convenience.
#[cfg(feature = "wgpu")]
pub mod backend {
    /// The GPU backend (WebGPU: Vulkan, Metal, DX12). Pass [`AdaRound::run`](crate::AdaRound::run) a
    /// model on it as it is (an inference model: an `Autodiff` model is refused); the driver
    /// wraps the layer it optimises in autodiff where a step needs it.
    pub type Wgpu = burn_wgpu::Wgpu;
    pub use burn_wgpu;
}

/// The weight quantizers and the AdaRound quantizer.
pub use adaround_core as core;
/// The quantized layers.
pub use adaround_layers as layers;
/// Burn's model store (SafeTensors and PyTorch files), for [`import`].
pub use burn_store as store;
