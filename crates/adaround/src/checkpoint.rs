//! Checkpoints after each layer, and resuming from them.

use std::path::{Path, PathBuf};

use burn::{
    module::Module,
    record::{BinFileRecorder, FullPrecisionSettings},
    tensor::backend::Backend,
};
use serde::{Deserialize, Serialize};

use crate::{AdaRoundConfig, AdaRoundError, LayerReport};

const MODEL: &str = "model";
const PROGRESS: &str = "progress.json";

/// What `progress.json` holds.
#[derive(Serialize, Deserialize)]
struct Progress {
    /// The numeric configuration of the run (JSON).
    config: String,
    /// Names of all the layers of the model, in forward order.
    layers: Vec<String>,
    /// Reports of the finished layers.
    done: Vec<LayerReport>,
}

pub(crate) struct Checkpoint {
    pub dir: PathBuf,
}

fn io(path: &Path, e: impl std::fmt::Display) -> AdaRoundError {
    AdaRoundError::Checkpoint(format!("{}: {e}", path.display()))
}

impl Checkpoint {
    pub fn new(dir: &str) -> Self {
        Self {
            dir: PathBuf::from(dir),
        }
    }

    /// Writes the model and the finished layers; the progress file goes last (atomically),
    /// so an interrupted write leaves the previous checkpoint valid.
    pub fn save<B: Backend, M: Module<B>>(
        &self,
        model: &M,
        done: &[LayerReport],
        layers: &[String],
        config: &AdaRoundConfig,
    ) -> Result<(), AdaRoundError> {
        std::fs::create_dir_all(&self.dir).map_err(|e| io(&self.dir, e))?;
        let recorder = BinFileRecorder::<FullPrecisionSettings>::new();
        let model_path = self.dir.join(MODEL);
        model
            .clone()
            .save_file(&model_path, &recorder)
            .map_err(|e| io(&model_path, e))?;
        let progress = Progress {
            config: config.numerics(),
            layers: layers.to_vec(),
            done: done.to_vec(),
        };
        let json = serde_json::to_string_pretty(&progress).expect("reports serialize");
        let tmp = self.dir.join(format!("{PROGRESS}.tmp"));
        std::fs::write(&tmp, json).map_err(|e| io(&tmp, e))?;
        let path = self.dir.join(PROGRESS);
        std::fs::rename(&tmp, &path).map_err(|e| io(&path, e))
    }

    /// The model and finished layers of a previous run, if the folder holds a checkpoint.
    pub fn resume<B: Backend, M: Module<B>>(
        &self,
        model: M,
        layers: &[String],
        config: &AdaRoundConfig,
        device: &B::Device,
    ) -> Result<Option<(M, Vec<LayerReport>)>, AdaRoundError> {
        let path = self.dir.join(PROGRESS);
        if !path.exists() {
            return Ok(None);
        }
        let text = std::fs::read_to_string(&path).map_err(|e| io(&path, e))?;
        let progress: Progress = serde_json::from_str(&text).map_err(|e| io(&path, e))?;
        if progress.config != config.numerics() {
            return Err(AdaRoundError::Checkpoint(format!(
                "{} was written with another configuration",
                path.display()
            )));
        }
        if progress.layers != layers {
            return Err(AdaRoundError::Checkpoint(format!(
                "{} was written for a model with layers {:?}, not {:?}",
                path.display(),
                progress.layers,
                layers
            )));
        }
        let recorder = BinFileRecorder::<FullPrecisionSettings>::new();
        let model_path = self.dir.join(MODEL);
        let model = model
            .load_file(&model_path, &recorder, device)
            .map_err(|e| io(&model_path, e))?;
        Ok(Some((model, progress.done)))
    }
}
