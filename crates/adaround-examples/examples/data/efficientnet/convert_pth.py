#!/usr/bin/env python3
"""Converts a PyTorch `state_dict` file in the legacy (pre-1.6, non-zip) format to SafeTensors,
with the Python standard library alone (no torch):

    python3 convert_pth.py IN.pth OUT.safetensors

The EfficientNet-Lite0 file stores most kernels with permuted strides (its weights were
converted from TensorFlow: `_conv_stem.weight` has shape (32, 3, 3, 3) and strides
(1, 32, 288, 96)). burn-store 0.21 reads legacy files but not their strides, so it loads such
kernels scrambled; this script gathers every tensor by its strides into row-major order and
writes float32 tensors under the file's own names (`num_batches_tracked` left out).
"""
import collections
import json
import pickle
import struct
import sys

DTYPES = {"FloatStorage": ("f", 4, "F32"), "LongStorage": ("q", 8, "I64")}


class Storage:
    def __init__(self, kind, key, numel):
        self.kind, self.key, self.numel, self.values = kind, key, numel, None


class Tensor:
    def __init__(self, storage, offset, size, stride):
        self.storage, self.offset, self.size, self.stride = storage, offset, tuple(size), tuple(stride)

    def row_major(self):
        out, values = [], self.storage.values

        def walk(dim, base):
            if dim == len(self.size):
                out.append(values[base])
                return
            for i in range(self.size[dim]):
                walk(dim + 1, base + i * self.stride[dim])

        walk(0, self.offset)
        return out


def rebuild(storage, offset, size, stride, *_):
    return Tensor(storage, offset, size, stride)


class Unpickler(pickle.Unpickler):
    def __init__(self, f, storages):
        super().__init__(f)
        self.storages = storages

    def find_class(self, module, name):
        if module == "torch._utils" and name in ("_rebuild_tensor", "_rebuild_tensor_v2"):
            return rebuild
        if module == "torch" and name in DTYPES:
            return name
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        raise pickle.UnpicklingError(f"unexpected class {module}.{name}")

    def persistent_load(self, saved_id):
        kind, storage_type, key, _location, numel, view = saved_id
        assert kind == "storage" and view is None, saved_id
        if key not in self.storages:
            self.storages[key] = Storage(storage_type, key, numel)
        return self.storages[key]


def main():
    src, dst = sys.argv[1:]
    with open(src, "rb") as f:
        assert pickle.load(f) == 0x1950A86A20F9469CFC6C, "not a legacy PyTorch file"
        pickle.load(f)  # protocol version
        pickle.load(f)  # system info
        storages = {}
        state = Unpickler(f, storages).load()
        for key in pickle.load(f):
            s = storages[key]
            code, size, _ = DTYPES[s.kind]
            (numel,) = struct.unpack("<q", f.read(8))
            assert numel == s.numel, (key, numel, s.numel)
            s.values = struct.unpack(f"<{numel}{code}", f.read(numel * size))
    header, blobs, offset = {}, [], 0
    for name, t in state.items():
        if name.endswith("num_batches_tracked"):
            continue
        assert t.storage.kind == "FloatStorage", (name, t.storage.kind)
        blob = struct.pack(f"<{len(t.row_major())}f", *t.row_major())
        header[name] = {"dtype": "F32", "shape": list(t.size), "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(dst, "wb") as out:
        out.write(struct.pack("<Q", len(text)) + text)
        for blob in blobs:
            out.write(blob)


if __name__ == "__main__":
    main()
