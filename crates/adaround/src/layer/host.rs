//! The fused step's elementwise work in host memory: one pass before the matrix product and
//! one after, split over the threads of rayon's pool.
//!
//! On a CPU backend each tensor operation is a pass over all weights with a fresh buffer, and
//! the transcendental ones (the sigmoid's `exp`, the rounding loss's power) call the C
//! library once per weight on one core: on a large Dense layer the ~30 operations cost more
//! than the step's matrix product. Here they are two loops over `f32` slices, without
//! branches, with `exp` and `ln` as polynomials (Cephes' `expf` and `logf`, within a few
//! units in the last place) so that the compiler vectorizes them. The matrix product and the
//! optimizer stay on the backend; the weights cross between the two as `TensorData`, which on
//! a CPU backend is a copy.
//!
//! The host-resident step ([`crate::Elementwise::Resident`]) adds the rest of a step here:
//! the matrix products ([`matmul_into`], the `gemm` crate) and Burn's Adam ([`Adam`]), so
//! that no backend operation runs between log points.
//!
//! The formulas are those of the fused step (`fused.rs`); the two agree to floating-point rounding
//! (tested).

use adaround_core::{Decimals, Numeric, Rounding};

/// Below this many weights per thread the work runs on the calling thread.
const MIN_PER_THREAD: usize = 1 << 14;

/// The constants of one kernel, in the fused step's matrix layout, one value per weight.
pub(crate) struct Kernel {
    pub w_floor: Vec<f32>,
    pub inv_sf: Vec<f32>,
    pub weight: Vec<f32>,
    /// `o / sf`, what the asymmetric grid's offsets add to `W~` (`None`: centred grids).
    pub shift: Option<Vec<f32>>,
    /// The grid's lowest and highest integer levels.
    pub levels: (f32, f32),
    /// The rectified sigmoid's stretch.
    pub rounding: Rounding,
}

/// What the first pass leaves for the second: per weight, `grad = a * dL/dW~ + c`.
pub(crate) struct Coefficients {
    a: Vec<f32>,
    c: Vec<f32>,
}

/// The settings of one step's first pass.
#[derive(Clone, Copy)]
pub(crate) struct Pass {
    /// The rounding loss's exponent, `None` in the warm start.
    pub beta: Option<f64>,
    /// The rounding loss's weight.
    pub reg: f64,
    /// The reconstruction loss's divisor.
    pub n: f64,
    /// Send `W~ - W` (the Gram path) rather than `W~` (the direct path).
    pub difference: bool,
}

/// The polynomial with coefficients `c` (highest degree first) at `x`.
#[inline(always)]
fn horner(c: &[f32], x: f32) -> f32 {
    c[1..].iter().fold(c[0], |p, &c| p * x + c)
}

/// `e^x` (Cephes `expf`); `x` is clamped to `[-87, 88]`, where `2^k` stays a normal float.
#[inline(always)]
fn exp(x: f32) -> f32 {
    // Adding 1.5 * 2^23 rounds to an integer, read back from the bits.
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.0, 88.0);
    let shifted = x * std::f32::consts::LOG2_E + ROUND;
    let n = shifted - ROUND;
    let k = shifted.to_bits() as i32 - ROUND.to_bits() as i32;
    let r = x - n * 0.693_359_4 - n * -2.121_944_4e-4;
    let p = horner(
        &[
            1.987_569_1e-4,
            1.398_199_9e-3,
            8.333_452e-3,
            4.166_579_6e-2,
            1.666_666_5e-1,
            0.5,
        ],
        r,
    );
    let e = p * r * r + r + 1.0;
    e * f32::from_bits(((k + 127) as u32) << 23)
}

/// `ln x` (Cephes `logf`) for a normal `x > 0`.
#[inline(always)]
fn ln(x: f32) -> f32 {
    let bits = x.to_bits();
    let e = ((bits >> 23) & 0xff) as i32 - 127;
    let m = f32::from_bits((bits & 0x007f_ffff) | 0x3f80_0000);
    // The mantissa in [sqrt(1/2), sqrt(2)).
    let big = m > std::f32::consts::SQRT_2;
    let m = if big { m * 0.5 } else { m };
    let e = (e + i32::from(big)) as f32;
    let f = m - 1.0;
    let z = f * f;
    let poly = horner(
        &[
            7.037_683_6e-2,
            -1.151_461e-1,
            1.167_699_9e-1,
            -1.242_014_1e-1,
            1.424_932_3e-1,
            -1.666_805_8e-1,
            2.000_071_4e-1,
            -2.499_999_4e-1,
            3.333_333e-1,
        ],
        f,
    );
    let y = f * z * poly + e * -2.121_944_4e-4 - 0.5 * z;
    f + y + e * 0.693_359_4
}

/// `a^e` for `a >= 0` and `e >= 0` (`0^0 = 1`).
#[inline(always)]
fn power(a: f32, e: f32) -> f32 {
    let p = exp(e * ln(a.max(f32::MIN_POSITIVE)));
    let at_zero = if e == 0.0 { 1.0 } else { 0.0 };
    if a < f32::MIN_POSITIVE {
        at_zero
    } else {
        p
    }
}

/// `-1`, `0` or `1` by the sign of `t` (Burn's `sign`).
#[inline(always)]
fn sign(t: f32) -> f32 {
    let s = if t > 0.0 { 1.0 } else { -1.0 };
    if t == 0.0 {
        0.0
    } else {
        s
    }
}

/// Runs `f(offset, chunks)` over equal chunks of the `N` slices (all of one length), one
/// per thread of rayon's pool (the calling thread alone where the work is small).
fn split<const N: usize, F>(slices: [&mut [f32]; N], f: F)
where
    F: Fn(usize, [&mut [f32]; N]) + Sync,
{
    let len = slices[0].len();
    let threads = rayon::current_num_threads()
        .min(len / MIN_PER_THREAD)
        .max(1);
    if threads == 1 {
        return f(0, slices);
    }
    let size = len.div_ceil(threads);
    let mut rest = slices;
    let mut parts = Vec::with_capacity(threads);
    let mut at = 0;
    while at < len {
        let take = size.min(len - at);
        let mut part: [&mut [f32]; N] = [(); N].map(|_| Default::default());
        for (head, tail) in part.iter_mut().zip(rest.iter_mut()) {
            let (h, t) = std::mem::take(tail).split_at_mut(take);
            (*head, *tail) = (h, t);
        }
        parts.push((at, part));
        at += take;
    }
    let f = &f;
    rayon::scope(|scope| {
        for (at, part) in parts {
            scope.spawn(move |_| f(at, part));
        }
    });
}

/// The per-step constants of the first pass.
struct Factors {
    rounding: Rounding,
    levels: (f32, f32),
    scale: f32,
    slope: f32,
    /// The rounding loss's exponent (1 where `slope` is 0: any finite power).
    beta: f64,
    /// 1 to send `W~ - W`, 0 to send `W~`.
    subtract: f32,
}

/// The first pass on one chunk: `[alpha, w_floor, 1 / sf, W]` in, `[sent, a, c]` out. On
/// x86-64 with AVX2 and FMA the same loop compiled for them (8 lanes instead of 4); the
/// results are the same (no operation is fused).
fn forward_chunk(factors: &Factors, constants: [&[f32]; 4], outputs: [&mut [f32]; 3]) {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
        // SAFETY: the CPU has the features the function is compiled for (checked above).
        return unsafe { forward_chunk_avx2(factors, constants, outputs) };
    }
    forward_loop(factors, constants, outputs);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn forward_chunk_avx2(factors: &Factors, constants: [&[f32]; 4], outputs: [&mut [f32]; 3]) {
    forward_loop(factors, constants, outputs);
}

/// The loop of [`forward_chunk`]: no branches and no bounds checks inside, so that it
/// vectorizes (selects instead of `if`, `&` instead of `&&`).
#[inline(always)]
fn forward_loop(factors: &Factors, constants: [&[f32]; 4], outputs: [&mut [f32]; 3]) {
    let [send, a, c] = outputs;
    let len = send.len();
    let (a, c) = (&mut a[..len], &mut c[..len]);
    let [alpha, w_floor, inv_sf, weight] = constants.map(|x| &x[..len]);
    let (lo, hi) = factors.levels;
    for i in 0..len {
        let Decimals { s, u, h } = factors.rounding.decimals(Fast(alpha[i]));
        let (s, u, h) = (s.0, u.0, h.0);
        let z = w_floor[i] + h;
        let soft = z.max(lo).min(hi) * inv_sf[i];
        send[i] = soft - weight[i] * factors.subtract;
        let k = if u == h {
            (s - s * s) * factors.scale
        } else {
            0.0
        };
        a[i] = if (z >= lo) & (z <= hi) {
            k * inv_sf[i]
        } else {
            0.0
        };
        c[i] = -k * factors.slope * Rounding::regulariser_slope(Fast(h), factors.beta).0;
    }
}

/// A number of the host loops: [`Numeric`] with this module's vectorizable `exp` and power.
#[derive(Clone, Copy)]
struct Fast(f32);

impl Numeric for Fast {
    #[inline(always)]
    fn scale(self, v: f64) -> Self {
        Fast(self.0 * v as f32)
    }

    #[inline(always)]
    fn shift(self, v: f64) -> Self {
        Fast(self.0 + v as f32)
    }

    #[inline(always)]
    fn times(self, other: Self) -> Self {
        Fast(self.0 * other.0)
    }

    #[inline(always)]
    fn logistic(self) -> Self {
        Fast(1.0 / (1.0 + exp(-self.0)))
    }

    #[inline(always)]
    fn clip(self, lo: f64, hi: f64) -> Self {
        Fast(self.0.max(lo as f32).min(hi as f32))
    }

    #[inline(always)]
    fn magnitude(self) -> Self {
        Fast(self.0.abs())
    }

    #[inline(always)]
    fn power(self, e: f64) -> Self {
        Fast(power(self.0, e as f32))
    }

    #[inline(always)]
    fn signum(self) -> Self {
        Fast(sign(self.0))
    }
}

impl Kernel {
    /// The first pass on `alpha`: the matrix to multiply (`W~ - W` or `W~`) and the
    /// coefficients of the gradient.
    pub(crate) fn forward(&self, alpha: &[f32], pass: Pass) -> (Vec<f32>, Coefficients) {
        let len = alpha.len();
        let (mut send, mut a, mut c) = (vec![0f32; len], vec![0f32; len], vec![0f32; len]);
        // d/dh of the rounding loss is `-beta reg |t|^(beta-1) sign(t)`, `t = 2h - 1`; the
        // chain through `u = s (zeta - gamma) + gamma` and the final `2 / n` factor (the
        // gradient of W~ comes in as `n / 2` times itself) are folded into `a` and `c`.
        let scale = (2.0 / pass.n * self.rounding.stretch()) as f32;
        let beta = pass.beta.filter(|&b| b != 0.0);
        let slope = beta.map_or(0.0, |b| (b * pass.reg * pass.n) as f32);
        let factors = Factors {
            rounding: self.rounding,
            levels: self.levels,
            scale,
            slope,
            beta: beta.unwrap_or(1.0),
            subtract: if pass.difference { 1.0 } else { 0.0 },
        };
        split([&mut send, &mut a, &mut c], |at, [send, a, c]| {
            let end = at + send.len();
            let constants = [
                &alpha[at..end],
                &self.w_floor[at..end],
                &self.inv_sf[at..end],
                &self.weight[at..end],
            ];
            forward_chunk(&factors, constants, [send, a, c]);
            if let Some(shift) = &self.shift {
                for (sent, shift) in send.iter_mut().zip(&shift[at..end]) {
                    *sent += shift;
                }
            }
        });
        (send, Coefficients { a, c })
    }

    /// The rounding loss `reg * sum(1 - |2h - 1|^beta)` at `alpha`.
    pub(crate) fn rounding_loss(&self, alpha: &[f32], beta: f64, reg: f64) -> f64 {
        let sum: f64 = alpha
            .iter()
            .map(|&x| {
                let h = self.rounding.decimals(Fast(x)).h;
                f64::from(Rounding::regulariser(h, beta).0)
            })
            .sum();
        reg * sum
    }
}

impl Coefficients {
    /// The second pass: the gradient with respect to alpha, in place of `grad_w`, the
    /// gradient with respect to W~ (times `n / 2`).
    pub(crate) fn backward(&self, mut grad_w: Vec<f32>) -> Vec<f32> {
        let (a, c) = (&self.a, &self.c);
        split([&mut grad_w], |at, [g]| {
            let end = at + g.len();
            for ((g, &a), &c) in g.iter_mut().zip(&a[at..end]).zip(&c[at..end]) {
                *g = a * *g + c;
            }
        });
        grad_w
    }
}

/// Matrix products of at least this many multiply-adds split over rayon's threads (as Burn's
/// Flex backend does).
const PARALLEL_PRODUCT: usize = 192 * 192 * 192;

/// A row-major `f32` matrix in host memory: `rows x cols` values, or their transpose when
/// `transposed` (the same values read column by column).
#[derive(Clone, Copy)]
pub(crate) struct View<'a> {
    pub values: &'a [f32],
    pub rows: usize,
    pub cols: usize,
    pub transposed: bool,
}

impl<'a> View<'a> {
    /// `values` as a `rows x cols` row-major matrix.
    pub(crate) fn new(values: &'a [f32], rows: usize, cols: usize) -> Self {
        assert_eq!(values.len(), rows * cols, "a {rows}x{cols} matrix");
        Self {
            values,
            rows,
            cols,
            transposed: false,
        }
    }

    /// The transpose, without copying.
    pub(crate) fn t(self) -> Self {
        Self {
            rows: self.cols,
            cols: self.rows,
            transposed: !self.transposed,
            ..self
        }
    }

    /// `(column stride, row stride)` of the logical matrix.
    fn strides(&self) -> (isize, isize) {
        if self.transposed {
            (self.rows as isize, 1)
        } else {
            (1, self.cols as isize)
        }
    }
}

/// `out = lhs rhs` (`out` row-major, `lhs.rows x rhs.cols`), by the `gemm` crate (the matrix
/// kernels of Burn's Flex backend), on rayon's threads for large products.
pub(crate) fn matmul_into(out: &mut [f32], lhs: View<'_>, rhs: View<'_>) {
    let (m, k, n) = (lhs.rows, lhs.cols, rhs.cols);
    assert_eq!(k, rhs.rows, "inner dimensions");
    assert_eq!(out.len(), m * n, "output size");
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        out.fill(0.0);
        return;
    }
    let parallelism = if m.saturating_mul(n).saturating_mul(k) >= PARALLEL_PRODUCT {
        gemm::Parallelism::Rayon(0)
    } else {
        gemm::Parallelism::None
    };
    let (lhs_cs, lhs_rs) = lhs.strides();
    let (rhs_cs, rhs_rs) = rhs.strides();
    // SAFETY: the three views cover `m x k`, `k x n` and `m x n` values with these strides
    // (checked by the assertions above and in `View::new`), and `out` is not aliased.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            out.as_mut_ptr(),
            1,
            n as isize,
            false,
            lhs.values.as_ptr(),
            lhs_cs,
            lhs_rs,
            rhs.values.as_ptr(),
            rhs_cs,
            rhs_rs,
            0.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        );
    }
}

/// Burn's Adam ([`burn::optim::AdamConfig`]) on a host vector, step for step the same
/// arithmetic in `f32`: moments `m = b1 m + (1 - b1) g`, `v = b2 v + (1 - b2) g²`, and
/// `x -= lr (m c / (sqrt(v) + eps sqrt(1 - b2^t)))` with `c = sqrt(1 - b2^t) / (1 - b1^t)`.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Adam {
    pub beta_1: f32,
    pub beta_2: f32,
    pub epsilon: f32,
    moment_1: Vec<f32>,
    moment_2: Vec<f32>,
    time: i32,
}

impl Adam {
    /// Burn's `AdamConfig::new()`: `beta_1 = 0.9`, `beta_2 = 0.999`, `epsilon = 1e-5`, no
    /// weight decay, no AMSGrad.
    pub(crate) fn burn_default() -> Self {
        Self {
            beta_1: 0.9,
            beta_2: 0.999,
            epsilon: 1e-5,
            moment_1: Vec::new(),
            moment_2: Vec::new(),
            time: 0,
        }
    }

    /// One step on `x` with gradient `grad` and learning rate `lr`.
    pub(crate) fn step(&mut self, lr: f64, x: &mut [f32], grad: &[f32]) {
        if self.time == 0 {
            self.moment_1 = vec![0.0; x.len()];
            self.moment_2 = vec![0.0; x.len()];
        }
        self.time += 1;
        let (b1, b2) = (self.beta_1, self.beta_2);
        let correction_2 = (1.0 - b2.powi(self.time)).sqrt();
        let combined = correction_2 / (1.0 - b1.powi(self.time));
        let eps = self.epsilon * correction_2;
        let lr = lr as f32;
        let (f1, f2) = (1.0 - b1, 1.0 - b2);
        split(
            [x, &mut self.moment_1, &mut self.moment_2],
            |at, [x, m, v]| {
                let g = &grad[at..at + x.len()];
                for (((x, m), v), &g) in x.iter_mut().zip(m.iter_mut()).zip(v.iter_mut()).zip(g) {
                    *m = *m * b1 + g * f1;
                    *v = *v * b2 + g * g * f2;
                    *x -= (*m * combined / (v.sqrt() + eps)) * lr;
                }
            },
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The polynomials against the C library's `exp`, `ln` and `powf`.
    #[test]
    fn exp_ln_and_power_agree_with_the_c_library() {
        let rel = |a: f32, b: f32| ((a - b) / b.abs().max(f32::MIN_POSITIVE)).abs();
        for i in 0..=20_000 {
            let x = -87.0 + 175.0 * i as f32 / 20_000.0;
            assert!(
                rel(exp(x), x.exp()) < 5e-7,
                "exp({x}): {} vs {}",
                exp(x),
                x.exp()
            );
        }
        for i in 1..=20_000 {
            let x = 1e-30f32 * 1.004f32.powi(i * 2);
            assert!(
                (ln(x) - x.ln()).abs() <= 2e-7 * x.ln().abs().max(1.0),
                "ln({x})"
            );
        }
        for e in [0.0f32, 0.5, 1.0, 1.7, 5.3, 19.0] {
            for i in 0..=1000 {
                let a = i as f32 / 1000.0;
                let expected = a.powf(e);
                // `exp(e ln a)`: the error of `ln a` grows with `e ln a`.
                let tolerance = 3e-7 * (e * a.ln()).abs().max(1.0);
                assert!(
                    (power(a, e) - expected).abs() <= tolerance * expected.max(1e-30),
                    "{a}^{e}: {} vs {expected}",
                    power(a, e)
                );
            }
        }
        assert_eq!(power(0.0, 0.0), 1.0);
        assert_eq!(power(0.0, 2.5), 0.0);
        assert!(rel(exp(-1000.0), (-87.0f32).exp()) < 5e-7);
        assert_eq!([sign(-2.0), sign(0.0), sign(3.0)], [-1.0, 0.0, 1.0]);
    }
}
