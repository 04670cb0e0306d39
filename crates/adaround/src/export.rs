//! Integer export: the quantized weights of a model as integers, scale factors and bitwidths.

use adaround_layers::{QuantizedLayer, QuantizerSlot, CONV_AXIS, DENSE_AXIS};
use burn::{
    module::Module,
    tensor::{backend::Backend, Tensor},
};
use serde::{Deserialize, Serialize};

use crate::{capture, AdaRoundError};

/// Version tag of the export format.
pub const INTEGER_FORMAT: &str = "adaround-integers/1";

/// One quantized kernel: `weights = integers / scale_factor` (per output channel when `axis`
/// is set), symmetric, integers in `[-kmax, kmax]`, `kmax = 2^(bitwidth-1) - 1`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct IntegerKernel {
    /// Path of the layer in the model (as in the AdaRound report).
    pub layer: String,
    /// `"kernel"`, or `"depthwise"` / `"pointwise"` for a separable convolution.
    pub kernel: String,
    /// Shape of the kernel in Burn's layout (Dense `[d_input, d_output]`, Conv2d
    /// `[c_out, c_in / groups, kh, kw]`).
    pub shape: Vec<usize>,
    /// Number of bits.
    pub bitwidth: u32,
    /// The output-channel axis of per-axis scale factors; `None` for one per tensor.
    pub axis: Option<usize>,
    /// Scale factors `sf` (multiply to reach the integer grid): one, or one per channel.
    pub scale_factors: Vec<f32>,
    /// The integer weights, row-major in `shape`.
    pub integers: Vec<i32>,
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
    name: &str,
    weights: Tensor<B, D>,
    slot: &QuantizerSlot<B>,
    axis: usize,
) -> Option<IntegerKernel> {
    let q = slot.quantizer();
    let kmax = q.kmax()?;
    let sf = q.scale_factor(weights.clone(), axis).ok()?;
    let ints = (weights * sf.clone()).round().clamp(-kmax, kmax);
    Some(IntegerKernel {
        layer: layer.to_string(),
        kernel: name.to_string(),
        shape: ints.dims().to_vec(),
        bitwidth: q.bitwidth()?,
        axis: q.is_per_axis().then_some(axis),
        scale_factors: sf.into_data().convert::<f32>().to_vec().ok()?,
        integers: ints
            .into_data()
            .convert::<f32>()
            .to_vec::<f32>()
            .ok()?
            .iter()
            .map(|v| *v as i32)
            .collect(),
    })
}

/// The integers of every quantizing kernel of `model`, found by running `forward` once on
/// `sample` (as the driver finds layers). Layers with the float quantizer are left out.
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
            .owner(&layer.kernels()[0].1)
            .unwrap_or_else(|| format!("layer{position}"));
        let found = match layer.as_ref() {
            QuantizedLayer::Dense(l) => {
                vec![kernel(
                    &name,
                    "kernel",
                    l.weight.val(),
                    &l.quantizer,
                    DENSE_AXIS,
                )]
            }
            QuantizedLayer::Conv2d(l) => {
                vec![kernel(
                    &name,
                    "kernel",
                    l.weight.val(),
                    &l.quantizer,
                    CONV_AXIS,
                )]
            }
            QuantizedLayer::SeparableConv2d(l) => vec![
                kernel(
                    &name,
                    "depthwise",
                    l.weight_dw.val(),
                    &l.quantizer_dw,
                    CONV_AXIS,
                ),
                kernel(&name, "pointwise", l.weight.val(), &l.quantizer, CONV_AXIS),
            ],
        };
        kernels.extend(found.into_iter().flatten());
    }
    Ok(IntegerExport {
        format: INTEGER_FORMAT.to_string(),
        kernels,
    })
}
