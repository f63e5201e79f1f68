#!/usr/bin/env bash
# Every GPU check of a device session in one call of at most 8 minutes (the extension build
# included), steps ordered by value, each step's CSV rows written as soon as they are
# measured. Logs and CSV copies go to $OUT (the device tool's folder; ./device_out elsewhere).
#
#   bash benchmarks/device_check.sh                       # on the GPU machine
#   DEVICE_CHECK_DRY=1 bash benchmarks/device_check.sh    # dry run on a CPU (smoke options)
#
# Steps and their time limits (seconds; a step never runs past the overall budget
# DEVICE_CHECK_BUDGET_S, default 470 (2400 for the dry run), and is skipped when less than
# 20 s are left):
#   build       60  pip install -e . (fastswav._C with CUDA), on the machine's own torch
#   cuda_tests 100  the CUDA tests of the fused loss, the queue and the CUDA-graph step
#   bench_loss 100  fused vs official-style eager and compiled at the official shapes,
#                   kernel by kernel against the roofline
#   bench_train 110 official-style eager vs 100ep_fast (compiled) ResNet-50 steps
#   bench_teacher 50 the DINO-style teacher ops vs the plain formulas, eager and compiled
#   bench_queue 20  the queue ring buffer
#   bench_data  40  the GPU share of the multi-crop augmentation (DATA_ZIP, a carried subset)
#   speedrun    60  a short cifar10_speedrun, fused only (CIFAR_ZIP, SPEEDRUN_EPOCHS=2)
# DEVICE_CHECK_STEPS="a b" runs only those steps (environment and results always run).
# Expected on an H100/H200: build ~40 s, cuda_tests ~70 s, bench_loss ~60 s, bench_train
# ~100 s, the others ~10-40 s each: about 6 minutes in all.
#
# On torch 2.11 a process that compiled at two torch.compile sites can wait 300 s at exit
# (inductor's compile workers): TORCHINDUCTOR_COMPILE_THREADS=1 avoids that here. The GPU
# machine's numpy is too new for triton 3.6's interpreter, so no step runs kernels on the CPU
# there; the dry run does (here, with the CI versions).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-device_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export TORCHINDUCTOR_COMPILE_THREADS=1
PY=${PYTHON:-python3}
DRY=${DEVICE_CHECK_DRY:-0}
if [ "$DRY" = 1 ]; then BUDGET=${DEVICE_CHECK_BUDGET_S:-2400}; else BUDGET=${DEVICE_CHECK_BUDGET_S:-470}; fi
START=$(date +%s)
ALL_STEPS="build cuda_tests bench_loss bench_train bench_teacher bench_queue bench_data speedrun"
STEPS=" ${DEVICE_CHECK_STEPS:-$ALL_STEPS} "

# run_step NAME LIMIT COMMAND...: the command under a timeout of min(LIMIT, budget left),
# its output to $OUT/NAME.log and the screen's tail.
run_step() {
  local name=$1 limit=$2; shift 2
  case "$STEPS" in *" $name "*) ;; *) echo; echo "=== $name: skipped (not in DEVICE_CHECK_STEPS)"; return 0 ;; esac
  local left=$(( BUDGET - ($(date +%s) - START) ))
  if [ "$left" -lt 20 ]; then echo; echo "=== $name: skipped (${left}s of the budget left)"; return 0; fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo; echo "=== $name (limit ${limit}s, $(date +%T))"
  local t0=$(date +%s)
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  tail -n "${TAIL:-25}" "$OUT/$name.log"
  echo "--- $name: exit $rc after $(( $(date +%s) - t0 ))s"
  cp benchmarks/results/*.csv "$OUT/" 2>/dev/null
  return 0
}

echo "=== environment ($(date +%T))"
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv 2>&1 | tee "$OUT/gpu.txt"
fi
$PY -c "import torch, triton, numpy; print('torch', torch.__version__, 'triton', triton.__version__, 'numpy', numpy.__version__, 'cuda', torch.cuda.is_available())"

if [ "$DRY" = 1 ]; then
  run_step build 60 $PY -c "import fastswav; from fastswav.ops.queue_ext import extension_supports; print('fastswav importable (dry run: no reinstall)')"
  run_step cuda_tests 400 $PY -m pytest -q -m "not slow" tests/test_fused_loss.py tests/test_no_host_sync.py tests/test_teacher.py
  run_step bench_loss 500 $PY benchmarks/bench_loss.py --cpu-smoke
  run_step bench_train 200 $PY benchmarks/bench_train.py --cpu-smoke
  run_step bench_teacher 200 $PY benchmarks/bench_teacher.py --cpu-smoke
  run_step bench_queue 60 $PY benchmarks/bench_queue.py --dry-run
  DATA_ZIP=${DATA_ZIP:-../shared/data/imagenet-sample-jpeg.zip}
  [ -f "$DATA_ZIP" ] && run_step bench_data 300 $PY benchmarks/bench_data.py --dry-run --quick --zip "$DATA_ZIP"
  CIFAR_ZIP=${CIFAR_ZIP:-../shared/data/cifar10-jpeg.zip}
  [ -f "$CIFAR_ZIP" ] && run_step speedrun 200 $PY benchmarks/speedrun_cifar10.py --data "$CIFAR_ZIP" --cpu-smoke
else
  MAX_JOBS=${MAX_JOBS:-16} run_step build 60 $PY -m pip install -q --no-build-isolation --no-deps -e .
  $PY -c "from fastswav import _C; print('fastswav._C with CUDA:', _C.WITH_CUDA)" 2>&1 | tee -a "$OUT/build.log"
  run_step cuda_tests 100 $PY -m pytest -q -x -m cuda tests/test_fused_loss.py tests/test_queue.py tests/test_step.py tests/test_teacher.py
  run_step bench_loss 100 $PY benchmarks/bench_loss.py --no-sweep --reps 100
  run_step bench_train 110 $PY benchmarks/bench_train.py --variants official_eager,100ep_fast --budget-s 95
  run_step bench_teacher 50 $PY benchmarks/bench_teacher.py --budget-s 40
  run_step bench_queue 20 $PY benchmarks/bench_queue.py --seconds 0.1 --repeats 3
  # The device call carries no shared data: copy subsets into an ignored folder and set these.
  DATA_ZIP=${DATA_ZIP:-../shared/data/imagenet-sample-jpeg.zip}
  if [ -f "$DATA_ZIP" ]; then run_step bench_data 40 $PY benchmarks/bench_data.py --device cuda --quick --zip "$DATA_ZIP"
  else echo; echo "=== bench_data: skipped (no $DATA_ZIP; set DATA_ZIP to a carried subset)"; fi
  CIFAR_ZIP=${CIFAR_ZIP:-../shared/data/cifar10-jpeg.zip}
  if [ -f "$CIFAR_ZIP" ]; then run_step speedrun 60 $PY benchmarks/speedrun_cifar10.py --data "$CIFAR_ZIP" --variants fused --epochs "${SPEEDRUN_EPOCHS:-2}"
  else echo; echo "=== speedrun: skipped (no $CIFAR_ZIP; set CIFAR_ZIP to a carried copy)"; fi
fi

echo; echo "=== results ($(( $(date +%s) - START ))s in all)"
cp benchmarks/results/*.csv "$OUT/" 2>/dev/null
ls -l "$OUT"
