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

mkdir -p "$CACHE"
if [ ! -f "$CACHE/$DL_WHEEL" ]; then
    "$PY" -m pip download -q --no-deps --ignore-requires-python "lava-dl==$DL_VERSION" -d "$CACHE"
fi
echo "$DL_SHA256  $CACHE/$DL_WHEEL" | sha256sum -c --quiet - || {
    echo "install_lava_dl.sh: checksum mismatch for $CACHE/$DL_WHEEL (expected sha256 $DL_SHA256); refusing to install" >&2
    rm -f "$CACHE/$DL_WHEEL"
    exit 1
}

"$PY" - "$CACHE/$DL_WHEEL" "$CACHE" <<'PYEOF'
import base64, hashlib, re, sys, zipfile, pathlib

src, cache = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
old_v, new_v = "0.6.0", "0.6.0+py311"
old_di, new_di = f"lava_dl-{old_v}.dist-info", f"lava_dl-{new_v}.dist-info"
out = cache / f"lava_dl-{new_v}-py3-none-any.whl"

zin = zipfile.ZipFile(src)
files = {}
for info in zin.infolist():
    if info.is_dir():
        continue
    name = info.filename
    data = zin.read(name)
    if name.startswith(old_di + "/"):
        name = new_di + name[len(old_di):]
    files[name] = data

# 1. slayer/__init__.py: the object_detection import (torchvision, cv2) goes, nothing else
init = "lava/lib/dl/slayer/__init__.py"
text = files[init].decode()
text, n = re.subn(r"^from \. import object_detection as obd\n", "", text, flags=re.M)
text, m = re.subn(r",\n    'obd'\n", "\n", text)
if (n, m) != (1, 1):
    sys.exit(f"install_lava_dl.sh: unexpected slayer/__init__.py (import lines {n}, __all__ entries {m}; expected 1, 1)")
files[init] = text.encode()

# 2. METADATA: version, Requires-Python, the requirements it really has here
md = new_di + "/METADATA"
text = files[md].decode()
text, n1 = re.subn(r"^Version: 0\.6\.0$", f"Version: {new_v}", text, flags=re.M)
text, n2 = re.subn(r"^Requires-Python: .*$", "Requires-Python: >=3.10", text, flags=re.M)
dropped = ("torch", "torchvision", "opencv-python-headless", "ninja", "pytest", "unittest2", "pillow")
text, n3 = re.subn(r"^Requires-Dist: (%s) \(.*\)\n" % "|".join(map(re.escape, dropped)), "", text, flags=re.M)
if (n1, n2, n3) != (1, 1, len(dropped)):
    sys.exit(f"install_lava_dl.sh: unexpected METADATA layout ({n1}, {n2}, {n3})")
files[md] = text.encode()

# 3. RECORD regenerated from the actual bytes
rec = new_di + "/RECORD"
lines = []
for name, data in files.items():
    if name == rec:
        continue
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    lines.append(f"{name},sha256={digest},{len(data)}")
lines.append(f"{rec},,")
files[rec] = ("\n".join(lines) + "\n").encode()

tmp = out.with_suffix(".tmp")
with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zout:
    for name, data in files.items():
        zout.writestr(name, data)
tmp.replace(out)
print(f"patched wheel: {out.name} (slayer object_detection import removed, requirements trimmed)")
PYEOF

"$PY" -m pip install -q --no-index --find-links "$CACHE" --force-reinstall --no-deps "lava-dl==0.6.0+py311"
"$PY" -m pip check
"$PY" -c "import lava.lib.dl.netx, lava.lib.dl.slayer; import importlib.metadata as m; print('lava-dl installed:', m.version('lava-dl'))"
