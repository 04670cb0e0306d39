//! Benchmark: time per AdaRound step, direct vs Gram path, and the quickstart's calibration
//! time (see `adaround_burn::bench`).
//!
//! ```sh
//! cargo run --release --example bench      # table + out/bench/bench.json
//! python3 bench/adaround_step.py           # the same loop in PyTorch (pip install torch)
//! ```

type Backend = burn_autodiff::Autodiff<burn_ndarray::NdArray<f32>>;

fn main() {
    adaround_burn::bench::run::<Backend>(&Default::default(), "Autodiff<NdArray<f32>>");
}
