"""Writes torch_tiny.pt: a PyTorch state_dict (`fc` a Linear 4 -> 3, `conv` a Conv2d
1 -> 2, 3x3) in the zip format of `torch.save`, without needing torch itself:
(a pickled dict whose tensors are rebuilt by `torch._utils._rebuild_tensor_v2` from storages
under `data/`, as burn-store's PyTorch reader expects).

    python3 tests/data/torch_tiny.py

Values: `fc.weight[o, i] = o + i / 10`, `fc.bias[o] = -o`, `conv.weight` = 0.01 * arange,
`conv.bias` = [0.5, -0.5].
"""
import collections
import os
import pickle
import sys
import types
import zipfile

import numpy as np

# Stand-ins for the two torch globals the pickle names; pickle records them by module and name.
torch = types.ModuleType("torch")
torch_utils = types.ModuleType("torch._utils")


class FloatStorage:
    pass


def _rebuild_tensor_v2(*args):
    raise RuntimeError("only for pickling")


FloatStorage.__module__ = "torch"
_rebuild_tensor_v2.__module__ = "torch._utils"
torch.FloatStorage = FloatStorage
torch._utils = torch_utils
torch_utils._rebuild_tensor_v2 = _rebuild_tensor_v2
sys.modules["torch"] = torch
sys.modules["torch._utils"] = torch_utils


class Storage:
    def __init__(self, key, values):
        self.key, self.values = key, values


class Tensor:
    def __init__(self, storage, shape):
        self.storage, self.shape = storage, shape

    def __reduce__(self):
        stride = tuple(int(np.prod(self.shape[i + 1:])) for i in range(len(self.shape)))
        args = (self.storage, 0, tuple(self.shape), stride, False, collections.OrderedDict())
        return (_rebuild_tensor_v2, args)


class Pickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, Storage):
            return ("storage", FloatStorage, obj.key, "cpu", obj.values.size)
        return None


tensors = {
    "fc.weight": np.array([[o + i / 10 for i in range(4)] for o in range(3)], np.float32),
    "fc.bias": -np.arange(3, dtype=np.float32),
    "conv.weight": (0.01 * np.arange(18, dtype=np.float32)).reshape(2, 1, 3, 3),
    "conv.bias": np.array([0.5, -0.5], np.float32),
}
state = collections.OrderedDict()
storages = []
for key, (name, values) in enumerate(tensors.items()):
    storage = Storage(str(key), values)
    storages.append(storage)
    state[name] = Tensor(storage, values.shape)

path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "torch_tiny.pt")
with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
    buffer = __import__("io").BytesIO()
    Pickler(buffer, protocol=2).dump(state)
    archive.writestr("torch_tiny/data.pkl", buffer.getvalue())
    archive.writestr("torch_tiny/byteorder", "little")
    for storage in storages:
        archive.writestr(f"torch_tiny/data/{storage.key}", storage.values.astype("<f4").tobytes())
    archive.writestr("torch_tiny/version", "3\n")
print("wrote", path)
