//! Benchmark: time per AdaRound step, direct vs Gram path, and the quickstart's calibration
//! time (see `adaround_examples::bench`), on Burn's two CPU backends.
//!
//! ```sh
//! cargo run --release --example bench [-- --backend ndarray|flex|all]   # tables + out/bench/
//! cargo run --release --example bench -- --xception [--backend ndarray|flex] [--samples 96] [--joint]
//! python3 crates/adaround-examples/benches/adaround_step.py           # the same loop in PyTorch (pip install torch)
//! ```

use adaround::SeparableStep;

type NdArray = burn_ndarray::NdArray<f32>;
type Flex = burn_flex::Flex;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let backend = args
        .iter()
        .position(|a| a == "--backend")
        .and_then(|i| args.get(i + 1))
        .map(String::as_str)
        .unwrap_or("all");
    if args.iter().any(|a| a == "--xception") {
        // The mini-XCEPTION-size model, per-layer times (`--samples N`, default 96).
        let samples = args
            .iter()
            .position(|a| a == "--samples")
            .and_then(|i| args.get(i + 1))
            .map_or(96, |s| s.parse().expect("--samples N"));
        let both = [SeparableStep::Split, SeparableStep::Joint];
        let choices: &[SeparableStep] = if args.iter().any(|a| a == "--joint") {
            &both
        } else {
            &both[..1]
        };
        match backend {
            "ndarray" => drop(adaround_examples::bench::xception::<NdArray>(
                &Default::default(),
                samples,
                choices,
            )),
            _ => drop(adaround_examples::bench::xception::<Flex>(
                &Default::default(),
                samples,
                choices,
            )),
        }
        return;
    }
    if matches!(backend, "ndarray" | "all") {
        println!("## NdArray<f32>\n");
        adaround_examples::bench::run::<NdArray>(&Default::default(), "NdArray<f32>");
    }
    if matches!(backend, "flex" | "all") {
        println!("\n## Flex\n");
        adaround_examples::bench::run::<Flex>(&Default::default(), "Flex");
    }
    if !matches!(backend, "ndarray" | "flex" | "all") {
        eprintln!("unknown backend {backend:?}: ndarray, flex or all");
        std::process::exit(2);
    }
}
