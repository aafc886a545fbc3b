#!/usr/bin/env bash
# The main job on the embedded default dataset (scikit-learn digits).
set -euo pipefail
VENV=${1:-.venv}
RUN=${2:-runs/demo}
cd "$(dirname "$0")/.."
SD="$VENV/bin/stata-deploy"
echo "== train (unpruned baseline and STATA keep 0.5) on digits"
"$SD" train --dataset digits --model spikformer-tiny --out "$RUN/base"
"$SD" train --dataset digits --model spikformer-tiny --prune stata --keep 0.5 --align intra,inter --out "$RUN/stata"
echo "== calibrate static per-timestep masks"
"$SD" calibrate "$RUN/stata"
"$SD" eval "$RUN/stata" --masks "$RUN/stata/masks.json"
