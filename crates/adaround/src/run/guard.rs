//! The model-level guard: the rounded model's output error against nearest rounding's.

use burn::{
    module::Module,
    tensor::{backend::Backend, ElementConversion, Tensor},
};
use log::info;

use crate::{
    capture::{self, Pass},
    discover::Site,
    params::WriteBack,
    AdaRoundError, ModelCheck, ModelGuard,
};

/// The tensors of a model's output that the guard compares. Implemented for float tensors
/// of any rank, tuples and vectors of them, and `()` (nothing to compare: the guard is
/// skipped). Implement it for an output struct to have it checked.
pub trait ModelOutput<B: Backend> {
    /// The output's float tensors, each flattened.
    fn tensors(self) -> Vec<Tensor<B, 1>>;
}

impl<B: Backend, const K: usize> ModelOutput<B> for Tensor<B, K> {
    fn tensors(self) -> Vec<Tensor<B, 1>> {
        vec![self.reshape([-1])]
    }
}

impl<B: Backend> ModelOutput<B> for () {
    fn tensors(self) -> Vec<Tensor<B, 1>> {
        Vec::new()
    }
}

impl<B: Backend, T: ModelOutput<B>> ModelOutput<B> for Vec<T> {
    fn tensors(self) -> Vec<Tensor<B, 1>> {
        self.into_iter().flat_map(T::tensors).collect()
    }
}

impl<B: Backend, T1: ModelOutput<B>, T2: ModelOutput<B>> ModelOutput<B> for (T1, T2) {
    fn tensors(self) -> Vec<Tensor<B, 1>> {
        let mut all = self.0.tensors();
        all.extend(self.1.tensors());
        all
    }
}

impl<B: Backend, T1: ModelOutput<B>, T2: ModelOutput<B>, T3: ModelOutput<B>> ModelOutput<B>
    for (T1, T2, T3)
{
    fn tensors(self) -> Vec<Tensor<B, 1>> {
        let mut all = (self.0, self.1).tensors();
        all.extend(self.2.tensors());
        all
    }
}

/// The calibration batches, the user's forward and the float outputs of every batch.
pub(crate) struct Reference<'a, B: Backend, F, const D: usize> {
    batches: &'a [Tensor<B, D>],
    forward: &'a F,
    float: Vec<Vec<Tensor<B, 1>>>,
}

impl<'a, B: Backend, F, const D: usize> Reference<'a, B, F, D> {
    /// Runs `model` in float mode on every batch; `None` when the output has no tensors.
    pub fn new<M, O>(
        model: &M,
        batches: &'a [Tensor<B, D>],
        forward: &'a F,
    ) -> Result<Option<Self>, AdaRoundError>
    where
        M: Module<B>,
        F: Fn(&M, Tensor<B, D>) -> O,
        O: ModelOutput<B>,
    {
        let float = batches
            .iter()
            .map(|batch| outputs(model, batch, forward, Pass::new(true)))
            .collect::<Result<Vec<_>, _>>()?;
        if float.iter().all(Vec::is_empty) {
            return Ok(None);
        }
        Ok(Some(Self {
            batches,
            forward,
            float,
        }))
    }

    /// Mean squared error of `model`'s outputs against the float outputs.
    pub fn error<M, O>(&self, model: &M) -> Result<f64, AdaRoundError>
    where
        M: Module<B>,
        F: Fn(&M, Tensor<B, D>) -> O,
        O: ModelOutput<B>,
    {
        // The quantized kernels computed once, not on every batch.
        let one = self.batches[0].clone().narrow(0, 0, 1);
        let frozen = capture::frozen(model, || (self.forward)(model, one))?;
        let (mut sum, mut count) = (0.0, 0usize);
        for (batch, float) in self.batches.iter().zip(&self.float) {
            let outputs = match &frozen {
                Some(frozen) => outputs(frozen, batch, self.forward, Pass::frozen())?,
                None => outputs(model, batch, self.forward, Pass::new(false))?,
            };
            if outputs.len() != float.len() {
                return Err(AdaRoundError::Forward(format!(
                    "the model returned {} output tensors, {} in float mode",
                    outputs.len(),
                    float.len()
                )));
            }
            for (out, reference) in outputs.into_iter().zip(float) {
                count += out.dims()[0];
                let squared = (out - reference.clone()).powi_scalar(2).sum();
                sum += squared.into_scalar().elem::<f64>();
            }
        }
        Ok(sum / count.max(1) as f64)
    }
}

/// The output tensors of `forward` on `batch` under `pass`; a panic becomes
/// [`AdaRoundError::Forward`].
pub(crate) fn outputs<B, M, F, O, const D: usize>(
    model: &M,
    batch: &Tensor<B, D>,
    forward: &F,
    pass: Pass,
) -> Result<Vec<Tensor<B, 1>>, AdaRoundError>
where
    B: Backend,
    F: Fn(&M, Tensor<B, D>) -> O,
    O: ModelOutput<B>,
{
    let (_, tensors) =
        capture::run_returning::<B, _, _>(pass, || forward(model, batch.clone()).tensors())?;
    Ok(tensors.expect("a pass that wants no event never stops"))
}

/// Compares `rounded` with `nearest` (the caller's model) and applies `mode`; returns the
/// model to hand back and the check.
pub(crate) fn apply<B, M, F, O, const D: usize>(
    reference: &Reference<'_, B, F, D>,
    nearest: &M,
    rounded: M,
    sites: &[Site<B>],
    mode: ModelGuard,
) -> Result<(M, ModelCheck), AdaRoundError>
where
    B: Backend,
    M: Module<B>,
    F: Fn(&M, Tensor<B, D>) -> O,
    O: ModelOutput<B>,
{
    let nearest_error = reference.error(nearest)?;
    let adaround = reference.error(&rounded)?;
    let finite =
        |e: f64| crate::unit::ensure_finite(e.is_finite(), "model", "output error on the samples");
    finite(nearest_error)?;
    finite(adaround)?;
    let mut check = ModelCheck {
        nearest: nearest_error,
        adaround,
        returned: adaround,
        reverted: Vec::new(),
    };
    let mut model = rounded;
    if mode == ModelGuard::KeepBetter && adaround > nearest_error {
        for site in sites {
            let values = site.layer.param_values().into_iter().collect();
            let candidate = model.clone().map(&mut WriteBack::<B> { values });
            let error = reference.error(&candidate)?;
            if error < check.returned {
                (model, check.returned) = (candidate, error);
                check.reverted.push(site.name.clone());
            }
        }
        if check.returned > nearest_error {
            model = nearest.clone();
            check.returned = nearest_error;
            check.reverted = sites.iter().map(|s| s.name.clone()).collect();
        }
    }
    info!("{check}");
    Ok((model, check))
}

#[cfg(test)]
mod tests {
    use adaround_core::WeightQuantizer;
    use adaround_layers::{QuantizedDense, QuantizedDenseConfig};
    use burn::tensor::Distribution;

    use super::*;
    use crate::{discover::discover, params::ParamIndex, AdaRoundConfig, Schedule};

    type B = burn_ndarray::NdArray<f32>;

    #[derive(Module, Debug)]
    struct Mlp<B: Backend> {
        fc1: QuantizedDense<B>,
        fc2: QuantizedDense<B>,
    }

    impl<B: Backend> Mlp<B> {
        fn forward(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
            self.fc2
                .forward(burn::tensor::activation::relu(self.fc1.forward(x)))
        }
    }

    fn setup() -> (Mlp<B>, Vec<Tensor<B, 2>>) {
        let device = Default::default();
        <B as Backend>::seed(&device, 7);
        let q = WeightQuantizer::max_per_axis(3).unwrap();
        let model = Mlp {
            fc1: QuantizedDenseConfig::new(6, 12)
                .with_quantizer(q.clone())
                .init(&device),
            fc2: QuantizedDenseConfig::new(12, 3)
                .with_quantizer(q)
                .init(&device),
        };
        let x = Tensor::<B, 2>::random([16, 6], Distribution::Normal(0.0, 1.0), &device);
        (model, vec![x.clone().narrow(0, 0, 8), x.narrow(0, 8, 8)])
    }

    /// `model` with the kernel of `layer` shifted by `shift` (a rounding far off the grid),
    /// and its bias by `shift` too (as bias correction shifts it).
    fn shifted(model: &Mlp<B>, layer: &QuantizedDense<B>, shift: f32) -> Mlp<B> {
        let bias = layer.bias.as_ref().unwrap();
        let values = [
            (layer.weight.id, layer.weight.val().flatten(0, 1) + shift),
            (bias.id, bias.val() + shift),
        ]
        .into_iter()
        .collect();
        model.clone().map(&mut WriteBack::<B> { values })
    }

    fn squared_error(a: Tensor<B, 2>, b: Tensor<B, 2>) -> f64 {
        let n = a.shape().num_elements() as f64;
        (a - b).powi_scalar(2).sum().into_scalar().elem::<f64>() / n
    }

    /// `fc1`, a 3-bit quantized ReLU, `fc2`: activations that a frozen pass must keep
    /// quantized.
    #[derive(Module, Debug)]
    struct Quantized<B: Backend> {
        mlp: Mlp<B>,
        act: adaround_layers::QuantizedReLU<B>,
    }

    #[test]
    fn should_freeze_the_quantized_kernels_and_keep_the_activations_quantized() {
        use adaround_core::Grid;
        let (mut mlp, batches) = setup();
        // The MSE quantizer searches its scale on every pass; the frozen copy once.
        mlp.fc1.quantizer = WeightQuantizer::mse(3, true, Grid::Asymmetric)
            .unwrap()
            .into();
        let act = adaround_layers::QuantizedReLUConfig::new()
            .with_bitwidth(3)
            .init();
        let model = Quantized { mlp, act };
        let forward = |m: &Quantized<B>, x: Tensor<B, 2>| {
            m.mlp.fc2.forward(m.act.forward(m.mlp.fc1.forward(x)))
        };
        let x = batches[0].clone();
        let frozen = capture::frozen(&model, || forward(&model, x.clone().narrow(0, 0, 1)))
            .unwrap()
            .expect("no AdaRound quantizer");
        let run = |m: &Quantized<B>, pass| outputs(m, &x, &forward, pass).unwrap().remove(0);
        let quantized = run(&model, Pass::new(false));
        let diff = (run(&frozen, Pass::frozen()) - quantized.clone())
            .abs()
            .max();
        assert_eq!(diff.into_scalar(), 0.0, "the same outputs");
        // Its kernels are the quantized weights; the float pass of the caller's model and a
        // frozen pass with float activations differ from the quantized one.
        let kernel = frozen.mlp.fc1.weight.val();
        let quantized_kernel = model.mlp.fc1.quantized_weight();
        assert_eq!((kernel - quantized_kernel).abs().max().into_scalar(), 0.0);
        let float = run(&model, Pass::new(true));
        assert!((float - quantized.clone()).abs().max().into_scalar() > 1e-3);
        let loose = run(&frozen, Pass::new(true));
        assert!(
            (loose - quantized).abs().max().into_scalar() > 1e-3,
            "activations float"
        );
        // A layer armed with AdaRound is not frozen.
        let mut armed = model.clone();
        let q = WeightQuantizer::max_per_axis(3).unwrap();
        let w = armed.mlp.fc2.weight.val();
        let params = adaround_core::AdaRoundParams::new();
        armed.mlp.fc2.quantizer = adaround_layers::QuantizerSlot::AdaRound(
            adaround_core::AdaRoundQuantizer::new(q, w, 1, &params).unwrap(),
        );
        assert!(capture::frozen(&armed, || forward(&armed, x.clone()))
            .unwrap()
            .is_none());
    }

    #[test]
    fn should_measure_the_output_error_against_the_float_model() {
        let (model, batches) = setup();
        let forward = |m: &Mlp<B>, x: Tensor<B, 2>| m.forward(x);
        let reference = Reference::new(&model, &batches, &forward).unwrap().unwrap();
        // The float model by hand: the same layers with the float quantizer.
        let mut float = model.clone();
        float.fc1.quantizer = WeightQuantizer::Float.into();
        float.fc2.quantizer = WeightQuantizer::Float.into();
        let expected = batches
            .iter()
            .map(|x| squared_error(model.forward(x.clone()), float.forward(x.clone())))
            .sum::<f64>()
            / 2.0;
        let got = reference.error(&model).unwrap();
        assert!(got > 0.0);
        assert!(
            (got - expected).abs() <= 1e-6 * expected,
            "{got} vs {expected}"
        );
        assert!(reference.error(&float).unwrap() < 1e-12);
        // An output without tensors: nothing to compare.
        let nothing = |m: &Mlp<B>, x: Tensor<B, 2>| {
            let _ = m.forward(x);
        };
        assert!(Reference::new(&model, &batches, &nothing)
            .unwrap()
            .is_none());
    }

    #[test]
    fn should_put_back_nearest_rounding_only_where_it_lowers_the_output_error() {
        let (model, batches) = setup();
        let forward = |m: &Mlp<B>, x: Tensor<B, 2>| m.forward(x);
        let config = AdaRoundConfig::new(Schedule::epochs(1));
        let index = ParamIndex::of::<B, _>(&model);
        let sites = discover(&model, &batches[0], &forward, &index, &config).unwrap();
        let reference = Reference::new(&model, &batches, &forward).unwrap().unwrap();
        // fc1 far off its grid (putting it back must help), fc2 slightly off (putting it
        // back may or may not help).
        let bad = shifted(&shifted(&model, &model.fc1, 1.0), &model.fc2, 0.02);
        let (returned, check) = apply(
            &reference,
            &model,
            bad.clone(),
            &sites,
            ModelGuard::KeepBetter,
        )
        .unwrap();
        assert!(check.adaround > 10.0 * check.nearest);
        assert_eq!(check.reverted[0], "fc1");
        assert!(check.returned <= check.nearest);
        assert_eq!(check.returned, reference.error(&returned).unwrap());
        let fc1 = |m: &Mlp<B>| m.fc1.weight.val().into_data();
        let fc2 = |m: &Mlp<B>| m.fc2.weight.val().into_data();
        assert_eq!(fc1(&returned), fc1(&model));
        let fc1_bias = |m: &Mlp<B>| m.fc1.bias.as_ref().unwrap().val().into_data();
        assert_eq!(
            fc1_bias(&returned),
            fc1_bias(&model),
            "the bias is put back too"
        );
        let fc2_back = check.reverted.iter().any(|name| name == "fc2");
        assert_eq!(fc2(&returned), fc2(if fc2_back { &model } else { &bad }));

        // Report only: the rounded model is returned as it is.
        let (kept, report) =
            apply(&reference, &model, bad.clone(), &sites, ModelGuard::Report).unwrap();
        assert_eq!(fc1(&kept), fc1(&bad));
        assert!(report.reverted.is_empty());
        assert_eq!(report.returned, report.adaround);

        // Better than nearest: nothing is put back.
        let (same, good) = apply(
            &reference,
            &model,
            model.clone(),
            &sites,
            ModelGuard::KeepBetter,
        )
        .unwrap();
        assert!(good.reverted.is_empty());
        assert_eq!(good.adaround, good.nearest);
        assert_eq!(fc2(&same), fc2(&model));
    }
}
