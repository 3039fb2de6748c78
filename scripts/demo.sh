#!/usr/bin/env bash
# The main job: set up (CUDA build of torch + torchvision, resnet_fused built against it),
# fuse a ResNet-50, show that fused and eager agree, and how fast each is.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
VENV=${VENV_CUDA:-.venv}
make_venv "$VENV" cuda
VENV=$(cd "$VENV" && pwd)
if ! "$VENV/bin/python" -c "import resnet_fused" 2>/dev/null; then
  install_here "$VENV"
fi
# (the package lives under src/: the checkout's root never shadows the installed one)
exec "$VENV/bin/python" -m resnet_fused "$@"
