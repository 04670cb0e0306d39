//! Finding the layers to optimise, and capturing what flows into them.

use adaround_core::all_finite;
use adaround_layers::{probe::Flow, QuantizedLayer, QuantizedReLU};
use burn::{
    module::Module,
    tensor::{backend::Backend, ElementConversion, Tensor},
};

use crate::{
    capture::{self, Discover, Seen},
    params::ParamIndex,
    unit::Relu,
    AdaRoundConfig, AdaRoundError,
};

/// A layer to optimise, found by the discovery pass.
pub(crate) struct Site<B: Backend> {
    pub position: usize,
    pub name: String,
    pub layer: QuantizedLayer<B>,
    pub activation: Option<QuantizedReLU<B>>,
    /// The ReLU the loss compares after (`relu_loss`).
    pub relu: Option<Relu>,
}

/// Runs the model once and lists its quantized layers in forward order.
pub(crate) fn discover<
    B: Backend,
    M: Module<B>,
    F: Fn(&M, Tensor<B, D>) -> O,
    O,
    const D: usize,
>(
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
        let id = layer.kernels()[0].id;
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
        // Every quantizer valid and its scale factors computable (a custom function
        // registered, returning positive finite values), before any layer is optimised.
        if let Err(source) = (**layer).clone().with_adaround(&config.params) {
            return Err(AdaRoundError::Quantizer {
                layer: name,
                source,
            });
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
        let relu = relu_after(config, activation.as_ref(), &name);
        sites.push(Site {
            position,
            name,
            layer: (**layer).clone(),
            activation: activation.filter(|_| config.include_activation),
            relu,
        });
    }
    if sites.is_empty() {
        return Err(AdaRoundError::NoQuantizedLayer);
    }
    check_relu_layers(config, &sites)?;
    Ok(sites)
}

/// The bitwidth and range of every quantized activation the forward pass runs, in order.
pub(crate) fn activations<B: Backend, M, F: Fn(&M, Tensor<B, D>) -> O, O, const D: usize>(
    model: &M,
    batch: &Tensor<B, D>,
    forward: &F,
) -> Result<Vec<(u32, f64)>, AdaRoundError> {
    let probe = capture::run::<B, _, _>(Discover { events: Vec::new() }, || {
        forward(model, batch.clone())
    })?;
    Ok(probe
        .events
        .iter()
        .filter_map(|event| match event {
            Seen::Activation { activation, .. } => {
                Some((activation.bitwidth, activation.max_value))
            }
            Seen::Layer { .. } => None,
        })
        .collect())
}

/// The ReLU the loss of layer `name` compares after (`relu_loss`): the quantized ReLU found
/// after the layer, in its float form, else a plain ReLU the caller named.
fn relu_after<B: Backend>(
    config: &AdaRoundConfig,
    activation: Option<&QuantizedReLU<B>>,
    name: &str,
) -> Option<Relu> {
    match activation {
        _ if !config.relu_loss => None,
        Some(act) => Some(Relu {
            max: Some(act.max_value),
        }),
        None => config
            .relu_layers
            .iter()
            .any(|n| n == name)
            .then_some(Relu { max: None }),
    }
}

/// `UnknownLayer` for the first name in `relu_layers` that is not one of `sites`.
fn check_relu_layers<B: Backend>(
    config: &AdaRoundConfig,
    sites: &[Site<B>],
) -> Result<(), AdaRoundError> {
    match config
        .relu_layers
        .iter()
        .find(|name| !sites.iter().any(|site| &site.name == *name))
    {
        Some(name) => Err(AdaRoundError::UnknownLayer {
            name: name.clone(),
            known: sites
                .iter()
                .map(|site| site.name.as_str())
                .collect::<Vec<_>>()
                .join(", "),
        }),
        None => Ok(()),
    }
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
