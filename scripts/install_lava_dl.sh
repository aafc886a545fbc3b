#!/usr/bin/env bash
# Installs lava-dl 0.6.0 (netx: the HDF5 network format Loihi users load) into the venv $1 (default .venv), beside
# the patched lava-nc of scripts/install_lava.sh. Repeatable and checksummed.
#
# Why patched: lava-dl 0.6.0 (the newest; archived upstream in 2026-05) declares Requires-Python <3.11 and pins
# torch <2.4 and torchvision <0.19, which would pull a CUDA torch. What it really needs here is numpy, scipy, h5py,
# matplotlib and lava-nc 0.10.0; torch 2.13.0 (CPU, ours) runs it. So this script
#   1. downloads the original wheel from PyPI (`pip download --no-deps --ignore-requires-python`),
#   2. verifies its sha256 against the pin below (refuses anything else),
#   3. patches it minimally:
#      - lava/lib/dl/slayer/__init__.py: drops the one line `from . import object_detection as obd` (the only
#        importer of torchvision and OpenCV; PyPI's torchvision cannot load against the CPU torch:
#        "operator torchvision::nms does not exist"); `slayer.obd` is therefore not available,
#      - METADATA: `Requires-Python: >=3.10`, local version `0.6.0+py311`, and Requires-Dist without torch /
#        torchvision / opencv-python-headless (object detection only) / ninja (CUDA kernel builds only) / pytest /
#        unittest2 (its own tests) / the pillow<11 cap,
#   4. repacks it with a regenerated RECORD and installs it with --no-deps.
# It does nothing when `import lava.lib.dl.netx` already works in that venv (set LAVA_FORCE=1 to redo).
set -euo pipefail
VENV=${1:-.venv}
cd "$(dirname "$0")/.."
VENV=$(cd "$VENV" && pwd)
PY="$VENV/bin/python"
DL_VERSION=0.6.0
DL_WHEEL=lava_dl-0.6.0-py3-none-any.whl
DL_SHA256=bcb448f2bb85dc0da4b4dbbbae16543d2a978c1da7279acc522ad621fc68c437
CACHE=${LAVA_CACHE:-$PWD/.lava_wheel}

if [ "${LAVA_FORCE:-0}" != "1" ] && "$PY" -c "import lava.lib.dl.netx" 2>/dev/null; then
    echo "lava-dl already importable in $VENV: $("$PY" -c 'import importlib.metadata as m; print("lava-dl", m.version("lava-dl"))')"
    exit 0
fi

source scripts/_wheels.sh
fetch_checked lava-dl "$DL_VERSION" "$DL_WHEEL" "$DL_SHA256"
"$PY" scripts/patch_wheel.py "$CACHE/$DL_WHEEL" "$CACHE" --version 0.6.0+py311 --requires-python ">=3.10" \
    --sub lava/lib/dl/slayer/__init__.py '^from \. import object_detection as obd\n' '' 1 \
    --sub lava/lib/dl/slayer/__init__.py ",\n    'obd'\n" '\n' 1 \
    --drop-requires torch torchvision opencv-python-headless ninja pytest unittest2 pillow

"$PY" -m pip install -q --no-index --find-links "$CACHE" --force-reinstall --no-deps "lava-dl==0.6.0+py311"
"$PY" -m pip check
"$PY" -c "import lava.lib.dl.netx, lava.lib.dl.slayer; import importlib.metadata as m; print('lava-dl installed:', m.version('lava-dl'))"
