use thiserror::Error;

/// Errors raised when a quantizer is configured or applied to invalid data.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum QuantizerError {
    /// The bitwidth is outside `2..=16`.
    #[error("bitwidth must be in 2..=16, got {0}")]
    InvalidBitwidth(u32),
    /// The threshold of a standard-deviation quantizer is not a positive finite number.
    #[error("threshold must be a positive finite number, got {0}")]
    InvalidThreshold(f64),
    /// The weights hold `NaN` or infinite values.
    #[error("weights contain non-finite values (NaN or infinity)")]
    NonFiniteWeights,
    /// The quantizer has no integer grid (the pass-through quantizer), so AdaRound cannot wrap it.
    #[error("the float (pass-through) quantizer has no grid to round onto")]
    NoGrid,
    /// No scale-factor function is registered under this custom quantizer's name.
    #[error("no custom quantizer is registered as `{0}` (see register_quantizer)")]
    UnknownQuantizer(String),
    /// A custom scale-factor function returned the wrong number of values, or values that
    /// are not positive and finite.
    #[error("custom quantizer `{0}` must return {1} positive finite scale factors")]
    InvalidScale(String, usize),
    /// The quantizer's grid depends on its own scale (the asymmetric grid's offsets), so
    /// another scale cannot be set.
    #[error("quantizer {0} keeps its own scale: its grid's offsets depend on it")]
    FixedScale(String),
    /// Integer offsets given for a grid centred on zero, or offsets that are not one
    /// finite integer per scale factor on the asymmetric grid.
    #[error("quantizer {0} takes {1} finite integer offsets on the asymmetric grid, none on a grid centred on zero")]
    InvalidOffset(String, usize),
    /// The output-channel axis does not exist in the weight tensor.
    #[error("axis {axis} is out of range for a weight tensor of rank {rank}")]
    InvalidAxis {
        /// The requested axis.
        axis: usize,
        /// The rank of the weights.
        rank: usize,
    },
}
