use adaround_core::WeightQuantizer;
use burn::{
    config::Config,
    module::{Module, Param},
    nn::{conv::Conv2d, Initializer, PaddingConfig2d},
    tensor::{
        backend::Backend,
        module::conv2d,
        ops::{PadMode, PaddedConvOptions},
        Slice, Tensor,
    },
};

use crate::{
    checks,
    file_layout::{Conversion, Layout},
    layer::single_kernel_methods,
    probe::{self, Flow, ProbeEvent},
    AdaRoundLayer, LayerKind, MatrixLayer, QuantizedLayer, QuantizerSlot,
};

/// Output-channel axis of a Conv2d kernel `[channels_out, channels_in / groups, kh, kw]`.
pub const CONV_AXIS: usize = 0;

/// Configuration of a [`QuantizedConv2d`] layer.
#[derive(Config, Debug)]
pub struct QuantizedConv2dConfig {
    /// Number of input and output channels: `[channels_in, channels_out]`.
    pub channels: [usize; 2],
    /// Size of the kernel: `[kernel_h, kernel_w]`.
    pub kernel_size: [usize; 2],
    /// Stride.
    #[config(default = "[1, 1]")]
    pub stride: [usize; 2],
    /// Spacing between kernel elements.
    #[config(default = "[1, 1]")]
    pub dilation: [usize; 2],
    /// Number of groups (`channels_in` for a depthwise convolution).
    #[config(default = "1")]
    pub groups: usize,
    /// Padding: `Valid`, `Same` (Keras semantics: the extra row/column of an odd total
    /// padding goes to the bottom/right) or `Explicit(top, left, bottom, right)`.
    #[config(default = "PaddingConfig2d::Valid")]
    pub padding: PaddingConfig2d,
    /// Whether the layer has a bias.
    #[config(default = true)]
    pub bias: bool,
    /// Quantizer of the kernel (per output channel, 8 bits by default).
    #[config(default = "WeightQuantizer::MaxPerAxis { bitwidth: 8 }")]
    pub quantizer: WeightQuantizer,
    /// Initializer of the kernel and bias (as `burn::nn::conv::Conv2d`).
    #[config(default = "Initializer::KaimingUniform{gain:0.5773502691896258, fan_out_only:false}")]
    pub initializer: Initializer,
}

/// A 2D convolution whose kernel is quantized on every forward:
/// `y = conv2d(x, Q(K), stride, padding, dilation, groups) + b`.
///
/// Same layout as [`burn::nn::conv::Conv2d`]. Should be created with
/// [`QuantizedConv2dConfig`] or from a float layer with [`QuantizedConv2d::from_conv2d`].
#[derive(Module, Debug)]
pub struct QuantizedConv2d<B: Backend> {
    /// Float kernel of shape `[channels_out, channels_in / groups, kernel_h, kernel_w]`.
    pub weight: Param<Tensor<B, 4>>,
    /// Float bias of shape `[channels_out]`.
    pub bias: Option<Param<Tensor<B, 1>>>,
    /// Quantizer of the kernel (output channels on axis 0).
    pub quantizer: QuantizerSlot<B>,
    /// Stride.
    pub stride: [usize; 2],
    /// Dilation.
    pub dilation: [usize; 2],
    /// Groups.
    pub groups: usize,
    /// Padding.
    pub padding: PaddingConfig2d,
}

impl QuantizedConv2dConfig {
    /// Initializes a new layer.
    ///
    /// # Panics
    /// If the channels are not divisible by the groups, or the quantizer's bitwidth or
    /// threshold is invalid (one built field by field).
    pub fn init<B: Backend>(&self, device: &B::Device) -> QuantizedConv2d<B> {
        crate::checks::check_quantizer("QuantizedConv2d", &self.quantizer);
        let [c_in, c_out] = self.channels;
        assert!(
            self.groups > 0 && c_in % self.groups == 0 && c_out % self.groups == 0,
            "QuantizedConv2d expects channels {:?} divisible by groups {}",
            self.channels,
            self.groups
        );
        let [kh, kw] = self.kernel_size;
        let shape = [c_out, c_in / self.groups, kh, kw];
        let fan_in = c_in / self.groups * kh * kw;
        let fan_out = c_out / self.groups * kh * kw;
        let weight = self
            .initializer
            .init_with(shape, Some(fan_in), Some(fan_out), device);
        let bias = self.bias.then(|| {
            self.initializer
                .init_with([c_out], Some(fan_in), Some(fan_out), device)
        });
        QuantizedConv2d {
            weight,
            bias,
            quantizer: self.quantizer.clone().into(),
            stride: self.stride,
            dilation: self.dilation,
            groups: self.groups,
            padding: self.padding.clone(),
        }
    }
}

/// Keras `same` padding along one axis: `(start, end)`, the extra element at the end.
pub fn same_padding(
    size_in: usize,
    kernel: usize,
    stride: usize,
    dilation: usize,
) -> (usize, usize) {
    let effective = (kernel - 1) * dilation + 1;
    let size_out = size_in.div_ceil(stride);
    let total = ((size_out.max(1) - 1) * stride + effective).saturating_sub(size_in);
    (total / 2, total - total / 2)
}

/// `((top, bottom), (left, right))` padding of a convolution.
pub(crate) fn padding_pairs(
    padding: &PaddingConfig2d,
    [h, w]: [usize; 2],
    [kh, kw]: [usize; 2],
    stride: [usize; 2],
    dilation: [usize; 2],
) -> ((usize, usize), (usize, usize)) {
    match *padding {
        PaddingConfig2d::Valid => ((0, 0), (0, 0)),
        PaddingConfig2d::Same => (
            same_padding(h, kh, stride[0], dilation[0]),
            same_padding(w, kw, stride[1], dilation[1]),
        ),
        PaddingConfig2d::Explicit(top, left, bottom, right) => ((top, bottom), (left, right)),
    }
}

/// A convolution with the given kernel and Keras-compatible padding.
#[allow(clippy::too_many_arguments)] // the arguments of a convolution, named as in Burn
pub(crate) fn conv_with<B: Backend>(
    input: Tensor<B, 4>,
    weight: Tensor<B, 4>,
    bias: Option<Tensor<B, 1>>,
    padding: &PaddingConfig2d,
    stride: [usize; 2],
    dilation: [usize; 2],
    groups: usize,
) -> Tensor<B, 4> {
    let [n, c, h, w] = input.dims();
    let [c_out, _, kh, kw] = weight.dims();
    let ((top, bottom), (left, right)) = padding_pairs(padding, [h, w], [kh, kw], stride, dilation);
    let pointwise =
        [kh, kw, stride[0], stride[1], groups] == [1; 5] && [top, bottom, left, right] == [0; 4];
    if pointwise && B::ad_enabled(&input.device()) {
        // A 1x1 convolution as one matrix product: Burn's autodiff computes its gradients
        // with two more products, where the convolution's backward (on the CPU backends) is
        // several times slower. Inference keeps the convolution.
        let rows = input.permute([0, 2, 3, 1]).reshape([n * h * w, c]);
        let out = rows.matmul(weight.reshape([c_out, c]).transpose());
        let out = match bias {
            Some(b) => out + b.unsqueeze_dim(0),
            None => out,
        };
        return out.reshape([n, h, w, c_out]).permute([0, 3, 1, 2]);
    }
    let options =
        PaddedConvOptions::asymmetric(stride, [top, left], [bottom, right], dilation, groups);
    conv2d(input, weight, bias, options)
}

impl<B: Backend> QuantizedConv2d<B> {
    /// Wraps a float [`Conv2d`] layer (same weights, bias and options) with `quantizer`.
    pub fn from_conv2d(conv: Conv2d<B>, quantizer: WeightQuantizer) -> Self {
        Self {
            weight: conv.weight,
            bias: conv.bias,
            quantizer: quantizer.into(),
            stride: conv.stride,
            dilation: conv.dilation,
            groups: conv.groups,
            padding: conv.padding,
        }
    }

    /// The kernel as the forward pass uses it (quantized, or AdaRound's weights).
    pub fn quantized_weight(&self) -> Tensor<B, 4> {
        self.quantizer.apply(self.weight.val(), CONV_AXIS)
    }

    /// Number of input channels the layer expects.
    pub fn channels_in(&self) -> usize {
        self.weight.dims()[1] * self.groups
    }

    /// `((top, bottom), (left, right))` padding applied to an input of size `[height, width]`.
    pub fn padding_pairs(&self, size: [usize; 2]) -> ((usize, usize), (usize, usize)) {
        let [_, _, kh, kw] = self.weight.dims();
        padding_pairs(&self.padding, size, [kh, kw], self.stride, self.dilation)
    }

    /// The im2col patches of `input`, padding included: `[batch, channels_in * kh * kw, L]`
    /// with `L` the output positions per sample (channels outermost, as the kernel's
    /// `[channels_in / groups, kh, kw]` flattens).
    pub fn patches(&self, input: Tensor<B, 4>) -> Tensor<B, 3> {
        let [b, c, h, w] = input.dims();
        let [_, _, kh, kw] = self.weight.dims();
        let ((top, bottom), (left, right)) = self.padding_pairs([h, w]);
        let x = if top + bottom + left + right > 0 {
            input.pad([(top, bottom), (left, right)], PadMode::Constant(0.0))
        } else {
            input
        };
        let ([sh, sw], [dh, dw]) = (self.stride, self.dilation);
        let (hp, wp) = (h + top + bottom, w + left + right);
        let ho = (hp - (kh - 1) * dh - 1) / sh + 1;
        let wo = (wp - (kw - 1) * dw - 1) / sw + 1;
        if kh * kw == 1 && sh == 1 && sw == 1 {
            return x.reshape([b, c, ho * wo]);
        }
        // One strided slice of the padded input per kernel offset: `kh * kw` copies of the
        // output-sized maps (Burn's generic `unfold4d` is a convolution with a one-hot kernel,
        // `c * kh * kw` output channels over `c` input channels: quadratic in the channels).
        let offsets = (0..kh).flat_map(|i| (0..kw).map(move |j| (i, j)));
        let slices: Vec<_> = offsets
            .map(|(i, j)| {
                let rows = Slice::new(
                    (i * dh) as isize,
                    Some((i * dh + (ho - 1) * sh + 1) as isize),
                    sh as isize,
                );
                let cols = Slice::new(
                    (j * dw) as isize,
                    Some((j * dw + (wo - 1) * sw + 1) as isize),
                    sw as isize,
                );
                x.clone()
                    .slice([Slice::full(), Slice::full(), rows, cols])
                    .reshape([b, c, 1, ho * wo])
            })
            .collect();
        Tensor::cat(slices, 2).reshape([b, c * kh * kw, ho * wo])
    }

    /// Applies the layer with its quantized kernel.
    ///
    /// # Shapes
    /// - `input`: `[batch_size, channels_in, height_in, width_in]`
    /// - `output`: `[batch_size, channels_out, height_out, width_out]`
    pub fn forward(&self, input: Tensor<B, 4>) -> Tensor<B, 4> {
        checks::check_channels("QuantizedConv2d", &input.dims(), self.channels_in());
        let float = probe::float_mode::<B>();
        let output = self.forward_with(input.clone(), float);
        probe::observe::<B>(|| ProbeEvent::Layer {
            layer: QuantizedLayer::Conv2d(self.clone()),
            input: Flow::Maps(input),
            output: Flow::Maps(output.clone()),
        });
        output
    }

    /// Applies the layer with its float kernel (quantizer disabled).
    ///
    /// # Shapes
    /// - `input`: `[batch_size, channels_in, height_in, width_in]`
    /// - `output`: `[batch_size, channels_out, height_out, width_out]`
    pub fn forward_float(&self, input: Tensor<B, 4>) -> Tensor<B, 4> {
        checks::check_channels("QuantizedConv2d", &input.dims(), self.channels_in());
        self.forward_with(input, true)
    }

    pub(crate) fn forward_with(&self, input: Tensor<B, 4>, float: bool) -> Tensor<B, 4> {
        let weight = if float {
            self.weight.val()
        } else {
            self.quantized_weight()
        };
        let bias = self.bias.as_ref().map(|b| b.val());
        conv_with(
            input,
            weight,
            bias,
            &self.padding,
            self.stride,
            self.dilation,
            self.groups,
        )
    }
}

impl<B: Backend> AdaRoundLayer<B> for QuantizedConv2d<B> {
    const KIND: LayerKind = LayerKind::Conv2d;
    const CONTAINER: &'static str = "Struct:QuantizedConv2d";

    /// PyTorch's names and layout are Burn's; Keras' `kernel` is channels-last.
    fn file_names(layout: Layout, param: &str) -> &'static [(&'static str, Conversion)] {
        match (layout, param) {
            (Layout::Keras, "weight") => &[("kernel", Conversion::KerasConv)],
            _ => &[],
        }
    }

    // `into_burn_quantized`: one block per output channel for a per-axis quantizer.
    single_kernel_methods!(CONV_AXIS);

    fn forward_flow(&self, input: Flow<B>, float: bool) -> Option<Flow<B>> {
        match input {
            Flow::Maps(x) => Some(Flow::Maps(self.forward_with(x, float))),
            Flow::Rows(_) => None,
        }
    }

    fn matrix(&self) -> Option<&dyn MatrixLayer<B>> {
        Some(self)
    }
}

/// The `[batch, channels, height, width]` maps of a convolution's flow.
fn maps_of<B: Backend>(flow: &Flow<B>) -> &Tensor<B, 4> {
    match flow {
        Flow::Maps(x) => x,
        Flow::Rows(x) => panic!("a convolution takes maps, not rows {:?}", x.dims()),
    }
}

/// One matrix `[channels_out / groups, channels_in / groups * kh * kw]` per group: the
/// kernel `[channels_out, channels_in / groups, kh, kw]` reshaped.
impl<B: Backend> MatrixLayer<B> for QuantizedConv2d<B> {
    fn matrix_dims(&self) -> [usize; 3] {
        let [c_out, k_g, kh, kw] = self.weight.dims();
        [self.groups, c_out / self.groups, k_g * kh * kw]
    }

    fn positions(&self, input: &[usize]) -> usize {
        let &[b, _, h, w] = input else {
            panic!("a convolution takes maps, not {input:?}")
        };
        let [_, _, kh, kw] = self.weight.dims();
        let ((top, bottom), (left, right)) = self.padding_pairs([h, w]);
        let out = |size: usize, pad: usize, k: usize, stride: usize, dilation: usize| {
            (size + pad).saturating_sub(dilation * (k - 1) + 1) / stride + 1
        };
        let h_out = out(h, top + bottom, kh, self.stride[0], self.dilation[0]);
        let w_out = out(w, left + right, kw, self.stride[1], self.dilation[1]);
        b * h_out * w_out
    }

    fn to_matrix(&self, t: Tensor<B, 4>) -> Tensor<B, 3> {
        let [groups, rows, k] = self.matrix_dims();
        let n = t.shape().num_elements();
        if n == groups * rows * k {
            t.reshape([groups, rows, k])
        } else if n == 1 {
            t.reshape([1, 1, 1])
        } else {
            t.reshape([groups, rows, 1])
        }
    }

    fn to_kernel(&self, t: Tensor<B, 3>) -> Tensor<B, 4> {
        t.reshape(self.weight.dims())
    }

    fn float_matrix(&self) -> Tensor<B, 3> {
        self.weight.val().reshape(self.matrix_dims())
    }

    fn delta_matrix(&self) -> Tensor<B, 3> {
        (self.quantized_weight() - self.weight.val()).reshape(self.matrix_dims())
    }

    fn bias(&self) -> Option<Tensor<B, 1>> {
        self.bias.as_ref().map(|b| b.val())
    }

    fn gram(&self, input: &Flow<B>) -> (Tensor<B, 3>, Tensor<B, 3>) {
        let [groups, _, k] = self.matrix_dims();
        let p = self.patches(maps_of(input).clone().detach());
        let [b, _, positions] = p.dims();
        // [b, groups, K, L] -> [groups, K, b * L]
        let p = p.reshape([b, groups, k, positions]).permute([1, 2, 0, 3]);
        let p = p.reshape([groups, k, b * positions]);
        let sums = p.clone().sum_dim(2).swap_dims(1, 2);
        (p.clone().matmul(p.swap_dims(1, 2)), sums)
    }

    fn rows(&self, input: &Flow<B>, output: &Flow<B>) -> (Tensor<B, 3>, Tensor<B, 3>) {
        let [groups, rows, k] = self.matrix_dims();
        let p = self.patches(maps_of(input).clone());
        let [b, _, positions] = p.dims();
        let p = p
            .reshape([b, groups, k, positions])
            .permute([1, 0, 3, 2])
            .reshape([groups, b * positions, k]);
        let t = maps_of(output)
            .clone()
            .reshape([b, groups, rows, positions])
            .permute([1, 0, 3, 2])
            .reshape([groups, b * positions, rows]);
        (p, t)
    }
}
