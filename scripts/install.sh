#!/usr/bin/env bash
# Installs the project and everything it needs into the venv given as $1 (default .venv). Repeatable.
set -euo pipefail
VENV=${1:-.venv}
cd "$(dirname "$0")/.."
PIP="$VENV/bin/pip"
# torch is pinned to the CPU wheel that lies on this machine's disk; never ask for a newer one.
"$PIP" install -q "torch==2.13.0"
"$PIP" install -q -e ".[onnx,nir,dev]"
# snnTorch reads NIR files: the peer check of our NIR export (tests/test_nir.py). --no-deps: its torch is ours.
"$PIP" install -q --no-deps "snntorch==1.0.0" "nirtorch==2.6"
if [ -f scripts/install_lava.sh ]; then bash scripts/install_lava.sh "$VENV"; fi
# lava-dl 0.6.0 (netx), patched minimally for Python 3.11 / torch 2.13 CPU: see the script's header.
if [ -f scripts/install_lava_dl.sh ]; then bash scripts/install_lava_dl.sh "$VENV"; fi
"$VENV/bin/python" -c "import stata_deploy, torch; print('stata-deploy installed; torch', torch.__version__)"
