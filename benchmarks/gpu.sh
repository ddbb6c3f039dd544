#!/usr/bin/env bash
# GPU benchmark in one script, for a CUDA machine without internet:
#   benchmarks/gpu.sh            (from the repository root)
# Installs the project into .venv-gpu from the package index, or from a local wheel folder when
# QUANTKIT_WHEELS is set (pip --no-index --find-links), then benchmarks the stablelm-3b and -7b shapes
# and writes benchmarks/results/gpu-<gpu>.{json,md}. Budget: under 8 minutes on an H100/H200-class GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv-gpu}
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
  if [ -n "${QUANTKIT_WHEELS:-}" ]; then
    "$VENV/bin/pip" install --no-index --find-links "$QUANTKIT_WHEELS" -e '.[gpu]'
  else
    "$VENV/bin/pip" install -e '.[gpu]'
  fi
fi
export QUANTKIT_CACHE=${QUANTKIT_CACHE:-$PWD/.cache/quantkit}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
"$VENV/bin/python" -m benchmarks.gpu_bench "$@"
