//! Float weights in: fill a model made of quantized layers from a SafeTensors or PyTorch
//! file read by [`burn_store`], converting PyTorch's or Keras' tensor layouts.
//!
//! The model's tensors are named by their field paths (`conv1.weight`, `blocks.0.fc.bias`),
//! as [`burn_store`] names them. For each one, [`WeightImport::load`] looks up the file's
//! tensor under the name its [`Layout`] gives (see the table on [`Layout`]), converts it to
//! Burn's layout and checks it: shape, dtype, finiteness. Only when every tensor passed are
//! they applied, to a copy of the model; on any error the caller's model is untouched and
//! the error names the tensor. Names that differ otherwise (a prefix, a renamed layer) are
//! mapped with the store's own key remapping, e.g.
//! `SafetensorsStore::from_file(path).with_key_remapping(r"^model\.", "")`.

use std::collections::{BTreeMap, BTreeSet};

use burn::tensor::{backend::Backend, DType, TensorData};
use burn_store::{ApplyError, ModuleSnapshot, ModuleStore, TensorSnapshot};
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Container type of the quantizer slots; their tensors (AdaRound state) are not float weights.
const SLOT_CONTAINER: &str = "Enum:QuantizerSlot";

/// How the file names and lays out its tensors.
///
/// | model tensor | `Burn` | `PyTorch` | `Keras` |
/// |---|---|---|---|
/// | `QuantizedDense.weight` `[d_in, d_out]` | same | `weight` `[d_out, d_in]` | `kernel` `[d_in, d_out]` |
/// | `QuantizedConv2d.weight` `[c_out, c_in/g, kh, kw]` | same | `weight`, same layout | `kernel` `[kh, kw, c_in, c_out]` |
/// | `QuantizedSeparableConv2d.weight_dw` `[c*m, 1, kh, kw]` | same | `weight_dw`, `depthwise.weight` or `conv_dw.weight` | `depthwise_kernel` `[kh, kw, c, m]` |
/// | `QuantizedSeparableConv2d.weight` `[c_out, c*m, 1, 1]` | same | `weight`, `pointwise.weight` or `conv_pw.weight` | `pointwise_kernel` `[1, 1, c*m, c_out]` |
/// | `bias` of the layers above | same | `bias` (`pointwise.bias`, `conv_pw.bias`) | `bias` |
/// | burn `Linear.weight` | same | `weight`, transposed | `kernel` |
/// | burn `Conv2d.weight` | same | `weight` | `kernel` or `depthwise_kernel`, converted |
/// | burn `BatchNorm` `gamma`, `beta`, `running_mean`, `running_var` | same | `weight`, `bias`, `running_mean`, `running_var` | `gamma`, `beta`, `moving_mean`, `moving_variance` |
///
/// Keras names are read with `/` as `.` and without a `:0` suffix, so `conv1/kernel:0`
/// is `conv1.kernel`. Other tensors are looked up under their own path, unconverted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Layout {
    /// Burn's names and layouts (a file saved from this model).
    Burn,
    /// PyTorch's `state_dict` names and layouts.
    PyTorch,
    /// Keras' weight names and layouts (channels-last kernels).
    Keras,
}

/// Why loading stopped. Each variant names the model tensor (`tensor`) and, where one was
/// found, the file's tensor (`from`).
#[derive(Debug, Clone, PartialEq, Error)]
pub enum ImportError {
    /// The store could not be read (missing file, invalid format).
    #[error("cannot read the weights: {0}")]
    Store(String),
    /// No tensor in the file under any name the layout allows.
    #[error("tensor `{tensor}`: not in the file (looked for {tried:?})")]
    Missing {
        /// Path of the model tensor.
        tensor: String,
        /// The file names that were tried.
        tried: Vec<String>,
    },
    /// The file's tensor has another shape (after the layout conversion).
    #[error(
        "tensor `{tensor}`: `{from}` has shape {found:?} ({layout:?} layout), \
         the model expects {expected:?} in Burn's layout{detail}"
    )]
    Shape {
        /// Path of the model tensor.
        tensor: String,
        /// Name of the file's tensor.
        from: String,
        /// The layout the file's tensor was read in.
        layout: Layout,
        /// Shape in the file.
        found: Vec<usize>,
        /// Shape in the model (Burn's layout).
        expected: Vec<usize>,
        /// What else the layout requires, if anything.
        detail: String,
    },
    /// The file's tensor is not a float tensor.
    #[error("tensor `{tensor}`: `{from}` holds {dtype:?}, not floats")]
    DType {
        /// Path of the model tensor.
        tensor: String,
        /// Name of the file's tensor.
        from: String,
        /// Its dtype.
        dtype: DType,
    },
    /// The file's tensor holds `NaN` or an infinity.
    #[error(
        "tensor `{tensor}`: `{from}` holds the non-finite value {value} at flat index {index}"
    )]
    NonFinite {
        /// Path of the model tensor.
        tensor: String,
        /// Name of the file's tensor.
        from: String,
        /// Row-major index of the first non-finite value, in the file's layout.
        index: usize,
        /// The value.
        value: f32,
    },
    /// The file has tensors no model tensor takes (allow them with
    /// [`WeightImport::allow_unused`]).
    #[error("the file has tensors the model does not take: {0:?}")]
    Unused(Vec<String>),
    /// Burn could not apply a checked tensor.
    #[error("tensor `{tensor}`: {message}")]
    Apply {
        /// Path of the model tensor.
        tensor: String,
        /// Burn's message.
        message: String,
    },
}

/// One loaded tensor.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LoadedTensor {
    /// Path of the model tensor.
    pub tensor: String,
    /// Name of the file's tensor it came from.
    pub from: String,
    /// Shape in the model.
    pub shape: Vec<usize>,
}

/// What [`WeightImport::load`] did.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ImportReport {
    /// Every model tensor that was loaded, in path order.
    pub loaded: Vec<LoadedTensor>,
    /// File tensors that no model tensor took (only with [`WeightImport::allow_unused`]).
    pub unused: Vec<String>,
}

/// Loads float weights into a model; see the [module docs](self).
#[derive(Clone, Debug)]
pub struct WeightImport {
    layout: Layout,
    allow_unused: bool,
}

/// How a file tensor becomes a model tensor.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Conversion {
    /// Same layout.
    Identity,
    /// `[a, b]` to `[b, a]`.
    Transpose,
    /// Keras `[kh, kw, c_in, c_out]` to `[c_out, c_in, kh, kw]`.
    KerasConv,
    /// Keras depthwise `[kh, kw, c, m]` to `[c * m, 1, kh, kw]`.
    KerasDepthwise,
}

impl WeightImport {
    /// Reads files in `layout`; unused file tensors are an error.
    pub fn new(layout: Layout) -> Self {
        Self {
            layout,
            allow_unused: false,
        }
    }

    /// Accepts file tensors that no model tensor takes (listed in the report).
    pub fn allow_unused(mut self, allow: bool) -> Self {
        self.allow_unused = allow;
        self
    }

    /// A copy of `model` with every float weight read from `store`, converted to Burn's
    /// layout. AdaRound state held by the layers' quantizer slots is left as it is.
    pub fn load<B, M, S>(&self, model: &M, store: &mut S) -> Result<(M, ImportReport), ImportError>
    where
        B: Backend,
        M: ModuleSnapshot<B> + Clone,
        S: ModuleStore,
    {
        let file: BTreeMap<String, &TensorSnapshot> = store
            .get_all_snapshots()
            .map_err(|e| ImportError::Store(e.to_string()))?
            .iter()
            .map(|(name, snapshot)| (self.file_name(name), snapshot))
            .collect();

        let mut used = BTreeSet::new();
        let mut loaded = Vec::new();
        let mut snapshots = Vec::new();
        for target in model.collect(None, None, false) {
            let in_slot = target
                .container_stack
                .as_ref()
                .is_some_and(|stack| stack.iter().any(|c| c == SLOT_CONTAINER));
            if in_slot || !target.dtype.is_float() {
                continue;
            }
            let tensor = target.full_path();
            let candidates = self.candidates(&tensor, target.module_type().as_deref());
            let Some((from, conversion, source)) = candidates
                .iter()
                .find_map(|(name, conv)| file.get(name).map(|s| (name.clone(), *conv, *s)))
            else {
                return Err(ImportError::Missing {
                    tensor,
                    tried: candidates.into_iter().map(|(name, _)| name).collect(),
                });
            };
            let data = self.convert(&tensor, &from, source, conversion, &target.shape)?;
            used.insert(from.clone());
            loaded.push(LoadedTensor {
                tensor: tensor.clone(),
                from,
                shape: target.shape.to_vec(),
            });
            snapshots.push(TensorSnapshot::from_data(
                data.convert_dtype(target.dtype),
                target.path_stack.clone().unwrap_or_default(),
                target.container_stack.clone().unwrap_or_default(),
                target.tensor_id.unwrap_or_default(),
            ));
        }

        let unused: Vec<String> = file
            .keys()
            .filter(|n| !used.contains(*n))
            .cloned()
            .collect();
        if !unused.is_empty() && !self.allow_unused {
            return Err(ImportError::Unused(unused));
        }

        let mut copy = model.clone();
        let result = copy.apply(snapshots, None, None, false);
        if let Some(error) = result.errors.first() {
            let (ApplyError::ShapeMismatch { path, .. }
            | ApplyError::DTypeMismatch { path, .. }
            | ApplyError::AdapterError { path, .. }
            | ApplyError::LoadError { path, .. }) = error;
            return Err(ImportError::Apply {
                tensor: path.clone(),
                message: error.to_string(),
            });
        }
        if let Some(l) = loaded.iter().find(|l| !result.applied.contains(&l.tensor)) {
            return Err(ImportError::Apply {
                tensor: l.tensor.clone(),
                message: "burn-store did not apply it".to_string(),
            });
        }
        Ok((copy, ImportReport { loaded, unused }))
    }

    /// The name a file tensor is looked up under.
    fn file_name(&self, name: &str) -> String {
        match self.layout {
            Layout::Keras => name.strip_suffix(":0").unwrap_or(name).replace('/', "."),
            Layout::Burn | Layout::PyTorch => name.to_string(),
        }
    }

    /// File names to try for the model tensor `path`, in order, with their conversion.
    fn candidates(&self, path: &str, module: Option<&str>) -> Vec<(String, Conversion)> {
        use Conversion::*;
        let (prefix, param) = match path.rsplit_once('.') {
            Some((prefix, param)) => (format!("{prefix}."), param),
            None => (String::new(), path),
        };
        let module = module.unwrap_or("");
        let at = |names: &[(&str, Conversion)]| -> Vec<(String, Conversion)> {
            names
                .iter()
                .map(|(name, conv)| (format!("{prefix}{name}"), *conv))
                .collect()
        };
        match (self.layout, module, param) {
            (Layout::Burn, _, _) => vec![(path.to_string(), Identity)],

            (Layout::PyTorch, "Struct:QuantizedDense" | "Struct:Linear", "weight") => {
                at(&[("weight", Transpose)])
            }
            (Layout::PyTorch, "Struct:QuantizedSeparableConv2d", "weight_dw") => at(&[
                ("weight_dw", Identity),
                ("depthwise.weight", Identity),
                ("conv_dw.weight", Identity),
            ]),
            (Layout::PyTorch, "Struct:QuantizedSeparableConv2d", "weight") => at(&[
                ("weight", Identity),
                ("pointwise.weight", Identity),
                ("conv_pw.weight", Identity),
            ]),
            (Layout::PyTorch, "Struct:QuantizedSeparableConv2d", "bias") => at(&[
                ("bias", Identity),
                ("pointwise.bias", Identity),
                ("conv_pw.bias", Identity),
            ]),
            (Layout::PyTorch, "Struct:BatchNorm", "gamma") => at(&[("weight", Identity)]),
            (Layout::PyTorch, "Struct:BatchNorm", "beta") => at(&[("bias", Identity)]),

            (Layout::Keras, "Struct:QuantizedDense" | "Struct:Linear", "weight") => {
                at(&[("kernel", Identity)])
            }
            (Layout::Keras, "Struct:QuantizedConv2d", "weight") => at(&[("kernel", KerasConv)]),
            (Layout::Keras, "Struct:Conv2d", "weight") => {
                at(&[("kernel", KerasConv), ("depthwise_kernel", KerasDepthwise)])
            }
            (Layout::Keras, "Struct:QuantizedSeparableConv2d", "weight_dw") => {
                at(&[("depthwise_kernel", KerasDepthwise)])
            }
            (Layout::Keras, "Struct:QuantizedSeparableConv2d", "weight") => {
                at(&[("pointwise_kernel", KerasConv)])
            }
            (Layout::Keras, "Struct:BatchNorm", "running_mean") => at(&[("moving_mean", Identity)]),
            (Layout::Keras, "Struct:BatchNorm", "running_var") => {
                at(&[("moving_variance", Identity)])
            }
            _ => vec![(path.to_string(), Identity)],
        }
    }

    /// The checked, converted data of the file tensor `from` for the model tensor `tensor`.
    fn convert(
        &self,
        tensor: &str,
        from: &str,
        source: &TensorSnapshot,
        conversion: Conversion,
        expected: &[usize],
    ) -> Result<TensorData, ImportError> {
        let found: Vec<usize> = source.shape.to_vec();
        let shape_error = || ImportError::Shape {
            tensor: tensor.to_string(),
            from: from.to_string(),
            layout: self.layout,
            found: found.clone(),
            expected: expected.to_vec(),
            detail: in_file(conversion, expected),
        };
        if !source.dtype.is_float() {
            return Err(ImportError::DType {
                tensor: tensor.to_string(),
                from: from.to_string(),
                dtype: source.dtype,
            });
        }
        let (perm, converted): (Vec<usize>, Vec<usize>) = match (conversion, found.as_slice()) {
            (Conversion::Identity, _) => ((0..found.len()).collect(), found.clone()),
            (Conversion::Transpose, [a, b]) => (vec![1, 0], vec![*b, *a]),
            (Conversion::KerasConv, [kh, kw, ci, co]) => {
                (vec![3, 2, 0, 1], vec![*co, *ci, *kh, *kw])
            }
            (Conversion::KerasDepthwise, [kh, kw, c, m]) => {
                (vec![2, 3, 0, 1], vec![c * m, 1, *kh, *kw])
            }
            (Conversion::Transpose | Conversion::KerasConv | Conversion::KerasDepthwise, _) => {
                return Err(shape_error())
            }
        };
        if converted != expected {
            return Err(shape_error());
        }
        let data = source
            .to_data()
            .map_err(|e| ImportError::Store(format!("`{from}`: {e}")))?;
        let values: Vec<f32> = data
            .convert::<f32>()
            .to_vec()
            .map_err(|e| ImportError::Store(format!("`{from}`: {e:?}")))?;
        if let Some((index, value)) = values.iter().enumerate().find(|(_, v)| !v.is_finite()) {
            return Err(ImportError::NonFinite {
                tensor: tensor.to_string(),
                from: from.to_string(),
                index,
                value: *value,
            });
        }
        Ok(TensorData::new(permute(&values, &found, &perm), converted))
    }
}

/// What the file should hold for a model tensor of shape `expected`.
fn in_file(conversion: Conversion, expected: &[usize]) -> String {
    match (conversion, expected) {
        (Conversion::Identity, _) => String::new(),
        (Conversion::Transpose, [a, b]) => format!(", i.e. {:?} in the file", [b, a]),
        (Conversion::KerasConv, [co, ci, kh, kw]) => {
            format!(", i.e. {:?} in the file", [kh, kw, ci, co])
        }
        (Conversion::KerasDepthwise, [cm, _, kh, kw]) => {
            format!(", i.e. [{kh}, {kw}, c, m] with c * m = {cm} in the file")
        }
        _ => String::new(),
    }
}

/// `values` of row-major `shape`, with axis `perm[i]` of the input as axis `i` of the output.
fn permute(values: &[f32], shape: &[usize], perm: &[usize]) -> Vec<f32> {
    if perm.iter().enumerate().all(|(i, p)| i == *p) {
        return values.to_vec();
    }
    let rank = shape.len();
    let mut strides = vec![1; rank];
    for axis in (0..rank.saturating_sub(1)).rev() {
        strides[axis] = strides[axis + 1] * shape[axis + 1];
    }
    let out_shape: Vec<usize> = perm.iter().map(|p| shape[*p]).collect();
    let mut out = Vec::with_capacity(values.len());
    let mut index = vec![0; rank];
    for _ in 0..values.len() {
        let offset: usize = (0..rank).map(|i| index[i] * strides[perm[i]]).sum();
        out.push(values[offset]);
        for axis in (0..rank).rev() {
            index[axis] += 1;
            if index[axis] < out_shape[axis] {
                break;
            }
            index[axis] = 0;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn should_permute_like_a_transpose_of_axes() {
        // [2, 3] transposed.
        let v = [0.0, 1.0, 2.0, 3.0, 4.0, 5.0];
        assert_eq!(
            permute(&v, &[2, 3], &[1, 0]),
            vec![0.0, 3.0, 1.0, 4.0, 2.0, 5.0]
        );
        // Keras [kh=1, kw=2, c_in=2, c_out=3] to [c_out, c_in, kh, kw]: element
        // (0, w, i, o) sits at w*6 + i*3 + o and must land at o*4 + i*2 + w.
        let v: Vec<f32> = (0..12).map(|x| x as f32).collect();
        let out = permute(&v, &[1, 2, 2, 3], &[3, 2, 0, 1]);
        for w in 0..2 {
            for i in 0..2 {
                for o in 0..3 {
                    assert_eq!(out[o * 4 + i * 2 + w], (w * 6 + i * 3 + o) as f32);
                }
            }
        }
    }

    #[test]
    fn should_read_keras_names_with_dots_and_without_the_variable_suffix() {
        let import = WeightImport::new(Layout::Keras);
        assert_eq!(
            import.file_name("block1/conv/kernel:0"),
            "block1.conv.kernel"
        );
        assert_eq!(import.file_name("dense/bias"), "dense.bias");
        let pytorch = WeightImport::new(Layout::PyTorch);
        assert_eq!(pytorch.file_name("a/b:0"), "a/b:0");
    }
}
