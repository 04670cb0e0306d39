//! Benchmark: time per AdaRound step, direct vs Gram path, and the quickstart's calibration
//! time (see `adaround_burn::bench`), on Burn's two CPU backends.
//!
//! ```sh
//! cargo run --release --example bench [-- --backend ndarray|flex|all]   # tables + out/bench/
//! python3 bench/adaround_step.py           # the same loop in PyTorch (pip install torch)
//! ```

type NdArray = burn_autodiff::Autodiff<burn_ndarray::NdArray<f32>>;
type Flex = burn_autodiff::Autodiff<burn_flex::Flex>;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let backend = args
        .iter()
        .position(|a| a == "--backend")
        .and_then(|i| args.get(i + 1))
        .map(String::as_str)
        .unwrap_or("all");
    if matches!(backend, "ndarray" | "all") {
        println!("## Autodiff<NdArray<f32>>\n");
        adaround_burn::bench::run::<NdArray>(&Default::default(), "Autodiff<NdArray<f32>>");
    }
    if matches!(backend, "flex" | "all") {
        println!("\n## Autodiff<Flex>\n");
        adaround_burn::bench::run::<Flex>(&Default::default(), "Autodiff<Flex>");
    }
    if !matches!(backend, "ndarray" | "flex" | "all") {
        eprintln!("unknown backend {backend:?}: ndarray, flex or all");
        std::process::exit(2);
    }
}
