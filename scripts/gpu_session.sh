#!/usr/bin/env bash
# Every GPU check in as few device calls as possible (a GPU is lent rarely; run this first).
# On the device machine, from the checkout's root:
#
#   bash scripts/gpu_session.sh all       # build, golden dumps, GPU tests, tactics report (resnet50
#                                         # fp16, batch 256 and 1), per-layer benchmark at batch 256
#                                         # and 1, whole-model benchmark (fp16 channels-last, batch
#                                         # 1..256), compute-sanitizer, ncu on three layers of our
#                                         # kernel: in that order (priority)
#   bash scripts/gpu_session.sh compile   # right after (the build is kept while the machine is warm):
#                                         # torch.compile max-autotune beside eager_cl and fused; at
#                                         # batch 256 alone it outran 330 s on an H100 (it was tuning
#                                         # the fc, its last op): give it a call of its own,
#                                         # BUDGET_compile=540 COMPILE_BATCHES=256
#   bash scripts/gpu_session.sh resnext   # resnext50_32x4d fp16 (our grouped kernel), batch 1 and 256
#   bash scripts/gpu_session.sh tf32      # resnet50 float32 (our TF32 kernel, TF32 allowed as PyTorch's
#                                         # default): per layer at batch 256, whole model batch 1..256
#   bash scripts/gpu_session.sh cpu       # the tests not marked cuda on this host's CPU (not CI's CPU),
#                                         # one pytest per file, the emulator's last (about 500 s in all)
#
# Stages can also be named one by one: build golden test tactics layers bench sanitize profile
# compile resnext tf32 cpu. Each stage has a time budget (BUDGET_<stage>=seconds overrides it) and the run goes
# on after a failed stage; SANITIZERS lists compute-sanitizer's tools to run; a summary table is
# printed last. Results go to $OUT (or ./gpu_out): env.txt (GPU, driver, commit, torch, CUDA, cuDNN), the golden dump,
# logs, benchmark JSON/markdown. Copy the golden file to tests/golden/ and the benchmark results
# to benchmarks/results/, and commit them.
#
# In a 15-minute lease through the device tool (at most 8 files come back from its $OUT). The
# third lease's stages took: build 64 s, golden 5, tactics 18, bench 65, test 131 (every GPU test
# file), and compile at batch 256 396 s (363 of them compiling) in a call of its own; the
# second lease's: layers 14, four sanitizers 31, tf32 42, resnext 41, profile 32. Two calls, the
# second on the warm machine (the build is kept), results in one archive each:
#
#   export R=$OUT OUT=/tmp/g; BUDGET_test=240 timeout 500 bash scripts/gpu_session.sh build golden tactics \
#     bench test sanitize layers; tar czf $R/gpu_out.tgz -C /tmp g
#   export R=$OUT OUT=/tmp/g2; BUDGET_compile=400 COMPILE_BATCHES=1 timeout 420 bash scripts/gpu_session.sh \
#     compile; tar czf $R/g2.tgz -C /tmp g2
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
# The system's gcc for every stage, not only the build: the device image's default compiler (/opt/gcc)
# links libstdc++ statically (see build below), and AOTInductor compiles C++ too (test_export).
if [[ -x /usr/bin/gcc && -x /usr/bin/g++ ]]; then export CC=/usr/bin/gcc CXX=/usr/bin/g++; fi
stages=("$@")
[[ ${#stages[@]} -eq 0 || ${stages[0]} == all ]] && stages=(build golden test tactics layers bench sanitize profile)
[[ ${stages[0]} =~ ^(compile|resnext|tf32|cpu)$ && ${#stages[@]} -eq 1 ]] && stages=(build "${stages[0]}")
declare -A RESULT SECONDS_TAKEN

run_stage() {  # name budget_seconds command...
  local name=$1 budget=$2 override="BUDGET_$1"
  budget=${!override:-$budget}
  shift 2
  local start=$SECONDS
  echo "== $name (budget ${budget}s)"
  # (timeout runs programs, not shell functions: the stages are exported and run by a child bash)
  timeout --kill-after=10 "$budget" bash -c "$*" 2>&1 | tee "$OUT/$name.log" | tail -n 25
  local rc=${PIPESTATUS[0]}
  SECONDS_TAKEN[$name]=$((SECONDS - start))
  case $rc in
    0) RESULT[$name]=passed ;;
    124 | 137) RESULT[$name]="TIMED OUT" ;;
    *) RESULT[$name]="failed (rc $rc)" ;;
  esac
}

build() {
  # Kept between calls while the machine is warm: rebuild only for another commit or tree.
  local stamp
  # (the sources only: the golden stage's dump in tests/golden must not force a rebuild)
  stamp=$(git rev-parse HEAD 2>/dev/null)-$(git status --porcelain -- csrc setup.py src 2>/dev/null | md5sum | cut -c1-8)
  if [[ -f build/.gpu_stamp && $(cat build/.gpu_stamp) == "$stamp" ]] && ls src/resnet_fused/_C*.so >/dev/null 2>&1; then
    echo "already built for $stamp"
    return 0
  fi
  # (CC/CXX: the system's gcc, set above. With the image's /opt/gcc, a wrapper of the same GCC 13
  # that links libstdc++ statically, the first error message with a number in it crashed the
  # process (std::ostream of the static copy) instead of raising: H100 lease, 2026-11-26.)
  TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} RESNET_FUSED_CUDA=1 RESNET_FUSED_EMU=1 MAX_JOBS=16 \
    $PY setup.py build_ext --inplace >"$OUT/build_full.log" 2>&1 || { tail -n 40 "$OUT/build_full.log"; return 1; }
  mkdir -p build && echo "$stamp" >build/.gpu_stamp
  grep -A1 "^WARNING: .*libstdc++" "$OUT/build_full.log"  # (setup.py's check of each extension)
  $PY - <<'EOF'
import torch, resnet_fused
print("built:", resnet_fused.__file__, "| CUDA kernels:", resnet_fused.cuda_compiled(), "| GPU usable:", resnet_fused.cuda_available())
EOF
}

environment() {
  {
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
    echo "commit $(git rev-parse --short HEAD 2>/dev/null) $(git status --porcelain 2>/dev/null | grep -q . && echo '(with local changes)')"
    $PY -c "import torch; print('torch', torch.__version__, '| CUDA', torch.version.cuda, '| cuDNN', torch.backends.cudnn.version())"
    nvcc --version 2>/dev/null | tail -n 1
    echo "host CPU: $(lscpu 2>/dev/null | sed -n 's/^Model name: *//p' | head -n 1), $(nproc) cores"
  } | tee "$OUT/env.txt"
}

gpu_tests() {
  # every GPU test, and the emulator held to this GPU's golden dump (the golden stage put it in
  # tests/golden); the emulator's own tests need no GPU and run in CI. One pytest per file, kernels
  # first: a failing whole-model file must not stop the kernels' tests (the lease of 2026-11-26
  # 17:50 ran 35 of 428 when the first file's 20 failures hit --maxfail).
  local f rc=0
  $PY -m pytest tests/test_emu_conformance.py -q -p no:cacheprovider -W ignore::UserWarning -rs || rc=1
  for f in test_gpu_conv test_ops test_robustness test_fuse; do
    echo "-- $f"
    $PY -m pytest tests/$f.py -q -p no:cacheprovider -W ignore::UserWarning -W ignore::DeprecationWarning -m cuda -rfEs \
      --tb=short --durations=5 --maxfail=10
    case $? in 0 | 5) ;; *) rc=1 ;; esac  # (5: no test of that file is marked cuda)
  done
  return $rc
}

cpu_suite() {
  # The tests not marked cuda on this host's CPU (another CPU than CI's: on the H100 lease of
  # 2026-11-27 its oneDNN packed float16 weights, which broke the emulated-CUDA tests there only).
  # One pytest per file, the host-sensitive ones first and the emulator's (CI runs them the same
  # way on any CPU) last: on lease 5 a segfault in test_export took the whole run's summary with it.
  local f rc=0 files
  files=$(ls tests/test_*.py | grep -v test_gpu_conv | sort -t/ -k2 | awk '/test_emu/ {e = e " " $0; next} {print} END {print e}')
  for f in $files; do
    echo "-- $f"
    $PY -m pytest "$f" -q -p no:cacheprovider -W ignore::UserWarning -W ignore::DeprecationWarning -m "not cuda" \
      -k "not held_to and not narrower" -rfE --tb=short --maxfail=10 2>&1 | grep -vE '^  File "|^Extension modules'
    case ${PIPESTATUS[0]} in 0 | 5) ;; *) rc=1; echo "-- $f: FAILED or crashed" ;; esac
  done
  return $rc
}

sanitize() {
  local tool rc=0 cs
  cs=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer /usr/local/cuda*/compute-sanitizer/compute-sanitizer 2>/dev/null | head -n 1)
  [[ -n $cs ]] || { echo "compute-sanitizer not found"; return 1; }
  for tool in ${SANITIZERS:-memcheck racecheck synccheck initcheck}; do
    echo "-- compute-sanitizer --tool $tool"
    "$cs" --tool $tool --error-exitcode 1 $PY scripts/gpu_smoke.py >"$OUT/sanitizer_$tool.log" 2>&1 || rc=1
    grep -m 12 -A 6 "^========= [A-Z].*\(Invalid\|Uninitialized\|hazard\|Barrier\|Race\|Error\)" "$OUT/sanitizer_$tool.log" | head -n 40
    tail -n 3 "$OUT/sanitizer_$tool.log"
  done
  return $rc
}

layers() {
  $PY -m resnet_fused.bench --device cuda --dtype float16 --layers --batch 256 --out "$OUT" --tag b256 \
    && $PY -m resnet_fused.bench --device cuda --dtype float16 --layers --batch 1 --out "$OUT" --tag b1
}

bench() {
  $PY -m resnet_fused.bench --device cuda --dtype float16 --batch 1 8 32 128 256 --out "$OUT" \
    --variants eager eager_cl jit_opt fused_rules fused_cudnn fused fused_graph eager_graph
}

tactics() {  # what each layer of resnet50 fp16 chooses at batch 256 and 1, and tuned vs untuned
  $PY scripts/tune_resnet50.py --device cuda --dtype float16 --batch 256 --compare 10 --json "$OUT/gpu_tactics_resnet50_b256.json" \
    && $PY scripts/tune_resnet50.py --device cuda --dtype float16 --batch 1 --compare 50 --json "$OUT/gpu_tactics_resnet50_b1.json"
}

profile() {  # ncu on layers of our kernel: compute-bound (the rule's tile and 256x128), memory-bound, split-K
  local spec name batch algo log rc=0
  for spec in "l3 3x3 256|256|-1" "l3 3x3 256|256|4" "l1 1x1 64-256 +res|256|-1" "l4 3x3 512|1|-1"; do
    IFS='|' read -r name batch algo <<<"$spec"
    log="$OUT/ncu_${name//[^a-z0-9]/_}_$([[ $algo == -1 ]] && echo plan || echo "algo$algo").txt"
    echo "-- ncu: $name, batch $batch, algo $algo"
    ncu --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
      --section MemoryWorkloadAnalysis -k regex:conv_kernel --launch-skip 2 --launch-count 1 \
      $PY scripts/gpu_profile.py --layer "$name" --batch "$batch" --algo "$algo" >"$log" 2>&1 || { rc=1; tail -n 3 "$log"; }
    grep -E "Duration|Throughput|Registers Per|Achieved Occupancy|Theoretical Occupancy|Warp Cycles Per Issued|Stall|Block Limit|median" \
      "$log" | head -n 24
  done
  return $rc
}

compile_max() {  # max-autotune compiles for minutes: its own stage, one batch per bench run (COMPILE_BATCHES)
  local b
  for b in ${COMPILE_BATCHES:-256 1}; do
    $PY -m resnet_fused.bench --device cuda --dtype float16 --batch "$b" --out "$OUT" --tag "compile_b$b" \
      --variants eager_cl fused compile_max || return 1
  done
}

resnext() {  # the grouped 3x3s on our kernel, per layer and (tactics choosing) in the whole model, against cuDNN's paths
  $PY -m resnet_fused.bench --model resnext50_32x4d --device cuda --dtype float16 --layers --batch 256 --out "$OUT" \
    --tag b256 \
    && $PY -m resnet_fused.bench --model resnext50_32x4d --device cuda --dtype float16 --batch 1 256 --out "$OUT" \
    --variants eager_cl jit_opt fused_cudnn fused
}

tf32() {  # float32 models: our TF32 kernel against cuDNN (TF32 too, PyTorch's default) and its fused op
  $PY -m resnet_fused.bench --device cuda --dtype float32 --layers --batch 256 --out "$OUT" --tag tf32_b256 \
    && $PY -m resnet_fused.bench --device cuda --dtype float32 --batch 1 32 256 --out "$OUT" --tag tf32 \
    --variants eager eager_cl jit_opt fused_cudnn fused fused_graph
}

export OUT PY
export -f build gpu_tests cpu_suite sanitize layers bench tactics profile compile_max resnext tf32
environment
for s in "${stages[@]}"; do
  case $s in
    build) run_stage build 300 build ;;
    golden) run_stage golden 60 "$PY scripts/record_golden.py --out $OUT && mkdir -p tests/golden && cp $OUT/conformance_*.json tests/golden/" ;;
    test) run_stage test 240 gpu_tests ;;
    tactics) run_stage tactics 90 tactics ;;
    layers) run_stage layers 150 layers ;;
    bench) run_stage bench 240 bench ;;
    sanitize) run_stage sanitize 150 sanitize ;;
    profile) run_stage profile 120 profile ;;
    compile) run_stage compile 540 compile_max ;;
    resnext) run_stage resnext 150 resnext ;;
    tf32) run_stage tf32 150 tf32 ;;
    cpu) run_stage cpu 300 cpu_suite ;;
    *) echo "unknown stage $s (build golden test tactics layers bench sanitize profile compile resnext tf32 cpu | all)"; exit 2 ;;
  esac
done

echo
echo "== summary ($(head -n 1 "$OUT/env.txt" | cut -d, -f1), $(sed -n 2p "$OUT/env.txt"))"
printf '%-10s %-16s %s\n' stage result seconds
for s in "${stages[@]}"; do printf '%-10s %-16s %s\n' "$s" "${RESULT[$s]:-not run}" "${SECONDS_TAKEN[$s]:-}"; done
ls "$OUT"
