//! `cargo bench`: the AdaRound step benchmark (a plain harness; see `adaround_examples::bench`).

type Backend = burn_ndarray::NdArray<f32>;

fn main() {
    // `cargo test --benches` runs this with `--bench` absent: skip the long measurement then.
    if std::env::args().any(|a| a == "--bench") {
        adaround_examples::bench::run::<Backend>(&Default::default(), "NdArray<f32>");
    }
}
