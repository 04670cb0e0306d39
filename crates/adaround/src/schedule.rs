use serde::{Deserialize, Serialize};

use adaround_core::AdaRoundParams;

/// How the rounding-loss exponent `beta` decays from `BETA_START` to `BETA_END`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum BetaDecay {
    /// `end + (start - end) * 0.5 * (1 + cos(pi * t))` (cnn2snn, AIMET).
    Cosine,
    /// `end + (start - end) * (1 - t)` (BRECQ).
    Linear,
}

impl BetaDecay {
    /// `beta` at relative progress `t` in `[0, 1]`.
    pub fn beta(self, t: f64, params: &AdaRoundParams) -> f64 {
        let (start, end) = (params.beta_start, params.beta_end);
        let decay = match self {
            Self::Cosine => 0.5 * (1.0 + (core::f64::consts::PI * t).cos()),
            Self::Linear => 1.0 - t,
        };
        end + (start - end) * decay
    }
}

/// The optimisation schedule of one layer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Schedule {
    /// cnn2snn: `epochs` passes over all batches; `beta` is set per epoch with a cosine decay
    /// and no warm start; the layer stops early once every weight is rounded.
    Epochs {
        /// Maximum number of epochs.
        epochs: usize,
    },
    /// AIMET / BRECQ: `iterations` optimizer steps cycling over the batches; no rounding loss
    /// during the first `warm_start` fraction, then `beta` decays over the rest.
    Iterations {
        /// Number of optimizer steps.
        iterations: usize,
        /// Fraction of the iterations without rounding loss, in `[0, 1)`.
        warm_start: f64,
        /// Decay of `beta` after the warm start.
        decay: BetaDecay,
    },
}

impl Schedule {
    /// The reference (cnn2snn) schedule: per-epoch cosine `beta`, no warm start.
    pub fn epochs(epochs: usize) -> Self {
        Self::Epochs { epochs }
    }

    /// AIMET's defaults: 10 000 iterations, 20 % warm start, cosine decay (AIMET uses 15 000
    /// below 8 bits; pass [`Schedule::Iterations`] to choose).
    pub fn aimet() -> Self {
        Self::warm_cosine(10_000)
    }

    /// AIMET's shape with `iterations` steps: 20 % warm start, then cosine decay
    /// ([`Schedule::aimet`] is `warm_cosine(10_000)`).
    pub fn warm_cosine(iterations: usize) -> Self {
        Self::Iterations {
            iterations,
            warm_start: 0.2,
            decay: BetaDecay::Cosine,
        }
    }

    /// BRECQ's schedule: 20 % warm start, then linear decay.
    pub fn brecq(iterations: usize) -> Self {
        Self::Iterations {
            iterations,
            warm_start: 0.2,
            decay: BetaDecay::Linear,
        }
    }

    /// The number of epochs or iterations (the budget of the schedule).
    pub fn length(&self) -> usize {
        match *self {
            Self::Epochs { epochs } => epochs,
            Self::Iterations { iterations, .. } => iterations,
        }
    }

    /// `beta` for epoch or iteration `step` (`0`-based); `None` means no rounding loss
    /// (warm start).
    ///
    /// Epochs: `beta = BETA_END + (BETA_START - BETA_END) * 0.5 * (1 + cos(pi * e / epochs))`.
    pub fn beta(&self, step: usize, params: &AdaRoundParams) -> Option<f64> {
        match *self {
            Self::Epochs { epochs } => {
                Some(BetaDecay::Cosine.beta(step as f64 / epochs.max(1) as f64, params))
            }
            Self::Iterations {
                iterations,
                warm_start,
                decay,
            } => {
                let warm = (warm_start * iterations as f64).round() as usize;
                if step < warm {
                    return None;
                }
                let span = iterations.saturating_sub(warm).max(1) as f64;
                Some(decay.beta((step - warm) as f64 / span, params))
            }
        }
    }

    /// Checks that the schedule has at least one step and a warm start in `[0, 1)`.
    pub fn validate(&self) -> Result<(), String> {
        match *self {
            Self::Epochs { epochs: 0 } => Err("the schedule has zero epochs".into()),
            Self::Iterations { iterations: 0, .. } => {
                Err("the schedule has zero iterations".into())
            }
            Self::Iterations { warm_start, .. } if !(0.0..1.0).contains(&warm_start) => {
                Err(format!("warm_start must be in [0, 1), got {warm_start}"))
            }
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // import numpy as np; e = np.arange(4); 2 + 18 * 0.5 * (1 + np.cos(np.pi * e / 4))
    // -> [20, 17.363961, 11, 4.636039]
    #[test]
    fn should_anneal_beta_like_the_references() {
        let p = AdaRoundParams::new();
        let betas: Vec<f64> = (0..4)
            .map(|e| Schedule::epochs(4).beta(e, &p).unwrap())
            .collect();
        for (got, want) in betas.iter().zip([20.0, 17.363961, 11.0, 4.636039]) {
            assert!((got - want).abs() < 1e-5, "{betas:?}");
        }
        let aimet = Schedule::aimet();
        assert_eq!(aimet.beta(1999, &p), None, "warm start: no rounding loss");
        assert!((aimet.beta(2000, &p).unwrap() - 20.0).abs() < 1e-12);
        assert!((aimet.beta(6000, &p).unwrap() - 11.0).abs() < 1e-9);
        let brecq = Schedule::brecq(100);
        assert!((brecq.beta(60, &p).unwrap() - 11.0).abs() < 1e-9);
        assert!(Schedule::epochs(0).validate().is_err());
        let json = serde_json::to_string(&aimet).unwrap();
        assert_eq!(serde_json::from_str::<Schedule>(&json).unwrap(), aimet);
    }
}
