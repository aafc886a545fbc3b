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

source scripts/_wheels.sh
fetch_checked lava-nc "$LAVA_VERSION" "$LAVA_WHEEL" "$LAVA_SHA256"
# Patch + repack (scripts/patch_wheel.py: each substitution must match exactly the given number of times)
"$PY" scripts/patch_wheel.py "$CACHE/$LAVA_WHEEL" "$CACHE" --version 0.10.0+py311 --requires-python ">=3.10" \
    --sub lava/magma/compiler/var_model.py '^from dataclasses import dataclass, InitVar$' \
          'from dataclasses import dataclass, InitVar, field' 1 \
    --sub lava/magma/compiler/var_model.py ': ByteEncoder = ByteEncoder\(\)' \
          ': ByteEncoder = field(default_factory=ByteEncoder)' 8

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
