# Shared by scripts/demo.sh and scripts/test.sh: makes the virtual environments they use.
# Source it; then call make_venv DIR cuda|cpu.
set -euo pipefail

PY=${PYTHON:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
TORCHVISION_VERSION=${TORCHVISION_VERSION:-0.28.0}
TEST_DEPS="pytest hypothesis numpy scikit-learn expecttest ninja matplotlib tqdm psutil"

# pip with the machine's configuration ignored: the registry's CUDA build of torch, not a
# CPU-only wheel that a configured find-links folder may prefer.
pip_isolated() {
  local venv=$1; shift
  local cert=()
  [ -f /etc/ssl/certs/ca-certificates.crt ] && cert=(--cert /etc/ssl/certs/ca-certificates.crt)
  "$venv/bin/python" -m pip --isolated --disable-pip-version-check "${cert[@]}" "$@"
}

# make_venv DIR cuda|cpu: a virtual environment with torch (CUDA build + torchvision, or the
# CPU-only build) and the test/benchmark dependencies. Reused when it already has them.
make_venv() {
  local venv=$1 kind=$2
  if [ ! -x "$venv/bin/python" ]; then
    "$PY" -m venv "$venv"
  fi
  venv=$(cd "$venv" && pwd)
  if "$venv/bin/python" -c "import torch, sys; sys.exit(0 if torch.__version__.startswith('$TORCH_VERSION') and (torch.version.cuda is not None) == ('$kind' == 'cuda') else 1)" 2>/dev/null; then
    echo "== $venv: torch $("$venv/bin/python" -c 'import torch; print(torch.__version__)') already there"
  elif [ "$kind" = cuda ]; then
    echo "== $venv: installing the CUDA build of torch $TORCH_VERSION and torchvision $TORCHVISION_VERSION"
    pip_isolated "$venv" install -q "torch==$TORCH_VERSION" "torchvision==$TORCHVISION_VERSION"
  else
    echo "== $venv: installing the CPU-only build of torch $TORCH_VERSION"
    "$venv/bin/python" -m pip install -q --disable-pip-version-check "torch==$TORCH_VERSION+cpu" \
      || "$venv/bin/python" -m pip install -q --disable-pip-version-check "torch==$TORCH_VERSION"
  fi
  "$venv/bin/python" -m pip install -q --disable-pip-version-check setuptools wheel $TEST_DEPS
}

# install_here VENV [RESNET_FUSED_CUDA] [EXTRAS]: the README's install command, in VENV
# (`pip install .`, or `pip install .[EXTRAS]`); RESNET_FUSED_EMU=1 in the environment adds the
# emulator build of the CUDA kernels (resnet_fused._emu).
install_here() {
  local venv cuda=${2:-auto} target=. emu=${RESNET_FUSED_EMU:-0}
  [ -n "${3:-}" ] && target=".[$3]"
  venv=$(cd "$1" && pwd)
  rm -rf build
  echo "== pip install $target into $venv (RESNET_FUSED_CUDA=$cuda RESNET_FUSED_EMU=$emu)"
  local log
  log=$(mktemp)
  if ! RESNET_FUSED_CUDA=$cuda RESNET_FUSED_EMU=$emu MAX_JOBS=${MAX_JOBS:-2} "$venv/bin/python" -m pip install \
      --disable-pip-version-check -v "$target" >"$log" 2>&1; then
    tail -n 80 "$log"
    echo "== install FAILED (full log: $log)"
    return 1
  fi
  grep -E "resnet_fused build settings|^ +[A-Z_]+ {2,}" "$log" || true
  # (from the checkout's root: the src/ layout means this imports the installed package)
  ("$venv/bin/python" -c "import resnet_fused as rf, importlib.util as u; print('== resnet_fused', rf.__version__, 'from', rf.__file__, '| CUDA kernels compiled:', rf.cuda_compiled(), '| GPU usable:', rf.cuda_available(), '| emulator build:', u.find_spec('resnet_fused._emu') is not None)")
}
