//! Optimising one layer of the model: its data, and a separable convolution as one problem
//! or as two.

use adaround_layers::{
    probe::Flow, KernelRole, QuantizedConv2d, QuantizedLayer, QuantizedReLU,
    QuantizedSeparableConv2d,
};
use burn::tensor::backend::Backend;

use crate::{
    discover::Site,
    gram::Grams,
    optimize::{optimize_unit, Context},
    unit::{layer_error, Samples, Unit},
    AdaRoundError, LayerReport, SeparableStep,
};

/// The layer's data.
pub(crate) enum SiteData<B: Backend> {
    Held(Held<B>),
    /// The layer's Gram matrices, accumulated batch by batch ([`Samples::Streamed`]), with
    /// targets from the float model's inputs or not.
    Streamed {
        grams: Grams<B>,
        from_float_model: bool,
    },
}

/// Inputs from the model being rounded and targets as configured, held per batch.
pub(crate) struct Held<B: Backend> {
    /// Inputs from the model being rounded (earlier layers rounded), one per batch.
    pub inputs: Vec<Flow<B>>,
    /// The float model's inputs to the layer (`Target::FloatModel`), one per batch; kept for
    /// a split separable convolution only.
    pub float_inputs: Option<Vec<Flow<B>>>,
    /// The float layer's outputs on the target inputs (after the activation, if any).
    pub targets: Vec<Flow<B>>,
    /// Whether the targets come from the float model's inputs (`Target::FloatModel`), not
    /// from `inputs`.
    pub from_float_model: bool,
}

/// Optimises `site` and returns its report and the rounded layer.
pub(crate) fn optimize_site<B: Backend>(
    site: &Site<B>,
    data: &SiteData<B>,
    ctx: &mut Context<'_, B>,
) -> Result<(LayerReport, QuantizedLayer<B>), AdaRoundError> {
    let unit = |samples, from_float_model: bool| Unit {
        name: &site.name,
        layer: site.layer.clone(),
        activation: site.activation.clone(),
        relu: site.relu,
        samples,
        same_inputs: !from_float_model,
    };
    let (mut report, layer) = match (data, &site.layer, ctx.config.separable) {
        (
            SiteData::Streamed {
                grams,
                from_float_model,
            },
            _,
            _,
        ) => optimize_unit(unit(Samples::Streamed(grams), *from_float_model), ctx)?,
        (SiteData::Held(data), QuantizedLayer::SeparableConv2d(l), SeparableStep::Split) => {
            optimize_split(site, l, data, ctx)?
        }
        (SiteData::Held(data), _, _) => {
            let samples = Samples::Held {
                inputs: &data.inputs,
                targets: &data.targets,
            };
            optimize_unit(unit(samples, data.from_float_model), ctx)?
        }
    };
    report.position = site.position;
    Ok((report, layer))
}

fn conv<B: Backend>(layer: QuantizedLayer<B>) -> QuantizedConv2d<B> {
    match layer {
        QuantizedLayer::Conv2d(l) => l,
        other => unreachable!(
            "a half of a separable conv is a Conv2d, got {:?}",
            other.kind()
        ),
    }
}

/// The depthwise half, then the pointwise half on the rounded depthwise outputs (AIMET's
/// treatment): each a Conv2D problem with its own Gram matrices and fused step.
fn optimize_split<B: Backend>(
    site: &Site<B>,
    layer: &QuantizedSeparableConv2d<B>,
    data: &Held<B>,
    ctx: &mut Context<'_, B>,
) -> Result<(LayerReport, QuantizedLayer<B>), AdaRoundError> {
    let (dw, pw) = layer.clone().split();
    let (dw, pw) = (QuantizedLayer::Conv2d(dw), QuantizedLayer::Conv2d(pw));
    let float_targets = data.float_inputs.as_ref();
    let dw_targets: Vec<_> = float_targets
        .unwrap_or(&data.inputs)
        .iter()
        .map(|x| dw.forward_float_flow(x.clone()))
        .collect();
    let name = format!("{}.depthwise", site.name);
    let unit = Unit {
        name: &name,
        layer: dw,
        activation: None,
        relu: None,
        samples: Samples::Held {
            inputs: &data.inputs,
            targets: &dw_targets,
        },
        same_inputs: float_targets.is_none(),
    };
    let (dw_report, dw) = optimize_unit(unit, ctx)?;
    drop(dw_targets);

    let pw_inputs: Vec<_> = data
        .inputs
        .iter()
        .map(|x| dw.forward_flow(x.clone()))
        .collect();
    let act = site.activation.as_ref();
    // Quantized-inputs targets: the float pointwise on the rounded depthwise outputs (the Gram
    // form is exact); float-model targets: the float layer's own outputs.
    let pw_targets: Option<Vec<_>> = float_targets.is_none().then(|| {
        let float = |x: &Flow<B>| activate_float(&pw, act, x.clone());
        pw_inputs.iter().map(float).collect()
    });
    let name = format!("{}.pointwise", site.name);
    let unit = Unit {
        name: &name,
        layer: pw,
        activation: site.activation.clone(),
        relu: site.relu,
        samples: Samples::Held {
            inputs: &pw_inputs,
            targets: pw_targets.as_ref().unwrap_or(&data.targets),
        },
        same_inputs: float_targets.is_none(),
    };
    let (pw_report, pw) = optimize_unit(unit, ctx)?;
    let joined =
        QuantizedLayer::SeparableConv2d(QuantizedSeparableConv2d::join(conv(dw), conv(pw)));
    Ok(merge(
        site,
        data,
        joined,
        [dw_report, pw_report],
        ctx.config.never_worse,
    ))
}

/// `layer` with float kernels on `x`, through the activation in its float mode if the
/// targets are the float model's, else quantized (as the driver's targets).
fn activate_float<B: Backend>(
    layer: &QuantizedLayer<B>,
    activation: Option<&QuantizedReLU<B>>,
    x: Flow<B>,
) -> Flow<B> {
    let out = layer.forward_float_flow(x);
    match activation {
        Some(act) => act.forward_flow(out, false),
        None => out,
    }
}

/// One report for the separable layer from its halves' reports, errors measured on the whole
/// layer; with `never_worse`, nearest rounding is kept if the whole layer ended worse.
fn merge<B: Backend>(
    site: &Site<B>,
    data: &Held<B>,
    joined: QuantizedLayer<B>,
    [dw, pw]: [LayerReport; 2],
    never_worse: bool,
) -> (LayerReport, QuantizedLayer<B>) {
    let act = (site.activation.as_ref(), site.relu);
    let err_before = layer_error(&site.layer, act, &data.inputs, &data.targets);
    let err_final = layer_error(&joined, act, &data.inputs, &data.targets);
    let kept_nearest =
        (dw.kept_nearest && pw.kept_nearest) || (never_worse && err_final > err_before);
    let roles = [KernelRole::Depthwise, KernelRole::Pointwise];
    let kernels = [dw.kernels, pw.kernels]
        .into_iter()
        .zip(roles)
        .flat_map(|(kernels, role)| {
            kernels.into_iter().map(move |mut kernel| {
                kernel.change.kernel = role;
                kernel.change.changed *= usize::from(!kept_nearest);
                kernel
            })
        })
        .collect();
    let report = LayerReport {
        name: site.name.clone(),
        kind: site.layer.kind(),
        path: pw.path,
        fused: dw.fused && pw.fused,
        position: site.position,
        weights: dw.weights + pw.weights,
        err_before,
        err_after: err_final,
        err_final: if kept_nearest { err_before } else { err_final },
        steps: dw.steps + pw.steps,
        early_stop: dw.early_stop && pw.early_stop,
        kept_nearest,
        refined: dw.refined + pw.refined,
        final_reconstruction_loss: pw.final_reconstruction_loss,
        final_rounding_loss: pw.final_rounding_loss,
        kernels,
        history: dw.history.into_iter().chain(pw.history).collect(),
        seconds: 0.0,
        block: None,
    };
    let layer = if kept_nearest {
        site.layer.clone()
    } else {
        joined
    };
    (report, layer)
}

/// The float outputs of the layer on `inputs` (after the activation, float or quantized).
pub(crate) fn targets<B: Backend>(
    site: &Site<B>,
    inputs: &[Flow<B>],
    float_activation: bool,
) -> Vec<Flow<B>> {
    inputs
        .iter()
        .map(|x| {
            let out = site.layer.forward_float_flow(x.clone());
            match &site.activation {
                Some(act) => act.forward_flow(out, float_activation),
                None => out,
            }
        })
        .collect()
}
