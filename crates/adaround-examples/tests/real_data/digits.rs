//! AdaRound on the embedded digits with the committed float model (`examples/data/digits_cnn.bin`).

use adaround::{AdaRound, AdaRoundConfig, Grid, ReconstructionLoss, Schedule};
use adaround_examples::digits::{
    accuracy, predictions, Digits, FloatCnn, Granularity, QuantCnn, Scheme, FIXTURE,
};
use burn::{
    module::Module,
    record::{BinFileRecorder, FullPrecisionSettings},
};

type B = burn_ndarray::NdArray<f32>;

#[test]
fn should_round_the_digits_cnn_at_w2_better_than_nearest() {
    let device = Default::default();
    let recorder = BinFileRecorder::<FullPrecisionSettings>::new();
    let float = FloatCnn::<B>::new(&device)
        .load_file(FIXTURE, &recorder, &device)
        .expect("the committed fixture loads");
    let (train, test) = Digits::load().split(450, 7);
    let x_test = test.images::<B>(0..test.len(), &device);
    let y_test = test.labels::<B>(0..test.len(), &device);
    let float_acc = accuracy(float.forward(x_test.clone()), y_test.clone());
    assert!(
        float_acc > 90.0,
        "the fixture is a trained model: {float_acc}"
    );
    // The classes the reports write, image by image, give the same accuracy.
    let classes = predictions(float.forward(x_test.clone()));
    let labels = y_test.to_data().convert::<i64>().to_vec::<i64>().unwrap();
    assert_eq!(classes.len(), test.len());
    let correct = classes.iter().zip(&labels).filter(|(p, l)| p == l).count();
    assert_eq!(100.0 * correct as f64 / test.len() as f64, float_acc);

    let calibration = train.images::<B>(0..256, &device);
    let model = QuantCnn::from_float(&float, 2, Granularity::PerAxis, 8, calibration.clone());
    let nearest = accuracy(model.forward(x_test.clone()), y_test.clone());

    let config = AdaRoundConfig::new(Schedule::warm_cosine(400))
        .with_batch_size(Some(32))
        .with_loss(ReconstructionLoss::ChannelSum)
        .with_learning_rate(1e-2);
    let (rounded, report) = AdaRound::new(config.clone())
        .run(&model, calibration.clone(), |m, x| m.forward(x))
        .unwrap();
    let ada = accuracy(rounded.forward(x_test.clone()), y_test.clone());
    assert!(
        ada > nearest + 5.0,
        "W2 test accuracy: AdaRound {ada:.2} % vs nearest {nearest:.2} %"
    );
    assert!(report.layers.iter().all(|l| l.err_final < l.err_before));

    // The error-minimising scale on the full-range grid: far better nearest rounding at 2
    // bits, and AdaRound improves on it again.
    let full_range = model.with_weights(2, Granularity::PerAxis, Scheme::Mse(Grid::FullRange));
    let nearest_fr = accuracy(full_range.forward(x_test.clone()), y_test.clone());
    let (rounded, report) = AdaRound::new(config.clone())
        .run(&full_range, calibration, |m, x| m.forward(x))
        .unwrap();
    let ada_fr = accuracy(rounded.forward(x_test), y_test);
    assert!(
        nearest_fr > nearest + 20.0 && ada_fr > nearest_fr && ada_fr > ada,
        "W2 full range: nearest {nearest_fr:.2} %, AdaRound {ada_fr:.2} % (max scale: {nearest:.2} %, {ada:.2} %)"
    );
    assert!(report.layers.iter().all(|l| l.err_final <= l.err_before));
}

#[test]
fn should_fold_every_batch_norm_of_the_mini_xception_exactly() {
    use adaround::WeightQuantizer;
    use adaround_examples::xception::{MiniXception, QuantXception};
    use burn::tensor::{backend::Backend, Distribution, Tensor};
    let device = Default::default();
    B::seed(&device, 3);
    let float = MiniXception::<B>::new(&device);
    let folded = QuantXception::from_float(&float, &WeightQuantizer::Float);
    let x = Tensor::<B, 4>::random([4, 1, 64, 64], Distribution::Normal(0.0, 1.0), &device);
    let (a, b) = (float.forward(x.clone()), folded.forward(x));
    let scale: f32 = b.clone().abs().max().into_scalar();
    let diff: f32 = (a - b).abs().max().into_scalar();
    assert!(
        scale > 0.0 && diff <= 1e-5 * scale.max(1.0),
        "folded differs by {diff} (scale {scale})"
    );
}

#[test]
fn should_import_the_pretrained_usps_model_and_fold_its_batch_norms_exactly() {
    use adaround::WeightQuantizer;
    use adaround_examples::usps::{images, QuantUsps, UspsNet, WEIGHTS};
    let device = Default::default();
    let (float, report) = UspsNet::<B>::load(WEIGHTS, &device).expect("the committed weights load");
    assert_eq!(
        report.loaded.len(),
        16,
        "4 weights, 4 biases, 2 x 4 BatchNorm tensors"
    );
    let digits = Digits::load();
    let x = images::<B>(&digits, 0..digits.len(), &device);
    let y = digits.labels::<B>(0..digits.len(), &device);
    let logits = float.forward(x.clone());
    // The same model and images through PyTorch's arithmetic in NumPy: 1353 of 1797 right.
    let acc = accuracy(logits.clone(), y);
    assert!((acc - 75.2922).abs() < 0.06, "float accuracy {acc}");
    let folded = QuantUsps::from_float(&float, &WeightQuantizer::Float).forward(x);
    let diff: f32 = (folded - logits).abs().max().into_scalar();
    assert!(diff < 1e-4, "folded model differs by {diff}");
}
