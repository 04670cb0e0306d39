//! The driver's integration tests (`common/`) on `Wgpu`, and the same run on `NdArray` and
//! `Wgpu` compared: `cargo test -p adaround --features wgpu --test wgpu` (in CI on Mesa's
//! software Vulkan device). Without the feature this binary is empty. A binary of its own, so
//! that the GPU run does not build the `NdArray` tests again.
#![cfg(feature = "wgpu")]

#[macro_use]
mod common;
use common::seed_lock;

mod wgpu {
    driver_tests!(burn_wgpu::Wgpu);
}

/// The same model, data and configuration on NdArray and on Wgpu: per-layer errors and
/// rounding decisions agree.
mod agreement {
    use adaround::{
        layers::{
            QuantizedConv2d, QuantizedConv2dConfig, QuantizedDense, QuantizedDenseConfig,
            QuantizedReLU, QuantizedReLUConfig,
        },
        AdaRoundConfig, FinalRounding, ReconstructionLoss, Schedule, WeightQuantizer,
    };
    use burn::{
        module::Module,
        nn::PaddingConfig2d,
        record::{BinBytesRecorder, FullPrecisionSettings, Recorder},
        tensor::{backend::Backend, Distribution, Tensor},
    };

    type Cpu = burn_ndarray::NdArray<f32>;
    type Gpu = burn_wgpu::Wgpu;

    #[derive(Module, Debug)]
    struct Small<B: Backend> {
        conv: QuantizedConv2d<B>,
        act: QuantizedReLU<B>,
        fc: QuantizedDense<B>,
    }

    impl<B: Backend> Small<B> {
        fn new(device: &B::Device) -> Self {
            let q = WeightQuantizer::max_per_axis(3).unwrap();
            Self {
                conv: QuantizedConv2dConfig::new([2, 4], [3, 3])
                    .with_padding(PaddingConfig2d::Same)
                    .with_quantizer(q.clone())
                    .init(device),
                act: QuantizedReLUConfig::new()
                    .with_bitwidth(8)
                    .with_max_value(4.0)
                    .init(),
                fc: QuantizedDenseConfig::new(4 * 8 * 8, 5)
                    .with_quantizer(q)
                    .init(device),
            }
        }

        fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 2> {
            self.fc
                .forward(self.act.forward(self.conv.forward(x)).flatten(1, 3))
        }
    }

    #[test]
    fn should_agree_between_ndarray_and_wgpu() {
        let _seed = crate::seed_lock();
        let cpu_device = Default::default();
        let gpu_device = Default::default();
        Cpu::seed(&cpu_device, 30);
        let cpu_model = Small::<Cpu>::new(&cpu_device);
        let _ = cpu_model.devices(); // initialize the lazy parameters before the copy
        let recorder = BinBytesRecorder::<FullPrecisionSettings>::default();
        let bytes = recorder
            .record(cpu_model.clone().into_record(), ())
            .unwrap();
        let gpu_model =
            Small::<Gpu>::new(&gpu_device).load_record(recorder.load(bytes, &gpu_device).unwrap());
        let x =
            Tensor::<Cpu, 4>::random([32, 2, 8, 8], Distribution::Normal(0.0, 1.0), &cpu_device);
        let x_gpu = Tensor::<Gpu, 4>::from_data(x.to_data(), &gpu_device);
        let cfg = AdaRoundConfig::new(Schedule::epochs(30))
            .with_batch_size(Some(16))
            .with_learning_rate(1e-2)
            .with_loss(ReconstructionLoss::ChannelSum)
            .with_rounding(FinalRounding::Hard)
            .with_never_worse(false);
        let (cpu, r_cpu) =
            crate::common::adaround(&cpu_model, x, |m, x| m.forward(x), &cfg).unwrap();
        let (gpu, r_gpu) =
            crate::common::adaround(&gpu_model, x_gpu, |m, x| m.forward(x), &cfg).unwrap();
        for (a, b) in r_cpu.layers.iter().zip(&r_gpu.layers) {
            let rel = (a.err_before - b.err_before).abs() / a.err_before;
            assert!(
                rel < 1e-3,
                "{}: err_before {} vs {}",
                a.name,
                a.err_before,
                b.err_before
            );
            let rel = (a.err_final - b.err_final).abs() / a.err_final;
            assert!(
                rel < 5e-2,
                "{}: err_final {} vs {}",
                a.name,
                a.err_final,
                b.err_final
            );
        }
        let values = |t: Vec<f32>| t;
        let kernels = |c: Vec<f32>, g: Vec<f32>| {
            c.iter()
                .zip(&g)
                .filter(|(a, b)| (*a - *b).abs() <= 1e-5 * a.abs().max(1e-5))
                .count()
        };
        let c_conv = values(cpu.conv.weight.val().into_data().to_vec().unwrap());
        let g_conv = values(gpu.conv.weight.val().into_data().to_vec().unwrap());
        let c_fc = values(cpu.fc.weight.val().into_data().to_vec().unwrap());
        let g_fc = values(gpu.fc.weight.val().into_data().to_vec().unwrap());
        let total = c_conv.len() + c_fc.len();
        let same = kernels(c_conv, g_conv) + kernels(c_fc, g_fc);
        let fraction = same as f64 / total as f64;
        println!(
            "NdArray vs Wgpu: same rounding for {same} / {total} weights ({:.2} %)",
            100.0 * fraction
        );
        assert!(
            fraction >= 0.99,
            "only {fraction} of the rounding decisions agree"
        );
    }
}
