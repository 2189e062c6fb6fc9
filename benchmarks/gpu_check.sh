#!/usr/bin/env bash
# The GPU check: verify llmkern on this machine's GPU in one command, from a bare checkout.
#
#   bash benchmarks/gpu_check.sh OUTDIR
#
# Needs python3 with torch, triton, pytest (pytest-xdist) and, for the CUDA C++ backend, nvcc
# and ninja; no package registry. Finishes within 8 minutes of wall time on an H100/H200 and
# leaves three files in OUTDIR: summary.txt (at most ~60 lines, also printed last: paste it
# into a bug report), gpu_check_logs.tar.gz (every log, CSV, JSON and PNG) and junit.xml.
#
# First the device and versions as found (nvidia-smi, torch, triton, nvcc), then the stages, in
# order, each cut at its budget (seconds) and reported, never the whole run lost:
#   install      45  pip install --no-deps --no-build-isolation -e . (no CUDA build in pip)
#   env          30  device, versions, the measured copy bandwidth and bf16 matmul rate
#   build       220  the CUDA extension, sm_90 only, all cores (MAX_JOBS=16
#                    TORCH_CUDA_ARCH_LIST=9.0), in the background while the Triton tests run
#   test-bf16   120  the Triton kernels' bf16 cases first (bf16 never runs in CI)
#   test-triton 150  their fp32/fp16 cases
#   test-cuda    45  the CUDA C++ backend's cases, once the build is done
#   bench       120  `llmkern bench --quick`: one case per performance target
#                    (benchmarks/TARGETS.md), every provider (llmkern, eager, SDPA
#                    flash/efficient/cuDNN, torch.compile, Liger-Kernel when importable)
#   summary      15  always, last
# The whole run stops starting work at 460 s: a stage gets what is left when that is less.
#
# Test selection: the Triton kernels' test files (TRITON_TESTS below) without the
# ahead-of-time compile tests (CI runs those) and the torch.compile tests (each spends tens of
# seconds in Inductor), split into stages by benchmarks/gpu_tests.py (a pytest plugin). Triton
# compiles each kernel specialization on first use: this selection compiles about 1490 (982
# fp32/fp16 ones counted on a CPU under the interpreter with `pytest -p benchmarks.gpu_tests
# --count-kernels FILE`, each autotuned tiled-GEMM config counted (332 of them); 505 more
# estimated for bf16, the fp16 ones' twins). At 1-2 s each on 14 pytest workers that is about
# 105-215 s of the two Triton test stages' 270 s.
#
# Without a GPU (or with GPU_CHECK_DRY_RUN=1) this is a dry run of about a minute: the
# install is checked (pip --dry-run), the environment measured on the CPU, each test stage
# collected (not run), the build and the benchmarks marked 'needs GPU', and the summary made
# from canned results, so every piece of wiring runs.
set -u
cd "$(dirname "$0")/.."

if [ $# -ne 1 ] || [ "$1" = "-h" ] || [ "$1" = "--help" ]; then
  sed -n '2,38p' "$0"
  exit 2
fi
mkdir -p "$1" || exit 2
OUT=$(cd "$1" && pwd)
PY=${PYTHON:-python3}
START=$(date +%s)
DEADLINE=$((START + ${GPU_CHECK_SECONDS:-460}))
WORK=$(mktemp -d "${TMPDIR:-/tmp}/llmkern-gpu-check.XXXXXX")
mkdir -p "$WORK/logs" "$WORK/results"
: >"$WORK/stages.tsv"
TRITON_TESTS="tests/test_attention.py tests/test_attention_dropout.py tests/test_attention_hopper.py
  tests/test_decode_attention.py tests/test_layer_norm.py tests/test_softmax.py tests/test_matmul.py
  tests/test_mlp.py tests/test_gated_mlp.py tests/test_rotary.py tests/test_cross_entropy.py
  tests/test_logprobs.py"
CUDA_TESTS="$TRITON_TESTS tests/test_cuda_ops.py"
SELECT="not compile and not aot"  # ahead-of-time compiles (CI runs them) and torch.compile
BENCH_OPS=attention,decode_attention,layer_norm,rms_norm,softmax,mlp,linear_gelu,gemm,linear_cross_entropy,train_gpt2,generate_gpt2,linear_logprobs,swiglu_mlp,rotary,llama_step,grpo_sampling
WORKERS=${GPU_CHECK_WORKERS:-14}  # Triton's compiles are CPU-bound: most of the 16 cores
if [ -z "${LLMKERN_COMMIT:-}" ]; then
  LLMKERN_COMMIT=$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)
fi
export LLMKERN_COMMIT PYTHONUNBUFFERED=1

DRY=${GPU_CHECK_DRY_RUN:-}
if [ -z "$DRY" ]; then
  if "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    DRY=0
  else
    DRY=1
  fi
fi
[ "$DRY" = 1 ] && echo "no GPU here: dry run (the build, the tests and the benchmarks need a GPU)"

# record NAME STATUS SECONDS BUDGET NOTE: one line of stages.tsv
record() { printf '%s\t%s\t%s\t%s\t%s\n' "$@" >>"$WORK/stages.tsv"; }

# stage NAME BUDGET CMD...: run CMD with its output in logs/NAME.log, cut at its budget or at
# the deadline (SIGINT first, so pytest still writes its junit file and llmkern bench its JSON)
stage() {
  local name=$1 budget=$2 left t0 code status note=""
  shift 2
  left=$((DEADLINE - $(date +%s)))
  if [ "$left" -lt 5 ]; then
    record "$name" SKIP 0 "$budget" "no time left"
    return 1
  fi
  [ "$left" -lt "$budget" ] && budget=$left
  echo "=== $name (budget ${budget} s): $*"
  t0=$(date +%s)
  timeout -s INT -k 15 "$budget" "$@" >"$WORK/logs/$name.log" 2>&1
  code=$?
  case $code in
    0) status=PASS
       note=$(grep -oE '[0-9/]+ tests? collected \([0-9]+ deselected\)' "$WORK/logs/$name.log" | tail -n 1)
       [ -n "$note" ] && note="collected, not run: $note" ;;
    124|137) status=TIMEOUT; note="cut at ${budget} s" ;;
    *) status=FAIL; note="exit $code: $(grep -v '^\s*$' "$WORK/logs/$name.log" | tail -n 1 | cut -c1-100)" ;;
  esac
  record "$name" "$status" $(($(date +%s) - t0)) "$budget" "$note"
  tail -n 3 "$WORK/logs/$name.log"
  [ "$code" -eq 0 ]
}

# tests NAME BUDGET SELECT FILES...: one pytest stage (collect only in a dry run)
tests() {
  local name=$1 budget=$2 select=$3
  shift 3
  local args=(-q -p no:cacheprovider -p benchmarks.gpu_tests --gpu-select "$select" -k "$SELECT"
              --junitxml "$WORK/junit_$name.xml" -o junit_family=xunit1)
  if [ "$DRY" = 1 ]; then
    stage "$name" "$budget" "$PY" -m pytest "${args[@]}" --collect-only "$@"
  else
    stage "$name" "$budget" "$PY" -m pytest "${args[@]}" -n "$WORKERS" "$@"
  fi
}

build_extension() {
  if [ -z "${CUDA_HOME:-}" ] && command -v nvcc >/dev/null 2>&1; then
    CUDA_HOME=$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")
    export CUDA_HOME
  fi
  echo "CUDA_HOME=${CUDA_HOME:-unset} MAX_JOBS=$MAX_JOBS TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST"
  "$PY" setup.py build_ext --inplace && "$PY" -c "import llmkern._C"
}

# ---- install, env ------------------------------------------------------------------------
{  # what is known before anything is installed, in case the install fails
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1
  else
    echo "nvidia-smi: not found"
  fi
  "$PY" -c "import platform, torch, triton; print('python', platform.python_version(), 'torch',
torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)" 2>&1
  command -v nvcc >/dev/null && nvcc --version | tail -n 2 | head -n 1
} | tee "$WORK/logs/preflight.log"
if [ "$DRY" = 1 ]; then
  LLMKERN_SKIP_CUDA_BUILD=1 stage install 45 "$PY" -m pip install --dry-run --no-deps \
    --no-build-isolation --no-index -e .
else
  LLMKERN_SKIP_CUDA_BUILD=1 stage install 45 "$PY" -m pip install --no-deps --no-build-isolation -e .
fi
stage env 30 "$PY" -m llmkern.bench.gpu_check env "$WORK"
cat "$WORK/logs/env.log"
command -v nvidia-smi >/dev/null && nvidia-smi >"$WORK/logs/nvidia-smi.log" 2>&1

# ---- build in the background, Triton tests meanwhile -------------------------------------
BUILD_PID=""
if [ "$DRY" = 1 ]; then
  record build "needs GPU" 0 220 "skipped in the dry run"
else
  export MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
  export PY
  export -f build_extension
  stage build 220 bash -c build_extension &
  BUILD_PID=$!
fi
tests test-bf16 120 bf16 $TRITON_TESTS
tests test-triton 150 triton $TRITON_TESTS
if [ -n "$BUILD_PID" ]; then
  wait "$BUILD_PID"
  BUILT=$?
else
  BUILT=1
fi
if [ "$DRY" = 1 ] || [ "$BUILT" -eq 0 ]; then
  tests test-cuda 45 cuda $CUDA_TESTS
else
  record test-cuda SKIP 0 45 "the build did not finish: see logs/build.log"
fi

# ---- benchmarks: one quick case per target ------------------------------------------------
if [ "$DRY" = 1 ]; then
  record bench "needs GPU" 0 120 "skipped in the dry run; the summary shows canned figures"
  "$PY" -m llmkern.bench.gpu_check canned "$WORK" >"$WORK/logs/bench.log" 2>&1
else
  stage bench 120 "$PY" -m llmkern bench --quick --ops "$BENCH_OPS" --warmup-ms 10 --rep-ms 25 \
    --out "$WORK/results"
fi

# ---- summary and the three files ---------------------------------------------------------
"$PY" -m llmkern.bench.gpu_check junit "$WORK" "$OUT/junit.xml" 2>>"$WORK/logs/summary.log"
record total - $(($(date +%s) - START)) $((DEADLINE - START)) ""
"$PY" -m llmkern.bench.gpu_check summary "$WORK" >"$OUT/summary.txt" 2>>"$WORK/logs/summary.log" \
  || echo "summary failed: see logs/summary.log in the tarball" >>"$OUT/summary.txt"
cp "$OUT/summary.txt" "$WORK/summary.txt"
FAILED=$(awk -F'\t' '$2 == "FAIL" || $2 == "TIMEOUT" {n++} END {print n + 0}' "$WORK/stages.tsv")
tar -czf "$OUT/gpu_check_logs.tar.gz" -C "$WORK" . && rm -rf "$WORK"
echo
cat "$OUT/summary.txt"
[ "$FAILED" -eq 0 ]
