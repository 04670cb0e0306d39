#!/usr/bin/env python3
"""Writes the EfficientNet parity test's fixture: the centre crops of the first four evaluation
photographs (u8 RGB, gzip) and PyTorch's float logits for them:

    .venv/bin/python crates/adaround-examples/benches/efficientnet/parity_fixture.py

into crates/adaround-examples/tests/data/efficientnet_parity.{bin.gz,json}.
"""
import gzip
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from torch_model import classes, crops, float_model, logits  # noqa: E402

N = 4
out = "crates/adaround-examples/tests/data/efficientnet_parity"
_, evaluation, manifest = crops()
pixels = evaluation[:N]
with gzip.GzipFile(out + ".bin.gz", "wb", mtime=0) as f:
    f.write(pixels.tobytes())
result = logits(float_model(), pixels)
names = classes()
json.dump({
    "photos": [c["photo"] for c in manifest["evaluation"][:N]],
    "torch": torch.__version__,
    "top1": [names[int(i)] for i in result.argmax(1)],
    "logits": [[round(float(v), 6) for v in row] for row in result],
}, open(out + ".json", "w"))
print("top-1:", [(int(i), names[int(i)]) for i in result.argmax(1)])
