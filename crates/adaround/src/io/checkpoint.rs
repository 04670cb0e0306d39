//! Checkpoints after each layer, and resuming from them.
//!
//! The folder holds `progress.json` (the configuration, a fingerprint of what the run was made
//! from, the layer names, the finished layers' reports, and the name and checksum of the
//! model file) and `model-<n>.bin` (the model record after `n` finished layers). Every file is
//! written under a temporary name and renamed into place; `progress.json` goes last and names
//! its model file, so a crash at any point leaves the last complete checkpoint valid. Older
//! model files are removed afterwards. Resuming checks everything before using anything.

use std::{
    panic::{catch_unwind, AssertUnwindSafe},
    path::{Path, PathBuf},
};

use adaround_core::AdaRoundParams;
use adaround_layers::{QuantizedLayer, QuantizerSlot};
use burn::{
    module::{Module, ModuleVisitor, Param},
    record::{BinBytesRecorder, FullPrecisionSettings, Recorder},
    tensor::{backend::Backend, Bool, ElementConversion, Tensor},
};
use serde::{Deserialize, Serialize};

use crate::{AdaRoundConfig, AdaRoundError, LayerReport};

const PROGRESS: &str = "progress.json";

/// What a run was made from, as FNV-1a hashes: a checkpoint of another model, other
/// quantizers or other calibration samples is refused.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct Fingerprint {
    pub weights: String,
    pub quantizers: String,
    pub samples: String,
}

/// What `progress.json` holds.
#[derive(Clone, Serialize, Deserialize)]
struct Progress {
    config: String,
    fingerprint: Fingerprint,
    layers: Vec<String>,
    done: Vec<LayerReport>,
    model_file: String,
    model_checksum: String,
    /// The checksum of the file's JSON value with this field empty (as `serde_json::Value`
    /// prints it): an edited report or name is refused, not resumed.
    #[serde(default)]
    seal: String,
}

impl Progress {
    /// The checksum [`seal`](Self::seal) holds when nothing was edited.
    fn expected_seal(&self) -> String {
        let unsealed = Self {
            seal: String::new(),
            ..self.clone()
        };
        let value = serde_json::to_value(&unsealed).expect("reports serialize");
        checksum(value.to_string().as_bytes())
    }
}

/// 64-bit FNV-1a.
struct Fnv(u64);

impl Fnv {
    fn new() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
    }

    fn hex(&self) -> String {
        format!("{:016x}", self.0)
    }
}

pub(crate) fn checksum(bytes: &[u8]) -> String {
    let mut h = Fnv::new();
    h.write(bytes);
    h.hex()
}

fn feed<B: Backend, const D: usize>(h: &mut Fnv, t: Tensor<B, D>) {
    let values = t
        .into_data()
        .convert::<f32>()
        .to_vec::<f32>()
        .unwrap_or_default();
    for v in values {
        h.write(&v.to_le_bytes());
    }
}

struct HashWeights(Fnv);

impl<B: Backend> ModuleVisitor<B> for HashWeights {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        feed(&mut self.0, param.val());
    }
}

impl Fingerprint {
    /// The fingerprint of `model` (every float parameter), its quantizers (as JSON) and the
    /// calibration `batches`.
    pub fn of<B: Backend, M: Module<B>, const D: usize>(
        model: &M,
        quantizers: &str,
        batches: &[Tensor<B, D>],
    ) -> Self {
        let mut weights = HashWeights(Fnv::new());
        model.visit(&mut weights);
        let mut samples = Fnv::new();
        for b in batches {
            feed(&mut samples, b.clone());
        }
        Self {
            weights: weights.0.hex(),
            quantizers: checksum(quantizers.as_bytes()),
            samples: samples.hex(),
        }
    }
}

/// Whether `loaded` is what a run leaves of `float` (a site's layer): with `finished`, each
/// kernel it computes with is a rounding of the float kernel, every weight within one step
/// of AdaRound's grid (from the float weights) of its float weight clipped to the grid's
/// range (a thousandth of a step allowed for floating-point rounding); unfinished, its
/// kernels are the float ones. Kernels without a quantizer are the float ones either way.
/// (A bias moved by bias correction can hold any value: it is not checked.)
pub(crate) fn is_state_of<B: Backend>(
    float: &QuantizedLayer<B>,
    loaded: &QuantizedLayer<B>,
    finished: bool,
) -> bool {
    let Ok(armed) = float.clone().with_adaround(&AdaRoundParams::new()) else {
        return false;
    };
    let yes = |t: Tensor<B, 4, Bool>| t.all().int().into_scalar().elem::<i64>() == 1;
    let (floats, loaded) = (armed.kernels(), loaded.kernels());
    floats.len() == loaded.len()
        && floats.iter().zip(&loaded).all(|(f, l)| {
            if f.weight.dims() != l.weight.dims() {
                return false;
            }
            let ada = match f.slot {
                QuantizerSlot::AdaRound(ada) if finished => ada,
                _ => return yes(l.weight.clone().equal(f.weight.clone())),
            };
            let (lo, hi) = ada.levels();
            let steps = |w: Tensor<B, 4>| {
                let z = w * ada.sf.val();
                match ada.offset() {
                    Some(o) => z - o,
                    None => z,
                }
            };
            let effective = l.slot.apply(l.weight.clone(), l.axis);
            let distance = (steps(effective) - steps(f.weight.clone()).clamp(lo, hi)).abs();
            yes(distance.lower_equal_elem(1.0 + 1e-3))
        })
}

pub(crate) struct Checkpoint {
    pub dir: PathBuf,
}

fn io(path: &Path, e: impl std::fmt::Display) -> AdaRoundError {
    AdaRoundError::Checkpoint(format!("{}: {e}", path.display()))
}

fn damaged(path: &Path, what: &str) -> AdaRoundError {
    AdaRoundError::Checkpoint(format!("{} is damaged: {what}", path.display()))
}

/// Writes `bytes` to `path` through a temporary file and a rename.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), AdaRoundError> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).map_err(|e| io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| io(path, e))
}

impl Checkpoint {
    /// The checkpoint folder, created and checked writable now (not after the first layer).
    pub fn open(dir: &str) -> Result<Self, AdaRoundError> {
        let dir = PathBuf::from(dir);
        std::fs::create_dir_all(&dir).map_err(|e| io(&dir, e))?;
        let probe = dir.join(".write-test");
        std::fs::write(&probe, b"ok").map_err(|e| io(&probe, e))?;
        std::fs::remove_file(&probe).map_err(|e| io(&probe, e))?;
        Ok(Self { dir })
    }

    /// Writes the model and the finished layers (see the module docs for the order).
    pub fn save<B: Backend, M: Module<B>>(
        &self,
        model: &M,
        done: &[LayerReport],
        layers: &[String],
        config: &AdaRoundConfig,
        fingerprint: &Fingerprint,
    ) -> Result<(), AdaRoundError> {
        let recorder = BinBytesRecorder::<FullPrecisionSettings>::default();
        let bytes = recorder
            .record(model.clone().into_record(), ())
            .map_err(|e| io(&self.dir, e))?;
        let model_file = format!("model-{}.bin", done.len());
        write_atomic(&self.dir.join(&model_file), &bytes)?;
        let mut progress = Progress {
            config: config.numerics(),
            fingerprint: fingerprint.clone(),
            layers: layers.to_vec(),
            done: done.to_vec(),
            model_checksum: checksum(&bytes),
            model_file: model_file.clone(),
            seal: String::new(),
        };
        progress.seal = progress.expected_seal();
        let json = serde_json::to_string_pretty(&progress).expect("reports serialize");
        write_atomic(&self.dir.join(PROGRESS), json.as_bytes())?;
        for entry in std::fs::read_dir(&self.dir)
            .map_err(|e| io(&self.dir, e))?
            .flatten()
        {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with("model-") && name.ends_with(".bin") && name != model_file {
                let _ = std::fs::remove_file(entry.path());
            }
        }
        Ok(())
    }

    /// The model and finished layers of a previous run, if the folder holds a checkpoint of
    /// this very run (configuration, layers, weights, quantizers and samples).
    pub fn resume<B: Backend, M: Module<B>>(
        &self,
        model: M,
        layers: &[String],
        config: &AdaRoundConfig,
        fingerprint: &Fingerprint,
        device: &B::Device,
    ) -> Result<Option<(M, Vec<LayerReport>)>, AdaRoundError> {
        let path = self.dir.join(PROGRESS);
        if !path.exists() {
            return Ok(None);
        }
        let text = std::fs::read_to_string(&path).map_err(|e| io(&path, e))?;
        let progress: Progress =
            serde_json::from_str(&text).map_err(|e| damaged(&path, &e.to_string()))?;
        if progress.seal != progress.expected_seal() {
            return Err(damaged(&path, "its contents differ from their checksum"));
        }
        let mismatch = |what| AdaRoundError::CheckpointMismatch {
            dir: self.dir.display().to_string(),
            what,
        };
        let f = &progress.fingerprint;
        if progress.config != config.numerics() {
            return Err(mismatch("configuration"));
        } else if progress.layers != layers {
            return Err(mismatch("layers"));
        } else if f.weights != fingerprint.weights {
            return Err(mismatch("float weights"));
        } else if f.quantizers != fingerprint.quantizers {
            return Err(mismatch("quantizers"));
        } else if f.samples != fingerprint.samples {
            return Err(mismatch("calibration samples"));
        }
        let expected = format!("model-{}.bin", progress.done.len());
        if progress.done.len() > layers.len() || progress.model_file != expected {
            return Err(damaged(
                &path,
                "its finished layers do not match its model file",
            ));
        }
        let model_path = self.dir.join(&progress.model_file);
        let bytes = std::fs::read(&model_path).map_err(|e| io(&model_path, e))?;
        if checksum(&bytes) != progress.model_checksum {
            return Err(damaged(&model_path, "checksum mismatch"));
        }
        let recorder = BinBytesRecorder::<FullPrecisionSettings>::default();
        // Burn's record types panic on values they cannot read back: a typed error instead.
        let loaded = catch_unwind(AssertUnwindSafe(|| {
            recorder
                .load::<M::Record>(bytes, device)
                .map(|record| model.load_record(record))
        }));
        match loaded {
            Ok(Ok(model)) => Ok(Some((model, progress.done))),
            Ok(Err(e)) => Err(damaged(&model_path, &e.to_string())),
            Err(_) => Err(damaged(&model_path, "its record cannot be read")),
        }
    }
}
