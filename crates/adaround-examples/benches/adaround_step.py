"""The AdaRound step in PyTorch (what AIMET runs per step), on the shapes of `examples/bench.rs`.

    pip install torch
    python3 crates/adaround-examples/benches/adaround_step.py [--threads 2] [--device cpu|cuda]

A step: soft weights from alpha (rectified sigmoid), forward, MSE to the float output,
rounding loss (beta = 20), backward, Adam on alpha. Prints ms per step and a JSON line.
Not part of CI.
"""
import argparse
import json
import math
import time

import torch
import torch.nn.functional as F

GAMMA, ZETA, REG = -0.1, 1.1, 0.01


def adaround_setup(w, kmax, axis):
    dims = [d for d in range(w.dim()) if d != axis]
    sf = kmax / w.abs().amax(dim=dims, keepdim=True).clamp_min(1e-10)
    scaled = w * sf
    w_floor = scaled.floor()
    d = scaled - w_floor
    alpha = (-torch.log((ZETA - GAMMA) / (d - GAMMA) - 1)).requires_grad_(True)
    return sf, w_floor, alpha


def soft(alpha, w_floor, sf, kmax):
    h = (torch.sigmoid(alpha) * (ZETA - GAMMA) + GAMMA).clamp(0, 1)
    return (w_floor + h).clamp(-kmax, kmax) / sf, h


def time_steps(step, sync=lambda: None, seconds=1.5):
    """Seconds per step: 20 warm-up steps, then about `seconds` of steps (at least 100),
    the faster of two measurements (as the Rust benchmark)."""

    def run(n):
        sync()
        start = time.perf_counter()
        for _ in range(n):
            step()
        sync()
        return time.perf_counter() - start

    estimate = run(20) / 20
    n = min(max(int(seconds / estimate), 100), 5000)
    return min(run(n), run(n)) / n


def bench(name, weights, forward, x, device, kmax=7):
    params = []
    for w, axis in weights:
        sf, w_floor, alpha = adaround_setup(w, kmax, axis)
        params.append((sf, w_floor, alpha))
    with torch.no_grad():
        target = forward([w for w, _ in weights], x)
    opt = torch.optim.Adam([p[2] for p in params], lr=1e-3)

    def step():
        opt.zero_grad(set_to_none=True)
        ws, r_loss = [], 0.0
        for sf, w_floor, alpha in params:
            w, h = soft(alpha, w_floor, sf, kmax)
            ws.append(w)
            r_loss = r_loss + (1 - (2 * h - 1).abs().pow(20)).sum()
        loss = F.mse_loss(forward(ws, x), target) + REG * r_loss
        loss.backward()
        opt.step()

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    s = time_steps(step, sync=sync)
    print(f"| {name} | torch {device} | {s * 1e3:.3f} |")
    return {"layer": name, "ms_per_step": s * 1e3}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(1)
    dev = args.device
    rows = []
    print("| layer | path | ms / step |\n|---|---|---|")
    w = torch.randn(512, 512, device=dev) / math.sqrt(512)
    x = torch.randn(1024, 512, device=dev)
    rows.append(bench("Dense 512->512, 1024 samples", [(w, 0)], lambda ws, x: F.linear(x, ws[0]), x, dev))
    w = torch.randn(32, 32, 3, 3, device=dev) / math.sqrt(288)
    maps = torch.randn(32, 32, 16, 16, device=dev)
    rows.append(bench("Conv2D 32->32 3x3, 16x16, batch 32", [(w, 0)],
                      lambda ws, x: F.conv2d(x, ws[0], padding=1), maps, dev))
    dw = torch.randn(32, 1, 3, 3, device=dev) / 3
    pw = torch.randn(64, 32, 1, 1, device=dev) / math.sqrt(32)
    rows.append(bench("SeparableConv2D 32->64 3x3, 16x16, batch 32", [(dw, 0), (pw, 0)],
                      lambda ws, x: F.conv2d(F.conv2d(x, ws[0], padding=1, groups=32), ws[1]), maps, dev))
    print(json.dumps({"torch": torch.__version__, "device": dev, "threads": args.threads, "steps": rows}))


if __name__ == "__main__":
    main()
