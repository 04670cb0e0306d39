use burn::{
    config::Config,
    module::Module,
    tensor::{backend::Backend, Tensor},
};

use crate::probe::{self, Flow, ProbeEvent};

/// Configuration of a [`QuantizedReLU`].
#[derive(Config, Debug)]
pub struct QuantizedReLUConfig {
    /// Number of bits of the activation (`2^bitwidth - 1` levels above zero).
    #[config(default = 4)]
    pub bitwidth: u32,
    /// Largest output value.
    #[config(default = 6.0)]
    pub max_value: f64,
}

/// A ReLU whose output is quantized to `2^bitwidth` levels in `[0, max_value]`:
///
/// `levels = 2^b - 1`, `step = max_value / levels`,
/// `y = step * clip(ceil_ste((x - step / 2) / step), 0, levels)`
///
/// with a straight-through gradient for `ceil`. Its float counterpart (used when a driver
/// asks for float activations) is the bounded ReLU `clip(x, 0, max_value)`.
#[derive(Module, Clone, Debug)]
pub struct QuantizedReLU {
    /// Number of bits.
    pub bitwidth: u32,
    /// Largest output value.
    pub max_value: f64,
}

impl QuantizedReLUConfig {
    /// Initializes the activation.
    ///
    /// # Panics
    /// If `bitwidth` is not in `1..=16` or `max_value` is not a positive finite number.
    pub fn init(&self) -> QuantizedReLU {
        assert!(
            (1..=16).contains(&self.bitwidth),
            "QuantizedReLU expects a bitwidth in 1..=16, got {}",
            self.bitwidth
        );
        assert!(
            self.max_value.is_finite() && self.max_value > 0.0,
            "QuantizedReLU expects a positive finite max_value, got {}",
            self.max_value
        );
        QuantizedReLU {
            bitwidth: self.bitwidth,
            max_value: self.max_value,
        }
    }
}

impl QuantizedReLU {
    /// Applies the quantized activation (the float one when a driver asks for it).
    ///
    /// # Shapes
    /// - `input`: `[...]`
    /// - `output`: `[...]`, same shape
    pub fn forward<B: Backend, const D: usize>(&self, input: Tensor<B, D>) -> Tensor<B, D> {
        let output = if probe::float_mode::<B>() {
            self.forward_float(input.clone())
        } else {
            self.forward_quantized(input.clone())
        };
        probe::observe::<B>(|| ProbeEvent::Activation {
            activation: self.clone(),
            input: to_flow(input),
            output: to_flow(output.clone()),
        });
        output
    }

    /// The quantized activation, always.
    pub fn forward_quantized<B: Backend, const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let levels = ((1u64 << self.bitwidth) - 1) as f64;
        let step = self.max_value / levels;
        let scaled = x.sub_scalar(step / 2.0).div_scalar(step);
        let ceiled = scaled.clone() + (scaled.clone().ceil() - scaled).detach();
        ceiled.clamp(0.0, levels).mul_scalar(step)
    }

    /// The float counterpart, `clip(x, 0, max_value)`.
    pub fn forward_float<B: Backend, const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        x.clamp(0.0, self.max_value)
    }

    /// Applies the activation to a [`Flow`] (quantized or float).
    pub fn forward_flow<B: Backend>(&self, x: Flow<B>, float: bool) -> Flow<B> {
        if float {
            x.map(|t| self.forward_float(t), |t| self.forward_float(t))
        } else {
            x.map(|t| self.forward_quantized(t), |t| self.forward_quantized(t))
        }
    }
}

fn to_flow<B: Backend, const D: usize>(t: Tensor<B, D>) -> Flow<B> {
    let dims = t.dims();
    if D == 4 {
        Flow::Maps(t.reshape([dims[0], dims[1], dims[2], dims[3]]))
    } else {
        let features = dims.last().copied().unwrap_or(1);
        let n = dims.iter().product::<usize>() / features.max(1);
        Flow::Rows(t.reshape([n, features]))
    }
}
