//! AdaRound's rounding math, defined once: the rectified sigmoid that turns `alpha` into the
//! decimals `h` added to the floor of each weight, and the regulariser that pushes `h` to 0
//! or 1 ([Nagel et al. 2020](https://arxiv.org/abs/2004.10568), eq. 23 and 24). The same
//! definitions run on Burn tensors (the quantizer, the autodiff and fused steps) and on
//! `f32` (the fused step's host loops, which bring their own vectorizable `exp` and power)
//! through [`Numeric`].

use burn::tensor::{backend::Backend, Tensor};

/// The arithmetic the rounding math needs: a Burn tensor, or a number in a host loop.
pub trait Numeric: Clone {
    /// `self * v`.
    fn scale(self, v: f64) -> Self;
    /// `self + v`.
    fn shift(self, v: f64) -> Self;
    /// `self * other`, elementwise.
    fn times(self, other: Self) -> Self;
    /// The logistic function `1 / (1 + exp(-x))`, with an exact division.
    fn logistic(self) -> Self;
    /// `self` clipped to `[lo, hi]`.
    fn clip(self, lo: f64, hi: f64) -> Self;
    /// `|self|`.
    fn magnitude(self) -> Self;
    /// `self^e` for `self >= 0`.
    fn power(self, e: f64) -> Self;
    /// `-1`, `0` or `1`.
    fn signum(self) -> Self;
}

impl<B: Backend, const D: usize> Numeric for Tensor<B, D> {
    fn scale(self, v: f64) -> Self {
        self.mul_scalar(v)
    }

    fn shift(self, v: f64) -> Self {
        self.add_scalar(v)
    }

    fn times(self, other: Self) -> Self {
        self * other
    }

    fn logistic(self) -> Self {
        // Burn's generic `sigmoid` goes through exp(-log(1 + exp(-x))) and `recip()` may be
        // approximate; the init identity `h(alpha) == d` needs full f32 precision.
        let denom = self.neg().exp().add_scalar(1.0);
        denom.ones_like() / denom
    }

    fn clip(self, lo: f64, hi: f64) -> Self {
        self.clamp(lo, hi)
    }

    fn magnitude(self) -> Self {
        self.abs()
    }

    fn power(self, e: f64) -> Self {
        self.powf_scalar(e)
    }

    fn signum(self) -> Self {
        self.sign()
    }
}

/// The rectified sigmoid's stretch: `h(alpha) = clip(sigmoid(alpha) (zeta - gamma) + gamma,
/// 0, 1)`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Rounding {
    /// Lower stretch, `GAMMA` (-0.1 in the paper).
    pub gamma: f64,
    /// Upper stretch, `ZETA` (1.1 in the paper).
    pub zeta: f64,
}

/// The rectified sigmoid at `alpha`: the logistic, its stretch and the decimals.
#[derive(Clone, Debug)]
pub struct Decimals<T> {
    /// `s = sigmoid(alpha)`.
    pub s: T,
    /// `u = s (zeta - gamma) + gamma`, before the clip.
    pub u: T,
    /// `h = clip(u, 0, 1)`.
    pub h: T,
}

impl Rounding {
    /// The rectified sigmoid at `alpha`.
    #[inline(always)]
    pub fn decimals<T: Numeric>(&self, alpha: T) -> Decimals<T> {
        let s = alpha.logistic();
        let u = s.clone().scale(self.zeta - self.gamma).shift(self.gamma);
        let h = u.clone().clip(0.0, 1.0);
        Decimals { s, u, h }
    }

    /// `dh/dalpha` where `h` is not clipped: `(zeta - gamma) s (1 - s)`, without the factor
    /// `s (1 - s)` (the caller has `s`): `zeta - gamma`.
    #[inline(always)]
    pub fn stretch(&self) -> f64 {
        self.zeta - self.gamma
    }

    /// The `alpha` whose decimals are `d` (in `(0, 1)`): `-ln((zeta - gamma) / (d - gamma) -
    /// 1)`, the inverse of [`decimals`](Self::decimals) (exact divisions).
    pub fn alpha_of<B: Backend, const D: usize>(&self, d: Tensor<B, D>) -> Tensor<B, D> {
        let ratio = d.ones_like().mul_scalar(self.stretch()) / d.sub_scalar(self.gamma);
        ratio.sub_scalar(1.0).log().neg()
    }

    /// The regulariser of one weight with decimals `h`: `1 - |2h - 1|^beta`, 1 at `h = 0.5`
    /// and 0 at `h` in `{0, 1}`. Summed over the weights and weighted, the rounding loss.
    #[inline(always)]
    pub fn regulariser<T: Numeric>(h: T, beta: f64) -> T {
        h.scale(2.0)
            .shift(-1.0)
            .magnitude()
            .power(beta)
            .scale(-1.0)
            .shift(1.0)
    }

    /// The regulariser's derivative in `h`, divided by `-2 beta`: `|2h - 1|^(beta - 1)
    /// sign(2h - 1)`.
    #[inline(always)]
    pub fn regulariser_slope<T: Numeric>(h: T, beta: f64) -> T {
        let t = h.scale(2.0).shift(-1.0);
        t.clone().magnitude().power(beta - 1.0).times(t.signum())
    }
}
