#!/usr/bin/env python3
"""AIMET's AdaRound on the images calibration does not use, for the settings where the
side-by-side test images disagree most.

    .venv/bin/python crates/adaround-examples/benches/aimet_held_out.py [--cells 2:FullRange,2:Asymmetric]

Runs `aimet_side_by_side.py`'s AIMET job (same float model, scales, calibration images and
seeds) for the pretrained USPS model, and scores each seed's rounded model on the 1 091
training images after the 256 calibration images: agreement with the float model and
accuracy. This project's agreement on the same images is the `pretrained --validate` row of
its preset (`cargo run --release --example pretrained -- --validate --only "bias correction
(the preset)"`). Run `cargo run --release --example pretrained` first: it writes the folded
float model this script loads.
"""

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import aimet_side_by_side as side  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cells", default="2:FullRange,2:Asymmetric", help="bits:grid, comma-separated")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=2)
    args = parser.parse_args()
    spec = side.SPECS["usps"]
    model = spec.load()
    images, labels = side.load_digits()
    train, _test = side.split(len(labels), side.TEST_SIZE, 7)
    calibration = side.usps_images(images[train[: side.CALIBRATION]])
    held_out = side.usps_images(images[train[side.CALIBRATION :]])
    y_held = torch.from_numpy(labels[train[side.CALIBRATION :]])
    with torch.no_grad():
        float_logits = model(held_out)
    jobs = []
    for cell in args.cells.split(","):
        bits, grid = int(cell.split(":")[0]), cell.split(":")[1]
        scale = "max" if grid == "Symmetric" else "mse"
        scales, lo, hi = side.weight_grid(spec, model, bits, True, scale, grid)
        for seed in range(args.seeds):
            jobs.append({
                "model": spec.name, "float_logits": float_logits, "cell": cell, "seed": seed,
                "bits": bits, "per_channel": True, "grid": grid, "scales": scales, "lo": lo,
                "hi": hi, "iterations": None, "threads": 1, "calibration": calibration,
                "x_test": held_out, "y_test": y_held, "act_max": None,
            })
    results = side.run_jobs(jobs, args.jobs)
    print(f"\nAIMET AdaRound (its defaults), {held_out.shape[0]} held-out images, per channel")
    print("| weights | seed | agreement | accuracy | seconds |")
    print("|---|---|---|---|---|")
    for job, r in zip(jobs, results):
        print(
            f"| W{job['bits']} {job['grid']} | {job['seed']} | {r['agreement']:.2f} % | "
            f"{r['accuracy']:.2f} % | {r['seconds']:.0f} |"
        )


if __name__ == "__main__":
    main()
