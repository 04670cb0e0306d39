#!/usr/bin/env python3
"""AIMET's AdaRound on EfficientNet-Lite0, on the `efficientnet` example's data and grid:

    .venv/bin/pip install torch aimet-torch efficientnet-lite-pytorch==0.1.0
    .venv/bin/python crates/adaround-examples/benches/efficientnet/aimet.py \
        --bits 4 --calibration 256 --iterations 500

1. the pretrained float model (`torch_model.float_model`), every BatchNorm folded into the
   convolution before it (the BatchNorm replaced by an identity, the conv given the folded
   bias), as the example folds them;
2. AIMET's `QuantizationSimModel` with per-channel symmetric weight quantizers at `--bits`,
   activation quantizers removed (weights only, as the example), and each weight's encoding
   set to the example's grid: per output channel, the scale minimising the weight's squared
   error on the full-range signed grid (`WeightQuantizer::mse(bits, true, FullRange)`,
   computed as `aimet_side_by_side.py` computes it);
3. nearest rounding on that grid, then `Adaround._apply_adaround` (AIMET's defaults but the
   iteration count: `--iterations`, default 10 000 in AIMET) on the first `--calibration`
   calibration crops in batches of 32;
4. both scored against the float model on the 256 evaluation crops: top-1 and top-5
   agreement and the mean KL divergence, as the example scores; AIMET's time printed.
Writes out/efficientnet/aimet_w{bits}.json.
"""
import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))
from torch_model import crops, float_model, logits, normalise  # noqa: E402
from aimet_side_by_side import aimet_config, scale_factors, weights_only  # noqa: E402


def fold(model):
    """Every (conv, BatchNorm) pair folded: the conv's weight scaled per output channel, its
    bias the BatchNorm's shift; the BatchNorm replaced by an identity."""
    pairs = [("_conv_stem", "_bn0"), ("_conv_head", "_bn1")]
    for i, block in enumerate(model._blocks):
        p = f"_blocks.{i}."
        if hasattr(block, "_expand_conv"):
            pairs.append((p + "_expand_conv", p + "_bn0"))
        pairs += [(p + "_depthwise_conv", p + "_bn1"), (p + "_project_conv", p + "_bn2")]
    for conv_name, bn_name in pairs:
        conv, bn = model.get_submodule(conv_name), model.get_submodule(bn_name)
        with torch.no_grad():
            scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
            bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
            conv.weight.mul_(scale.reshape(-1, 1, 1, 1))
            conv.bias = torch.nn.Parameter(bn.bias + (bias - bn.running_mean) * scale)
        parent, _, leaf = bn_name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, torch.nn.Identity())
    return [c for c, _ in pairs] + ["_fc"]


def plain_modules(model, weighted):
    """The package's convolutions (`Conv2dStaticSamePadding`, an `nn.Conv2d` subclass that
    pads in its forward, which AIMET's simulation leaves unquantized) as
    `nn.Sequential(padding, nn.Conv2d)`; returns the weighted layers' new names."""
    renamed = []
    for name in weighted:
        module = model.get_submodule(name)
        if type(module) is torch.nn.Linear:
            renamed.append(name)
            continue
        conv = torch.nn.Conv2d(
            module.in_channels, module.out_channels, module.kernel_size, module.stride,
            module.padding, module.dilation, module.groups, module.bias is not None,
        )
        conv.load_state_dict(module.state_dict())
        pad = module.static_padding
        pad = torch.nn.Identity() if type(pad).__name__ == "Identity" else pad
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, torch.nn.Sequential(pad, conv))
        renamed.append(name + ".1")
    return renamed


def scores(out, reference):
    top1 = (out.argmax(1) == reference.argmax(1)).float().mean().item() * 100
    best5 = out.topk(5, dim=1).indices
    top5 = (best5 == reference.argmax(1, keepdim=True)).any(1).float().mean().item() * 100
    p, q = torch.log_softmax(reference, 1), torch.log_softmax(out, 1)
    kl = (p.exp() * (p - q)).sum(1).mean().item()
    return {"top1": top1, "top5": top5, "kl": kl}


def main():
    a = argparse.ArgumentParser()
    a.add_argument("--bits", type=int, default=4)
    a.add_argument("--calibration", type=int, default=256)
    a.add_argument("--iterations", type=int, default=500)
    a.add_argument("--seed", type=int, default=0)
    args = a.parse_args()
    torch.set_num_threads(os.cpu_count())
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    try:
        from aimet_torch.common.defs import QuantScheme
    except ImportError:  # aimet-torch before 2.20
        from aimet_common.defs import QuantScheme
    from aimet_torch.adaround.adaround_weight import Adaround, AdaroundParameters
    from aimet_torch.quantsim import QuantizationSimModel

    calibration, evaluation, _ = crops()
    x_cal = normalise(calibration[: args.calibration])
    model = float_model()
    weighted = fold(model)
    reference = logits(model, evaluation)
    bits = args.bits
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1

    # Nearest rounding on the example's grid.
    nearest = float_model()
    fold(nearest)
    steps = {}
    with torch.no_grad():
        for name in weighted:
            w = nearest.get_submodule(name).weight
            sf, _ = scale_factors(w, bits, True, "mse", "FullRange")
            steps[name] = 1.0 / sf
            w.copy_(torch.clamp(torch.round(w * sf), qmin, qmax) / sf)
    nearest_scores = scores(logits(nearest, evaluation), reference)

    tmp = tempfile.mkdtemp()
    config = os.path.join(tmp, "config.json")
    with open(config, "w") as f:
        json.dump(aimet_config(True, True), f)
    dummy = torch.zeros(1, 3, 224, 224)
    batches = [(x_cal[i: i + 32],) for i in range(0, len(x_cal), 32)]
    params = AdaroundParameters(
        data_loader=batches,
        num_batches=len(batches),
        default_num_iterations=args.iterations,
        forward_fn=lambda m, inputs: m(inputs[0]),
    )
    names = plain_modules(model, weighted)
    with torch.no_grad():
        if not torch.allclose(logits(model, evaluation[:4]), reference[:4], atol=1e-4):
            raise SystemExit("the rebuilt convolutions changed the float model's logits")
    start = time.perf_counter()
    sim = QuantizationSimModel(
        model, dummy_input=dummy, quant_scheme=QuantScheme.post_training_tf,
        default_param_bw=bits, config_file=config,
    )
    weights_only(sim)
    Adaround._compute_param_encodings(sim)
    for name, new_name in zip(weighted, names):
        quantizer = sim.model.get_submodule(new_name).param_quantizers["weight"]
        step = steps[name].reshape(quantizer.min.shape)
        quantizer.set_range(qmin * step, qmax * step)
        got = quantizer.get_scale().reshape(-1)
        if not torch.allclose(got, step.reshape(-1), rtol=1e-5, atol=0):
            raise SystemExit(f"AIMET did not take the scale of {name}")
    rounded = Adaround._apply_adaround(sim, model, dummy, params, tmp, f"w{bits}")
    seconds = time.perf_counter() - start
    rounded.eval()
    aimet_scores = scores(logits(rounded, evaluation), reference)
    # How many weights AIMET rounds otherwise than to nearest, over all layers.
    changed = total = 0
    with torch.no_grad():
        for name, new_name in zip(weighted, names):
            w = rounded.get_submodule(new_name).weight
            changed += int((w - nearest.get_submodule(name).weight).abs().gt(steps[name] / 2).sum())
            total += w.numel()
    result = {
        "bits": bits, "calibration": args.calibration, "iterations": args.iterations,
        "seed": args.seed, "nearest": nearest_scores, "aimet": aimet_scores,
        "aimet_seconds": seconds, "aimet_version": __import__("aimet_torch").__version__,
        "torch_threads": torch.get_num_threads(),
        "aimet_changed_from_nearest": changed, "weights": total,
    }
    print(f"| W{bits} per channel, {args.calibration} crops, {args.iterations} iterations "
          f"| top-1 agreement | top-5 agreement | KL | time |")
    print("|---|---|---|---|---|")
    for k, s in (("nearest", nearest_scores), ("AIMET AdaRound", aimet_scores)):
        t = f"{seconds:.0f} s" if k != "nearest" else ""
        print(f"| {k} | {s['top1']:.2f} % | {s['top5']:.2f} % | {s['kl']:.4f} | {t} |")
    print(f"AIMET rounds {changed} of {total} weights otherwise than to nearest")
    os.makedirs("out/efficientnet", exist_ok=True)
    with open(f"out/efficientnet/aimet_w{bits}.json", "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
