#!/usr/bin/env bash
# The AdaRound step of this workspace (NdArray and Flex backends) and of PyTorch, on the same
# layers and shapes, in one run on this machine:
#
#     python3 -m pip install torch numpy     # any recent torch; only the CPU is used
#     bash crates/adaround-examples/benches/side_by_side.sh [python]
#
# Prints both tables and the ratios; the JSON goes to out/bench/.
set -euo pipefail
cd "$(dirname "$0")/../../.."
bench_dir=crates/adaround-examples/benches
python="${1:-python3}"
cargo build --release --example bench
mkdir -p out/bench
./target/release/examples/bench --backend all
"$python" "$bench_dir/adaround_step.py" --threads "$(nproc)" | tee out/bench/torch.txt
tail -n 1 out/bench/torch.txt > out/bench/bench-torch.json
"$python" - <<'PY'
import json
torch = {r["layer"]: r["ms_per_step"] for r in json.load(open("out/bench/bench-torch.json"))["steps"]}
print("\n| layer | backend | path | ms / step | PyTorch ms / step | PyTorch / ours |")
print("|---|---|---|---|---|---|")
for name in ["ndarrayf32", "flex"]:
    rust = json.load(open(f"out/bench/bench-{name}.json"))
    for r in rust["steps"]:
        t = torch.get(r["layer"])
        if t:
            print(f"| {r['layer']} | {rust['backend']} | {r['path']} | {r['ms_per_step']:.3f} | {t:.3f} | {t / r['ms_per_step']:.1f}x |")
PY
