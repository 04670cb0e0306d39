//! Float weights in: fill a model made of quantized layers from a SafeTensors or PyTorch
//! file read by [`burn_store`], converting PyTorch's or Keras' tensor layouts.
//!
//! The model's tensors are named by their field paths (`conv1.weight`, `blocks.0.fc.bias`),
//! as [`burn_store`] names them. For each one, [`WeightImport::load`] looks up the file's
//! tensor under the name its [`Layout`] gives (see the table below) and checks it, converted to
//! Burn's layout: shape, dtype, finiteness. Only when every tensor passed are
//! they applied, to a copy of the model; on any error the caller's model is untouched and
//! the error names the tensor. Names that differ otherwise (a prefix, a renamed layer) are
//! mapped with the store's own key remapping, e.g.
//! `SafetensorsStore::from_file(path).with_key_remapping(r"^model\.", "")`.
//!
//! The conversion to Burn's layout runs inside burn-store's `apply`, as a
//! [`ModuleAdapter`]; each layer kind of `adaround-layers` declares its own file names
//! ([`AdaRoundLayer::file_names`](adaround_layers::AdaRoundLayer::file_names)), and this
//! module those of Burn's `Linear`, `Conv2d` and `BatchNorm`:
//!
//! | model tensor | `Burn` | `PyTorch` | `Keras` |
//! |---|---|---|---|
//! | `QuantizedDense.weight` `[d_in, d_out]` | same | `weight` `[d_out, d_in]` | `kernel` `[d_in, d_out]` |
//! | `QuantizedConv2d.weight` `[c_out, c_in/g, kh, kw]` | same | `weight`, same layout | `kernel` `[kh, kw, c_in, c_out]` |
//! | `QuantizedSeparableConv2d.weight_dw` `[c*m, 1, kh, kw]` | same | `weight_dw`, `depthwise.weight` or `conv_dw.weight` | `depthwise_kernel` `[kh, kw, c, m]` |
//! | `QuantizedSeparableConv2d.weight` `[c_out, c*m, 1, 1]` | same | `weight`, `pointwise.weight` or `conv_pw.weight` | `pointwise_kernel` `[1, 1, c*m, c_out]` |
//! | `bias` of the layers above | same | `bias` (`pointwise.bias`, `conv_pw.bias`) | `bias` |
//! | burn `Linear.weight` | same | `weight`, transposed | `kernel` |
//! | burn `Conv2d.weight` | same | `weight` | `kernel` or `depthwise_kernel`, converted |
//! | burn `BatchNorm` `gamma`, `beta`, `running_mean`, `running_var` | same | `weight`, `bias`, `running_mean`, `running_var` | `gamma`, `beta`, `moving_mean`, `moving_variance` |
//!
//! Keras names are read with `/` as `.` and without a `:0` suffix, so `conv1/kernel:0`
//! is `conv1.kernel`. Other tensors are looked up under their own path, unconverted.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    rc::Rc,
};

use adaround_layers::{file_layout::permute, file_names};
use burn::tensor::{backend::Backend, DType, TensorData};
use burn_store::{
    ApplyError, ModuleAdapter, ModuleSnapshot, ModuleStore, TensorSnapshot, TensorSnapshotError,
};
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Container type of the quantizer slots; their tensors (AdaRound state) are not float weights.
const SLOT_CONTAINER: &str = "Enum:QuantizerSlot";

pub use adaround_layers::file_layout::{Conversion, Layout};

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
        let mut adapter = LayoutAdapter::default();
        for target in model.collect(None, None, false) {
            let in_slot = target
                .container_stack
                .as_ref()
                .is_some_and(|stack| stack.iter().any(|c| c == SLOT_CONTAINER));
            if in_slot || !target.dtype.is_float() {
                continue;
            }
            let (from, snapshot, plan) = self.take::<B>(&target, &file)?;
            let tensor = target.full_path();
            used.insert(from.clone());
            loaded.push(LoadedTensor {
                tensor: tensor.clone(),
                from,
                shape: target.shape.to_vec(),
            });
            adapter.plans.insert(tensor, plan);
            snapshots.push(snapshot);
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
        let result = copy.apply(snapshots, None, Some(Box::new(adapter)), false);
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

    /// For the model tensor `target`: the name of the file tensor it takes, that tensor
    /// under the model's path (in the file's layout), and its checked conversion plan.
    fn take<B: Backend>(
        &self,
        target: &TensorSnapshot,
        file: &BTreeMap<String, &TensorSnapshot>,
    ) -> Result<(String, TensorSnapshot, Plan), ImportError> {
        let tensor = target.full_path();
        let candidates = self.candidates::<B>(&tensor, target.module_type().as_deref());
        let Some((from, conversion, source)) = candidates
            .iter()
            .find_map(|(name, conv)| file.get(name).map(|s| (name.clone(), *conv, *s)))
        else {
            return Err(ImportError::Missing {
                tensor,
                tried: candidates.into_iter().map(|(name, _)| name).collect(),
            });
        };
        let perm = self.check(&tensor, &from, source, conversion, &target.shape)?;
        let snapshot = TensorSnapshot::from_closure(
            source.clone_data_fn(),
            source.dtype,
            source.shape.clone(),
            target.path_stack.clone().unwrap_or_default(),
            target.container_stack.clone().unwrap_or_default(),
            target.tensor_id.unwrap_or_default(),
        );
        Ok((from, snapshot, (perm, target.shape.to_vec(), target.dtype)))
    }

    /// The name a file tensor is looked up under.
    fn file_name(&self, name: &str) -> String {
        match self.layout {
            Layout::Keras => name.strip_suffix(":0").unwrap_or(name).replace('/', "."),
            Layout::Burn | Layout::PyTorch => name.to_string(),
        }
    }

    /// File names to try for the model tensor `path`, in order, with their conversion: the
    /// layer kind's own ([`file_names`]) or those of Burn's layers.
    fn candidates<B: Backend>(
        &self,
        path: &str,
        module: Option<&str>,
    ) -> Vec<(String, Conversion)> {
        let (prefix, param) = match path.rsplit_once('.') {
            Some((prefix, param)) => (format!("{prefix}."), param),
            None => (String::new(), path),
        };
        let module = module.unwrap_or("");
        let names = match file_names::<B>(module, self.layout, param) {
            _ if self.layout == Layout::Burn => &[][..],
            Some(names) => names,
            None => burn_file_names(self.layout, module, param),
        };
        if names.is_empty() {
            return vec![(path.to_string(), Conversion::Identity)];
        }
        names
            .iter()
            .map(|(name, conv)| (format!("{prefix}{name}"), *conv))
            .collect()
    }

    /// Checks the file tensor `from` for the model tensor `tensor` (dtype, shape after the
    /// conversion, finiteness); the axis permutation of the conversion.
    fn check(
        &self,
        tensor: &str,
        from: &str,
        source: &TensorSnapshot,
        conversion: Conversion,
        expected: &[usize],
    ) -> Result<Vec<usize>, ImportError> {
        let found: Vec<usize> = source.shape.to_vec();
        if !source.dtype.is_float() {
            return Err(ImportError::DType {
                tensor: tensor.to_string(),
                from: from.to_string(),
                dtype: source.dtype,
            });
        }
        let Some((perm, _)) = conversion
            .plan(&found)
            .filter(|(_, converted)| converted == expected)
        else {
            return Err(ImportError::Shape {
                tensor: tensor.to_string(),
                from: from.to_string(),
                layout: self.layout,
                found,
                expected: expected.to_vec(),
                detail: conversion.in_file(expected),
            });
        };
        let values =
            f32_values(source).map_err(|e| ImportError::Store(format!("`{from}`: {e}")))?;
        if let Some((index, value)) = values.iter().enumerate().find(|(_, v)| !v.is_finite()) {
            return Err(ImportError::NonFinite {
                tensor: tensor.to_string(),
                from: from.to_string(),
                index,
                value: *value,
            });
        }
        Ok(perm)
    }
}

/// The file names of Burn's own layers' parameters; see [`candidates`](WeightImport::candidates).
fn burn_file_names(
    layout: Layout,
    module: &str,
    param: &str,
) -> &'static [(&'static str, Conversion)] {
    use Conversion::*;
    match (layout, module, param) {
        (Layout::PyTorch, "Struct:Linear", "weight") => &[("weight", Transpose)],
        (Layout::PyTorch, "Struct:BatchNorm", "gamma") => &[("weight", Identity)],
        (Layout::PyTorch, "Struct:BatchNorm", "beta") => &[("bias", Identity)],
        (Layout::Keras, "Struct:Linear", "weight") => &[("kernel", Identity)],
        (Layout::Keras, "Struct:Conv2d", "weight") => {
            &[("kernel", KerasConv), ("depthwise_kernel", KerasDepthwise)]
        }
        (Layout::Keras, "Struct:BatchNorm", "running_mean") => &[("moving_mean", Identity)],
        (Layout::Keras, "Struct:BatchNorm", "running_var") => &[("moving_variance", Identity)],
        _ => &[],
    }
}

/// The values of a snapshot as `f32`.
fn f32_values(source: &TensorSnapshot) -> Result<Vec<f32>, String> {
    let data = source.to_data().map_err(|e| e.to_string())?;
    data.convert::<f32>().to_vec().map_err(|e| format!("{e:?}"))
}

/// Converts checked file tensors to Burn's layout and the model's dtype inside burn-store's
/// `apply`: per model tensor path, the axis permutation, the shape in Burn's layout and the
/// dtype.
#[derive(Clone, Default)]
struct LayoutAdapter {
    plans: HashMap<String, Plan>,
}

/// The axis permutation from the file's layout, the shape in Burn's layout and the dtype.
type Plan = (Vec<usize>, Vec<usize>, DType);

impl ModuleAdapter for LayoutAdapter {
    fn adapt(&self, snapshot: &TensorSnapshot) -> TensorSnapshot {
        let Some((perm, shape, dtype)) = self.plans.get(&snapshot.full_path()).cloned() else {
            return snapshot.clone();
        };
        let found = snapshot.shape.to_vec();
        let converted_shape = shape.clone();
        let read = snapshot.clone_data_fn();
        let converted = move || -> Result<TensorData, TensorSnapshotError> {
            let data = read()?.convert::<f32>();
            let values: Vec<f32> = data
                .to_vec()
                .map_err(|e| TensorSnapshotError::DataError(format!("{e:?}")))?;
            Ok(
                TensorData::new(permute(&values, &found, &perm), shape.clone())
                    .convert_dtype(dtype),
            )
        };
        TensorSnapshot::from_closure(
            Rc::new(converted),
            dtype,
            converted_shape.into(),
            snapshot.path_stack.clone().unwrap_or_default(),
            snapshot.container_stack.clone().unwrap_or_default(),
            snapshot.tensor_id.unwrap_or_default(),
        )
    }

    fn clone_box(&self) -> Box<dyn ModuleAdapter> {
        Box::new(self.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn every_layer_kind_names_the_container_burn_store_records() {
        use adaround_core::WeightQuantizer;
        use adaround_layers::{
            QuantizedConv2dConfig, QuantizedDenseConfig, QuantizedLayer,
            QuantizedSeparableConv2dConfig,
        };
        type B = burn_ndarray::NdArray<f32>;
        let device = Default::default();
        let q = || WeightQuantizer::max_per_axis(4).unwrap();
        let layers: Vec<QuantizedLayer<B>> = vec![
            QuantizedDenseConfig::new(3, 2)
                .with_quantizer(q())
                .init::<B>(&device)
                .into(),
            QuantizedConv2dConfig::new([2, 3], [3, 3])
                .with_quantizer(q())
                .init::<B>(&device)
                .into(),
            QuantizedSeparableConv2dConfig::new([2, 3], [3, 3])
                .with_quantizer(q())
                .init::<B>(&device)
                .into(),
        ];
        for layer in layers {
            let weights: Vec<TensorSnapshot> = layer
                .collect(None, None, false)
                .into_iter()
                .filter(|t| t.full_path().ends_with("weight"))
                .collect();
            assert!(!weights.is_empty());
            for weight in weights {
                let container = weight.module_type().unwrap();
                let param = weight.path_stack.as_ref().unwrap().last().unwrap().clone();
                let names = file_names::<B>(&container, Layout::Keras, &param);
                assert!(
                    names.is_some_and(|n| !n.is_empty()),
                    "{:?}: no Keras names for `{param}` of `{container}`",
                    layer.kind()
                );
            }
        }
        assert_eq!(
            file_names::<B>("Struct:Linear", Layout::Keras, "weight"),
            None
        );
    }
}
