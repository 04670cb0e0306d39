use core::marker::PhantomData;

use burn::{
    config::Config,
    module::{
        AutodiffModule, Content, Devices, Module, ModuleDisplay, ModuleDisplayDefault,
        ModuleMapper, ModuleVisitor,
    },
    tensor::{
        backend::{AutodiffBackend, Backend},
        Tensor,
    },
};
use serde::{Deserialize, Serialize};

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
///
/// A module without tensors. Its bitwidth and calibrated `max_value` are saved with the
/// model's record ([`QuantizedReLURecord`]); the backend parameter is what lets Burn's
/// `#[derive(Module)]` on the parent model keep them.
pub struct QuantizedReLU<B: Backend> {
    /// Number of bits.
    pub bitwidth: u32,
    /// Largest output value.
    pub max_value: f64,
    backend: PhantomData<B>,
}

/// The record of a [`QuantizedReLU`]: its bitwidth and range.
///
/// Deserialising checks them as [`QuantizedReLUConfig::init`] does: a record with a bitwidth
/// of 0 or a non-positive range is an error, not an activation.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "UncheckedReLU")]
pub struct QuantizedReLURecord {
    /// Number of bits.
    pub bitwidth: u32,
    /// Largest output value.
    pub max_value: f64,
}

adaround_core::persistent_module!(QuantizedReLURecord);

/// [`QuantizedReLURecord`] as read, before its values are checked.
#[derive(Deserialize)]
struct UncheckedReLU {
    bitwidth: u32,
    max_value: f64,
}

impl TryFrom<UncheckedReLU> for QuantizedReLURecord {
    type Error = String;

    fn try_from(r: UncheckedReLU) -> Result<Self, String> {
        if !(1..=16).contains(&r.bitwidth) {
            Err(format!(
                "QuantizedReLU bitwidth {} is not in 1..=16",
                r.bitwidth
            ))
        } else if !(r.max_value.is_finite() && r.max_value > 0.0) {
            Err(format!(
                "QuantizedReLU max_value {} is not positive and finite",
                r.max_value
            ))
        } else {
            Ok(Self {
                bitwidth: r.bitwidth,
                max_value: r.max_value,
            })
        }
    }
}

impl<B: Backend> Clone for QuantizedReLU<B> {
    fn clone(&self) -> Self {
        Self::new(self.bitwidth, self.max_value)
    }
}

impl<B: Backend> core::fmt::Debug for QuantizedReLU<B> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("QuantizedReLU")
            .field("bitwidth", &self.bitwidth)
            .field("max_value", &self.max_value)
            .finish()
    }
}

impl<B: Backend> PartialEq for QuantizedReLU<B> {
    fn eq(&self, other: &Self) -> bool {
        (self.bitwidth, self.max_value) == (other.bitwidth, other.max_value)
    }
}

impl<B: Backend> Module<B> for QuantizedReLU<B> {
    type Record = QuantizedReLURecord;

    fn visit<V: ModuleVisitor<B>>(&self, _visitor: &mut V) {}

    fn map<M: ModuleMapper<B>>(self, _mapper: &mut M) -> Self {
        self
    }

    fn load_record(self, record: Self::Record) -> Self {
        Self::new(record.bitwidth, record.max_value)
    }

    fn into_record(self) -> Self::Record {
        QuantizedReLURecord {
            bitwidth: self.bitwidth,
            max_value: self.max_value,
        }
    }

    fn to_device(self, _device: &B::Device) -> Self {
        self
    }

    fn fork(self, _device: &B::Device) -> Self {
        self
    }

    fn collect_devices(&self, devices: Devices<B>) -> Devices<B> {
        devices
    }
}

impl<B: AutodiffBackend> AutodiffModule<B> for QuantizedReLU<B> {
    type InnerModule = QuantizedReLU<B::InnerBackend>;

    fn valid(&self) -> Self::InnerModule {
        QuantizedReLU::new(self.bitwidth, self.max_value)
    }

    fn from_inner(module: Self::InnerModule) -> Self {
        Self::new(module.bitwidth, module.max_value)
    }
}

impl<B: Backend> ModuleDisplayDefault for QuantizedReLU<B> {
    fn content(&self, content: Content) -> Option<Content> {
        content.add_formatted(&format!("{self:?}")).optional()
    }
}

impl<B: Backend> ModuleDisplay for QuantizedReLU<B> {}

impl QuantizedReLUConfig {
    /// Initializes the activation.
    ///
    /// # Panics
    /// If `bitwidth` is not in `1..=16` or `max_value` is not a positive finite number.
    pub fn init<B: Backend>(&self) -> QuantizedReLU<B> {
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
        QuantizedReLU::new(self.bitwidth, self.max_value)
    }
}

impl<B: Backend> QuantizedReLU<B> {
    fn new(bitwidth: u32, max_value: f64) -> Self {
        Self {
            bitwidth,
            max_value,
            backend: PhantomData,
        }
    }

    /// Applies the quantized activation (the float one when a driver asks for it).
    ///
    /// # Shapes
    /// - `input`: `[...]`
    /// - `output`: `[...]`, same shape
    pub fn forward<const D: usize>(&self, input: Tensor<B, D>) -> Tensor<B, D> {
        let output = if probe::float_activations::<B>() {
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
    pub fn forward_quantized<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let levels = ((1u64 << self.bitwidth) - 1) as f64;
        let step = self.max_value / levels;
        let scaled = x.sub_scalar(step / 2.0).div_scalar(step);
        let ceiled = scaled.clone() + (scaled.clone().ceil() - scaled).detach();
        ceiled.clamp(0.0, levels).mul_scalar(step)
    }

    /// The float counterpart, `clip(x, 0, max_value)`.
    pub fn forward_float<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        x.clamp(0.0, self.max_value)
    }

    /// Applies the activation to a [`Flow`] (quantized or float).
    pub fn forward_flow(&self, x: Flow<B>, float: bool) -> Flow<B> {
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
