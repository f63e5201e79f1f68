#!/usr/bin/env bash
# The GPU checks in four stages, each stopping itself within DEVICE_CHECK_BUDGET_S seconds
# (285 by default), steps ordered by value, every step under its own time limit, results
# copied out after each step. docs/device_check.md says what each step runs and how long it
# takes on an H100.
#
#   bash benchmarks/device_check.sh 1          # the headline: 100ep_fast's step vs official-style eager
#   bash benchmarks/device_check.sh 2          # the CUDA build and the CUDA tests
#   bash benchmarks/device_check.sh 3          # more benchmarks; needs the data subsets (below)
#   bash benchmarks/device_check.sh 4          # the DINO-style teacher at DINOv3's shapes, the queue
#   DEVICE_CHECK_DRY=1 bash benchmarks/device_check.sh 1   # dry run on a CPU (smoke options)
#   PYTHON=.venv/bin/python ...                 # the interpreter to use (default python3)
#   bash benchmarks/device_check.sh prepare-data DIR   # .devdata/ subsets for stage 3
#
# Stage 1 (limits in s):
#   install        60  pip install -e . without the extension (fastswav, fastswav.kernels)
#   bench_train  rest  the official-style eager step, then the 100ep_fast step as training
#                      runs it (grad_accum micro-batches, 1-process DDP, its compile mode),
#                      with dynamo's counts; what is left but 45 s, at least 150 s
#   bench_loss     45  the official shape (B 256, K 3000, queue 3840): fused vs eager/compiled
# Stage 2 (the install again where the package does not import):
#   build         150  fastswav._C with CUDA (setup.py build_ext --inplace), in the background
#   triton_tests  100  meanwhile: the CUDA tests that need no extension
#   cuda_graph_test 60 the reduce-overhead step in CUDA graphs, in a fresh process
#   cuda_tests     60  every other CUDA test (queue extension, ...), no -x
# Stage 3 (the install and build again where they do not import):
#   bench_train   120  fastswav_eager and fastswav_compiled in reduce-overhead (no accumulation)
#   bench_loss     60  the loss sweep
#   bench_data     50  (DATA_ZIP) every data path at batch 256 on the GPU, 300 JPEGs
#   speedrun       60  (CIFAR_ZIP) the 2-epoch fused cifar10_speedrun
# Stage 4 (the install and build again where they do not import):
#   bench_teacher 240  DINOv3's CLS and iBOT steps (K 65,536; ViT-7B 262,144 / 98,304) and the
#                      DINOv2-like step, against DINOv3's plain code eager and compiled
#   bench_queue    20  the queue ring buffer, extension vs reference
#
# A step runs under min(its limit, what is left of DEVICE_CHECK_BUDGET_S: 285 s per stage
# on the GPU, 3000 in the dry run) and is skipped with less than 15 s left;
# DEVICE_CHECK_STEPS="a b" runs only those steps. Output: $OUT (when set;
# ./device_out elsewhere) gets summary.txt (one line per step: exit status, wall time, limit),
# steps.log (every step's whole output), build.log, and rows.csv (the CSV rows the
# benchmarks appended during this stage, one schema), refreshed after each step.
# Benchmarks and pytest end with os._exit once their results are written: with torch 2.11,
# a process that compiled at several torch.compile sites could otherwise wait minutes at
# exit (inductor's compile workers); each step's wall time is printed, so a wait would show.
# Data for stage 3: `prepare-data DIR`, DIR holding imagenet-sample-jpeg.zip and
# cifar10-jpeg.zip, writes .devdata/imagenet-300.zip and .devdata/cifar10-12k.zip (about
# 43 MiB; .devdata is ignored by git); DATA_ZIP and CIFAR_ZIP override the paths.
set -uo pipefail
cd "$(dirname "$0")/.."
STAGE=${1:-${STAGE:-1}}
PY=${PYTHON:-python3}
DATA_ZIP=${DATA_ZIP:-.devdata/imagenet-300.zip}
CIFAR_ZIP=${CIFAR_ZIP:-.devdata/cifar10-12k.zip}

if [ "$STAGE" = prepare-data ]; then
  SOURCE_DIR=${2:-}
  if [ ! -f "$SOURCE_DIR/imagenet-sample-jpeg.zip" ] || [ ! -f "$SOURCE_DIR/cifar10-jpeg.zip" ]; then
    echo "error: prepare-data DIR: DIR must hold imagenet-sample-jpeg.zip and cifar10-jpeg.zip (got '$SOURCE_DIR')"
    exit 2
  fi
  # Subsets of the two zips, stored uncompressed like the originals.
  exec "$PY" - "$SOURCE_DIR" "$DATA_ZIP" "$CIFAR_ZIP" <<'EOF'
import os, sys, zipfile
shared, imagenet_out, cifar_out = sys.argv[1:4]

def subset(src, dst, choose):
    os.makedirs(os.path.dirname(dst) or ".", exist_ok=True)
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        names = choose(sorted(n for n in zin.namelist() if not n.endswith("/")))
        for n in names:
            zout.writestr(n, zin.read(n))
    print(f"{dst}: {len(names)} files, {os.path.getsize(dst) / 2**20:.1f} MiB")

def per_class(names):  # CIFAR-10: 1,000 train and 200 test images per class, same layout
    by_folder = {}
    for n in names:
        by_folder.setdefault(n.rsplit("/", 1)[0], []).append(n)
    return [n for folder, members in by_folder.items()
            for n in members[:1000 if folder.startswith("train/") else 200]]

subset(os.path.join(shared, "imagenet-sample-jpeg.zip"), imagenet_out, lambda names: names[:300])
subset(os.path.join(shared, "cifar10-jpeg.zip"), cifar_out, per_class)
EOF
fi
case "$STAGE" in 1|2|3|4) ;; *) echo "error: stage must be 1, 2, 3, 4 or prepare-data (got '$STAGE')"; exit 2 ;; esac

OUT=${OUT:-device_out}
mkdir -p "$OUT"
SUMMARY=$OUT/summary.txt LOG=$OUT/steps.log BUILD_LOG=$OUT/build.log ROWS=$OUT/rows.csv
: >"$SUMMARY"; : >"$LOG"
export PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
DRY=${DEVICE_CHECK_DRY:-0}
if [ "$DRY" = 1 ]; then BUDGET=${DEVICE_CHECK_BUDGET_S:-3000}; else BUDGET=${DEVICE_CHECK_BUDGET_S:-285}; fi
START=$(date +%s)
STEPS=" ${DEVICE_CHECK_STEPS:-install build triton_tests cuda_graph_test cuda_tests bench_train bench_loss bench_teacher bench_queue bench_data speedrun} "
OK="" FAILED="" SKIPPED=""

say() { echo "$*"; echo "$*" >>"$SUMMARY"; }
elapsed() { echo $(( $(date +%s) - START )); }
left() { echo $(( BUDGET - $(elapsed) )); }

# rows.csv: the lines each benchmarks/results/*.csv gained since the stage began.
declare -A BASE_LINES
for f in benchmarks/results/*.csv; do [ -f "$f" ] && BASE_LINES[$f]=$(wc -l <"$f"); done
collect_rows() {
  local f base header=0
  : >"$ROWS.tmp"
  for f in benchmarks/results/*.csv; do
    [ -f "$f" ] || continue
    base=${BASE_LINES[$f]:-0}
    [ "$(wc -l <"$f")" -gt "$base" ] || continue
    [ "$header" = 1 ] || { head -n 1 "$f" >>"$ROWS.tmp"; header=1; }
    tail -n +$(( base > 0 ? base + 1 : 2 )) "$f" >>"$ROWS.tmp"
  done
  mv "$ROWS.tmp" "$ROWS"
}

# run_step NAME LIMIT COMMAND...: the command under min(LIMIT, budget left), its output
# appended to steps.log, a summary line, the last lines of its output on the screen.
run_step() {
  local name=$1 limit=$2; shift 2
  case "$STEPS" in *" $name "*) ;; *) return 0 ;; esac
  local budget_left; budget_left=$(left)
  if [ "$budget_left" -lt 15 ]; then
    say "step $name: skipped (${budget_left}s of the ${BUDGET}s budget left)"; SKIPPED+=" $name"; return 0
  fi
  [ "$limit" -gt "$budget_left" ] && limit=$budget_left
  echo; echo "=== $name (limit ${limit}s, at $(elapsed)s)"
  printf '\n=== %s (limit %ss, at %ss): %s\n' "$name" "$limit" "$(elapsed)" "$*" >>"$LOG"
  local offset t0 rc
  offset=$(stat -c %s "$LOG"); t0=$(date +%s)
  if [ "$(type -t "$1")" = function ]; then  # the exported helpers below
    timeout -k 5 "$limit" bash -c '"$@"' _ "$@" >>"$LOG" 2>&1
  else
    timeout -k 5 "$limit" "$@" >>"$LOG" 2>&1
  fi
  rc=$?
  tail -c +$(( offset + 1 )) "$LOG" | tail -n "${TAIL:-15}"
  local how="exit $rc"
  [ "$rc" = 124 ] || [ "$rc" = 137 ] && how="TIMED OUT (exit $rc)"
  say "step $name: $how after $(( $(date +%s) - t0 ))s (limit ${limit}s)"
  if [ "$rc" = 0 ]; then OK+=" $name"; else FAILED+=" $name"; fi
  collect_rows
  return 0
}

# pytest ending with os._exit after its report (see the header).
PYTEST_CODE='import os, sys, pytest
code = int(pytest.main(sys.argv[1:]))
sys.stdout.flush(); sys.stderr.flush(); os._exit(0 if code == 5 else code)'
pytest_run() { "$PY" -c "$PYTEST_CODE" -p no:cacheprovider -v --tb=short "$@"; }
GRAPH_TEST=tests/test_step.py::test_reduce_overhead_step_runs_in_cuda_graphs_with_the_fused_loss_and_queue
TRITON_TEST_FILES="tests/test_cuda_paths.py tests/test_fused_loss.py tests/test_teacher.py"

IMPORT_CHECK='import fastswav.kernels, fastswav._C as C
print("fastswav._C with CUDA:", C.WITH_CUDA)'
# imports: prints what the import check says (its last line); fails when it fails.
imports() {
  local printed
  printed=$("$PY" -c "$IMPORT_CHECK" 2>&1); local rc=$?
  echo "$printed" | tail -n 1
  return $rc
}
# check_cuda_build LINE: a fastswav._C without CUDA is a failed build step (the queue then
# runs the PyTorch reference), but the stage goes on.
check_cuda_build() {
  if [ "$DRY" != 1 ] && [ "$1" != "fastswav._C with CUDA: 1" ]; then
    say "build: fastswav._C has no CUDA (see build.log): the queue runs the PyTorch reference"
    FAILED+=" build_cuda"
  fi
}
stop() {
  say "DEVICE_CHECK stage $STAGE STOPPED after $(elapsed)s: $*"
  collect_rows
  exit 3
}
install_cmd() { FASTSWAV_NO_EXT=1 "$PY" -m pip install -q --no-build-isolation --no-deps -e .; }
export PY DRY PYTEST_CODE
export -f install_cmd pytest_run
# The extension in place (fastswav/_C*.so, served by the editable install): a build that is
# cut short leaves the package importable, only without fastswav._C.
build_cmd() {
  if [ "$DRY" = 1 ]; then FASTSWAV_NO_CUDA_EXT=1 "$PY" setup.py -q build_ext --inplace --force
  else MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} "$PY" setup.py -q build_ext --inplace --force
  fi
}
export -f build_cmd

say "DEVICE_CHECK stage $STAGE ($( [ "$DRY" = 1 ] && echo "dry run on the CPU" || echo GPU), budget ${BUDGET}s, $(date -u +%FT%TZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown))"
if command -v nvidia-smi >/dev/null; then
  say "gpu: $(nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader 2>&1 | head -n 1)"
fi
say "host: $(getconf _NPROCESSORS_ONLN) cores; $("$PY" -c "import sys, torch, triton, numpy; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__, 'numpy', numpy.__version__, 'cuda', torch.cuda.is_available())" 2>&1 | tail -n 1)"

build_in_background() {
  BUILD_PID=""
  case "$STEPS" in *" build "*) ;; *) return 0 ;; esac
  : >"$BUILD_LOG"
  BUILD_T0=$(date +%s)
  ( timeout -k 5 150 bash -c build_cmd >>"$BUILD_LOG" 2>&1; echo "build exit $?" >>"$BUILD_LOG" ) &
  BUILD_PID=$!
  say "step build: started in the background (limit 150s, log build.log)"
}
wait_build() {
  [ -n "$BUILD_PID" ] || return 0
  wait "$BUILD_PID"
  local line; line=$(tail -n 1 "$BUILD_LOG")
  say "step build: ${line#build } after $(( $(date +%s) - BUILD_T0 ))s (limit 150s)"
  case "$line" in "build exit 0") OK+=" build" ;; *) FAILED+=" build" ;; esac
}

# ensure_installed: the install step where the package does not import (a fresh machine).
ensure_installed() {
  if "$PY" -c "import fastswav.kernels" 2>/dev/null; then
    say "step install: not needed (fastswav imports)"
  else
    run_step install 60 install_cmd
    "$PY" -c "import fastswav.kernels" 2>/dev/null || stop "fastswav.kernels does not import after the install (see steps.log)"
  fi
}
# ensure_built: the CUDA build where fastswav._C does not import (a fresh machine).
ensure_built() {
  if built=$(imports); then
    say "step build: not needed, $built"
  else
    build_in_background
    wait_build
    built=$(imports) || stop "fastswav._C does not import after the build: $built (see build.log)"
    say "import: $built"
  fi
  check_cuda_build "$built"
}

if [ "$STAGE" = 1 ]; then
  run_step install 60 install_cmd
  "$PY" -c "import fastswav.kernels" 2>/dev/null || stop "fastswav.kernels does not import after the install (see steps.log)"
  # bench_train: what is left but 45 s for bench_loss, and never less than 150 s if there is.
  lim=$(left); lim=$(( lim - 45 > 150 ? lim - 45 : (lim < 150 ? lim : 150) ))
  if [ "$DRY" = 1 ]; then
    run_step bench_train "$lim" "$PY" benchmarks/bench_train.py --cpu-smoke --variants official_eager,100ep_fast --out "$OUT/bench_train_dry.csv"
    run_step bench_loss 600 "$PY" benchmarks/bench_loss.py --cpu-smoke --shapes 8:96:40
  else
    run_step bench_train "$lim" "$PY" benchmarks/bench_train.py --variants official_eager,100ep_fast --warmup 8 --steps 20 --budget-s $(( lim - 15 ))
    run_step bench_loss 45 "$PY" benchmarks/bench_loss.py --shapes 256:3000:3840 --reps 50
  fi
elif [ "$STAGE" = 2 ]; then
  ensure_installed
  build_in_background
  if [ "$DRY" = 1 ]; then
    # The same test processes on the CPU: the CUDA-marked tests skip, the CPU check of the
    # one-launch shape and the interpreter's other precisions run.
    FASTSWAV_NO_EXT=1 run_step triton_tests 600 pytest_run tests/test_cuda_paths.py tests/test_fused_loss.py -k "cuda or one_launch or other_precisions"
  else
    FASTSWAV_NO_EXT=1 run_step triton_tests 100 pytest_run -m cuda $TRITON_TEST_FILES
  fi
  wait_build
  built=$(imports) || stop "fastswav._C does not import after the build: $built (see build.log)"
  say "import: $built"
  check_cuda_build "$built"
  run_step cuda_graph_test 60 pytest_run "$GRAPH_TEST"
  OTHER_CUDA_FILES=$(grep -l "mark.cuda" tests/test_*.py | grep -v -F -x -f <(tr ' ' '\n' <<<"$TRITON_TEST_FILES") | tr '\n' ' ')
  run_step cuda_tests 60 pytest_run -m cuda $OTHER_CUDA_FILES --deselect "$GRAPH_TEST"
elif [ "$STAGE" = 3 ]; then
  ensure_installed
  ensure_built
  if [ "$DRY" = 1 ]; then
    run_step bench_train 600 "$PY" benchmarks/bench_train.py --cpu-smoke --variants official_eager,fastswav_eager,fastswav_compiled --modes reduce-overhead --out "$OUT/bench_train_dry.csv"
    run_step bench_loss 600 "$PY" benchmarks/bench_loss.py --cpu-smoke --shapes 8:96:0
    [ -f "$DATA_ZIP" ] && run_step bench_data 600 "$PY" benchmarks/bench_data.py --dry-run --quick --zip "$DATA_ZIP"
    [ -f "$CIFAR_ZIP" ] && run_step speedrun 600 "$PY" benchmarks/speedrun_cifar10.py --data "$CIFAR_ZIP" --cpu-smoke
  else
    run_step bench_train 120 "$PY" benchmarks/bench_train.py --variants official_eager,fastswav_eager,fastswav_compiled --modes reduce-overhead --warmup 8 --steps 20 --budget-s 0
    run_step bench_loss 60 "$PY" benchmarks/bench_loss.py --shapes 256:3000:0,64:3000:3840,256:1000:3840,256:10000:3840,256:30000:3840,512:3000:0 --reps 50
    if [ -f "$DATA_ZIP" ]; then run_step bench_data 50 "$PY" benchmarks/bench_data.py --device cuda --zip "$DATA_ZIP" --images 300 --batch 256 --loader-batches 2 --repeats 3
    else say "step bench_data: skipped (no $DATA_ZIP: see prepare-data)"; SKIPPED+=" bench_data"; fi
    if [ -f "$CIFAR_ZIP" ]; then run_step speedrun 60 "$PY" benchmarks/speedrun_cifar10.py --data "$CIFAR_ZIP" --variants fused --epochs "${SPEEDRUN_EPOCHS:-2}"
    else say "step speedrun: skipped (no $CIFAR_ZIP: see prepare-data)"; SKIPPED+=" speedrun"; fi
  fi
else
  ensure_installed
  ensure_built
  if [ "$DRY" = 1 ]; then
    run_step bench_teacher 600 "$PY" benchmarks/bench_teacher.py --cpu-smoke --cases dino,dinov3_cls,vit7b_cls,dinov3_ibot,vit7b_ibot
    run_step bench_queue 120 "$PY" benchmarks/bench_queue.py --dry-run
  else
    run_step bench_teacher 240 "$PY" benchmarks/bench_teacher.py --cases dino,dinov3_cls,dinov3_ibot,vit7b_cls,vit7b_ibot --batches 128 --budget-s 200 --reps 30
    run_step bench_queue 20 "$PY" benchmarks/bench_queue.py --seconds 0.1 --repeats 3
  fi
fi

collect_rows
echo; echo "=== summary (also in $OUT/summary.txt; whole output in steps.log, rows in rows.csv)"
grep -E "^(gpu|host|import|build|step)[: ]" "$SUMMARY"
echo "--- key lines"
grep -E "^(PASSED|FAILED|ERROR)|(passed|failed|error)(,| in )|^(official_eager|fastswav_|100ep_fast)|graph break|PROBLEM|^(eager|compiled|fused|fused_exact|fused_graph) |SKIPPED|skipped, |out of memory" "$LOG" | grep -v "^tests/" | tail -n 60
say "DEVICE_CHECK stage $STAGE done in $(elapsed)s; ok:${OK:- none}; failed:${FAILED:- none}; skipped:${SKIPPED:- none}; $(( $(wc -l <"$ROWS") > 0 ? $(wc -l <"$ROWS") - 1 : 0 )) rows in rows.csv"
