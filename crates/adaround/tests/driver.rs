//! Integration tests of the AdaRound driver on small models, on `NdArray`. The same tests run
//! on `Wgpu` in `wgpu.rs` (with the `wgpu` feature; in CI on Mesa's software Vulkan device).
//! The driver takes inference models; it wraps a layer in `Autodiff` itself where a step
//! needs gradients.

#[macro_use]
mod common;
use common::seed_lock;

mod ndarray {
    driver_tests!(burn_ndarray::NdArray<f32>);

    #[test]
    fn should_never_return_non_finite_weights_as_success() {
        let _seed = crate::seed_lock();
        let model = net(40);
        let forward = |m: &Net<B>, x| m.forward(x);
        // Samples too large for f32 once through the layers: a typed error naming a layer.
        let huge = samples(16, 41).mul_scalar(1e30);
        match adaround(&model, huge, forward, &config(2)).unwrap_err() {
            AdaRoundError::NonFinite { layer, .. } | AdaRoundError::NonFiniteWeights { layer } => {
                assert!(["conv", "sep", "fc"].contains(&layer.as_str()), "{layer}")
            }
            AdaRoundError::NonFiniteInputs => {}
            other => panic!("unexpected {other:?}"),
        }
        // A weight of 3e38: quantization overflows; never Ok with NaN weights.
        let mut big = model.clone();
        big.fc.weight = big.fc.weight.map(|w| w.mul_scalar(0.0).add_scalar(3e38));
        let err = adaround(&big, samples(16, 41), forward, &config(2)).unwrap_err();
        assert!(
            matches!(&err, AdaRoundError::NonFinite { layer, .. } if layer == "fc"),
            "{err:?}"
        );
        // reg NaN or infinite: an invalid configuration.
        for reg in [f64::NAN, f64::INFINITY, -1.0] {
            let mut cfg = config(2);
            cfg.params.reg = reg;
            let err = adaround(&model, samples(16, 41), forward, &cfg).unwrap_err();
            assert!(
                matches!(err, AdaRoundError::InvalidConfig(_)),
                "{reg}: {err:?}"
            );
        }
    }

    #[test]
    fn should_refine_only_the_layer_kinds_asked_and_lower_their_error() {
        use adaround::Refine;
        let _seed = crate::seed_lock();
        let model = net(44);
        let run = |refine| {
            let cfg = config(5)
                .with_target(adaround::Target::FloatModel)
                .with_refine(refine);
            adaround(&model, samples(32, 45), |m: &Net<B>, x| m.forward(x), &cfg)
                .unwrap()
                .1
        };
        let [off, dense, all] = [Refine::Off, Refine::Dense, Refine::All].map(run);
        let refined = |r: &adaround::AdaRoundReport, name: &str| {
            let layer = r.layers.iter().find(|l| l.name == name).unwrap();
            (layer.refined, layer.err_after)
        };
        for name in ["conv", "sep", "fc"] {
            assert_eq!(refined(&off, name).0, 0, "{name}: off");
        }
        assert_eq!(refined(&dense, "conv").0, 0);
        assert_eq!(refined(&dense, "sep").0, 0);
        let ((flips, err), (_, err_off)) = (refined(&dense, "fc"), refined(&off, "fc"));
        assert!(flips > 0, "a short run leaves flips to gain");
        // The same inputs (earlier layers unrefined): refinement only lowers the error.
        assert!(err < err_off, "fc: {err} not below {err_off}");
        let total: usize = ["conv", "sep", "fc"]
            .map(|n| refined(&all, n).0)
            .iter()
            .sum();
        assert!(total > flips, "all kinds refined: {total}");
    }

    /// The max scale per channel, as a custom quantizer: the refinement does not know that
    /// its scale follows the rounded weights (the driver checks the finalized layer instead).
    fn max_scale(w: &[f32], channels: usize, kmax: f64, _p: &[f64]) -> Vec<f32> {
        w.chunks(w.len() / channels)
            .map(|row| kmax as f32 / row.iter().fold(1e-10f32, |m, v| m.max(v.abs())))
            .collect()
    }

    #[test]
    fn should_keep_the_refinement_where_it_lowers_the_finalized_error_of_a_custom_scale() {
        use adaround::Refine;
        let _seed = crate::seed_lock();
        adaround::core::register_quantizer("driver-test-max", max_scale);
        let mut model = net(46);
        model.fc.quantizer = WeightQuantizer::Custom {
            name: "driver-test-max".into(),
            bitwidth: 3,
            per_axis: true,
            params: vec![],
        }
        .into();
        let run = |refine| {
            let cfg = config(5)
                .with_target(adaround::Target::FloatModel)
                .with_bias_correction(true)
                .with_refine(refine);
            let (_, report) =
                adaround(&model, samples(32, 47), |m: &Net<B>, x| m.forward(x), &cfg).unwrap();
            report.layers.into_iter().find(|l| l.name == "fc").unwrap()
        };
        let (off, dense) = (run(Refine::Off), run(Refine::Dense));
        // The same AdaRound run up to the refinement, whose flips are kept where the
        // finalized layer (its scale taken again from the rounded weights) ends lower.
        assert!(dense.refined > 0, "the refinement was undone");
        assert!(
            dense.err_final < off.err_final,
            "fc: {} not below {}",
            dense.err_final,
            off.err_final
        );
    }

    fn zero_scale(_w: &[f32], channels: usize, _kmax: f64, _p: &[f64]) -> Vec<f32> {
        vec![0.0; channels]
    }

    #[test]
    fn should_name_the_layer_of_a_bad_or_unregistered_custom_quantizer_before_optimising() {
        let _seed = crate::seed_lock();
        adaround::core::register_quantizer("driver-test-zero", zero_scale);
        for (name, expected) in [
            ("driver-test-zero", "must return"),
            ("driver-test-unregistered", "no custom quantizer"),
        ] {
            let mut model = net(42);
            let custom = WeightQuantizer::Custom {
                name: name.into(),
                bitwidth: 4,
                per_axis: true,
                params: vec![],
            };
            model.fc.quantizer = custom.into();
            let mut started = 0;
            let err = adaround_with_progress(
                &model,
                samples(16, 43),
                |m: &Net<B>, x| m.forward(x),
                &config(2),
                |p| started += matches!(p, adaround::Progress::LayerStarted { .. }) as usize,
            )
            .unwrap_err();
            match err {
                AdaRoundError::Quantizer { layer, source } => {
                    assert_eq!(layer, "fc");
                    assert!(source.to_string().contains(expected), "{source}");
                }
                other => panic!("unexpected {other:?}"),
            }
            assert_eq!(started, 0, "found before any layer is optimised");
        }
    }

    #[test]
    fn should_refuse_invalid_quantizers_when_deserialising() {
        for bad in [
            r#"{"kind":"Max","bitwidth":1}"#,
            r#"{"kind":"MaxPerAxis","bitwidth":65}"#,
            r#"{"kind":"Max","bitwidth":0}"#,
            r#"{"kind":"Std","bitwidth":4,"threshold":-1.0}"#,
        ] {
            assert!(
                serde_json::from_str::<WeightQuantizer>(bad).is_err(),
                "{bad}"
            );
        }
        let good: WeightQuantizer = serde_json::from_str(r#"{"kind":"Max","bitwidth":4}"#).unwrap();
        assert_eq!(good, WeightQuantizer::max(4).unwrap());
    }

    #[test]
    fn should_bind_a_checkpoint_to_its_model_samples_and_quantizers_and_refuse_damaged_files() {
        let _seed = crate::seed_lock();
        let dir = std::env::temp_dir().join(format!("adaround-bound-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let cfg = config(3)
            .with_run(adaround::RunConfig::new().with_checkpoint(Some(dir.display().to_string())));
        let forward = |m: &Net<B>, x| m.forward(x);
        let model = net(50);
        let x = samples(16, 51);
        let (_, partial) = adaround(
            &model,
            x.clone(),
            forward,
            &cfg.clone()
                .with_run(cfg.run.clone().with_stop_after(Some(2))),
        )
        .unwrap();
        assert_eq!(partial.layers.len(), 2);
        let mismatch = |m: &Net<B>, x: Tensor<B, 4>| match adaround(m, x, forward, &cfg) {
            Err(AdaRoundError::CheckpointMismatch { what, .. }) => what,
            other => panic!("expected a mismatch, got {:?}", other.map(|_| ())),
        };
        let mut w3 = model.clone();
        w3.fc.quantizer = WeightQuantizer::max_per_axis(2).unwrap().into();
        assert_eq!(mismatch(&w3, x.clone()), "quantizers");
        // An activation's range is part of the model the rounding was computed for.
        let mut relu = model.clone();
        relu.act1.max_value *= 2.0;
        assert_eq!(mismatch(&relu, x.clone()), "quantizers");
        let mut halved = model.clone();
        halved.fc.weight = halved.fc.weight.map(|w| w.div_scalar(2.0));
        assert_eq!(mismatch(&halved, x.clone()), "float weights");
        assert_eq!(mismatch(&model, samples(16, 52)), "calibration samples");

        // Damaged files: typed errors, never panics, and the checkpoint is not overwritten.
        let progress = dir.join("progress.json");
        let model_file = dir.join("model-2.bin");
        let (good_progress, good_model) = (
            std::fs::read(&progress).unwrap(),
            std::fs::read(&model_file).unwrap(),
        );
        let text = String::from_utf8(good_progress.clone()).unwrap();
        let extra = {
            let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
            let done = v["done"].as_array().unwrap().clone();
            v["done"] = serde_json::Value::Array([done.clone(), done.clone(), done].concat());
            v.to_string().into_bytes()
        };
        let mut flipped = good_model.clone();
        let mid = flipped.len() / 2;
        flipped[mid] ^= 0x10;
        let cases: Vec<(&std::path::Path, Vec<u8>)> = vec![
            (&progress, good_progress[..good_progress.len() / 2].to_vec()),
            (&progress, b"\x00\x01 not json".to_vec()),
            (&progress, extra),
            (&model_file, good_model[..good_model.len() / 3].to_vec()),
            (&model_file, flipped),
            (&model_file, vec![7; good_model.len()]),
        ];
        for (i, (file, bytes)) in cases.into_iter().enumerate() {
            std::fs::write(file, &bytes).unwrap();
            let err = adaround(&model, x.clone(), forward, &cfg)
                .map(|_| ())
                .unwrap_err();
            assert!(
                matches!(err, AdaRoundError::Checkpoint(ref m) if m.contains("damaged")),
                "case {i}: {err:?}"
            );
            assert_eq!(
                std::fs::read(file).unwrap(),
                bytes,
                "case {i}: the damaged file is left as it was"
            );
            std::fs::write(&progress, &good_progress).unwrap();
            std::fs::write(&model_file, &good_model).unwrap();
        }
        // Edited but well-formed: a report's error changed by one digit, and a finished
        // layer's weight forged with every checksum recomputed (the model file's and the
        // seal: 64-bit FNV-1a over the JSON value with the seal empty).
        let good: serde_json::Value = serde_json::from_str(&text).unwrap();
        let mut edited = good.clone();
        let err = edited["done"][0]["err_final"].as_f64().unwrap();
        edited["done"][0]["err_final"] = (err * 1.1).into();
        std::fs::write(&progress, edited.to_string()).unwrap();
        let err = adaround(&model, x.clone(), forward, &cfg)
            .map(|_| ())
            .unwrap_err();
        assert!(
            matches!(err, AdaRoundError::Checkpoint(ref m) if m.contains("checksum")),
            "{err:?}"
        );
        // The seal recomputed too: then the report is taken as written (the seal protects
        // against damage and edits by mistake, not against forgery; the weights below are
        // what matters).
        std::fs::write(&progress, sealed(edited)).unwrap();
        assert!(adaround(&model, x.clone(), forward, &cfg).is_ok());
        use burn::record::{BinBytesRecorder, FullPrecisionSettings, Recorder};
        let recorder = BinBytesRecorder::<FullPrecisionSettings>::default();
        for (layer, finished) in [("conv", true), ("fc", false)] {
            let record = recorder
                .load(good_model.clone(), &Default::default())
                .unwrap();
            let mut forged = model.clone().load_record(record);
            match layer {
                "conv" => {
                    forged.conv.weight = forged.conv.weight.map(|w| {
                        let one = Tensor::<B, 4>::full([1, 1, 1, 1], 1000.0, &w.device());
                        w.slice_assign([0..1, 0..1, 0..1, 0..1], one)
                    })
                }
                _ => {
                    forged.fc.weight = forged.fc.weight.map(|w| {
                        let one = Tensor::<B, 2>::full([1, 1], 1000.0, &w.device());
                        w.slice_assign([0..1, 0..1], one)
                    })
                }
            }
            let bytes = recorder.record(forged.into_record(), ()).unwrap();
            let mut v = good.clone();
            v["model_checksum"] = fnv(&bytes).into();
            std::fs::write(&model_file, &bytes).unwrap();
            std::fs::write(&progress, sealed(v)).unwrap();
            let err = adaround(&model, x.clone(), forward, &cfg)
                .map(|_| ())
                .unwrap_err();
            let state = if finished {
                "a rounding"
            } else {
                "its float weights"
            };
            assert!(
                matches!(err, AdaRoundError::Checkpoint(ref m)
                    if m.contains(&format!("`{layer}`")) && m.contains(state)),
                "{layer}: {err:?}"
            );
        }
        std::fs::write(&progress, &good_progress).unwrap();
        std::fs::write(&model_file, &good_model).unwrap();
        // Restored, it resumes with both finished layers.
        let (_, report) = adaround(&model, x, forward, &cfg).unwrap();
        assert_eq!(report.layers[..2], partial.layers[..]);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn should_return_a_panicking_progress_callback_as_an_error() {
        let _seed = crate::seed_lock();
        let model = net(70);
        let before = snapshot(&model);
        for at_step in [true, false] {
            let result = adaround_with_progress(
                &model,
                samples(16, 71),
                |m: &Net<B>, x| m.forward(x),
                &config(2),
                |p| match p {
                    adaround::Progress::Step { .. } if at_step => panic!("callback failed (step)"),
                    adaround::Progress::LayerFinished { .. } if !at_step => {
                        panic!("callback failed (layer)")
                    }
                    _ => {}
                },
            );
            match result {
                Err(AdaRoundError::Progress(m)) => assert!(m.contains("callback failed"), "{m}"),
                other => panic!("expected a progress error, got {:?}", other.map(|_| ())),
            }
        }
        assert_eq!(snapshot(&model), before, "the caller's model is untouched");
    }

    #[test]
    fn should_refuse_to_resume_after_any_change_of_setting_config_or_layer() {
        use adaround::{
            Elementwise, FinalRounding, ModelGuard, Refine, RoundingMethod, SeparableStep, Target,
        };
        let _seed = crate::seed_lock();
        let dir = std::env::temp_dir().join(format!("adaround-fields-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let base = config(2)
            .with_batch_size(Some(8))
            .with_run(adaround::RunConfig::new().with_checkpoint(Some(dir.display().to_string())));
        let forward = |m: &Net<B>, x| m.forward(x);
        let (model, x) = (net(64), samples(16, 65));
        adaround(
            &model,
            x.clone(),
            forward,
            &base
                .clone()
                .with_run(base.run.clone().with_stop_after(Some(1))),
        )
        .unwrap();
        let files = |d: &std::path::Path| {
            let mut names: Vec<_> = std::fs::read_dir(d)
                .unwrap()
                .flatten()
                .map(|e| (e.file_name(), std::fs::read(e.path()).unwrap()))
                .collect();
            names.sort();
            names
        };
        let kept = files(&dir);
        let params = base.params.clone();
        // Every field of the configuration but the two run controls, one at a time.
        let changed: Vec<(&str, AdaRoundConfig)> = vec![
            (
                "schedule",
                AdaRoundConfig {
                    schedule: Schedule::epochs(3),
                    ..base.clone()
                },
            ),
            ("batch_size", base.clone().with_batch_size(Some(16))),
            ("learning_rate", base.clone().with_learning_rate(2e-2)),
            (
                "loss",
                base.clone().with_loss(ReconstructionLoss::ChannelSum),
            ),
            (
                "include_activation",
                base.clone().with_include_activation(true),
            ),
            ("relu_loss", base.clone().with_relu_loss(true)),
            (
                "relu_layers",
                base.clone()
                    .with_relu_loss(true)
                    .with_relu_layers(vec!["conv".into()]),
            ),
            ("target", base.clone().with_target(Target::FloatModel)),
            ("rounding", base.clone().with_rounding(FinalRounding::Hard)),
            (
                "never_worse",
                base.clone().with_never_worse(!base.never_worse),
            ),
            (
                "bias_correction",
                base.clone().with_bias_correction(!base.bias_correction),
            ),
            ("refine", base.clone().with_refine(Refine::All)),
            ("method", base.clone().with_method(RoundingMethod::Gptq)),
            (
                "params.gamma",
                base.clone().with_params(params.clone().with_gamma(-0.2)),
            ),
            (
                "params.zeta",
                base.clone().with_params(params.clone().with_zeta(1.2)),
            ),
            (
                "params.beta_start",
                base.clone()
                    .with_params(params.clone().with_beta_start(10.0)),
            ),
            (
                "params.beta_end",
                base.clone().with_params(params.clone().with_beta_end(3.0)),
            ),
            (
                "params.reg",
                base.clone().with_params(params.clone().with_reg(0.02)),
            ),
            (
                "performance.path",
                base.clone().with_performance(
                    adaround::PerformanceConfig::new().with_path(LossPath::Direct),
                ),
            ),
            (
                "separable",
                base.clone().with_separable(SeparableStep::Joint),
            ),
            (
                "run.log_every",
                base.clone().with_run(base.run.clone().with_log_every(7)),
            ),
            (
                "model_guard",
                base.clone().with_model_guard(ModelGuard::KeepBetter),
            ),
            (
                "performance.elementwise",
                base.clone().with_performance(
                    adaround::PerformanceConfig::new().with_elementwise(Elementwise::Device),
                ),
            ),
            (
                "block",
                base.clone()
                    .with_block(adaround::BlockConfig::new().with_samples_per_step(Some(4))),
            ),
        ];
        for (field, cfg) in changed {
            assert_ne!(
                serde_json::to_string(&cfg).unwrap(),
                serde_json::to_string(&base).unwrap(),
                "{field}: the variant differs"
            );
            match adaround(&model, x.clone(), forward, &cfg) {
                Err(AdaRoundError::CheckpointMismatch { what, .. }) => {
                    assert_eq!(what, "configuration", "{field}")
                }
                // This model's last layer has no activation after it: refused before the
                // checkpoint is read.
                Err(AdaRoundError::NoFollowingActivation { .. })
                    if field == "include_activation" => {}
                other => panic!(
                    "{field}: expected a refused resume, got {:?}",
                    other.map(|_| ())
                ),
            }
            assert!(
                files(&dir) == kept,
                "{field}: the checkpoint is left as it was"
            );
        }
        // Every layer's quantizer, the activations' settings, and every layer's float weights.
        let mut models: Vec<(&str, Net<B>, &str)> = Vec::new();
        let q = || WeightQuantizer::max_per_axis(2).unwrap().into();
        let mut m = model.clone();
        m.conv.quantizer = q();
        models.push(("conv quantizer", m, "quantizers"));
        let mut m = model.clone();
        m.sep.quantizer_dw = q();
        models.push(("sep depthwise quantizer", m, "quantizers"));
        let mut m = model.clone();
        m.sep.quantizer = q();
        models.push(("sep pointwise quantizer", m, "quantizers"));
        let mut m = model.clone();
        m.fc.quantizer = q();
        models.push(("fc quantizer", m, "quantizers"));
        let mut m = model.clone();
        m.act1.bitwidth = 4;
        models.push(("act1 bitwidth", m, "quantizers"));
        let mut m = model.clone();
        m.act2.max_value *= 0.5;
        models.push(("act2 max_value", m, "quantizers"));
        let halve = |w: Tensor<B, 4>| w.mul_scalar(0.5);
        let mut m = model.clone();
        m.conv.weight = m.conv.weight.map(halve);
        models.push(("conv weights", m, "float weights"));
        let mut m = model.clone();
        m.sep.weight = m.sep.weight.map(halve);
        models.push(("sep weights", m, "float weights"));
        let mut m = model.clone();
        m.fc.bias = m.fc.bias.map(|b| b.map(|t| t.add_scalar(0.5)));
        models.push(("fc bias", m, "float weights"));
        for (change, m, expected) in models {
            match adaround(&m, x.clone(), forward, &base) {
                Err(AdaRoundError::CheckpointMismatch { what, .. }) => {
                    assert_eq!(what, expected, "{change}")
                }
                other => panic!(
                    "{change}: expected a refused resume, got {:?}",
                    other.map(|_| ())
                ),
            }
        }
        // The run controls are not part of it: the same run resumes.
        let (_, report) = adaround(
            &model,
            x,
            forward,
            &base
                .clone()
                .with_run(base.run.clone().with_stop_after(Some(1))),
        )
        .unwrap();
        assert_eq!(
            report.layers.len(),
            2,
            "resumed after the first layer, then one more"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn should_round_with_gptq_without_steps_and_below_nearest_error() {
        let _seed = crate::seed_lock();
        let (model, x) = (net(80), samples(32, 81));
        let cfg = config(2)
            .with_method(adaround::RoundingMethod::Gptq)
            .with_never_worse(false);
        let (rounded, report) =
            adaround(&model, x.clone(), |m: &Net<B>, x| m.forward(x), &cfg).unwrap();
        assert_eq!(report.layers.len(), 3);
        for layer in &report.layers {
            // The separable layer is split in two Conv2D problems, each rounded by GPTQ.
            assert_eq!(layer.steps, 0, "{}: no schedule", layer.name);
            assert!(
                layer.err_final.is_finite() && layer.err_final < layer.err_before,
                "{layer:?}"
            );
        }
        assert!(report.changed() > 0);
        assert_ne!(snapshot(&rounded), snapshot(&model));
    }

    #[test]
    fn should_start_adaround_from_gptqs_decisions() {
        use adaround::RoundingMethod;
        let _seed = crate::seed_lock();
        let (model, x) = (net(82), samples(32, 83));
        // Steps too small to move any decision: AdaRound ends where it starts.
        let frozen = |method| {
            let cfg = config(2)
                .with_method(method)
                .with_learning_rate(1e-12)
                .with_rounding(FinalRounding::Hard)
                .with_never_worse(false);
            adaround(&model, x.clone(), |m: &Net<B>, x| m.forward(x), &cfg).unwrap()
        };
        let (gptq, gptq_report) = frozen(RoundingMethod::Gptq);
        let (started, started_report) = frozen(RoundingMethod::GptqThenAdaRound);
        let (plain, _) = frozen(RoundingMethod::AdaRound);
        assert_eq!(snapshot(&started), snapshot(&gptq), "GPTQ's decisions");
        assert_ne!(snapshot(&plain), snapshot(&gptq), "not nearest rounding's");
        for (g, s) in gptq_report.layers.iter().zip(&started_report.layers) {
            assert_eq!((g.steps, s.steps > 0), (0, true), "{}", s.name);
        }
    }

    #[test]
    fn should_write_seqmse_grids_that_the_finalized_quantizers_keep() {
        let _seed = crate::seed_lock();
        let x = samples(32, 85);
        for q in [
            full_range_w2(),
            WeightQuantizer::max_per_axis(3).unwrap(),
            WeightQuantizer::mse(3, true, adaround::Grid::Asymmetric).unwrap(),
        ] {
            let model = net_with(84, q.clone());
            let run = |search| {
                // Hard rounding writes the kernels on the grid (soft keeps the roamers).
                let cfg = config(3)
                    .with_target(adaround::Target::FloatModel)
                    .with_rounding(FinalRounding::Hard)
                    .with_scale_search(search);
                adaround(&model, x.clone(), |m: &Net<B>, x| m.forward(x), &cfg).unwrap()
            };
            let (rounded, report) = run(adaround::ScaleSearch::SeqMse);
            let (_, own) = run(adaround::ScaleSearch::Quantizer);
            for layer in &report.layers {
                assert!(layer.err_final <= layer.err_before, "{q:?}: {layer:?}");
                // The report says each kernel's grid: SeqMSE's, whose nearest rounding is at
                // most the quantizer's own (one of its candidates).
                for kernel in &layer.kernels {
                    match &kernel.scales {
                        Some(adaround::ScaleOutcome::SeqMse {
                            own_error,
                            chosen_error,
                            mean_ratio,
                            ..
                        }) => assert!(
                            chosen_error <= own_error && *mean_ratio > 0.0 && *mean_ratio <= 1.0,
                            "{q:?} {}: {:?}",
                            layer.name,
                            kernel.scales
                        ),
                        other => panic!("{q:?} {}: {other:?}", layer.name),
                    }
                }
            }
            let kernels = || own.layers.iter().flat_map(|l| &l.kernels);
            assert!(
                kernels().all(|k| k.scales.is_none()),
                "no search, no outcome"
            );
            let total = |r: &adaround::AdaRoundReport| -> f64 {
                r.layers.iter().map(|l| l.err_final).sum()
            };
            assert_ne!(total(&report), total(&own), "{q:?}: the scales changed");
            for (w, quantizer, axis) in [
                (
                    rounded.conv.weight.val(),
                    rounded.conv.quantizer.quantizer(),
                    0,
                ),
                (
                    rounded.sep.weight.val(),
                    rounded.sep.quantizer.quantizer(),
                    0,
                ),
            ] {
                let off = (quantizer.quantize(w.clone(), axis) - w)
                    .abs()
                    .max()
                    .into_scalar();
                assert!(off < 1e-6, "{q:?}: weights off the grid by {off}");
            }
            let fc = rounded.fc.weight.val();
            let quantizer = rounded.fc.quantizer.quantizer();
            let off = (quantizer.quantize(fc.clone(), 1) - fc)
                .abs()
                .max()
                .into_scalar();
            assert!(off < 1e-6, "{q:?}: fc off the grid by {off}");
        }
    }

    #[test]
    fn should_return_the_candidate_closest_to_the_float_model_on_the_validation_samples() {
        use adaround::{AdaRound, Candidate, RoundingMethod};
        let _seed = crate::seed_lock();
        let (model, x, validation) = (net(86), samples(32, 87), samples(40, 88));
        let forward = |m: &Net<B>, x| m.forward(x);
        let candidates = [
            Candidate::new("AdaRound", config(3)),
            Candidate::new("GPTQ", config(3).with_method(RoundingMethod::Gptq)),
            Candidate::new("one epoch", config(1).with_never_worse(false)),
        ];
        let (rounded, report, choice) = AdaRound::new(config(1))
            .run_choosing(
                &model,
                (x.clone(), validation.clone()),
                &candidates,
                forward,
            )
            .unwrap();
        let float = model.forward_float_reference(validation.clone());
        let error = |m: &Net<B>| -> f64 {
            let d = m.forward(validation.clone()) - float.clone();
            d.powi_scalar(2).mean().into_scalar().elem::<f64>()
        };
        assert!((choice.nearest_error - error(&model)).abs() <= 1e-5 * error(&model));
        let names: Vec<&str> = choice.candidates.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["AdaRound", "GPTQ", "one epoch"]);
        let lowest = choice
            .candidates
            .iter()
            .map(|c| c.validation_error)
            .fold(f64::INFINITY, f64::min);
        assert_eq!(choice.chosen().validation_error, lowest);
        let returned = error(&rounded);
        assert!(
            (returned - lowest).abs() <= 1e-5 * lowest,
            "{returned} vs {lowest}"
        );
        // The chosen candidate's own run gives the same model and report.
        let chosen = &candidates[choice.chosen];
        let (alone, alone_report) = adaround(&model, x.clone(), forward, &chosen.config).unwrap();
        assert_eq!(snapshot(&alone), snapshot(&rounded));
        assert_eq!(alone_report.layers.len(), report.layers.len());
        // Block reconstruction without blocks, and no candidates: typed errors.
        let blocks = [Candidate::new("blocks", config(1)).with_block_reconstruction()];
        for candidates in [&blocks[..], &[]] {
            let err = AdaRound::new(config(1))
                .run_choosing(&model, (x.clone(), validation.clone()), candidates, forward)
                .unwrap_err();
            assert!(matches!(err, AdaRoundError::InvalidConfig(_)), "{err:?}");
        }
    }

    proptest::proptest! {
        // A fixed seed: the same cases on every run.
        #![proptest_config(proptest::prelude::ProptestConfig {
            cases: 48,
            rng_seed: proptest::test_runner::RngSeed::Fixed(39),
            failure_persistence: None,
            ..proptest::prelude::ProptestConfig::default()
        })]

        /// Whatever the weights' and samples' magnitudes, the quantizer and the options: a run
        /// returns `Ok` only with finite weights and errors, every layer's error at most
        /// nearest's (`never_worse`), and integers on every kernel's grid; otherwise a typed
        /// error, never a panic.
        #[test]
        fn should_return_ok_only_with_finite_on_grid_results(
            weight_exp in -8i32..=12,
            sample_exp in -8i32..=12,
            quantizer in 0usize..4,
            options in 0usize..16,
            seed in 0u64..1_000,
        ) {
            let _seed = crate::seed_lock();
            let q = match quantizer {
                0 => q3(),
                1 => WeightQuantizer::max(2).unwrap(),
                2 => full_range_w2(),
                _ => WeightQuantizer::mse(3, false, adaround::Grid::Asymmetric).unwrap(),
            };
            let mut model = net_with(seed, q);
            let scale = |w: Tensor<B, 4>| w.mul_scalar(10f64.powi(weight_exp));
            model.conv.weight = model.conv.weight.map(scale);
            model.fc.weight = model.fc.weight.map(|w| w.mul_scalar(10f64.powi(weight_exp)));
            let x = samples(16, seed + 1).mul_scalar(10f64.powi(sample_exp));
            let cfg = config(2)
                .with_batch_size(Some(8))
                .with_target(if options & 1 == 1 { adaround::Target::FloatModel } else { adaround::Target::QuantizedInputs })
                .with_bias_correction(options & 2 == 2)
                .with_refine(if options & 4 == 4 { adaround::Refine::All } else { adaround::Refine::Off })
                .with_method(if options & 8 == 8 { adaround::RoundingMethod::Gptq } else { adaround::RoundingMethod::AdaRound });
            let forward = |m: &Net<B>, x| m.forward(x);
            if let Ok((rounded, report)) = adaround(&model, x.clone(), forward, &cfg) {
                for (_, values) in snapshot(&rounded) {
                    proptest::prop_assert!(values.iter().all(|v| v.is_finite()));
                }
                for layer in &report.layers {
                    proptest::prop_assert!(layer.err_before.is_finite() && layer.err_final.is_finite());
                    proptest::prop_assert!(layer.err_final <= layer.err_before * (1.0 + 1e-6), "{layer:?}");
                }
                let exported = export_integers(&rounded, x.narrow(0, 0, 1), forward);
                let exported = exported.map_err(|e| proptest::test_runner::TestCaseError::fail(format!("{e}")))?;
                for k in &exported.kernels {
                    let (lo, hi) = k.grid.levels(k.bitwidth);
                    proptest::prop_assert!(k.integers.iter().all(|&i| (lo as i32..=hi as i32).contains(&i)), "{}", k.layer);
                    proptest::prop_assert!(k.scale_factors.iter().all(|s| s.is_finite() && *s > 0.0));
                }
            }
        }
    }

    /// 64-bit FNV-1a, as the checkpoint's checksums.
    fn fnv(bytes: &[u8]) -> String {
        let h = bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        });
        format!("{h:016x}")
    }

    /// An edited `progress.json` value with its seal recomputed, as bytes.
    fn sealed(mut v: serde_json::Value) -> Vec<u8> {
        v["seal"] = "".into();
        let seal = fnv(v.to_string().as_bytes());
        v["seal"] = seal.into();
        v.to_string().into_bytes()
    }

    /// The finished layers a run resumed with (from its progress events).
    fn resumed_after(model: &Net<B>, x: Tensor<B, 4>, cfg: &AdaRoundConfig) -> (Net<B>, usize) {
        let mut started = 0;
        let (out, report) = adaround_with_progress(
            model,
            x,
            |m: &Net<B>, x| m.forward(x),
            cfg,
            |p| started += matches!(p, adaround::Progress::LayerStarted { .. }) as usize,
        )
        .unwrap();
        (out, report.layers.len() - started)
    }

    #[test]
    fn should_keep_the_last_complete_checkpoint_through_a_crash_between_any_two_writes() {
        let _seed = crate::seed_lock();
        let dir = std::env::temp_dir().join(format!("adaround-crash-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let cfg = config(3)
            .with_run(adaround::RunConfig::new().with_checkpoint(Some(dir.display().to_string())));
        let (model, x) = (net(60), samples(16, 61));
        let forward = |m: &Net<B>, x| m.forward(x);
        let (full, _) = adaround(&model, x.clone(), forward, &config(3)).unwrap();
        let values = |m: &Net<B>| snapshot(m).into_iter().map(|(_, v)| v).collect::<Vec<_>>();
        // The checkpoint after one layer (A), then after two (B): B's save writes
        // `model-2.tmp`, renames it, writes `progress.tmp`, renames it, removes
        // `model-1.bin`.
        let one = cfg
            .clone()
            .with_run(cfg.run.clone().with_stop_after(Some(1)));
        adaround(&model, x.clone(), forward, &one).unwrap();
        let read = |name: &str| std::fs::read(dir.join(name)).unwrap();
        let (progress_a, model_a) = (read("progress.json"), read("model-1.bin"));
        adaround(&model, x.clone(), forward, &one).unwrap();
        let (progress_b, model_b) = (read("progress.json"), read("model-2.bin"));
        assert!(
            !dir.join("model-1.bin").exists(),
            "the older model file is removed"
        );
        let half = |b: &[u8]| b[..b.len() / 2].to_vec();
        type Files = Vec<(&'static str, Vec<u8>)>;
        let crashes: Vec<(&str, Files, usize)> = vec![
            (
                "while writing model-2",
                vec![("model-2.tmp", half(&model_b))],
                1,
            ),
            (
                "after renaming model-2",
                vec![("model-2.bin", model_b.clone())],
                1,
            ),
            (
                "while writing progress",
                vec![
                    ("model-2.bin", model_b.clone()),
                    ("progress.tmp", half(&progress_b)),
                ],
                1,
            ),
            (
                "after renaming progress",
                vec![
                    ("model-2.bin", model_b.clone()),
                    ("progress.json", progress_b.clone()),
                ],
                2,
            ),
        ];
        for (when, files, finished) in crashes {
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join("progress.json"), &progress_a).unwrap();
            std::fs::write(dir.join("model-1.bin"), &model_a).unwrap();
            for (name, bytes) in files {
                std::fs::write(dir.join(name), bytes).unwrap();
            }
            let (out, resumed) = resumed_after(&model, x.clone(), &cfg);
            assert_eq!(resumed, finished, "crash {when}: finished layers kept");
            assert_eq!(values(&out), values(&full), "crash {when}: same result");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn should_refuse_a_checkpoint_whose_model_file_holds_other_quantizers() {
        let _seed = crate::seed_lock();
        let base = std::env::temp_dir().join(format!("adaround-swap-{}", std::process::id()));
        let (ours, theirs) = (base.join("ours"), base.join("theirs"));
        let _ = std::fs::remove_dir_all(&base);
        let with = |d: &std::path::Path| {
            config(2).with_run(
                adaround::RunConfig::new()
                    .with_checkpoint(Some(d.display().to_string()))
                    .with_stop_after(Some(1)),
            )
        };
        let forward = |m: &Net<B>, x| m.forward(x);
        let (model, x) = (net(62), samples(16, 63));
        let mut other = model.clone();
        other.fc.quantizer = WeightQuantizer::max_per_axis(2).unwrap().into();
        adaround(&model, x.clone(), forward, &with(&ours)).unwrap();
        adaround(&other, x.clone(), forward, &with(&theirs)).unwrap();
        // The other run's model file, with its checksum written into our progress file: the
        // file is intact, but what it holds is not what this run was started with.
        let json = |d: &std::path::Path| -> serde_json::Value {
            serde_json::from_slice(&std::fs::read(d.join("progress.json")).unwrap()).unwrap()
        };
        let mut progress = json(&ours);
        progress["model_checksum"] = json(&theirs)["model_checksum"].clone();
        std::fs::write(ours.join("progress.json"), sealed(progress)).unwrap();
        std::fs::copy(theirs.join("model-1.bin"), ours.join("model-1.bin")).unwrap();
        let err = adaround(
            &model,
            x,
            forward,
            &with(&ours).with_run(with(&ours).run.with_stop_after(None)),
        )
        .map(|_| ())
        .unwrap_err();
        assert!(
            matches!(
                err,
                AdaRoundError::CheckpointMismatch {
                    what: "quantizers in the checkpoint",
                    ..
                }
            ),
            "{err:?}"
        );
        let _ = std::fs::remove_dir_all(&base);
    }

    #[test]
    fn should_refuse_to_export_a_quantizer_built_with_an_invalid_bitwidth() {
        let mut model = net(64);
        for bitwidth in [0, 1, 17, 32, 65] {
            model.fc.quantizer = WeightQuantizer::Max { bitwidth }.into();
            let err = export_integers(&model, samples(2, 65), |m: &Net<B>, x| m.forward(x))
                .map(|_| ())
                .unwrap_err();
            assert!(
                matches!(&err, AdaRoundError::Quantizer { layer, .. } if layer == "fc"),
                "{bitwidth}: {err:?}"
            );
            let err = adaround(
                &model,
                samples(16, 65),
                |m: &Net<B>, x| m.forward(x),
                &config(1),
            )
            .map(|_| ())
            .unwrap_err();
            assert!(
                matches!(&err, AdaRoundError::Quantizer { layer, .. } if layer == "fc"),
                "{bitwidth}: {err:?}"
            );
        }
    }

    #[test]
    fn should_refuse_an_unwritable_checkpoint_folder_before_optimising() {
        let file = std::env::temp_dir().join(format!("adaround-not-a-dir-{}", std::process::id()));
        std::fs::write(&file, b"a file").unwrap();
        let cfg = config(2).with_run(
            adaround::RunConfig::new()
                .with_checkpoint(Some(file.join("sub").display().to_string())),
        );
        let mut started = 0;
        let err = adaround_with_progress(
            &net(53),
            samples(16, 54),
            |m: &Net<B>, x| m.forward(x),
            &cfg,
            |p| started += matches!(p, adaround::Progress::LayerStarted { .. }) as usize,
        )
        .map(|_| ())
        .unwrap_err();
        assert!(matches!(err, AdaRoundError::Checkpoint(_)), "{err:?}");
        assert_eq!(started, 0);
        let _ = std::fs::remove_file(&file);
    }

    #[test]
    fn should_refuse_a_model_on_an_autodiff_backend() {
        type Ad = burn_autodiff::Autodiff<burn_ndarray::NdArray<f32>>;
        let device = Default::default();
        let model = QuantizedDenseConfig::new(4, 3)
            .with_quantizer(q3())
            .init::<Ad>(&device);
        let x = Tensor::<Ad, 2>::random([8, 4], Distribution::Default, &device);
        let err = adaround(&model, x, |m, x| m.forward(x), &config(1)).unwrap_err();
        assert_eq!(err, AdaRoundError::AutodiffModel);
    }
}

/// Block reconstruction ([`AdaRound::with_blocks`](adaround::AdaRound::with_blocks)) on a
/// small MLP in two stages: two Dense layers with a ReLU between, then the head.
mod blocks {
    use adaround::{
        layers::{probe::Flow, QuantizedDense, QuantizedDenseConfig},
        AdaRound, AdaRoundConfig, AdaRoundError, BlockConfig, BlockInit, Schedule, Stage, Target,
        WeightQuantizer,
    };
    use burn::{
        module::Module,
        tensor::{activation::relu, backend::Backend, Distribution, Tensor},
    };

    type N = burn_ndarray::NdArray<f32>;
    type Ad = burn_autodiff::Autodiff<N>;

    #[derive(Module, Debug)]
    struct Mlp<B: Backend> {
        l1: QuantizedDense<B>,
        l2: QuantizedDense<B>,
        head: QuantizedDense<B>,
    }

    impl<B: Backend> Mlp<B> {
        fn body(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
            relu(self.l2.forward(relu(self.l1.forward(x))))
        }

        fn forward(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
            self.head.forward(self.body(x))
        }

        fn stages<'a>() -> Vec<Stage<'a, B, Self>> {
            vec![
                Box::new(|m: &Self, x: Flow<B>| Flow::Rows(m.body(rows(x)))),
                Box::new(|m: &Self, x: Flow<B>| Flow::Rows(m.head.forward(rows(x)))),
            ]
        }
    }

    fn rows<B: Backend>(x: Flow<B>) -> Tensor<B, 2> {
        match x {
            Flow::Rows(t) => t,
            Flow::Maps(_) => panic!("rows expected"),
        }
    }

    fn mlp(bits: u32) -> Mlp<N> {
        let device = Default::default();
        N::seed(&device, 11);
        let q = WeightQuantizer::max_per_axis(bits).unwrap();
        let dense = |i, o| {
            QuantizedDenseConfig::new(i, o)
                .with_quantizer(q.clone())
                .init(&device)
        };
        Mlp {
            l1: dense(16, 32),
            l2: dense(32, 32),
            head: dense(32, 4),
        }
    }

    fn samples(n: usize) -> Tensor<N, 2> {
        let device = Default::default();
        N::seed(&device, 12);
        Tensor::random([n, 16], Distribution::Normal(0.0, 1.0), &device)
    }

    fn config(init: BlockInit) -> AdaRoundConfig {
        AdaRoundConfig::new(Schedule::warm_cosine(200))
            .with_learning_rate(1e-2)
            .with_batch_size(Some(32))
            .with_target(Target::FloatModel)
            .with_never_worse(true)
            .with_block(
                BlockConfig::new()
                    .with_schedule(Schedule::warm_cosine(1000))
                    .with_samples_per_step(None)
                    .with_learning_rate(1e-2)
                    .with_init(init),
            )
    }

    fn run(
        model: &Mlp<N>,
        cfg: &AdaRoundConfig,
        blocks: bool,
    ) -> (Mlp<N>, adaround::AdaRoundReport) {
        let mut run = AdaRound::new(cfg.clone()).with_stages(Mlp::<N>::stages());
        if blocks {
            run = run.with_blocks(Mlp::<Ad>::stages());
        }
        run.run(model, samples(64), |m, x| m.forward(x)).unwrap()
    }

    /// The body block's output error with the rounded weights, against the float body.
    fn body_error(float: &Mlp<N>, rounded: &Mlp<N>) -> f64 {
        let x = samples(64);
        let float_out = relu(
            float
                .l2
                .forward_float(relu(float.l1.forward_float(x.clone()))),
        );
        let out = rounded.body(x);
        (out - float_out).powi_scalar(2).mean().into_scalar() as f64
    }

    #[test]
    fn should_start_each_block_on_the_grids_seqmse_searched_layer_by_layer() {
        use adaround::{FinalRounding, Grid, ScaleSearch};
        let _seed = crate::seed_lock();
        let mut model = mlp(3);
        // SeqMSE's quantizers (max, MSE asymmetric: scale and offset searched) and one that
        // keeps its scale (standard deviation).
        model.l2.quantizer = WeightQuantizer::std_per_axis(3, 3.0).unwrap().into();
        model.head.quantizer = WeightQuantizer::mse(3, true, Grid::Asymmetric)
            .unwrap()
            .into();
        let mut cfg = config(BlockInit::LayerWise)
            .with_scale_search(ScaleSearch::SeqMse)
            .with_rounding(FinalRounding::Hard)
            .with_never_worse(false);
        // Steps too small to change a decision: each block ends where it starts.
        cfg.block = cfg.block.with_learning_rate(1e-12);
        let (layer_wise, layer_report) = run(&model, &cfg, false);
        let (block, report) = run(&model, &cfg, true);
        assert!(report.layers.iter().all(|l| l.block.is_some()));
        // Both reports say which grid each kernel is on: SeqMSE's, and the standard
        // deviation layer's own (SeqMSE does not apply to it).
        for r in [&layer_report, &report] {
            for layer in &r.layers {
                let scales = &layer.kernels[0].scales;
                match layer.name.as_str() {
                    "l2" => assert_eq!(scales, &Some(adaround::ScaleOutcome::NotApplicable)),
                    _ => assert!(
                        matches!(scales, Some(adaround::ScaleOutcome::SeqMse { .. })),
                        "{}: {scales:?}",
                        layer.name
                    ),
                }
            }
        }
        // The same decisions; the scale read back from the rounded kernel differs from the
        // searched one by float rounding only (a changed decision moves a weight by a step).
        for (i, (a, b)) in snapshot(&block)
            .iter()
            .zip(snapshot(&layer_wise))
            .enumerate()
        {
            let worst = a
                .iter()
                .zip(&b)
                .map(|(x, y)| (x - y).abs())
                .fold(0f32, f32::max);
            assert!(
                worst < 1e-5,
                "parameter {i}: values differ by up to {worst}"
            );
        }
        // From BRECQ's fractional start no layer-wise run searched: the report says so.
        let mut fractional = cfg.clone();
        fractional.block = fractional.block.with_init(BlockInit::Fractional);
        let (_, report) = run(&model, &fractional, true);
        for layer in &report.layers {
            let scales = &layer.kernels[0].scales;
            assert_eq!(
                scales,
                &Some(adaround::ScaleOutcome::NotApplicable),
                "{}",
                layer.name
            );
        }
        let (own, _) = run(
            &model,
            &cfg.clone().with_scale_search(ScaleSearch::Quantizer),
            false,
        );
        assert_ne!(
            snapshot(&own),
            snapshot(&layer_wise),
            "SeqMSE moved the grids"
        );
    }

    #[test]
    fn should_reconstruct_each_block_below_layer_wise_rounding_and_keep_the_grid() {
        let _seed = crate::seed_lock();
        let model = mlp(2);
        let before = snapshot(&model);
        let (layer_wise, _) = run(&model, &config(BlockInit::Fractional), false);
        let layers = body_error(&model, &layer_wise);
        for init in [BlockInit::Fractional, BlockInit::LayerWise] {
            let (block, report) = run(&model, &config(init), true);
            assert_eq!(report.layers.len(), 3);
            for l in &report.layers {
                let stage = if l.name == "head" { 1 } else { 0 };
                assert_eq!(l.block, Some(stage), "{}", l.name);
                assert!(
                    l.err_final < l.err_before,
                    "{init:?} {}: {} not below nearest {}",
                    l.name,
                    l.err_final,
                    l.err_before
                );
                assert!(l.changed() > 0, "{}", l.name);
            }
            // The body's output error: the joint rounding is below the layer-wise one (from
            // layer-wise decisions, `never_worse` keeps them where the block ends above).
            let ours = body_error(&model, &block);
            let bound = if init == BlockInit::Fractional {
                0.9 * layers
            } else {
                layers * (1.0 + 1e-6)
            };
            assert!(
                ours < bound,
                "{init:?}: block {ours} vs layer-wise {layers}"
            );
            // Every kernel on its grid.
            for (w, q) in [&block.l1, &block.l2, &block.head]
                .map(|l| (l.weight.val(), l.quantizer.quantizer().clone()))
            {
                let off = (q.quantize(w.clone(), 1) - w).abs().max().into_scalar();
                assert!(off < 1e-5, "off the grid by {off}");
            }
        }
        // The model given is not touched.
        assert!(snapshot(&model) == before, "the caller's model changed");
    }

    /// Every float parameter's values, in visiting order.
    fn snapshot(m: &Mlp<N>) -> Vec<Vec<f32>> {
        struct Collect(Vec<Vec<f32>>);
        impl burn::module::ModuleVisitor<N> for Collect {
            fn visit_float<const D: usize>(&mut self, p: &burn::module::Param<Tensor<N, D>>) {
                self.0.push(p.val().into_data().to_vec().unwrap());
            }
        }
        let mut c = Collect(Vec::new());
        m.visit(&mut c);
        c.0
    }

    #[test]
    fn should_refuse_blocks_that_are_not_the_stages() {
        let model = mlp(3);
        let one: Vec<Stage<'_, Ad, Mlp<Ad>>> = Mlp::<Ad>::stages().into_iter().take(1).collect();
        let err = AdaRound::new(config(BlockInit::Fractional))
            .with_stages(Mlp::<N>::stages())
            .with_blocks(one)
            .run(&model, samples(32), |m, x| m.forward(x))
            .unwrap_err();
        assert!(
            matches!(err, AdaRoundError::Stages(ref m) if m.contains("1 blocks for 2 stages")),
            "{err:?}"
        );
        let err = AdaRound::new(config(BlockInit::Fractional))
            .with_blocks(Mlp::<Ad>::stages())
            .run(&model, samples(32), |m, x| m.forward(x))
            .unwrap_err();
        assert!(matches!(err, AdaRoundError::Stages(_)), "{err:?}");
    }
}
