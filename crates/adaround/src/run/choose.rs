//! Choosing how to round a model on held-out samples ([`AdaRound::run_choosing`]): each
//! candidate (layer-wise AdaRound, block reconstruction, GPTQ, on the quantizer's scales or
//! SeqMSE's) runs in full, and the one whose outputs on the validation samples are closest to
//! the float model's is returned.
//!
//! [`AdaRound::run_choosing`]: crate::AdaRound::run_choosing

use serde::{Deserialize, Serialize};

use crate::{AdaRoundConfig, RoundingMethod, ScaleSearch};

/// A way to round a model that [`AdaRound::run_choosing`](crate::AdaRound::run_choosing)
/// tries: a configuration, run layer by layer or with block reconstruction.
#[derive(Clone, Debug)]
pub struct Candidate {
    /// Its name in the [`MethodChoice`].
    pub name: String,
    /// The configuration of its run.
    pub config: AdaRoundConfig,
    /// With block reconstruction over the blocks given to
    /// [`AdaRound::with_blocks`](crate::AdaRound::with_blocks) (an error without them).
    pub blocks: bool,
}

impl Candidate {
    /// The candidate `name`: `config`, layer by layer.
    pub fn new(name: impl Into<String>, config: AdaRoundConfig) -> Self {
        Self {
            name: name.into(),
            config,
            blocks: false,
        }
    }

    /// This candidate with block reconstruction.
    pub fn with_block_reconstruction(mut self) -> Self {
        self.blocks = true;
        self
    }

    /// The rounding methods on `config`: AdaRound layer by layer (`config` as given), GPTQ,
    /// and with `blocks` block reconstruction; each on the quantizer's own scales and on
    /// SeqMSE's ([`ScaleSearch`]). Five or three candidates; the run costs their sum.
    pub fn methods(config: &AdaRoundConfig, blocks: bool) -> Vec<Self> {
        let seqmse = || config.clone().with_scale_search(ScaleSearch::SeqMse);
        let gptq = |c: AdaRoundConfig| c.with_method(RoundingMethod::Gptq);
        let mut all = vec![
            Self::new("AdaRound", config.clone()),
            Self::new("GPTQ", gptq(config.clone())),
            Self::new("SeqMSE + AdaRound", seqmse()),
            Self::new("SeqMSE + GPTQ", gptq(seqmse())),
        ];
        if blocks {
            all.push(Self::new("block reconstruction", config.clone()).with_block_reconstruction());
            all.push(
                Self::new("SeqMSE + block reconstruction", seqmse()).with_block_reconstruction(),
            );
        }
        all
    }
}

/// One candidate's outcome in a [`MethodChoice`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CandidateScore {
    /// The candidate's name.
    pub name: String,
    /// Mean squared error of the rounded model's outputs against the float model's on the
    /// validation samples (over every output value, as the model check's).
    pub validation_error: f64,
    /// Seconds its run took.
    pub seconds: f64,
}

/// What [`AdaRound::run_choosing`](crate::AdaRound::run_choosing) measured, and what it chose.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MethodChoice {
    /// Nearest rounding's validation error (the caller's model).
    pub nearest_error: f64,
    /// Every candidate, in the order given.
    pub candidates: Vec<CandidateScore>,
    /// The index of the one returned: the lowest validation error (the first on a tie).
    pub chosen: usize,
}

impl MethodChoice {
    /// The chosen candidate's score.
    pub fn chosen(&self) -> &CandidateScore {
        &self.candidates[self.chosen]
    }
}

impl std::fmt::Display for MethodChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "validation output error against the float model (nearest rounding {:.4e}):",
            self.nearest_error
        )?;
        for (i, c) in self.candidates.iter().enumerate() {
            let mark = if i == self.chosen { "  <- chosen" } else { "" };
            writeln!(
                f,
                "  {:<32} {:.4e} in {:.0} s{mark}",
                c.name, c.validation_error, c.seconds
            )?;
        }
        write!(
            f,
            "chosen: {} (the lowest validation error)",
            self.chosen().name
        )
    }
}
