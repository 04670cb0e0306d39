use adaround_core::{AdaRoundParams, AdaRoundQuantizer, QuantizerError};
use burn::{
    module::{Module, Param, ParamId},
    tensor::{backend::Backend, Tensor},
};
use serde::{Deserialize, Serialize};

use burn::tensor::quantization::QuantValue;

use crate::{
    file_layout::{Conversion, Layout},
    probe::Flow,
    NativeQuantError, QuantizedConv2d, QuantizedDense, QuantizedSeparableConv2d, QuantizerSlot,
};

/// What AdaRound needs of one layer kind, implemented next to the layer (`dense.rs`,
/// `conv2d.rs`, `separable.rs`). [`QuantizedLayer`] and everything built on it (the
/// driver's Gram and fused paths, the integer export, finalizing) dispatch through it.
///
/// Adding a layer kind: implement this trait (and [`MatrixLayer`] when the layer is one
/// matrix product per group of output positions) in the layer's file, then add one variant
/// to [`QuantizedLayer`] and [`LayerKind`], one arm to the dispatch macro and one line to
/// [`file_names`] in `layer.rs`. Nothing else names a layer kind.
pub trait AdaRoundLayer<B: Backend>: Module<B> + Into<QuantizedLayer<B>> {
    /// The kind of layer.
    const KIND: LayerKind;

    /// The container type burn-store records for the layer (`"Struct:QuantizedDense"`).
    const CONTAINER: &'static str;

    /// The file tensors to try, in order, for the layer's parameter `param` (a field name)
    /// in a file of `layout`, each with its conversion to Burn's layout. Empty: the
    /// parameter's own name, unconverted.
    fn file_names(layout: Layout, param: &str) -> &'static [(&'static str, Conversion)];

    /// The layer's kernels, in order (a separable convolution: depthwise, then pointwise).
    fn kernels(&self) -> Vec<Kernel<'_, B>>;

    /// Applies the layer as its slots say (`float`: with the float kernels) to an input of
    /// the layer's flow kind; `None` for the other kind.
    fn forward_flow(&self, input: Flow<B>, float: bool) -> Option<Flow<B>>;

    /// The layer with each quantizer slot replaced by `f(slot)`, in kernel order.
    fn map_slots(self, f: &mut dyn FnMut(QuantizerSlot<B>) -> QuantizerSlot<B>) -> Self;

    /// Puts an AdaRound quantizer, wrapping the current one, in every quantizing slot.
    fn with_adaround(self, params: &AdaRoundParams) -> Result<Self, QuantizerError>;

    /// Writes AdaRound's rounded weights (`hard`: `1[alpha >= 0]`) into the float kernels,
    /// restores the original quantizers, and counts the quantized weights that differ from
    /// nearest rounding of the previous kernels.
    fn finalize(self, hard: bool) -> (Self, Vec<KernelChange>);

    /// The layer with each kernel as a Burn quantized tensor of `value` integers (`Q8S` for
    /// up to 8 bits, `Q4S` up to 4, `Q2S` for 2; `Q*F` on the full-range grid) and the
    /// float pass-through quantizers; see the [`native`](crate::native) module.
    fn into_burn_quantized(self, value: QuantValue) -> Result<Self, NativeQuantError>;

    /// The layer as one matrix product per group, where it is one (Dense, Conv2D).
    fn matrix(&self) -> Option<&dyn MatrixLayer<B>> {
        None
    }
}

/// The kernel methods of [`AdaRoundLayer`] (`kernels`, `map_slots`, `with_adaround`,
/// `finalize`, `into_burn_quantized`) for a layer with one kernel, the `Param` field
/// `weight`, quantized by the [`QuantizerSlot`] field `quantizer` along `$axis`: a new
/// single-kernel layer kind writes its own forward pass, file names and matrix form only.
macro_rules! single_kernel_methods {
    ($axis:expr) => {
        fn kernels(&self) -> Vec<$crate::Kernel<'_, B>> {
            vec![$crate::Kernel::new(
                $crate::KernelRole::Kernel,
                &self.weight,
                &self.quantizer,
                $axis,
            )]
        }

        fn map_slots(
            mut self,
            f: &mut dyn FnMut($crate::QuantizerSlot<B>) -> $crate::QuantizerSlot<B>,
        ) -> Self {
            self.quantizer = f(self.quantizer);
            self
        }

        fn with_adaround(
            mut self,
            params: &::adaround_core::AdaRoundParams,
        ) -> Result<Self, ::adaround_core::QuantizerError> {
            self.quantizer = $crate::layer::arm(&self.weight, self.quantizer, $axis, params)?;
            Ok(self)
        }

        fn finalize(mut self, hard: bool) -> (Self, Vec<$crate::KernelChange>) {
            let role = $crate::KernelRole::Kernel;
            let (w, s, c) =
                $crate::layer::finalize_kernel(self.weight, self.quantizer, $axis, hard, role);
            (self.weight, self.quantizer) = (w, s);
            (self, vec![c])
        }

        fn into_burn_quantized(
            mut self,
            value: ::burn::tensor::quantization::QuantValue,
        ) -> Result<Self, $crate::NativeQuantError> {
            let tensor = $crate::native::native_kernel(
                $crate::KernelRole::Kernel,
                self.weight.val(),
                &self.quantizer,
                $axis,
                value,
            )?;
            self.weight = $crate::native::native_param(self.weight, tensor);
            self.quantizer = ::adaround_core::WeightQuantizer::Float.into();
            Ok(self)
        }
    };
}
pub(crate) use single_kernel_methods;

/// The file names ([`AdaRoundLayer::file_names`]) of the parameter `param` of the layer
/// kind whose burn-store container type is `container`; `None` for a container that is no
/// layer kind of this crate.
pub fn file_names<B: Backend>(
    container: &str,
    layout: Layout,
    param: &str,
) -> Option<&'static [(&'static str, Conversion)]> {
    fn of<B: Backend, L: AdaRoundLayer<B>>(
        container: &str,
        layout: Layout,
        param: &str,
    ) -> Option<&'static [(&'static str, Conversion)]> {
        (container == L::CONTAINER).then(|| L::file_names(layout, param))
    }
    of::<B, QuantizedDense<B>>(container, layout, param)
        .or_else(|| of::<B, QuantizedConv2d<B>>(container, layout, param))
        .or_else(|| of::<B, QuantizedSeparableConv2d<B>>(container, layout, param))
}

/// A layer whose output is, per group of channels, the matrix product of its kernel
/// `[C_out / groups, K]` with input patches of size `K` (`K = C_in / groups * kh * kw` for a
/// convolution, `d_input` for a Dense layer), plus the bias: the form of the driver's Gram
/// matrices and fused step.
pub trait MatrixLayer<B: Backend> {
    /// `[groups, C_out / groups, K]`.
    fn matrix_dims(&self) -> [usize; 3];

    /// Output positions (rows of the product) of the layer on an input of shape `input`, by
    /// arithmetic.
    fn positions(&self, input: &[usize]) -> usize;

    /// `[groups, C_out / groups, K]` from a tensor in AdaRound's rank-4 kernel layout; a
    /// per-channel factor becomes `[1 | groups, 1 | C_out / groups, 1]`, a scalar `[1, 1, 1]`.
    fn to_matrix(&self, t: Tensor<B, 4>) -> Tensor<B, 3>;

    /// Inverse of [`to_matrix`](Self::to_matrix) for a full kernel: AdaRound's rank-4 layout.
    fn to_kernel(&self, t: Tensor<B, 3>) -> Tensor<B, 4>;

    /// The float kernel as a matrix.
    fn float_matrix(&self) -> Tensor<B, 3>;

    /// The kernel the layer uses now (quantized, or AdaRound's weights) minus its float
    /// kernel, as a matrix.
    fn delta_matrix(&self) -> Tensor<B, 3>;

    /// The float bias `[C_out]`.
    fn bias(&self) -> Option<Tensor<B, 1>>;

    /// `X^T X` of the input patches `X` (`[groups, K, K]`, summed over all output positions)
    /// and the patches' column sums (`[groups, 1, K]`).
    fn gram(&self, input: &Flow<B>) -> (Tensor<B, 3>, Tensor<B, 3>);

    /// The input patches `[groups, M, K]` and the outputs `[groups, M, C_out / groups]` as
    /// rows, one per output position (`M` over the whole batch).
    fn rows(&self, input: &Flow<B>, output: &Flow<B>) -> (Tensor<B, 3>, Tensor<B, 3>);
}

/// One kernel of a layer.
#[derive(Debug)]
pub struct Kernel<'a, B: Backend> {
    /// Which kernel of the layer.
    pub role: KernelRole,
    /// Its parameter id.
    pub id: ParamId,
    /// The float kernel in Burn's layout, padded with trailing 1s to rank 4 (a Dense
    /// kernel `[d_input, d_output]` is `[d_input, d_output, 1, 1]`).
    pub weight: Tensor<B, 4>,
    /// The kernel's own shape (rank 2 for a Dense kernel).
    pub shape: Vec<usize>,
    /// Its quantizer slot.
    pub slot: &'a QuantizerSlot<B>,
    /// The output-channel axis of per-channel quantization.
    pub axis: usize,
}

impl<'a, B: Backend> Kernel<'a, B> {
    /// The kernel of `weight` (rank 2 or 4) quantized by `slot` along `axis`.
    pub(crate) fn new<const D: usize>(
        role: KernelRole,
        weight: &Param<Tensor<B, D>>,
        slot: &'a QuantizerSlot<B>,
        axis: usize,
    ) -> Self {
        let shape = weight.dims().to_vec();
        let mut padded = [1; 4];
        padded[..D].copy_from_slice(&shape);
        Self {
            role,
            id: weight.id,
            weight: weight.val().reshape(padded),
            shape,
            slot,
            axis,
        }
    }
}

/// Any quantized neural layer: what a driver optimises one at a time.
#[allow(clippy::large_enum_variant)] // Burn modules are held by value (as burn-nn's `Activation`); tensors inside are shared handles
#[derive(Module, Debug)]
pub enum QuantizedLayer<B: Backend> {
    /// A [`QuantizedDense`].
    Dense(QuantizedDense<B>),
    /// A [`QuantizedConv2d`].
    Conv2d(QuantizedConv2d<B>),
    /// A [`QuantizedSeparableConv2d`].
    SeparableConv2d(QuantizedSeparableConv2d<B>),
}

/// Runs `$body` with `$l` bound to the layer inside any [`QuantizedLayer`]: the one place
/// that lists the variants.
macro_rules! each_layer {
    ($layer:expr, $l:ident => $body:expr) => {
        match $layer {
            QuantizedLayer::Dense($l) => $body,
            QuantizedLayer::Conv2d($l) => $body,
            QuantizedLayer::SeparableConv2d($l) => $body,
        }
    };
    ($layer:expr, mut $l:ident => $body:expr) => {
        match $layer {
            QuantizedLayer::Dense(mut $l) => $body,
            QuantizedLayer::Conv2d(mut $l) => $body,
            QuantizedLayer::SeparableConv2d(mut $l) => $body,
        }
    };
}

impl<B: Backend> From<QuantizedDense<B>> for QuantizedLayer<B> {
    fn from(layer: QuantizedDense<B>) -> Self {
        Self::Dense(layer)
    }
}

impl<B: Backend> From<QuantizedConv2d<B>> for QuantizedLayer<B> {
    fn from(layer: QuantizedConv2d<B>) -> Self {
        Self::Conv2d(layer)
    }
}

impl<B: Backend> From<QuantizedSeparableConv2d<B>> for QuantizedLayer<B> {
    fn from(layer: QuantizedSeparableConv2d<B>) -> Self {
        Self::SeparableConv2d(layer)
    }
}

/// The kind of a [`QuantizedLayer`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum LayerKind {
    /// Dense.
    Dense,
    /// Conv2D.
    Conv2d,
    /// SeparableConv2D.
    SeparableConv2d,
}

/// Which kernel of a layer: the one kernel of a Dense or Conv2D layer, or one of the two of
/// a separable convolution. Serialized (reports, integer exports) as `"kernel"`,
/// `"depthwise"` and `"pointwise"`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KernelRole {
    /// The kernel of a Dense or Conv2D layer.
    Kernel,
    /// The depthwise kernel of a separable convolution.
    Depthwise,
    /// The pointwise kernel of a separable convolution.
    Pointwise,
}

impl KernelRole {
    /// `"kernel"`, `"depthwise"` or `"pointwise"`, as serialized.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Kernel => "kernel",
            Self::Depthwise => "depthwise",
            Self::Pointwise => "pointwise",
        }
    }
}

impl core::fmt::Display for KernelRole {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How the rounding of one kernel changed when AdaRound was finalized.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct KernelChange {
    /// Which kernel of the layer.
    pub kernel: KernelRole,
    /// Quantized weights that differ from nearest rounding of the original weights.
    pub changed: usize,
    /// Number of weights.
    pub total: usize,
}

/// Replaces the slot by AdaRound over `weight` where it quantizes (the float pass-through
/// stays as it is).
pub(crate) fn arm<B: Backend, const D: usize>(
    weight: &Param<Tensor<B, D>>,
    slot: QuantizerSlot<B>,
    axis: usize,
    params: &AdaRoundParams,
) -> Result<QuantizerSlot<B>, QuantizerError> {
    if !slot.quantizer().is_quantizing() {
        return Ok(slot);
    }
    let q = slot.quantizer().clone();
    Ok(AdaRoundQuantizer::new(q, weight.val(), axis, params)?.into())
}

/// Writes the rounded weights into `weight` and restores the original quantizer.
pub(crate) fn finalize_kernel<B: Backend, const D: usize>(
    weight: Param<Tensor<B, D>>,
    slot: QuantizerSlot<B>,
    axis: usize,
    hard: bool,
    role: KernelRole,
) -> (Param<Tensor<B, D>>, QuantizerSlot<B>, KernelChange) {
    let total = weight.shape().num_elements();
    match slot {
        QuantizerSlot::Plain(q) => (
            weight,
            QuantizerSlot::Plain(q),
            KernelChange {
                kernel: role,
                changed: 0,
                total,
            },
        ),
        QuantizerSlot::AdaRound(ada) => {
            let rounded: Tensor<B, D> = if hard {
                ada.hard_recons_weights()
            } else {
                ada.recons_weights()
            };
            let rounded = rounded.detach();
            let q = ada.quantizer;
            let before = q.quantize(weight.val().detach(), axis);
            let after = q.quantize(rounded.clone(), axis);
            let changed = before.not_equal(after).int().sum().into_scalar();
            let changed = burn::tensor::ElementConversion::elem::<i64>(changed) as usize;
            let weight = weight.map(|_| rounded);
            (
                weight,
                QuantizerSlot::Plain(q),
                KernelChange {
                    kernel: role,
                    changed,
                    total,
                },
            )
        }
    }
}

pub(crate) fn set_training<B: Backend>(slot: QuantizerSlot<B>, training: bool) -> QuantizerSlot<B> {
    match slot {
        QuantizerSlot::AdaRound(ada) => QuantizerSlot::AdaRound(ada.set_training(training)),
        plain => plain,
    }
}

fn kind_of<B: Backend, L: AdaRoundLayer<B>>(_: &L) -> LayerKind {
    L::KIND
}

impl<B: Backend> QuantizedLayer<B> {
    /// The kind of layer.
    pub fn kind(&self) -> LayerKind {
        each_layer!(self, l => kind_of::<B, _>(l))
    }

    /// Applies the layer as its slots say (quantized, or AdaRound's weights), without
    /// reporting to any probe.
    pub fn forward_flow(&self, input: Flow<B>) -> Flow<B> {
        self.run(input, false)
    }

    /// Applies the layer with its float kernels.
    pub fn forward_float_flow(&self, input: Flow<B>) -> Flow<B> {
        self.run(input, true)
    }

    fn run(&self, input: Flow<B>, float: bool) -> Flow<B> {
        let dims = input.dims();
        each_layer!(self, l => l.forward_flow(input, float)).unwrap_or_else(|| {
            panic!(
                "{:?} layer cannot take an input of shape {dims:?}",
                self.kind()
            )
        })
    }

    /// The layer's kernels, in order.
    pub fn kernels(&self) -> Vec<Kernel<'_, B>> {
        each_layer!(self, l => l.kernels())
    }

    /// The float kernels, flattened, with their parameter ids.
    pub fn kernel_values(&self) -> Vec<(ParamId, Tensor<B, 1>)> {
        self.kernels()
            .into_iter()
            .map(|k| (k.id, k.weight.flatten(0, 3)))
            .collect()
    }

    /// The float kernels and the bias, flattened, with their parameter ids: every value
    /// the driver may change.
    pub fn param_values(&self) -> Vec<(ParamId, Tensor<B, 1>)> {
        let mut values = self.kernel_values();
        values.extend(self.bias());
        values
    }

    /// The float bias with its parameter id; `None` for a layer without one.
    pub fn bias(&self) -> Option<(ParamId, Tensor<B, 1>)> {
        each_layer!(self, l => l.bias.as_ref().map(|b| (b.id, b.val())))
    }

    /// The layer with `delta` added to its bias (one value per output channel), and whether
    /// it had one: a layer without a bias comes back unchanged with `false`.
    pub fn shift_bias(self, delta: Tensor<B, 1>) -> (Self, bool) {
        each_layer!(self, mut l => {
            let had = l.bias.is_some();
            l.bias = l.bias.map(|bias| bias.map(|b| b + delta));
            (l.into(), had)
        })
    }

    /// Whether any kernel is quantized (not the float pass-through).
    pub fn is_quantizing(&self) -> bool {
        self.slots().iter().any(|s| s.quantizer().is_quantizing())
    }

    /// The quantizer slots, in kernel order.
    pub fn slots(&self) -> Vec<&QuantizerSlot<B>> {
        self.kernels().into_iter().map(|k| k.slot).collect()
    }

    /// The AdaRound quantizers in the slots, in kernel order.
    pub fn adarounds(&self) -> Vec<&AdaRoundQuantizer<B>> {
        self.slots()
            .into_iter()
            .filter_map(|s| s.adaround())
            .collect()
    }

    /// The layer with each quantizer slot replaced by `f(slot)`, in kernel order.
    pub fn map_slots(self, mut f: impl FnMut(QuantizerSlot<B>) -> QuantizerSlot<B>) -> Self {
        each_layer!(self, l => l.map_slots(&mut f).into())
    }

    /// Puts an AdaRound quantizer, wrapping the current one, in every quantizing slot.
    pub fn with_adaround(self, params: &AdaRoundParams) -> Result<Self, QuantizerError> {
        each_layer!(self, l => l.with_adaround(params).map(Into::into))
    }

    /// Sets every AdaRound quantizer to training (soft) or evaluation (quantized) mode.
    pub fn set_training(self, training: bool) -> Self {
        self.map_slots(|slot| set_training(slot, training))
    }

    /// Writes AdaRound's rounded weights (`hard`: `1[alpha >= 0]`) into the float kernels,
    /// restores the original quantizers, and counts the quantized weights that differ from
    /// nearest rounding of the previous kernels.
    pub fn finalize(self, hard: bool) -> (Self, Vec<KernelChange>) {
        each_layer!(self, l => {
            let (l, changes) = l.finalize(hard);
            (l.into(), changes)
        })
    }

    /// The layer as one matrix product per group, where it is one (Dense, Conv2D).
    pub fn matrix(&self) -> Option<&dyn MatrixLayer<B>> {
        each_layer!(self, l => l.matrix())
    }

    /// The layer with its kernels as Burn quantized tensors; see
    /// [`AdaRoundLayer::into_burn_quantized`].
    pub fn into_burn_quantized(self, value: QuantValue) -> Result<Self, NativeQuantError> {
        each_layer!(self, l => l.into_burn_quantized(value).map(Into::into))
    }
}
