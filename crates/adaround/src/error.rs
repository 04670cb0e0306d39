use adaround_core::QuantizerError;
use thiserror::Error;

/// Run-level failures of the AdaRound driver. The caller's model is never modified.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum AdaRoundError {
    /// The calibration set is empty.
    #[error("no calibration samples were given")]
    NoSamples,
    /// Fewer samples than one batch.
    #[error("{samples} samples do not fill one batch of {batch_size}")]
    TooFewSamples {
        /// Number of samples.
        samples: usize,
        /// Requested batch size.
        batch_size: usize,
    },
    /// The samples hold `NaN` or infinite values.
    #[error("the calibration samples contain non-finite values (NaN or infinity)")]
    NonFiniteInputs,
    /// The model is on an autodiff backend, where Burn's BatchNorm (and any module that
    /// checks for autodiff) runs in training mode: pass the inference model, `model.valid()`.
    #[error(
        "the model is on an autodiff backend, where BatchNorm runs in training mode; pass `model.valid()` (its inference backend)"
    )]
    AutodiffModel,
    /// The configuration is invalid.
    #[error("invalid configuration: {0}")]
    InvalidConfig(String),
    /// The model's forward pass failed on the samples (a shape it rejects, say).
    #[error("the model's forward pass failed on the calibration samples: {0}")]
    Forward(String),
    /// The progress callback panicked (with this message); the run stopped there.
    #[error("the progress callback panicked: {0}")]
    Progress(String),
    /// The forward pass runs no quantized layer with a quantizing kernel.
    #[error("the model has no quantized layer (none ran in its forward pass)")]
    NoQuantizedLayer,
    /// A layer's weights hold `NaN` or infinite values.
    #[error("layer `{layer}` has non-finite weights")]
    NonFiniteWeights {
        /// The layer.
        layer: String,
    },
    /// `include_activation` is set but the layer's output does not go straight into a
    /// quantized activation.
    #[error(
        "include_activation is set, but layer `{layer}` is not followed by a quantized activation"
    )]
    NoFollowingActivation {
        /// The layer.
        layer: String,
    },
    /// A name in `relu_layers` is not one of the model's quantized layers.
    #[error("relu_layers names `{name}`, which is not a quantized layer of the model (its layers: {known})")]
    UnknownLayer {
        /// The name given.
        name: String,
        /// The names of the model's quantized layers, comma-separated.
        known: String,
    },
    /// The same layer runs more than once in one forward pass (shared weights).
    #[error(
        "layer `{layer}` runs more than once in a forward pass; shared layers are not supported"
    )]
    SharedLayer {
        /// The layer.
        layer: String,
    },
    /// A layer seen on the first batch did not run on a later batch.
    #[error(
        "layer `{layer}` did not run on every batch (data-dependent control flow is not supported)"
    )]
    LayerNotReached {
        /// The layer.
        layer: String,
    },
    /// A layer's inputs, outputs, losses or rounded weights hold `NaN` or infinite values
    /// (samples or weights too large for `f32`, a degenerate quantizer).
    #[error("layer `{layer}`: non-finite {what} (NaN or infinity)")]
    NonFinite {
        /// The layer.
        layer: String,
        /// What was found non-finite.
        what: &'static str,
    },
    /// The checkpoint folder holds a checkpoint made from another model, other samples or
    /// another configuration.
    #[error("checkpoint {dir} was made from other {what}; remove it or use another folder")]
    CheckpointMismatch {
        /// The folder.
        dir: String,
        /// What differs: `float weights`, `quantizers`, `configuration`, `calibration samples`,
        /// `layers`, or `quantizers in the checkpoint` (its model file holds other quantizers
        /// than the run was started with).
        what: &'static str,
    },
    /// A checkpoint could not be written or read (a damaged file: its checksum differs).
    #[error("checkpoint: {0}")]
    Checkpoint(String),
    /// A kernel's slot holds an AdaRound quantizer in training mode: the layer uses soft
    /// weights, which are not on the grid, so there are no integers to export. Switch it to
    /// evaluation mode (`QuantizedLayer::set_training(false)`) or finalize it first.
    #[error(
        "layer `{layer}`: AdaRound is in training mode (soft weights, not on the grid); switch it to evaluation mode or finalize it first"
    )]
    SoftWeights {
        /// The layer.
        layer: String,
    },
    /// The stages given with [`AdaRound::with_stages`](crate::AdaRound::with_stages) do not
    /// compute the forward pass: another output, or the layers elsewhere.
    #[error("the stages do not compose to the forward pass: {0}")]
    Stages(String),
    /// A quantizer could not be wrapped.
    #[error("layer `{layer}`: {source}")]
    Quantizer {
        /// The layer.
        layer: String,
        /// What went wrong.
        source: QuantizerError,
    },
}
