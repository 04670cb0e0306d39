#!/usr/bin/env python3
"""Loads the `efficientnet` example's export into the unmodified PyTorch EfficientNet-Lite0 and
compares its predictions with the Rust rounded model's, crop by crop:

    .venv/bin/pip install torch safetensors efficientnet-lite-pytorch==0.1.0
    .venv/bin/python crates/adaround-examples/benches/efficientnet/check_export.py [--bits 4]

Reads out/efficientnet/w{bits}.safetensors (the rounded weights under the PyTorch names, each
BatchNorm an identity carrying the folded bias), w{bits}_encodings.json (AIMET 0.6.1
encodings) and w{bits}_predictions.json (the Rust model's top-1 per evaluation crop). Checks
that every weight lies on its encoding's grid (`round(w / scale) - offset` integral, within
the bitwidth's codes) and that the PyTorch model's top-1 agrees with the Rust model's on at
least 99.5 % of the crops; exits 1 otherwise.
"""
import argparse
import json
import os
import sys

import torch
from safetensors.torch import load_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from torch_model import crops, logits  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--dir", default="out/efficientnet")
    a = p.parse_args()
    torch.set_num_threads(os.cpu_count())
    from efficientnet_lite_pytorch import EfficientNet
    model = EfficientNet.from_name("efficientnet-lite0").eval()
    state = load_file(os.path.join(a.dir, f"w{a.bits}.safetensors"))
    model.load_state_dict(state, strict=True)
    encodings = json.load(open(os.path.join(a.dir, f"w{a.bits}_encodings.json")))
    worst = 0.0
    for name, encs in encodings["param_encodings"].items():
        w = state[name]
        rows = w.reshape(len(encs), -1) if len(encs) > 1 else w.reshape(1, -1)
        for row, e in zip(rows, encs):
            codes = row / e["scale"] - e["offset"]
            worst = max(worst, (codes - codes.round()).abs().max().item() / 1.0)
            assert codes.round().min() >= -0.5 and codes.round().max() <= 2 ** e["bitwidth"] - 1 + 0.5, name
    print(f"{len(encodings['param_encodings'])} parameters on their AIMET grids "
          f"(largest distance to an integer code: {worst:.2e})")
    _, evaluation, _ = crops()
    ours = torch.tensor(json.load(open(os.path.join(a.dir, f"w{a.bits}_predictions.json"))))
    theirs = logits(model, evaluation).argmax(1)
    same = (ours == theirs).float().mean().item() * 100
    print(f"PyTorch top-1 identical to the Rust model's on {same:.2f} % of {len(ours)} crops")
    sys.exit(0 if same >= 99.5 and worst < 1e-2 else 1)


if __name__ == "__main__":
    main()
