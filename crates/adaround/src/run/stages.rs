//! A forward pass cut into stages: a layer's input is captured by running the stage that
//! holds it from the stage's cached input, not the whole model from the samples.
//!
//! Without stages, capturing the inputs of layer `i` runs the model's first `i` layers on
//! every sample (twice with [`Target::FloatModel`](crate::Target::FloatModel)), so a run costs
//! about `L² / 2` layer passes for `L` layers. With stages, the driver keeps each batch's
//! input to the current stage, from the model rounded so far and (with float-model targets)
//! from the float model, and moves it one stage on once every layer before it is rounded: a
//! run costs about `L x stage length` layer passes, and holds two stage inputs per sample.

use std::cell::RefCell;

use adaround_layers::probe::Flow;
use burn::{
    module::Module,
    tensor::{backend::Backend, ElementConversion, Tensor},
};

use crate::{
    capture::{self, Discover, Pass, Seen},
    discover::Site,
    guard::{outputs, ModelOutput},
    AdaRoundError,
};

/// One stage of a model's forward pass: the model and the stage's input (the samples, for
/// the first stage; the previous stage's output after), to the stage's output. The stages,
/// run in order, must compute what the `forward` given to [`AdaRound::run`]
/// (crate::AdaRound::run) computes (checked on the first batch).
pub type Stage<'a, B, M> = Box<dyn Fn(&M, Flow<B>) -> Flow<B> + 'a>;

/// `samples` as a flow: rank 2 as rows, rank 4 as maps.
fn flow_of<B: Backend, const D: usize>(samples: &Tensor<B, D>) -> Result<Flow<B>, AdaRoundError> {
    let dims = samples.dims();
    match D {
        2 => Ok(Flow::Rows(samples.clone().reshape([dims[0], dims[1]]))),
        4 => Ok(Flow::Maps(
            samples
                .clone()
                .reshape([dims[0], dims[1], dims[2], dims[3]]),
        )),
        _ => Err(AdaRoundError::Stages(format!(
            "stages take samples of rank 2 or 4, got rank {D}"
        ))),
    }
}

/// Where each site runs: its stage and its event index within the stage.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Place {
    pub stage: usize,
    pub local: usize,
}

/// A block's data: each batch's input and the float stage's output for it.
pub(crate) type BlockData<B> = (Vec<Flow<B>>, Vec<Flow<B>>);

/// The stages and each batch's input to the current stage.
pub(crate) struct Staged<'s, 'a, B: Backend, M> {
    stages: &'s [Stage<'a, B, M>],
    /// Each site's place, in the order of the sites.
    places: Vec<Place>,
    state: RefCell<Inputs<B>>,
}

/// The batches' inputs to stage `stage`: from the model rounded so far, and from the float
/// model when targets come from it.
struct Inputs<B: Backend> {
    stage: usize,
    quantized: Vec<Flow<B>>,
    float: Option<Vec<Flow<B>>>,
}

impl<'s, 'a, B: Backend, M: Module<B>> Staged<'s, 'a, B, M> {
    /// Places every site in its stage and checks, on the first batch (in float mode), that
    /// the stages compose to `forward`: the same layers at the same positions and the same
    /// output.
    pub(crate) fn new<F, O, const D: usize>(
        stages: &'s [Stage<'a, B, M>],
        model: &M,
        (batches, forward): (&[Tensor<B, D>], &F),
        float_targets: bool,
        sites: &[Site<B>],
    ) -> Result<Self, AdaRoundError>
    where
        F: Fn(&M, Tensor<B, D>) -> O,
        O: ModelOutput<B>,
    {
        let first = outputs(model, &batches[0], forward, Pass::new(true))?;
        let first = (!first.is_empty()).then(|| Tensor::cat(first, 0));
        let batches = batches.iter().map(flow_of).collect::<Result<Vec<_>, _>>()?;
        let mut x = batches[0].clone();
        let mut events = Vec::new();
        for (s, stage) in stages.iter().enumerate() {
            let (probe, out) =
                capture::run_returning::<B, _, _>(Discover { events: Vec::new() }, || {
                    stage(model, x)
                })?;
            x = out.expect("discovery never stops a pass");
            events.extend(probe.events.into_iter().enumerate().map(|(i, e)| {
                let id = match e {
                    Seen::Layer { layer, .. } => Some(layer.kernels()[0].id),
                    Seen::Activation { .. } => None,
                };
                (Place { stage: s, local: i }, id)
            }));
        }
        let places = sites
            .iter()
            .map(|site| match events.get(site.position) {
                Some(&(place, Some(id))) if id == site.layer.kernels()[0].id => Ok(place),
                _ => Err(AdaRoundError::Stages(format!(
                    "layer `{}` is not where the forward pass runs it (event {})",
                    site.name, site.position
                ))),
            })
            .collect::<Result<Vec<_>, _>>()?;
        if let Some(first) = first {
            same_output(&first, x.flatten())?;
        }
        let float = float_targets.then(|| batches.clone());
        Ok(Self {
            stages,
            places,
            state: RefCell::new(Inputs {
                stage: 0,
                quantized: batches,
                float,
            }),
        })
    }

    /// The input of site `i` (in the order of the sites given to [`Self::new`]) on batch
    /// `b`: from `work`, or (`float`) from the float model with float weights, once the stage
    /// inputs are moved on to the site's stage.
    pub(crate) fn capture(
        &self,
        (work, float_model): (&M, Option<&M>),
        (i, site): (usize, &Site<B>),
        b: usize,
        float: bool,
    ) -> Result<Flow<B>, AdaRoundError> {
        let place = self.places[i];
        self.advance(work, float_model, place.stage)?;
        let state = self.state.borrow();
        let (model, x) = match (float, float_model, &state.float) {
            (true, Some(m), Some(f)) => (m, &f[b]),
            _ => (work, &state.quantized[b]),
        };
        let stage = &self.stages[place.stage];
        capture::input_of(place.local, float, &site.name, || stage(model, x.clone()))
    }

    /// The stage of site `i`.
    pub(crate) fn stage_of(&self, i: usize) -> usize {
        self.places[i].stage
    }

    /// Stage `stage` of `model` on `x` (`float`: every quantized layer with its float
    /// weights).
    pub(crate) fn run_stage(
        &self,
        model: &M,
        stage: usize,
        x: &Flow<B>,
        float: bool,
    ) -> Result<Flow<B>, AdaRoundError> {
        let stage = &self.stages[stage];
        let (_, out) =
            capture::run_returning::<B, _, _>(Pass::new(float), || stage(model, x.clone()))?;
        Ok(out.expect("a pass that wants no event never stops"))
    }

    /// Block `stage`'s data, once the stage inputs are moved on to it: each batch's input
    /// from `work`, and the float stage's output on the float model's input (on `work`'s
    /// input without a float model), both with float weights.
    pub(crate) fn block_data(
        &self,
        (work, float_model): (&M, Option<&M>),
        stage: usize,
    ) -> Result<BlockData<B>, AdaRoundError> {
        self.advance(work, float_model, stage)?;
        let state = self.state.borrow();
        let inputs = state.quantized.clone();
        let (model, from) = match (float_model, &state.float) {
            (Some(m), Some(f)) => (m, f),
            _ => (work, &state.quantized),
        };
        let targets = from
            .iter()
            .map(|x| self.run_stage(model, stage, x, true))
            .collect::<Result<Vec<_>, _>>()?;
        Ok((inputs, targets))
    }

    /// Moves the stage inputs on to stage `to`: through the stages between, `work` as it is
    /// (every layer before `to` is rounded) and the float model with float weights.
    fn advance(&self, work: &M, float_model: Option<&M>, to: usize) -> Result<(), AdaRoundError> {
        let mut state = self.state.borrow_mut();
        while state.stage < to {
            let stage = &self.stages[state.stage];
            let through = |model: &M, xs: &mut Vec<Flow<B>>, pass: &dyn Fn() -> Pass| {
                for x in xs.iter_mut() {
                    let (_, out) =
                        capture::run_returning::<B, _, _>(pass(), || stage(model, x.clone()))?;
                    *x = out.expect("a pass that wants no event never stops");
                }
                Ok::<_, AdaRoundError>(())
            };
            // The rounded stage with its quantized kernels computed once, not per batch.
            let one = state.quantized[0]
                .clone()
                .map(|t| t.narrow(0, 0, 1), |t| t.narrow(0, 0, 1));
            match capture::frozen(work, || stage(work, one))? {
                Some(frozen) => through(&frozen, &mut state.quantized, &Pass::frozen)?,
                None => through(work, &mut state.quantized, &|| Pass::new(false))?,
            }
            if let (Some(model), Some(float)) = (float_model, state.float.as_mut()) {
                through(model, float, &|| Pass::new(true))?;
            }
            state.stage += 1;
        }
        Ok(())
    }
}

/// `Err(Stages)` unless the stages' output on the first batch equals the forward pass's
/// (within float rounding).
fn same_output<B: Backend>(
    forward: &Tensor<B, 1>,
    staged: Tensor<B, 1>,
) -> Result<(), AdaRoundError> {
    let (n, m) = (forward.dims()[0], staged.dims()[0]);
    if n != m {
        return Err(AdaRoundError::Stages(format!(
            "the last stage returns {m} values, the forward pass {n}"
        )));
    }
    let scale = forward.clone().abs().max().into_scalar().elem::<f64>();
    let diff = (forward.clone() - staged)
        .abs()
        .max()
        .into_scalar()
        .elem::<f64>();
    if diff.is_nan() || diff > 1e-4 * (1.0 + scale) {
        return Err(AdaRoundError::Stages(format!(
            "the stages' output differs from the forward pass's by up to {diff:.3e}"
        )));
    }
    Ok(())
}
