//! Optimising one layer: arm AdaRound, run the schedule with a [`Step`], finalize, report.

use adaround_core::RoundingStatus;
use adaround_layers::{KernelChange, QuantizedLayer, QuantizedReLU};
use burn::{
    module::AutodiffModule,
    tensor::{backend::Backend, ElementConversion, Tensor},
};
use log::debug;

use crate::{
    fused::{self, Fused},
    gptq,
    gram::{self, Grams},
    progress::{self, Progress},
    refine, seqmse,
    step::{lift, Ad, AutodiffData, Optimizers, Step},
    unit::{ensure_finite, Samples, Unit},
    AdaRoundConfig, AdaRoundError, FinalRounding, KernelReport, LayerReport, LossPath,
    ReconstructionLoss, RoundingMethod, ScaleOutcome, ScaleSearch, Schedule, StepLog,
    HISTOGRAM_BINS,
};

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

pub(crate) fn histograms<B: Backend>(layer: &QuantizedLayer<B>) -> Vec<Vec<usize>> {
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
    if exact && gram::chosen(&unit.layer, &inputs[0], config.performance.path) {
        LossPath::Gram
    } else {
        LossPath::Direct
    }
}

/// Whether `unit` is rounded by GPTQ, or AdaRound starts from GPTQ's decisions:
/// [`RoundingMethod::Gptq`] or [`RoundingMethod::GptqThenAdaRound`] asked, and the layer has
/// the Gram form (no activation, no ReLU before the loss); otherwise AdaRound, with a
/// warning.
fn uses_gptq<B: Backend>(unit: &Unit<'_, B>, config: &AdaRoundConfig) -> bool {
    if config.method == RoundingMethod::AdaRound {
        return false;
    }
    let exact = unit.activation.is_none() && unit.relu.is_none() && gram::supports(&unit.layer);
    if !exact {
        log::warn!(
            "{}: rounded by AdaRound, not GPTQ (GPTQ needs the Gram form: no activation or ReLU \
             in the loss, a Dense or Conv2D layer)",
            unit.name
        );
    }
    exact
}

/// `armed` on the scales SeqMSE chooses where [`ScaleSearch::SeqMse`] asks for them and the
/// layer has the Gram form (`grams`, or computed here over all samples for a layer on the
/// direct path) and a quantizer that keeps the grid; otherwise as it is, with a warning.
/// The outcome is `None` without the search.
fn search_scales<B: Backend>(
    unit: &Unit<'_, B>,
    config: &AdaRoundConfig,
    armed: QuantizedLayer<B>,
    grams: Option<&Grams<B>>,
) -> Result<(QuantizedLayer<B>, Option<ScaleOutcome>), AdaRoundError> {
    if config.scale_search != ScaleSearch::SeqMse {
        return Ok((armed, None));
    }
    let exact = unit.activation.is_none() && unit.relu.is_none() && gram::supports(&unit.layer);
    let owned = match (exact, grams) {
        (true, None) => unit_grams(unit, config.loss),
        _ => None,
    };
    let found = grams
        .or(owned.as_ref())
        .filter(|_| exact)
        .and_then(|g| seqmse::rescale(armed.clone(), g));
    match found {
        Some(Ok((layer, choice))) => {
            log::info!(
                "{}: SeqMSE scales, clipping range {:.3} of the weights' range on average; nearest \
                 rounding's loss {:.4e} -> {:.4e}",
                unit.name,
                choice.mean_ratio,
                choice.own_error,
                choice.chosen_error
            );
            let outcome = ScaleOutcome::SeqMse {
                mean_ratio: choice.mean_ratio,
                own_error: choice.own_error,
                chosen_error: choice.chosen_error,
                nearest: false,
            };
            Ok((layer, Some(outcome)))
        }
        Some(Err(source)) => Err(AdaRoundError::Quantizer {
            layer: unit.name.to_string(),
            source,
        }),
        None => {
            log::warn!(
                "{}: the quantizer's own scales, not SeqMSE's (SeqMSE needs the Gram form \
                 and a max or MSE quantizer on a grid centred on zero)",
                unit.name
            );
            Ok((armed, Some(ScaleOutcome::NotApplicable)))
        }
    }
}

/// Nearest rounding on the grid `armed` holds (SeqMSE's), finished as a rounded layer
/// (bias correction included).
fn nearest_on_grid<B: Backend>(
    unit: &Unit<'_, B>,
    config: &AdaRoundConfig,
    armed: &QuantizedLayer<B>,
) -> Finished<B> {
    let h = armed.adarounds()[0].hard_decimals();
    let nearest = refine::with_decisions(armed.clone(), h).set_training(false);
    finish(unit, config, nearest)
}

/// `done`, or with [`AdaRoundConfig::never_worse`] nearest rounding on SeqMSE's grid
/// (`searched`) where its error is lower (with a message; `true` then).
fn lower_of<B: Backend>(
    unit: &Unit<'_, B>,
    config: &AdaRoundConfig,
    done: Finished<B>,
    searched: Option<Finished<B>>,
) -> (Finished<B>, bool) {
    match searched {
        Some(nearest) if config.never_worse && nearest.err_final < done.err_final => {
            log::info!(
                "{}: nearest rounding on SeqMSE's grid kept: error {:.4e}, the rounded layer's \
                 {:.4e}",
                unit.name,
                nearest.err_final,
                done.err_final
            );
            (nearest, true)
        }
        _ => (done, false),
    }
}

/// The grid the layer was written on: SeqMSE's search outcome, `Discarded` where
/// `never_worse` kept the caller's kernel, and `nearest` where it kept nearest rounding on
/// SeqMSE's grid.
fn written_scales(
    scales: Option<ScaleOutcome>,
    kept_caller: bool,
    nearest_on_searched: bool,
) -> Option<ScaleOutcome> {
    match scales {
        Some(ScaleOutcome::SeqMse { .. }) if kept_caller => Some(ScaleOutcome::Discarded),
        Some(ScaleOutcome::SeqMse {
            mean_ratio,
            own_error,
            chosen_error,
            ..
        }) => Some(ScaleOutcome::SeqMse {
            mean_ratio,
            own_error,
            chosen_error,
            nearest: nearest_on_searched,
        }),
        other => other,
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
            ctx.config.performance.elementwise,
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
        let log = epochs || (k + 1) % config.run.log_every == 0 || k + 1 == outer;
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

/// One report per kernel, each with the grid `scales` it was written on; a kernel put back
/// to nearest rounding has no changed weights.
pub(crate) fn kernel_reports(
    changes: Vec<KernelChange>,
    statuses: Vec<RoundingStatus>,
    (before, after): (Vec<Vec<usize>>, Vec<Vec<usize>>),
    (kept_nearest, scales): (bool, Option<ScaleOutcome>),
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
                    scales: scales.clone(),
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

/// `unit`'s layer (`armed`) rounded: by GPTQ on its Gram matrices where `gptq`, else by the
/// schedule's steps; with the trace of the steps, the rounding status of each kernel and
/// whether the step was fused.
fn round_unit<B: Backend>(
    unit: &Unit<'_, B>,
    armed: QuantizedLayer<B>,
    (grams, gptq, path): (Option<Grams<B>>, bool, LossPath),
    ctx: &mut Context<'_, B>,
    phases: &mut progress::Phases<'_>,
) -> Result<Rounded<B>, AdaRoundError> {
    let rounded = match grams {
        Some(grams) if gptq && ctx.config.method == RoundingMethod::Gptq => {
            let layer = gptq::round(armed, &grams);
            phases.mark("GPTQ in");
            let trace = Trace {
                history: Vec::new(),
                steps: 0,
                early_stop: false,
                last: (unit.error(&layer), 0.0),
            };
            let statuses = layer.adarounds().iter().map(|a| a.status()).collect();
            (trace, statuses, layer, false)
        }
        grams => {
            // AdaRound from GPTQ's decisions (`gptq` here: with the Gram form).
            let armed = match &grams {
                Some(grams) if gptq => {
                    let decided = gptq::round(armed, grams);
                    let h = decided.adarounds()[0].hard_decimals();
                    phases.mark("GPTQ's start in");
                    refine::with_alpha(decided, refine::alpha_of_decisions(h, refine::START_ALPHA))
                }
                _ => armed,
            };
            let (mut step, fused) = build_step(unit, armed, grams, ctx);
            phases.mark("refinement's Gram matrices, patches and step set up in");
            debug!(
                "{}: {path:?} loss path, {} step",
                unit.name,
                if fused { "fused" } else { "autodiff" }
            );
            let trace = run_schedule(step.as_mut(), unit, ctx)?;
            phases.mark(&format!("{} steps in", trace.steps));
            let statuses = step.status();
            (trace, statuses, step.into_layer(), fused)
        }
    };
    Ok(rounded)
}

/// A rounded layer: the trace of its steps, each kernel's rounding status, the layer, and
/// whether its step was fused.
type Rounded<B> = (Trace, Vec<RoundingStatus>, QuantizedLayer<B>, bool);

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
    let gptq = uses_gptq(&unit, config);
    let path = if gptq {
        LossPath::Gram
    } else {
        choose_path(&unit, config)
    };
    let grams = (path == LossPath::Gram)
        .then(|| unit_grams(&unit, config.loss))
        .flatten();
    phases.mark("Gram matrices in");
    let refine_grams = refine::grams_for(&unit, config, grams.as_ref());
    let (armed, scales) = search_scales(
        &unit,
        config,
        armed,
        grams.as_ref().or(refine_grams.as_ref()),
    )?;
    let searched = matches!(scales, Some(ScaleOutcome::SeqMse { .. }))
        .then(|| nearest_on_grid(&unit, config, &armed));
    let (trace, statuses, layer, fused) =
        round_unit(&unit, armed, (grams, gptq, path), ctx, &mut phases)?;
    let (done, flips) = refine_and_finish(&unit, config, layer.set_training(false), refine_grams);
    let (done, nearest_on_searched) = lower_of(&unit, config, done, searched);
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
    let scales = written_scales(scales, kept_nearest, nearest_on_searched);
    let kernels = kernel_reports(changes, statuses, (before, after), (kept_nearest, scales));
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
        block: None,
    };
    let layer = if kept_nearest { unit.layer } else { finalized };
    Ok((report, layer))
}
