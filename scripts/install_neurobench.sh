#!/usr/bin/env bash
# Creates a SEPARATE venv for the NeuroBench cross-check (benchmarks/neurobench_crosscheck.py).
# NeuroBench 2.3.0 pulls snntorch, tonic, torchaudio, numba and librosa: it never goes into the main .venv.
# Usage: bash scripts/install_neurobench.sh [VENV]   (default .venv-nb)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-.venv-nb}
PY=${PY:-python3.11}
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV" || python3 -m venv "$VENV"
fi
PIP="$VENV/bin/pip"
# torch pinned to the CPU wheel this project uses; neurobench's own pins must not move it.
"$PIP" install -q "torch==2.13.0" "neurobench==2.3.0"
# The project itself without its dependencies (torch is already there; the rest it needs is small).
"$PIP" install -q "numpy>=1.24.4,<2" click tqdm safetensors "scikit-learn>=1.5,<2" matplotlib pillow
"$PIP" install -q --no-deps -e .
"$VENV/bin/python" -c "import neurobench, torch, stata_deploy; print('neurobench venv ready; torch', torch.__version__)"
