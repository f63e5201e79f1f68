#!/usr/bin/env bash
# The GPU checks of one device session, in one call: build the extension with CUDA, run the
# CUDA-marked tests, then the benchmarks at the official shapes. Logs and CSV rows go to
# $OUT (the device tool's folder; ./device_out elsewhere). Dry-run on a CPU machine with
#   DEVICE_CHECK_DRY=1 bash benchmarks/device_check.sh
# which runs the same steps with the CPU smoke options. The steps' time limits add up to
# under 10 minutes (one device call); the extension build takes ~1.5 min of that.
# DEVICE_CHECK_STEPS names the steps to run (environment and results always run). Its default
# leaves out bench_train, which takes a device call of its own (~1.5 min build + 450 s):
#   DEVICE_CHECK_STEPS="build bench_train" bash benchmarks/device_check.sh
# (TRAIN_DATA=PATH adds bench_train's real-data variant.) DEVICE_CHECK_STEPS="build speedrun"
# runs the CIFAR-10 speedrun, fused and reference (SPEEDRUN_EPOCHS, default 15, to fit one
# call). The dry run runs every step.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-device_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
DRY=${DEVICE_CHECK_DRY:-0}
step() { echo; echo "=== $* ($(date +%T))"; }
ALL_STEPS="build cuda_tests bench_loss bench_queue bench_data"
if [ "$DRY" = 1 ]; then ALL_STEPS="$ALL_STEPS bench_train speedrun"; fi
STEPS=" ${DEVICE_CHECK_STEPS:-$ALL_STEPS} "
want() { case "$STEPS" in *" $1 "*) return 0 ;; esac; echo; echo "=== $1: skipped (not in DEVICE_CHECK_STEPS)"; return 1; }

step environment
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv 2>&1 | tee "$OUT/gpu.txt"
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.cuda.is_available())"

if want build; then
step build
$PY -m pip install -q --no-build-isolation --no-deps -e . >"$OUT/build.log" 2>&1 || tail -30 "$OUT/build.log"
$PY -c "from fastswav import _C; print('fastswav._C with CUDA:', _C.WITH_CUDA)"
fi

if want cuda_tests; then
step cuda tests
if [ "$DRY" = 1 ]; then MARK="not slow"; TESTS="tests/test_queue.py tests/test_fused_loss.py"; else MARK=cuda; TESTS=tests; fi
timeout 150 $PY -m pytest -q -m "$MARK" $TESTS 2>&1 | tee "$OUT/cuda_tests.log" | tail -25
fi

if want bench_loss; then
step bench_loss
if [ "$DRY" = 1 ]; then LOSS_ARGS="--cpu-smoke"; else LOSS_ARGS="--compile --no-sweep"; fi
timeout 180 $PY benchmarks/bench_loss.py $LOSS_ARGS 2>&1 | tee "$OUT/bench_loss.log" | tail -30
fi

if want bench_queue; then
step bench_queue
if [ "$DRY" = 1 ]; then QUEUE_ARGS="--dry-run"; else QUEUE_ARGS=""; fi
timeout 45 $PY benchmarks/bench_queue.py $QUEUE_ARGS 2>&1 | tee "$OUT/bench_queue.log" | tail -12
fi

if want bench_data; then
step bench_data
# The device run carries no data: pass --zip with a subset copied into an ignored folder.
if [ "$DRY" = 1 ]; then DATA_ARGS="--dry-run"; else DATA_ARGS="--device cuda"; fi
DATA_ZIP=${DATA_ZIP:-../shared/data/imagenet-sample-jpeg.zip}
if [ -f "$DATA_ZIP" ]; then
  timeout 90 $PY benchmarks/bench_data.py $DATA_ARGS --zip "$DATA_ZIP" 2>&1 | tee "$OUT/bench_data.log" | tail -12
else
  echo "bench_data skipped: no $DATA_ZIP (copy a subset into an ignored folder, set DATA_ZIP)"
fi
fi

if want bench_train; then
step bench_train
# Rows are appended after each variant and variants that would pass --budget-s are skipped,
# so the timeout cuts at most the one in flight.
if [ "$DRY" = 1 ]; then TRAIN_ARGS="--cpu-smoke"; else TRAIN_ARGS="--budget-s 330"; fi
if [ -n "${TRAIN_DATA:-}" ]; then TRAIN_ARGS="$TRAIN_ARGS --data $TRAIN_DATA"; fi
timeout 450 $PY benchmarks/bench_train.py $TRAIN_ARGS 2>&1 | tee "$OUT/bench_train.log" | tail -40
fi

if want speedrun; then
step speedrun
# cifar10_speedrun twice (fused, reference; same seed). Carry CIFAR-10: set CIFAR_ZIP to a
# copy inside the checkout (the shared zip is 61 MB, under the 64 MiB a call carries).
CIFAR_ZIP=${CIFAR_ZIP:-../shared/data/cifar10-jpeg.zip}
if [ "$DRY" = 1 ]; then RUN_ARGS="--cpu-smoke"; else RUN_ARGS="--epochs ${SPEEDRUN_EPOCHS:-15}"; fi
if [ -f "$CIFAR_ZIP" ]; then
  timeout 540 $PY benchmarks/speedrun_cifar10.py --data "$CIFAR_ZIP" $RUN_ARGS 2>&1 | tee "$OUT/speedrun.log" | grep -v "step/s" | tail -20
else
  echo "speedrun skipped: no $CIFAR_ZIP (set CIFAR_ZIP)"
fi
fi

step results
cp benchmarks/results/*.csv "$OUT/" 2>/dev/null
ls -l "$OUT"
