//! Block reconstruction (BRECQ): the rounding of every quantized layer of a stage optimised
//! together, by autodiff through the stage, against the float stage's output on the float
//! model's input, from the input of the model rounded so far.
//!
//! The user's stages run on `Autodiff<B>` ([`AdaRound::with_blocks`](crate::AdaRound::with_blocks)):
//! at each step the model is lifted to `Autodiff<B>`, each quantized kernel of the block is
//! replaced by AdaRound's soft weights `s (floor(w / s) + h(alpha))` (tracked back to
//! `alpha`), and the stage runs with the layers taking their kernels as they are (float mode
//! for weights; quantized activations stay quantized). Only the alphas are trained.

use std::{collections::HashMap, time::Instant};

use adaround_core::{QuantizerError, RoundingStatus};
use adaround_layers::{
    probe::{Flow, Probe, ProbeAction, ProbeEvent},
    KernelChange, QuantizedLayer, QuantizerSlot,
};
use burn::{
    module::{AutodiffModule, Module, ModuleMapper, Param, ParamId},
    optim::{adaptor::OptimizerAdaptor, Adam, AdamConfig, GradientsParams, Optimizer},
    tensor::{backend::Backend, ElementConversion, Tensor},
};
use log::{debug, info};

use crate::{
    capture,
    discover::Site,
    optimize::{histograms, kernel_reports, Context},
    params::{RestoreGrad, Values, WriteBack},
    progress::{self, Progress},
    refine, seqmse,
    stages::{Stage, Staged},
    step::{lift, Ad},
    unit::{ensure_finite, reconstruction_loss},
    AdaRoundConfig, AdaRoundError, BlockInit, LayerReport, LossPath, ScaleSearch, StepLog,
};

/// The user's stages on `Autodiff<B>`, for a model whose inner module is `M`.
pub(crate) trait Blocks<B: Backend, M> {
    /// Number of stages.
    fn len(&self) -> usize;
    /// Stage `stage` of `model` lifted to `Autodiff<B>`, on `x`, with the kernels in `soft`
    /// (flattened, by parameter id) in place of the model's; no other parameter is tracked.
    fn forward(
        &self,
        stage: usize,
        model: &M,
        soft: HashMap<ParamId, Tensor<Ad<B>, 1>>,
        x: Flow<Ad<B>>,
    ) -> Result<Flow<Ad<B>>, AdaRoundError>;
}

/// Stages of `MA`, the model on `Autodiff<B>`.
pub(crate) struct Lifted<'a, B: Backend, MA> {
    pub stages: Vec<Stage<'a, Ad<B>, MA>>,
}

impl<B, M, MA> Blocks<B, M> for Lifted<'_, B, MA>
where
    B: Backend,
    M: Module<B>,
    MA: AutodiffModule<Ad<B>, InnerModule = M>,
{
    fn len(&self) -> usize {
        self.stages.len()
    }

    fn forward(
        &self,
        stage: usize,
        model: &M,
        soft: HashMap<ParamId, Tensor<Ad<B>, 1>>,
        x: Flow<Ad<B>>,
    ) -> Result<Flow<Ad<B>>, AdaRoundError> {
        let model = MA::from_inner(model.clone()).map(&mut Soft { soft });
        let stage = &self.stages[stage];
        let (_, out) = capture::run_returning::<Ad<B>, _, _>(SoftWeights, || stage(&model, x))?;
        Ok(out.expect("a pass that wants no event never stops"))
    }
}

/// Puts the soft kernels in place; every other parameter becomes a constant.
struct Soft<B: Backend> {
    soft: HashMap<ParamId, Tensor<Ad<B>, 1>>,
}

impl<B: Backend> ModuleMapper<Ad<B>> for Soft<B> {
    fn map_float<const D: usize>(
        &mut self,
        param: Param<Tensor<Ad<B>, D>>,
    ) -> Param<Tensor<Ad<B>, D>> {
        match self.soft.remove(&param.id) {
            Some(soft) => param.map(|old| soft.reshape(old.dims())),
            None => param.set_require_grad(false),
        }
    }
}

/// The layers take their kernels as they are (the soft ones); activations stay quantized.
struct SoftWeights;

impl<B: Backend> Probe<B> for SoftWeights {
    fn float_mode(&self) -> bool {
        true
    }

    fn float_activations(&self) -> bool {
        false
    }

    fn wants(&self, _index: usize) -> bool {
        false
    }

    fn record(&mut self, _index: usize, _event: ProbeEvent<B>) -> ProbeAction {
        ProbeAction::Continue
    }
}

/// One block: its stage, the sites in it (index among all sites, site), and its data.
pub(crate) struct Block<'s, B: Backend> {
    pub stage: usize,
    pub sites: Vec<(usize, &'s Site<B>)>,
    /// Each batch's input to the stage from the model rounded so far.
    pub inputs: Vec<Flow<B>>,
    /// Each batch's float stage output.
    pub targets: Vec<Flow<B>>,
}

/// `flow`'s samples `start..start + len`.
fn narrow<B: Backend>(flow: &Flow<B>, start: usize, len: usize) -> Flow<B> {
    flow.clone()
        .map(|t| t.narrow(0, start, len), |t| t.narrow(0, start, len))
}

/// The mean reconstruction loss of `model`'s stage (quantized) over the block's batches.
fn block_error<B: Backend, M: Module<B>>(
    staged: &Staged<'_, '_, B, M>,
    model: &M,
    block: &Block<'_, B>,
    loss: crate::ReconstructionLoss,
) -> Result<f64, AdaRoundError> {
    let mut sum = 0.0;
    for (x, t) in block.inputs.iter().zip(&block.targets) {
        let out = staged.run_stage(model, block.stage, x, false)?;
        sum += reconstruction_loss(out, t.clone(), loss)
            .into_scalar()
            .elem::<f64>();
    }
    Ok(sum / block.inputs.len() as f64)
}

type Layers<B> = Vec<QuantizedLayer<Ad<B>>>;

/// `layer` (AdaRound armed over its float kernels) with each alpha set to the decision of
/// the rounded kernel of the same id in `rounded`: `±`[`refine::START_ALPHA`]. `regrid`: on the grid
/// the quantizer takes from the rounded kernel (where the layer-wise rounding searched its
/// scales, [`ScaleSearch::SeqMse`](crate::ScaleSearch::SeqMse)), not from the float one.
fn decided<B: Backend>(
    layer: QuantizedLayer<B>,
    rounded: &HashMap<ParamId, Tensor<B, 1>>,
    regrid: bool,
) -> Result<QuantizedLayer<B>, QuantizerError> {
    let kernels: Vec<_> = layer
        .kernels()
        .iter()
        .map(|k| (k.id, k.weight.clone()))
        .collect();
    let mut next = kernels.into_iter();
    let mut failed = None;
    let layer = layer.map_slots(|slot| {
        let (id, float) = next.next().expect("one id per slot");
        match slot {
            QuantizerSlot::AdaRound(ada) => {
                let w = rounded[&id].clone().reshape(ada.alpha.dims());
                // Only where the layer-wise rounding searched the grid (SeqMSE's quantizers).
                let ada = if regrid && seqmse::supports(&ada.quantizer) {
                    let encoding = ada.quantizer.encoding(w.clone(), ada.axis());
                    match encoding
                        .and_then(|e| ada.clone().with_encoding(float, e.scale_factor, e.offset))
                    {
                        Ok(regridded) => regridded,
                        Err(e) => {
                            failed = Some(e);
                            ada
                        }
                    }
                } else {
                    ada
                };
                let z = w * ada.sf.val();
                let z = match ada.offset() {
                    Some(o) => z - o,
                    None => z,
                };
                let up = (z - ada.w_floor.val()).greater_elem(0.5).float();
                let alpha = refine::alpha_of_decisions(up, refine::START_ALPHA);
                QuantizerSlot::AdaRound(ada.with_alpha(alpha))
            }
            plain => plain,
        }
    });
    failed.map_or(Ok(layer), Err)
}

/// Optimises the rounding of the block's layers together, from the rounding of `start`
/// (its layers' decisions, [`BlockInit::LayerWise`]) or from AdaRound's start
/// ([`BlockInit::Fractional`]), and writes the rounded kernels into `start`; one report
/// per layer. `nearest` is the model before the block's layers were rounded.
pub(crate) fn optimize_block<B: Backend, M: Module<B>>(
    (blocks, staged): (&dyn Blocks<B, M>, &Staged<'_, '_, B, M>),
    (nearest, start): (&M, M),
    block: &Block<'_, B>,
    ctx: &mut Context<'_, B>,
) -> Result<(M, Vec<LayerReport>), AdaRoundError> {
    let clock = Instant::now();
    let config = ctx.config;
    let names: Vec<&str> = block.sites.iter().map(|(_, s)| s.name.as_str()).collect();
    let armed = arm(block, &start, ctx)?;
    let before: Vec<_> = armed.iter().map(histograms).collect();
    let initial = armed.clone();
    let (layers, history) = train(blocks, &start, block, trainable(armed), ctx)?;
    let layers = layers.valid();
    let err_before = block_error(staged, nearest, block, config.loss)?;
    let err_start = block_error(staged, &start, block, config.loss)?;
    let after: Vec<_> = layers.iter().map(histograms).collect();
    let statuses: Vec<Vec<_>> = layers
        .iter()
        .map(|l| l.adarounds().iter().map(|a| a.status()).collect())
        .collect();
    let finalized: Vec<_> = layers.into_iter().map(|l| l.finalize(true)).collect();
    // The kernels only: the biases stay as the start has them (bias-corrected layer-wise).
    let values = finalized
        .iter()
        .flat_map(|(l, _)| l.kernel_values())
        .collect::<HashMap<_, _>>();
    let rounded = start.clone().map(&mut WriteBack { values });
    let err_final = block_error(staged, &rounded, block, config.loss)?;
    ensure_finite(err_final.is_finite(), names[0], "block error")?;
    // `never_worse`: the block's start (nearest rounding, or the layer-wise rounding) where
    // the block ends above it.
    let kept_start = config.never_worse && err_final > err_start;
    info!(
        "block {}: error with nearest rounding {err_before:.5}, at its start {err_start:.5}, after {err_final:.5}{}",
        block.stage,
        if kept_start { " (start kept)" } else { "" }
    );
    let work = if kept_start { start } else { rounded };
    let finalized = match kept_start {
        true => initial.into_iter().map(|l| l.finalize(true)).collect(),
        false => finalized,
    };
    let outcome = Outcome {
        errors: (err_before, err_start, err_final),
        kept_start,
        history,
        seconds: clock.elapsed().as_secs_f64(),
    };
    let reports = reports(block, finalized, statuses, (before, after), outcome, config);
    let finished = Progress::BlockFinished {
        index: ctx.index + reports.len() - 1,
        layers: ctx.layers,
        stage: block.stage,
        reports: &reports,
    };
    info!("{}", progress::line(&finished));
    progress::emit(ctx.progress, finished)?;
    Ok((work, reports))
}

/// The block's layers armed with AdaRound quantizers: from AdaRound's start
/// ([`BlockInit::Fractional`]) or from the decisions `start` holds ([`BlockInit::LayerWise`]).
fn arm<B: Backend, M: Module<B>>(
    block: &Block<'_, B>,
    start: &M,
    ctx: &Context<'_, B>,
) -> Result<Vec<QuantizedLayer<B>>, AdaRoundError> {
    let config = ctx.config;
    let armed = block
        .sites
        .iter()
        .map(|(_, s)| {
            s.layer
                .clone()
                .with_adaround(&config.params)
                .map_err(|source| AdaRoundError::Quantizer {
                    layer: s.name.clone(),
                    source,
                })
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(match config.block.init {
        BlockInit::Fractional => armed,
        BlockInit::LayerWise => {
            let ids = armed
                .iter()
                .flat_map(|l| l.kernels().into_iter().map(|k| k.id));
            let mut values = Values {
                ids: ids.collect(),
                found: HashMap::new(),
            };
            start.visit(&mut values);
            let regrid = config.scale_search == ScaleSearch::SeqMse;
            armed
                .into_iter()
                .zip(&block.sites)
                .map(|(l, (_, s))| {
                    decided(l, &values.found, regrid).map_err(|source| AdaRoundError::Quantizer {
                        layer: s.name.clone(),
                        source,
                    })
                })
                .collect::<Result<_, _>>()?
        }
    })
}

/// Per layer, per kernel: the histogram of the decimals.
type Histograms = Vec<Vec<Vec<usize>>>;

/// What a block's optimisation ended with, for its reports.
struct Outcome {
    /// The block output's error with nearest rounding, at the start, and after the steps.
    errors: (f64, f64, f64),
    /// `never_worse` kept the start.
    kept_start: bool,
    history: Vec<StepLog>,
    seconds: f64,
}

/// One report per layer of the block, each with the block output's errors.
fn reports<B: Backend>(
    block: &Block<'_, B>,
    finalized: Vec<(QuantizedLayer<B>, Vec<KernelChange>)>,
    statuses: Vec<Vec<RoundingStatus>>,
    (before, after): (Histograms, Histograms),
    outcome: Outcome,
    config: &AdaRoundConfig,
) -> Vec<LayerReport> {
    let (err_before, err_start, err_final) = outcome.errors;
    let kept_nearest = outcome.kept_start && config.block.init == BlockInit::Fractional;
    let history = &outcome.history;
    let last = history
        .last()
        .map_or((f64::NAN, f64::NAN), |h| (h.reconstruction, h.rounding));
    let parts = finalized
        .into_iter()
        .zip(statuses)
        .zip(before.into_iter().zip(after));
    parts
        .enumerate()
        .map(|(k, (((layer, changes), statuses), histograms))| {
            let site = block.sites[k].1;
            LayerReport {
                name: site.name.clone(),
                kind: site.layer.kind(),
                path: LossPath::Direct,
                fused: false,
                position: site.position,
                weights: layer
                    .kernels()
                    .iter()
                    .map(|k| k.weight.shape().num_elements())
                    .sum(),
                err_before,
                err_after: err_final,
                err_final: if outcome.kept_start {
                    err_start
                } else {
                    err_final
                },
                steps: history.last().map_or(0, |h| h.step),
                early_stop: false,
                kept_nearest,
                refined: 0,
                final_reconstruction_loss: last.0,
                final_rounding_loss: last.1,
                kernels: kernel_reports(changes, statuses, histograms, (kept_nearest, None)),
                history: history.clone(),
                seconds: outcome.seconds,
                block: Some(block.stage),
            }
        })
        .collect()
}

/// The armed layers on `Autodiff<B>` with only their alphas tracked.
fn trainable<B: Backend>(armed: Vec<QuantizedLayer<B>>) -> Layers<B> {
    let alphas = armed
        .iter()
        .flat_map(|l| l.adarounds().into_iter().map(|a| (a.alpha.id, true)))
        .collect();
    Layers::<B>::from_inner(armed)
        .no_grad()
        .map(&mut RestoreGrad {
            require_grad: alphas,
        })
}

/// Each AdaRound kernel's soft weights, flattened, by the kernel's parameter id.
fn soft_kernels<B: Backend>(layers: &Layers<B>) -> HashMap<ParamId, Tensor<Ad<B>, 1>> {
    layers
        .iter()
        .flat_map(|l| {
            l.kernels().into_iter().filter_map(|k| {
                let ada = k.slot.adaround()?;
                Some((k.id, ada.recons_weights_flat()))
            })
        })
        .collect()
}

/// `reg` times the rounding regulariser summed over the block's kernels at `beta`.
fn rounding_loss<B: Backend>(layers: &Layers<B>, beta: f64, reg: f64) -> Option<Tensor<Ad<B>, 1>> {
    layers
        .iter()
        .flat_map(|l| l.adarounds().into_iter().map(|a| a.rounding_loss(beta)))
        .reduce(|a, b| a + b)
        .map(|r| r.mul_scalar(reg))
}

/// The block's schedule: Adam on the alphas of `layers`, each step on the next
/// `samples_per_step` samples of the batches in turn.
fn train<B: Backend, M: Module<B>>(
    blocks: &dyn Blocks<B, M>,
    work: &M,
    block: &Block<'_, B>,
    mut layers: Layers<B>,
    ctx: &mut Context<'_, B>,
) -> Result<(Layers<B>, Vec<StepLog>), AdaRoundError> {
    let config = ctx.config;
    let schedule = &config.block.schedule;
    let batch = block.inputs[0].dims()[0];
    let per_step = config.block.samples_per_step.unwrap_or(batch).min(batch);
    let pieces: Vec<(usize, usize)> = (0..block.inputs.len())
        .flat_map(|b| (0..batch / per_step).map(move |p| (b, p * per_step)))
        .collect();
    let mut optim: OptimizerAdaptor<Adam, Layers<B>, Ad<B>> = AdamConfig::new().build().into();
    let steps = schedule.length();
    let lr = config.block.learning_rate;
    let name = format!("block {} ({} layers)", block.stage, layers.len());
    let mut history = Vec::new();
    for step in 0..steps {
        let (b, from) = pieces[step % pieces.len()];
        let beta = schedule.beta(step, &config.params);
        let soft = soft_kernels(&layers);
        let x = lift(&narrow(&block.inputs[b], from, per_step));
        let target = lift(&narrow(&block.targets[b], from, per_step));
        let out = blocks.forward(block.stage, work, soft, x)?;
        let rec = reconstruction_loss(out, target, config.loss);
        let round = beta.and_then(|beta| rounding_loss(&layers, beta, config.params.reg));
        let total = match &round {
            Some(r) => rec.clone() + r.clone(),
            None => rec.clone(),
        };
        let grads = GradientsParams::from_grads(total.backward(), &layers);
        layers = optim.step(lr, layers, grads);
        if (step + 1) % config.run.log_every != 0 && step + 1 != steps {
            continue;
        }
        let entry = StepLog {
            step: step + 1,
            beta,
            reconstruction: rec.into_scalar().elem::<f64>(),
            rounding: round.map_or(0.0, |r| r.into_scalar().elem::<f64>()),
            roamers: layers
                .iter()
                .flat_map(|l| {
                    l.adarounds()
                        .iter()
                        .map(|a| a.status().roamers)
                        .collect::<Vec<_>>()
                })
                .collect(),
        };
        ensure_finite(
            entry.reconstruction.is_finite() && entry.rounding.is_finite(),
            &name,
            "losses",
        )?;
        let event = Progress::Step {
            index: ctx.index,
            layers: ctx.layers,
            name: &name,
            steps,
            log: &entry,
        };
        debug!("{}", progress::line(&event));
        progress::emit(ctx.progress, event)?;
        history.push(entry);
    }
    Ok((layers, history))
}

#[cfg(test)]
mod tests {
    use adaround_core::{AdaRoundParams, WeightQuantizer};
    use adaround_layers::{QuantizedDense, QuantizedDenseConfig, QuantizerSlot};
    use burn::tensor::{Distribution, Tensor};

    use super::*;
    use crate::ReconstructionLoss;

    type N = burn_ndarray::NdArray<f32>;

    fn rows<C: Backend>(x: Flow<C>) -> Tensor<C, 2> {
        match x {
            Flow::Rows(t) => t,
            Flow::Maps(_) => panic!("rows expected"),
        }
    }

    /// A one-layer block: its loss and the gradient of every alpha equal the layer's own
    /// AdaRound loss (the layer run with its AdaRound quantizer) and gradient.
    #[test]
    fn should_give_a_one_layer_block_the_layers_loss_and_gradient() {
        let device = Default::default();
        N::seed(&device, 3);
        let q = WeightQuantizer::mse(3, true, adaround_core::Grid::FullRange).unwrap();
        let layer: QuantizedDense<N> = QuantizedDenseConfig::new(12, 5)
            .with_quantizer(q)
            .init(&device);
        let x = Tensor::<N, 2>::random([16, 12], Distribution::Normal(0.2, 1.0), &device);
        let target = layer.forward_float(x.clone()) + 0.05;
        let armed = QuantizedLayer::Dense(layer.clone())
            .with_adaround(&AdaRoundParams::new())
            .unwrap()
            .map_slots(|slot| match slot {
                QuantizerSlot::AdaRound(ada) => {
                    // Alphas off their initial values, so that `h` is not the fraction.
                    let alpha = ada.alpha.val();
                    let moved = alpha.clone() + alpha.random_like(Distribution::Normal(0.0, 1.0));
                    QuantizerSlot::AdaRound(ada.with_alpha(moved))
                }
                plain => plain,
            });
        let (beta, reg) = (7.0, 0.02);
        let lifted = |armed: &QuantizedLayer<N>| {
            QuantizedLayer::<Ad<N>>::from_inner(armed.clone())
                .no_grad()
                .map(&mut RestoreGrad {
                    require_grad: armed
                        .adarounds()
                        .iter()
                        .map(|a| (a.alpha.id, true))
                        .collect(),
                })
        };
        let loss_and_grad = |ad: &QuantizedLayer<Ad<N>>, rec: Tensor<Ad<N>, 1>| {
            let ada = ad.adarounds()[0].clone();
            let total = rec + ada.rounding_loss(beta).mul_scalar(reg);
            let value = total.clone().into_scalar().elem::<f64>();
            let grads = total.backward();
            (value, ada.alpha.val().grad(&grads).unwrap())
        };
        // The layer on its own.
        let own = lifted(&armed);
        let out = own.forward_flow(lift(&Flow::Rows(x.clone())));
        let rec = reconstruction_loss(
            out,
            lift(&Flow::Rows(target.clone())),
            ReconstructionLoss::Mse,
        );
        let (own_loss, own_grad) = loss_and_grad(&own, rec);
        // The same layer as a block of its float model.
        let block = lifted(&armed);
        let stages: Vec<Stage<'_, Ad<N>, QuantizedDense<Ad<N>>>> =
            vec![Box::new(|m: &QuantizedDense<Ad<N>>, x| {
                Flow::Rows(m.forward(rows(x)))
            })];
        let blocks = Lifted { stages };
        let soft = block
            .kernels()
            .into_iter()
            .map(|k| (k.id, k.slot.adaround().unwrap().recons_weights_flat()))
            .collect();
        let out =
            Blocks::<N, QuantizedDense<N>>::forward(&blocks, 0, &layer, soft, lift(&Flow::Rows(x)))
                .unwrap();
        let rec = reconstruction_loss(out, lift(&Flow::Rows(target)), ReconstructionLoss::Mse);
        let (block_loss, block_grad) = loss_and_grad(&block, rec);
        assert!(
            (own_loss - block_loss).abs() <= 1e-6 * own_loss.abs(),
            "loss {own_loss} vs {block_loss}"
        );
        let scale = own_grad.clone().abs().max().into_scalar();
        let diff = (own_grad - block_grad).abs().max().into_scalar();
        assert!(
            scale > 0.0 && diff <= 1e-5 * scale,
            "gradients differ by {diff} (scale {scale})"
        );
    }
}
