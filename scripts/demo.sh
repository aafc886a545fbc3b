#!/usr/bin/env bash
# The main job on the embedded default dataset (scikit-learn digits, offline):
# train (unpruned baseline + STATA keep 0.5) -> calibrate static masks -> export NIR and ONNX
# -> run on Lava and ONNX Runtime (compared spike for spike with torch) -> energy report vs the baseline.
set -euo pipefail
VENV=${1:-.venv}
RUN=${2:-runs/demo}
LIMIT=${DEMO_LIMIT:-100}
cd "$(dirname "$0")/.."
SD="$VENV/bin/stata-deploy"
step() { printf '\n== %s\n' "$*"; }

step "1/6 train an unpruned baseline and a STATA-pruned model (keep 0.5, intra+inter alignment) on digits"
# --force: the demo regenerates its own runs (without it, train refuses to replace an existing run)
"$SD" train --dataset digits --model spikformer-tiny --out "$RUN/base" --force
"$SD" train --dataset digits --model spikformer-tiny --prune stata --keep 0.5 --align intra,inter --out "$RUN/stata" --force

step "2/6 freeze static per-timestep token masks (accuracy static vs dynamic)"
"$SD" calibrate "$RUN/stata"

step "3/6 export to NIR and ONNX (static masks embedded)"
"$SD" export "$RUN/stata" --to nir
"$SD" export "$RUN/stata" --to onnx

step "4/6 run on ONNX Runtime, compared with torch spike for spike"
"$SD" run "$RUN/stata/model.onnx" --runtime onnxruntime --dataset digits --limit "$LIMIT" --compare torch

step "5/6 run on the Lava simulator (CPU), compared with torch spike for spike; Loihi energy of what Lava computed"
"$SD" run "$RUN/stata/model.nir" --runtime lava --dataset digits --limit "$LIMIT" --compare torch --hardware loihi

step "6/6 synaptic operations and energy, pruned vs unpruned"
"$SD" energy "$RUN/stata" --hardware 45nm --baseline "$RUN/base" --plot "$RUN/energy_45nm.png"
# the same inputs and static masks as step 5: the same table as the energy Lava's own run computed
"$SD" energy "$RUN/stata" --hardware loihi --baseline "$RUN/base" --masks static --dataset digits --limit "$LIMIT"
printf '\nDemo finished: runs in %s, energy plot in %s/energy_45nm.png\n' "$RUN" "$RUN"
