//! Benchmark: time per AdaRound step, direct vs Gram path, and the quickstart's calibration
//! time (see `adaround_examples::bench`), on Burn's two CPU backends.
//!
//! ```sh
//! cargo run --release --features adaround-examples/flex --example bench [-- --backend ndarray|flex|all]   # tables + out/bench/
//! cargo run --release --features adaround-examples/flex --example bench -- --scaling [--backend ndarray|flex]  # cost against samples, C_out, K
//! cargo run --release -p adaround-examples --features wgpu --example bench -- --backend wgpu
//! cargo run --release -p adaround-examples --features wgpu-fusion --example bench -- --backend wgpu,wgpu-plain
//! (any of these with `--elementwise auto|device|host|resident`: where the fused steps run)
//! cargo run --release --features adaround-examples/flex --example bench -- --quickstart [--backend ndarray|flex|wgpu|wgpu-plain]  # whole model, 3 runs
//! cargo run --release --features adaround-examples/flex --example bench -- --xception [--backend ndarray|flex|wgpu] [--samples 96] [--joint]
//! python3 crates/adaround-examples/benches/adaround_step.py           # the same loop in PyTorch (pip install torch)
//! ```

use adaround::SeparableStep;

type NdArray = burn_ndarray::NdArray<f32>;
type Flex = burn_flex::Flex;
/// Burn's wgpu backend as the features build it (with kernel fusion under `wgpu-fusion`).
#[cfg(feature = "wgpu")]
type Wgpu = burn_wgpu::Wgpu;
/// The wgpu backend without kernel fusion, whatever the features.
#[cfg(feature = "wgpu")]
type WgpuPlain = burn_wgpu::CubeBackend<burn_wgpu::WgpuRuntime, f32, i32, u32>;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let backend = args
        .iter()
        .position(|a| a == "--backend")
        .and_then(|i| args.get(i + 1))
        .map(String::as_str)
        .unwrap_or("all");
    if let Some(place) = args
        .iter()
        .position(|a| a == "--elementwise")
        .and_then(|i| args.get(i + 1))
    {
        let place = match place.as_str() {
            "auto" => adaround::Elementwise::Auto,
            "device" => adaround::Elementwise::Device,
            "host" => adaround::Elementwise::Host,
            "resident" => adaround::Elementwise::Resident,
            other => panic!("--elementwise {other}: auto, device, host or resident"),
        };
        adaround_examples::bench::set_elementwise(place);
    }
    if std::env::var_os("RUST_LOG").is_some() {
        adaround_examples::init_logging();
    }
    if args.iter().any(|a| a == "--quickstart") {
        // The whole quickstart model, three runs in a row: cold, then warm.
        let runs = match backend {
            "ndarray" => {
                adaround_examples::bench::quickstart_runs::<NdArray>(&Default::default(), 3)
            }
            #[cfg(feature = "wgpu")]
            "wgpu" => adaround_examples::bench::quickstart_runs::<Wgpu>(&Default::default(), 3),
            #[cfg(feature = "wgpu")]
            "wgpu-plain" => {
                adaround_examples::bench::quickstart_runs::<WgpuPlain>(&Default::default(), 3)
            }
            _ => adaround_examples::bench::quickstart_runs::<Flex>(&Default::default(), 3),
        };
        let runs: Vec<String> = runs.iter().map(|s| format!("{s:.3}")).collect();
        println!(
            "quickstart model on {backend}, seconds per run (first cold): {}",
            runs.join(" ")
        );
        return;
    }
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
            #[cfg(feature = "wgpu")]
            "wgpu" => drop(adaround_examples::bench::xception::<Wgpu>(
                &Default::default(),
                samples,
                choices,
            )),
            #[cfg(feature = "wgpu")]
            "wgpu-plain" => drop(adaround_examples::bench::xception::<WgpuPlain>(
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
    if args.iter().any(|a| a == "--scaling") {
        // Step time and memory against samples, output channels and K (direct and Gram).
        match backend {
            "ndarray" => drop(adaround_examples::bench::scaling::<NdArray>(
                &Default::default(),
                "NdArray<f32>",
            )),
            _ => drop(adaround_examples::bench::scaling::<Flex>(
                &Default::default(),
                "Flex",
            )),
        }
        return;
    }
    // A comma-separated list: `--backend ndarray,flex`; `all` is the two CPU backends.
    let chosen: Vec<&str> = match backend {
        "all" => vec!["ndarray", "flex"],
        list => list.split(',').collect(),
    };
    for name in chosen {
        match name {
            "ndarray" => {
                println!("## NdArray<f32>\n");
                adaround_examples::bench::run::<NdArray>(&Default::default(), "NdArray<f32>");
            }
            "flex" => {
                println!("\n## Flex\n");
                adaround_examples::bench::run::<Flex>(&Default::default(), "Flex");
            }
            #[cfg(feature = "wgpu")]
            "wgpu" => {
                let fused = cfg!(feature = "wgpu-fusion");
                let label = if fused { "Wgpu fusion" } else { "Wgpu" };
                println!("\n## {label}\n");
                adaround_examples::bench::run::<Wgpu>(&Default::default(), label);
            }
            #[cfg(feature = "wgpu")]
            "wgpu-plain" => {
                println!("\n## Wgpu without fusion\n");
                adaround_examples::bench::run::<WgpuPlain>(&Default::default(), "Wgpu plain");
            }
            other => {
                eprintln!(
                    "unknown backend {other:?}: ndarray, flex, all{}",
                    if cfg!(feature = "wgpu") {
                        ", wgpu, wgpu-plain"
                    } else {
                        " (wgpu needs --features wgpu)"
                    }
                );
                std::process::exit(2);
            }
        }
    }
}
