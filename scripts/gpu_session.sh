#!/usr/bin/env bash
# For a session that is lent a GPU (the device tool): build in place with the machine's own
# torch, run the GPU tests, compute-sanitizer over the op tests, and the GPU benchmarks.
# Results and logs go to $OUT (or ./gpu_out). Usage on the device machine:
#   bash scripts/gpu_session.sh [build|test|sanitize|bench|all]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
what=${1:-all}
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1

if [[ $what == build || $what == all ]]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
  git rev-parse --short HEAD 2>/dev/null | tee -a "$OUT/gpu.txt"
  TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} RESNET_FUSED_CUDA=1 MAX_JOBS=16 \
    $PY setup.py build_ext --inplace 2>&1 | tail -n 30 | tee "$OUT/build.log"
fi
if [[ $what == test || $what == all ]]; then
  $PY -m pytest tests -q -x -p no:cacheprovider -W ignore::UserWarning -W ignore::DeprecationWarning \
    -k "cuda or not cpu" -rs 2>&1 | tail -n 40 | tee "$OUT/tests.log"
fi
if [[ $what == sanitize || $what == all ]]; then
  for tool in memcheck racecheck initcheck; do
    compute-sanitizer --tool $tool --error-exitcode 1 $PY -m pytest tests/test_ops.py -q -x -p no:cacheprovider \
      -W ignore::UserWarning -k "cuda and not opcheck" 2>&1 | tail -n 15 | tee "$OUT/sanitizer_$tool.log"
  done
fi
if [[ $what == bench || $what == all ]]; then
  $PY -m resnet_fused.bench --device cuda --dtype float16 --batch 1 8 32 128 256 --out "$OUT" 2>&1 | tail -n 30
  $PY -m resnet_fused.bench --device cuda --dtype float16 --layers --batch 256 --out "$OUT" 2>&1 | tail -n 30
fi
