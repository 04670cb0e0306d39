//! One optimisation step of a layer's rounding: by Burn's autodiff and an optimizer, or by
//! the fused closed form (`fused.rs`). The schedule loop sees only [`Step`]; where each
//! layer's optimizer comes from is an [`Optimizers`].

use std::collections::HashMap;

use adaround_core::RoundingStatus;
use adaround_layers::{probe::Flow, QuantizedLayer, QuantizedReLU};
use burn::{
    module::{AutodiffModule, Module},
    optim::{adaptor::OptimizerAdaptor, AdamConfig, GradientsParams, Optimizer, SimpleOptimizer},
    tensor::{backend::Backend, Tensor},
};

use crate::{
    gram::{self, Grams},
    params::RestoreGrad,
    ReconstructionLoss,
};

/// The autodiff backend the driver wraps around the user's backend for the autodiff step.
pub(crate) type Ad<B> = burn_autodiff::Autodiff<B>;

/// The reconstruction loss of a step and, with a `beta`, its weighted rounding loss.
pub(crate) type Losses<B> = (Tensor<B, 1>, Option<Tensor<B, 1>>);

/// A layer under optimisation.
pub(crate) trait Step<B: Backend> {
    /// One optimizer step on batch `b`; its losses when `report` (the schedule loop asks at
    /// log points only: the fused step then skips the reductions that only report).
    fn step(&mut self, b: usize, beta: Option<f64>, report: bool) -> Option<Losses<B>>;
    /// The rounding state of each armed kernel (reads the device).
    fn status(&self) -> Vec<RoundingStatus>;
    /// The layer with the current rounding variables.
    fn into_layer(self: Box<Self>) -> QuantizedLayer<B>;
}

/// A [`SimpleOptimizer`] and its state, on the fused step's alphas (`[g, C_out / g, K]`).
pub(crate) trait AlphaOptimizer<B: Backend> {
    /// `alpha` after one step on `grad` with learning rate `lr`.
    fn step(&mut self, lr: f64, alpha: Tensor<B, 3>, grad: Tensor<B, 3>) -> Tensor<B, 3>;
}

/// `S` with the state it carries from step to step.
struct Stateful<B: Backend, S: SimpleOptimizer<B>> {
    optimizer: S,
    state: Option<S::State<3>>,
}

impl<B: Backend, S: SimpleOptimizer<B>> AlphaOptimizer<B> for Stateful<B, S> {
    fn step(&mut self, lr: f64, alpha: Tensor<B, 3>, grad: Tensor<B, 3>) -> Tensor<B, 3> {
        let (alpha, state) = self.optimizer.step(lr, alpha, grad, self.state.take());
        self.state = state;
        alpha
    }
}

/// Where each layer's optimizer comes from.
pub(crate) trait Optimizers<B: Backend> {
    /// A new optimizer for the fused step, or `None` where this source only runs through
    /// autodiff.
    fn fused(&mut self) -> Option<Box<dyn AlphaOptimizer<B>>>;
    /// The autodiff step on `layer` (armed), with a new optimizer.
    fn autodiff(
        &mut self,
        layer: QuantizedLayer<B>,
        data: AutodiffData<B>,
        rates: (f64, f64),
    ) -> Box<dyn Step<B>>;
    /// Whether [`Self::fused`] gives Burn's Adam with its defaults, which a host-resident
    /// step ([`Elementwise::Resident`](crate::Elementwise::Resident)) runs itself.
    fn default_adam(&self) -> bool {
        false
    }
}

/// Burn's Adam with its defaults, the driver's default optimizer.
pub(crate) struct DefaultAdam;

impl<B: Backend> Optimizers<B> for DefaultAdam {
    fn fused(&mut self) -> Option<Box<dyn AlphaOptimizer<B>>> {
        SimpleOptimizers(|| AdamConfig::new().build()).fused()
    }

    fn autodiff(
        &mut self,
        layer: QuantizedLayer<B>,
        data: AutodiffData<B>,
        rates: (f64, f64),
    ) -> Box<dyn Step<B>> {
        SimpleOptimizers(|| AdamConfig::new().build()).autodiff(layer, data, rates)
    }

    fn default_adam(&self) -> bool {
        true
    }
}

/// A [`SimpleOptimizer`] factory: the fused step runs it on plain tensors wherever a layer
/// has a fused step; elsewhere autodiff runs it through Burn's [`OptimizerAdaptor`].
pub(crate) struct SimpleOptimizers<F>(pub F);

impl<B, S, F> Optimizers<B> for SimpleOptimizers<F>
where
    B: Backend,
    S: SimpleOptimizer<B> + 'static,
    F: FnMut() -> S,
{
    fn fused(&mut self) -> Option<Box<dyn AlphaOptimizer<B>>> {
        Some(Box::new(Stateful {
            optimizer: (self.0)(),
            state: None,
        }))
    }

    fn autodiff(
        &mut self,
        layer: QuantizedLayer<B>,
        data: AutodiffData<B>,
        (reg, lr): (f64, f64),
    ) -> Box<dyn Step<B>> {
        let optim: OptimizerAdaptor<S, QuantizedLayer<Ad<B>>, Ad<B>> = (self.0)().into();
        Box::new(AutodiffStep::new(layer, optim, data, reg, lr))
    }
}

/// A module-optimizer factory: every layer steps through autodiff.
pub(crate) struct ModuleOptimizers<F>(pub F);

impl<B, Opt, F> Optimizers<B> for ModuleOptimizers<F>
where
    B: Backend,
    Opt: Optimizer<QuantizedLayer<Ad<B>>, Ad<B>> + 'static,
    F: FnMut() -> Opt,
{
    fn fused(&mut self) -> Option<Box<dyn AlphaOptimizer<B>>> {
        None
    }

    fn autodiff(
        &mut self,
        layer: QuantizedLayer<B>,
        data: AutodiffData<B>,
        (reg, lr): (f64, f64),
    ) -> Box<dyn Step<B>> {
        Box::new(AutodiffStep::new(layer, (self.0)(), data, reg, lr))
    }
}

/// What the autodiff step computes its reconstruction loss from.
pub(crate) struct AutodiffData<B: Backend> {
    pub inputs: Vec<Flow<Ad<B>>>,
    pub targets: Vec<Flow<Ad<B>>>,
    pub grams: Option<Grams<Ad<B>>>,
    pub activation: Option<QuantizedReLU<Ad<B>>>,
    /// The ReLU the outputs go through before the loss (the targets already have).
    pub relu: Option<crate::unit::Relu>,
    pub loss: ReconstructionLoss,
}

/// The autodiff step: the layer on `Autodiff<B>`, only its alphas tracked.
pub(crate) struct AutodiffStep<B: Backend, Opt> {
    layer: QuantizedLayer<Ad<B>>,
    optim: Opt,
    data: AutodiffData<B>,
    reg: f64,
    lr: f64,
}

/// `flow` on the autodiff backend, as a constant.
pub(crate) fn lift<B: Backend>(flow: &Flow<B>) -> Flow<Ad<B>> {
    match flow {
        Flow::Rows(t) => Flow::Rows(Tensor::from_inner(t.clone())),
        Flow::Maps(t) => Flow::Maps(Tensor::from_inner(t.clone())),
    }
}

impl<B: Backend, Opt: Optimizer<QuantizedLayer<Ad<B>>, Ad<B>>> AutodiffStep<B, Opt> {
    /// Takes over `layer` (AdaRound armed); only the alphas require gradients.
    pub(crate) fn new(
        layer: QuantizedLayer<B>,
        optim: Opt,
        data: AutodiffData<B>,
        reg: f64,
        lr: f64,
    ) -> Self {
        let alphas: HashMap<_, _> = layer
            .adarounds()
            .iter()
            .map(|a| (a.alpha.id, true))
            .collect();
        let layer = QuantizedLayer::<Ad<B>>::from_inner(layer)
            .no_grad()
            .map(&mut RestoreGrad {
                require_grad: alphas,
            });
        Self {
            layer,
            optim,
            data,
            reg,
            lr,
        }
    }

    fn reconstruction(&self, b: usize) -> Tensor<Ad<B>, 1> {
        let d = &self.data;
        match &d.grams {
            Some(grams) => gram::loss(&self.layer, grams, b),
            None => {
                let out = self.layer.forward_flow(d.inputs[b].clone());
                let out = match &d.activation {
                    Some(act) => act.forward_flow(out, false),
                    None => out,
                };
                let out = match d.relu {
                    Some(relu) => relu.flow(out),
                    None => out,
                };
                crate::unit::reconstruction_loss(out, d.targets[b].clone(), d.loss)
            }
        }
    }
}

impl<B: Backend, Opt: Optimizer<QuantizedLayer<Ad<B>>, Ad<B>>> Step<B> for AutodiffStep<B, Opt> {
    fn step(&mut self, b: usize, beta: Option<f64>, report: bool) -> Option<Losses<B>> {
        let rec = self.reconstruction(b);
        let round = beta.and_then(|beta| {
            self.layer
                .adarounds()
                .iter()
                .map(|a| a.rounding_loss(beta))
                .reduce(|a, b| a + b)
                .map(|r| r.mul_scalar(self.reg))
        });
        let total = match &round {
            Some(r) => rec.clone() + r.clone(),
            None => rec.clone(),
        };
        let grads = GradientsParams::from_grads(total.backward(), &self.layer);
        self.layer = self.optim.step(self.lr, self.layer.clone(), grads);
        report.then(|| (rec.inner(), round.map(|r| r.inner())))
    }

    fn status(&self) -> Vec<RoundingStatus> {
        self.layer.adarounds().iter().map(|a| a.status()).collect()
    }

    fn into_layer(self: Box<Self>) -> QuantizedLayer<B> {
        self.layer.valid()
    }
}
