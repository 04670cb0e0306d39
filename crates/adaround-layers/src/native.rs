//! Burn-native quantized weights: a layer's quantized kernels as Burn quantized tensors.
//!
//! [`AdaRoundLayer::into_burn_quantized`](crate::AdaRoundLayer::into_burn_quantized), on
//! each layer kind and on [`QuantizedLayer`](crate::QuantizedLayer), replaces each float kernel by a Burn quantized tensor (`QFloat`, symmetric mode, `f32` scales;
//! `Q*S` values for the symmetric grid, `Q*F` for the full-range grid; the asymmetric grid,
//! whose offsets Burn's symmetric-only scheme cannot hold, is refused)
//! holding the layer's own integers, and the quantizer by the float pass-through: the layer
//! then runs on Burn's quantized tensors, and a saved record holds the integers.
//!
//! Exactness: the integers are the layer's own (`round(w * sf)`, or AdaRound's decisions),
//! checked one by one. Burn dequantizes with `q * scale`, the layers with `q / sf`; with
//! `scale = 1 / sf` in `f32` the two agree to within one rounding of `f32` (relative
//! `6e-8`), not bit for bit: no `f32` scale reproduces every `q / sf` exactly in general.

use burn::{
    module::Param,
    tensor::{
        backend::Backend,
        quantization::{
            BlockSize, QParams, QuantLevel, QuantMode, QuantParam, QuantScheme, QuantStore,
            QuantValue,
        },
        ElementConversion, Tensor,
    },
};

use crate::{KernelRole, QuantizerSlot};

/// Why a kernel cannot become a Burn quantized tensor; `kernel` says which kernel of the
/// layer.
#[derive(Debug, Clone, PartialEq)]
pub enum NativeQuantError {
    /// The kernel's quantizer is the float pass-through: there are no integers to hold.
    NotQuantizing {
        /// Which kernel.
        kernel: KernelRole,
    },
    /// The grid's integers (`[-kmax, kmax]`, or `[-kmax - 1, kmax]` on the full-range grid)
    /// do not fit the Burn value type.
    Range {
        /// Which kernel.
        kernel: KernelRole,
        /// The quantizer's bitwidth.
        bitwidth: u32,
        /// The requested Burn value type.
        value: QuantValue,
    },
    /// Only the integer types hold these integers: `Q8S`, `Q4S`, `Q2S` (symmetric range) and
    /// `Q8F`, `Q4F`, `Q2F` (full range, for the full-range grid).
    UnsupportedValue(QuantValue),
    /// Per-channel scales that are not contiguous blocks of Burn's layout (a Dense kernel
    /// `[d_input, d_output]` scaled per output column), or blocks over 255 along a dimension.
    NotBlocks {
        /// Which kernel.
        kernel: KernelRole,
        /// The kernel's shape.
        shape: Vec<usize>,
    },
    /// The quantizer's grid is [asymmetric](adaround_core::Grid::Asymmetric): Burn's
    /// quantized tensors have no zero point (`QuantMode::Symmetric` only). Use the integer
    /// export, which keeps the offsets, or a grid centred on zero.
    Asymmetric {
        /// Which kernel.
        kernel: KernelRole,
    },
    /// The kernel is not on its quantization grid (AdaRound still in training mode, with
    /// soft weights): finalize it first.
    NotOnGrid {
        /// Which kernel.
        kernel: KernelRole,
        /// Largest distance of `w * sf` from an integer.
        distance: f32,
    },
}

impl core::fmt::Display for NativeQuantError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::NotQuantizing { kernel } => {
                write!(f, "{kernel}: the float quantizer has no integers")
            }
            Self::Range {
                kernel,
                bitwidth,
                value,
            } => write!(f, "{kernel}: {bitwidth}-bit integers do not fit {value:?}"),
            Self::UnsupportedValue(value) => {
                write!(f, "{value:?} is not an integer type (Q8S, Q4S, Q2S, Q8F, Q4F, Q2F)")
            }
            Self::NotBlocks { kernel, shape } => write!(
                f,
                "{kernel}: per-channel scales of a {shape:?} kernel are not contiguous blocks of \
                 at most 255 per dimension; use a per-tensor quantizer"
            ),
            Self::Asymmetric { kernel } => write!(
                f,
                "{kernel}: Burn's quantized tensors are symmetric (no zero point); the asymmetric \
                 grid's offsets are kept by the integer export"
            ),
            Self::NotOnGrid { kernel, distance } => write!(
                f,
                "{kernel}: weights are {distance} away from the integer grid; finalize AdaRound first"
            ),
        }
    }
}

impl std::error::Error for NativeQuantError {}

/// The quantized kernel of `slot` as a Burn quantized tensor with `value` integers.
pub(crate) fn native_kernel<B: Backend, const D: usize>(
    kernel: KernelRole,
    weights: Tensor<B, D>,
    slot: &QuantizerSlot<B>,
    axis: usize,
    value: QuantValue,
) -> Result<Tensor<B, D>, NativeQuantError> {
    use QuantValue::{Q2F, Q2S, Q4F, Q4S, Q8F, Q8S};
    if !matches!(value, Q8S | Q4S | Q2S | Q8F | Q4F | Q2F) {
        return Err(NativeQuantError::UnsupportedValue(value));
    }
    let quantizer = slot.quantizer();
    let (Some(bitwidth), Some((lo, hi))) = (quantizer.bitwidth(), quantizer.levels()) else {
        return Err(NativeQuantError::NotQuantizing { kernel });
    };
    if quantizer.grid() == adaround_core::Grid::Asymmetric {
        return Err(NativeQuantError::Asymmetric { kernel });
    }
    let (min, max) = value.range();
    if (lo as f32) < min || (hi as f32) > max {
        return Err(NativeQuantError::Range {
            kernel,
            bitwidth,
            value,
        });
    }
    let shape = weights.dims();
    let level = if quantizer.is_per_axis() {
        // Burn's blocks are contiguous runs of the row-major kernel: one per output channel
        // only where the output channel is the leading axis.
        let block: Vec<usize> = shape[1..].to_vec();
        if axis != 0 || block.iter().any(|d| *d > u8::MAX as usize) {
            return Err(NativeQuantError::NotBlocks {
                kernel,
                shape: shape.to_vec(),
            });
        }
        QuantLevel::Block(BlockSize::new(
            block.iter().map(|d| *d as u8).collect::<Vec<_>>(),
        ))
    } else {
        QuantLevel::Tensor
    };
    let effective = slot.apply(weights.clone(), axis);
    let sf = match slot {
        QuantizerSlot::AdaRound(ada) => ada.scale_factor::<D>(),
        QuantizerSlot::Plain(q) => q
            .scale_factor(weights, axis)
            .map_err(|_| NativeQuantError::NotQuantizing { kernel })?,
    };
    let scaled = effective.clone() * sf.clone();
    let distance = (scaled.clone() - scaled.round())
        .abs()
        .max()
        .into_scalar()
        .elem::<f32>();
    if distance > 1e-3 {
        return Err(NativeQuantError::NotOnGrid { kernel, distance });
    }
    let scales = (sf.ones_like() / sf).flatten::<1>(0, D - 1);
    let scheme = QuantScheme::default()
        .with_value(value)
        .with_level(level)
        .with_mode(QuantMode::Symmetric)
        .with_param(QuantParam::F32)
        .with_store(QuantStore::Native);
    Ok(effective.quantize(&scheme, QParams { scales }))
}

/// `param` holding `tensor`, under the same id.
pub(crate) fn native_param<B: Backend, const D: usize>(
    param: Param<Tensor<B, D>>,
    tensor: Tensor<B, D>,
) -> Param<Tensor<B, D>> {
    Param::initialized(param.id, tensor)
}
