use burn::{
    config::Config,
    module::{
        AutodiffModule, Content, Devices, Module, ModuleDisplay, ModuleDisplayDefault,
        ModuleMapper, ModuleVisitor, Param,
    },
    record::Record,
    tensor::{
        backend::{AutodiffBackend, Backend},
        Tensor,
    },
};
use serde::{Deserialize, Serialize};

use crate::{quantizer::all_finite, Encoding, QuantizerError, Rounding, WeightQuantizer};

/// Constants of the rectified sigmoid and of the rounding regulariser
/// ([Nagel et al. 2020](https://arxiv.org/abs/2004.10568)).
#[derive(Config, Debug, PartialEq)]
pub struct AdaRoundParams {
    /// Lower stretch of the rectified sigmoid, `GAMMA`.
    #[config(default = -0.1)]
    pub gamma: f64,
    /// Upper stretch of the rectified sigmoid, `ZETA`.
    #[config(default = 1.1)]
    pub zeta: f64,
    /// Annealing exponent of the rounding loss at the start, `BETA_START`.
    #[config(default = 20.0)]
    pub beta_start: f64,
    /// Annealing exponent of the rounding loss at the end, `BETA_END`.
    #[config(default = 2.0)]
    pub beta_end: f64,
    /// Weight of the rounding loss in the total loss, `RD_REG`.
    #[config(default = 0.01)]
    pub reg: f64,
}

/// What an [`AdaRoundQuantizer`] needs beside its tensors; saved with its record.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AdaRoundMeta {
    /// Output-channel axis of the wrapped weights.
    pub axis: usize,
    /// Rank of the wrapped weights (the tensors are stored padded to rank 4).
    pub rank: usize,
    /// `true`: soft reconstructed weights; `false`: the original quantizer applied to them.
    pub training: bool,
    /// `GAMMA` of the rectified sigmoid.
    pub gamma: f64,
    /// `ZETA` of the rectified sigmoid.
    pub zeta: f64,
    /// The integer offsets of the [asymmetric](crate::Grid::Asymmetric) grid, one per scale
    /// factor; empty on the grids centred on zero.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub offsets: Vec<f32>,
}

crate::persistent_module!(AdaRoundMeta);

/// Rounding state of an [`AdaRoundQuantizer`] (what the reference logs each epoch).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct RoundingStatus {
    /// Weights whose decimal `h(alpha)` is neither exactly 0 nor exactly 1.
    pub roamers: usize,
    /// Fraction of weights with `h <= 0.5` (rounded down).
    pub floor_fraction: f64,
    /// Fraction of weights with `h > 0.5` (rounded up).
    pub ceil_fraction: f64,
    /// Number of weights.
    pub total: usize,
}

impl RoundingStatus {
    /// The status of decimals `h` (any shape): roamers are neither exactly 0 nor exactly 1.
    /// Reads `h` back once and counts in host memory (on a GPU, one transfer instead of three
    /// reductions).
    pub fn of_decimals<B: Backend, const D: usize>(h: Tensor<B, D>) -> Self {
        let values = h.detach().into_data().convert::<f32>();
        Self::of_values(values.as_slice::<f32>().expect("f32 after conversion"))
    }

    /// The status of decimals `h` in host memory.
    pub fn of_values(h: &[f32]) -> Self {
        let total = h.len();
        let zeros = h.iter().filter(|&&v| v == 0.0).count();
        let ones = h.iter().filter(|&&v| v == 1.0).count();
        let floor = h.iter().filter(|&&v| v <= 0.5).count();
        let denom = total.max(1) as f64;
        Self {
            roamers: total - zeros - ones,
            floor_fraction: floor as f64 / denom,
            ceil_fraction: (total - floor) as f64 / denom,
            total,
        }
    }
}

/// The AdaRound weight quantizer: learns, per weight, whether to round down or up.
///
/// Wraps an original quantizer `q` and its weights `w` :
///
/// - `sf = q.scale_factor(w)` (cached), `w_floor = floor(w * sf - o)`, `d = w * sf - o - w_floor`
///   (`o`: the integer offsets of the [asymmetric](crate::Grid::Asymmetric) grid, else 0);
/// - `alpha = -ln((ZETA - GAMMA) / (d - GAMMA) - 1)`, so that `h(alpha) == d` at creation;
/// - `h(alpha) = clip(sigmoid(alpha) * (ZETA - GAMMA) + GAMMA, 0, 1)`;
/// - `recons_weights = (clip(w_floor + h(alpha), lo, hi) + o) / sf` (the grid's
///   [`levels`](WeightQuantizer::levels), `[-kmax, kmax]` on the symmetric grid);
/// - `rounding_loss(beta) = sum(1 - |2 h(alpha) - 1|^beta)`.
///
/// In training mode [`quantize`](Self::quantize) returns the soft reconstructed weights; in
/// evaluation mode the original quantizer applied to them, so weights still roaming round to
/// nearest. Only `alpha` is trainable; tensors are stored padded to rank 4.
///
/// It is a Burn [`Module`] whose record keeps everything (tensors, the original quantizer,
/// axis, mode and constants), so a saved AdaRound state loads back exactly.
#[derive(Clone, Debug)]
pub struct AdaRoundQuantizer<B: Backend> {
    /// The continuous rounding variable, one per weight (trainable).
    pub alpha: Param<Tensor<B, 4>>,
    /// `floor(w * sf)` (frozen).
    pub w_floor: Param<Tensor<B, 4>>,
    /// The cached scale factor, shaped to broadcast against the weights (frozen).
    pub sf: Param<Tensor<B, 4>>,
    /// The original quantizer.
    pub quantizer: WeightQuantizer,
    /// Axis, rank, mode and rectified-sigmoid constants.
    pub meta: AdaRoundMeta,
}

/// A parameter that is saved but never trained (`Param::from_tensor` would mark it).
fn frozen<B: Backend>(t: Tensor<B, 4>) -> Param<Tensor<B, 4>> {
    Param::initialized(burn::module::ParamId::new(), t.detach()).set_require_grad(false)
}

fn pad4<B: Backend, const D: usize>(t: Tensor<B, D>) -> Tensor<B, 4> {
    assert!(
        D <= 4,
        "AdaRound supports weights of rank <= 4, got rank {D}"
    );
    let mut shape = [1; 4];
    shape[..D].copy_from_slice(&t.dims());
    t.reshape(shape)
}

impl<B: Backend> AdaRoundQuantizer<B> {
    /// Wraps `quantizer` for `weights`, whose output channels lie at `axis`.
    ///
    /// Errors: the float quantizer (no grid), non-finite weights, an axis out of range.
    pub fn new<const D: usize>(
        quantizer: WeightQuantizer,
        weights: Tensor<B, D>,
        axis: usize,
        params: &AdaRoundParams,
    ) -> Result<Self, QuantizerError> {
        quantizer.validate()?;
        if !all_finite(&weights) {
            return Err(QuantizerError::NonFiniteWeights);
        }
        let weights = weights.detach();
        let encoding = quantizer.encoding(weights.clone(), axis)?;
        let scaled = encoding.scaled(weights);
        let Encoding {
            scale_factor: sf,
            offset,
        } = encoding;
        let offsets = offset.map_or_else(Vec::new, |o| {
            o.into_data().convert::<f32>().to_vec().unwrap_or_default()
        });
        let w_floor = scaled.clone().floor();
        let d = scaled - w_floor.clone();
        let (gamma, zeta) = (params.gamma, params.zeta);
        let alpha = Rounding { gamma, zeta }.alpha_of(d);
        // A fresh leaf: Burn's autodiff cannot track the result of ops as a parameter.
        let alpha = Tensor::from_data(pad4(alpha).into_data(), &w_floor.device());
        Ok(Self {
            alpha: Param::from_tensor(alpha),
            w_floor: frozen(pad4(w_floor)),
            sf: frozen(pad4(sf)),
            quantizer,
            meta: AdaRoundMeta {
                axis,
                rank: D,
                training: true,
                gamma,
                zeta,
                offsets,
            },
        })
    }

    /// This quantizer re-armed on the scale factors `sf` (shaped as the cached [`Self::sf`])
    /// for the float `weights` (in AdaRound's padded rank-4 layout): `w_floor = floor(w sf)`
    /// and `alpha` (with `h(alpha)` the fractional part of `w sf`) are computed again; the
    /// parameter ids, the wrapped quantizer and the mode stay. For a scale chosen outside
    /// the quantizer, such as SeqMSE's search on the layer's output error. On the
    /// [asymmetric](crate::Grid::Asymmetric) grid, whose integer offsets belong to the scale,
    /// see [`Self::with_encoding`].
    ///
    /// Errors: non-finite weights, scale factors that are not positive and finite
    /// ([`QuantizerError::InvalidScale`]), and the asymmetric grid
    /// ([`QuantizerError::FixedScale`]).
    pub fn with_scale_factor(
        self,
        weights: Tensor<B, 4>,
        sf: Tensor<B, 4>,
    ) -> Result<Self, QuantizerError> {
        self.with_encoding(weights, sf, None)
    }

    /// [`Self::with_scale_factor`] with the integer `offset` of each scale factor (shaped as
    /// `sf`) on the [asymmetric](crate::Grid::Asymmetric) grid (`None` on the grids centred on
    /// zero): `w_floor = floor(w sf - o)`, `h(alpha)` the fractional part of `w sf - o`.
    ///
    /// Errors: as [`Self::with_scale_factor`]; an offset missing on the asymmetric grid
    /// ([`QuantizerError::FixedScale`]), given on a centred grid, or not integral and
    /// finite ([`QuantizerError::InvalidOffset`]).
    pub fn with_encoding(
        mut self,
        weights: Tensor<B, 4>,
        sf: Tensor<B, 4>,
        offset: Option<Tensor<B, 4>>,
    ) -> Result<Self, QuantizerError> {
        let name = || format!("{:?}", self.quantizer);
        let asymmetric = !self.meta.offsets.is_empty();
        if asymmetric && offset.is_none() {
            return Err(QuantizerError::FixedScale(name()));
        }
        if !all_finite(&weights) {
            return Err(QuantizerError::NonFiniteWeights);
        }
        let count = self.sf.val().shape().num_elements();
        let values = sf.clone().into_data().convert::<f32>().to_vec::<f32>();
        let valid = values.is_ok_and(|v| v.iter().all(|s| s.is_finite() && *s > 0.0));
        if sf.dims() != self.sf.dims() || !valid {
            return Err(QuantizerError::InvalidScale(name(), count));
        }
        let offsets = match offset {
            None => Vec::new(),
            Some(o) => {
                let o = o.into_data().convert::<f32>().to_vec::<f32>();
                match o {
                    Ok(o)
                        if asymmetric
                            && o.len() == count
                            && o.iter().all(|v| v.is_finite() && v.fract() == 0.0) =>
                    {
                        o
                    }
                    _ => return Err(QuantizerError::InvalidOffset(name(), count)),
                }
            }
        };
        let (weights, sf) = (weights.detach(), sf.detach());
        self.meta.offsets = offsets;
        let scaled = weights * sf.clone();
        let scaled = match self.offset() {
            Some(o) => scaled - o,
            None => scaled,
        };
        let w_floor = scaled.clone().floor();
        let alpha = self.rounding().alpha_of(scaled - w_floor.clone());
        let alpha = Tensor::from_data(alpha.into_data(), &w_floor.device());
        self.alpha = self.alpha.map(|_| alpha);
        self.w_floor = frozen(w_floor);
        self.sf = frozen(sf);
        Ok(self)
    }

    /// The rectified sigmoid `h(alpha)`, in `[0, 1]`: the decimals added to `w_floor`.
    pub fn decimals(&self) -> Tensor<B, 4> {
        self.rounding().decimals(self.alpha.val()).h
    }

    /// The rectified sigmoid's stretch of this quantizer.
    pub fn rounding(&self) -> Rounding {
        Rounding {
            gamma: self.meta.gamma,
            zeta: self.meta.zeta,
        }
    }

    /// This quantizer with `alpha` as its rounding variables (the same parameter id).
    pub fn with_alpha(mut self, alpha: Tensor<B, 4>) -> Self {
        self.alpha = self.alpha.map(|_| alpha);
        self
    }

    /// Hard decimals `1[alpha >= 0]` (0 or 1 for every weight).
    pub fn hard_decimals(&self) -> Tensor<B, 4> {
        self.alpha.val().detach().greater_equal_elem(0.0).float()
    }

    /// The grid's smallest and largest integer.
    pub fn levels(&self) -> (f64, f64) {
        self.quantizer
            .levels()
            .expect("AdaRound always wraps a quantizing quantizer")
    }

    fn unpad<const D: usize>(&self, t: Tensor<B, 4>) -> Tensor<B, D> {
        assert_eq!(
            D, self.meta.rank,
            "AdaRound weights have rank {}, asked for rank {D}",
            self.meta.rank
        );
        let dims = t.dims();
        let mut shape = [1; D];
        shape.copy_from_slice(&dims[..D]);
        t.reshape(shape)
    }

    /// The integer offsets of the [asymmetric](crate::Grid::Asymmetric) grid, shaped as the
    /// cached scale factor; `None` on the grids centred on zero.
    pub fn offset(&self) -> Option<Tensor<B, 4>> {
        if self.meta.offsets.is_empty() {
            return None;
        }
        let values =
            burn::tensor::TensorData::new(self.meta.offsets.clone(), [self.meta.offsets.len()]);
        let device = self.sf.device();
        Some(Tensor::<B, 1>::from_data(values, &device).reshape(self.sf.dims()))
    }

    /// The weights from `decimals`, in the padded rank-4 layout.
    fn rebuild_padded(&self, decimals: Tensor<B, 4>) -> Tensor<B, 4> {
        let (lo, hi) = self.levels();
        let z = (self.w_floor.val() + decimals).clamp(lo, hi);
        let z = match self.offset() {
            Some(o) => z + o,
            None => z,
        };
        z / self.sf.val()
    }

    fn rebuild<const D: usize>(&self, decimals: Tensor<B, 4>) -> Tensor<B, D> {
        self.unpad(self.rebuild_padded(decimals))
    }

    /// [`Self::recons_weights`] flattened (row-major, whatever the weights' rank).
    pub fn recons_weights_flat(&self) -> Tensor<B, 1> {
        self.rebuild_padded(self.decimals()).flatten(0, 3)
    }

    /// `(clip(w_floor + h(alpha), lo, hi) + o) / sf`, in the shape of the original weights.
    pub fn recons_weights<const D: usize>(&self) -> Tensor<B, D> {
        self.rebuild(self.decimals())
    }

    /// The weights rounded with hard decimals `1[alpha >= 0]` (AIMET's final rounding).
    pub fn hard_recons_weights<const D: usize>(&self) -> Tensor<B, D> {
        self.rebuild(self.hard_decimals())
    }

    /// The cached scale factor, shaped to broadcast against the original weights.
    pub fn scale_factor<const D: usize>(&self) -> Tensor<B, D> {
        self.unpad(self.sf.val())
    }

    /// The weights the layer uses: soft in training mode, quantized in evaluation mode.
    ///
    /// The layer's own float weights are ignored (they are in `w_floor` and `alpha`).
    pub fn quantize<const D: usize>(&self) -> Tensor<B, D> {
        let w = self.recons_weights::<D>();
        if self.meta.training {
            w
        } else {
            self.quantizer.quantize(w, self.meta.axis)
        }
    }

    /// `sum(1 - |2 h(alpha) - 1|^beta)`, or 0 when `beta == 0`.
    pub fn rounding_loss(&self, beta: f64) -> Tensor<B, 1> {
        let device = self.alpha.device();
        if beta == 0.0 {
            return Tensor::zeros([1], &device);
        }
        Rounding::regulariser(self.decimals(), beta).sum()
    }

    /// Roamers (`h` not in `{0, 1}`) and the fractions rounded down (`h <= 0.5`) and up.
    pub fn status(&self) -> RoundingStatus {
        RoundingStatus::of_decimals(self.decimals())
    }

    /// Whether [`quantize`](Self::quantize) returns soft weights (`true`) or quantized ones.
    pub fn is_training(&self) -> bool {
        self.meta.training
    }

    /// Switches between training (soft weights) and evaluation (quantized) mode.
    pub fn set_training(mut self, training: bool) -> Self {
        self.meta.training = training;
        self
    }

    /// The output-channel axis of the wrapped weights.
    pub fn axis(&self) -> usize {
        self.meta.axis
    }
}

/// The record of an [`AdaRoundQuantizer`]: its tensors and its configuration.
///
/// Written by hand with the `Module` impl below: `#[derive(Module)]` treats the fields
/// without a backend parameter (`quantizer`, `meta`) as constants and records them as
/// `EmptyRecord`, so a saved AdaRound state would lose its grid and axis.
#[derive(Record)]
pub struct AdaRoundQuantizerRecord<B: Backend> {
    /// See [`AdaRoundQuantizer::alpha`].
    pub alpha: Param<Tensor<B, 4>>,
    /// See [`AdaRoundQuantizer::w_floor`].
    pub w_floor: Param<Tensor<B, 4>>,
    /// See [`AdaRoundQuantizer::sf`].
    pub sf: Param<Tensor<B, 4>>,
    /// See [`AdaRoundQuantizer::quantizer`].
    pub quantizer: WeightQuantizer,
    /// See [`AdaRoundQuantizer::meta`].
    pub meta: AdaRoundMeta,
}

const CONTAINER: &str = "Struct:AdaRoundQuantizer";

impl<B: Backend> AdaRoundQuantizer<B> {
    /// Rebuilds a quantizer from a saved record alone.
    pub fn from_record(record: AdaRoundQuantizerRecord<B>) -> Self {
        Self {
            alpha: record.alpha,
            w_floor: record.w_floor.set_require_grad(false),
            sf: record.sf.set_require_grad(false),
            quantizer: record.quantizer,
            meta: record.meta,
        }
    }

    fn map_params(
        self,
        mut f: impl FnMut(&str, Param<Tensor<B, 4>>) -> Param<Tensor<B, 4>>,
    ) -> Self {
        Self {
            alpha: f("alpha", self.alpha),
            w_floor: f("w_floor", self.w_floor),
            sf: f("sf", self.sf),
            quantizer: self.quantizer,
            meta: self.meta,
        }
    }
}

impl<B: Backend> Module<B> for AdaRoundQuantizer<B> {
    type Record = AdaRoundQuantizerRecord<B>;

    fn visit<V: ModuleVisitor<B>>(&self, visitor: &mut V) {
        for (name, param) in [
            ("alpha", &self.alpha),
            ("w_floor", &self.w_floor),
            ("sf", &self.sf),
        ] {
            visitor.enter_module(name, CONTAINER);
            param.visit(visitor);
            visitor.exit_module(name, CONTAINER);
        }
    }

    fn map<M: ModuleMapper<B>>(self, mapper: &mut M) -> Self {
        self.map_params(|name, param| {
            mapper.enter_module(name, CONTAINER);
            let param = Module::<B>::map(param, mapper);
            mapper.exit_module(name, CONTAINER);
            param
        })
    }

    fn load_record(self, record: Self::Record) -> Self {
        Self {
            alpha: self.alpha.load_record(record.alpha),
            w_floor: self.w_floor.load_record(record.w_floor),
            sf: self.sf.load_record(record.sf),
            quantizer: record.quantizer,
            meta: record.meta,
        }
    }

    fn into_record(self) -> Self::Record {
        AdaRoundQuantizerRecord {
            alpha: self.alpha.into_record(),
            w_floor: self.w_floor.into_record(),
            sf: self.sf.into_record(),
            quantizer: self.quantizer,
            meta: self.meta,
        }
    }

    fn to_device(self, device: &B::Device) -> Self {
        self.map_params(|_, param| param.to_device(device))
    }

    fn fork(self, device: &B::Device) -> Self {
        self.map_params(|_, param| param.fork(device))
    }

    fn collect_devices(&self, devices: Devices<B>) -> Devices<B> {
        let devices = self.alpha.collect_devices(devices);
        let devices = self.w_floor.collect_devices(devices);
        self.sf.collect_devices(devices)
    }
}

impl<B: AutodiffBackend> AutodiffModule<B> for AdaRoundQuantizer<B> {
    type InnerModule = AdaRoundQuantizer<B::InnerBackend>;

    fn valid(&self) -> Self::InnerModule {
        AdaRoundQuantizer {
            alpha: self.alpha.valid(),
            w_floor: self.w_floor.valid(),
            sf: self.sf.valid(),
            quantizer: self.quantizer.clone(),
            meta: self.meta.clone(),
        }
    }

    fn from_inner(module: Self::InnerModule) -> Self {
        Self {
            alpha: Param::from_inner(module.alpha),
            w_floor: Param::from_inner(module.w_floor),
            sf: Param::from_inner(module.sf),
            quantizer: module.quantizer,
            meta: module.meta,
        }
    }
}

impl<B: Backend> ModuleDisplayDefault for AdaRoundQuantizer<B> {
    fn content(&self, content: Content) -> Option<Content> {
        content
            .add_formatted(&format!(
                "AdaRound({:?}, shape {:?}, training {})",
                self.quantizer,
                self.alpha.dims(),
                self.meta.training
            ))
            .optional()
    }
}

impl<B: Backend> ModuleDisplay for AdaRoundQuantizer<B> {}
