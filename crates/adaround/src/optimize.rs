//! Optimising one layer: arm AdaRound, run the schedule with a [`Step`], finalize, report.

use adaround_core::RoundingStatus;
use adaround_layers::{probe::Flow, KernelChange, QuantizedLayer, QuantizedReLU};
use burn::{
    module::AutodiffModule,
    tensor::{backend::Backend, Bool, ElementConversion, Tensor},
};
use log::debug;

use crate::{
    fused::{self, Fused},
    gram::{self, Grams, LossPath},
    progress::{self, Progress},
    refine,
    step::{lift, Ad, AutodiffData, Optimizers, Step},
    AdaRoundConfig, AdaRoundError, FinalRounding, KernelReport, LayerReport, ReconstructionLoss,
    Schedule, StepLog, HISTOGRAM_BINS,
};

/// One quantized layer (or half of a separable one) with what it is optimised on.
pub(crate) struct Unit<'a, B: Backend> {
    /// Name for errors and progress.
    pub name: &'a str,
    /// The layer, not yet armed.
    pub layer: QuantizedLayer<B>,
    /// The quantized activation the outputs go through (`include_activation`).
    pub activation: Option<QuantizedReLU<B>>,
    /// The ReLU both outputs go through before the loss (`relu_loss`).
    pub relu: Option<Relu>,
    pub samples: Samples<'a, B>,
    /// Whether the targets are the float layer on these very inputs (else the Gram form
    /// carries the float kernel's residuals).
    pub same_inputs: bool,
}

/// What a unit is optimised on.
#[derive(Clone, Copy)]
pub(crate) enum Samples<'a, B: Backend> {
    /// The layer's inputs and target outputs, one per batch (targets after the unit's
    /// activation, if any; before its ReLU).
    Held {
        inputs: &'a [Flow<B>],
        targets: &'a [Flow<B>],
    },
    /// The layer's Gram matrices, accumulated batch by batch without keeping the batches
    /// (a layer with the Gram form, no activation and no ReLU): errors and bias correction
    /// come from them ([`gram::error`], [`gram::bias_shift`]).
    Streamed(&'a Grams<B>),
}

impl<B: Backend> Unit<'_, B> {
    /// The held inputs and targets (none when streamed).
    pub(crate) fn held(&self) -> (&[Flow<B>], &[Flow<B>]) {
        match self.samples {
            Samples::Held { inputs, targets } => (inputs, targets),
            Samples::Streamed(_) => (&[], &[]),
        }
    }

    /// Batches per epoch.
    pub(crate) fn batches(&self) -> usize {
        match self.samples {
            Samples::Held { inputs, .. } => inputs.len(),
            Samples::Streamed(grams) => grams.grams.len(),
        }
    }

    /// Mean over batches of `layer`'s error (this unit's layer in any state).
    pub(crate) fn error(&self, layer: &QuantizedLayer<B>) -> f64 {
        match self.samples {
            Samples::Held { inputs, targets } => layer_error(
                layer,
                (self.activation.as_ref(), self.relu),
                inputs,
                targets,
            ),
            Samples::Streamed(grams) => gram::error(&self.layer, layer, grams),
        }
    }

    /// `layer` with its bias corrected (see [`correct_bias`]).
    pub(crate) fn correct_bias(&self, layer: QuantizedLayer<B>) -> QuantizedLayer<B> {
        match self.samples {
            Samples::Held { inputs, targets } => correct_bias(layer, inputs, targets),
            Samples::Streamed(grams) => match gram::bias_shift(&self.layer, &layer, grams) {
                Some(shift) => layer.shift_bias(shift).0,
                None => layer,
            },
        }
    }
}

/// The ReLU a layer's outputs and targets go through before the loss
/// ([`relu_loss`](crate::AdaRoundConfig::relu_loss)): `clip(x, 0, max)`, without an upper
/// bound when `max` is `None`. Its gradient passes where `0 <= x <= max` (Burn's `clamp`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Relu {
    pub max: Option<f64>,
}

impl Relu {
    /// The ReLU of `t`.
    pub(crate) fn apply<B: Backend, const D: usize>(self, t: Tensor<B, D>) -> Tensor<B, D> {
        match self.max {
            Some(max) => t.clamp(0.0, max),
            None => t.clamp_min(0.0),
        }
    }

    /// The ReLU of a flow.
    pub(crate) fn flow<B: Backend>(self, f: Flow<B>) -> Flow<B> {
        f.map(|t| self.apply(t), |t| self.apply(t))
    }

    /// Where the gradient does not pass: below 0, above `max`.
    pub(crate) fn blocked<B: Backend, const D: usize>(
        self,
        t: &Tensor<B, D>,
    ) -> Tensor<B, D, Bool> {
        let below = t.clone().lower_elem(0.0);
        match self.max {
            Some(max) => below.bool_or(t.clone().greater_elem(max)),
            None => below,
        }
    }
}

/// How the caller wants layers optimised, and who hears about it.
pub(crate) struct Context<'a, B: Backend> {
    pub config: &'a AdaRoundConfig,
    /// Each layer's optimizer, and so its step (fused or autodiff).
    pub optimizers: &'a mut dyn Optimizers<B>,
    pub progress: &'a mut dyn FnMut(Progress<'_>),
    /// Position among the layers optimised in this call, and their number.
    pub index: usize,
    pub layers: usize,
}

/// What the schedule loop leaves.
struct Trace {
    history: Vec<StepLog>,
    steps: usize,
    early_stop: bool,
    last: (f64, f64),
}

/// The squared error between outputs and targets, as configured.
pub(crate) fn reconstruction_loss<B: Backend>(
    output: Flow<B>,
    target: Flow<B>,
    loss: ReconstructionLoss,
) -> Tensor<B, 1> {
    match (output, target, loss) {
        (out, target, ReconstructionLoss::Mse) => {
            (out.flatten() - target.flatten()).powi_scalar(2).mean()
        }
        (Flow::Rows(out), Flow::Rows(target), ReconstructionLoss::ChannelSum) => {
            (out - target).powi_scalar(2).sum_dim(1).mean()
        }
        (Flow::Maps(out), Flow::Maps(target), ReconstructionLoss::ChannelSum) => {
            (out - target).powi_scalar(2).sum_dim(1).mean()
        }
        (out, target, _) => panic!(
            "output {:?} and target {:?} differ",
            out.dims(),
            target.dims()
        ),
    }
}

/// `layer` on `x`, through `activation` if any.
pub(crate) fn apply<B: Backend>(
    layer: &QuantizedLayer<B>,
    activation: Option<&QuantizedReLU<B>>,
    x: Flow<B>,
) -> Flow<B> {
    let out = layer.forward_flow(x);
    match activation {
        Some(act) => act.forward_flow(out, false),
        None => out,
    }
}

/// `Err(NonFinite)` naming `layer` unless `ok`.
pub(crate) fn ensure_finite(
    ok: bool,
    layer: &str,
    what: &'static str,
) -> Result<(), AdaRoundError> {
    if ok {
        Ok(())
    } else {
        Err(AdaRoundError::NonFinite {
            layer: layer.to_string(),
            what,
        })
    }
}

/// Whether every value of every flow is finite.
pub(crate) fn flows_finite<B: Backend>(flows: &[Flow<B>]) -> bool {
    flows
        .iter()
        .all(|f| adaround_core::all_finite(&f.clone().flatten()))
}

/// Mean over batches of the MSE between the layer's outputs and the targets (both through
/// `relu`, if any).
pub(crate) fn layer_error<B: Backend>(
    layer: &QuantizedLayer<B>,
    (activation, relu): (Option<&QuantizedReLU<B>>, Option<Relu>),
    inputs: &[Flow<B>],
    targets: &[Flow<B>],
) -> f64 {
    let total: f64 = inputs
        .iter()
        .zip(targets)
        .map(|(x, t)| {
            let out = apply(layer, activation, x.clone());
            let (out, t) = match relu {
                Some(relu) => (relu.flow(out), relu.flow(t.clone())),
                None => (out, t.clone()),
            };
            let mse = reconstruction_loss(out, t, ReconstructionLoss::Mse);
            mse.into_scalar().elem::<f64>()
        })
        .sum();
    total / inputs.len() as f64
}

/// `layer` with its bias shifted by the mean, per output channel, of the targets less its
/// outputs over all batches (unchanged without a bias).
pub(crate) fn correct_bias<B: Backend>(
    layer: QuantizedLayer<B>,
    inputs: &[Flow<B>],
    targets: &[Flow<B>],
) -> QuantizedLayer<B> {
    if layer.bias().is_none() {
        return layer;
    }
    let mut count = 0usize;
    let mut sum: Option<Tensor<B, 1>> = None;
    for (x, t) in inputs.iter().zip(targets) {
        let per_channel = match (layer.forward_flow(x.clone()), t.clone()) {
            (Flow::Rows(out), Flow::Rows(t)) => {
                count += out.dims()[0];
                (t - out).sum_dim(0).flatten::<1>(0, 1)
            }
            (Flow::Maps(out), Flow::Maps(t)) => {
                let [n, _, h, w] = out.dims();
                count += n * h * w;
                (t - out)
                    .sum_dim(0)
                    .sum_dim(2)
                    .sum_dim(3)
                    .flatten::<1>(0, 3)
            }
            (out, t) => panic!("output {:?} and target {:?} differ", out.dims(), t.dims()),
        };
        sum = Some(match sum {
            Some(s) => s + per_channel,
            None => per_channel,
        });
    }
    match sum {
        Some(sum) => layer.shift_bias(sum / count.max(1) as f32).0,
        None => layer,
    }
}

fn histogram<B: Backend>(decimals: Tensor<B, 4>) -> Vec<usize> {
    let values: Vec<f32> = decimals
        .into_data()
        .convert::<f32>()
        .to_vec()
        .unwrap_or_default();
    let mut bins = vec![0; HISTOGRAM_BINS];
    for v in values {
        let bin = ((v.clamp(0.0, 1.0) * HISTOGRAM_BINS as f32) as usize).min(HISTOGRAM_BINS - 1);
        bins[bin] += 1;
    }
    bins
}

fn histograms<B: Backend>(layer: &QuantizedLayer<B>) -> Vec<Vec<usize>> {
    layer
        .adarounds()
        .iter()
        .map(|a| histogram(a.decimals()))
        .collect()
}

/// `finalized` with its bias corrected where `correct` asks and the unit allows (not through
/// a quantized activation), and the layer's error.
fn with_bias_correction<B: Backend>(
    unit: &Unit<'_, B>,
    finalized: QuantizedLayer<B>,
    correct: bool,
) -> (QuantizedLayer<B>, f64) {
    let error = |l: &QuantizedLayer<B>| unit.error(l);
    if !correct || unit.activation.is_some() {
        let err = error(&finalized);
        return (finalized, err);
    }
    let corrected = unit.correct_bias(finalized.clone());
    let err_corrected = error(&corrected);
    if unit.relu.is_none() {
        return (corrected, err_corrected);
    }
    // The mean shift is the least-squares bias before the ReLU: kept where it lowers the error
    // after it.
    let err = error(&finalized);
    if err_corrected < err {
        (corrected, err_corrected)
    } else {
        (finalized, err)
    }
}

/// The loss path of a unit: the Gram form needs no activation and a Dense or Conv2D layer;
/// `Auto` also needs it to be cheaper.
fn choose_path<B: Backend>(unit: &Unit<'_, B>, config: &AdaRoundConfig) -> LossPath {
    let inputs = match unit.samples {
        Samples::Held { inputs, .. } => inputs,
        Samples::Streamed(_) => return LossPath::Gram,
    };
    let exact = unit.activation.is_none() && unit.relu.is_none();
    if exact && gram::chosen(&unit.layer, &inputs[0], config.path) {
        LossPath::Gram
    } else {
        LossPath::Direct
    }
}

/// The Gram matrices of `unit`, with the residuals of its targets when they come from other
/// inputs.
fn unit_grams<B: Backend>(unit: &Unit<'_, B>, loss: ReconstructionLoss) -> Option<Grams<B>> {
    match unit.samples {
        Samples::Held { inputs, targets } => {
            let other = (!unit.same_inputs).then_some(targets);
            gram::grams(&unit.layer, inputs, other, loss)
        }
        Samples::Streamed(grams) => Some(grams.clone()),
    }
}

/// The step for `layer` (armed): fused where it exists and the optimizer runs on it, else
/// autodiff.
fn build_step<B: Backend>(
    unit: &Unit<'_, B>,
    layer: QuantizedLayer<B>,
    grams: Option<Grams<B>>,
    ctx: &mut Context<'_, B>,
) -> (Box<dyn Step<B>>, bool) {
    let rates = (ctx.config.params.reg, ctx.config.learning_rate);
    let (inputs, targets) = unit.held();
    let fusable = unit.activation.is_none()
        && gram::supports(&layer)
        && (grams.is_some() || fused::patch_bytes(&layer, inputs) <= fused::MAX_PATCH_BYTES);
    if let Some(optimizer) = fusable.then(|| ctx.optimizers.fused()).flatten() {
        let data = (inputs, targets);
        let optimizer = (
            optimizer,
            ctx.config.elementwise,
            ctx.optimizers.default_adam(),
        );
        let loss = (ctx.config.loss, unit.relu);
        let mut step = Fused::new(layer, data, grams.as_ref(), loss, optimizer);
        step.rates = rates;
        return (Box::new(step), true);
    }
    let data = AutodiffData {
        inputs: inputs.iter().map(lift).collect(),
        targets: targets
            .iter()
            .map(|t| lift(&unit.relu.map_or_else(|| t.clone(), |r| r.flow(t.clone()))))
            .collect(),
        relu: unit.relu,
        grams: grams.map(|g| g.map(Tensor::from_inner, Tensor::from_inner)),
        activation: unit
            .activation
            .clone()
            .map(QuantizedReLU::<Ad<B>>::from_inner),
        loss: ctx.config.loss,
    };
    (ctx.optimizers.autodiff(layer, data, rates), false)
}

/// Runs the schedule: one step per batch and epoch, or one per iteration.
fn run_schedule<B: Backend>(
    step: &mut dyn Step<B>,
    unit: &Unit<'_, B>,
    ctx: &mut Context<'_, B>,
) -> Result<Trace, AdaRoundError> {
    let config = ctx.config;
    let n_batches = unit.batches();
    let (outer, epochs) = match config.schedule {
        Schedule::Epochs { epochs } => (epochs, true),
        Schedule::Iterations { iterations, .. } => (iterations, false),
    };
    let mut trace = Trace {
        history: Vec::new(),
        steps: 0,
        early_stop: false,
        last: (f64::NAN, f64::NAN),
    };
    for k in 0..outer {
        let beta = config.schedule.beta(k, &config.params);
        let batches = if epochs {
            0..n_batches
        } else {
            k % n_batches..k % n_batches + 1
        };
        let log = epochs || (k + 1) % config.log_every == 0 || k + 1 == outer;
        let last = batches.end - 1;
        let mut losses = None;
        for b in batches {
            losses = step.step(b, beta, log && b == last);
        }
        trace.steps = k + 1;
        if !log {
            continue;
        }
        let (rec, round) = losses.expect("the last batch of a log point reports");
        let entry = StepLog {
            step: k + 1,
            beta,
            reconstruction: rec.into_scalar().elem::<f64>(),
            rounding: round.map_or(0.0, |r| r.into_scalar().elem::<f64>()),
            roamers: step.status().iter().map(|s| s.roamers).collect(),
        };
        let event = Progress::Step {
            index: ctx.index,
            layers: ctx.layers,
            name: unit.name,
            steps: outer,
            log: &entry,
        };
        debug!("{}", progress::line(&event));
        progress::emit(ctx.progress, event)?;
        trace.last = (entry.reconstruction, entry.rounding);
        trace.history.push(entry);
        if beta.is_some() && trace.last.1 == 0.0 {
            trace.early_stop = true;
            break;
        }
    }
    Ok(trace)
}

/// One report per kernel; a kernel put back to nearest rounding has no changed weights.
fn kernel_reports(
    changes: Vec<KernelChange>,
    statuses: Vec<RoundingStatus>,
    (before, after): (Vec<Vec<usize>>, Vec<Vec<usize>>),
    kept_nearest: bool,
) -> Vec<KernelReport> {
    changes
        .into_iter()
        .zip(statuses)
        .zip(before.into_iter().zip(after))
        .map(
            |((mut change, status), (decimals_before, decimals_after))| {
                if kept_nearest {
                    change.changed = 0;
                }
                KernelReport {
                    change,
                    status,
                    decimals_before,
                    decimals_after,
                }
            },
        )
        .collect()
}

/// `unit`'s layer with AdaRound armed in its quantizers.
fn arm<B: Backend>(
    unit: &Unit<'_, B>,
    config: &AdaRoundConfig,
) -> Result<QuantizedLayer<B>, AdaRoundError> {
    unit.layer
        .clone()
        .with_adaround(&config.params)
        .map_err(|source| AdaRoundError::Quantizer {
            layer: unit.name.to_string(),
            source,
        })
}

/// Errors unless the last losses read, the rounded kernels and their error are finite.
fn ensure_finalized_finite<B: Backend>(
    name: &str,
    (rec, round): (f64, f64),
    finalized: &QuantizedLayer<B>,
    err_final: f64,
) -> Result<(), AdaRoundError> {
    ensure_finite(rec.is_finite() && round.is_finite(), name, "losses")?;
    let rounded_finite = finalized
        .kernel_values()
        .iter()
        .all(|(_, w)| adaround_core::all_finite(w));
    ensure_finite(
        rounded_finite && err_final.is_finite(),
        name,
        "rounded weights or error",
    )
}

/// A layer after AdaRound (and the refinement), finalized: rounded float kernels and the
/// original quantizers, the bias corrected where asked.
pub(crate) struct Finished<B: Backend> {
    pub(crate) layer: QuantizedLayer<B>,
    changes: Vec<KernelChange>,
    /// The error before finalizing and bias correction.
    err_after: f64,
    /// The error of `layer`.
    pub(crate) err_final: f64,
    /// The rounding variables' histograms before finalizing.
    after: Vec<Vec<usize>>,
}

/// `layer` (AdaRound armed and trained) finalized as `config` asks.
pub(crate) fn finish<B: Backend>(
    unit: &Unit<'_, B>,
    config: &AdaRoundConfig,
    layer: QuantizedLayer<B>,
) -> Finished<B> {
    let err_after = unit.error(&layer);
    let after = histograms(&layer);
    let (finalized, changes) = layer.finalize(config.rounding == FinalRounding::Hard);
    let (layer, err_final) = with_bias_correction(unit, finalized, config.bias_correction);
    Finished {
        layer,
        changes,
        err_after,
        err_final,
        after,
    }
}

/// `layer` refined where `refine_grams` says (see [`refine`]) and finalized, with the number
/// of decisions the refinement changed. The refinement lowers the loss of the rounded
/// kernels; the finalized layer quantizes them again with its original quantizer, whose
/// scale may follow the weights (the max and standard-deviation scales): where the refined
/// layer's error after finalizing is not below AdaRound's own, AdaRound's rounding is kept
/// (with a warning) and the count is 0.
pub(crate) fn refine_and_finish<B: Backend>(
    unit: &Unit<'_, B>,
    config: &AdaRoundConfig,
    layer: QuantizedLayer<B>,
    refine_grams: Option<Grams<B>>,
) -> (Finished<B>, usize) {
    let unrefined = refine_grams.is_some().then(|| layer.clone());
    let (layer, flips) = refine::apply(unit, config, layer, refine_grams);
    let refined = finish(unit, config, layer);
    let Some(unrefined) = unrefined.filter(|_| flips > 0) else {
        return (refined, flips);
    };
    let plain = finish(unit, config, unrefined);
    if plain.err_final <= refined.err_final {
        log::warn!(
            "{}: refinement undone: its {flips} flips end at error {:.4e} once finalized, \
             AdaRound's rounding at {:.4e}",
            unit.name,
            refined.err_final,
            plain.err_final
        );
        return (plain, 0);
    }
    (refined, flips)
}

/// Optimises `unit` and returns its report (name, position and time left to the caller)
/// and the finalized layer (rounded float kernels, original quantizers).
pub(crate) fn optimize_unit<B: Backend>(
    unit: Unit<'_, B>,
    ctx: &mut Context<'_, B>,
) -> Result<(LayerReport, QuantizedLayer<B>), AdaRoundError> {
    let config = ctx.config;
    let mut phases = progress::Phases::new(unit.name);
    let err_before = unit.error(&unit.layer);
    ensure_finite(
        err_before.is_finite(),
        unit.name,
        "error with nearest rounding",
    )?;
    let armed = arm(&unit, config)?;
    let before = histograms(&armed);
    phases.mark("nearest error and arming in");
    let path = choose_path(&unit, config);
    let grams = (path == LossPath::Gram)
        .then(|| unit_grams(&unit, config.loss))
        .flatten();
    phases.mark("Gram matrices in");
    let refine_grams = refine::grams_for(&unit, config, grams.as_ref());
    let (mut step, fused) = build_step(&unit, armed, grams, ctx);
    phases.mark("refinement's Gram matrices, patches and step set up in");
    debug!(
        "{}: {path:?} loss path, {} step",
        unit.name,
        if fused { "fused" } else { "autodiff" }
    );
    let trace = run_schedule(step.as_mut(), &unit, ctx)?;
    phases.mark(&format!("{} steps in", trace.steps));
    let statuses = step.status();
    let layer = step.into_layer().set_training(false);
    let (done, flips) = refine_and_finish(&unit, config, layer, refine_grams);
    phases.mark(&format!("{flips} rounding decisions flipped in"));
    let Finished {
        layer: finalized,
        changes,
        err_after,
        err_final,
        after,
    } = done;
    ensure_finalized_finite(unit.name, trace.last, &finalized, err_final)?;
    phases.mark("finalized and checked in");
    let kept_nearest = config.never_worse && err_final > err_before;
    let kernels = kernel_reports(changes, statuses, (before, after), kept_nearest);
    let report = LayerReport {
        name: unit.name.to_string(),
        kind: unit.layer.kind(),
        path,
        fused,
        position: 0,
        weights: unit
            .layer
            .kernels()
            .iter()
            .map(|k| k.weight.shape().num_elements())
            .sum(),
        err_before,
        err_after,
        err_final: if kept_nearest { err_before } else { err_final },
        steps: trace.steps,
        early_stop: trace.early_stop,
        kept_nearest,
        refined: flips,
        final_reconstruction_loss: trace.last.0,
        final_rounding_loss: trace.last.1,
        kernels,
        history: trace.history,
        seconds: 0.0,
    };
    let layer = if kept_nearest { unit.layer } else { finalized };
    Ok((report, layer))
}
