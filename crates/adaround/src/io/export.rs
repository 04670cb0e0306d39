//! Integer export: the quantized weights of a model as integers, scale factors and bitwidths.

use adaround_core::Grid;
use adaround_layers::{KernelRole, QuantizedLayer, QuantizerSlot};
use burn::{
    module::Module,
    tensor::{backend::Backend, Tensor},
};
use serde::{Deserialize, Serialize};

use crate::{capture, AdaRoundError};

/// Version tag of the export format.
pub const INTEGER_FORMAT: &str = "adaround-integers/1";

/// One quantized kernel: `weights = (integers + offset) / scale_factor` (per output channel
/// when `axis` is set), integers in `[-kmax, kmax]` (`kmax = 2^(bitwidth-1) - 1`) on the
/// symmetric grid, in `[-kmax - 1, kmax]` on the full-range and asymmetric grids; the offset
/// is zero except on the asymmetric grid.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct IntegerKernel {
    /// Path of the layer in the model (as in the AdaRound report).
    pub layer: String,
    /// Which kernel of the layer (`"kernel"`, or `"depthwise"` / `"pointwise"` for a
    /// separable convolution, in JSON).
    pub kernel: KernelRole,
    /// Shape of the kernel in Burn's layout (Dense `[d_input, d_output]`, Conv2d
    /// `[c_out, c_in / groups, kh, kw]`).
    pub shape: Vec<usize>,
    /// Number of bits.
    pub bitwidth: u32,
    /// The integer grid (absent in exports written before grids existed: symmetric).
    #[serde(default)]
    pub grid: Grid,
    /// The output-channel axis of per-axis scale factors; `None` for one per tensor.
    pub axis: Option<usize>,
    /// Scale factors `sf` (multiply to reach the integer grid): one, or one per channel.
    pub scale_factors: Vec<f32>,
    /// The integer offsets of the asymmetric grid, one per scale factor (empty: all zero).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub offsets: Vec<i32>,
    /// The integer weights relative to the offset, row-major in `shape`.
    pub integers: Vec<i32>,
    /// The layer's float bias, one value per output channel, on the kernel it is added
    /// after: the layer's last kernel (a Dense or Conv2D kernel, a separable convolution's
    /// pointwise kernel). Absent on other kernels, where the layer has no bias, and in
    /// exports written before biases were exported. After
    /// [`bias_correction`](crate::AdaRoundConfig::bias_correction) it is the corrected bias,
    /// not the float model's: deploy this one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bias: Option<Vec<f32>>,
}

/// A kernel's quantization parameters in AIMET's encoding convention, one per scale factor:
/// `weights = scale * (codes + offset)` with unsigned `codes` in `[0, 2^bitwidth - 1]`
/// (`[0, 2^bitwidth - 2]` on the symmetric grid), `min = scale * offset`,
/// `max = scale * (offset + hi - lo)`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AimetEncoding {
    /// Number of bits.
    pub bitwidth: u32,
    /// `"int"`.
    pub dtype: String,
    /// Whether the grid is centred on zero (not the asymmetric grid).
    pub is_symmetric: bool,
    /// The step between levels, `1 / scale_factor`.
    pub scale: f32,
    /// The offset of code 0 in steps: `lo + o` (`o` the asymmetric grid's offset, else 0).
    pub offset: i32,
    /// The lowest representable weight.
    pub min: f32,
    /// The highest representable weight.
    pub max: f32,
}

impl IntegerKernel {
    /// The kernel's quantization parameters in AIMET's convention (see [`AimetEncoding`]).
    pub fn aimet_encodings(&self) -> Vec<AimetEncoding> {
        let (lo, hi) = self.grid.levels(self.bitwidth);
        let (lo, hi) = (lo as i32, hi as i32);
        self.scale_factors
            .iter()
            .enumerate()
            .map(|(i, sf)| {
                let offset = lo + self.offsets.get(i).copied().unwrap_or(0);
                let scale = 1.0 / sf;
                AimetEncoding {
                    bitwidth: self.bitwidth,
                    dtype: "int".to_string(),
                    is_symmetric: self.grid != Grid::Asymmetric,
                    scale,
                    offset,
                    min: scale * offset as f32,
                    max: scale * (offset + hi - lo) as f32,
                }
            })
            .collect()
    }
}

/// The integer weights of every quantized kernel of a model.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct IntegerExport {
    /// [`INTEGER_FORMAT`].
    pub format: String,
    /// The kernels in forward order.
    pub kernels: Vec<IntegerKernel>,
}

impl IntegerExport {
    /// Pretty JSON.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("exports serialize")
    }
}

fn kernel<B: Backend, const D: usize>(
    layer: &str,
    role: KernelRole,
    weights: Tensor<B, D>,
    slot: &QuantizerSlot<B>,
    axis: usize,
) -> Result<Option<IntegerKernel>, AdaRoundError> {
    let q = slot.quantizer();
    let (Some((lo, hi)), Some(bitwidth)) = (q.levels(), q.bitwidth()) else {
        return Ok(None);
    };
    let refused = |source| AdaRoundError::Quantizer {
        layer: layer.to_string(),
        source,
    };
    q.validate().map_err(refused)?;
    // The weights the layer quantizes: with AdaRound in the slot, its reconstructed weights
    // (evaluation mode applies `q` to them), not the float kernel.
    let weights = match slot {
        QuantizerSlot::Plain(_) => weights,
        QuantizerSlot::AdaRound(ada) if !ada.is_training() => ada.recons_weights::<D>(),
        QuantizerSlot::AdaRound(_) => {
            return Err(AdaRoundError::SoftWeights {
                layer: layer.to_string(),
            })
        }
    };
    let encoding = q.encoding(weights.clone(), axis).map_err(refused)?;
    let ints = encoding.scaled(weights).round().clamp(lo, hi);
    let (sf, offsets) = (encoding.scale_factor, encoding.offset);
    let (scale_factors, integers) = (host(sf), host(ints.clone()));
    let offsets = offsets.map(host).unwrap_or_default();
    // A scale factor of 0 (a range that overflows to infinity) would decode every integer
    // to a non-finite weight.
    let positive = scale_factors.iter().all(|v| v.is_finite() && *v > 0.0);
    if !(positive && integers.iter().chain(&offsets).all(|v| v.is_finite())) {
        return Err(AdaRoundError::NonFinite {
            layer: layer.to_string(),
            what: "exported integers or scale factors (a scale factor must be positive)",
        });
    }
    Ok(Some(IntegerKernel {
        layer: layer.to_string(),
        kernel: role,
        shape: ints.dims().to_vec(),
        bitwidth,
        grid: q.grid(),
        axis: q.is_per_axis().then_some(axis),
        scale_factors,
        offsets: offsets.iter().map(|v| *v as i32).collect(),
        integers: integers.iter().map(|v| *v as i32).collect(),
        bias: None,
    }))
}

/// A tensor's values in host memory, as `f32`.
fn host<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.into_data()
        .convert::<f32>()
        .to_vec::<f32>()
        .expect("f32 data converts to a f32 vector")
}

/// `layer`'s float bias as host numbers, refused where it is not finite.
fn bias<B: Backend>(
    layer: &QuantizedLayer<B>,
    name: &str,
) -> Result<Option<Vec<f32>>, AdaRoundError> {
    let Some((_, bias)) = layer.bias() else {
        return Ok(None);
    };
    let values = host(bias);
    if !values.iter().all(|v| v.is_finite()) {
        return Err(AdaRoundError::NonFinite {
            layer: name.to_string(),
            what: "exported bias",
        });
    }
    Ok(Some(values))
}

/// The integers of every quantizing kernel of `model`, found by running `forward` once on
/// `sample` (as the driver finds layers), each layer's float bias with its last kernel.
/// Kernels with the float quantizer are left out (and a bias whose kernel is). A kernel with
/// an AdaRound quantizer in its slot exports the rounding the layer uses in evaluation mode;
/// in training mode (soft weights) it is refused with [`AdaRoundError::SoftWeights`].
pub fn export_integers<B, M, F, O, const D: usize>(
    model: &M,
    sample: Tensor<B, D>,
    forward: F,
) -> Result<IntegerExport, AdaRoundError>
where
    B: Backend,
    M: Module<B>,
    F: Fn(&M, Tensor<B, D>) -> O,
{
    let index = crate::params::ParamIndex::of::<B, M>(model);
    let discover = capture::Discover::<B> { events: Vec::new() };
    let probe = capture::run(discover, || forward(model, sample))?;
    let mut kernels = Vec::new();
    for (position, event) in probe.events.iter().enumerate() {
        let capture::Seen::Layer { layer, .. } = event else {
            continue;
        };
        let name = index
            .owner(&layer.kernels()[0].id)
            .unwrap_or_else(|| format!("layer{position}"));
        let layer_kernels = layer.kernels();
        let last = layer_kernels.len() - 1;
        for (i, k) in layer_kernels.into_iter().enumerate() {
            let found = match k.shape[..] {
                [rows, cols] => {
                    let weight = k.weight.reshape([rows, cols]);
                    kernel(&name, k.role, weight, k.slot, k.axis)?
                }
                _ => kernel(&name, k.role, k.weight, k.slot, k.axis)?,
            };
            if let Some(mut found) = found {
                if i == last {
                    found.bias = bias(layer, &name)?;
                }
                kernels.push(found);
            }
        }
    }
    Ok(IntegerExport {
        format: INTEGER_FORMAT.to_string(),
        kernels,
    })
}

#[cfg(test)]
mod tests {
    use adaround_core::{AdaRoundParams, WeightQuantizer};
    use adaround_layers::{QuantizedDense, QuantizedDenseConfig};
    use burn::module::Param;

    use super::*;

    type B = burn_ndarray::NdArray<f32>;

    #[test]
    fn should_refuse_to_export_a_range_that_overflows() {
        let device = Default::default();
        let q = WeightQuantizer::mse(2, false, adaround_core::Grid::Asymmetric).unwrap();
        let mut dense = QuantizedDenseConfig::new(2, 2)
            .with_quantizer(q)
            .init::<B>(&device);
        let w = Tensor::<B, 2>::from_floats([[3e38, -3e38], [1.0, -1.0]], &device);
        dense.weight = Param::from_tensor(w);
        let forward = |m: &QuantizedDense<B>, x: Tensor<B, 2>| m.forward(x);
        let err = export_integers(&dense, Tensor::zeros([1, 2], &device), forward).unwrap_err();
        assert!(
            matches!(err, AdaRoundError::NonFinite { what, .. } if what.contains("positive")),
            "{err:?}"
        );
    }

    #[test]
    fn should_export_the_rounding_an_armed_layer_uses_and_refuse_soft_weights() {
        let device = Default::default();
        let dense = QuantizedDenseConfig::new(6, 4)
            .with_quantizer(WeightQuantizer::max_per_axis(3).unwrap())
            .init::<B>(&device);
        let nearest = host(dense.quantized_weight());
        // Armed, and every weight off the top level rounded the other way than nearest: the
        // initial alphas (h(alpha) = the decimal) negated and saturated.
        let armed = QuantizedLayer::Dense(dense)
            .with_adaround(&AdaRoundParams::new())
            .unwrap()
            .map_slots(|slot| match slot {
                QuantizerSlot::AdaRound(mut ada) => {
                    ada.alpha = Param::from_tensor(ada.alpha.val().mul_scalar(-20.0));
                    QuantizerSlot::AdaRound(ada)
                }
                plain => plain,
            });
        let dense = |layer: QuantizedLayer<B>| match layer {
            QuantizedLayer::Dense(d) => d,
            _ => unreachable!("a Dense layer"),
        };
        let forward = |m: &QuantizedDense<B>, x: Tensor<B, 2>| m.forward(x);
        let sample = || Tensor::<B, 2>::zeros([1, 6], &device);

        let soft = dense(armed.clone());
        let err = export_integers(&soft, sample(), forward).unwrap_err();
        assert!(matches!(err, AdaRoundError::SoftWeights { .. }), "{err:?}");

        let evaluated = dense(armed.set_training(false));
        let used = host(evaluated.quantized_weight());
        assert!(
            used.iter().zip(&nearest).filter(|(a, b)| a != b).count() > 4,
            "the armed layer rounds otherwise than nearest"
        );
        let export = export_integers(&evaluated, sample(), forward).unwrap();
        let k = &export.kernels[0];
        assert_eq!(k.axis, Some(1));
        for (i, (q, w)) in k.integers.iter().zip(&used).enumerate() {
            let back = *q as f32 / k.scale_factors[i % 4];
            assert!(
                (back - w).abs() <= 1e-6 * w.abs().max(1e-3),
                "{i}: {back} vs {w}"
            );
        }
    }
}
