//! Progress of a run, for a caller who shows it (a progress bar, a log line).

use std::panic::{catch_unwind, AssertUnwindSafe};

use adaround_layers::probe::panic_message;

use crate::{AdaRoundError, LayerReport, StepLog};

/// What the driver reports while it runs ([`AdaRound::with_progress`](crate::AdaRound::with_progress)).
///
/// `index` counts the layers to optimise in this call from 0; `layers` is their number. A
/// separable convolution optimised as two problems reports its halves as
/// `<name>.depthwise` and `<name>.pointwise` in [`Progress::Step`].
#[derive(Clone, Copy, Debug)]
pub enum Progress<'a> {
    /// A layer's optimisation starts.
    LayerStarted {
        /// Position of the layer among those optimised in this call.
        index: usize,
        /// Number of layers optimised in this call.
        layers: usize,
        /// The layer's name.
        name: &'a str,
    },
    /// Losses read during a layer's optimisation (each epoch, or every `log_every`
    /// iterations).
    Step {
        /// Position of the layer among those optimised in this call.
        index: usize,
        /// Number of layers optimised in this call.
        layers: usize,
        /// The layer (or half of a separable layer) being optimised.
        name: &'a str,
        /// Steps of the schedule (epochs or iterations).
        steps: usize,
        /// What was read.
        log: &'a StepLog,
    },
    /// A layer is done.
    LayerFinished {
        /// Position of the layer among those optimised in this call.
        index: usize,
        /// Number of layers optimised in this call.
        layers: usize,
        /// Its report.
        report: &'a LayerReport,
    },
    /// A block is done ([`AdaRound::with_blocks`](crate::AdaRound::with_blocks)): its
    /// layers' final reports. With [`BlockInit::LayerWise`](crate::BlockInit::LayerWise)
    /// each layer was first reported started and finished on its own; the block's steps are
    /// [`Progress::Step`]s of `block <stage>`.
    BlockFinished {
        /// Position of the block's last layer among those optimised in this call.
        index: usize,
        /// Number of layers optimised in this call.
        layers: usize,
        /// The block's stage.
        stage: usize,
        /// Its layers' reports.
        reports: &'a [LayerReport],
    },
}

/// Hands `event` to the caller's callback: a panic in it ends the run with
/// [`AdaRoundError::Progress`], as a panic in the forward pass does with
/// [`AdaRoundError::Forward`], instead of unwinding through the driver.
pub(crate) fn emit(
    progress: &mut dyn FnMut(Progress<'_>),
    event: Progress<'_>,
) -> Result<(), AdaRoundError> {
    catch_unwind(AssertUnwindSafe(|| progress(event)))
        .map_err(|payload| AdaRoundError::Progress(panic_message(payload.as_ref())))
}

/// The log line of an event, as the driver writes it through `log` (`info` level).
pub(crate) fn line(event: &Progress<'_>) -> String {
    match *event {
        Progress::LayerStarted {
            index,
            layers,
            name,
        } => format!("[{}/{layers}] {name}: optimizing", index + 1),
        Progress::Step {
            index,
            layers,
            name,
            steps,
            log,
        } => format!(
            "[{}/{layers}] {name}: step {}/{steps} - loss (reconstruction|rounding) {:.6} | {:.6} - roamers {:?}",
            index + 1,
            log.step,
            log.reconstruction,
            log.rounding,
            log.roamers
        ),
        Progress::LayerFinished {
            index,
            layers,
            report,
        } => format!(
            "[{}/{layers}] {}: error {:.5} -> {:.5}, {} of {} weights changed{}, {:.2} s",
            index + 1,
            report.name,
            report.err_before,
            report.err_final,
            report.changed(),
            report.weights,
            if report.kept_nearest {
                " (nearest kept)"
            } else {
                ""
            },
            report.seconds
        ),
        Progress::BlockFinished {
            index,
            layers,
            stage,
            reports,
        } => {
            let first = reports.first();
            format!(
                "[{}/{layers}] block {stage} ({} layers): error {:.5} -> {:.5}{}, {:.2} s",
                index + 1,
                reports.len(),
                first.map_or(f64::NAN, |r| r.err_before),
                first.map_or(f64::NAN, |r| r.err_final),
                if first.is_some_and(|r| r.err_final < r.err_after) {
                    " (its start kept)"
                } else {
                    ""
                },
                first.map_or(0.0, |r| r.seconds)
            )
        }
    }
}

/// Debug-level timing of the phases of one layer (captures, Gram matrices, steps, checks),
/// so that `RUST_LOG=adaround=debug` shows where a layer's time goes. On an asynchronous
/// backend (a GPU) a phase ends at its first read back to the host, so its work may show in
/// the next phase's time.
pub(crate) struct Phases<'a> {
    name: &'a str,
    last: std::time::Instant,
}

impl<'a> Phases<'a> {
    pub(crate) fn new(name: &'a str) -> Self {
        Self {
            name,
            last: std::time::Instant::now(),
        }
    }

    /// Logs the time since the previous mark as `what`.
    pub(crate) fn mark(&mut self, what: &str) {
        let now = std::time::Instant::now();
        log::debug!(
            "{}: {what} {:.3} s",
            self.name,
            (now - self.last).as_secs_f64()
        );
        self.last = now;
    }
}
