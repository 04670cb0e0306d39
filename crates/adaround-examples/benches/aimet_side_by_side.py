#!/usr/bin/env python3
"""AIMET's AdaRound next to this project's, on the same model, in one run.

    python3 -m venv .venv && .venv/bin/pip install torch aimet-torch safetensors
    .venv/bin/python crates/adaround-examples/benches/aimet_side_by_side.py [--seeds 3]
    .venv/bin/python crates/adaround-examples/benches/aimet_side_by_side.py --model usps [--seeds 3]
    .venv/bin/python crates/adaround-examples/benches/aimet_side_by_side.py --model fashion [--seeds 3]

`--model digits` (the default) is the quickstart's CNN, described below. `--model fashion` is
the `fashion_mnist` example's separable CNN (trained in that run; it writes the float model,
out/fashion_mnist/float.json, the activation ranges and its results), on the 10 000
Fashion-MNIST test images (Debian's `dataset-fashion-mnist`), 1 024 calibration images and
8-bit activations; there the depthwise kernels are quantized per tensor at either
granularity, as in the example. `--model usps` is
the `pretrained` example's model, trained by someone else (the USPS classifier of the
`ccexam` package; Conv2D + BatchNorm twice, two Dense layers): the example writes its
BatchNorm-folded float weights (out/pretrained/usps_folded.json) and its results
(out/pretrained/report.json); weights only are quantized, per channel, activations stay
float, and besides accuracy both sides report agreement (the share of test images on which
the rounded model predicts the float model's class).

What it does, from the repository root:
1. runs `cargo run --release --example quickstart` (this project: nearest and AdaRound for
   every bitwidth, granularity and grid, with times, in out/quickstart/report.json) and, if
   out/interop/digits_float.safetensors is missing, the `interop` example that writes the
   float model in PyTorch layout (`--skip-ours` reuses the report, and still writes that file
   when it is missing);
2. rebuilds the same float CNN in PyTorch from that file, the same split of the embedded
   UCI digits (450 test images, 256 calibration images) and the same 8-bit activation
   quantization, and checks that its float and nearest-rounding accuracies equal the
   project's, cell by cell (so both sides round on the same grid with the same scales);
3. runs AIMET's AdaRound (`aimet_torch.adaround.Adaround`, its default iterations and
   hyper-parameters) with its weight encodings set to the project's scales, each seed, and
   evaluates the rounded weights on the same model;
4. prints one table and writes out/aimet/side_by_side.json.

Both sides see the same test images, so they are also compared image by image: the images
only this project's run gets right against those only AIMET's best seed gets right, with the
exact McNemar p-value, per cell (on accuracy, and on agreement with the float model). A
difference of a few images is not evidence either way; this says which cells' differences are.

`--orders N` also runs the example with `--order 1` .. `--order N-1` (the same calibration
images in other fixed orders: which images share a batch, which batch comes first), the
project's counterpart of AIMET's seeds, and prints both spreads side by side.

Grids: `max` is the reference's symmetric grid `[-kmax, kmax]` with `step = max|w| / kmax`;
AIMET's signed grid has one more negative level, which neither nearest rounding nor
AdaRound can reach with that step (`|w| <= kmax * step`), so both sides round on the same
levels. `mse-fr` is the full-range signed grid `[-2^(b-1), 2^(b-1)-1]` with the scale that
minimises the weight's quantization error (`WeightQuantizer::Mse`), computed here the same
way in float32.

Not like for like (see the README): AIMET optimises with its own fixed learning rate (1e-3),
batch size and iterations; the project's configuration is `AdaRoundConfig::recommended()`.
Both round the separable layer's depthwise and pointwise kernels as two layers and target
the float model's outputs of each layer.
"""

import argparse
from fractions import Fraction
import gzip
import json
import math
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
from torch import nn

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
DIGITS = os.path.join(ROOT, "crates/adaround-examples/examples/data/digits.csv.gz")
FLOAT = os.path.join(ROOT, "out/interop/digits_float.safetensors")
REPORT = os.path.join(ROOT, "out/quickstart/report.json")
USPS_FLOAT = os.path.join(ROOT, "out/pretrained/usps_folded.json")
USPS_REPORT = os.path.join(ROOT, "out/pretrained/report.json")
FASHION_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_FLOAT = os.path.join(ROOT, "out/fashion_mnist/float.json")
FASHION_REPORT = os.path.join(ROOT, "out/fashion_mnist/report.json")
FASHION_TRAIN = 20_000
FASHION_CALIBRATION = 1024
OUT = os.path.join(ROOT, "out/aimet")

TEST_SIZE = 450
CALIBRATION = 256
ACT_BITS = 8
MSE_CANDIDATES = 80
MIN_RANGE = np.float32(1e-10)
MAX_SCALE_FACTOR = np.float32(1e3)
MULT = 6364136223846793005
INC = 1442695040888963407
MASK = (1 << 64) - 1


def load_digits():
    """The embedded UCI digits: images [n, 1, 8, 8] in [0, 1] (float32) and labels."""
    rows = [
        [float(v) for v in line.split(",")]
        for line in gzip.open(DIGITS, "rt")
        if line.strip()
    ]
    data = np.array(rows, dtype=np.float32)
    return data[:, :64], data[:, 64].astype(np.int64)


def split(n, test_size, seed):
    """The project's deterministic split (`Digits::split`): Fisher-Yates with a 64-bit LCG."""
    order = list(range(n))
    state = (seed * MULT + INC) & MASK
    for i in range(n - 1, 0, -1):
        state = (state * MULT + INC) & MASK
        j = (state >> 33) % (i + 1)
        order[i], order[j] = order[j], order[i]
    return order[test_size:], order[:test_size]


class DigitsCnn(nn.Module):
    """The quickstart's float CNN: conv 1->16, separable 16->32 (stride 2), dense 512->10."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 16, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.depthwise = nn.Conv2d(16, 16, 3, stride=2, padding=1, groups=16, bias=False)
        self.pointwise = nn.Conv2d(16, 32, 1)
        self.relu2 = nn.ReLU()
        self.fc = nn.Linear(512, 10)

    def forward(self, x):
        x = self.relu1(self.conv(x))
        x = self.relu2(self.pointwise(self.depthwise(x)))
        return self.fc(torch.flatten(x, 1))


def load_float():
    from safetensors.torch import load_file

    tensors = load_file(FLOAT)
    model = DigitsCnn()
    model.load_state_dict(
        {
            "conv.weight": tensors["conv.weight"],
            "conv.bias": tensors["conv.bias"],
            "depthwise.weight": tensors["sep.depthwise.weight"],
            "pointwise.weight": tensors["sep.pointwise.weight"],
            "pointwise.bias": tensors["sep.pointwise.bias"],
            "fc.weight": tensors["fc.weight"],
            "fc.bias": tensors["fc.bias"],
        }
    )
    return model.eval()


class UspsFolded(nn.Module):
    """The `pretrained` example's model with BatchNorm folded (`QuantUsps`): conv 1->32 and
    32->64 (3x3, each then ReLU and 2x2 max pooling), dense 1024->128 (ReLU), 128->10."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.relu2 = nn.ReLU()
        self.pool2 = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(1024, 128)
        self.relu3 = nn.ReLU()
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x):
        x = self.pool1(self.relu1(self.conv1(x)))
        x = self.pool2(self.relu2(self.conv2(x)))
        return self.fc2(self.relu3(self.fc1(torch.flatten(x, 1))))


def load_json(net, path):
    """`net` with the weights an example wrote as `{name: {"shape", "values"}}` (PyTorch layout)."""
    tensors = json.load(open(path))
    model = net()
    model.load_state_dict(
        {
            k: torch.tensor(np.array(v["values"], dtype=np.float32).reshape(v["shape"]["dims"]))
            for k, v in tensors.items()
        }
    )
    return model.eval()


class FashionCnn(nn.Module):
    """The `fashion_mnist` example's float CNN: conv 1->16 (3x3), separable 16->32 and 32->64
    (3x3, stride 2), each then ReLU, dense 3136->10."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 16, 3, padding=1)
        self.dw1 = nn.Conv2d(16, 16, 3, stride=2, padding=1, groups=16, bias=False)
        self.pw1 = nn.Conv2d(16, 32, 1)
        self.dw2 = nn.Conv2d(32, 32, 3, stride=2, padding=1, groups=32, bias=False)
        self.pw2 = nn.Conv2d(32, 64, 1)
        self.relu1, self.relu2, self.relu3 = nn.ReLU(), nn.ReLU(), nn.ReLU()
        self.fc = nn.Linear(64 * 7 * 7, 10)

    def forward(self, x):
        x = self.relu1(self.conv(x))
        x = self.relu2(self.pw1(self.dw1(x)))
        x = self.relu3(self.pw2(self.dw2(x)))
        return self.fc(torch.flatten(x, 1))


def read_idx(name):
    """One gzipped IDX file of Fashion-MNIST as a uint8 array."""
    data = gzip.open(os.path.join(FASHION_DIR, name)).read()
    rank = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(rank)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * rank).reshape(dims)


def fashion_data():
    """The example's test images and labels and its calibration images (training images
    20 000 .. 21 023), pixels / 255."""
    to_input = lambda a: torch.from_numpy(a.astype(np.float32) / np.float32(255.0)).reshape(-1, 1, 28, 28)
    x_test = to_input(read_idx("t10k-images-idx3-ubyte.gz"))
    y_test = torch.from_numpy(read_idx("t10k-labels-idx1-ubyte.gz").astype(np.int64))
    train = read_idx("train-images-idx3-ubyte.gz")
    calibration = to_input(train[FASHION_TRAIN:FASHION_TRAIN + FASHION_CALIBRATION])
    return x_test, y_test, calibration


def digits_data(to_input):
    """The quickstart's split of the embedded digits: test images, labels, calibration images."""
    images, labels = load_digits()
    train, test = split(len(labels), TEST_SIZE, 7)
    return (
        to_input(images[test]), torch.from_numpy(labels[test]), to_input(images[train[:CALIBRATION]])
    )


def usps_images(images):
    """`usps::images`: the 8x8 digits in [0, 1], upsampled to 16x16, normalised as USPS."""
    x = torch.from_numpy(images / 16.0).float().reshape(-1, 1, 8, 8)
    x = x.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
    return (x - 0.2471) / 0.2994


class Spec:
    """What differs between the models: the network, its weighted layers (those in
    `per_tensor` per tensor at either granularity), its data (`data()` -> test images, labels,
    calibration images), and how it is evaluated (`forward(model, x, act_max)` -> logits with
    8-bit activations, or None for float activations)."""

    def __init__(self, name, net, weighted, load, report, example, shape, forward, data, per_tensor=()):
        self.name, self.net, self.weighted, self.load = name, net, weighted, load
        self.report, self.example, self.shape = report, example, shape
        self.forward, self.data, self.per_tensor = forward, data, per_tensor
        self.act_quant = forward is not None

    def evaluate(self, model, x, act_max):
        return self.forward(model, x, act_max) if self.act_quant else model(x)


def quantized_relu(x, max_value):
    """`QuantizedReLU::forward_quantized`: `clip(ceil((x - step/2) / step), 0, 2^b - 1) * step`."""
    levels = float(2**ACT_BITS - 1)
    step = max_value / levels
    return torch.clamp(torch.ceil((x - step / 2) / step), 0, levels) * step


def quantized_forward(model, x, act_max):
    """The project's `QuantCnn::forward`: the model's weights, activations at 8 bits."""
    x = quantized_relu(model.conv(x), act_max[0])
    x = quantized_relu(model.pointwise(model.depthwise(x)), act_max[1])
    return model.fc(torch.flatten(x, 1))


def fashion_forward(model, x, act_max):
    """The `fashion_mnist` example's `QuantNet::forward`: activations at 8 bits."""
    x = quantized_relu(model.conv(x), act_max[0])
    x = quantized_relu(model.pw1(model.dw1(x)), act_max[1])
    x = quantized_relu(model.pw2(model.dw2(x)), act_max[2])
    return model.fc(torch.flatten(x, 1))


def accuracy(logits, labels):
    return 100.0 * (logits.argmax(1) == labels).double().mean().item()


def agreement(logits, float_logits):
    """The share (%) of images on which `logits` predict the float model's class."""
    return accuracy(logits, float_logits.argmax(1))


def output_error(logits, float_logits):
    """The mean squared difference between the logits and the float model's (the model output
    error the layer-wise reconstruction drives down; finer than agreement)."""
    return float(((logits - float_logits) ** 2).mean())


def levels(bits, grid):
    """The grid's lowest and highest integer (relative to the offset on the asymmetric grid)."""
    if grid == "Symmetric":
        kmax = 2 ** (bits - 1) - 1
        return -kmax, kmax
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def mse_scales(rows, lo, hi):
    """`adaround_core::mse_scales` (bitwidths up to 8): the error-minimising scale factor per row."""
    lo32, hi32 = np.float32(lo), np.float32(hi)
    targets = [np.float32(t) for t in range(1, -lo + 1)]
    targets += [
        hi32 * np.float32(MSE_CANDIDATES) / np.float32(k)
        for k in range(MSE_CANDIDATES, 0, -1)
    ]
    out = []
    for row in rows:
        peak = max(np.float32(np.abs(row).max()), MIN_RANGE)
        best = (math.inf, hi32 / peak)
        for t in targets:
            sf = np.float32(t / peak)
            q = np.clip(np.round(row * sf), lo32, hi32) / sf
            err = float(np.sum((q - row).astype(np.float64) ** 2))
            if err < best[0]:
                best = (err, sf)
        out.append(best[1])
    return np.array(out, dtype=np.float32)


def mse_offsets(rows, lo, hi):
    """`adaround_core::mse_offsets` (bitwidths up to 8): the error-minimising scale factor and
    integer offset per row on the asymmetric grid."""
    lo32, hi32 = np.float32(lo), np.float32(hi)
    codes = hi32 - lo32
    spans = [(np.float32(t), np.float32(1.0)) for t in range(1, int(codes) + 1)]
    spans += [
        (codes, np.float32(k) / np.float32(MSE_CANDIDATES))
        for k in range(MSE_CANDIDATES, 0, -1)
    ]
    scales, offsets = [], []
    for row in rows:
        low_end = min(np.float32(row.min()), np.float32(0.0))
        high_end = max(np.float32(row.max()), np.float32(0.0))
        span_w = max(np.float32(high_end - low_end), MIN_RANGE)
        best = (math.inf, codes / span_w, np.float32(0.0))
        for span, kept in spans:
            sf = np.float32(min(np.float32(span / np.float32(span_w * kept)), MAX_SCALE_FACTOR))
            low = np.float32(np.round(np.float32(np.float32(low_end * kept) * sf))) - lo32
            for o in (low, low - np.float32(1.0), low + np.float32(1.0)):
                o = np.float32(min(max(o, -hi32), -lo32))
                q = np.clip(np.round(row * sf - o), lo32, hi32)
                err = float(np.sum(((q + o) / sf - row).astype(np.float64) ** 2))
                if err < best[0]:
                    best = (err, sf, o)
        scales.append(best[1])
        offsets.append(best[2])
    return np.array(scales, dtype=np.float32), np.array(offsets, dtype=np.float32)


def scale_factors(weight, bits, per_channel, scale, grid):
    """The project's scale factor `sf` and integer offset `o`
    (`q = (clip(round(w * sf) - o, lo, hi) + o) / sf`, `o = 0` but on the asymmetric grid), one
    per output channel (axis 0 in PyTorch's layout) or one for the tensor, shaped to broadcast."""
    w = weight.detach().numpy().astype(np.float32)
    rows = w.reshape(w.shape[0], -1) if per_channel else w.reshape(1, -1)
    offset = np.zeros(rows.shape[0], dtype=np.float32)
    if scale == "max":
        kmax = np.float32(2 ** (bits - 1) - 1)
        peak = np.maximum(np.abs(rows).max(axis=1).astype(np.float32), MIN_RANGE)
        sf = np.clip(kmax / peak, 0, MAX_SCALE_FACTOR).astype(np.float32)
    elif grid == "Asymmetric":
        lo, hi = levels(bits, grid)
        sf, offset = mse_offsets(rows, lo, hi)
    else:
        lo, hi = levels(bits, grid)
        sf = np.clip(mse_scales(rows, lo, hi), 0, MAX_SCALE_FACTOR).astype(np.float32)
    shape = [-1] + [1] * (w.ndim - 1) if per_channel else [1] * w.ndim
    return torch.from_numpy(sf.reshape(shape)), torch.from_numpy(offset.reshape(shape))


SPECS = {
    "digits": Spec(
        "digits", DigitsCnn, ["conv", "depthwise", "pointwise", "fc"], lambda: load_float(),
        REPORT, "quickstart", (1, 1, 8, 8), quantized_forward,
        lambda: digits_data(lambda images: torch.from_numpy(images / 16.0).reshape(-1, 1, 8, 8).float()),
    ),
    "fashion": Spec(
        "fashion", FashionCnn, ["conv", "dw1", "pw1", "dw2", "pw2", "fc"],
        lambda: load_json(FashionCnn, FASHION_FLOAT), FASHION_REPORT, "fashion_mnist",
        (1, 1, 28, 28), fashion_forward, fashion_data, per_tensor=("dw1", "dw2"),
    ),
    "usps": Spec(
        "usps", UspsFolded, ["conv1", "conv2", "fc1", "fc2"],
        lambda: load_json(UspsFolded, USPS_FLOAT), USPS_REPORT, "pretrained", (1, 1, 16, 16),
        None, lambda: digits_data(usps_images),
    ),
}


def nearest(spec, model, scales, lo, hi):
    """A copy of `model` with every kernel rounded to nearest on the given scales and offsets."""
    rounded = spec.net()
    rounded.load_state_dict(model.state_dict())
    with torch.no_grad():
        for name in spec.weighted:
            w = getattr(rounded, name).weight
            sf, o = scales[name]
            w.copy_((torch.clamp(torch.round(w * sf - o), lo, hi) + o) / sf)
    return rounded.eval()


def aimet_config(per_channel, symmetric):
    return {
        "defaults": {
            "ops": {"is_output_quantized": "True"},
            "params": {"is_quantized": "True", "is_symmetric": "True" if symmetric else "False"},
            "strict_symmetric": "False",
            "unsigned_symmetric": "False",
            "per_channel_quantization": "True" if per_channel else "False",
        },
        "params": {"bias": {"is_quantized": "False"}},
        "op_type": {},
        "supergroups": [],
        "model_input": {"is_input_quantized": "True"},
        "model_output": {},
    }


def weights_only(sim):
    """Removes every activation quantizer from AIMET's simulation (its configuration cannot
    turn them off)."""
    for module in sim.model.modules():
        for kind in ("input_quantizers", "output_quantizers"):
            quantizers = getattr(module, kind, None)
            if quantizers is not None:
                for i in range(len(quantizers)):
                    quantizers[i] = None


def aimet_adaround(spec, model, calibration, bits, per_channel, grid, scales, seed, iterations, tmp):
    """AIMET's AdaRound with its weight encodings set to `scales`; returns the model with the
    rounded weights (on the grid) and the seconds AIMET took."""
    try:
        from aimet_torch.common.defs import QuantScheme
    except ImportError:  # aimet-torch before 2.20
        from aimet_common.defs import QuantScheme
    from aimet_torch.adaround.adaround_weight import Adaround, AdaroundParameters
    from aimet_torch.quantsim import QuantizationSimModel

    torch.manual_seed(seed)
    np.random.seed(seed)
    fp = spec.net()
    fp.load_state_dict(model.state_dict())
    fp.eval()
    symmetric = grid != "Asymmetric"
    config = os.path.join(tmp, f"config-{per_channel}-{symmetric}.json")
    with open(config, "w") as f:
        json.dump(aimet_config(per_channel, symmetric), f)
    dummy = torch.zeros(*spec.shape)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(calibration), batch_size=32, shuffle=False
    )
    params = AdaroundParameters(
        data_loader=[(b[0],) for b in loader],
        num_batches=len(loader),
        default_num_iterations=iterations,
        forward_fn=lambda m, inputs: m(inputs[0]),
    )
    start = time.perf_counter()
    sim = QuantizationSimModel(
        fp,
        dummy_input=dummy,
        quant_scheme=QuantScheme.post_training_tf,
        default_param_bw=bits,
        config_file=config,
    )
    if not spec.act_quant:
        weights_only(sim)
    Adaround._compute_param_encodings(sim)
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    for name in spec.weighted:
        quantizer = getattr(sim.model, name).param_quantizers["weight"]
        sf, o = scales[name]
        # A layer quantized per tensor under a per-channel configuration gets its one scale
        # on every channel.
        step = torch.broadcast_to((1.0 / sf).reshape(-1), (quantizer.min.numel(),)).reshape(quantizer.min.shape)
        o = torch.broadcast_to(o.reshape(-1), (quantizer.min.numel(),)).reshape(quantizer.min.shape)
        quantizer.set_range((qmin + o) * step, (qmax + o) * step)
        got = quantizer.get_scale().reshape(-1)
        if not torch.allclose(got, step.reshape(-1), rtol=1e-5, atol=0):
            raise SystemExit(f"AIMET did not take the scale of {name}: {got} vs {step}")
        if not symmetric:
            # AIMET's offset is that of code 0 in steps: `qmin + o`.
            offset = quantizer.get_offset().reshape(-1)
            if not torch.equal(offset.round(), (qmin + o).reshape(-1)):
                raise SystemExit(f"AIMET did not take the offset of {name}: {offset} vs {qmin + o}")
    rounded = Adaround._apply_adaround(sim, fp, dummy, params, tmp, f"w{bits}")
    seconds = time.perf_counter() - start
    return rounded.eval(), seconds


def weight_grid(spec, model, bits, per_channel, scale, grid):
    """Each weighted layer's scale factors (and offsets) for `scale` on `grid`, and the
    grid's lowest and highest code."""
    lo, hi = levels(bits, grid)
    scales = {
        n: scale_factors(
            getattr(model, n).weight, bits, per_channel and n not in spec.per_tensor, scale, grid
        )
        for n in spec.weighted
    }
    return scales, lo, hi


def run_jobs(jobs, processes):
    """`aimet_job` on each job, `processes` at a time."""
    if processes <= 1:
        return [aimet_job(job) for job in jobs]
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(processes, mp_context=mp.get_context("spawn")) as pool:
        return list(pool.map(aimet_job, jobs))


def aimet_job(job):
    """One AIMET run in its own process (`--jobs`): returns the test accuracy, the agreement
    with the float model and seconds."""
    import logging

    logging.disable(logging.INFO)
    torch.set_num_threads(job["threads"])
    spec = SPECS[job["model"]]
    model = spec.load()
    with tempfile.TemporaryDirectory() as tmp:
        rounded, seconds = aimet_adaround(
            spec, model, job["calibration"], job["bits"], job["per_channel"], job["grid"],
            job["scales"], job["seed"], job["iterations"], tmp,
        )
    with torch.no_grad():
        on_grid = nearest(spec, rounded, job["scales"], job["lo"], job["hi"])
        logits = spec.evaluate(on_grid, job["x_test"], job["act_max"])
    return {
        "seed": job["seed"],
        "accuracy": accuracy(logits, job["y_test"]),
        "agreement": agreement(logits, job["float_logits"]),
        "output_error": output_error(logits, job["float_logits"]),
        "seconds": seconds,
        "predictions": logits.argmax(1).tolist(),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=sorted(SPECS), default="digits")
    parser.add_argument("--seeds", type=int, default=1, help="AIMET runs per cell (best reported)")
    parser.add_argument("--iterations", type=int, default=None, help="AIMET iterations (default: AIMET's)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of each AIMET run")
    parser.add_argument("--jobs", type=int, default=1, help="AIMET runs at a time (processes)")
    parser.add_argument("--bits", default="4,3,2")
    parser.add_argument(
        "--grids", default="Symmetric,FullRange,Asymmetric", help="the report's grids to compare"
    )
    parser.add_argument("--skip-ours", action="store_true", help="reuse the example's report")
    parser.add_argument(
        "--orders", type=int, default=1,
        help="this project's runs per cell, on the calibration images in that many fixed orders",
    )
    parser.add_argument(
        "--aimet-from", nargs="+", default=[], metavar="JSON",
        help="take AIMET's runs from earlier outputs of this script (same model and "
        "iterations, at most --seeds seeds; each cell's nearest accuracy is checked) instead "
        "of running AIMET again; only the seeds they lack run",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    spec = SPECS[args.model]

    run = lambda example, *extra: subprocess.run(
        ["cargo", "run", "--release", "--example", example, "--", *extra], cwd=ROOT, check=True,
        stdout=subprocess.DEVNULL,
    )
    if not args.skip_ours or not os.path.exists(spec.report):
        run(spec.example)
    order_reports = []
    for k in range(1, args.orders):
        path = os.path.join(os.path.dirname(spec.report), f"report_order{k}.json")
        if not args.skip_ours or not os.path.exists(path):
            run(spec.example, "--order", str(k))
        order_reports.append(json.load(open(path)))
    if spec.name == "digits" and not os.path.exists(FLOAT):
        # The float model in PyTorch layout (also with --skip-ours: it is not a result).
        run("interop")
    ours = json.load(open(spec.report))

    x_test, y_test, calibration = spec.data()
    test_size = len(y_test)

    model = spec.load()
    act_max = None
    with torch.no_grad():
        float_logits = model(x_test)
        float_acc = accuracy(float_logits, y_test)
        if spec.name == "digits":
            a1 = torch.relu(model.conv(calibration))
            a2 = torch.relu(model.pointwise(model.depthwise(a1)))
            act_max = (float(a1.max()), float(a2.max()))
        elif spec.act_quant:
            act_max = tuple(ours["activation_max"])
    print(f"float accuracy: PyTorch {float_acc:.2f} %, project {ours['float_accuracy']:.2f} %")
    if abs(float_acc - ours["float_accuracy"]) > 1e-9:
        raise SystemExit("the PyTorch model is not the project's float model")

    earlier = {}
    for path in args.aimet_from:
        old = json.load((gzip.open if path.endswith(".gz") else open)(path, "rt"))
        if old.get("model", "digits") != spec.name or old["seeds"] > args.seeds or (
            old["aimet_iterations"] != (args.iterations or "AIMET default")
        ):
            raise SystemExit(f"{path}: another model, more seeds than --seeds, or other iterations")
        for r in old["rows"]:
            earlier[(r["bits"], r["granularity"], r["scale"], r["grid"])] = r
    bits_list = [int(b) for b in args.bits.split(",")]
    cells, jobs, reused = [], [], {}
    for cell in ours["results"]:
        bits = cell["bits"]
        if bits not in bits_list or cell["grid"] not in args.grids.split(","):
            continue
        per_channel = cell["granularity"] == "per-channel"
        scales, lo, hi = weight_grid(spec, model, bits, per_channel, cell["scale"], cell["grid"])
        with torch.no_grad():
            logits = spec.evaluate(nearest(spec, model, scales, lo, hi), x_test, act_max)
        near = accuracy(logits, y_test)
        near_error = output_error(logits, float_logits)
        theirs = cell.get("nearest_output_error")
        if theirs is not None and abs(theirs - near_error) > 1e-3 * near_error:
            raise SystemExit(
                f"W{bits} {cell['grid']}: nearest output error {near_error} here, {theirs} in the project"
            )
        cells.append((cell, near, agreement(logits, float_logits)))
        old = earlier.get((bits, cell["granularity"], cell["scale"], cell["grid"]))
        if old is not None:
            if abs(old["nearest_pytorch"] - near) > 1e-9:
                raise SystemExit(f"the earlier AIMET run of W{bits} {cell['grid']} had another nearest accuracy")
            reused[len(cells) - 1] = old["aimet"]
        # Seeds an earlier run has are reused; the others run (AIMET's seeds are fixed).
        for seed in range(len(reused.get(len(cells) - 1, [])), args.seeds):
            jobs.append({
                "model": spec.name, "float_logits": float_logits,
                "cell": len(cells) - 1, "seed": seed, "bits": bits, "per_channel": per_channel,
                "grid": cell["grid"],
                "scales": scales, "lo": lo, "hi": hi, "iterations": args.iterations,
                "threads": args.threads, "calibration": calibration, "x_test": x_test,
                "y_test": y_test, "act_max": act_max,
            })
    print(
        f"{len(jobs)} AIMET runs, {args.jobs} at a time, {args.threads} thread(s) each; "
        f"{len(reused)} cell(s) from earlier runs", flush=True,
    )
    results = run_jobs(jobs, args.jobs)
    rows = []
    key = lambda c: (c["bits"], c["granularity"], c["scale"], c["grid"])
    for i, (cell, near, near_agreement) in enumerate(cells):
        aimet = reused.get(i, []) + [r for job, r in zip(jobs, results) if job["cell"] == i]
        others = [next(c for c in rep["results"] if key(c) == key(cell)) for rep in order_reports]
        if any(abs(c["nearest_accuracy"] - cell["nearest_accuracy"]) > 1e-9 for c in others):
            raise SystemExit("a report of another calibration order has another nearest accuracy")
        rows.append({
            "adaround_project_orders": [cell["adaround_accuracy"]] + [c["adaround_accuracy"] for c in others],
            "adaround_agreement_project_orders": [cell.get("adaround_agreement")]
            + [c.get("adaround_agreement") for c in others],
            "nearest_output_error_project": cell.get("nearest_output_error"),
            "adaround_output_error_project": cell.get("adaround_output_error"),
            "nearest_agreement_pytorch": near_agreement,
            "nearest_agreement_project": cell.get("nearest_agreement"),
            "adaround_agreement_project": cell.get("adaround_agreement"),
            "bits": cell["bits"],
            "granularity": cell["granularity"],
            "scale": cell["scale"],
            "grid": cell["grid"],
            "nearest_project": cell["nearest_accuracy"],
            "nearest_pytorch": near,
            "adaround_project": cell["adaround_accuracy"],
            "adaround_predictions_project": cell.get("adaround_predictions"),
            "seconds_project": cell["seconds"],
            "aimet": aimet,
        })

    print(f"\nTest accuracy (%), {test_size} images; float {float_acc:.2f} %; AIMET: best of {args.seeds} seed(s)")
    print("| weights | granularity | scale, grid | nearest (both) | this project | AIMET AdaRound | project s | AIMET s | time ratio |")
    print("|---|---|---|---|---|---|---|---|---|")
    mismatched = 0
    for r in rows:
        best = max(a["accuracy"] for a in r["aimet"])
        spread = sorted(a["accuracy"] for a in r["aimet"])
        aimet_s = np.mean([a["seconds"] for a in r["aimet"]])
        same = abs(r["nearest_project"] - r["nearest_pytorch"]) < 1e-9
        mismatched += not same
        near = f"{r['nearest_pytorch']:.2f}" if same else f"{r['nearest_pytorch']:.2f} / {r['nearest_project']:.2f} (differ)"
        aimet_txt = f"{best:.2f}" if len(spread) == 1 else f"{best:.2f} ({spread[0]:.2f}-{spread[-1]:.2f})"
        print(
            f"| W{r['bits']} | {r['granularity']} | {r['scale']}, {r['grid']} | {near} | "
            f"{r['adaround_project']:.2f} | {aimet_txt} | {r['seconds_project']:.1f} | {aimet_s:.1f} | "
            f"{aimet_s / r['seconds_project']:.0f}x |"
        )
    if all(r["nearest_agreement_project"] is not None for r in rows):
        print(f"\nAgreement with the float model (%), {test_size} images; AIMET: best of {args.seeds} seed(s)")
        print("| weights | granularity | scale, grid | nearest (both) | this project | AIMET AdaRound |")
        print("|---|---|---|---|---|---|")
        for r in rows:
            if any("agreement" not in a for a in r["aimet"]):
                spread = [math.nan]  # an earlier run that did not measure agreement
            else:
                spread = sorted(a["agreement"] for a in r["aimet"])
            same = abs(r["nearest_agreement_pytorch"] - r["nearest_agreement_project"]) < 1e-9
            mismatched += not same
            near = f"{r['nearest_agreement_pytorch']:.2f}" + ("" if same else f" / {r['nearest_agreement_project']:.2f} (differ)")
            aimet_txt = f"{spread[-1]:.2f}" if len(spread) == 1 else f"{spread[-1]:.2f} ({spread[0]:.2f}-{spread[-1]:.2f})"
            if math.isnan(spread[-1]):
                aimet_txt = "not measured"
            print(
                f"| W{r['bits']} | {r['granularity']} | {r['scale']}, {r['grid']} | {near} | "
                f"{r['adaround_agreement_project']:.2f} | {aimet_txt} |"
            )
    print_output_errors(rows, args.seeds, test_size)
    print_counts(rows, args.seeds)
    print_paired(rows, y_test.tolist(), float_logits.argmax(1).tolist())
    if args.orders > 1:
        print_orders(rows, args.orders, args.seeds)
    os.makedirs(OUT, exist_ok=True)
    meta = {
        "orders": args.orders,
        "model": spec.name,
        "aimet_from": args.aimet_from,
        "torch": torch.__version__,
        "threads": args.threads,
        "seeds": args.seeds,
        "aimet_iterations": args.iterations or "AIMET default",
        "float_accuracy": float_acc,
        "rows": rows,
    }
    try:
        from importlib.metadata import version

        meta["aimet_torch"] = version("aimet-torch")
    except Exception:  # noqa: BLE001 - the version is informative only
        pass
    name = "side_by_side.json" if spec.name == "digits" else f"side_by_side_{spec.name}.json"
    with open(os.path.join(OUT, name), "w") as f:
        json.dump(meta, f, indent=1)
    print(f"\n{os.path.join(OUT, name)}")
    if mismatched:
        print(f"{mismatched} cell(s) where nearest rounding differs: not the same grid", file=sys.stderr)
        sys.exit(1)


def spread_text(values):
    """`median (min-max)` of a list of percentages."""
    v = sorted(values)
    return f"{float(np.median(v)):.2f} ({v[0]:.2f}-{v[-1]:.2f})"


def print_output_errors(rows, seeds, test_size):
    """The model output error against the float model on the test images: nearest, this
    project, AIMET's seeds."""
    if any(r["adaround_output_error_project"] is None for r in rows) or any(
        "output_error" not in a for r in rows for a in r["aimet"]
    ):
        return
    print(
        f"\nModel output error against the float model (mean squared logit difference), "
        f"{test_size} test images; AIMET: median (range) of {seeds} seed(s)"
    )
    print("| weights | granularity | scale, grid | nearest | this project | AIMET AdaRound | AIMET median / this project |")
    print("|---|---|---|---|---|---|---|")
    lower = 0
    for r in rows:
        ours = r["adaround_output_error_project"]
        aimet = sorted(a["output_error"] for a in r["aimet"])
        med = float(np.median(aimet))
        lower += ours <= aimet[0]
        print(
            f"| W{r['bits']} | {r['granularity']} | {r['scale']}, {r['grid']} | "
            f"{r['nearest_output_error_project']:.4g} | {ours:.4g} | "
            f"{med:.4g} ({aimet[0]:.4g}-{aimet[-1]:.4g}) | {med / ours:.2f}x |"
        )
    print(f"output error: this project <= AIMET's best seed in {lower}/{len(rows)} cells")


def print_counts(rows, seeds):
    """How many cells this project's run (the given calibration order) reaches AIMET's best
    and median seed, on accuracy and on agreement."""
    for what, ours_key, aimet_key in [
        ("accuracy", "adaround_project", "accuracy"),
        ("agreement", "adaround_agreement_project", "agreement"),
    ]:
        pairs = [
            (r[ours_key], [a[aimet_key] for a in r["aimet"]])
            for r in rows
            if r.get(ours_key) is not None and all(aimet_key in a for a in r["aimet"])
        ]
        if not pairs:
            continue
        best = sum(o >= max(a) - 1e-9 for o, a in pairs)
        median = sum(o >= float(np.median(a)) - 1e-9 for o, a in pairs)
        print(
            f"{what}: this project >= AIMET's best of {seeds} seed(s) in {best}/{len(pairs)} cells, "
            f">= its median in {median}/{len(pairs)}"
        )


def mcnemar_exact(b, c):
    """The two-sided exact McNemar p-value of `b` images only one side gets right against `c`
    only the other gets right (a binomial test of `min(b, c)` among `b + c` at 1/2)."""
    n = b + c
    if n == 0:
        return 1.0
    # Exact integers: 2^n overflows a float beyond about a thousand discordant images.
    tail = Fraction(sum(math.comb(n, k) for k in range(min(b, c) + 1)), 2**n)
    return min(1.0, float(2 * tail))


def print_paired(rows, labels, float_classes):
    """This project's run against AIMET's best seed image by image (both models see the same
    test images): per cell, the images only one side gets right and the exact McNemar
    p-value; on accuracy (against the labels) and on agreement (against the float model's
    classes), the best seed picked by each."""
    if any(r.get("adaround_predictions_project") is None for r in rows) or any(
        "predictions" not in a for r in rows for a in r["aimet"]
    ):
        return
    for what, reference in [("accuracy", labels), ("agreement", float_classes)]:
        print(
            f"\nImage by image, {what}: images only this project gets right / only AIMET's "
            f"best seed gets right, exact McNemar p (two-sided); AIMET's best seed by {what}"
        )
        print("| weights | granularity | scale, grid | only this project | only AIMET | p |")
        print("|---|---|---|---|---|---|")
        ahead = {"this project": 0, "AIMET": 0}
        for r in rows:
            ours = r["adaround_predictions_project"]
            best = max(r["aimet"], key=lambda a: sum(p == t for p, t in zip(a["predictions"], reference)))
            b = sum(o == t != a for o, a, t in zip(ours, best["predictions"], reference))
            c = sum(a == t != o for o, a, t in zip(ours, best["predictions"], reference))
            p = mcnemar_exact(b, c)
            if p < 0.05:
                ahead["this project" if b > c else "AIMET"] += 1
            print(f"| W{r['bits']} | {r['granularity']} | {r['scale']}, {r['grid']} | {b} | {c} | {p:.3g} |")
        print(
            f"{what}: ahead with p < 0.05 against AIMET's best seed: this project in "
            f"{ahead['this project']}/{len(rows)} cells, AIMET in {ahead['AIMET']}/{len(rows)}"
        )


def print_orders(rows, orders, seeds):
    """This project over `orders` calibration orders next to AIMET over its seeds: median and
    range per cell, and how many cells each side's median and best reach the other's."""
    for what, ours_key, aimet_key in [
        ("accuracy", "adaround_project_orders", "accuracy"),
        ("agreement with the float model", "adaround_agreement_project_orders", "agreement"),
    ]:
        if any(v is None for r in rows for v in r[ours_key]) or any(
            aimet_key not in a for r in rows for a in r["aimet"]
        ):
            continue
        print(
            f"\nTest {what} (%), this project over {orders} calibration orders "
            f"(the given order first) and AIMET over {seeds} seed(s): median (range)"
        )
        print("| weights | granularity | scale, grid | this project: given order | this project | AIMET |")
        print("|---|---|---|---|---|---|")
        med_ge = best_ge = 0
        for r in rows:
            ours, aimet = r[ours_key], [a[aimet_key] for a in r["aimet"]]
            med_ge += float(np.median(ours)) >= float(np.median(aimet)) - 1e-9
            best_ge += max(ours) >= max(aimet) - 1e-9
            print(
                f"| W{r['bits']} | {r['granularity']} | {r['scale']}, {r['grid']} | {ours[0]:.2f} | "
                f"{spread_text(ours)} | {spread_text(aimet)} |"
            )
        print(
            f"{what}: this project's median >= AIMET's median in {med_ge}/{len(rows)} cells; "
            f"its best >= AIMET's best in {best_ge}/{len(rows)}"
        )


if __name__ == "__main__":
    main()
