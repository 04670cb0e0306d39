//! The driver's tests, written once for any backend; `driver.rs` runs them on `NdArray`,
//! `wgpu.rs` on `Wgpu`.

/// Burn's seed is one global RNG per backend: tests that seed and then draw run one at a time.
pub fn seed_lock() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The builder with one option each, the shape most tests call it in.
#[allow(dead_code)]
mod shorthand {
    use adaround::{
        layers::QuantizedLayer, AdaRound, AdaRoundConfig, AdaRoundError, AdaRoundReport,
        ModelOutput, Progress,
    };
    use burn::{
        module::Module,
        optim::{Optimizer, SimpleOptimizer},
        tensor::{backend::Backend, Tensor},
    };

    type Ad<B> = burn_autodiff::Autodiff<B>;
    type Rounded<M> = Result<(M, AdaRoundReport), AdaRoundError>;

    pub fn adaround<B, M, F, O, const D: usize>(
        model: &M,
        samples: Tensor<B, D>,
        forward: F,
        config: &AdaRoundConfig,
    ) -> Rounded<M>
    where
        B: Backend,
        M: Module<B>,
        F: Fn(&M, Tensor<B, D>) -> O,
        O: ModelOutput<B>,
    {
        AdaRound::new(config.clone()).run(model, samples, forward)
    }

    pub fn adaround_with_progress<B, M, F, O, const D: usize>(
        model: &M,
        samples: Tensor<B, D>,
        forward: F,
        config: &AdaRoundConfig,
        progress: impl FnMut(Progress<'_>),
    ) -> Rounded<M>
    where
        B: Backend,
        M: Module<B>,
        F: Fn(&M, Tensor<B, D>) -> O,
        O: ModelOutput<B>,
    {
        AdaRound::new(config.clone())
            .with_progress(progress)
            .run(model, samples, forward)
    }

    pub fn adaround_with_optimizer<B, M, F, O, Opt, const D: usize>(
        model: &M,
        samples: Tensor<B, D>,
        forward: F,
        config: &AdaRoundConfig,
        optimizer: impl FnMut() -> Opt,
    ) -> Rounded<M>
    where
        B: Backend,
        M: Module<B>,
        F: Fn(&M, Tensor<B, D>) -> O,
        O: ModelOutput<B>,
        Opt: Optimizer<QuantizedLayer<Ad<B>>, Ad<B>> + 'static,
    {
        AdaRound::new(config.clone())
            .with_optimizer(optimizer)
            .run(model, samples, forward)
    }

    pub fn adaround_with_simple_optimizer<B, M, F, O, S, const D: usize>(
        model: &M,
        samples: Tensor<B, D>,
        forward: F,
        config: &AdaRoundConfig,
        optimizer: impl FnMut() -> S,
    ) -> Rounded<M>
    where
        B: Backend,
        M: Module<B>,
        F: Fn(&M, Tensor<B, D>) -> O,
        O: ModelOutput<B>,
        S: SimpleOptimizer<B> + 'static,
    {
        AdaRound::new(config.clone())
            .with_simple_optimizer(optimizer)
            .run(model, samples, forward)
    }
}

#[allow(unused_imports)]
pub use shorthand::*;

/// The driver's tests for one backend.
macro_rules! driver_tests {
    ($backend:ty) => {
        #[allow(unused_imports)]
        use crate::common::{
            adaround, adaround_with_optimizer, adaround_with_progress,
            adaround_with_simple_optimizer,
        };
        use adaround::{
            export_integers,
            layers::{
                QuantizedConv2d, QuantizedConv2dConfig, QuantizedDense, QuantizedDenseConfig,
                QuantizedLayer, QuantizedReLU, QuantizedReLUConfig, QuantizedSeparableConv2d,
                QuantizedSeparableConv2dConfig,
            },
            layers::probe::Flow,
            AdaRound, AdaRoundConfig, AdaRoundError, AdaRoundReport, Elementwise, FinalRounding,
            IntegerExport, LossPath, ReconstructionLoss, Schedule, SeparableStep, Stage, Target,
            WeightQuantizer,
        };
        use burn::{
            module::{Module, ModuleVisitor, Param, ParamId},
            nn::PaddingConfig2d,
            optim::{decay::WeightDecayConfig, AdaGradConfig, AdamConfig},
            tensor::{backend::Backend, Distribution, ElementConversion, Tensor},
        };

        type B = $backend;

        fn device() -> burn::tensor::Device<B> {
            Default::default()
        }

        fn q3() -> WeightQuantizer {
            WeightQuantizer::max_per_axis(3).unwrap()
        }

        fn relu<B: Backend>() -> QuantizedReLU<B> {
            QuantizedReLUConfig::new()
                .with_bitwidth(8)
                .with_max_value(4.0)
                .init()
        }

        /// Conv2D -> ReLU -> SeparableConv2D -> ReLU -> Dense.
        #[derive(Module, Debug)]
        struct Net<B: Backend> {
            conv: QuantizedConv2d<B>,
            act1: QuantizedReLU<B>,
            sep: QuantizedSeparableConv2d<B>,
            act2: QuantizedReLU<B>,
            fc: QuantizedDense<B>,
        }

        impl<B: Backend> Net<B> {
            fn new(q: WeightQuantizer, device: &B::Device) -> Self {
                Self {
                    conv: QuantizedConv2dConfig::new([2, 4], [3, 3])
                        .with_padding(PaddingConfig2d::Same)
                        .with_quantizer(q.clone())
                        .init(device),
                    act1: relu(),
                    sep: QuantizedSeparableConv2dConfig::new([4, 6], [3, 3])
                        .with_padding(PaddingConfig2d::Same)
                        .with_stride([2, 2])
                        .with_quantizer(q.clone())
                        .init(device),
                    act2: relu(),
                    fc: QuantizedDenseConfig::new(6 * 4 * 4, 5)
                        .with_quantizer(q)
                        .init(device),
                }
            }

            fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 2> {
                let x = self.act1.forward(self.conv.forward(x));
                let x = self.act2.forward(self.sep.forward(x));
                self.fc.forward(x.flatten(1, 3))
            }
        }

        /// A residual block (skip connection with an add) and a head.
        #[derive(Module, Debug)]
        struct Residual<B: Backend> {
            stem: QuantizedConv2d<B>,
            act: QuantizedReLU<B>,
            body: QuantizedConv2d<B>,
            head: QuantizedDense<B>,
        }

        impl<B: Backend> Residual<B> {
            fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 2> {
                let x = self.act.forward(self.stem.forward(x));
                let y = self.body.forward(x.clone()) + x;
                self.head.forward(self.act.forward(y).flatten(1, 3))
            }
        }

        #[derive(Module, Debug)]
        struct Block<B: Backend> {
            conv: QuantizedConv2d<B>,
            act: QuantizedReLU<B>,
        }

        /// Nested: a `Vec` of blocks, then a head.
        #[derive(Module, Debug)]
        struct Nested<B: Backend> {
            blocks: Vec<Block<B>>,
            head: QuantizedDense<B>,
        }

        impl<B: Backend> Nested<B> {
            fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 2> {
                let x = self
                    .blocks
                    .iter()
                    .fold(x, |x, b| b.act.forward(b.conv.forward(x)));
                self.head.forward(x.flatten(1, 3))
            }
        }

        fn conv(c: [usize; 2], q: &WeightQuantizer) -> QuantizedConv2d<B> {
            QuantizedConv2dConfig::new(c, [3, 3])
                .with_padding(PaddingConfig2d::Same)
                .with_quantizer(q.clone())
                .init(&device())
        }

        fn net(seed: u64) -> Net<B> {
            net_with(seed, q3())
        }

        fn net_with(seed: u64, q: WeightQuantizer) -> Net<B> {
            B::seed(&device(), seed);
            materialize(Net::new(q, &device()))
        }

        /// 2 bits on every code of a signed integer, scale minimising the weight error.
        fn full_range_w2() -> WeightQuantizer {
            WeightQuantizer::mse(2, true, adaround::Grid::FullRange).unwrap()
        }

        /// 2 bits on every code over each channel's own range (integer offsets), per tensor.
        fn asymmetric_w2() -> WeightQuantizer {
            WeightQuantizer::mse(2, false, adaround::Grid::Asymmetric).unwrap()
        }

        /// Parameters are initialized lazily; fix their values before the model is cloned.
        fn materialize<M: Module<B>>(m: M) -> M {
            let _ = m.devices();
            m
        }

        /// Spatially smooth images (2x2 blocks plus a little noise): correlated pixels, as in real
        /// images. On i.i.d. inputs the layer's Hessian is diagonal and nearest rounding is optimal.
        fn samples(n: usize, seed: u64) -> Tensor<B, 4> {
            B::seed(&device(), seed);
            let coarse =
                Tensor::<B, 4>::random([n, 2, 4, 4], Distribution::Normal(0.0, 1.0), &device());
            let smooth = coarse
                .reshape([n, 2, 4, 1, 4, 1])
                .expand([n, 2, 4, 2, 4, 2])
                .reshape([n, 2, 8, 8]);
            let noise = Tensor::random([n, 2, 8, 8], Distribution::Normal(0.0, 0.2), &device());
            smooth + noise
        }

        /// Every float parameter of a module, by id, as plain numbers.
        fn snapshot<M: Module<B>>(m: &M) -> Vec<(ParamId, Vec<f32>)> {
            struct Collect(Vec<(ParamId, Vec<f32>)>);
            impl ModuleVisitor<B> for Collect {
                fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<B, D>>) {
                    self.0.push((p.id, p.val().into_data().to_vec().unwrap()));
                }
            }
            let mut c = Collect(Vec::new());
            m.visit(&mut c);
            c.0
        }

        fn mse(a: Tensor<B, 2>, b: Tensor<B, 2>) -> f64 {
            (a - b).powi_scalar(2).mean().into_scalar().elem::<f64>()
        }

        fn config(epochs: usize) -> AdaRoundConfig {
            AdaRoundConfig::new(Schedule::epochs(epochs)).with_learning_rate(1e-2)
        }

        #[test]
        fn should_round_every_layer_of_a_conv_separable_dense_model_better_than_nearest() {
            let _seed = crate::seed_lock();
            let model = net(1);
            let calib = samples(64, 2);
            // AIMET's channel-summed loss: with the element-mean MSE of the reference, the rounding
            // regulariser dominates the tiny reconstruction error of these small layers.
            let cfg = config(150)
                .with_batch_size(Some(16))
                .with_loss(ReconstructionLoss::ChannelSum)
                .with_never_worse(false)
                .with_rounding(FinalRounding::Hard);
            let (rounded, report) =
                adaround(&model, calib.clone(), |m, x| m.forward(x), &cfg).unwrap();

            let names: Vec<&str> = report.layers.iter().map(|l| l.name.as_str()).collect();
            assert_eq!(names, ["conv", "sep", "fc"]);
            // The model-level check: output errors against the float model on the samples.
            let check = report
                .model
                .as_ref()
                .expect("the model check is on by default");
            let float_calib = model.forward_float_reference(calib.clone());
            let nearest_calib = mse(model.forward(calib.clone()), float_calib.clone());
            let ada_calib = mse(rounded.forward(calib), float_calib);
            assert!((check.nearest - nearest_calib).abs() <= 1e-4 * nearest_calib);
            assert!((check.adaround - ada_calib).abs() <= 1e-4 * ada_calib);
            assert!(check.adaround < check.nearest, "{check}");
            assert_eq!((check.returned, check.reverted.len()), (check.adaround, 0));
            assert_eq!(
                report.layers[1].kernels.len(),
                2,
                "separable conv has two AdaRound kernels"
            );
            for layer in &report.layers {
                assert!(
                    layer.err_after <= layer.err_before,
                    "{}: {} -> {}",
                    layer.name,
                    layer.err_before,
                    layer.err_after
                );
            }
            let improved = report
                .layers
                .iter()
                .filter(|l| l.err_after < 0.9 * l.err_before)
                .count();
            assert!(
                improved >= 2,
                "AdaRound should cut the error of most layers by > 10 %"
            );
            assert!(report.changed() > 0);
            // Hard rounding writes weights that lie exactly on their quantizer's grid.
            for (w, q) in [
                (
                    rounded.conv.weight.val(),
                    rounded.conv.quantizer.quantizer().clone(),
                ),
                (
                    rounded.sep.weight_dw.val(),
                    rounded.sep.quantizer_dw.quantizer().clone(),
                ),
                (
                    rounded.sep.weight.val(),
                    rounded.sep.quantizer.quantizer().clone(),
                ),
            ] {
                let off = (q.quantize(w.clone(), 0) - w).abs().max().into_scalar();
                assert!(off < 1e-6, "{q:?}: weights off the grid by {off}");
            }
            let fc = rounded.fc.weight.val();
            assert!(
                (rounded.fc.quantizer.quantizer().quantize(fc.clone(), 1) - fc)
                    .abs()
                    .max()
                    .into_scalar()
                    < 1e-6
            );

            // On held-out samples, AdaRound is closer to the float model than nearest rounding.
            let held_out = samples(64, 3);
            let float_out = model.forward_float_reference(held_out.clone());
            let nearest = mse(model.forward(held_out.clone()), float_out.clone());
            let ada = mse(rounded.forward(held_out), float_out);
            assert!(
                ada < nearest,
                "held-out MSE: AdaRound {ada} vs nearest {nearest}"
            );
        }

        impl<B: Backend> Net<B> {
            /// The float model: float kernels, float (bounded) activations.
            fn forward_float_reference(&self, x: Tensor<B, 4>) -> Tensor<B, 2> {
                let x = self.act1.forward_float(self.conv.forward_float(x));
                let x = self.act2.forward_float(self.sep.forward_float(x));
                self.fc.forward_float(x.flatten(1, 3))
            }
        }

        fn residual(seed: u64) -> Residual<B> {
            let q = q3();
            B::seed(&device(), seed);
            materialize(Residual {
                stem: conv([2, 4], &q),
                act: relu(),
                body: conv([4, 4], &q),
                head: QuantizedDenseConfig::new(4 * 8 * 8, 3)
                    .with_quantizer(q.clone())
                    .init(&device()),
            })
        }

        /// The residual model's forward pass in three stages: stem, residual block, head.
        fn residual_stages<'a>() -> Vec<Stage<'a, B, Residual<B>>> {
            vec![
                Box::new(|m: &Residual<B>, x: Flow<B>| Flow::Maps(m.act.forward(m.stem.forward(maps(x))))),
                Box::new(|m: &Residual<B>, x: Flow<B>| {
                    let x = maps(x);
                    Flow::Maps(m.body.forward(x.clone()) + x)
                }),
                Box::new(|m: &Residual<B>, x: Flow<B>| {
                    Flow::Rows(m.head.forward(m.act.forward(maps(x)).flatten(1, 3)))
                }),
            ]
        }

        fn maps(x: Flow<B>) -> Tensor<B, 4> {
            match x {
                Flow::Maps(t) => t,
                Flow::Rows(_) => panic!("maps expected"),
            }
        }

        #[test]
        fn should_round_the_same_with_the_forward_pass_in_stages() {
            let _seed = crate::seed_lock();
            let model = residual(5);
            let calib = samples(32, 6);
            for target in [Target::QuantizedInputs, Target::FloatModel] {
                let cfg = config(5).with_batch_size(Some(16)).with_target(target);
                let forward = |m: &Residual<B>, x| m.forward(x);
                let (whole, whole_report) = adaround(&model, calib.clone(), forward, &cfg).unwrap();
                let (staged, staged_report) = AdaRound::new(cfg.clone())
                    .with_stages(residual_stages())
                    .run(&model, calib.clone(), forward)
                    .unwrap();
                let errors = |r: &AdaRoundReport| -> Vec<(f64, f64)> {
                    r.layers.iter().map(|l| (l.err_before, l.err_final)).collect()
                };
                assert_eq!(staged_report.layers.len(), 3);
                for ((b1, f1), (b2, f2)) in errors(&whole_report).into_iter().zip(errors(&staged_report)) {
                    assert!((b1 - b2).abs() <= 1e-6 * b1.abs().max(1e-12), "{target:?}: before {b1} vs {b2}");
                    assert!((f1 - f2).abs() <= 1e-6 * f1.abs().max(1e-12), "{target:?}: after {f1} vs {f2}");
                }
                for ((id1, w1), (id2, w2)) in snapshot(&whole).into_iter().zip(snapshot(&staged)) {
                    assert_eq!(id1, id2);
                    let diff = w1.iter().zip(&w2).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
                    assert!(diff <= 1e-6, "{target:?}: weights differ by {diff}");
                }
            }
        }

        #[test]
        fn should_refuse_stages_that_are_not_the_forward_pass() {
            let _seed = crate::seed_lock();
            let model = residual(5);
            // The residual model's stages with stage `i` replaced by `stage`: the run's error.
            let with = |i: usize, stage: Stage<'static, B, Residual<B>>| {
                let mut stages = residual_stages();
                stages[i] = stage;
                AdaRound::new(config(2))
                    .with_stages(stages)
                    .run(&model, samples(16, 6), |m, x| m.forward(x))
                    .unwrap_err()
            };
            // The residual add left out: another output.
            let err = with(1, Box::new(|m, x| Flow::Maps(m.body.forward(maps(x)))));
            assert!(matches!(err, AdaRoundError::Stages(ref m) if m.contains("differs")), "{err:?}");
            // The first stage also runs the block's layer (result unused): the head is not
            // where the forward pass runs it.
            let err = with(
                0,
                Box::new(|m, x| {
                    let x = m.act.forward(m.stem.forward(maps(x)));
                    let _ = m.body.forward(x.clone());
                    Flow::Maps(x)
                }),
            );
            assert!(matches!(err, AdaRoundError::Stages(ref m) if m.contains("`head`")), "{err:?}");
            // A stage that fails (the stem left out: the block gets 2 channels, not 4) is a
            // failed forward pass.
            let err = with(0, Box::new(|m, x| Flow::Maps(m.act.forward(maps(x)))));
            assert!(matches!(err, AdaRoundError::Forward(_)), "{err:?}");
        }

        #[test]
        fn should_optimise_each_layer_of_residual_and_nested_models_once_in_forward_order() {
            let _seed = crate::seed_lock();
            let q = q3();
            let residual = residual(5);
            let (_, report) =
                adaround(&residual, samples(16, 6), |m, x| m.forward(x), &config(5)).unwrap();
            let names: Vec<&str> = report.layers.iter().map(|l| l.name.as_str()).collect();
            assert_eq!(names, ["stem", "body", "head"]);

            let nested = materialize(Nested {
                blocks: vec![
                    Block {
                        conv: conv([2, 3], &q),
                        act: relu(),
                    },
                    Block {
                        conv: conv([3, 3], &q),
                        act: relu(),
                    },
                    Block {
                        conv: conv([3, 2], &q),
                        act: relu(),
                    },
                ],
                head: QuantizedDenseConfig::new(2 * 8 * 8, 3)
                    .with_quantizer(q)
                    .init(&device()),
            });
            let cfg = config(5).with_include_activation(false);
            let (_, report) = adaround(&nested, samples(16, 7), |m, x| m.forward(x), &cfg).unwrap();
            let names: Vec<&str> = report.layers.iter().map(|l| l.name.as_str()).collect();
            assert_eq!(
                names,
                ["blocks.0.conv", "blocks.1.conv", "blocks.2.conv", "head"]
            );
            let positions: Vec<usize> = report.layers.iter().map(|l| l.position).collect();
            assert!(positions.windows(2).all(|w| w[0] < w[1]));
        }

        #[test]
        fn should_apply_the_following_activation_with_include_activation() {
            let _seed = crate::seed_lock();
            let model = net(8);
            // The Dense head has no activation after it: a clear error naming it.
            let cfg = config(3).with_include_activation(true);
            let err = adaround(&model, samples(16, 9), |m, x| m.forward(x), &cfg).unwrap_err();
            assert_eq!(
                err,
                AdaRoundError::NoFollowingActivation { layer: "fc".into() }
            );

            // A nested model whose every layer is followed by its ReLU works, and its errors are
            // measured after the activation (the ReLU clips negatives: errors shrink).
            let q = q3();
            B::seed(&device(), 10);
            let nested = materialize(Nested {
                blocks: vec![Block {
                    conv: conv([2, 3], &q),
                    act: relu(),
                }],
                head: QuantizedDenseConfig::new(3 * 8 * 8, 3)
                    .with_quantizer(WeightQuantizer::Float)
                    .init(&device()),
            });
            let with = adaround(
                &nested,
                samples(16, 11),
                |m, x| m.forward(x),
                &config(3).with_include_activation(true),
            )
            .unwrap()
            .1;
            let without = adaround(&nested, samples(16, 11), |m, x| m.forward(x), &config(3))
                .unwrap()
                .1;
            assert_eq!(
                with.layers.len(),
                1,
                "the float head is not a quantized layer"
            );
            assert!(with.layers[0].err_before < without.layers[0].err_before);
        }

        #[test]
        fn should_compare_after_the_following_relu_with_relu_loss() {
            let _seed = crate::seed_lock();
            // Dense -> plain ReLU (invisible to the driver) -> Dense.
            #[derive(Module, Debug)]
            struct Mlp<B: Backend> {
                fc1: QuantizedDense<B>,
                fc2: QuantizedDense<B>,
            }
            impl<B: Backend> Mlp<B> {
                fn hidden(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
                    burn::tensor::activation::relu(self.fc1.forward(x))
                }
            }
            B::seed(&device(), 41);
            let model = materialize(Mlp {
                fc1: QuantizedDenseConfig::new(12, 16)
                    .with_quantizer(WeightQuantizer::max_per_axis(2).unwrap())
                    .init::<B>(&device()),
                fc2: QuantizedDenseConfig::new(16, 4)
                    .with_quantizer(q3())
                    .init::<B>(&device()),
            });
            let x = Tensor::<B, 2>::random([64, 12], Distribution::Normal(0.3, 1.0), &device());
            let forward = |m: &Mlp<B>, x| m.fc2.forward(m.hidden(x));
            let relu_cfg = |names: &[&str]| {
                config(30)
                    .with_relu_loss(true)
                    .with_relu_layers(names.iter().map(|n| n.to_string()).collect())
            };

            // Misuse is a clear error, before any layer is optimised.
            let err = adaround(&model, x.clone(), forward, &relu_cfg(&["fc9"])).unwrap_err();
            assert_eq!(
                err,
                AdaRoundError::UnknownLayer {
                    name: "fc9".into(),
                    known: "fc1, fc2".into()
                }
            );
            let lonely = config(30).with_relu_layers(vec!["fc1".into()]);
            let err = adaround(&model, x.clone(), forward, &lonely).unwrap_err();
            assert!(matches!(err, AdaRoundError::InvalidConfig(_)), "{err:?}");
            let both = relu_cfg(&[]).with_include_activation(true);
            let err = adaround(&model, x.clone(), forward, &both).unwrap_err();
            assert!(matches!(err, AdaRoundError::InvalidConfig(_)), "{err:?}");

            // The named layer's error is measured after its ReLU (smaller: the ReLU clears
            // negatives on both sides); the rounding it picks leaves a smaller error after the
            // ReLU than the plain loss's rounding does.
            let (with, with_report) =
                adaround(&model, x.clone(), forward, &relu_cfg(&["fc1"])).unwrap();
            let (without, without_report) =
                adaround(&model, x.clone(), forward, &config(30)).unwrap();
            let [w, wo] = [&with_report, &without_report].map(|r| &r.layers[0]);
            assert_eq!(w.name, "fc1");
            assert!(
                w.err_before < wo.err_before,
                "{} vs {}",
                w.err_before,
                wo.err_before
            );
            let float = burn::tensor::activation::relu(model.fc1.forward_float(x.clone()));
            let after_relu = |m: &Mlp<B>| mse(m.hidden(x.clone()), float.clone());
            let (e_with, e_without) = (after_relu(&with), after_relu(&without));
            assert!(e_with < e_without, "{e_with} vs {e_without}");
            assert!((e_with - w.err_final).abs() <= 1e-4 * w.err_final);

            // A quantized ReLU right after a layer is found without naming it: the conv's
            // error is measured after it.
            let net = net(8);
            let errors = |cfg: &AdaRoundConfig| {
                let report = adaround(&net, samples(16, 9), |m, x| m.forward(x), cfg)
                    .unwrap()
                    .1;
                report.layers[0].err_before
            };
            let found = config(3).with_relu_loss(true);
            assert!(errors(&found) < errors(&config(3)));
        }

        #[test]
        fn should_leave_the_callers_model_untouched_on_success_and_on_every_error() {
            let _seed = crate::seed_lock();
            let model = net(12);
            let before = snapshot(&model);
            let run = |m: &Net<B>, x: Tensor<B, 4>, cfg: &AdaRoundConfig| {
                adaround(m, x, |m, x| m.forward(x), cfg).map(|(_, r)| r)
            };
            run(&model, samples(16, 13), &config(3)).unwrap();
            assert_eq!(snapshot(&model), before, "after success");

            let cases: Vec<(Tensor<B, 4>, AdaRoundConfig, AdaRoundError)> = vec![
                (
                    Tensor::zeros([0, 2, 8, 8], &device()),
                    config(3),
                    AdaRoundError::NoSamples,
                ),
                (
                    samples(8, 14),
                    config(3).with_batch_size(Some(16)),
                    AdaRoundError::TooFewSamples {
                        samples: 8,
                        batch_size: 16,
                    },
                ),
                (
                    samples(8, 14).mul_scalar(f32::NAN),
                    config(3),
                    AdaRoundError::NonFiniteInputs,
                ),
                (
                    samples(8, 14),
                    config(0),
                    AdaRoundError::InvalidConfig("the schedule has zero epochs".into()),
                ),
                (
                    samples(8, 14),
                    config(3).with_include_activation(true),
                    AdaRoundError::NoFollowingActivation { layer: "fc".into() },
                ),
            ];
            for (x, cfg, expected) in cases {
                assert_eq!(run(&model, x, &cfg).unwrap_err(), expected);
                assert_eq!(snapshot(&model), before, "after {expected:?}");
            }
            // Samples the model rejects (3 channels instead of 2): the forward panic becomes an error.
            let wrong = Tensor::<B, 4>::zeros([4, 3, 8, 8], &device());
            match run(&model, wrong, &config(3)) {
                Err(AdaRoundError::Forward(msg)) => {
                    assert!(msg.contains("expects 2 input channels"), "{msg}")
                }
                other => panic!("expected a forward error, got {other:?}"),
            }
            assert_eq!(snapshot(&model), before);

            // Non-finite weights name the layer.
            let mut broken = model.clone();
            broken.sep.weight = broken.sep.weight.map(|w| w.mul_scalar(f32::INFINITY));
            let err = run(&broken, samples(8, 14), &config(3)).unwrap_err();
            assert_eq!(
                err,
                AdaRoundError::NonFiniteWeights {
                    layer: "sep".into()
                }
            );

            // A model with no quantizing layer.
            let float = Net::<B>::new(WeightQuantizer::Float, &device());
            assert_eq!(
                run(&float, samples(8, 14), &config(3)).unwrap_err(),
                AdaRoundError::NoQuantizedLayer
            );
            assert_eq!(snapshot(&model), before);
        }

        #[test]
        fn should_give_identical_weights_and_reports_for_identical_runs() {
            let _seed = crate::seed_lock();
            let cfg = config(10).with_batch_size(Some(8));
            let run = || {
                let (m, r) =
                    adaround(&net(15), samples(32, 16), |m, x| m.forward(x), &cfg).unwrap();
                (snapshot(&m), r)
            };
            let (w1, r1) = run();
            let (w2, r2) = run();
            // Parameter ids are random per model; the values must be identical.
            let values =
                |w: Vec<(ParamId, Vec<f32>)>| w.into_iter().map(|(_, v)| v).collect::<Vec<_>>();
            assert_eq!(values(w1), values(w2));
            if std::any::type_name::<B>().contains("NdArray") {
                assert_eq!(r1, r2);
            } else {
                // GPU reductions do not fix their summation order: the same weights and
                // decisions, and the same losses up to the last bits.
                for (a, b) in r1.layers.iter().zip(&r2.layers) {
                    assert_eq!(
                        (a.steps, a.changed(), a.kept_nearest),
                        (b.steps, b.changed(), b.kept_nearest)
                    );
                    for (x, y) in [(a.err_before, b.err_before), (a.err_final, b.err_final)] {
                        assert!((x - y).abs() <= 1e-5 * x.abs(), "{}: {x} vs {y}", a.name);
                    }
                }
            }
            assert_eq!(r1.samples, 32);
            // The report round-trips through JSON.
            let parsed: AdaRoundReport = serde_json::from_str(&r1.to_json()).unwrap();
            assert_eq!(parsed, r1);
            assert_eq!(
                parsed.layers[1].kernels[0].change,
                r1.layers[1].kernels[0].change
            );
        }

        // The reference's per-epoch beta: 2 + 18 * 0.5 * (1 + cos(pi * e / epochs)), e = 0..epochs;
        // it stops once the rounding loss of an epoch is exactly 0.
        #[test]
        fn should_follow_the_reference_schedule_and_stop_early_on_a_single_dense_layer() {
            let _seed = crate::seed_lock();
            #[derive(Module, Debug)]
            struct One<B: Backend> {
                fc: QuantizedDense<B>,
            }
            B::seed(&device(), 17);
            let model = materialize(One {
                fc: QuantizedDenseConfig::new(6, 4)
                    .with_quantizer(q3())
                    .init::<B>(&device()),
            });
            let x = Tensor::<B, 2>::random([32, 6], Distribution::Normal(0.0, 1.0), &device());
            let cfg = AdaRoundConfig::new(Schedule::epochs(8)).with_never_worse(false);
            let (_, report) = adaround(&model, x.clone(), |m, x| m.fc.forward(x), &cfg).unwrap();
            let history = &report.layers[0].history;
            assert_eq!(history.len(), 8, "no early stop at lr 1e-3");
            for (e, log) in history.iter().enumerate() {
                let want = 2.0 + 18.0 * 0.5 * (1.0 + (std::f64::consts::PI * e as f64 / 8.0).cos());
                assert!(
                    (log.beta.unwrap() - want).abs() < 1e-9,
                    "epoch {e}: {:?}",
                    log.beta
                );
                assert_eq!(log.step, e + 1);
            }
            assert!(!report.layers[0].early_stop);

            // A large learning rate rounds every weight quickly: the run stops early.
            let cfg = AdaRoundConfig::new(Schedule::epochs(500))
                .with_learning_rate(0.5)
                .with_never_worse(false);
            let (_, report) = adaround(&model, x, |m, x| m.fc.forward(x), &cfg).unwrap();
            let layer = &report.layers[0];
            assert!(
                layer.early_stop && layer.steps < 500,
                "steps {}",
                layer.steps
            );
            let last = layer.history.last().unwrap();
            assert_eq!((last.rounding, last.roamers.clone()), (0.0, vec![0]));
            assert_eq!(layer.kernels[0].status.roamers, 0);
        }

        #[test]
        fn should_shift_each_bias_to_the_mean_error_with_bias_correction() {
            let _seed = crate::seed_lock();
            let model = net(23);
            let original = snapshot(&model);
            let calib = samples(32, 24);
            let forward = |m: &Net<B>, x| m.forward(x);
            let cfg = config(20).with_never_worse(false);
            let (plain, plain_report) = adaround(&model, calib.clone(), forward, &cfg).unwrap();
            let corrected_cfg = cfg.with_bias_correction(true);
            let (corrected, report) =
                adaround(&model, calib.clone(), forward, &corrected_cfg).unwrap();
            // The first layer sees the same inputs in both runs: the same rounding, a lower
            // error, and a bias whose outputs match the targets' mean per channel.
            let kernel_diff = (corrected.conv.weight.val() - plain.conv.weight.val())
                .abs()
                .max()
                .into_scalar()
                .elem::<f32>();
            assert_eq!(
                kernel_diff, 0.0,
                "the correction does not change the rounding"
            );
            assert!(
                report.layers[0].err_final < plain_report.layers[0].err_final,
                "{} vs {}",
                report.layers[0].err_final,
                plain_report.layers[0].err_final
            );
            let float = QuantizedLayer::Conv2d(model.conv.clone())
                .forward_float_flow(adaround::layers::probe::Flow::Maps(calib.clone()));
            let out = QuantizedLayer::Conv2d(corrected.conv.clone())
                .forward_flow(adaround::layers::probe::Flow::Maps(calib.clone()));
            let (float, out) = match (float, out) {
                (
                    adaround::layers::probe::Flow::Maps(f),
                    adaround::layers::probe::Flow::Maps(o),
                ) => (f, o),
                _ => unreachable!("a Conv2D gives maps"),
            };
            let mean_error = (float - out).mean_dim(0).mean_dim(2).mean_dim(3);
            let worst = mean_error.abs().max().into_scalar().elem::<f32>();
            assert!(
                worst < 1e-4,
                "mean error per channel after correction: {worst}"
            );
            // Every layer with a bias had it shifted; the caller's biases are untouched.
            for (before, after) in [
                (&model.conv.bias, &corrected.conv.bias),
                (&model.sep.bias, &corrected.sep.bias),
                (&model.fc.bias, &corrected.fc.bias),
            ] {
                let (before, after) = (before.as_ref().unwrap(), after.as_ref().unwrap());
                let shift = (after.val() - before.val()).abs().max().into_scalar();
                assert!(shift.elem::<f32>() > 0.0);
            }
            assert!(
                snapshot(&model) == original,
                "the caller's model is not modified"
            );
        }

        #[test]
        fn should_keep_nearest_rounding_when_adaround_ends_worse() {
            let _seed = crate::seed_lock();
            // A saboteur optimizer: Adam with a huge weight decay takes one step of -lr * sign(alpha),
            // which flips every rounding decision away from nearest. never_worse keeps nearest.
            let model = net(18);
            let cfg = AdaRoundConfig::new(Schedule::epochs(1)).with_learning_rate(5.0);
            let saboteur = || {
                AdamConfig::new()
                    .with_weight_decay(Some(WeightDecayConfig::new(1e6)))
                    .init::<burn_autodiff::Autodiff<B>, QuantizedLayer<burn_autodiff::Autodiff<B>>>(
                    )
            };
            let forward = |m: &Net<B>, x| m.forward(x);
            let (rounded, report) =
                adaround_with_optimizer(&model, samples(16, 19), forward, &cfg, saboteur).unwrap();
            let kept: Vec<&str> = report
                .layers
                .iter()
                .filter(|l| l.kept_nearest)
                .map(|l| l.name.as_str())
                .collect();
            assert_eq!(
                kept,
                ["conv", "sep", "fc"],
                "flipped rounding is worse everywhere"
            );
            // Without never_worse, the flipped rounding is written into the model.
            let (_, strict) = adaround_with_optimizer(
                &model,
                samples(16, 19),
                forward,
                &cfg.clone().with_never_worse(false),
                saboteur,
            )
            .unwrap();
            assert!(strict
                .layers
                .iter()
                .all(|l| l.err_final > l.err_before && l.changed() > 0));
            for layer in &report.layers {
                assert!(layer.err_final <= layer.err_before, "{}", layer.name);
                if layer.kept_nearest {
                    assert_eq!(layer.changed(), 0);
                }
            }
            if kept.contains(&"conv") {
                let same = (rounded.conv.weight.val() - model.conv.weight.val())
                    .abs()
                    .max()
                    .into_scalar();
                assert_eq!(same, 0.0, "the kept layer's weights are the original ones");
            }
        }

        #[test]
        fn should_resume_after_an_interruption_with_the_result_of_an_uninterrupted_run() {
            let _seed = crate::seed_lock();
            let dir = std::env::temp_dir().join(format!(
                "adaround-resume-{}-{}",
                std::process::id(),
                std::any::type_name::<B>().len()
            ));
            let model = net(22);
            let run = |cfg: &AdaRoundConfig| {
                adaround(&model, samples(32, 23), |m, x| m.forward(x), cfg).unwrap()
            };
            // The reference's settings, and the recommended preset's (the float model's
            // activations as targets, bias correction, refinement, model guard): a resumed
            // run must take its targets from the float model, not from the checkpoint's
            // partly rounded one.
            let mut preset = AdaRoundConfig::recommended();
            preset.schedule = Schedule::warm_cosine(60);
            for cfg in [config(8), preset] {
                let _ = std::fs::remove_dir_all(&dir);
                let cfg = cfg.with_batch_size(Some(16));
                let (full, full_report) = run(&cfg);

                let with_dir = cfg
                    .clone()
                    .with_run(cfg.run.clone().with_checkpoint(Some(dir.display().to_string())));
                // "Interrupted" after the first layer: the checkpoint holds one finished layer.
                let (_, partial) = run(&with_dir.clone().with_run(with_dir.run.clone().with_stop_after(Some(1))));
                assert_eq!(partial.layers.len(), 1);
                assert!(
                    partial.model.is_none(),
                    "no model check before the last layer"
                );
                assert!(dir.join("progress.json").exists() && dir.join("model-1.bin").exists());
                // The resumed run skips it and ends where the uninterrupted run ends.
                let (resumed, report) = run(&with_dir);
                assert_eq!(report.layers.len(), 3);
                assert_eq!(
                    report.layers[0], partial.layers[0],
                    "the finished layer comes from the checkpoint"
                );
                let values =
                    |m: &Net<B>| snapshot(m).into_iter().map(|(_, v)| v).collect::<Vec<_>>();
                assert_eq!(values(&resumed), values(&full), "{:?}", cfg.target);
                assert!(report.model.is_some());
                assert_eq!(report.model, full_report.model);
                for (a, b) in report.layers.iter().zip(&full_report.layers) {
                    assert_eq!(
                        (a.err_before, a.err_final, a.changed()),
                        (b.err_before, b.err_final, b.changed()),
                        "{:?}",
                        cfg.target
                    );
                }
            }
            // A checkpoint from another configuration is refused, not silently reused.
            let other = config(8)
                .with_batch_size(Some(16))
                .with_run(adaround::RunConfig::new().with_checkpoint(Some(dir.display().to_string())));
            let err = adaround(&model, samples(32, 23), |m, x| m.forward(x), &other).unwrap_err();
            assert!(
                matches!(
                    err,
                    AdaRoundError::CheckpointMismatch {
                        what: "configuration",
                        ..
                    }
                ),
                "{err:?}"
            );
            let _ = std::fs::remove_dir_all(&dir);
        }

        #[test]
        fn should_export_integer_weights_that_dequantize_to_the_quantized_kernels() {
            let _seed = crate::seed_lock();
            for q in [q3(), full_range_w2(), asymmetric_w2()] {
                export_round_trip(net_with(24, q));
            }
        }

        fn export_round_trip(model: Net<B>) {
            let cfg = config(5)
                .with_rounding(FinalRounding::Hard)
                .with_bias_correction(true);
            let (rounded, _) =
                adaround(&model, samples(16, 25), |m, x| m.forward(x), &cfg).unwrap();
            let export = export_integers(&rounded, samples(1, 26), |m, x| m.forward(x)).unwrap();
            // Each layer's bias with its last kernel: the corrected one, not the float model's.
            let bias = |b: &Option<Param<Tensor<B, 1>>>| {
                b.as_ref()
                    .map(|b| b.val().into_data().to_vec::<f32>().unwrap())
            };
            let biases: Vec<_> = export.kernels.iter().map(|k| k.bias.clone()).collect();
            assert_eq!(
                biases,
                [
                    bias(&rounded.conv.bias),
                    None,
                    bias(&rounded.sep.bias),
                    bias(&rounded.fc.bias)
                ]
            );
            assert!(biases
                .iter()
                .all(|b| b.as_ref().is_none_or(|b| !b.is_empty())));
            assert_ne!(bias(&rounded.fc.bias), bias(&model.fc.bias));
            let names: Vec<(&str, &str)> = export
                .kernels
                .iter()
                .map(|k| (k.layer.as_str(), k.kernel.as_str()))
                .collect();
            assert_eq!(
                names,
                [
                    ("conv", "kernel"),
                    ("sep", "depthwise"),
                    ("sep", "pointwise"),
                    ("fc", "kernel")
                ]
            );
            let quantized: Vec<Vec<f32>> = [
                rounded.conv.quantized_weight().flatten::<1>(0, 3),
                rounded.sep.quantized_weights().0.flatten(0, 3),
                rounded.sep.quantized_weights().1.flatten(0, 3),
                rounded.fc.quantized_weight().flatten(0, 1),
            ]
            .into_iter()
            .map(|t| t.into_data().to_vec().unwrap())
            .collect();
            for (k, q) in export.kernels.iter().zip(&quantized) {
                let kmax = (1i32 << (k.bitwidth - 1)) - 1;
                let lo = match k.grid {
                    adaround::Grid::Symmetric => -kmax,
                    adaround::Grid::FullRange | adaround::Grid::Asymmetric => -kmax - 1,
                };
                let channels = k.scale_factors.len();
                let asymmetric = k.grid == adaround::Grid::Asymmetric;
                assert_eq!(k.offsets.len(), if asymmetric { channels } else { 0 });
                let encodings = k.aimet_encodings();
                assert_eq!(encodings.len(), channels);
                assert_eq!(k.integers.len(), q.len());
                assert!(
                    k.integers.iter().all(|i| (lo..=kmax).contains(i)),
                    "{} {}",
                    k.layer,
                    k.kernel
                );
                for (i, (&int, &w)) in k.integers.iter().zip(q).enumerate() {
                    // Channel of element i: axis 0 is the slowest, axis 1 of [d_in, d_out] the fastest.
                    let c = match k.axis {
                        None => 0,
                        Some(0) => i / (q.len() / channels),
                        Some(_) => i % channels,
                    };
                    let offset = k.offsets.get(c).copied().unwrap_or(0);
                    let back = (int + offset) as f32 / k.scale_factors[c];
                    // AIMET's convention: unsigned codes from `min`, in `[min, max]`.
                    let e = &encodings[c];
                    assert_eq!(e.is_symmetric, !asymmetric);
                    let code = int - lo;
                    assert!(code >= 0 && e.scale * (code + e.offset) as f32 <= e.max * 1.000_001);
                    let aimet = e.scale * (code + e.offset) as f32;
                    assert!(
                        (aimet - w).abs() <= 1e-5 * w.abs().max(1e-3),
                        "{aimet} vs {w}"
                    );
                    assert!(
                        (back - w).abs() <= 1e-6 * w.abs().max(1e-3),
                        "{} {}[{i}]: {back} vs {w}",
                        k.layer,
                        k.kernel
                    );
                }
            }
            let parsed: IntegerExport = serde_json::from_str(&export.to_json()).unwrap();
            assert_eq!(parsed, export);
        }

        #[test]
        fn should_take_the_same_rounding_decisions_on_the_gram_and_direct_paths() {
            let _seed = crate::seed_lock();
            let model = net(20);
            let cfg = config(40)
                .with_batch_size(Some(16))
                .with_rounding(FinalRounding::Hard)
                .with_never_worse(false);
            let run = |path| {
                let (m, r) = adaround(
                    &model,
                    samples(64, 21),
                    |m, x| m.forward(x),
                    &cfg.clone().with_performance(cfg.performance.clone().with_path(path)),
                )
                .unwrap();
                let kernels: Vec<Vec<f32>> = [
                    m.conv.weight.val().flatten::<1>(0, 3),
                    m.sep.weight_dw.val().flatten(0, 3),
                    m.sep.weight.val().flatten(0, 3),
                    m.fc.weight.val().flatten(0, 1),
                ]
                .into_iter()
                .map(|t| t.into_data().to_vec().unwrap())
                .collect();
                (kernels, r)
            };
            let (direct, r_direct) = run(LossPath::Direct);
            let (gram, r_gram) = run(LossPath::Gram);
            assert_eq!(
                r_gram.layers.iter().map(|l| l.fused).collect::<Vec<_>>(),
                [true, true, true],
                "the fused step runs on Dense, Conv2D and (split) SeparableConv2D"
            );
            let paths: Vec<LossPath> = r_gram.layers.iter().map(|l| l.path).collect();
            assert_eq!(
                paths,
                [LossPath::Gram, LossPath::Gram, LossPath::Gram],
                "split, each half of the separable conv has a Gram form"
            );
            let joint = cfg
                .clone()
                .with_performance(cfg.performance.clone().with_path(LossPath::Gram))
                .with_separable(SeparableStep::Joint);
            let (_, r_joint) =
                adaround(&model, samples(64, 21), |m, x| m.forward(x), &joint).unwrap();
            let joint: Vec<(LossPath, bool)> =
                r_joint.layers.iter().map(|l| (l.path, l.fused)).collect();
            assert_eq!(
                joint,
                [
                    (LossPath::Gram, true),
                    (LossPath::Direct, false),
                    (LossPath::Gram, true)
                ],
                "joint, the separable conv has no Gram form and runs through autodiff"
            );
            assert!(r_direct.layers.iter().all(|l| l.path == LossPath::Direct));
            let (mut same, mut total) = (0usize, 0usize);
            for (a, b) in direct.iter().zip(&gram) {
                same += a
                    .iter()
                    .zip(b)
                    .filter(|(x, y)| (*x - *y).abs() <= 1e-6 * x.abs().max(1e-6))
                    .count();
                total += a.len();
            }
            let fraction = same as f64 / total as f64;
            println!(
                "same rounding decisions on both paths: {same} / {total} ({:.3} %)",
                100.0 * fraction
            );
            assert!(fraction >= 0.99, "only {fraction} of the weights agree");
        }

        #[test]
        fn should_take_the_same_rounding_decisions_with_the_fused_and_the_autodiff_step() {
            let _seed = crate::seed_lock();
            for q in [q3(), full_range_w2(), asymmetric_w2()] {
                fused_agrees_with_autodiff(net_with(22, q));
            }
        }

        fn fused_agrees_with_autodiff(model: Net<B>) {
            let cfg = config(40)
                .with_batch_size(Some(16))
                .with_rounding(FinalRounding::Hard)
                .with_never_worse(false);
            for path in [LossPath::Gram, LossPath::Direct] {
                let cfg = cfg.clone().with_performance(cfg.performance.clone().with_path(path));
                let fused = adaround(&model, samples(64, 23), |m, x| m.forward(x), &cfg).unwrap();
                let autodiff = adaround_with_optimizer(
                    &model,
                    samples(64, 23),
                    |m, x| m.forward(x),
                    &cfg,
                    || burn::optim::AdamConfig::new().init(),
                )
                .unwrap();
                assert!(fused.1.layers[0].fused && !autodiff.1.layers[0].fused);
                println!("{path:?}:");
                assert_same_rounding(&fused, &autodiff);
                // The elementwise work in host memory, and the whole step there (products
                // and Adam too), on every backend.
                for place in [Elementwise::Host, Elementwise::Resident] {
                    let host_cfg = cfg
                        .clone()
                        .with_performance(cfg.performance.clone().with_elementwise(place));
                    let host = adaround(&model, samples(64, 23), |m, x| m.forward(x), &host_cfg);
                    let host = host.unwrap();
                    assert!(host.1.layers[0].fused);
                    println!("{path:?}, {place:?}:");
                    assert_same_rounding(&host, &autodiff);
                }
            }
        }

        /// The conv and Dense kernels of both runs are the same in at least 99 % of the weights,
        /// and the final losses of each layer within 5 %.
        fn assert_same_rounding(
            (a, ra): &(Net<B>, AdaRoundReport),
            (b, rb): &(Net<B>, AdaRoundReport),
        ) {
            let kernels = |m: &Net<B>| -> Vec<f32> {
                [
                    m.conv.weight.val().flatten::<1>(0, 3),
                    m.fc.weight.val().flatten(0, 1),
                ]
                .into_iter()
                .flat_map(|t| t.into_data().to_vec::<f32>().unwrap())
                .collect()
            };
            let (a, b) = (kernels(a), kernels(b));
            let same = a
                .iter()
                .zip(&b)
                .filter(|(x, y)| (*x - *y).abs() <= 1e-6 * x.abs().max(1e-6))
                .count();
            println!("the runs agree on {same} / {} weights", a.len());
            assert!(same as f64 >= 0.99 * a.len() as f64, "{same} / {}", a.len());
            for (f, g) in ra.layers.iter().zip(&rb.layers) {
                let (x, y) = (f.final_reconstruction_loss, g.final_reconstruction_loss);
                assert!((x - y).abs() <= 0.05 * y.abs(), "{}: {x} vs {y}", f.name);
            }
        }

        #[test]
        fn should_take_the_fused_step_with_any_simple_optimizer() {
            let _seed = crate::seed_lock();
            let model = net_with(22, q3());
            let cfg = config(40)
                .with_batch_size(Some(16))
                .with_rounding(FinalRounding::Hard)
                .with_never_worse(false);
            let forward = |m: &Net<B>, x| m.forward(x);
            let fused =
                adaround_with_simple_optimizer(&model, samples(64, 23), forward, &cfg, || {
                    AdaGradConfig::new().build()
                })
                .unwrap();
            let autodiff = adaround_with_optimizer(&model, samples(64, 23), forward, &cfg, || {
                AdaGradConfig::new().init()
            })
            .unwrap();
            assert!(fused.1.layers.iter().all(|l| l.fused));
            assert!(autodiff.1.layers.iter().all(|l| !l.fused));
            assert_same_rounding(&fused, &autodiff);
            // AdaGrad's trajectory, not Adam's.
            let (_, adam) = adaround(&model, samples(64, 23), forward, &cfg).unwrap();
            let losses = |r: &AdaRoundReport| -> Vec<f64> {
                r.layers
                    .iter()
                    .map(|l| l.final_reconstruction_loss)
                    .collect()
            };
            assert_ne!(losses(&fused.1), losses(&adam));
        }

        /// Conv2D -> BatchNorm (not folded) -> ReLU -> Dense.
        #[derive(Module, Debug)]
        struct WithNorm<B: Backend> {
            conv: QuantizedConv2d<B>,
            norm: burn::nn::BatchNorm<B>,
            act: QuantizedReLU<B>,
            fc: QuantizedDense<B>,
        }

        impl<B: Backend> WithNorm<B> {
            fn features(&self, x: Tensor<B, 4>) -> Tensor<B, 2> {
                self.act
                    .forward(self.norm.forward(self.conv.forward(x)))
                    .flatten(1, 3)
            }

            fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 2> {
                self.fc.forward(self.features(x))
            }
        }

        /// A model whose BatchNorm statistics are far from what a batch of samples gives.
        fn with_norm(conv_quantizer: WeightQuantizer) -> WithNorm<B> {
            B::seed(&device(), 31);
            let mut norm = burn::nn::BatchNormConfig::new(4).init(&device());
            let r = |d| Tensor::<B, 1>::random([4], d, &device());
            norm.running_mean = burn::module::RunningState::new(r(Distribution::Uniform(1.0, 2.0)));
            norm.running_var = burn::module::RunningState::new(r(Distribution::Uniform(3.0, 5.0)));
            materialize(WithNorm {
                conv: conv([2, 4], &conv_quantizer),
                norm,
                act: relu(),
                fc: QuantizedDenseConfig::new(4 * 8 * 8, 5)
                    .with_quantizer(q3())
                    .init(&device()),
            })
        }

        #[test]
        fn should_leave_a_batch_norm_model_untouched() {
            let _seed = crate::seed_lock();
            let model = with_norm(q3());
            // Through the record: `RunningState::value()` can lag a pending update, the
            // record cannot.
            let stats = |m: &WithNorm<B>| -> Vec<f32> {
                let norm = m.clone().into_record().norm;
                [norm.running_mean.val(), norm.running_var.val()]
                    .into_iter()
                    .flat_map(|t| t.into_data().to_vec::<f32>().unwrap())
                    .collect()
            };
            let (params, running) = (snapshot(&model), stats(&model));
            let cfg = config(40).with_batch_size(Some(8));
            let (rounded, report) =
                adaround(&model, samples(32, 32), |m, x| m.forward(x), &cfg).unwrap();
            assert_eq!(report.layers.len(), 2);
            assert!(report.changed() > 0, "something was rounded");
            assert_eq!(
                snapshot(&model),
                params,
                "the caller's parameters are untouched"
            );
            assert_eq!(
                stats(&model),
                running,
                "the caller's BatchNorm statistics are untouched"
            );
            assert_eq!(
                stats(&rounded),
                running,
                "the rounded model keeps the statistics"
            );
            // Burn's clones share a BatchNorm's statistics, the returned model's with the
            // caller's too; the README's way to separate them: the returned record loaded
            // into a newly built model, which gives the same outputs.
            struct AddOne;
            impl burn::module::ModuleMapper<B> for AddOne {
                fn map_float<const D: usize>(
                    &mut self,
                    p: Param<Tensor<B, D>>,
                ) -> Param<Tensor<B, D>> {
                    p.map(|t| t + 1.0)
                }
            }
            let separate = with_norm(q3()).load_record(rounded.clone().into_record());
            let x = samples(4, 33);
            let out = |m: &WithNorm<B>| m.forward(x.clone()).into_data().to_vec::<f32>().unwrap();
            assert_eq!(out(&separate), out(&rounded));
            let moved = separate.map(&mut AddOne);
            assert_ne!(
                stats(&moved),
                running,
                "the mapper moved the copy's statistics"
            );
            assert_eq!(stats(&model), running, "and not the caller's");
        }

        #[test]
        fn should_see_the_batch_norm_in_inference_mode() {
            let _seed = crate::seed_lock();
            // Only fc is quantized: its inputs go through the BatchNorm. The driver's error with
            // nearest rounding must be the one on the inference-mode features.
            let model = with_norm(WeightQuantizer::Float);
            let x = samples(32, 33);
            let features = model.features(x.clone());
            let fc = &model.fc;
            let expected = mse(fc.forward(features.clone()), fc.forward_float(features));
            let cfg = config(1).with_never_worse(false);
            let (_, report) = adaround(&model, x, |m, x| m.forward(x), &cfg).unwrap();
            assert_eq!(report.layers.len(), 1);
            let got = report.layers[0].err_before;
            assert!(
                (got - expected).abs() <= 1e-5 * expected,
                "driver {got} vs inference {expected}"
            );
        }
    };
}
