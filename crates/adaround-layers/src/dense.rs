use adaround_core::WeightQuantizer;
use burn::{
    config::Config,
    module::{Module, Param},
    nn::{Initializer, Linear},
    tensor::{backend::Backend, module::linear, Tensor},
};

use crate::{
    checks,
    probe::{self, Flow, ProbeEvent},
    QuantizedLayer, QuantizerSlot,
};

/// Output-channel axis of a Dense kernel `[d_input, d_output]`.
pub const DENSE_AXIS: usize = 1;

/// Configuration of a [`QuantizedDense`] layer.
#[derive(Config, Debug)]
pub struct QuantizedDenseConfig {
    /// Size of the input features.
    pub d_input: usize,
    /// Size of the output features.
    pub d_output: usize,
    /// Whether the layer has a bias.
    #[config(default = true)]
    pub bias: bool,
    /// Quantizer of the kernel (per output channel, 8 bits by default).
    #[config(default = "WeightQuantizer::MaxPerAxis { bitwidth: 8 }")]
    pub quantizer: WeightQuantizer,
    /// Initializer of the kernel and bias (as `burn::nn::Linear`).
    #[config(default = "Initializer::KaimingUniform{gain:0.5773502691896258, fan_out_only:false}")]
    pub initializer: Initializer,
}

/// A fully connected layer whose kernel is quantized on every forward: `y = x · Q(W) + b`.
///
/// Same layout and semantics as [`burn::nn::Linear`]. Should be created with
/// [`QuantizedDenseConfig`] or from a float layer with [`QuantizedDense::from_linear`].
#[derive(Module, Debug)]
pub struct QuantizedDense<B: Backend> {
    /// Float kernel of shape `[d_input, d_output]`.
    pub weight: Param<Tensor<B, 2>>,
    /// Float bias of shape `[d_output]`.
    pub bias: Option<Param<Tensor<B, 1>>>,
    /// Quantizer of the kernel (output channels on axis 1).
    pub quantizer: QuantizerSlot<B>,
}

impl QuantizedDenseConfig {
    /// Initializes a new layer.
    ///
    /// # Panics
    /// If the quantizer's bitwidth or threshold is invalid (one built field by field).
    pub fn init<B: Backend>(&self, device: &B::Device) -> QuantizedDense<B> {
        checks::check_quantizer("QuantizedDense", &self.quantizer);
        let shape = [self.d_input, self.d_output];
        let fan = (Some(self.d_input), Some(self.d_output));
        let weight = self.initializer.init_with(shape, fan.0, fan.1, device);
        let bias = self.bias.then(|| {
            self.initializer
                .init_with([self.d_output], fan.0, fan.1, device)
        });
        QuantizedDense {
            weight,
            bias,
            quantizer: self.quantizer.clone().into(),
        }
    }
}

impl<B: Backend> QuantizedDense<B> {
    /// Wraps a float [`Linear`] layer (same weights, same bias) with `quantizer`.
    pub fn from_linear(linear: Linear<B>, quantizer: WeightQuantizer) -> Self {
        Self {
            weight: linear.weight,
            bias: linear.bias,
            quantizer: quantizer.into(),
        }
    }

    /// The float layer without quantization (the weights and bias are shared).
    pub fn to_linear(&self) -> Linear<B> {
        Linear {
            weight: self.weight.clone(),
            bias: self.bias.clone(),
        }
    }

    /// The kernel as the forward pass uses it (quantized, or AdaRound's weights).
    pub fn quantized_weight(&self) -> Tensor<B, 2> {
        self.quantizer.apply(self.weight.val(), DENSE_AXIS)
    }

    /// Applies the layer with its quantized kernel.
    ///
    /// # Shapes
    /// - `input`: `[..., d_input]`
    /// - `output`: `[..., d_output]`
    pub fn forward<const D: usize>(&self, input: Tensor<B, D>) -> Tensor<B, D> {
        let [d_input, d_output] = self.weight.dims();
        checks::check_dense_input(&input.dims(), d_input);
        let float = probe::float_mode::<B>();
        let output = self.forward_with(input.clone(), float);
        probe::observe::<B>(|| ProbeEvent::Layer {
            layer: QuantizedLayer::Dense(self.clone()),
            input: Flow::Rows(to_rows(input, d_input)),
            output: Flow::Rows(to_rows(output.clone(), d_output)),
        });
        output
    }

    /// Applies the layer with its float kernel (quantizer disabled).
    ///
    /// # Shapes
    /// - `input`: `[..., d_input]`
    /// - `output`: `[..., d_output]`
    pub fn forward_float<const D: usize>(&self, input: Tensor<B, D>) -> Tensor<B, D> {
        checks::check_dense_input(&input.dims(), self.weight.dims()[0]);
        self.forward_with(input, true)
    }

    pub(crate) fn forward_with<const D: usize>(
        &self,
        input: Tensor<B, D>,
        float: bool,
    ) -> Tensor<B, D> {
        let weight = if float {
            self.weight.val()
        } else {
            self.quantized_weight()
        };
        linear(input, weight, self.bias.as_ref().map(|b| b.val()))
    }
}

fn to_rows<B: Backend, const D: usize>(t: Tensor<B, D>, features: usize) -> Tensor<B, 2> {
    let n = t.shape().num_elements() / features.max(1);
    t.reshape([n, features])
}
