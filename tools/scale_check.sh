#!/usr/bin/env bash
# The scale-out checks of docs/SCALING.md in one go, one JSON (default docs/results/scale_check.json):
#   bash tools/scale_check.sh [OUT]
# Brings this checkout's local SLURM cluster up with 8 nodes (it is restarted: stop other work on it first),
# runs the 16-rank launch with a USR2 requeue and an 8-rank resume (tools/scale_slurm.py), puts the cluster back
# down, then the 64-rank bank and the ImageNet-shaped checkpoint checks (tools/scale_check.py). ~10 minutes on 2 cores.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT="${1:-docs/results/scale_check.json}"
PY=.venv/bin/python
SLURM_JSON="$(mktemp /tmp/invprop-scale-slurm.XXXXXX.json)"
bash slurm/local-cluster.sh down >/dev/null 2>&1 || true
INVPROP_SLURM_NODES=8 INVPROP_SLURM_CPUS=8 bash slurm/local-cluster.sh up
eval "$(bash slurm/local-cluster.sh env)"
trap 'bash slurm/local-cluster.sh down >/dev/null 2>&1 || true' EXIT
"$PY" tools/scale_slurm.py --run-dir "runs/scale_slurm_$(date +%Y%m%d_%H%M%S)" --out "$SLURM_JSON"
bash slurm/local-cluster.sh down
trap - EXIT
"$PY" tools/scale_check.py --out "$OUT" --parts bank,ckpt --slurm-result "$SLURM_JSON"
rm -f "$SLURM_JSON"
