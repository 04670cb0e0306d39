"""EfficientNet-Lite0 in PyTorch, as the `efficientnet-lite-pytorch` package builds it, and the
crops of `examples/data/efficientnet/fetch.sh` as its input. Shared by the parity, export and
AIMET scripts beside this file (a venv with torch and `efficientnet-lite-pytorch==0.1.0`)."""
import json
import os

import numpy as np
import torch

MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
SIZE = 224


def data_dir():
    return os.environ.get("ADAROUND_EFFICIENTNET_DATA", "out/data/efficientnet")


def float_model():
    """The pretrained float model, in evaluation mode, from the fetched weights."""
    from efficientnet_lite_pytorch import EfficientNet
    model = EfficientNet.from_name("efficientnet-lite0")
    state = torch.load(os.path.join(data_dir(), "efficientnet-lite0-57934424.pth"), map_location="cpu")
    model.load_state_dict(state)
    return model.eval()


def crops():
    """(calibration, evaluation) u8 crops `[n, 224, 224, 3]` and the manifest."""
    d = data_dir()
    manifest = json.load(open(os.path.join(d, "images.json")))
    pixels = np.fromfile(os.path.join(d, "images.bin"), dtype=np.uint8).reshape(-1, SIZE, SIZE, 3)
    n = len(manifest["calibration"])
    return pixels[:n], pixels[n:], manifest


def normalise(pixels):
    """u8 `[n, 224, 224, 3]` -> float `[n, 3, 224, 224]`: `(x / 255 - mean) / std`."""
    x = (pixels.astype(np.float32) / np.float32(255.0) - MEAN) / STD
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def classes():
    return json.load(open(os.path.join(data_dir(), "classes.json")))


@torch.no_grad()
def logits(model, pixels, batch=64):
    return torch.cat([model(normalise(pixels[i:i + batch])) for i in range(0, len(pixels), batch)])
