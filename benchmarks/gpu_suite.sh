#!/usr/bin/env bash
# The GPU suite in one command, for a GPU machine without a package registry (torch, triton,
# nvcc, ninja, pytest and transformers already installed):
#
#   bash benchmarks/gpu_suite.sh OUTDIR [STAGE ...]
#
# Stages, in order (default: all of them):
#   install   pip install --no-deps --no-build-isolation -e .   (no CUDA build inside pip)
#   build     build the CUDA extension llmkern._C in place (ninja), then `llmkern info`
#   test      the GPU tests (pytest -m gpu: stage test-gpu), then the rest of the test suite
#             on the GPU (stage test-rest); each can be asked for alone
#   bench     benchmarks/run_all.py: every op script, results into OUTDIR/results
#   summary   always run last: the figures and whether each issue's target is met
# Everything lands in OUTDIR: logs/<stage>.log, results/<device>.{csv,json}, results/*.png,
# stages.txt. The summary table is printed last.
#
# Environment: PYTHON (default python3), BENCH_ARGS (extra arguments for run_all.py, e.g.
# "--quick" or "--only attention,mlp"), LLMKERN_COMMIT (the commit to record when the tree has
# no .git), TEST_WORKERS (pytest-xdist workers for the non-GPU-marked tests, default 4),
# TEST_TIMEOUT / BENCH_TIMEOUT (seconds per stage, default 1500 / 3000),
# TORCH_CUDA_ARCH_LIST (default: this GPU's compute capability only, to halve the build).
# Machines that stop a command after N minutes: run the stages in separate calls on the same
# OUTDIR, e.g. "install build test-gpu", then "install build test-rest", then "install build
# bench" with BENCH_ARGS="--quick" (a case for every target in a few minutes) or
# BENCH_ARGS="--only attention" etc.; install is quick and build is skipped when llmkern._C
# already imports. Then copy OUTDIR/results/* into benchmarks/results/ and commit.
set -u
cd "$(dirname "$0")/.."

if [ $# -lt 1 ]; then
  sed -n '2,27p' "$0"
  exit 2
fi
OUT=$(mkdir -p "$1" && cd "$1" && pwd)
shift
STAGES=${*:-"install build test bench"}
PY=${PYTHON:-python3}
mkdir -p "$OUT/logs" "$OUT/results"
STATUS="$OUT/stages.txt"
FAILED=0

if [ -z "${LLMKERN_COMMIT:-}" ]; then
  LLMKERN_COMMIT=$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)
fi
export LLMKERN_COMMIT

# run_stage NAME CMD...: the command's output goes to logs/NAME.log; one line to stages.txt.
run_stage() {
  local name=$1
  shift
  local log="$OUT/logs/$name.log" start end code detail
  echo "=== $name: $*" | tee -a "$OUT/logs/suite.log"
  start=$(date +%s)
  "$@" >"$log" 2>&1
  code=$?
  end=$(date +%s)
  # pytest's summary lines ("N passed, M skipped in Xs"), run_all's per-script lines, or the
  # log's last line: whichever says the most in one line
  case "$name" in
    test*) detail=$(grep -E "^=* ?[0-9]+ (passed|failed|error)|no tests ran" "$log" | tr -d '=' | paste -sd ';' -) ;;
    bench) detail=$(grep -E "^bench_[a-z_]+: " "$log" | sed 's/^bench_//' | paste -sd ';' -) ;;
    *) detail="" ;;
  esac
  [ -n "$detail" ] || detail=$(tail -n 1 "$log")
  detail=$(echo "$detail" | tr -s ' ' | cut -c1-200)
  if [ "$code" -eq 0 ]; then
    echo "$name: PASS ($((end - start)) s) $detail" >>"$STATUS"
  else
    FAILED=1
    echo "$name: FAIL exit $code ($((end - start)) s) $detail  [log: logs/$name.log]" >>"$STATUS"
  fi
  tail -n 5 "$log"
  return $code
}

stage_install() {
  LLMKERN_SKIP_CUDA_BUILD=1 "$PY" -m pip install --no-deps --no-build-isolation -e .
}

stage_build() {
  local cap
  if [ "${FORCE_BUILD:-0}" = "0" ] && "$PY" -c "import llmkern._C" 2>/dev/null; then
    echo "llmkern._C already built here (FORCE_BUILD=1 rebuilds)"
    "$PY" -m llmkern info
    return 0
  fi
  cap=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())") || return 1
  export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$cap}
  export MAX_JOBS=${MAX_JOBS:-$(nproc)}
  if [ -z "${CUDA_HOME:-}" ] && command -v nvcc >/dev/null 2>&1; then
    CUDA_HOME=$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")
    export CUDA_HOME
  fi
  echo "TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST MAX_JOBS=$MAX_JOBS CUDA_HOME=${CUDA_HOME:-unset}"
  "$PY" setup.py build_ext --inplace || return 1
  "$PY" -c "import llmkern._C" || return 1
  "$PY" -m llmkern info
}

stage_test-gpu() {
  timeout "${TEST_TIMEOUT:-1500}" "$PY" -m pytest -q -p no:cacheprovider tests -m gpu \
    --junitxml="$OUT/logs/tests_gpu.xml"
}

stage_test-rest() {
  timeout "${TEST_TIMEOUT:-1500}" "$PY" -m pytest -q -p no:cacheprovider tests -m "not gpu" \
    -n "${TEST_WORKERS:-4}" --junitxml="$OUT/logs/tests_rest.xml"
}

stage_bench() {
  # shellcheck disable=SC2086  # BENCH_ARGS is a list of arguments
  timeout "${BENCH_TIMEOUT:-3000}" "$PY" benchmarks/run_all.py --out "$OUT/results" ${BENCH_ARGS:-}
}

{
  echo "suite started $(date -u +%Y-%m-%dT%H:%M:%SZ) commit $LLMKERN_COMMIT stages: $STAGES"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv 2>&1
  "$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)" 2>&1
} >"$OUT/logs/env.log"
cat "$OUT/logs/env.log"

for stage in $STAGES; do
  case "$stage" in
    install|build|test-gpu|test-rest|bench) run_stage "$stage" "stage_$stage" ;;
    test) run_stage test-gpu stage_test-gpu; run_stage test-rest stage_test-rest ;;
    summary) ;;
    *) echo "unknown stage '$stage' (install, build, test, test-gpu, test-rest, bench, summary)" >&2
       exit 2 ;;
  esac
done

echo
echo "full results in $OUT"
JSON=$(ls -t "$OUT"/results/*.json 2>/dev/null | grep -v pytest-benchmark | head -n 1)
if [ -n "$JSON" ]; then
  "$PY" -m llmkern bench --summary "$JSON" --stages "$STATUS" | tee "$OUT/summary.txt"
else
  echo "stages:"
  cat "$STATUS" 2>/dev/null
  echo "(no benchmark results in $OUT/results)"
fi
exit $FAILED
