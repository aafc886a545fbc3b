#!/usr/bin/env bash
# Installs Lava (lava-nc 0.10.0, CPU simulator) into the venv given as $1 (default .venv). Repeatable and checksummed.
#
# Why a script and not a pip extra: every lava-nc release declares Requires-Python <3.11, and 0.10.0 (the newest)
# fails at import on Python 3.11 because lava/magma/compiler/var_model.py declares dataclass fields with a mutable
# default (`x: ByteEncoder = ByteEncoder()`), which Python 3.11 rejects. So this script
#   1. downloads the original wheel from PyPI (`pip download --no-deps --ignore-requires-python`),
#   2. verifies its sha256 against the pin below (refuses anything else),
#   3. patches it minimally: in var_model.py `= ByteEncoder()` -> `= field(default_factory=ByteEncoder)` (plus `field`
#      in the dataclasses import), METADATA `Requires-Python: >=3.10`, local version `0.10.0+py311`,
#   4. repacks it with a regenerated RECORD (sha256 + size of every file) and installs it with --find-links and a
#      constraints file, together with Lava's real runtime dependencies (numpy<2, networkx<=2.8.7, asteval<0.10,
#      scipy, scikit-learn). torch stays pinned at 2.13.0 and is never upgraded or downgraded.
# It does nothing when `import lava.magma.core.run_configs` already works in that venv (set LAVA_FORCE=1 to redo).
# Cache: $LAVA_CACHE (default <repo>/.lava_wheel, gitignored).
set -euo pipefail
VENV=${1:-.venv}
cd "$(dirname "$0")/.."
VENV=$(cd "$VENV" && pwd)
PY="$VENV/bin/python"
LAVA_VERSION=0.10.0
LAVA_WHEEL=lava_nc-0.10.0-py3-none-any.whl
LAVA_SHA256=d646723e888a72868dac77d31beee3eef1f540366a8c1a8578a2dc3302470926
CACHE=${LAVA_CACHE:-$PWD/.lava_wheel}

if [ "${LAVA_FORCE:-0}" != "1" ] && "$PY" -c "import lava.magma.core.run_configs, lava.proc.dense.process" 2>/dev/null; then
    echo "lava already importable in $VENV: $("$PY" -c 'import importlib.metadata as m; print("lava-nc", m.version("lava-nc"))')"
    exit 0
fi

mkdir -p "$CACHE"
if [ ! -f "$CACHE/$LAVA_WHEEL" ]; then
    "$PY" -m pip download -q --no-deps --ignore-requires-python "lava-nc==$LAVA_VERSION" -d "$CACHE"
fi
echo "$LAVA_SHA256  $CACHE/$LAVA_WHEEL" | sha256sum -c --quiet - || {
    echo "install_lava.sh: checksum mismatch for $CACHE/$LAVA_WHEEL (expected sha256 $LAVA_SHA256); refusing to install" >&2
    rm -f "$CACHE/$LAVA_WHEEL"
    exit 1
}

# Patch + repack (pure Python, zipfile; no extra build tools needed).
"$PY" - "$CACHE/$LAVA_WHEEL" "$CACHE" <<'PYEOF'
import base64, hashlib, re, sys, zipfile, pathlib

src, cache = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
old_v, new_v = "0.10.0", "0.10.0+py311"
old_di, new_di = f"lava_nc-{old_v}.dist-info", f"lava_nc-{new_v}.dist-info"
out = cache / f"lava_nc-{new_v}-py3-none-any.whl"

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

# 1. var_model.py: mutable dataclass defaults -> default_factory (exactly 8 fields; fail loudly if upstream differs)
vm = "lava/magma/compiler/var_model.py"
text = files[vm].decode()
text, n_imp = re.subn(r"^from dataclasses import dataclass, InitVar$",
                      "from dataclasses import dataclass, InitVar, field", text, flags=re.M)
text, n_fix = re.subn(r": ByteEncoder = ByteEncoder\(\)", ": ByteEncoder = field(default_factory=ByteEncoder)", text)
if (n_imp, n_fix) != (1, 8):
    sys.exit(f"install_lava.sh: unexpected var_model.py (import fixes {n_imp}, field fixes {n_fix}; expected 1, 8)")
files[vm] = text.encode()

# 2. METADATA: version and Requires-Python
md = new_di + "/METADATA"
text = files[md].decode()
text, n1 = re.subn(r"^Version: 0\.10\.0$", f"Version: {new_v}", text, flags=re.M)
text, n2 = re.subn(r"^Requires-Python: .*$", "Requires-Python: >=3.10", text, flags=re.M)
if (n1, n2) != (1, 1):
    sys.exit("install_lava.sh: unexpected METADATA layout")
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
print(f"patched wheel: {out.name} (var_model.py: {n_fix} dataclass defaults fixed)")
PYEOF

CONSTRAINTS="$CACHE/constraints.txt"
cat > "$CONSTRAINTS" <<'EOF'
numpy>=1.24.4,<2
networkx<=2.8.7
asteval>=0.9.31,<0.10
scipy<2
scikit-learn>=1.5,<2
torch==2.13.0
EOF
# Lava's own runtime requirements (from its METADATA), resolved against the constraints; then lava itself, no deps.
"$PY" -m pip install -q -c "$CONSTRAINTS" "asteval>=0.9.31,<0.10" "networkx<=2.8.7" "numpy>=1.24.4,<2" \
    "scikit-learn>=1.5,<2" "scipy>=1.10.1,<2"
"$PY" -m pip install -q --no-index --find-links "$CACHE" -c "$CONSTRAINTS" --force-reinstall --no-deps \
    "lava-nc==0.10.0+py311"
"$PY" -m pip check
"$PY" -c "import lava.magma.core.run_configs, lava.proc.dense.process, lava.proc.lif.process; import importlib.metadata as m; print('lava installed: lava-nc', m.version('lava-nc'))"
