use adaround_core::AdaRoundParams;

use burn::config::Config;
use serde::{Deserialize, Serialize};

use crate::{AdaRoundError, Schedule};

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

/// What the driver does with the whole model once every layer is rounded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ModelGuard {
    /// Nothing: no extra forward passes, [`AdaRoundReport::model`](crate::AdaRoundReport)
    /// is `None`.
    Off,
    /// Measure the output error (against the float model, on the calibration samples) of
    /// nearest rounding and of AdaRound, and report both; the AdaRound model is returned.
    Report,
    /// As `Report`, and when AdaRound's output error ends above nearest's, return the better
    /// mix: layers are put back to nearest rounding one at a time in forward order, each
    /// kept only where it lowers the output error, and nearest rounding everywhere if that
    /// is still better. The returned error is never above nearest's.
    KeepBetter,
}

/// The reconstruction loss between a layer's quantized and target outputs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ReconstructionLoss {
    /// Mean over all elements of the squared error (cnn2snn, Keras `MeanSquaredError`).
    Mse,
    /// Squared error summed over the channel (feature) axis, then averaged over the other
    /// axes: `||f(W~x) - f(Wx)||^2` per position (AIMET, BRECQ).
    ChannelSum,
}

/// Where the target outputs of a layer come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Target {
    /// The layer's inputs from the quantized model (preceding layers already rounded) through
    /// the layer with float weights (cnn2snn).
    QuantizedInputs,
    /// The float model's own activations: the layer's input taken from the float model
    /// (`f(W x_float)`), while the quantized layer still sees quantized inputs (asymmetric
    /// reconstruction, AdaRound paper §5, AIMET).
    FloatModel,
}

/// How a SeparableConv2D layer's two kernels are optimised.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum SeparableStep {
    /// Both kernels together against the layer's output, by autodiff through the depthwise
    /// and pointwise convolutions (cnn2snn).
    Joint,
    /// As two Conv2D problems, each with its own Gram matrices and fused step: the depthwise
    /// kernel against the float depthwise output, then the pointwise kernel on the rounded
    /// depthwise outputs (AIMET rounds them as two layers). Much faster on large maps.
    Split,
}

/// How each layer's rounding is chosen ([`AdaRoundConfig::method`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RoundingMethod {
    /// AdaRound: the rounding variables trained by the schedule.
    AdaRound,
    /// GPTQ (Frantar et al. 2022) on the layer's Gram matrices: one pass over the input
    /// columns, each weight rounded down or up with the error of the earlier ones
    /// compensated; seconds per layer, no schedule. Layers without the Gram form (an
    /// activation or ReLU in the loss, a separable layer optimised jointly) use AdaRound.
    Gptq,
    /// AdaRound started from GPTQ's decisions instead of the weights' fractional parts:
    /// each `h(alpha)` at 0.96 (up) or 0.04 (down), where the rectified sigmoid's slope is
    /// still 0.13, so that the schedule can change a decision. Layers without the Gram form
    /// start as plain AdaRound, with a warning.
    GptqThenAdaRound,
}

/// Where each layer's scale factors come from ([`AdaRoundConfig::scale_search`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ScaleSearch {
    /// The quantizer's own, from the weights alone.
    Quantizer,
    /// SeqMSE (AIMET): per output channel (per tensor for a per-tensor quantizer), the scale
    /// whose nearest rounding gives the lowest layer output error on the calibration
    /// samples, among the quantizer's own and the clipping ranges `k/40 * max |w|`
    /// (`k = 1..=40`; on the asymmetric grid `k/40` of `[min(w, 0), max(w, 0)]` with its
    /// integer offset), each scored on the layer's Gram matrices; AdaRound or GPTQ then
    /// rounds on that grid, and the finalized quantizer keeps it. Layers whose loss has no
    /// Gram form (an activation or ReLU in the loss, a joint separable step) and quantizers
    /// that would not keep the grid once finalized (the standard-deviation and custom
    /// quantizers, MSE above 8 bits) keep their own scale, with a warning. Costs 41
    /// products of the kernel with its Gram matrix per layer (and, for a layer on the direct
    /// path, the Gram matrices over all samples). Each kernel's report
    /// says which grid it ended on ([`KernelReport::scales`](crate::KernelReport)).
    SeqMse,
}

/// Which layers get their rounding refined after AdaRound
/// ([`AdaRoundConfig::refine`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Refine {
    /// None: AdaRound's rounding as it ends (the reference).
    Off,
    /// Dense layers.
    Dense,
    /// Dense and Conv2D layers, and a split separable convolution's halves.
    All,
}

/// How the rounded weights are written into the float kernel at the end.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum FinalRounding {
    /// `recons_weights` with the learned soft decimals; weights still roaming are rounded to
    /// nearest by the original quantizer (cnn2snn).
    Soft,
    /// Hard decimals `h = 1[alpha >= 0]` (AIMET).
    Hard,
}

/// Where the fused step (Dense and Conv2D, and the halves of a split separable layer) does
/// its work. The places give the same numbers up to floating-point rounding (tested).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Elementwise {
    /// [`Elementwise::Resident`] wherever it can run (an `f32` kernel, Burn's default Adam
    /// and at most 256 MiB of loss data): on Burn's CPU backends NdArray and Flex
    /// ([`Backend::name`](burn::tensor::backend::Backend::name)) whatever the step's size, on
    /// other backends
    /// for steps of at most [`Elementwise::RESIDENT_MAX_WORK`] multiply-adds, where each
    /// backend operation is a kernel launch (a GPU): there a small step costs its ~20
    /// launches, not its arithmetic. Where it cannot run: [`Elementwise::Host`] for kernels
    /// of at least [`Elementwise::HOST_MIN_WEIGHTS`] weights on Flex; [`Elementwise::Device`]
    /// otherwise (on smaller kernels the copies cost more than
    /// the passes they save; on NdArray, reading a matrix product back to host memory at every
    /// step costs more than the whole step).
    Auto,
    /// As tensor operations of the backend: about 30 passes over the weights per step,
    /// which a GPU backend runs as kernels (Burn's fusion joins them).
    Device,
    /// The elementwise work (the rectified sigmoid, the clamps, the masks and the
    /// rounding-loss gradient) in host memory: two vectorized passes over the weights per
    /// step, split over the threads of rayon's pool; the matrix products and the optimizer
    /// run on the backend, and the weights cross to the backend and back once per step (a
    /// copy on a CPU backend, a transfer on a GPU). Only for `f32` kernels (others run on
    /// the device).
    Host,
    /// The whole step in host memory: the elementwise passes, the matrix products (the
    /// `gemm` crate, Flex's matrix kernels, on rayon's threads) and Adam. The layer's Gram
    /// matrices (or patches and targets) cross to the host once per layer and the rounding
    /// variables go back at log points and at the end: no backend operation runs between.
    /// Only for `f32` kernels, Burn's Adam with its defaults (the optimizer of
    /// [`AdaRound`](crate::AdaRound) unless another is given)
    /// and Gram matrices, or patches and targets, of at most 256 MiB; otherwise as
    /// [`Elementwise::Host`].
    Resident,
}

impl Elementwise {
    /// The smallest kernel [`Elementwise::Auto`] takes to host memory on Flex.
    pub const HOST_MIN_WEIGHTS: usize = 1 << 15;

    /// The most multiply-adds per step [`Elementwise::Auto`] runs host-resident on a
    /// backend other than NdArray and Flex (where a host step and a GPU step break even;
    /// the measurements are in `docs/performance.md`).
    pub const RESIDENT_MAX_WORK: usize = 1 << 20;
}

/// Configuration of an AdaRound run.
///
/// Defaults follow the reference (cnn2snn); every option beyond it says which
/// implementation it follows.
#[derive(Config, Debug)]
pub struct AdaRoundConfig {
    /// Optimisation schedule of each layer (cnn2snn epochs, or AIMET/BRECQ iterations).
    pub schedule: Schedule,
    /// Samples per batch; `None` is one batch of all samples (cnn2snn). Only full batches
    /// are used. AIMET uses 32.
    #[config(default = "None")]
    pub batch_size: Option<usize>,
    /// Learning rate of the optimizer (Adam by default, as in AIMET).
    #[config(default = 1e-3)]
    pub learning_rate: f64,
    /// Reconstruction loss.
    #[config(default = "ReconstructionLoss::Mse")]
    pub loss: ReconstructionLoss,
    /// Compare outputs after the next quantized activation (cnn2snn `include_activation`).
    #[config(default = false)]
    pub include_activation: bool,
    /// Compare a layer's outputs after the ReLU that follows it, wherever one does, as
    /// AIMET does: both the rounded and the target outputs go through it before the loss,
    /// so errors on outputs the ReLU clears do not count. The ReLUs are the
    /// [`QuantizedReLU`](adaround_layers::QuantizedReLU)s the driver finds right after a
    /// layer, in their float form `clip(x, 0, max_value)`, and `max(x, 0)` after the layers
    /// named in [`relu_layers`](Self::relu_layers). Other layers keep the plain loss. Such a
    /// layer's loss has no Gram form: it runs the direct (fused where it can) path. Not with
    /// `include_activation`, which already compares after the quantized activation.
    #[config(default = false)]
    pub relu_loss: bool,
    /// The layers whose outputs go straight into a plain ReLU (Burn's `Relu` or `relu`, which
    /// the driver cannot see), for [`relu_loss`](Self::relu_loss), by the names the report
    /// gives them (a field path such as `conv1` or `block.fc`). A name that is not one of the
    /// model's quantized layers is an error. Burn's max pooling commutes with a ReLU: a ReLU
    /// after a pooling that follows the layer counts.
    #[config(default = "Vec::new()")]
    pub relu_layers: Vec<String>,
    /// Where the layer's target outputs come from.
    #[config(default = "Target::QuantizedInputs")]
    pub target: Target,
    /// Soft (cnn2snn) or hard (AIMET) final rounding.
    #[config(default = "FinalRounding::Soft")]
    pub rounding: FinalRounding,
    /// Keep nearest rounding for a layer whose AdaRound error ends higher than nearest's.
    /// Off reproduces the reference exactly.
    #[config(default = true)]
    pub never_worse: bool,
    /// After each layer is rounded, shift its bias by the mean difference between the
    /// targets and its outputs on the samples, per output channel (empirical bias
    /// correction): the bias that minimises the layer's squared error for the rounded
    /// kernels. Layers without a bias, and `include_activation` runs, are left as they are.
    /// Off reproduces the reference exactly.
    #[config(default = false)]
    pub bias_correction: bool,
    /// After AdaRound has rounded a layer, flip single rounding decisions (down <-> up)
    /// wherever the flip lowers the layer's loss on all the samples, greedily, row by row,
    /// until no single flip does: coordinate descent on the exact Gram form of the loss,
    /// which only lowers it (with [`bias_correction`](Self::bias_correction), the loss left
    /// after the bias is corrected). For the layers [`Refine`]
    /// names, without `include_activation` or `relu_loss` (others are left as AdaRound
    /// rounded them; so are layers whose patch size `K` is above 8 192, with a warning: the
    /// sweeps hold a `K x K` Gram matrix in host memory). It costs one Gram matrix over all
    /// samples for layers on the direct path. With the max scales, weights on the grid's top
    /// level stay there (the finalized layer's quantizer takes its scale again from the
    /// rounded weights); and where the refined layer's error once finalized is not below
    /// AdaRound's own, AdaRound's rounding is kept, with a warning.
    /// [`LayerReport::refined`](crate::LayerReport) counts the decisions changed. Off
    /// reproduces the reference exactly.
    #[config(default = "Refine::Off")]
    pub refine: Refine,
    /// How each layer's rounding is chosen: AdaRound (default) or GPTQ. The refinement, the
    /// bias correction and the guards apply to either.
    #[config(default = "RoundingMethod::AdaRound")]
    pub method: RoundingMethod,
    /// Where each layer's scale factors come from: the quantizer's own (default) or
    /// SeqMSE's search on the layer's output error ([`ScaleSearch`]).
    #[config(default = "ScaleSearch::Quantizer")]
    pub scale_search: ScaleSearch,
    /// Rectified-sigmoid and regulariser constants.
    #[config(default = "AdaRoundParams::new()")]
    pub params: AdaRoundParams,
    /// How a separable convolution's two kernels are optimised.
    #[config(default = "SeparableStep::Split")]
    pub separable: SeparableStep,
    /// What to do with the whole model once every layer is rounded: compare its output
    /// error with nearest rounding's on the calibration samples, and optionally keep the
    /// better (see [`ModelGuard`]).
    #[config(default = "ModelGuard::Report")]
    pub model_guard: ModelGuard,
    /// Run control: checkpoints, stopping early, how often losses are read.
    #[config(default = "RunConfig::new()")]
    pub run: RunConfig,
    /// Where and how each step computes (the numbers stay the same up to floating-point
    /// rounding): the loss path and the fused step's placement.
    #[config(default = "PerformanceConfig::new()")]
    pub performance: PerformanceConfig,
    /// Block reconstruction's settings, used where blocks are given
    /// ([`AdaRound::with_blocks`](crate::AdaRound::with_blocks)).
    #[config(default = "BlockConfig::new()")]
    pub block: BlockConfig,
}

/// Run control ([`AdaRoundConfig::run`]): where a run is checkpointed, where it stops, how
/// often it reads its losses. The rounding a finished run returns does not depend on
/// `checkpoint` or `stop_after`.
#[derive(Config, Debug, PartialEq)]
pub struct RunConfig {
    /// A folder for checkpoints: after each layer the model record (`model-<n>.bin`) and the
    /// report so far (`progress.json`) are written there, and a run that finds them resumes
    /// after the last finished layer (same model, samples and configuration required).
    #[config(default = "None")]
    pub checkpoint: Option<String>,
    /// Optimise at most this many layers in this call (the others keep their rounding);
    /// with `checkpoint`, a later call goes on where this one stopped.
    #[config(default = "None")]
    pub stop_after: Option<usize>,
    /// With an iteration schedule, read the losses (and check for early stop) every this
    /// many iterations; reading a loss waits for the device.
    #[config(default = 100)]
    pub log_every: usize,
}

/// Performance ([`AdaRoundConfig::performance`]): how each layer's steps are computed. The
/// choices give the same rounding up to floating-point rounding (tested); the defaults pick
/// per layer and backend.
#[derive(Config, Debug, PartialEq)]
pub struct PerformanceConfig {
    /// How the reconstruction loss is computed: the exact Gram-matrix form where it exists
    /// and is cheaper (`Auto`), always the direct layer forward (`Direct`), or the Gram form
    /// wherever it exists (`Gram`).
    #[config(default = "LossPath::Auto")]
    pub path: LossPath,
    /// Where the fused step does its elementwise work (see [`Elementwise`]).
    #[config(default = "Elementwise::Auto")]
    pub elementwise: Elementwise,
}

/// Where block reconstruction starts a block's rounding.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum BlockInit {
    /// Each layer of the block is first rounded on its own (the run's layer-wise method,
    /// with its bias correction and refinement); the block then starts from those decisions
    /// (`h(alpha)` at 0.96 or 0.04, where the rectified sigmoid still has slope 0.13) and
    /// changes them jointly: few steps suffice, and with
    /// [`AdaRoundConfig::never_worse`] a block never ends above its layer-wise rounding.
    LayerWise,
    /// BRECQ's start: `h(alpha)` equal to each weight's fractional part, as layer-wise
    /// AdaRound starts (BRECQ runs 20 000 steps per block). On the quantizers' own grids:
    /// [`ScaleSearch::SeqMse`] is not searched for these blocks (a warning says so, and the
    /// kernels' reports say [`ScaleOutcome::NotApplicable`](crate::ScaleOutcome)).
    Fractional,
}

/// Block reconstruction (BRECQ): the rounding of every quantized layer of a block optimised
/// together against the float block's output, by autodiff through the block. The regulariser
/// constants and the reconstruction loss are the run's ([`AdaRoundConfig`]); the optimizer
/// is Burn's Adam. The defaults (200 steps of 8 samples, learning rate 0.1, layer-wise
/// start) were chosen on held-out calibration crops of EfficientNet-Lite0 at W3.
#[derive(Config, Debug, PartialEq)]
pub struct BlockConfig {
    /// The schedule of each block (steps, warm start, `beta` decay).
    #[config(default = "Schedule::warm_cosine(200)")]
    pub schedule: Schedule,
    /// Samples per step, taken in turn from the run's batches (a divisor of the batch size
    /// keeps every sample in use); `None` is the whole batch.
    #[config(default = "Some(8)")]
    pub samples_per_step: Option<usize>,
    /// Where each block's rounding starts.
    #[config(default = "BlockInit::LayerWise")]
    pub init: BlockInit,
    /// Adam's learning rate on the alphas. With [`BlockInit::LayerWise`] it sets how far
    /// 200 steps can move a decision (`alpha` starts at ±2).
    #[config(default = 0.1)]
    pub learning_rate: f64,
}

impl AdaRoundConfig {
    /// AIMET's defaults: 10 000 iterations with 20 % warm start and cosine `beta`, batch 32,
    /// Adam with learning rate 1e-3, hard final rounding, channel-summed loss.
    pub fn aimet() -> Self {
        Self::new(Schedule::aimet())
            .with_batch_size(Some(32))
            .with_rounding(FinalRounding::Hard)
            .with_loss(ReconstructionLoss::ChannelSum)
    }

    /// The settings chosen on validation data (`cargo run --release --example choose --
    /// --sweep --held-out`: the digits CNN trained without 400 training images, scored on
    /// those images at every bitwidth, granularity and weight scheme of the quickstart):
    /// 4 000 iterations per layer with AIMET's 20 % warm start and cosine decay
    /// ([`Schedule::warm_cosine`]), batches of 32, learning rate 1e-2, the mean squared
    /// error ([`ReconstructionLoss::Mse`]) against the float model's own activations
    /// ([`Target::FloatModel`]), rounding-loss weight 0.03; bias correction after each
    /// layer ([`bias_correction`](Self::bias_correction), chosen on held-out images of the
    /// pretrained example); the Dense layers' rounding refined after AdaRound
    /// ([`Refine::Dense`], chosen on held-out images of all three example models, over three
    /// orders of the calibration samples); and the model-level guard
    /// [`ModelGuard::KeepBetter`], which costs a few forward passes over the samples. The
    /// fused step makes it a few seconds per small model; AIMET's defaults take
    /// 10 000-15 000 iterations at 1e-3.
    pub fn recommended() -> Self {
        Self::new(Schedule::warm_cosine(4000))
            .with_batch_size(Some(32))
            .with_loss(ReconstructionLoss::Mse)
            .with_target(Target::FloatModel)
            .with_learning_rate(1e-2)
            .with_params(AdaRoundParams::new().with_reg(0.03))
            .with_bias_correction(true)
            .with_refine(Refine::Dense)
            .with_model_guard(ModelGuard::KeepBetter)
    }

    /// Checks the configuration as [`AdaRound::run`](crate::AdaRound::run) does before it starts:
    /// a schedule with steps, positive batch size, learning rate, `stop_after` and
    /// `log_every`, `reg >= 0`, `gamma < 0 < 1 < zeta`, `beta_start >= beta_end >= 1`, all
    /// finite.
    pub fn validate(&self) -> Result<(), AdaRoundError> {
        self.check().map_err(AdaRoundError::InvalidConfig)
    }

    fn check(&self) -> Result<(), String> {
        self.schedule.validate()?;
        if self.batch_size == Some(0) {
            return Err("batch_size must be at least 1".into());
        }
        if !(self.learning_rate.is_finite() && self.learning_rate > 0.0) {
            return Err(format!(
                "learning_rate must be positive, got {}",
                self.learning_rate
            ));
        }
        if self.run.stop_after == Some(0) {
            return Err("run.stop_after must be at least 1".into());
        }
        if self.run.log_every == 0 {
            return Err("run.log_every must be at least 1".into());
        }
        if self.relu_loss && self.include_activation {
            return Err(
                "relu_loss and include_activation both compare after the activation; set one"
                    .into(),
            );
        }
        if !self.relu_layers.is_empty() && !self.relu_loss {
            return Err("relu_layers is set but relu_loss is not: set relu_loss too".into());
        }
        self.block.schedule.validate()?;
        let lr = self.block.learning_rate;
        if !(lr.is_finite() && lr > 0.0) {
            return Err(format!("block.learning_rate must be positive, got {lr}"));
        }
        if self.block.samples_per_step == Some(0) {
            return Err("block.samples_per_step must be at least 1".into());
        }
        let p = &self.params;
        if !(p.reg.is_finite() && p.reg >= 0.0) {
            return Err(format!("reg must be finite and >= 0, got {}", p.reg));
        }
        if !(p.gamma < 0.0 && p.zeta > 1.0 && p.gamma.is_finite() && p.zeta.is_finite()) {
            return Err(format!(
                "need gamma < 0 < 1 < zeta, got {} and {}",
                p.gamma, p.zeta
            ));
        }
        if !(p.beta_end >= 1.0 && p.beta_start >= p.beta_end && p.beta_start.is_finite()) {
            return Err(format!(
                "need beta_start >= beta_end >= 1 (|x|^beta at 0), got {} and {}",
                p.beta_start, p.beta_end
            ));
        }
        Ok(())
    }
}

impl AdaRoundConfig {
    /// The configuration that decides the numbers of a run (without checkpoint settings).
    pub(crate) fn numerics(&self) -> String {
        let mut c = self.clone();
        c.run.checkpoint = None;
        c.run.stop_after = None;
        serde_json::to_string(&c).expect("configs serialize")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn finite_or_not() -> impl Strategy<Value = f64> {
        prop_oneof![
            -10.0f64..10.0,
            Just(0.0),
            Just(f64::NAN),
            Just(f64::INFINITY),
            Just(f64::NEG_INFINITY)
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig {
            cases: 256,
            rng_seed: proptest::test_runner::RngSeed::Fixed(37),
            failure_persistence: None,
            ..ProptestConfig::default()
        })]

        /// A configuration is accepted exactly when every numeric setting is in its domain,
        /// and an accepted one survives a JSON round trip unchanged.
        #[test]
        fn accepts_exactly_the_configurations_in_the_domain(
            lr in finite_or_not(),
            reg in finite_or_not(),
            gamma in finite_or_not(),
            zeta in finite_or_not(),
            beta in (finite_or_not(), finite_or_not()),
            batch in proptest::option::of(0usize..4),
            epochs in 0usize..3,
        ) {
            let mut c = AdaRoundConfig::new(Schedule::epochs(epochs))
                .with_learning_rate(lr)
                .with_batch_size(batch);
            c.params.reg = reg;
            c.params.gamma = gamma;
            c.params.zeta = zeta;
            (c.params.beta_start, c.params.beta_end) = beta;
            let valid = epochs > 0
                && batch != Some(0)
                && lr.is_finite() && lr > 0.0
                && reg.is_finite() && reg >= 0.0
                && gamma.is_finite() && gamma < 0.0
                && zeta.is_finite() && zeta > 1.0
                && beta.0.is_finite() && beta.1 >= 1.0 && beta.0 >= beta.1;
            prop_assert_eq!(c.validate().is_ok(), valid, "{:?}", c);
            if valid {
                let json = serde_json::to_string(&c).unwrap();
                let back: AdaRoundConfig = serde_json::from_str(&json).unwrap();
                prop_assert_eq!(back.numerics(), c.numerics());
            }
        }
    }
}
