#!/usr/bin/env bash
# The prepared recipe check for a lent GPU: `tools/gpu/recipe.sh [--dry-run] --out FILE [--fmnist-root DIR]`.
# Uses .venv/bin/python when present, else python3 (a GPU machine's own PyTorch).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
py=python3
[ -x .venv/bin/python ] && py=.venv/bin/python
exec "$py" tools/gpu/recipe.py "$@"
