#!/usr/bin/env bash
# GPU readiness check: every method trains and evaluates on the demo world on the GPU (bf16 autocast),
# then the real-size timings (feature extraction, each method's step both ways, DomainFusion's LDM
# work) with CUDA peak memory. A few minutes on one H100/H200; exits non-zero on any error.
#
#   scripts/gpu_check.sh                       # writes gpu_check/gpu_check.json and gpu_check/gpu_check.log
#   scripts/gpu_check.sh --precision fp32      # any scripts/gpu_check.py option passes through
#   PY=.venv/bin/python GPU_CHECK_DIR=/scratch/gc scripts/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python}
DIR=${GPU_CHECK_DIR:-gpu_check}
mkdir -p "$DIR"
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
export PYTHONUNBUFFERED=1
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$DIR/nvidia-smi.csv"
else
  echo "gpu_check: nvidia-smi not found; torch decides whether a GPU is visible" >&2
fi
"$PY" scripts/gpu_check.py --out "$DIR/gpu_check.json" --work "$DIR/work" "$@" 2>&1 | tee "$DIR/gpu_check.log"
