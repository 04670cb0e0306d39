use adaround_core::{AdaRoundParams, QuantizerError, WeightQuantizer};
use burn::tensor::quantization::QuantValue;
use burn::{
    config::Config,
    module::{Module, Param},
    nn::{conv::Conv2d, Initializer, PaddingConfig2d},
    tensor::{backend::Backend, Tensor},
};

use crate::{
    checks,
    conv2d::{conv_with, CONV_AXIS},
    file_layout::{Conversion, Layout},
    layer::{arm, finalize_kernel},
    native::{native_kernel, native_param},
    probe::{self, Flow, ProbeEvent},
    AdaRoundLayer, Kernel, KernelChange, KernelRole, LayerKind, NativeQuantError, QuantizedConv2d,
    QuantizedLayer, QuantizerSlot,
};

/// Configuration of a [`QuantizedSeparableConv2d`] layer.
#[derive(Config, Debug)]
pub struct QuantizedSeparableConv2dConfig {
    /// Number of input and output channels: `[channels_in, channels_out]`.
    pub channels: [usize; 2],
    /// Size of the depthwise kernel: `[kernel_h, kernel_w]`.
    pub kernel_size: [usize; 2],
    /// Depthwise channels per input channel.
    #[config(default = "1")]
    pub depth_multiplier: usize,
    /// Stride of the depthwise convolution.
    #[config(default = "[1, 1]")]
    pub stride: [usize; 2],
    /// Dilation of the depthwise convolution.
    #[config(default = "[1, 1]")]
    pub dilation: [usize; 2],
    /// Padding of the depthwise convolution (`Same` follows Keras).
    #[config(default = "PaddingConfig2d::Valid")]
    pub padding: PaddingConfig2d,
    /// Whether the layer has a bias (added after the pointwise convolution).
    #[config(default = true)]
    pub bias: bool,
    /// Quantizer of the pointwise kernel (per output channel, 8 bits by default).
    #[config(default = "WeightQuantizer::MaxPerAxis { bitwidth: 8 }")]
    pub quantizer: WeightQuantizer,
    /// Quantizer of the depthwise kernel; `None` copies `quantizer` (as the reference does).
    #[config(default = "None")]
    pub quantizer_dw: Option<WeightQuantizer>,
    /// Initializer of the kernels and bias.
    #[config(default = "Initializer::KaimingUniform{gain:0.5773502691896258, fan_out_only:false}")]
    pub initializer: Initializer,
}

/// A depthwise-separable convolution with two quantized kernels:
/// `y = pointwise(depthwise(x, Q_dw(K_dw)), Q(K_pw)) + b`.
///
/// Should be created with [`QuantizedSeparableConv2dConfig`] or from a depthwise and a
/// pointwise float [`Conv2d`] with [`QuantizedSeparableConv2d::from_conv2d_pair`].
#[derive(Module, Debug)]
pub struct QuantizedSeparableConv2d<B: Backend> {
    /// Float depthwise kernel `[channels_in * depth_multiplier, 1, kernel_h, kernel_w]`.
    pub weight_dw: Param<Tensor<B, 4>>,
    /// Float pointwise kernel `[channels_out, channels_in * depth_multiplier, 1, 1]`.
    pub weight: Param<Tensor<B, 4>>,
    /// Float bias `[channels_out]`, added after the pointwise convolution.
    pub bias: Option<Param<Tensor<B, 1>>>,
    /// Quantizer of the depthwise kernel (channels on axis 0).
    pub quantizer_dw: QuantizerSlot<B>,
    /// Quantizer of the pointwise kernel (output channels on axis 0).
    pub quantizer: QuantizerSlot<B>,
    /// Stride of the depthwise convolution.
    pub stride: [usize; 2],
    /// Dilation of the depthwise convolution.
    pub dilation: [usize; 2],
    /// Padding of the depthwise convolution.
    pub padding: PaddingConfig2d,
    /// Number of input channels (`depthwise channels / depth_multiplier`).
    pub channels_in: usize,
}

impl QuantizedSeparableConv2dConfig {
    /// Initializes a new layer.
    ///
    /// # Panics
    /// If `depth_multiplier` is 0, or a quantizer's bitwidth or threshold is invalid (one
    /// built field by field).
    pub fn init<B: Backend>(&self, device: &B::Device) -> QuantizedSeparableConv2d<B> {
        let layer = "QuantizedSeparableConv2d";
        crate::checks::check_quantizer(layer, &self.quantizer);
        if let Some(q) = &self.quantizer_dw {
            crate::checks::check_quantizer(layer, q);
        }
        let [c_in, c_out] = self.channels;
        let [kh, kw] = self.kernel_size;
        let mid = c_in * self.depth_multiplier;
        assert!(
            mid > 0,
            "QuantizedSeparableConv2d expects depth_multiplier >= 1"
        );
        let init = &self.initializer;
        let weight_dw = init.init_with([mid, 1, kh, kw], Some(kh * kw), Some(kh * kw), device);
        let weight = init.init_with([c_out, mid, 1, 1], Some(mid), Some(c_out), device);
        let bias = self
            .bias
            .then(|| init.init_with([c_out], Some(mid), Some(c_out), device));
        let quantizer_dw = self
            .quantizer_dw
            .clone()
            .unwrap_or_else(|| self.quantizer.clone());
        QuantizedSeparableConv2d {
            weight_dw,
            weight,
            bias,
            quantizer_dw: quantizer_dw.into(),
            quantizer: self.quantizer.clone().into(),
            stride: self.stride,
            dilation: self.dilation,
            padding: self.padding.clone(),
            channels_in: c_in,
        }
    }
}

impl<B: Backend> QuantizedSeparableConv2d<B> {
    /// Builds the layer from a float depthwise convolution (`groups == channels_in`) and a
    /// float 1x1 pointwise convolution. A depthwise bias is folded exactly into the pointwise
    /// bias (`b = b_pw + W_pw · b_dw`).
    ///
    /// # Panics
    /// If the depthwise layer is not depthwise, or the pointwise layer is not a 1x1, stride-1,
    /// unpadded, ungrouped convolution over the depthwise channels.
    pub fn from_conv2d_pair(
        depthwise: Conv2d<B>,
        pointwise: Conv2d<B>,
        quantizer_dw: WeightQuantizer,
        quantizer: WeightQuantizer,
    ) -> Self {
        let [mid, per_group, _, _] = depthwise.weight.dims();
        assert!(
            per_group == 1 && mid % depthwise.groups == 0,
            "the depthwise Conv2d must have one input channel per group, got kernel {:?} with {} groups",
            depthwise.weight.dims(),
            depthwise.groups
        );
        let [c_out, c_mid, ph, pw] = pointwise.weight.dims();
        assert!(
            c_mid == mid && [ph, pw] == [1, 1] && pointwise.groups == 1 && pointwise.stride == [1, 1],
            "the pointwise Conv2d must be 1x1 over the {mid} depthwise channels, got kernel {:?}, stride {:?}, {} groups",
            pointwise.weight.dims(),
            pointwise.stride,
            pointwise.groups
        );
        let bias = match (depthwise.bias, pointwise.bias) {
            (None, bias) => bias,
            (Some(b_dw), b_pw) => {
                let w = pointwise.weight.val().reshape([c_out, mid]);
                let folded = w.matmul(b_dw.val().reshape([mid, 1])).reshape([c_out]);
                let total = match b_pw {
                    Some(b) => b.val() + folded,
                    None => folded,
                };
                Some(Param::from_tensor(total))
            }
        };
        Self {
            weight_dw: depthwise.weight,
            weight: pointwise.weight,
            bias,
            quantizer_dw: quantizer_dw.into(),
            quantizer: quantizer.into(),
            stride: depthwise.stride,
            dilation: depthwise.dilation,
            padding: depthwise.padding,
            channels_in: depthwise.groups,
        }
    }

    /// The layer as its two convolutions: the depthwise one (`groups == channels_in`, the
    /// depthwise stride, dilation and padding, no bias) and the 1x1 pointwise one (with the
    /// bias). `pointwise(depthwise(x))` is the layer's forward; [`join`](Self::join) undoes it.
    pub fn split(self) -> (QuantizedConv2d<B>, QuantizedConv2d<B>) {
        let depthwise = QuantizedConv2d {
            weight: self.weight_dw,
            bias: None,
            quantizer: self.quantizer_dw,
            stride: self.stride,
            dilation: self.dilation,
            groups: self.channels_in,
            padding: self.padding,
        };
        let pointwise = QuantizedConv2d {
            weight: self.weight,
            bias: self.bias,
            quantizer: self.quantizer,
            stride: [1, 1],
            dilation: [1, 1],
            groups: 1,
            padding: PaddingConfig2d::Valid,
        };
        (depthwise, pointwise)
    }

    /// The layer from the two halves of [`split`](Self::split).
    pub fn join(depthwise: QuantizedConv2d<B>, pointwise: QuantizedConv2d<B>) -> Self {
        Self {
            weight_dw: depthwise.weight,
            weight: pointwise.weight,
            bias: pointwise.bias,
            quantizer_dw: depthwise.quantizer,
            quantizer: pointwise.quantizer,
            stride: depthwise.stride,
            dilation: depthwise.dilation,
            padding: depthwise.padding,
            channels_in: depthwise.groups,
        }
    }

    /// Number of input channels the layer expects (the groups of the depthwise convolution).
    pub fn channels_in(&self) -> usize {
        self.channels_in
    }

    /// The two kernels as the forward pass uses them: `(depthwise, pointwise)`.
    pub fn quantized_weights(&self) -> (Tensor<B, 4>, Tensor<B, 4>) {
        (
            self.quantizer_dw.apply(self.weight_dw.val(), CONV_AXIS),
            self.quantizer.apply(self.weight.val(), CONV_AXIS),
        )
    }

    /// Applies the layer with its quantized kernels.
    ///
    /// # Shapes
    /// - `input`: `[batch_size, channels_in, height_in, width_in]`
    /// - `output`: `[batch_size, channels_out, height_out, width_out]`
    pub fn forward(&self, input: Tensor<B, 4>) -> Tensor<B, 4> {
        checks::check_channels(
            "QuantizedSeparableConv2d",
            &input.dims(),
            self.channels_in(),
        );
        let float = probe::float_mode::<B>();
        let output = self.forward_with(input.clone(), float);
        probe::observe::<B>(|| ProbeEvent::Layer {
            layer: QuantizedLayer::SeparableConv2d(self.clone()),
            input: Flow::Maps(input),
            output: Flow::Maps(output.clone()),
        });
        output
    }

    /// Applies the layer with its float kernels (quantizers disabled).
    ///
    /// # Shapes
    /// - `input`: `[batch_size, channels_in, height_in, width_in]`
    /// - `output`: `[batch_size, channels_out, height_out, width_out]`
    pub fn forward_float(&self, input: Tensor<B, 4>) -> Tensor<B, 4> {
        checks::check_channels(
            "QuantizedSeparableConv2d",
            &input.dims(),
            self.channels_in(),
        );
        self.forward_with(input, true)
    }

    pub(crate) fn forward_with(&self, input: Tensor<B, 4>, float: bool) -> Tensor<B, 4> {
        let (dw, pw) = if float {
            (self.weight_dw.val(), self.weight.val())
        } else {
            self.quantized_weights()
        };
        let groups = self.channels_in();
        let x = conv_with(
            input,
            dw,
            None,
            &self.padding,
            self.stride,
            self.dilation,
            groups,
        );
        let bias = self.bias.as_ref().map(|b| b.val());
        conv_with(x, pw, bias, &PaddingConfig2d::Valid, [1, 1], [1, 1], 1)
    }
}

/// Two kernels, depthwise then pointwise. No [`MatrixLayer`](crate::MatrixLayer) form: the
/// driver splits the layer into its two convolutions for that (see
/// [`split`](QuantizedSeparableConv2d::split)).
impl<B: Backend> AdaRoundLayer<B> for QuantizedSeparableConv2d<B> {
    const KIND: LayerKind = LayerKind::SeparableConv2d;
    const CONTAINER: &'static str = "Struct:QuantizedSeparableConv2d";

    /// PyTorch: this layer's own names, or those of a module holding two `Conv2d`s
    /// (`depthwise` / `pointwise`, or `conv_dw` / `conv_pw`). Keras: `depthwise_kernel`
    /// `[kh, kw, c, m]` and `pointwise_kernel` `[1, 1, c * m, c_out]`.
    fn file_names(layout: Layout, param: &str) -> &'static [(&'static str, Conversion)] {
        use Conversion::{Identity, KerasConv, KerasDepthwise};
        match (layout, param) {
            (Layout::PyTorch, "weight_dw") => &[
                ("weight_dw", Identity),
                ("depthwise.weight", Identity),
                ("conv_dw.weight", Identity),
            ],
            (Layout::PyTorch, "weight") => &[
                ("weight", Identity),
                ("pointwise.weight", Identity),
                ("conv_pw.weight", Identity),
            ],
            (Layout::PyTorch, "bias") => &[
                ("bias", Identity),
                ("pointwise.bias", Identity),
                ("conv_pw.bias", Identity),
            ],
            (Layout::Keras, "weight_dw") => &[("depthwise_kernel", KerasDepthwise)],
            (Layout::Keras, "weight") => &[("pointwise_kernel", KerasConv)],
            _ => &[],
        }
    }

    fn into_burn_quantized(self, value: QuantValue) -> Result<Self, NativeQuantError> {
        let dw = native_kernel(
            KernelRole::Depthwise,
            self.weight_dw.val(),
            &self.quantizer_dw,
            CONV_AXIS,
            value,
        )?;
        let pw = native_kernel(
            KernelRole::Pointwise,
            self.weight.val(),
            &self.quantizer,
            CONV_AXIS,
            value,
        )?;
        Ok(Self {
            weight_dw: native_param(self.weight_dw, dw),
            weight: native_param(self.weight, pw),
            quantizer_dw: WeightQuantizer::Float.into(),
            quantizer: WeightQuantizer::Float.into(),
            ..self
        })
    }

    fn kernels(&self) -> Vec<Kernel<'_, B>> {
        vec![
            Kernel::new(
                KernelRole::Depthwise,
                &self.weight_dw,
                &self.quantizer_dw,
                CONV_AXIS,
            ),
            Kernel::new(
                KernelRole::Pointwise,
                &self.weight,
                &self.quantizer,
                CONV_AXIS,
            ),
        ]
    }

    fn forward_flow(&self, input: Flow<B>, float: bool) -> Option<Flow<B>> {
        match input {
            Flow::Maps(x) => Some(Flow::Maps(self.forward_with(x, float))),
            Flow::Rows(_) => None,
        }
    }

    fn map_slots(mut self, f: &mut dyn FnMut(QuantizerSlot<B>) -> QuantizerSlot<B>) -> Self {
        self.quantizer_dw = f(self.quantizer_dw);
        self.quantizer = f(self.quantizer);
        self
    }

    fn with_adaround(mut self, params: &AdaRoundParams) -> Result<Self, QuantizerError> {
        self.quantizer_dw = arm(&self.weight_dw, self.quantizer_dw, CONV_AXIS, params)?;
        self.quantizer = arm(&self.weight, self.quantizer, CONV_AXIS, params)?;
        Ok(self)
    }

    fn finalize(mut self, hard: bool) -> (Self, Vec<KernelChange>) {
        let (w, s, dw) = finalize_kernel(
            self.weight_dw,
            self.quantizer_dw,
            CONV_AXIS,
            hard,
            KernelRole::Depthwise,
        );
        (self.weight_dw, self.quantizer_dw) = (w, s);
        let (w, s, pw) = finalize_kernel(
            self.weight,
            self.quantizer,
            CONV_AXIS,
            hard,
            KernelRole::Pointwise,
        );
        (self.weight, self.quantizer) = (w, s);
        (self, vec![dw, pw])
    }
}
