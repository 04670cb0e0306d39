use adaround_core::{AdaRoundParams, Schedule};

pub use crate::gram::LossPath;
use burn::config::Config;
use serde::{Deserialize, Serialize};

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

/// How the rounded weights are written into the float kernel at the end.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum FinalRounding {
    /// `recons_weights` with the learned soft decimals; weights still roaming are rounded to
    /// nearest by the original quantizer (cnn2snn).
    Soft,
    /// Hard decimals `h = 1[alpha >= 0]` (AIMET).
    Hard,
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
    /// Rectified-sigmoid and regulariser constants.
    #[config(default = "AdaRoundParams::new()")]
    pub params: AdaRoundParams,
    /// How the reconstruction loss is computed: the exact Gram-matrix form where it exists
    /// and is cheaper (`Auto`), always the direct layer forward (`Direct`), or the Gram form
    /// wherever it exists (`Gram`).
    #[config(default = "LossPath::Auto")]
    pub path: LossPath,
    /// How a separable convolution's two kernels are optimised.
    #[config(default = "SeparableStep::Split")]
    pub separable: SeparableStep,
    /// A folder for checkpoints: after each layer the model record (`model.bin`) and the
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

impl AdaRoundConfig {
    /// AIMET's defaults: 10 000 iterations with 20 % warm start and cosine `beta`, batch 32,
    /// Adam with learning rate 1e-3, hard final rounding, channel-summed loss.
    pub fn aimet() -> Self {
        Self::new(Schedule::aimet())
            .with_batch_size(Some(32))
            .with_rounding(FinalRounding::Hard)
            .with_loss(ReconstructionLoss::ChannelSum)
    }

    pub(crate) fn validate(&self) -> Result<(), String> {
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
        if self.stop_after == Some(0) {
            return Err("stop_after must be at least 1".into());
        }
        if self.log_every == 0 {
            return Err("log_every must be at least 1".into());
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
        c.checkpoint = None;
        c.stop_after = None;
        serde_json::to_string(&c).expect("configs serialize")
    }
}
