//! The public entry points and the run over a model's layers.

use std::{collections::HashMap, time::Instant};

use adaround_core::all_finite;
use adaround_layers::{probe::Flow, QuantizedLayer};
use burn::{
    module::{AutodiffModule, Module},
    optim::{Optimizer, SimpleOptimizer},
    tensor::{backend::Backend, Tensor},
};
use log::info;

use crate::{
    block::{optimize_block, Block, Blocks, Lifted},
    capture,
    checkpoint::{checksum, is_state_of, Checkpoint, Fingerprint},
    choose::{Candidate, CandidateScore, MethodChoice},
    discover::{activations, discover, Site},
    gram::{self, Grams},
    guard::{self, ModelOutput, Reference},
    optimize::Context,
    params::{ParamIndex, WriteBack},
    progress::{self, Progress},
    site::{optimize_site, targets, Held, SiteData},
    stages::{Stage, Staged},
    step::{Ad, DefaultAdam, ModuleOptimizers, Optimizers, SimpleOptimizers},
    unit::{ensure_finite, flows_finite},
    AdaRoundConfig, AdaRoundError, AdaRoundReport, BlockInit, LayerReport, ModelCheck, ModelGuard,
    ScaleOutcome, ScaleSearch, SeparableStep, Target,
};

/// AdaRound on a model, in Burn's builder style: the configuration, then optionally an
/// optimizer, a progress callback and the forward pass in stages, then [`run`](Self::run),
/// which optimises the rounding of every quantized layer of the model, one layer at a time
/// in forward order.
///
/// ```no_run
/// # use adaround::{AdaRound, AdaRoundConfig, AdaRoundError, Progress};
/// # use adaround::layers::QuantizedDense;
/// # use burn::tensor::Tensor;
/// # type B = burn_ndarray::NdArray<f32>;
/// # fn f(model: &QuantizedDense<B>, samples: Tensor<B, 2>) -> Result<(), AdaRoundError> {
/// let (rounded, report) = AdaRound::new(AdaRoundConfig::recommended())
///     .with_progress(|event| {
///         if let Progress::LayerFinished { index, layers, report } = event {
///             eprintln!("{}/{layers} {} rounded", index + 1, report.name);
///         }
///     })
///     .run(model, samples, |m, x| m.forward(x))?;
/// # Ok(()) }
/// ```
///
/// The model is an inference model on any backend `B` (a trained model on an autodiff
/// backend: pass `model.valid()`): every pass through it runs in inference mode, so a
/// BatchNorm uses its running statistics and nothing in the model changes. `forward` runs the
/// model on a batch of samples, exactly as the user would. The driver finds the model's
/// [quantized layers](adaround_layers) by running it, so any graph works: sequential,
/// residual, nested. Only the layer being optimised is put on `Autodiff<B>`, and only when its
/// step needs autodiff (a following activation, a module optimizer); Dense, Conv2D and
/// SeparableConv2D layers otherwise run a fused closed-form step with Adam.
///
/// After the last layer, [`AdaRoundConfig::model_guard`] compares the output error (against
/// the float model, on the calibration samples) of the rounded model with nearest
/// rounding's: reported in [`AdaRoundReport::model`], and with [`ModelGuard::KeepBetter`]
/// the better mix is returned. The output must implement [`ModelOutput`] (tensors, tuples,
/// vectors of them, or `()` to skip the check).
///
/// [`run`](Self::run) returns a new model and the report; the caller's model is never
/// modified. The new model is built from `model.clone()`, so, as with any Burn clone, a
/// BatchNorm's running statistics (Burn's `RunningState`) share their storage with the
/// caller's: fold BatchNorm into the layers first, or load the returned model's record into a
/// newly built model to separate them.
///
/// Time: capturing a layer's inputs runs `forward` up to the layer on every sample (twice
/// with [`Target::FloatModel`]), so a model of `L` layers costs about `L² / 2` layer passes;
/// give the forward pass in stages ([`AdaRound::with_stages`]) to run one stage per layer
/// instead.
///
/// Memory: a layer on the Gram path ([`LossPath`]) is optimised from its Gram matrices,
/// accumulated one batch at a time (`batches x K²` floats per layer, whatever the image
/// size); other layers hold their inputs and targets for all samples while they are
/// optimised (`samples x (input + output size)` floats). With stages, the inputs of the
/// current stage are held (two per sample with float-model targets).
pub struct AdaRound<'a, B: Backend, M> {
    config: AdaRoundConfig,
    optimizers: Box<dyn Optimizers<B> + 'a>,
    progress: Box<dyn FnMut(Progress<'_>) + 'a>,
    stages: Vec<Stage<'a, B, M>>,
    blocks: Option<Box<dyn Blocks<B, M> + 'a>>,
}

impl<'a, B: Backend, M: Module<B>> AdaRound<'a, B, M> {
    /// AdaRound with `config`, Burn's Adam with its defaults, no progress callback and the
    /// forward pass in one piece.
    pub fn new(config: AdaRoundConfig) -> Self {
        Self {
            config,
            optimizers: Box::new(DefaultAdam),
            progress: Box::new(|_| {}),
            stages: Vec::new(),
            blocks: None,
        }
    }

    /// Reports progress to `progress` (layer started, losses read, layer finished), e.g. to
    /// drive a progress bar. The same lines go to `log` at `info` level.
    pub fn with_progress(mut self, progress: impl FnMut(Progress<'_>) + 'a) -> Self {
        self.progress = Box::new(progress);
        self
    }

    /// Any Burn optimizer: `optimizer()` is called once per layer, and every step runs
    /// through Burn's autodiff (on `Autodiff<B>`) and `optimizer`. With an optimizer Burn also
    /// ships as a [`SimpleOptimizer`], [`Self::with_simple_optimizer`] keeps the fused step.
    pub fn with_optimizer<Opt>(mut self, optimizer: impl FnMut() -> Opt + 'a) -> Self
    where
        Opt: Optimizer<QuantizedLayer<Ad<B>>, Ad<B>> + 'static,
    {
        self.optimizers = Box::new(ModuleOptimizers(optimizer));
        self
    }

    /// Any [`SimpleOptimizer`] (a Burn optimizer on plain tensors, e.g.
    /// `AdamWConfig::new().build()`): `optimizer()` is called once per layer. Layers with a
    /// fused step run it on the plain tensors of `B`; the others step through autodiff with
    /// it, wrapped in Burn's `OptimizerAdaptor`.
    pub fn with_simple_optimizer<S>(mut self, optimizer: impl FnMut() -> S + 'a) -> Self
    where
        S: SimpleOptimizer<B> + 'static,
    {
        self.optimizers = Box::new(SimpleOptimizers(optimizer));
        self
    }

    /// The forward pass cut into `stages` (for example the stem, each residual block and
    /// the head), which run in order compute what `forward` computes (the driver checks it on
    /// the first batch: [`AdaRoundError::Stages`] otherwise). A layer's inputs are then
    /// captured by running its stage from the stage's input, kept for every sample, instead
    /// of the model's whole prefix from the samples: a run of `L` layers costs about
    /// `L x stage length` layer passes instead of `L² / 2`, and holds two stage inputs per
    /// sample (one without [`Target::FloatModel`]). Samples of rank 2 or 4 (rows or maps).
    /// The result is the same as without stages.
    pub fn with_stages(mut self, stages: Vec<Stage<'a, B, M>>) -> Self {
        self.stages = stages;
        self
    }

    /// Block reconstruction (BRECQ): the quantized layers of each stage are optimised
    /// together against the float stage's output, by autodiff through the stage, instead of
    /// one at a time. `blocks` are the stages given to [`Self::with_stages`], written for the
    /// model on `Autodiff<B>` (`MA`, whose inner module is `M`; for a model generic over its
    /// backend, the same function at `Autodiff<B>`). Settings: [`AdaRoundConfig::block`].
    ///
    /// Each step lifts the model to `Autodiff<B>` and runs the stage on the next samples of
    /// its input from the model rounded so far, with every quantized kernel of the stage
    /// replaced by AdaRound's soft weights; the loss is the run's reconstruction loss against
    /// the float stage's output on the float model's input, plus the rounding regulariser of
    /// every kernel. Quantized activations stay quantized. Without bias correction or
    /// refinement; with [`AdaRoundConfig::never_worse`], a block whose output error ends
    /// above nearest rounding's keeps nearest rounding. A stage of one layer is that layer's
    /// AdaRound by autodiff. Memory: the stage's inputs and float outputs for every sample,
    /// and one step's autodiff graph through the stage. [`AdaRoundError::Stages`] if the
    /// number of blocks is not the number of stages.
    pub fn with_blocks<MA>(mut self, blocks: Vec<Stage<'a, Ad<B>, MA>>) -> Self
    where
        MA: AutodiffModule<Ad<B>, InnerModule = M> + 'a,
        M: 'a,
    {
        self.blocks = Some(Box::new(Lifted { stages: blocks }));
        self
    }

    /// Optimises the rounding of every quantized layer of `model`, one layer at a time in
    /// forward order (see [`AdaRound`]); returns a new model and the report.
    pub fn run<F, O, const D: usize>(
        mut self,
        model: &M,
        samples: Tensor<B, D>,
        forward: F,
    ) -> Result<(M, AdaRoundReport), AdaRoundError>
    where
        F: Fn(&M, Tensor<B, D>) -> O,
        O: ModelOutput<B>,
    {
        run(
            model,
            samples,
            forward,
            &self.config,
            self.optimizers.as_mut(),
            self.progress.as_mut(),
            (&self.stages, self.blocks.as_deref()),
        )
    }
}

impl<'a, B: Backend, M: Module<B>> AdaRound<'a, B, M> {
    /// Rounds `model` once per candidate (on `samples`, as [`run`](Self::run) does) and
    /// returns the model of the candidate whose outputs on `validation` are closest to the
    /// float model's (mean squared error, as the model check's), with its report and every
    /// candidate's [score](MethodChoice). `validation` are samples held out from calibration
    /// (never the images the model is finally tested on); the choice is made on them alone.
    /// [`Candidate::methods`] gives layer-wise AdaRound, block reconstruction and GPTQ, on
    /// the quantizer's scales and on SeqMSE's. Each candidate's configuration is its own
    /// (this builder's configuration is not used); the optimizer, progress callback, stages
    /// and blocks are this builder's. Time: the sum of the candidates' runs; memory: one
    /// rounded model besides the best so far.
    ///
    /// Errors: no candidates, a candidate with block reconstruction and no
    /// [`with_blocks`](Self::with_blocks) ([`AdaRoundError::InvalidConfig`]); a model whose
    /// output has no tensors to compare ([`AdaRoundError::Forward`]); any candidate's run error.
    pub fn run_choosing<F, O, const D: usize>(
        mut self,
        model: &M,
        (samples, validation): (Tensor<B, D>, Tensor<B, D>),
        candidates: &[Candidate],
        forward: F,
    ) -> Result<(M, AdaRoundReport, MethodChoice), AdaRoundError>
    where
        F: Fn(&M, Tensor<B, D>) -> O,
        O: ModelOutput<B>,
    {
        if let Some(c) = candidates
            .iter()
            .find(|c| c.blocks && self.blocks.is_none())
        {
            return Err(AdaRoundError::InvalidConfig(format!(
                "candidate `{}` asks for block reconstruction, and no blocks were given \
                 (AdaRound::with_blocks)",
                c.name
            )));
        }
        // All validation samples (checked as calibration samples are), in passes of at most
        // VALIDATION_BATCH.
        let n = validation.dims()[0];
        let whole = split_batches(validation, None)?.remove(0);
        let batches: Vec<_> = (0..n)
            .step_by(VALIDATION_BATCH)
            .map(|s| whole.clone().narrow(0, s, VALIDATION_BATCH.min(n - s)))
            .collect();
        let reference = Reference::new(model, &batches, &forward)?.ok_or_else(|| {
            AdaRoundError::Forward("the model's output has no tensors to compare".into())
        })?;
        let nearest_error = reference.error(model)?;
        let (mut best, mut scores) = (None::<(M, AdaRoundReport, f64)>, Vec::new());
        for c in candidates {
            let blocks = self.blocks.as_deref().filter(|_| c.blocks);
            let optimizers: &mut dyn Optimizers<B> = self.optimizers.as_mut();
            let progress: &mut dyn FnMut(Progress<'_>) = self.progress.as_mut();
            let (rounded, report) = run(
                model,
                samples.clone(),
                &forward,
                &c.config,
                optimizers,
                progress,
                (&self.stages, blocks),
            )?;
            let validation_error = reference.error(&rounded)?;
            info!(
                "candidate {}: validation output error {validation_error:.4e} (nearest \
                 rounding {nearest_error:.4e}), {:.0} s",
                c.name, report.seconds
            );
            scores.push(CandidateScore {
                name: c.name.clone(),
                validation_error,
                seconds: report.seconds,
            });
            if best.as_ref().is_none_or(|b| validation_error < b.2) {
                best = Some((rounded, report, validation_error));
            }
        }
        let (rounded, report, error) = best.ok_or_else(|| {
            AdaRoundError::InvalidConfig("run_choosing needs at least one candidate".into())
        })?;
        let chosen = scores
            .iter()
            .position(|s| s.validation_error == error)
            .expect("the best is a candidate");
        let choice = MethodChoice {
            nearest_error,
            candidates: scores,
            chosen,
        };
        info!("{choice}");
        Ok((rounded, report, choice))
    }
}

/// Samples per forward pass when [`AdaRound::run_choosing`] scores the validation samples.
const VALIDATION_BATCH: usize = 32;

/// What a run carries from layer to layer.
struct Run<'a, 's, B: Backend, M, F, const D: usize> {
    batches: Vec<Tensor<B, D>>,
    forward: F,
    float_model: Option<M>,
    config: &'a AdaRoundConfig,
    /// The forward pass in stages, with each batch's input to the current stage.
    staged: Option<Staged<'s, 'a, B, M>>,
}

impl<'a, 's, B, M, F, O, const D: usize> Run<'a, 's, B, M, F, D>
where
    B: Backend,
    M: Module<B>,
    F: Fn(&M, Tensor<B, D>) -> O,
    O: ModelOutput<B>,
{
    /// The run over `model` (the caller's: the float model, not a resumed one), with its
    /// stages in place when there are any.
    fn new(
        model: &M,
        (batches, forward): (Vec<Tensor<B, D>>, F),
        config: &'a AdaRoundConfig,
        (stages, sites): (&'s [Stage<'a, B, M>], &[Site<B>]),
    ) -> Result<Self, AdaRoundError> {
        let float_targets = config.target == Target::FloatModel;
        let staged = (!stages.is_empty())
            .then(|| Staged::new(stages, model, (&batches, &forward), float_targets, sites))
            .transpose()?;
        Ok(Self {
            float_model: float_targets.then(|| model.clone()),
            batches,
            forward,
            config,
            staged,
        })
    }

    /// Batch `b`'s input to the site (the `i`-th of all sites), from `work` or (`float`)
    /// from the float model.
    fn capture(
        &self,
        work: &M,
        (i, site): (usize, &Site<B>),
        b: usize,
        float: bool,
    ) -> Result<Flow<B>, AdaRoundError> {
        let float_model = self.float_model.as_ref();
        match &self.staged {
            Some(staged) => staged.capture((work, float_model), (i, site), b, float),
            None => {
                let model = if float {
                    float_model.unwrap_or(work)
                } else {
                    work
                };
                let x = &self.batches[b];
                let forward = || (self.forward)(model, x.clone());
                capture::input_of(site.position, float, &site.name, forward)
            }
        }
    }

    /// The site's data, from `work` (and the float model): its Gram matrices accumulated
    /// batch by batch where the layer takes the Gram path, else its inputs and targets.
    fn data(&self, work: &M, at: (usize, &Site<B>)) -> Result<SiteData<B>, AdaRoundError> {
        let site = at.1;
        let first = self.capture(work, at, 0, false)?;
        self.warn_underdetermined(site, &first);
        let streamed = site.activation.is_none()
            && site.relu.is_none()
            && gram::chosen(&site.layer, &first, self.config.performance.path);
        if streamed {
            self.streamed(work, at, first)
        } else {
            self.held(work, at, first).map(SiteData::Held)
        }
    }

    /// Warns where the layer's loss sees fewer rows (samples x output positions) than the
    /// layer has inputs per output: its rounding is then fitted on a subspace of its inputs
    /// and may not carry to other data (on EfficientNet-Lite0's classifier, 512 crops for
    /// 1 280 inputs, nearest rounding of that layer alone stays closer to the float model on
    /// other images than AdaRound's; docs/efficientnet.md).
    fn warn_underdetermined(&self, site: &Site<B>, first: &Flow<B>) {
        if !gram::supports(&site.layer) {
            return; // no matrix form: no inputs per output to count
        }
        let (inputs, positions) = gram::sizes(&site.layer, first);
        let per_sample = positions / first.dims()[0].max(1);
        let rows = per_sample * self.batches.iter().map(|b| b.dims()[0]).sum::<usize>();
        if rows < inputs {
            log::warn!(
                "{}: {rows} calibration rows for {inputs} inputs per output: the rounding is \
                 fitted on fewer rows than inputs and may not carry to other data; more \
                 calibration samples, or this layer at nearest rounding, may do better",
                site.name
            );
        }
    }

    /// The site's Gram matrices, one batch at a time: each batch's input (and the float
    /// model's) is dropped once its Gram matrix is computed, so the memory held does not grow
    /// with the samples' size beyond `K x K` floats per batch.
    fn streamed(
        &self,
        work: &M,
        at: (usize, &Site<B>),
        first: Flow<B>,
    ) -> Result<SiteData<B>, AdaRoundError> {
        let site = at.1;
        let float_act = self.config.target == Target::FloatModel;
        let from_float_model = self.float_model.is_some();
        let mut first = Some(first);
        let mut all: Option<Grams<B>> = None;
        for b in 0..self.batches.len() {
            let x = match first.take() {
                Some(x) => x,
                None => self.capture(work, at, b, false)?,
            };
            ensure_finite(flows_finite(std::slice::from_ref(&x)), &site.name, "inputs")?;
            let targets = match from_float_model {
                true => targets(site, &[self.capture(work, at, b, true)?], float_act),
                false => Vec::new(),
            };
            ensure_finite(flows_finite(&targets), &site.name, "float outputs")?;
            let other = from_float_model.then_some(&targets[..]);
            let grams = gram::grams(&site.layer, &[x], other, self.config.loss)
                .expect("the Gram path is chosen only for layers with a matrix form");
            all = Some(match all {
                Some(all) => all.join(grams),
                None => grams,
            });
        }
        Ok(SiteData::Streamed {
            grams: all.expect("a run holds a batch"),
            from_float_model,
        })
    }

    /// The site's inputs and targets, held. With targets from the float model, each batch's
    /// float input is dropped once its targets are computed (a split separable convolution
    /// keeps them: its depthwise half targets them), so the layer holds `samples x (input +
    /// output size)` floats, not `2 x input` more.
    fn held(
        &self,
        work: &M,
        at: (usize, &Site<B>),
        first: Flow<B>,
    ) -> Result<Held<B>, AdaRoundError> {
        let site = at.1;
        let inputs = std::iter::once(Ok(first))
            .chain((1..self.batches.len()).map(|b| self.capture(work, at, b, false)))
            .collect::<Result<Vec<_>, _>>()?;
        let float_act = self.config.target == Target::FloatModel;
        let finite = |inputs: &[Flow<B>], targets: &[Flow<B>]| {
            let ok = flows_finite(inputs) && flows_finite(targets);
            ensure_finite(ok, &site.name, "inputs or float outputs")
        };
        if self.float_model.is_none() {
            let targets = targets(site, &inputs, float_act);
            finite(&inputs, &targets)?;
            return Ok(Held {
                inputs,
                float_inputs: None,
                targets,
                from_float_model: false,
            });
        }
        let split = matches!(site.layer, QuantizedLayer::SeparableConv2d(_))
            && self.config.separable == SeparableStep::Split;
        let mut float_inputs = Vec::new();
        let mut all_targets = Vec::with_capacity(self.batches.len());
        for b in 0..self.batches.len() {
            let x = [self.capture(work, at, b, true)?];
            all_targets.extend(targets(site, &x, float_act));
            if split {
                float_inputs.extend(x);
            }
        }
        finite(&inputs, &all_targets)?;
        Ok(Held {
            inputs,
            float_inputs: split.then_some(float_inputs),
            targets: all_targets,
            from_float_model: true,
        })
    }
}

/// The forward pass's stages and, for block reconstruction, the same stages on `Autodiff<B>`.
type StagesAndBlocks<'s, 'a, B, M> = (&'s [Stage<'a, B, M>], Option<&'s dyn Blocks<B, M>>);

fn run<'a, B, M, F, O, const D: usize>(
    model: &M,
    samples: Tensor<B, D>,
    forward: F,
    config: &'a AdaRoundConfig,
    optimizers: &'a mut dyn Optimizers<B>,
    progress: &'a mut (dyn FnMut(Progress<'_>) + 'a),
    (stages, blocks): StagesAndBlocks<'_, 'a, B, M>,
) -> Result<(M, AdaRoundReport), AdaRoundError>
where
    B: Backend,
    M: Module<B>,
    F: Fn(&M, Tensor<B, D>) -> O,
    O: ModelOutput<B>,
{
    let start = Instant::now();
    config.validate()?;
    check_blocks(blocks, stages.len())?;
    let checkpoint = config.run.checkpoint.as_deref();
    let checkpoint = checkpoint.map(Checkpoint::open).transpose()?;
    let given = samples.dims()[0];
    let batches = split_batches(samples, config.batch_size)?;
    let n_samples = batches.len() * batches[0].dims()[0];
    let index = ParamIndex::of::<B, M>(model);
    let sites = discover(model, &batches[0], &forward, &index, config)?;
    let names: Vec<String> = sites.iter().map(|s| s.name.clone()).collect();
    let context = (&batches[..], &forward, &index, config);
    let (mut work, mut layers, fingerprint) =
        start_from(checkpoint.as_ref(), model, &sites, context)?;
    let run = Run::new(model, (batches, forward), config, (stages, &sites))?;
    let start_at = layers.len();
    let end_at = (config.run.stop_after).map_or(sites.len(), |n| (start_at + n).min(sites.len()));
    let mut ctx = Context {
        config,
        optimizers,
        progress,
        index: 0,
        layers: end_at - start_at,
    };
    let mut i = start_at;
    while i < end_at {
        ctx.index = i - start_at;
        let reports;
        (work, reports) = match (blocks, &run.staged) {
            (Some(blocks), Some(staged)) => round_block(
                &run,
                (blocks, staged),
                work,
                (i, &sites, start_at),
                &mut ctx,
            )?,
            _ => {
                let (work, report) = optimize_layer(&run, work, (i, &sites[i]), &mut ctx)?;
                (work, vec![report])
            }
        };
        i += reports.len();
        layers.extend(reports);
        if let (Some(checkpoint), Some(fingerprint)) = (&checkpoint, &fingerprint) {
            checkpoint.save(&work, &layers, &names, config, fingerprint)?;
        }
    }
    let mut phases = progress::Phases::new("model");
    let (work, check) = check_model(model, work, &sites, &run, end_at == sites.len())?;
    phases.mark("guard checked in");
    let report = AdaRoundReport {
        config: config.clone(),
        samples: n_samples,
        samples_left_out: given - n_samples,
        layers,
        seconds: start.elapsed().as_secs_f64(),
        model: check,
    };
    Ok((work, report))
}

/// Block reconstruction takes one block per stage.
fn check_blocks<B: Backend, M>(
    blocks: Option<&dyn Blocks<B, M>>,
    stages: usize,
) -> Result<(), AdaRoundError> {
    match blocks.filter(|b| b.len() != stages) {
        Some(blocks) => Err(AdaRoundError::Stages(format!(
            "{} blocks for {stages} stages: block reconstruction takes the stages, on the autodiff backend",
            blocks.len()
        ))),
        None => Ok(()),
    }
}

/// The run's start: with a checkpoint, the model and reports it holds where this run's
/// model, samples and configuration wrote it (else `model` and no reports), and the
/// fingerprint to write it with.
#[allow(clippy::type_complexity)]
fn start_from<B, M, F, O, const D: usize>(
    checkpoint: Option<&Checkpoint>,
    model: &M,
    sites: &[Site<B>],
    (batches, forward, index, config): (&[Tensor<B, D>], &F, &ParamIndex, &AdaRoundConfig),
) -> Result<(M, Vec<LayerReport>, Option<Fingerprint>), AdaRoundError>
where
    B: Backend,
    M: Module<B>,
    F: Fn(&M, Tensor<B, D>) -> O,
    O: ModelOutput<B>,
{
    let Some(checkpoint) = checkpoint else {
        return Ok((model.clone(), Vec::new(), None));
    };
    let settings = settings_json(sites, model, &batches[0], forward)?;
    let fingerprint = Fingerprint::of(model, &settings, batches);
    let context = (&batches[0], forward, index, config);
    let (work, layers) = resume(checkpoint, &fingerprint, model, sites, context)?
        .unwrap_or_else(|| (model.clone(), Vec::new()));
    Ok((work, layers, Some(fingerprint)))
}

/// The layers of the stage that site `i` opens, rounded as one block (after each on its own
/// with [`BlockInit::LayerWise`]); `start_at` is the run's first site.
fn round_block<B, M, F, O, const D: usize>(
    run: &Run<'_, '_, B, M, F, D>,
    (blocks, staged): (&dyn Blocks<B, M>, &Staged<'_, '_, B, M>),
    mut work: M,
    (i, sites, start_at): (usize, &[Site<B>], usize),
    ctx: &mut Context<'_, B>,
) -> Result<(M, Vec<LayerReport>), AdaRoundError>
where
    B: Backend,
    M: Module<B>,
    F: Fn(&M, Tensor<B, D>) -> O,
    O: ModelOutput<B>,
{
    let stage = staged.stage_of(i);
    let group: Vec<_> = (i..sites.len())
        .take_while(|&j| staged.stage_of(j) == stage)
        .map(|j| (j, &sites[j]))
        .collect();
    let nearest = work.clone();
    let mut layer_wise = Vec::new();
    if run.config.block.init == BlockInit::LayerWise {
        for &(j, site) in &group {
            ctx.index = j - start_at;
            let report;
            (work, report) = optimize_layer(run, work, (j, site), ctx)?;
            layer_wise.push(report);
        }
        ctx.index = i - start_at;
    }
    let float_model = run.float_model.as_ref();
    let (inputs, targets) = staged.block_data((&work, float_model), stage)?;
    let block = Block {
        stage,
        sites: group,
        inputs,
        targets,
    };
    let (work, mut reports) = optimize_block((blocks, staged), (&nearest, work), &block, ctx)?;
    scales_of_start(&mut reports, &layer_wise, run.config);
    Ok((work, reports))
}

/// With [`ScaleSearch::SeqMse`], each block kernel's report says the grid it was written on:
/// that of its layer-wise start (`layer_wise`, the block's layers in order), or the
/// quantizer's own from [`BlockInit::Fractional`] (SeqMSE not applied).
fn scales_of_start(
    reports: &mut [LayerReport],
    layer_wise: &[LayerReport],
    config: &AdaRoundConfig,
) {
    if config.scale_search != ScaleSearch::SeqMse {
        return;
    }
    if layer_wise.is_empty() {
        if let Some(first) = reports.first() {
            log::warn!(
                "block from {}: BlockInit::Fractional starts on the quantizers' own grids; \
                 SeqMSE's scales are searched only for BlockInit::LayerWise",
                first.name
            );
        }
    }
    for (k, report) in reports.iter_mut().enumerate() {
        for (i, kernel) in report.kernels.iter_mut().enumerate() {
            kernel.scales = match layer_wise.get(k) {
                Some(start) => start.kernels.get(i).and_then(|s| s.scales.clone()),
                None => Some(ScaleOutcome::NotApplicable),
            };
        }
    }
}

/// The model-level guard, once the last layer is `finished` (see [`ModelGuard`]).
fn check_model<B, M, F, O, const D: usize>(
    nearest: &M,
    rounded: M,
    sites: &[Site<B>],
    run: &Run<'_, '_, B, M, F, D>,
    finished: bool,
) -> Result<(M, Option<ModelCheck>), AdaRoundError>
where
    B: Backend,
    M: Module<B>,
    F: Fn(&M, Tensor<B, D>) -> O,
    O: ModelOutput<B>,
{
    let mode = run.config.model_guard;
    if mode == ModelGuard::Off || !finished {
        return Ok((rounded, None));
    }
    match Reference::new(nearest, &run.batches, &run.forward)? {
        Some(reference) => {
            let (model, check) = guard::apply(&reference, nearest, rounded, sites, mode)?;
            Ok((model, Some(check)))
        }
        None => Ok((rounded, None)),
    }
}

/// The model and finished layers of the checkpoint, if it holds one of this run. What was
/// loaded is checked like the caller's model: finite weights, valid quantizers, and the very
/// quantizers the run was started with.
fn resume<B, M, F, O, const D: usize>(
    checkpoint: &Checkpoint,
    fingerprint: &Fingerprint,
    work: &M,
    sites: &[Site<B>],
    (batch, forward, index, config): (&Tensor<B, D>, &F, &ParamIndex, &AdaRoundConfig),
) -> Result<Option<(M, Vec<LayerReport>)>, AdaRoundError>
where
    B: Backend,
    M: Module<B>,
    F: Fn(&M, Tensor<B, D>) -> O,
{
    let device = batch.device();
    let names: Vec<String> = sites.iter().map(|s| s.name.clone()).collect();
    let found = checkpoint.resume(work.clone(), &names, config, fingerprint, &device)?;
    let Some((state, done)) = found else {
        return Ok(None);
    };
    let loaded = discover(&state, batch, forward, index, config)?;
    if checksum(settings_json(&loaded, &state, batch, forward)?.as_bytes())
        != fingerprint.quantizers
    {
        return Err(AdaRoundError::CheckpointMismatch {
            dir: checkpoint.dir.display().to_string(),
            what: "quantizers in the checkpoint",
        });
    }
    for (i, (float, loaded)) in sites.iter().zip(&loaded).enumerate() {
        if !is_state_of(&float.layer, &loaded.layer, i < done.len()) {
            let state = if i < done.len() {
                "a rounding of its float weights"
            } else {
                "its float weights (not yet rounded)"
            };
            return Err(AdaRoundError::Checkpoint(format!(
                "{}: layer `{}` of its model file is not {state}",
                checkpoint.dir.display(),
                float.name
            )));
        }
    }
    info!(
        "resuming after {} finished layers from {}",
        done.len(),
        checkpoint.dir.display()
    );
    Ok(Some((state, done)))
}

/// The settings a checkpoint's fingerprint hashes besides the float weights: the quantizers
/// of every site and the bitwidth and range of every quantized activation `forward` runs on
/// `batch`, as JSON.
fn settings_json<B, M, F, O, const D: usize>(
    sites: &[Site<B>],
    model: &M,
    batch: &Tensor<B, D>,
    forward: &F,
) -> Result<String, AdaRoundError>
where
    B: Backend,
    M: Module<B>,
    F: Fn(&M, Tensor<B, D>) -> O,
{
    let activations = activations(model, batch, forward)?;
    let activations = serde_json::to_string(&activations).expect("numbers serialize");
    Ok(format!("{}{activations}", quantizers_json(sites)))
}

/// The quantizers of every site, as JSON.
fn quantizers_json<B: Backend>(sites: &[Site<B>]) -> String {
    let quantizers: Vec<Vec<_>> = sites
        .iter()
        .map(|s| {
            s.layer
                .slots()
                .iter()
                .map(|q| q.quantizer().clone())
                .collect()
        })
        .collect();
    serde_json::to_string(&quantizers).expect("quantizers serialize")
}

/// Optimises one site of `work` and writes its rounded kernels back.
fn optimize_layer<B, M, F, O, const D: usize>(
    run: &Run<'_, '_, B, M, F, D>,
    work: M,
    (i, site): (usize, &Site<B>),
    ctx: &mut Context<'_, B>,
) -> Result<(M, LayerReport), AdaRoundError>
where
    B: Backend,
    M: Module<B>,
    F: Fn(&M, Tensor<B, D>) -> O,
    O: ModelOutput<B>,
{
    let layer_start = Instant::now();
    let started = Progress::LayerStarted {
        index: ctx.index,
        layers: ctx.layers,
        name: &site.name,
    };
    info!("{}", progress::line(&started));
    progress::emit(ctx.progress, started)?;
    let mut phases = progress::Phases::new(&site.name);
    let data = run.data(&work, (i, site))?;
    phases.mark("inputs and targets captured in");
    let (mut report, rounded) = optimize_site(site, &data, ctx)?;
    drop(data);
    let values = rounded
        .param_values()
        .into_iter()
        .collect::<HashMap<_, _>>();
    let work = work.map(&mut WriteBack { values });
    phases.mark("optimised and written back in");
    report.seconds = layer_start.elapsed().as_secs_f64();
    let finished = Progress::LayerFinished {
        index: ctx.index,
        layers: ctx.layers,
        report: &report,
    };
    info!("{}", progress::line(&finished));
    progress::emit(ctx.progress, finished)?;
    Ok((work, report))
}

fn split_batches<B: Backend, const D: usize>(
    samples: Tensor<B, D>,
    batch_size: Option<usize>,
) -> Result<Vec<Tensor<B, D>>, AdaRoundError> {
    let n = samples.dims()[0];
    if n == 0 || samples.shape().num_elements() == 0 {
        return Err(AdaRoundError::NoSamples);
    }
    if !all_finite(&samples) {
        return Err(AdaRoundError::NonFiniteInputs);
    }
    if B::ad_enabled(&samples.device()) {
        return Err(AdaRoundError::AutodiffModel);
    }
    let batch = batch_size.unwrap_or(n);
    if batch > n {
        return Err(AdaRoundError::TooFewSamples {
            samples: n,
            batch_size: batch,
        });
    }
    if !n.is_multiple_of(batch) {
        log::warn!(
            "{} of {n} calibration samples do not fill a batch of {batch} and are left out",
            n % batch
        );
    }
    Ok((0..n / batch)
        .map(|i| samples.clone().narrow(0, i * batch, batch))
        .collect())
}
