#!/usr/bin/env bash
# Installs the peer framework of benchmarks/peer_speed.py into the project venv given as $1 (default .venv):
# SpikingJelly 2.0.0 with --no-deps (its requirements would pull torchvision/torchaudio and move torch), plus the
# one pure-Python package it needs at import that the project does not already have (loguru; tqdm and numpy come
# with the project). Repeatable; refuses to leave a changed torch behind.
# Usage: bash scripts/install_peers.sh [VENV]     (or: make bench-peers)
set -euo pipefail
VENV=${1:-.venv}
cd "$(dirname "$0")/.."
PY="$VENV/bin/python"
if [ ! -x "$PY" ]; then
  echo "install_peers.sh: no venv at $VENV (make install first)" >&2
  exit 2
fi
before=$("$PY" -c "import torch; print(torch.__version__)")
"$PY" -m pip install -q --no-deps "spikingjelly==2.0.0" "loguru==0.7.3"
after=$("$PY" -c "import torch; print(torch.__version__)")
if [ "$before" != "$after" ]; then
  echo "install_peers.sh: torch changed from $before to $after; reinstall torch==2.13.0" >&2
  exit 1
fi
"$PY" -c "from spikingjelly.activation_based import neuron, functional, surrogate; import importlib.metadata as m; print('spikingjelly', m.version('spikingjelly'), 'ready; torch', '$after')" 2>&1 | grep -v "Triton not available"
