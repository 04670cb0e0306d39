#!/usr/bin/env bash
# Fetches a second calibration set for the `efficientnet` example: 512 crops of 26 natural
# photographs (landscapes, flowers, insects, a bird, dogs, a raccoon, objects indoors) instead
# of the textures and scientific images of `fetch.sh`'s calibration set, which is far from
# ImageNet's photographs. The evaluation crops are untouched (fetch.sh); none of these
# photographs is an evaluation photograph. Used by `--calibration-photos natural`.
#
# Sources (licences in SOURCES.md), versions pinned and SHA-256 checked:
# - Debian bookworm's `lomiri-wallpapers-16.04`, `lomiri-wallpapers-20.04` and
#   `mate-backgrounds` packages (`apt-get download`: a Debian or Ubuntu system with the
#   bookworm archive in its sources; nothing is installed);
# - the `scipy==1.9.3` wheel from PyPI (its `scipy/misc/face.dat`, the raccoon photograph);
# - the `pillow==11.2.1` wheel to decode and crop (unpacked, not installed).
#
# Writes `natural.bin` (u8 RGB, `[512, 224, 224, 3]`) and `natural.json` into
# `out/data/efficientnet/` under the repository root (or the folder given as $1).
#
#     bash crates/adaround-examples/examples/data/efficientnet/fetch_natural.sh
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../../../../.." && pwd)"
dest="${1:-$root/out/data/efficientnet}"
mkdir -p "$dest"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

command -v apt-get >/dev/null && command -v dpkg-deb >/dev/null || {
    echo "fetch_natural.sh needs apt-get and dpkg-deb (Debian or Ubuntu)" >&2
    exit 1
}
# As root, apt warns that the download is unsandboxed: harmless here, so not shown.
if ! (cd "$tmp" && apt-get download -q mate-backgrounds=1.26.0-1 \
    lomiri-wallpapers-16.04=20.04.0-2 lomiri-wallpapers-20.04=20.04.0-2 >"$tmp/apt.log" 2>&1); then
    cat "$tmp/apt.log" >&2
    echo "apt-get download failed: these versions are in Debian bookworm (sources.list)" >&2
    exit 1
fi
(cd "$tmp" && sha256sum --check --quiet <<'SUMS'
7bf4c2209f34b4f61ba6d24c8b58c28b361e82e4b943aae6d42c030169af9e04  mate-backgrounds_1.26.0-1_all.deb
a99ff6a3bfe451e4cc0682ecb3cc82e71740626d59e4845ae34a0a0e45421eab  lomiri-wallpapers-16.04_20.04.0-2_all.deb
d44e89b8473aafe64a5b678f014862dc31335aaaf18665c544d985d854f1a709  lomiri-wallpapers-20.04_20.04.0-2_all.deb
SUMS
)
python3 -m pip download --quiet --no-deps --only-binary=:all: --dest "$tmp" scipy==1.9.3 pillow==11.2.1

photos="$tmp/photos"
mkdir -p "$photos"
for deb in "$tmp"/*.deb; do
    dpkg-deb -x "$deb" "$tmp/deb"
done
find "$tmp/deb/usr/share/backgrounds" -type f \( -name '*.jpg' -o -name '*.png' \) -exec cp {} "$photos/" \;
python3 - "$tmp" <<'PY'
import bz2, glob, os, sys, zipfile
tmp = sys.argv[1]
for prefix in ["scipy", "pillow"]:
    found = glob.glob(os.path.join(tmp, prefix + "-*.whl"))
    assert len(found) == 1, (prefix, found)
    with zipfile.ZipFile(found[0]) as z:
        if prefix == "scipy":
            # 1024x768 RGB, u8, bz2-compressed (how scipy.misc.face reads it).
            open(os.path.join(tmp, "photos", "face.rgb"), "wb").write(bz2.decompress(z.read("scipy/misc/face.dat")))
        else:
            z.extractall(os.path.join(tmp, "pillow"))
PY
PYTHONPATH="$tmp/pillow" python3 "$here/make_images.py" --natural "$photos" "$dest"
(cd "$dest" && sha256sum --check --quiet "$here/checksums_natural.sha256")
echo "wrote $dest: natural.bin, natural.json (checked)"
