//! The probes the driver installs in the user's forward pass.

use adaround_layers::{
    probe::{run_with_probe, Flow, Probe, ProbeAction, ProbeEvent, ProbeRun},
    QuantizedLayer, QuantizedReLU,
};
use std::collections::HashMap;

use burn::{module::Module, tensor::backend::Backend};

use crate::{params::WriteBack, AdaRoundError};

/// One event of the discovery pass.
pub(crate) enum Seen<B: Backend> {
    Layer {
        layer: Box<QuantizedLayer<B>>,
        output: Flow<B>,
    },
    Activation {
        activation: QuantizedReLU<B>,
        input: Flow<B>,
    },
}

/// Records every event of one forward pass.
pub(crate) struct Discover<B: Backend> {
    pub events: Vec<Seen<B>>,
}

impl<B: Backend> Probe<B> for Discover<B> {
    /// Float weights: a quantizer that cannot run (an unregistered custom one) is reported by
    /// the validation that follows, naming its layer, not as a failed forward pass.
    fn float_mode(&self) -> bool {
        true
    }

    fn wants(&self, _index: usize) -> bool {
        true
    }

    fn record(&mut self, _index: usize, event: ProbeEvent<B>) -> ProbeAction {
        self.events.push(match event {
            ProbeEvent::Layer { layer, output, .. } => Seen::Layer {
                layer: Box::new(layer),
                output: output.detach(),
            },
            ProbeEvent::Activation {
                activation, input, ..
            } => Seen::Activation {
                activation,
                input: input.detach(),
            },
        });
        ProbeAction::Continue
    }
}

/// Captures the input of the event at `target`, then stops the forward pass.
pub(crate) struct Capture<B: Backend> {
    pub target: usize,
    pub float: bool,
    pub input: Option<Flow<B>>,
}

impl<B: Backend> Probe<B> for Capture<B> {
    fn float_mode(&self) -> bool {
        self.float
    }

    fn wants(&self, index: usize) -> bool {
        index == self.target
    }

    fn record(&mut self, _index: usize, event: ProbeEvent<B>) -> ProbeAction {
        let (ProbeEvent::Layer { input, .. } | ProbeEvent::Activation { input, .. }) = event;
        self.input = Some(input.detach());
        ProbeAction::Stop
    }
}

/// The input of event `target` in the pass `forward` runs (`float`: every quantized layer with
/// its float weights); `LayerNotReached` naming `layer` if the pass never gets there.
pub(crate) fn input_of<B: Backend, R>(
    target: usize,
    float: bool,
    layer: &str,
    forward: impl FnOnce() -> R,
) -> Result<Flow<B>, AdaRoundError> {
    let probe = Capture {
        target,
        float,
        input: None,
    };
    let probe = run(probe, forward)?;
    probe.input.ok_or_else(|| AdaRoundError::LayerNotReached {
        layer: layer.to_string(),
    })
}

/// A forward pass that records nothing: float weights and activations everywhere
/// ([`Self::new`]`(true)`), the model as it is (`new(false)`), or float weights with
/// quantized activations ([`Self::frozen`], for a model from [`frozen`]).
pub(crate) struct Pass {
    float: bool,
    frozen: bool,
}

impl Pass {
    /// Float weights and activations (`float`), or the model as it is.
    pub fn new(float: bool) -> Self {
        Self {
            float,
            frozen: false,
        }
    }

    /// The kernels' own values (a [`frozen`] model's quantized weights), activations as
    /// they are.
    pub fn frozen() -> Self {
        Self {
            float: false,
            frozen: true,
        }
    }
}

impl<B: Backend> Probe<B> for Pass {
    fn float_mode(&self) -> bool {
        self.float || self.frozen
    }

    fn float_activations(&self) -> bool {
        self.float
    }

    fn wants(&self, _index: usize) -> bool {
        false
    }

    fn record(&mut self, _index: usize, _event: ProbeEvent<B>) -> ProbeAction {
        ProbeAction::Continue
    }
}

/// `model` with the kernel of every quantized layer that `forward` (a pass of `model`, on
/// one sample is enough) reaches replaced by its quantized weights, computed once. Run
/// under [`Pass::frozen`], it computes what `model` computes under `Pass::new(false)`
/// without the quantizers' work on every pass (the MSE quantizer's scale search). `None`
/// where a layer holds an AdaRound quantizer (whose weights are not its kernel's).
pub(crate) fn frozen<B: Backend, M: Module<B>, R>(
    model: &M,
    forward: impl FnOnce() -> R,
) -> Result<Option<M>, AdaRoundError> {
    let seen = run(Discover { events: Vec::new() }, forward)?;
    let layers: Vec<_> = seen
        .events
        .into_iter()
        .filter_map(|event| match event {
            Seen::Layer { layer, .. } => Some(layer),
            Seen::Activation { .. } => None,
        })
        .collect();
    if layers.iter().any(|l| !l.adarounds().is_empty()) {
        return Ok(None);
    }
    // Under a probe: a quantizer that fails is an error, not a panic.
    let (_, values) = run_returning::<B, _, _>(Pass::new(false), || {
        let kernels = layers.iter().flat_map(|l| l.kernels());
        kernels
            .map(|k| (k.id, k.slot.apply(k.weight.clone(), k.axis).flatten(0, 3)))
            .collect::<HashMap<_, _>>()
    })?;
    let values = values.expect("a pass that wants no event never stops");
    Ok(Some(model.clone().map(&mut WriteBack { values })))
}

/// Runs `forward` under `probe`; a panic becomes [`AdaRoundError::Forward`].
pub(crate) fn run<B: Backend, P: Probe<B>, R>(
    probe: P,
    forward: impl FnOnce() -> R,
) -> Result<P, AdaRoundError> {
    run_returning(probe, forward).map(|(probe, _)| probe)
}

/// [`run`] that also returns what `forward` returned (`None` when the probe stopped it).
pub(crate) fn run_returning<B: Backend, P: Probe<B>, R>(
    probe: P,
    forward: impl FnOnce() -> R,
) -> Result<(P, Option<R>), AdaRoundError> {
    let (probe, run) = run_with_probe::<B, P, R>(probe, forward);
    match run {
        ProbeRun::Completed(returned) => Ok((probe, Some(returned))),
        ProbeRun::Stopped => Ok((probe, None)),
        ProbeRun::Panicked(message) => Err(AdaRoundError::Forward(message)),
    }
}
