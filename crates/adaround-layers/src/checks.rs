//! Misuse checks: they panic with what was got and what was expected.

pub(crate) fn check_dense_input(dims: &[usize], d_input: usize) {
    assert!(
        dims.len() >= 2,
        "QuantizedDense expects an input of rank >= 2 ([..., {d_input}]), got rank {} ({dims:?})",
        dims.len()
    );
    let got = dims[dims.len() - 1];
    assert!(
        got == d_input,
        "QuantizedDense expects {d_input} input features, got {got} (input shape {dims:?})"
    );
}

pub(crate) fn check_channels(layer: &str, dims: &[usize; 4], channels: usize) {
    assert!(
        dims[1] == channels,
        "{layer} expects {channels} input channels, got {} (input shape {dims:?})",
        dims[1]
    );
}

pub(crate) fn check_quantizer(layer: &str, quantizer: &adaround_core::WeightQuantizer) {
    if let Err(e) = quantizer.check_parameters() {
        panic!("{layer} expects a valid quantizer, got {quantizer:?}: {e}");
    }
}
