//! User-defined quantizers: a named scale-factor function, registered once per process.
//!
//! A [`WeightQuantizer::Custom`](crate::WeightQuantizer::Custom) names a function that maps
//! weights to scale factors; everything else (rounding, clipping to `[-kmax, kmax]`, the
//! straight-through gradient, AdaRound) is shared with the built-in quantizers. The
//! configuration stays plain data, so it serializes and is saved with a model; the function
//! must be registered under the same name before the quantizer is used.

use std::{
    collections::HashMap,
    sync::{OnceLock, RwLock},
};

/// Scale factors of one weight tensor, computed on the host.
///
/// Arguments: the weights as `channels` rows of equal length (row-major; `channels == 1`
/// for a per-tensor quantizer), `channels`, `kmax`, and the quantizer's `params`. Returns
/// `channels` scale factors (multiply the weights by them to reach the integer grid); they
/// are then clipped to `[0, 1e3]` like every scale factor.
pub type ScaleFn = fn(weights: &[f32], channels: usize, kmax: f64, params: &[f64]) -> Vec<f32>;

fn registry() -> &'static RwLock<HashMap<String, ScaleFn>> {
    static REGISTRY: OnceLock<RwLock<HashMap<String, ScaleFn>>> = OnceLock::new();
    REGISTRY.get_or_init(Default::default)
}

/// Registers (or replaces) the scale-factor function of the custom quantizer `name`.
pub fn register_quantizer(name: &str, scale: ScaleFn) {
    registry()
        .write()
        .unwrap_or_else(|e| e.into_inner())
        .insert(name.to_string(), scale);
}

/// The function registered under `name`.
pub(crate) fn lookup(name: &str) -> Option<ScaleFn> {
    registry()
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .get(name)
        .copied()
}
