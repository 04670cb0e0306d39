#!/usr/bin/env bash
# The AdaRound step of this workspace and of PyTorch, on the same layers and shapes, in one
# run on this machine:
#
#     python3 -m pip install torch numpy     # any recent torch
#     bash crates/adaround-examples/benches/side_by_side.sh              # CPU: NdArray, Flex vs PyTorch CPU
#     bash crates/adaround-examples/benches/side_by_side.sh --gpu        # GPU: Wgpu (fusion, plain) vs PyTorch CUDA
#
# Options: --python PY (default python3); --bin PATH, a `bench` binary built beforehand
# (`cargo build --release -p adaround-examples --features flex --example bench`, `--features wgpu-fusion`
# for --gpu), so that no cargo runs here. PyTorch uses as many threads as the machine has cores.
# Prints both tables and the ratios (PyTorch's time over ours); the JSON goes to out/bench/.
set -euo pipefail
bench_dir="$(cd "$(dirname "$0")" && pwd)"
cd "$bench_dir/../../.."
python=python3
bin=""
gpu=0
while [ $# -gt 0 ]; do
    case "$1" in
        --gpu) gpu=1 ;;
        --python) python="$2"; shift ;;
        --bin) bin="$2"; shift ;;
        *) python="$1" ;; # the earlier form: side_by_side.sh PYTHON
    esac
    shift
done
if [ "$gpu" = 1 ]; then
    backends=wgpu,wgpu-plain
    names="wgpufusion wgpuplain"
    device=cuda
    features=(-p adaround-examples --features wgpu-fusion)
else
    backends=ndarray,flex
    names="ndarrayf32 flex"
    device=cpu
    features=(-p adaround-examples --features flex)
fi
if [ -z "$bin" ]; then
    cargo build --release "${features[@]}" --example bench
    bin=./target/release/examples/bench
fi
mkdir -p out/bench
"$bin" --backend "$backends"
"$python" "$bench_dir/adaround_step.py" --threads "$(nproc)" --device "$device" | tee out/bench/torch.txt
tail -n 1 out/bench/torch.txt > "out/bench/bench-torch-$device.json"
NAMES="$names" DEVICE="$device" "$python" - <<'PY'
import json, os
torch_run = json.load(open(f"out/bench/bench-torch-{os.environ['DEVICE']}.json"))
torch = {r["layer"]: r["ms_per_step"] for r in torch_run["steps"]}
print(f"\nPyTorch {torch_run['torch']} on {torch_run['device']}, {torch_run['threads']} threads")
print("\n| layer | backend | path | ms / step | PyTorch ms / step | PyTorch / ours |")
print("|---|---|---|---|---|---|")
for name in os.environ["NAMES"].split():
    rust = json.load(open(f"out/bench/bench-{name}.json"))
    for r in rust["steps"]:
        t = torch.get(r["layer"])
        if t:
            print(f"| {r['layer']} | {rust['backend']} ({rust.get('allocator', 'system')}) | {r['path']} | {r['ms_per_step']:.3f} | {t:.3f} | {t / r['ms_per_step']:.2f}x |")
PY
