use burn::tensor::{backend::Backend, Tensor};
use serde::{Deserialize, Serialize};

use crate::QuantizerError;

/// Upper bound of every scale factor (`sf` is clipped to `[0, 1e3]`, as in the reference).
pub const MAX_SCALE_FACTOR: f64 = 1e3;
/// Floor of the statistic a scale factor divides by, so that all-zero weights stay finite.
pub const MIN_RANGE: f64 = 1e-10;
/// Default threshold of the standard-deviation quantizers (`kmax / (3 * std(w))`).
pub const DEFAULT_STD_THRESHOLD: f64 = 3.0;

/// A symmetric, uniform, mid-tread weight quantizer (or the float pass-through).
///
/// A quantizer maps float weights onto the grid `{-kmax..=kmax} / sf`, with
/// `kmax = 2^(bitwidth-1) - 1`:
///
/// `quantize(w) = clip(round_ste(w * sf), -kmax, kmax) / sf`
///
/// where `round_ste` rounds half to even with a straight-through gradient, and the scale
/// factor `sf` is computed from the weights by the variant (and clipped to `[0, 1e3]`).
/// Per-axis variants compute one scale factor per **output channel**; the layer says which
/// axis that is (`1` for a Dense kernel `[d_input, d_output]`, `0` for a Conv2d kernel
/// `[channels_out, channels_in / groups, kernel_h, kernel_w]`).
///
/// The configuration is plain data: it serializes with serde (`{"kind": "MaxPerAxis",
/// "bitwidth": 4}`) and is saved in the record of any module that holds it.
///
/// Deserializing validates the parameters (bitwidth in `2..=16`, a positive finite
/// threshold): `{"kind": "Max", "bitwidth": 1}` is an error, not a quantizer. A custom
/// quantizer's function is looked up when it is used (it may be registered after loading).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", try_from = "Unchecked")]
pub enum WeightQuantizer {
    /// No quantization: weights pass through unchanged.
    #[default]
    Float,
    /// `sf = kmax / max(|w|)` over the whole tensor.
    Max {
        /// Number of bits, `2..=16`.
        bitwidth: u32,
    },
    /// `sf = kmax / max(max(|w|) over all axes but the output axis, 1e-10)`.
    MaxPerAxis {
        /// Number of bits, `2..=16`.
        bitwidth: u32,
    },
    /// `sf = kmax / (threshold * std(w))` over the whole tensor.
    Std {
        /// Number of bits, `2..=16`.
        bitwidth: u32,
        /// Number of standard deviations mapped to `kmax` (default 3).
        threshold: f64,
    },
    /// `sf = kmax / (threshold * std(w))`, one standard deviation per output channel.
    StdPerAxis {
        /// Number of bits, `2..=16`.
        bitwidth: u32,
        /// Number of standard deviations mapped to `kmax` (default 3).
        threshold: f64,
    },
    /// The scale that minimises the squared quantization error `|Q(w) - w|^2` of the tensor
    /// (or of each output channel): the best of [`MSE_CANDIDATES`] clipping ranges
    /// `k/80 * max |w|`, and of every range that puts `max |w|` exactly on an integer (so that
    /// weights already on a grid, AdaRound's included, quantize to themselves; up to 8 bits).
    /// Clipping a few outliers buys a finer step for all other weights: at 2 to 4 bits this
    /// is far more accurate than [`Max`](Self::Max).
    Mse {
        /// Number of bits, `2..=16`.
        bitwidth: u32,
        /// One scale factor per output channel (`true`) or per tensor.
        per_axis: bool,
        /// The integer grid.
        #[serde(default)]
        grid: Grid,
    },
    /// A user-defined quantizer: `sf` from the function registered under `name` with
    /// [`register_quantizer`](crate::register_quantizer).
    Custom {
        /// Name of the registered scale-factor function.
        name: String,
        /// Number of bits, `2..=16`.
        bitwidth: u32,
        /// One scale factor per output channel (`true`) or per tensor.
        per_axis: bool,
        /// Parameters passed to the function.
        params: Vec<f64>,
    },
}

crate::persistent_module!(WeightQuantizer);

/// The integers a quantizer rounds to, for `b` bits.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Grid {
    /// `[-kmax, kmax]`, `kmax = 2^(b-1) - 1`: the reference's grid, symmetric around zero
    /// (`2^b - 1` levels; at 2 bits `{-1, 0, 1}`).
    #[default]
    Symmetric,
    /// `[-2^(b-1), 2^(b-1) - 1]`: every code of a signed `b`-bit integer (PyTorch's and
    /// AIMET's signed grid; at 2 bits `{-2, -1, 0, 1}`).
    FullRange,
    /// Every code of a `b`-bit integer over the weights' own range `[min(w, 0), max(w, 0)]`
    /// (per tensor or per output channel): the full-range grid shifted by an integer offset
    /// `o`, so that `w_q = (clip(round(w sf) - o, -2^(b-1), 2^(b-1) - 1) + o) / sf`. This is
    /// the asymmetric grid with a zero point (`2^(b-1) - o` in unsigned `[0, 2^b - 1]` codes;
    /// AIMET's `offset` is `o - 2^(b-1)`). A channel whose weights are all of one sign gets
    /// all `2^b` codes on that side of zero.
    Asymmetric,
}

impl Grid {
    /// The smallest and largest integer of the grid at `bitwidth` bits: `(-kmax, kmax)`
    /// (`kmax = 2^(b-1) - 1`), or `(-kmax - 1, kmax)` on the full-range grid and, relative to
    /// the offset, on the asymmetric one.
    pub fn levels(self, bitwidth: u32) -> (f64, f64) {
        let kmax = 2f64.powi(bitwidth.clamp(1, 64) as i32 - 1) - 1.0;
        match self {
            Grid::Symmetric => (-kmax, kmax),
            Grid::FullRange | Grid::Asymmetric => (-kmax - 1.0, kmax),
        }
    }
}

/// A quantizer's parameters for one tensor:
/// `w_q = (clip(round(w sf) - offset, lo, hi) + offset) / sf` (see [`Grid`]).
#[derive(Clone, Debug)]
pub struct Encoding<B: Backend, const D: usize> {
    /// The scale factors `sf`, shaped to broadcast against the weights.
    pub scale_factor: Tensor<B, D>,
    /// The integer offsets `o` of the [asymmetric](Grid::Asymmetric) grid, shaped as the
    /// scale factors; `None` on the grids centred on zero (an offset of zero).
    pub offset: Option<Tensor<B, D>>,
}

impl<B: Backend, const D: usize> Encoding<B, D> {
    /// `w sf - o`: the weights on the integer grid's scale, relative to the offset.
    pub fn scaled(&self, weights: Tensor<B, D>) -> Tensor<B, D> {
        let scaled = weights * self.scale_factor.clone();
        match &self.offset {
            Some(o) => scaled - o.clone(),
            None => scaled,
        }
    }

    /// `(clip(round_ste(w sf - o), lo, hi) + o) / sf` on the grid's `levels` (see
    /// [`WeightQuantizer::levels`]): `clip(round_ste(w * sf), lo, hi) / sf` with the offset.
    pub fn quantize(&self, weights: Tensor<B, D>, levels: (f64, f64)) -> Tensor<B, D> {
        let ints = round_ste(self.scaled(weights)).clamp(levels.0, levels.1);
        let ints = match &self.offset {
            Some(o) => ints + o.clone(),
            None => ints,
        };
        ints / self.scale_factor.clone()
    }
}

/// Number of clipping ratios (`1/80 .. 80/80` of `max |w|`) [`WeightQuantizer::Mse`] tries.
pub const MSE_CANDIDATES: usize = 80;

/// [`WeightQuantizer`] as read, before its parameters are checked.
#[derive(Deserialize)]
#[serde(tag = "kind")]
enum Unchecked {
    Float,
    Max {
        bitwidth: u32,
    },
    MaxPerAxis {
        bitwidth: u32,
    },
    Std {
        bitwidth: u32,
        threshold: f64,
    },
    StdPerAxis {
        bitwidth: u32,
        threshold: f64,
    },
    Mse {
        bitwidth: u32,
        per_axis: bool,
        #[serde(default)]
        grid: Grid,
    },
    Custom {
        name: String,
        bitwidth: u32,
        per_axis: bool,
        params: Vec<f64>,
    },
}

impl TryFrom<Unchecked> for WeightQuantizer {
    type Error = QuantizerError;

    fn try_from(q: Unchecked) -> Result<Self, QuantizerError> {
        let q = match q {
            Unchecked::Float => Self::Float,
            Unchecked::Max { bitwidth } => Self::Max { bitwidth },
            Unchecked::MaxPerAxis { bitwidth } => Self::MaxPerAxis { bitwidth },
            Unchecked::Std {
                bitwidth,
                threshold,
            } => Self::Std {
                bitwidth,
                threshold,
            },
            Unchecked::StdPerAxis {
                bitwidth,
                threshold,
            } => Self::StdPerAxis {
                bitwidth,
                threshold,
            },
            Unchecked::Mse {
                bitwidth,
                per_axis,
                grid,
            } => Self::Mse {
                bitwidth,
                per_axis,
                grid,
            },
            Unchecked::Custom {
                name,
                bitwidth,
                per_axis,
                params,
            } => Self::Custom {
                name,
                bitwidth,
                per_axis,
                params,
            },
        };
        q.check_parameters().map(|()| q)
    }
}

fn check_bitwidth(bitwidth: u32) -> Result<u32, QuantizerError> {
    if (2..=16).contains(&bitwidth) {
        Ok(bitwidth)
    } else {
        Err(QuantizerError::InvalidBitwidth(bitwidth))
    }
}

fn check_threshold(threshold: f64) -> Result<f64, QuantizerError> {
    if threshold.is_finite() && threshold > 0.0 {
        Ok(threshold)
    } else {
        Err(QuantizerError::InvalidThreshold(threshold))
    }
}

impl WeightQuantizer {
    /// Per-tensor max quantizer (`MaxQuantizer` of the reference).
    pub fn max(bitwidth: u32) -> Result<Self, QuantizerError> {
        Ok(Self::Max {
            bitwidth: check_bitwidth(bitwidth)?,
        })
    }

    /// Per-output-channel max quantizer (`MaxPerAxisQuantizer` of the reference).
    pub fn max_per_axis(bitwidth: u32) -> Result<Self, QuantizerError> {
        Ok(Self::MaxPerAxis {
            bitwidth: check_bitwidth(bitwidth)?,
        })
    }

    /// Per-tensor standard-deviation quantizer with the given threshold.
    pub fn std(bitwidth: u32, threshold: f64) -> Result<Self, QuantizerError> {
        Ok(Self::Std {
            bitwidth: check_bitwidth(bitwidth)?,
            threshold: check_threshold(threshold)?,
        })
    }

    /// Per-output-channel standard-deviation quantizer with the given threshold.
    pub fn std_per_axis(bitwidth: u32, threshold: f64) -> Result<Self, QuantizerError> {
        Ok(Self::StdPerAxis {
            bitwidth: check_bitwidth(bitwidth)?,
            threshold: check_threshold(threshold)?,
        })
    }

    /// The error-minimising quantizer ([`WeightQuantizer::Mse`]).
    pub fn mse(bitwidth: u32, per_axis: bool, grid: Grid) -> Result<Self, QuantizerError> {
        Ok(Self::Mse {
            bitwidth: check_bitwidth(bitwidth)?,
            per_axis,
            grid,
        })
    }

    /// A user-defined quantizer (see [`register_quantizer`](crate::register_quantizer)).
    pub fn custom(
        name: &str,
        bitwidth: u32,
        per_axis: bool,
        params: Vec<f64>,
    ) -> Result<Self, QuantizerError> {
        let q = Self::Custom {
            name: name.to_string(),
            bitwidth,
            per_axis,
            params,
        };
        q.validate().map(|()| q)
    }

    /// Checks the parameters and that a custom quantizer's function is registered.
    pub fn validate(&self) -> Result<(), QuantizerError> {
        self.check_parameters()?;
        match self {
            Self::Custom { name, .. } => crate::custom::lookup(name)
                .map(|_| ())
                .ok_or_else(|| QuantizerError::UnknownQuantizer(name.clone())),
            _ => Ok(()),
        }
    }

    /// Checks the bitwidth and threshold (not the registry: a custom function may be
    /// registered later). Constructors and deserialisation call it; a layer's `init` asserts it.
    pub fn check_parameters(&self) -> Result<(), QuantizerError> {
        match *self {
            Self::Float => Ok(()),
            Self::Max { bitwidth } | Self::MaxPerAxis { bitwidth } => {
                check_bitwidth(bitwidth).map(|_| ())
            }
            Self::Std {
                bitwidth,
                threshold,
            }
            | Self::StdPerAxis {
                bitwidth,
                threshold,
            } => {
                check_bitwidth(bitwidth)?;
                check_threshold(threshold).map(|_| ())
            }
            Self::Mse { bitwidth, .. } | Self::Custom { bitwidth, .. } => {
                check_bitwidth(bitwidth).map(|_| ())
            }
        }
    }

    /// The bitwidth, or `None` for the float pass-through.
    pub fn bitwidth(&self) -> Option<u32> {
        match *self {
            Self::Float => None,
            Self::Max { bitwidth }
            | Self::MaxPerAxis { bitwidth }
            | Self::Std { bitwidth, .. }
            | Self::StdPerAxis { bitwidth, .. }
            | Self::Mse { bitwidth, .. }
            | Self::Custom { bitwidth, .. } => Some(bitwidth),
        }
    }

    /// `kmax = 2^(bitwidth-1) - 1`, the largest integer of the grid (`None` for float; 0
    /// for a bitwidth below 2, which [`validate`](Self::validate) refuses).
    pub fn kmax(&self) -> Option<f64> {
        self.bitwidth()
            .map(|b| 2f64.powi(b.clamp(1, 64) as i32 - 1) - 1.0)
    }

    /// The integer grid.
    pub fn grid(&self) -> Grid {
        match self {
            Self::Mse { grid, .. } => *grid,
            _ => Grid::Symmetric,
        }
    }

    /// The smallest and largest integer of the grid: `(-kmax, kmax)`, or `(-kmax - 1, kmax)`
    /// on the [full-range](Grid::FullRange) grid and, relative to the offset, on the
    /// [asymmetric](Grid::Asymmetric) one (`None` for float).
    pub fn levels(&self) -> Option<(f64, f64)> {
        self.bitwidth().map(|b| self.grid().levels(b))
    }

    /// Whether the quantizer computes one scale factor per output channel.
    pub fn is_per_axis(&self) -> bool {
        matches!(
            self,
            Self::MaxPerAxis { .. }
                | Self::StdPerAxis { .. }
                | Self::Mse { per_axis: true, .. }
                | Self::Custom { per_axis: true, .. }
        )
    }

    /// Whether the quantizer actually quantizes (everything but [`WeightQuantizer::Float`]).
    pub fn is_quantizing(&self) -> bool {
        !matches!(self, Self::Float)
    }

    /// The scale factor of `weights`, shaped to broadcast against them: `[1; D]` per tensor,
    /// or the size of the output channels at `axis` and `1` elsewhere per axis.
    ///
    /// It carries no gradient. Returns [`QuantizerError::NoGrid`] for the float quantizer and
    /// the parameter's error for an invalid bitwidth or threshold. On the
    /// [asymmetric](Grid::Asymmetric) grid the offsets go with it: see
    /// [`encoding`](Self::encoding).
    pub fn scale_factor<B: Backend, const D: usize>(
        &self,
        weights: Tensor<B, D>,
        axis: usize,
    ) -> Result<Tensor<B, D>, QuantizerError> {
        self.encoding(weights, axis).map(|e| e.scale_factor)
    }

    /// The scale factors of `weights` and, on the [asymmetric](Grid::Asymmetric) grid, their
    /// integer offsets (see [`scale_factor`](Self::scale_factor) for shapes and errors).
    pub fn encoding<B: Backend, const D: usize>(
        &self,
        weights: Tensor<B, D>,
        axis: usize,
    ) -> Result<Encoding<B, D>, QuantizerError> {
        if axis >= D {
            return Err(QuantizerError::InvalidAxis { axis, rank: D });
        }
        // A quantizer built field by field (not through a constructor or serde) is checked
        // here, before it can divide by a zero `kmax`.
        self.check_parameters()?;
        let kmax = self.kmax().ok_or(QuantizerError::NoGrid)?;
        let w = weights.detach();
        let centred = |scale_factor| Encoding {
            scale_factor,
            offset: None,
        };
        if let Self::Custom {
            name,
            per_axis,
            params,
            ..
        } = self
        {
            return custom_scale(w, axis, *per_axis, kmax, name, params).map(centred);
        }
        if let Self::Mse { per_axis, grid, .. } = *self {
            let levels = self.levels().ok_or(QuantizerError::NoGrid)?;
            let fine_only = self.bitwidth().is_some_and(|b| b > 8);
            if grid == Grid::Asymmetric {
                let (host, channels, at) = host_rows(w, axis, per_axis);
                let (sf, offset) = mse_offsets(&host, channels, levels, fine_only)
                    .into_iter()
                    .unzip();
                return Ok(Encoding {
                    scale_factor: broadcast(sf, at.clone(), axis, per_axis),
                    offset: Some(broadcast(offset, at, axis, per_axis)),
                });
            }
            return Ok(centred(host_scale(w, axis, per_axis, |rows, channels| {
                mse_scales(rows, channels, levels, fine_only)
            })));
        }
        let range = match *self {
            Self::Float | Self::Custom { .. } | Self::Mse { .. } => unreachable!("handled above"),
            Self::Max { .. } => w.abs().max().reshape([1; D]),
            Self::MaxPerAxis { .. } => per_axis(w, axis, |rows| rows.abs().max_dim(1)),
            Self::Std { threshold, .. } => std_all(w).mul_scalar(threshold).reshape([1; D]),
            Self::StdPerAxis { threshold, .. } => {
                per_axis(w, axis, |rows| std_rows(rows).mul_scalar(threshold))
            }
        };
        // Exact division: `recip()` is an approximate reciprocal on some backends.
        let range = range.clamp_min(MIN_RANGE);
        Ok(centred(
            (range.ones_like().mul_scalar(kmax) / range).clamp(0.0, MAX_SCALE_FACTOR),
        ))
    }

    /// Quantizes `weights` (the output channels at `axis`), with a straight-through gradient.
    ///
    /// `quantize(w) = clip(round_ste(w * sf), -kmax, kmax) / sf` (with the offset of the
    /// [asymmetric](Grid::Asymmetric) grid). The float quantizer returns the weights unchanged.
    ///
    /// # Panics
    /// When the scale factor cannot be computed: an invalid bitwidth or threshold (a quantizer
    /// built field by field), an unregistered custom function or one returning bad values.
    /// The layers' `try_init` and the driver report these as errors before any forward.
    pub fn quantize<B: Backend, const D: usize>(
        &self,
        weights: Tensor<B, D>,
        axis: usize,
    ) -> Tensor<B, D> {
        match self.levels() {
            None => weights,
            Some(levels) => self
                .encoding(weights.clone(), axis)
                .unwrap_or_else(|e| panic!("cannot quantize weights: {e}"))
                .quantize(weights, levels),
        }
    }
}

/// Scale factors from a registered function, on the host.
fn custom_scale<B: Backend, const D: usize>(
    w: Tensor<B, D>,
    axis: usize,
    per_axis: bool,
    kmax: f64,
    name: &str,
    params: &[f64],
) -> Result<Tensor<B, D>, QuantizerError> {
    let scale = crate::custom::lookup(name)
        .ok_or_else(|| QuantizerError::UnknownQuantizer(name.to_string()))?;
    let mut bad = false;
    let sf = host_scale(w, axis, per_axis, |rows, channels| {
        let sf = scale(rows, channels, kmax, params);
        bad = sf.len() != channels || sf.iter().any(|v| !(v.is_finite() && *v > 0.0));
        if bad {
            vec![1.0; channels]
        } else {
            sf
        }
    });
    if bad {
        let channels = if per_axis { sf.dims()[axis] } else { 1 };
        return Err(QuantizerError::InvalidScale(name.to_string(), channels));
    }
    Ok(sf)
}

/// Scale factors computed on the host by `scale(rows, channels)` from the row-major
/// `[channels, rest]` view of `w` (channels at `axis`, or one row), shaped to broadcast
/// against `w` and clipped to `[0, MAX_SCALE_FACTOR]`. `scale` returns one value per row.
fn host_scale<B: Backend, const D: usize>(
    w: Tensor<B, D>,
    axis: usize,
    per_axis: bool,
    scale: impl FnOnce(&[f32], usize) -> Vec<f32>,
) -> Tensor<B, D> {
    let (rows, channels, at) = host_rows(w, axis, per_axis);
    broadcast(scale(&rows, channels), at, axis, per_axis).clamp(0.0, MAX_SCALE_FACTOR)
}

/// The row-major `[channels, rest]` view of `w` in host memory (channels at `axis` per axis,
/// one row per tensor), the number of rows, and where the tensor lives.
fn host_rows<B: Backend, const D: usize>(
    w: Tensor<B, D>,
    axis: usize,
    per_axis: bool,
) -> (Vec<f32>, usize, ([usize; D], B::Device)) {
    let dims = w.dims();
    let channels = if per_axis { dims[axis] } else { 1 };
    let rest = dims.iter().product::<usize>() / channels.max(1);
    let device = w.device();
    let rows = w.swap_dims(0, axis).reshape([channels, rest]);
    let host = rows
        .into_data()
        .convert::<f32>()
        .to_vec()
        .unwrap_or_default();
    (host, channels, (dims, device))
}

/// One value per row of [`host_rows`] as a tensor that broadcasts against the weights.
fn broadcast<B: Backend, const D: usize>(
    values: Vec<f32>,
    (dims, device): ([usize; D], B::Device),
    axis: usize,
    per_axis: bool,
) -> Tensor<B, D> {
    let channels = values.len();
    let mut shape = [1; D];
    if per_axis {
        shape[axis] = dims[axis];
    }
    Tensor::<B, 1>::from_data(burn::tensor::TensorData::new(values, [channels]), &device)
        .reshape(shape)
}

/// The first of `candidates` with the lowest `error(candidate, limit)` (`fallback` when no
/// error is below infinity). `error` may give up on a candidate once its error passes
/// `limit` (see [`bounded_sum`]); the limit is the best error so far, or `seed`'s, which
/// must be one of the candidates. A candidate cut there cannot be the first of the lowest
/// error, so the choice is that of a full search.
fn first_lowest<C: Copy>(
    candidates: impl IntoIterator<Item = C>,
    seed: C,
    fallback: C,
    error: impl Fn(C, f64) -> f64,
) -> C {
    let bound = error(seed, f64::INFINITY);
    let mut best = (f64::INFINITY, fallback);
    for c in candidates {
        let e = error(c, best.0.min(bound));
        if e < best.0 {
            best = (e, c);
        }
    }
    best.1
}

/// `sum(term(w))` over `row` in order, or infinity as soon as the partial sum passes `limit`
/// (checked every 256 terms): the terms are never negative, so the whole sum would pass it
/// too.
#[inline(always)]
fn bounded_sum(row: &[f32], limit: f64, term: impl Fn(f32) -> f64) -> f64 {
    let mut sum = 0f64;
    for chunk in row.chunks(256) {
        for &w in chunk {
            sum += term(w);
        }
        if sum > limit {
            return f64::INFINITY;
        }
    }
    sum
}

/// `x.round_ties_even()` without a call into the C library (`rintf`: the baseline x86-64
/// target has no rounding instruction), so that the scale searches' loops vectorize: adding
/// and subtracting `1.5 * 2^23` rounds half to even in the default rounding mode for
/// `|x| < 2^22`, and larger floats are integers already.
#[inline(always)]
fn round_even(x: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0;
    let rounded = (x + MAGIC) - MAGIC;
    if x.abs() < 4_194_304.0 {
        rounded
    } else {
        x
    }
}

/// The error-minimising scale factor of each row of the row-major `[channels, rest]` `rows`
/// on the integer grid `levels` (see [`WeightQuantizer::Mse`]). `fine_only`: only the
/// clipping ratios, not the ranges that put `max |w|` on an integer (above 8 bits).
pub fn mse_scales(rows: &[f32], channels: usize, levels: (f64, f64), fine_only: bool) -> Vec<f32> {
    let (lo, hi) = (levels.0 as f32, levels.1 as f32);
    let rest = rows.len() / channels.max(1);
    // Candidates as "the integer `max |w|` maps to", ascending: every integer up to the
    // grid's magnitude, then the clipping ratios (largest range first).
    let mut targets: Vec<f32> = if fine_only {
        Vec::new()
    } else {
        (1..=(-lo) as u32).map(|l| l as f32).collect()
    };
    targets.extend(
        (1..=MSE_CANDIDATES)
            .rev()
            .map(|k| hi * MSE_CANDIDATES as f32 / k as f32),
    );
    rows.chunks(rest.max(1))
        .take(channels)
        .map(|row| {
            let max = row
                .iter()
                .fold(0f32, |m, v| m.max(v.abs()))
                .max(MIN_RANGE as f32);
            let error = |sf: f32, limit: f64| -> f64 {
                bounded_sum(row, limit, |w| {
                    let q = round_even(w * sf).clamp(lo, hi) / sf;
                    f64::from(q - w).powi(2)
                })
            };
            // The max range (a candidate: `k = 80`) bounds the search.
            let candidates = targets.iter().map(|t| t / max);
            first_lowest(candidates, hi / max, hi / max, error)
        })
        .collect()
}

/// The error-minimising scale factor and integer offset of each row of the row-major
/// `[channels, rest]` `rows` on the [asymmetric](Grid::Asymmetric) grid, whose levels are
/// `levels` relative to the offset. Candidates: the range `[min(w, 0), max(w, 0)]` spread
/// over every integer span up to `hi - lo` (so that weights already on such a grid quantize
/// to themselves; not above 8 bits: `fine_only`) and clipped to [`MSE_CANDIDATES`] ratios
/// of itself, each with the offset that puts the range's low end on `lo` and its two
/// neighbours. Scale factors are at most [`MAX_SCALE_FACTOR`].
pub fn mse_offsets(
    rows: &[f32],
    channels: usize,
    levels: (f64, f64),
    fine_only: bool,
) -> Vec<(f32, f32)> {
    let (lo, hi) = (levels.0 as f32, levels.1 as f32);
    let codes = hi - lo;
    let rest = rows.len() / channels.max(1);
    // Candidates as (the span of integers the range maps to, the share of the range kept).
    let mut spans: Vec<(f32, f32)> = if fine_only {
        Vec::new()
    } else {
        (1..=codes as u32).map(|t| (t as f32, 1.0)).collect()
    };
    spans.extend(
        (1..=MSE_CANDIDATES)
            .rev()
            .map(|k| (codes, k as f32 / MSE_CANDIDATES as f32)),
    );
    rows.chunks(rest.max(1))
        .take(channels)
        .map(|row| {
            let (min, max) = row
                .iter()
                .fold((0f32, 0f32), |(a, b), &v| (a.min(v), b.max(v)));
            let range = (max - min).max(MIN_RANGE as f32);
            let error = |(sf, o): (f32, f32), limit: f64| -> f64 {
                bounded_sum(row, limit, |w| {
                    let q = round_even(w * sf - o).clamp(lo, hi);
                    f64::from((q + o) / sf - w).powi(2)
                })
            };
            let candidate = |(span, kept): (f32, f32), neighbour: f32| {
                let sf = (span / (range * kept)).min(MAX_SCALE_FACTOR as f32);
                // The offset that maps the kept range's low end to `lo`; zero stays a code.
                let low = (min * kept * sf).round_ties_even() - lo;
                (sf, (low + neighbour).clamp(-hi, -lo))
            };
            // The whole range (a candidate: `k = 80`) bounds the search.
            let candidates = spans
                .iter()
                .flat_map(|&span| [0.0, -1.0, 1.0].map(|n| candidate(span, n)));
            let whole = candidate((codes, 1.0), 0.0);
            first_lowest(candidates, whole, (codes / range, 0.0), error)
        })
        .collect()
}

/// Rounds half to even in the forward pass and passes the gradient unchanged (straight-through).
pub fn round_ste<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    let rounded = x.clone().round();
    x.clone() + (rounded - x).detach()
}

/// Returns `true` when every value of `weights` is finite.
pub fn all_finite<B: Backend, const D: usize>(weights: &Tensor<B, D>) -> bool {
    use burn::tensor::ElementConversion;
    let w = weights.clone().detach();
    let nan = w.clone().is_nan().any().int().into_scalar().elem::<i64>();
    let inf = w.is_inf().any().int().into_scalar().elem::<i64>();
    nan == 0 && inf == 0
}

/// Applies `reduce` to the `[channels, rest]` view of `w` (channels at `axis`) and returns the
/// `[channels, 1]` result shaped to broadcast against `w`.
fn per_axis<B: Backend, const D: usize>(
    w: Tensor<B, D>,
    axis: usize,
    reduce: impl FnOnce(Tensor<B, 2>) -> Tensor<B, 2>,
) -> Tensor<B, D> {
    let dims = w.dims();
    let channels = dims[axis];
    let rest = dims.iter().product::<usize>() / channels.max(1);
    let rows = w.swap_dims(0, axis).reshape([channels, rest]);
    let mut shape = [1; D];
    shape[axis] = channels;
    reduce(rows).reshape(shape)
}

/// Population standard deviation (`ddof = 0`, as `tf.math.reduce_std`) of the whole tensor.
fn std_all<B: Backend, const D: usize>(w: Tensor<B, D>) -> Tensor<B, 1> {
    let n = w.dims().iter().product::<usize>();
    std_rows(w.reshape([1, n])).reshape([1])
}

/// Population standard deviation of each row: `[rows, n] -> [rows, 1]`.
fn std_rows<B: Backend>(rows: Tensor<B, 2>) -> Tensor<B, 2> {
    let mean = rows.clone().mean_dim(1);
    (rows - mean).powi_scalar(2).mean_dim(1).sqrt()
}

#[cfg(test)]
mod round_tests {
    /// The branch-free rounding equals the standard library's on halves, near-halves, large
    /// values and non-finite ones (zero's sign aside).
    #[test]
    fn should_round_half_to_even_as_the_standard_library() {
        let mut values = vec![
            f32::INFINITY,
            f32::NEG_INFINITY,
            4_194_303.5,
            8_388_609.0,
            1e30,
        ];
        for k in -4000..=4000 {
            let x = k as f32 / 8.0;
            values.extend([x, x + 1e-4, x - 1e-4, x * 1013.7]);
        }
        for x in values.iter().flat_map(|x| [*x, -*x]) {
            let (got, expected) = (super::round_even(x), x.round_ties_even());
            assert!(got == expected, "{x}: {got} vs {expected}");
        }
        assert!(super::round_even(f32::NAN).is_nan());
    }

    /// The bounded scale searches pick exactly what a full search of the same candidates
    /// picks (the full searches written out below, on rows of 9 to 1 500 weights).
    #[test]
    fn should_pick_the_full_searchs_candidate_with_the_bound() {
        let mut state = 0x2545_f491_4f6c_dd1d_u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        };
        for (channels, rest, skew) in [(3, 700, 0.0), (1, 1500, 0.8), (5, 40, 0.3), (2, 9, 0.0)] {
            let rows: Vec<f32> = (0..channels * rest)
                .map(|_| {
                    let v = next();
                    v + skew * v * v + 0.02 * next().powi(7) * 1e3
                })
                .collect();
            for bits in [2u32, 3, 4, 8] {
                let kmax = 2f64.powi(bits as i32 - 1) - 1.0;
                let levels = (-kmax - 1.0, kmax);
                assert_eq!(
                    super::mse_scales(&rows, channels, levels, false),
                    full_scales(&rows, channels, levels),
                    "{bits} bits"
                );
                let got = super::mse_offsets(&rows, channels, levels, false);
                assert_eq!(got, full_offsets(&rows, channels, levels), "{bits} bits");
            }
        }
    }

    /// [`super::mse_scales`] without the bound, written out.
    fn full_scales(rows: &[f32], channels: usize, (lo, hi): (f64, f64)) -> Vec<f32> {
        let (lo, hi) = (lo as f32, hi as f32);
        let mut targets: Vec<f32> = (1..=(-lo) as u32).map(|l| l as f32).collect();
        let n = super::MSE_CANDIDATES;
        targets.extend((1..=n).rev().map(|k| hi * n as f32 / k as f32));
        rows.chunks(rows.len() / channels)
            .map(|row| {
                let max = row.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-10);
                let mut best = (f64::INFINITY, hi / max);
                for t in &targets {
                    let sf = t / max;
                    let e: f64 = row
                        .iter()
                        .map(|&w| {
                            f64::from((w * sf).round_ties_even().clamp(lo, hi) / sf - w).powi(2)
                        })
                        .sum();
                    if e < best.0 {
                        best = (e, sf);
                    }
                }
                best.1
            })
            .collect()
    }

    /// [`super::mse_offsets`] without the bound, written out.
    fn full_offsets(rows: &[f32], channels: usize, (lo, hi): (f64, f64)) -> Vec<(f32, f32)> {
        let (lo, hi) = (lo as f32, hi as f32);
        let codes = hi - lo;
        let n = super::MSE_CANDIDATES;
        let mut spans: Vec<(f32, f32)> = (1..=codes as u32).map(|t| (t as f32, 1.0)).collect();
        spans.extend((1..=n).rev().map(|k| (codes, k as f32 / n as f32)));
        rows.chunks(rows.len() / channels)
            .map(|row| {
                let (min, max) = row
                    .iter()
                    .fold((0f32, 0f32), |(a, b), &v| (a.min(v), b.max(v)));
                let range = (max - min).max(1e-10);
                let mut best = (f64::INFINITY, (codes / range, 0.0));
                for &(span, kept) in &spans {
                    let sf = (span / (range * kept)).min(super::MAX_SCALE_FACTOR as f32);
                    let low = (min * kept * sf).round_ties_even() - lo;
                    for o in [low, low - 1.0, low + 1.0] {
                        let o = o.clamp(-hi, -lo);
                        let e: f64 = row
                            .iter()
                            .map(|&w| {
                                let q = (w * sf - o).round_ties_even().clamp(lo, hi);
                                f64::from((q + o) / sf - w).powi(2)
                            })
                            .sum();
                        if e < best.0 {
                            best = (e, (sf, o));
                        }
                    }
                }
                best.1
            })
            .collect()
    }
}
