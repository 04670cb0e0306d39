use adaround_core::WeightQuantizer;
use burn::{
    config::Config,
    module::{Module, Param},
    nn::{Initializer, Linear},
    tensor::{backend::Backend, module::linear, Tensor},
};

use crate::{
    checks,
    file_layout::{Conversion, Layout},
    layer::single_kernel_methods,
    probe::{self, Flow, ProbeEvent},
    AdaRoundLayer, LayerKind, MatrixLayer, QuantizedLayer, QuantizerSlot,
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

impl<B: Backend> AdaRoundLayer<B> for QuantizedDense<B> {
    const KIND: LayerKind = LayerKind::Dense;
    const CONTAINER: &'static str = "Struct:QuantizedDense";

    /// PyTorch's `weight` is `[d_output, d_input]`; Keras names the kernel `kernel`.
    fn file_names(layout: Layout, param: &str) -> &'static [(&'static str, Conversion)] {
        match (layout, param) {
            (Layout::PyTorch, "weight") => &[("weight", Conversion::Transpose)],
            (Layout::Keras, "weight") => &[("kernel", Conversion::Identity)],
            _ => &[],
        }
    }

    // `into_burn_quantized` refuses a per-output-channel quantizer
    // (`NativeQuantError::NotBlocks`): its columns are not contiguous in `[d_input, d_output]`.
    single_kernel_methods!(DENSE_AXIS);

    fn forward_flow(&self, input: Flow<B>, float: bool) -> Option<Flow<B>> {
        match input {
            Flow::Rows(x) => Some(Flow::Rows(self.forward_with(x, float))),
            Flow::Maps(_) => None,
        }
    }

    fn matrix(&self) -> Option<&dyn MatrixLayer<B>> {
        Some(self)
    }
}

/// The `[n, features]` rows of a Dense layer's flow.
fn rows_of<B: Backend>(flow: &Flow<B>) -> &Tensor<B, 2> {
    match flow {
        Flow::Rows(x) => x,
        Flow::Maps(x) => panic!("a Dense layer takes rows, not maps {:?}", x.dims()),
    }
}

/// One group; the kernel `[d_input, d_output]` transposed is the matrix `[d_output, d_input]`.
impl<B: Backend> MatrixLayer<B> for QuantizedDense<B> {
    fn matrix_dims(&self) -> [usize; 3] {
        let [d_input, d_output] = self.weight.dims();
        [1, d_output, d_input]
    }

    fn positions(&self, input: &[usize]) -> usize {
        input[..input.len().saturating_sub(1)].iter().product()
    }

    fn to_matrix(&self, t: Tensor<B, 4>) -> Tensor<B, 3> {
        let [d_input, d_output] = self.weight.dims();
        let n = t.shape().num_elements();
        if n == d_input * d_output {
            t.reshape([d_input, d_output]).transpose().unsqueeze_dim(0)
        } else {
            // A factor over the output axis ([1, d_output]) or a scalar.
            t.reshape([1, n, 1])
        }
    }

    fn to_kernel(&self, t: Tensor<B, 3>) -> Tensor<B, 4> {
        let [d_input, d_output] = self.weight.dims();
        t.reshape([d_output, d_input])
            .transpose()
            .reshape([d_input, d_output, 1, 1])
    }

    fn float_matrix(&self) -> Tensor<B, 3> {
        self.weight.val().transpose().unsqueeze_dim(0)
    }

    fn delta_matrix(&self) -> Tensor<B, 3> {
        (self.quantized_weight() - self.weight.val())
            .transpose()
            .unsqueeze_dim(0)
    }

    fn bias(&self) -> Option<Tensor<B, 1>> {
        self.bias.as_ref().map(|b| b.val())
    }

    fn gram(&self, input: &Flow<B>) -> (Tensor<B, 3>, Tensor<B, 3>) {
        let x = rows_of(input).clone().detach();
        let sums = x.clone().sum_dim(0).unsqueeze_dim(0);
        (x.clone().transpose().matmul(x).unsqueeze_dim(0), sums)
    }

    fn rows(&self, input: &Flow<B>, output: &Flow<B>) -> (Tensor<B, 3>, Tensor<B, 3>) {
        (
            rows_of(input).clone().unsqueeze_dim(0),
            rows_of(output).clone().unsqueeze_dim(0),
        )
    }
}
