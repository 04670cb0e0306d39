use std::{collections::HashMap, time::Instant};

use adaround_core::{all_finite, Schedule};
use adaround_layers::{probe::Flow, QuantizedLayer, QuantizedReLU};
use burn::{
    module::Module,
    optim::{AdamConfig, GradientsParams, Optimizer},
    tensor::{
        backend::{AutodiffBackend, Backend},
        ElementConversion, Tensor,
    },
};
use log::{debug, info};

use crate::{
    capture::{self, Capture, Discover, Seen},
    fused,
    gram::{self, LossPath},
    params::{ParamIndex, RestoreGrad, WriteBack},
    AdaRoundConfig, AdaRoundError, AdaRoundReport, KernelReport, LayerReport, ReconstructionLoss,
    StepLog, Target, HISTOGRAM_BINS,
};

/// A layer to optimise, found by the discovery pass.
struct Site<B: Backend> {
    position: usize,
    name: String,
    layer: QuantizedLayer<B>,
    activation: Option<QuantizedReLU<B>>,
}

/// Optimises the rounding of every quantized layer of `model`, one layer at a time in
/// forward order, with Adam (learning rate from the config).
///
/// `forward` runs the model on a batch of samples, exactly as the user would; its output
/// is ignored. The driver finds the model's [quantized layers](adaround_layers) by running
/// it, so any graph works: sequential, residual, nested. Returns a new model and the
/// report; `model` itself is never modified.
///
/// Memory: each layer's inputs and targets for all samples are cached on the device while
/// the layer is optimised (`samples x (input + output size)` floats, twice with
/// [`Target::FloatModel`]).
pub fn adaround<B, M, F, O, const D: usize>(
    model: &M,
    samples: Tensor<B, D>,
    forward: F,
    config: &AdaRoundConfig,
) -> Result<(M, AdaRoundReport), AdaRoundError>
where
    B: AutodiffBackend,
    M: Module<B>,
    F: Fn(&M, Tensor<B, D>) -> O,
{
    run(
        model,
        samples,
        forward,
        config,
        || AdamConfig::new().init::<B, QuantizedLayer<B>>(),
        true,
    )
}

/// [`adaround`] with any Burn optimizer: `optimizer()` is called once per layer.
///
/// Every step then runs through Burn's autodiff and `optimizer`; [`adaround`] runs Dense and
/// Conv2D layers without a following activation with a fused step instead (the same loss,
/// an analytic gradient and Adam, without autodiff).
pub fn adaround_with_optimizer<B, M, F, O, Opt, const D: usize>(
    model: &M,
    samples: Tensor<B, D>,
    forward: F,
    config: &AdaRoundConfig,
    optimizer: impl FnMut() -> Opt,
) -> Result<(M, AdaRoundReport), AdaRoundError>
where
    B: AutodiffBackend,
    M: Module<B>,
    F: Fn(&M, Tensor<B, D>) -> O,
    Opt: Optimizer<QuantizedLayer<B>, B>,
{
    run(model, samples, forward, config, optimizer, false)
}

fn run<B, M, F, O, Opt, const D: usize>(
    model: &M,
    samples: Tensor<B, D>,
    forward: F,
    config: &AdaRoundConfig,
    mut optimizer: impl FnMut() -> Opt,
    fused: bool,
) -> Result<(M, AdaRoundReport), AdaRoundError>
where
    B: AutodiffBackend,
    M: Module<B>,
    F: Fn(&M, Tensor<B, D>) -> O,
    Opt: Optimizer<QuantizedLayer<B>, B>,
{
    let start = Instant::now();
    config.validate().map_err(AdaRoundError::InvalidConfig)?;
    let batches = split_batches(samples, config.batch_size)?;
    let n_samples = batches.len() * batches[0].dims()[0];

    let index = ParamIndex::of::<B, M>(model);
    let mut work = model.clone().no_grad();
    let sites = discover(&work, &batches[0], &forward, &index, config)?;
    let float_model = (config.target == Target::FloatModel).then(|| work.clone());

    let names: Vec<String> = sites.iter().map(|s| s.name.clone()).collect();
    let checkpoint = config
        .checkpoint
        .as_deref()
        .map(crate::checkpoint::Checkpoint::new);
    let mut layers = Vec::with_capacity(sites.len());
    if let Some(checkpoint) = &checkpoint {
        if let Some((model_state, done)) =
            checkpoint.resume(work.clone(), &names, config, &batches[0].device())?
        {
            info!(
                "resuming after {} finished layers from {}",
                done.len(),
                checkpoint.dir.display()
            );
            work = model_state;
            layers = done;
        }
    }
    let start_at = layers.len();
    let end_at = config
        .stop_after
        .map_or(sites.len(), |n| (start_at + n).min(sites.len()));
    for site in &sites[start_at..end_at] {
        let layer_start = Instant::now();
        info!("Optimizing {}:", site.name);
        let inputs = capture_inputs(&work, &batches, &forward, site, false)?;
        let target_inputs = match &float_model {
            Some(float_model) => capture_inputs(float_model, &batches, &forward, site, true)?,
            None => inputs.clone(),
        };
        let float_act = config.target == Target::FloatModel;
        let targets: Vec<Flow<B>> = target_inputs
            .into_iter()
            .map(|x| activate(site, site.layer.forward_float_flow(x), float_act).detach())
            .collect();
        let (report, finalized) =
            optimize_layer(site, &inputs, &targets, config, optimizer(), fused)?;
        let mut report = report;
        if !report.kept_nearest {
            let values = finalized
                .kernel_values()
                .into_iter()
                .collect::<HashMap<_, _>>();
            work = work.map(&mut WriteBack { values });
        }
        report.seconds = layer_start.elapsed().as_secs_f64();
        layers.push(report);
        if let Some(checkpoint) = &checkpoint {
            checkpoint.save(&work, &layers, &names, config)?;
        }
    }

    let work = work.map(&mut RestoreGrad {
        require_grad: index.require_grad,
    });
    let report = AdaRoundReport {
        config: config.clone(),
        samples: n_samples,
        layers,
        seconds: start.elapsed().as_secs_f64(),
    };
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
    let batch = batch_size.unwrap_or(n);
    if batch > n {
        return Err(AdaRoundError::TooFewSamples {
            samples: n,
            batch_size: batch,
        });
    }
    let samples = samples.detach();
    Ok((0..n / batch)
        .map(|i| samples.clone().narrow(0, i * batch, batch))
        .collect())
}

/// Runs the model once and lists its quantized layers in forward order.
fn discover<B: Backend, M: Module<B>, F: Fn(&M, Tensor<B, D>) -> O, O, const D: usize>(
    model: &M,
    batch: &Tensor<B, D>,
    forward: &F,
    index: &ParamIndex,
    config: &AdaRoundConfig,
) -> Result<Vec<Site<B>>, AdaRoundError> {
    let probe = capture::run(Discover { events: Vec::new() }, || {
        forward(model, batch.clone())
    })?;
    let mut sites = Vec::new();
    let mut seen_ids = Vec::new();
    for (position, event) in probe.events.iter().enumerate() {
        let Seen::Layer { layer, output } = event else {
            continue;
        };
        let kernels = layer.kernels();
        let id = kernels[0].1;
        let name = index
            .owner(&id)
            .unwrap_or_else(|| format!("layer{position}"));
        if seen_ids.contains(&id) {
            return Err(AdaRoundError::SharedLayer { layer: name });
        }
        seen_ids.push(id);
        if !layer.is_quantizing() {
            continue;
        }
        if !layer.kernel_values().iter().all(|(_, w)| all_finite(w)) {
            return Err(AdaRoundError::NonFiniteWeights { layer: name });
        }
        let activation = match probe.events.get(position + 1) {
            Some(Seen::Activation { activation, input }) if same_values(input, output) => {
                Some(activation.clone())
            }
            _ => None,
        };
        if config.include_activation && activation.is_none() {
            return Err(AdaRoundError::NoFollowingActivation { layer: name });
        }
        let activation = activation.filter(|_| config.include_activation);
        sites.push(Site {
            position,
            name,
            layer: (**layer).clone(),
            activation,
        });
    }
    if sites.is_empty() {
        return Err(AdaRoundError::NoQuantizedLayer);
    }
    Ok(sites)
}

fn same_values<B: Backend>(a: &Flow<B>, b: &Flow<B>) -> bool {
    a.dims() == b.dims() && {
        let diff = (a.clone().flatten() - b.clone().flatten())
            .abs()
            .max()
            .into_scalar();
        diff.elem::<f64>() == 0.0
    }
}

/// The layer's input for every batch, from the model's own forward pass.
fn capture_inputs<B: Backend, M, F: Fn(&M, Tensor<B, D>) -> O, O, const D: usize>(
    model: &M,
    batches: &[Tensor<B, D>],
    forward: &F,
    site: &Site<B>,
    float: bool,
) -> Result<Vec<Flow<B>>, AdaRoundError> {
    batches
        .iter()
        .map(|batch| {
            let probe = Capture {
                target: site.position,
                float,
                input: None,
            };
            let probe = capture::run(probe, || forward(model, batch.clone()))?;
            probe.input.ok_or_else(|| AdaRoundError::LayerNotReached {
                layer: site.name.clone(),
            })
        })
        .collect()
}

fn activate<B: Backend>(site: &Site<B>, x: Flow<B>, float: bool) -> Flow<B> {
    match &site.activation {
        Some(act) => act.forward_flow(x, float),
        None => x,
    }
}

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

/// Mean over batches of the MSE between the layer's outputs and the targets.
fn layer_error<B: Backend>(
    site: &Site<B>,
    layer: &QuantizedLayer<B>,
    inputs: &[Flow<B>],
    targets: &[Flow<B>],
) -> f64 {
    let total: f64 = inputs
        .iter()
        .zip(targets)
        .map(|(x, t)| {
            let out = activate(site, layer.forward_flow(x.clone()), false);
            let mse = reconstruction_loss(out, t.clone(), ReconstructionLoss::Mse);
            mse.into_scalar().elem::<f64>()
        })
        .sum();
    total / inputs.len() as f64
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

fn scalar<B: Backend>(t: Tensor<B, 1>) -> f64 {
    t.into_scalar().elem::<f64>()
}

/// The layer being optimised: by the fused step where it applies, else by autodiff and `optim`.
struct Runner<B: AutodiffBackend, Opt> {
    layer: QuantizedLayer<B>,
    optim: Opt,
    fused: Option<fused::Fused<B>>,
}

impl<B: AutodiffBackend, Opt> Runner<B, Opt> {
    fn current(&self) -> QuantizedLayer<B> {
        match &self.fused {
            Some(f) => f.layer(),
            None => self.layer.clone(),
        }
    }
}

fn optimize_layer<B: AutodiffBackend, Opt: Optimizer<QuantizedLayer<B>, B>>(
    site: &Site<B>,
    inputs: &[Flow<B>],
    targets: &[Flow<B>],
    config: &AdaRoundConfig,
    optim: Opt,
    fused: bool,
) -> Result<(LayerReport, QuantizedLayer<B>), AdaRoundError> {
    let err_before = layer_error(site, &site.layer, inputs, targets);
    let layer = site
        .layer
        .clone()
        .with_adaround(&config.params)
        .map_err(|source| AdaRoundError::Quantizer {
            layer: site.name.clone(),
            source,
        })?;
    let before: Vec<Vec<usize>> = layer
        .adarounds()
        .iter()
        .map(|a| histogram(a.decimals()))
        .collect();

    let path = choose_path(site, inputs, config);
    let grams = (path == LossPath::Gram).then(|| gram::grams(&site.layer, inputs, config.loss));

    let reg = config.params.reg;
    let lr = config.learning_rate;
    let n_batches = inputs.len();
    let fused = fused
        && site.activation.is_none()
        && gram::supports(&layer)
        && (path == LossPath::Gram || fused::patch_bytes(&layer, inputs) <= fused::MAX_PATCH_BYTES);
    info!(
        "{}: {:?} loss path, {} step",
        site.name,
        path,
        if fused { "fused" } else { "autodiff" }
    );
    let mut runner = Runner {
        fused: fused.then(|| {
            fused::Fused::new(layer.clone(), inputs, targets, grams.as_ref(), config.loss)
        }),
        layer,
        optim,
    };
    // One optimisation step on batch `b`; returns the (reconstruction, rounding) losses.
    let step = |runner: &mut Runner<B, Opt>, b: usize, beta: Option<f64>| {
        if let Some(f) = runner.fused.as_mut() {
            return f.step(b, beta, reg, lr);
        }
        let layer = runner.layer.clone();
        let rec = match &grams {
            Some(grams) => gram::loss(&layer, grams, b),
            None => {
                let out = activate(site, layer.forward_flow(inputs[b].clone()), false);
                reconstruction_loss(out, targets[b].clone(), config.loss)
            }
        };
        let round = match beta {
            Some(beta) => layer
                .adarounds()
                .iter()
                .map(|a| a.rounding_loss(beta))
                .reduce(|a, b| a + b)
                .map(|r| r.mul_scalar(reg)),
            None => None,
        };
        let total = match &round {
            Some(r) => rec.clone() + r.clone(),
            None => rec.clone(),
        };
        let grads = GradientsParams::from_grads(total.backward(), &layer);
        runner.layer = runner.optim.step(lr, layer, grads);
        (rec.inner(), round.map(|r| r.inner()))
    };

    let mut history = Vec::new();
    let mut log_step = |step: usize,
                        beta,
                        rec: Tensor<B::InnerBackend, 1>,
                        round: Option<Tensor<B::InnerBackend, 1>>,
                        layer: &QuantizedLayer<B>| {
        let entry = StepLog {
            step,
            beta,
            reconstruction: scalar(rec),
            rounding: round.map(scalar).unwrap_or(0.0),
            roamers: layer
                .adarounds()
                .iter()
                .map(|a| a.status().roamers)
                .collect(),
        };
        debug!("{}", epoch_line(&entry, layer));
        let losses = (entry.reconstruction, entry.rounding);
        history.push(entry);
        losses
    };
    let (mut steps, mut early_stop) = (0, false);
    let (mut last_rec, mut last_round) = (f64::NAN, f64::NAN);
    match config.schedule {
        Schedule::Epochs { epochs } => {
            for e in 0..epochs {
                let beta = config.schedule.beta(e, &config.params);
                let mut losses = None;
                for b in 0..n_batches {
                    losses = Some(step(&mut runner, b, beta));
                }
                steps = e + 1;
                let (rec, round) = losses.expect("at least one batch");
                (last_rec, last_round) = log_step(e + 1, beta, rec, round, &runner.current());
                if beta.unwrap_or(0.0) > 0.0 && last_round == 0.0 {
                    early_stop = true;
                    break;
                }
            }
        }
        Schedule::Iterations { iterations, .. } => {
            for it in 0..iterations {
                let beta = config.schedule.beta(it, &config.params);
                let (rec, round) = step(&mut runner, it % n_batches, beta);
                steps = it + 1;
                if (it + 1) % config.log_every == 0 || it + 1 == iterations {
                    (last_rec, last_round) = log_step(it + 1, beta, rec, round, &runner.current());
                    if beta.is_some() && last_round == 0.0 {
                        early_stop = true;
                        break;
                    }
                }
            }
        }
    }

    let layer = runner.current();
    let layer = layer.set_training(false);
    let err_after = layer_error(site, &layer, inputs, targets);
    let statuses: Vec<_> = layer.adarounds().iter().map(|a| a.status()).collect();
    let after: Vec<Vec<usize>> = layer
        .adarounds()
        .iter()
        .map(|a| histogram(a.decimals()))
        .collect();
    let hard = config.rounding == crate::FinalRounding::Hard;
    let (finalized, changes) = layer.finalize(hard);
    let err_final = layer_error(site, &finalized, inputs, targets);
    info!("quantization error: {err_before:.4} -> {err_after:.4}");
    let kept_nearest = config.never_worse && err_final > err_before;
    if kept_nearest {
        info!(
            "{}: AdaRound ended worse than nearest rounding; nearest kept",
            site.name
        );
    } else {
        for c in &changes {
            info!("Changed {} weights: {} / {}", c.kernel, c.changed, c.total);
        }
    }
    let kernels = changes
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
        .collect::<Vec<_>>();
    let report = LayerReport {
        name: site.name.clone(),
        kind: site.layer.kind(),
        path,
        fused,
        position: site.position,
        weights: site.layer.kernels().iter().map(|k| k.2).sum(),
        err_before,
        err_after,
        err_final: if kept_nearest { err_before } else { err_final },
        steps,
        early_stop,
        kept_nearest,
        final_reconstruction_loss: last_rec,
        final_rounding_loss: last_round,
        kernels,
        history,
        seconds: 0.0,
    };
    Ok((report, finalized))
}

/// The loss path of a layer: the Gram form needs no activation after the layer, targets
/// from the same inputs, and a Dense or Conv2D layer; `Auto` also needs it to be cheaper.
fn choose_path<B: Backend>(
    site: &Site<B>,
    inputs: &[Flow<B>],
    config: &AdaRoundConfig,
) -> LossPath {
    let exact = site.activation.is_none()
        && config.target == Target::QuantizedInputs
        && gram::supports(&site.layer);
    match config.path {
        LossPath::Direct => LossPath::Direct,
        LossPath::Gram if exact => LossPath::Gram,
        LossPath::Auto if exact => {
            let (k, positions) = gram::sizes(&site.layer, &inputs[0]);
            if positions > k {
                LossPath::Gram
            } else {
                LossPath::Direct
            }
        }
        _ => LossPath::Direct,
    }
}

fn epoch_line<B: Backend>(entry: &StepLog, layer: &QuantizedLayer<B>) -> String {
    let mut line = format!(
        "Epoch {} - loss (quantization|rounding) {:.8} | {:.8}",
        entry.step, entry.reconstruction, entry.rounding
    );
    for ada in layer.adarounds() {
        let s = ada.status();
        line += &format!(
            " - roamers: {} - ↓↑ [{:.2}, {:.2}]",
            s.roamers, s.floor_fraction, s.ceil_fraction
        );
    }
    line
}
