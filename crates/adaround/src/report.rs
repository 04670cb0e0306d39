use adaround_core::RoundingStatus;
use adaround_layers::{KernelChange, LayerKind};
use serde::{Deserialize, Serialize};

use crate::{AdaRoundConfig, LossPath};

/// Number of bins of the decimal histograms in the report.
pub const HISTOGRAM_BINS: usize = 20;

/// What happened to one kernel of a layer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct KernelReport {
    /// Rounding changes against nearest rounding.
    pub change: KernelChange,
    /// Rounding state at the end of the optimisation (before finalization).
    pub status: RoundingStatus,
    /// Histogram of the decimals `h(alpha)` over `[0, 1]` at the start (`HISTOGRAM_BINS`
    /// bins): the fractional parts of `w * sf`.
    pub decimals_before: Vec<usize>,
    /// The same histogram at the end: mass moves to 0 and 1 as weights are rounded.
    pub decimals_after: Vec<usize>,
    /// The grid the kernel was written on, where the run asked for SeqMSE's scales
    /// ([`ScaleSearch::SeqMse`](crate::ScaleSearch::SeqMse)); `None` otherwise.
    #[serde(default)]
    pub scales: Option<ScaleOutcome>,
}

/// What a run with [`ScaleSearch::SeqMse`](crate::ScaleSearch::SeqMse) did to a kernel's
/// scales.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum ScaleOutcome {
    /// On SeqMSE's grid (for a block, the grid its layer-wise start searched).
    SeqMse {
        /// Mean over the channels of the chosen clipping range as a share of `max |w|` (on
        /// the asymmetric grid, of `max(w, 0) - min(w, 0)`).
        mean_ratio: f64,
        /// The layer loss of nearest rounding on the quantizer's own scales.
        own_error: f64,
        /// The layer loss of nearest rounding on SeqMSE's scales.
        chosen_error: f64,
        /// Nearest rounding on SeqMSE's grid replaced the rounded layer, which ended above
        /// it ([`AdaRoundConfig::never_worse`]).
        nearest: bool,
    },
    /// On the quantizer's own grid: SeqMSE does not apply here (the layer's loss has no Gram
    /// form: an activation or ReLU in it, or a layer kind without one; a quantizer whose
    /// finalized grid is not centred on zero; or block reconstruction from
    /// [`BlockInit::Fractional`](crate::BlockInit::Fractional)). A warning says which.
    NotApplicable,
    /// On the quantizer's own grid: the scales were searched, but the layer ended above
    /// nearest rounding on its own grid and [`AdaRoundConfig::never_worse`] kept the caller's
    /// kernel (the layer's [`LayerReport::kept_nearest`]).
    Discarded,
}

/// The losses and rounding state read at one point of a layer's optimisation (each epoch,
/// or every `log_every` iterations): what the reference logs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StepLog {
    /// Epoch or iteration (1-based).
    pub step: usize,
    /// `beta` of that step; `None` during a warm start (no rounding loss).
    pub beta: Option<f64>,
    /// Reconstruction loss of the last batch.
    pub reconstruction: f64,
    /// Weighted rounding loss of the last batch (`RD_REG * sum(rounding_loss)`).
    pub rounding: f64,
    /// Roamers per kernel.
    pub roamers: Vec<usize>,
}

/// What happened to one layer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LayerReport {
    /// Path of the layer in the model (from its parameter names), e.g. `blocks.0.conv`.
    pub name: String,
    /// Kind of layer.
    pub kind: LayerKind,
    /// How the reconstruction loss was computed (`Gram` or `Direct`).
    pub path: LossPath,
    /// Whether the fused step ran (analytic gradient and Adam without autodiff) rather than
    /// Burn's autodiff and optimizer.
    #[serde(default)]
    pub fused: bool,
    /// Position of the layer's event in the forward pass.
    pub position: usize,
    /// Number of weights in its kernels.
    pub weights: usize,
    /// Mean squared error with nearest rounding (`err_before` of the reference).
    pub err_before: f64,
    /// Mean squared error with AdaRound in evaluation mode (`err_after` of the reference).
    pub err_after: f64,
    /// Mean squared error of the layer as written into the model.
    pub err_final: f64,
    /// Epochs or iterations run.
    pub steps: usize,
    /// Whether the layer stopped early because every weight was rounded.
    pub early_stop: bool,
    /// Whether nearest rounding was kept because AdaRound ended worse (`never_worse`).
    pub kept_nearest: bool,
    /// Rounding decisions flipped by the refinement after AdaRound
    /// ([`AdaRoundConfig::refine`](crate::AdaRoundConfig::refine)); 0 without it.
    #[serde(default)]
    pub refined: usize,
    /// Last reconstruction loss read.
    pub final_reconstruction_loss: f64,
    /// Last (weighted) rounding loss read.
    pub final_rounding_loss: f64,
    /// One entry per kernel (two for a separable convolution).
    pub kernels: Vec<KernelReport>,
    /// The losses along the optimisation.
    pub history: Vec<StepLog>,
    /// Wall-clock seconds spent on the layer.
    pub seconds: f64,
    /// The block (stage index) the layer was optimised with, by block reconstruction
    /// ([`AdaRound::with_blocks`](crate::AdaRound::with_blocks)): then the errors and losses
    /// are the block output's, the same for every layer of the block (`err_before` with
    /// nearest rounding, `err_after` after the block's steps, `err_final` as written: the
    /// block's start where [`AdaRoundConfig::never_worse`](crate::AdaRoundConfig) kept it),
    /// and `seconds` the block's steps. `None`: optimised on its own.
    #[serde(default)]
    pub block: Option<usize>,
}

impl LayerReport {
    /// Quantized weights that differ from nearest rounding, over all kernels.
    pub fn changed(&self) -> usize {
        self.kernels.iter().map(|k| k.change.changed).sum()
    }
}

/// The report of a run: data, serializable with serde.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AdaRoundReport {
    /// The configuration of the run.
    pub config: AdaRoundConfig,
    /// Number of calibration samples used (full batches only).
    pub samples: usize,
    /// Calibration samples left out because they did not fill a last batch (also logged as
    /// a warning).
    #[serde(default)]
    pub samples_left_out: usize,
    /// One entry per optimised layer, in forward order.
    pub layers: Vec<LayerReport>,
    /// Wall-clock seconds of the whole run.
    pub seconds: f64,
    /// The model-level check ([`ModelGuard`](crate::ModelGuard)); `None` when it is off,
    /// the run stopped before the last layer, or the model's output has no tensors.
    #[serde(default)]
    pub model: Option<crate::ModelCheck>,
}

impl AdaRoundReport {
    /// Number of weights over all layers.
    pub fn weights(&self) -> usize {
        self.layers.iter().map(|l| l.weights).sum()
    }

    /// Changed weights over all layers.
    pub fn changed(&self) -> usize {
        self.layers.iter().map(LayerReport::changed).sum()
    }

    /// The report as pretty JSON.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("reports always serialize")
    }
}

impl PartialEq for AdaRoundReport {
    /// Equal up to wall-clock times.
    fn eq(&self, other: &Self) -> bool {
        let strip = |r: &Self| {
            let mut layers = r.layers.clone();
            layers.iter_mut().for_each(|l| l.seconds = 0.0);
            (
                serde_json::to_string(&r.config).ok(),
                (r.samples, r.samples_left_out),
                layers,
                r.model.clone(),
            )
        };
        strip(self) == strip(other)
    }
}

/// The model-level comparison of a run (see [`ModelGuard`](crate::ModelGuard)).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelCheck {
    /// Mean squared error of the model's outputs against the float model's, all layers
    /// rounded to nearest.
    pub nearest: f64,
    /// The same error, all layers rounded by AdaRound.
    pub adaround: f64,
    /// The same error for the returned model.
    pub returned: f64,
    /// Layers the guard put back to nearest rounding in the returned model.
    pub reverted: Vec<String>,
}

impl std::fmt::Display for ModelCheck {
    /// One line: `model output error against float: nearest .., AdaRound .., returned ..`,
    /// and the layers put back to nearest rounding.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "model output error against float: nearest {:.4e}, AdaRound {:.4e}, returned {:.4e}",
            self.nearest, self.adaround, self.returned
        )?;
        if !self.reverted.is_empty() {
            write!(
                f,
                " (nearest rounding kept in {})",
                self.reverted.join(", ")
            )?;
        }
        Ok(())
    }
}
