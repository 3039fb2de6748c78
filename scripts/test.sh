#!/usr/bin/env bash
# The test command (the same as CI): builds resnet_fused against the CUDA build of torch (the
# CUDA kernels compile even with no GPU here; their GPU tests skip) with the emulator build of those
# kernels (resnet_fused._emu: they run on the CPU, checked), and runs the whole suite; then against
# the CPU-only torch, with Ray Serve (pip install .[serve]), and runs it again (torchvision-dependent
# tests skip there, the Ray Serve test in the first run).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
VENV_CUDA=${VENV_CUDA:-.venv}
VENV_CPU=${VENV_CPU:-.venv-cpu}
start=$SECONDS

make_venv "$VENV_CUDA" cuda
RESNET_FUSED_EMU=${RESNET_FUSED_EMU:-1} install_here "$VENV_CUDA" "${RESNET_FUSED_CUDA:-1}"
echo "== tests (CUDA build of torch) after $((SECONDS - start)) s"
"$VENV_CUDA/bin/pytest" tests -q -p no:cacheprovider -W ignore::UserWarning -W ignore::DeprecationWarning -rs --durations=10

if [ "${SKIP_CPU_BUILD:-0}" != 1 ]; then
  make_venv "$VENV_CPU" cpu
  # with the [serve] extra (Ray Serve, ~250 MB): its test runs here and skips in the CUDA venv
  install_here "$VENV_CPU" 0 serve
  echo "== tests (CPU-only torch) after $((SECONDS - start)) s"
  "$VENV_CPU/bin/pytest" tests -q -p no:cacheprovider -W ignore::UserWarning -W ignore::DeprecationWarning -rs --durations=10
fi
echo "== done in $((SECONDS - start)) s"
