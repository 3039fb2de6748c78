#!/usr/bin/env bash
# The main job: set up (CUDA build of torch + torchvision, resnet_fused built against it),
# fuse a ResNet-50, show that fused and eager agree, and how fast each is.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
VENV=${VENV_CUDA:-.venv}
make_venv "$VENV" cuda
VENV=$(cd "$VENV" && pwd)
if ! (cd / && "$VENV/bin/python" -c "import resnet_fused") 2>/dev/null; then
  install_here "$VENV"
fi
# Run from outside the checkout, so that Python imports the installed package (with its
# compiled kernels), not the source folder of the same name.
cd / && exec "$VENV/bin/python" -m resnet_fused "$@"
