#!/usr/bin/env bash
# The GPU check, for a machine with a CUDA device and a Python that already holds torch and
# Triton (no virtual environment, no network): builds the extension from this tree, runs the
# Triton kernel tests on CUDA, compute-sanitizer on one call of every kernel path, and the GPU
# benchmark. Everything it writes goes to one folder (at most 8 files):
#
#     make gpu-check                     # or: bash bench/gpu_check.sh [OUT_DIR]
#     GPU_OUT=/tmp/x PYTHON=python3 bash bench/gpu_check.sh
#
#   build.log  tests.log  sanitizer.log  bench.log  gpu-kernels.json  summary.md
#
# Each step has a time limit (seconds, below) so that the whole check stays under 8 minutes;
# a step that fails or runs out of time is marked in summary.md and the next one still runs.
# Without a CUDA device it says so and exits with status 2 before doing anything.
# GPU_CHECK_CPU=1 runs the same steps on a CPU machine instead, to check the script itself: the
# kernel tests under Triton's interpreter (a sample), no sanitizer, the benchmark's --tiny mode.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${1:-${GPU_OUT:-gpu-out}}
T_BUILD=${T_BUILD:-120}
T_TESTS=${T_TESTS:-150}
T_SANITIZER=${T_SANITIZER:-60}
T_BENCH=${T_BENCH:-150}     # the benchmark writes its JSON after every row: a cut run keeps it

CPU=${GPU_CHECK_CPU:-0}
if [ "$CPU" != 1 ] && \
   ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "gpu-check: no CUDA device visible to $PY (torch.cuda.is_available() is False, or torch" \
         "is missing); nothing was run. Run it on a machine with an NVIDIA GPU." >&2
    exit 2
fi
mkdir -p "$OUT"
SUMMARY="$OUT/summary.md"
START=$(date +%s)
status=0

step() {  # step NAME LIMIT LOG COMMAND...: runs COMMAND with a time limit, logs, records
    local name=$1 limit=$2 log=$3
    shift 3
    local t0=$(date +%s)
    echo "== $name (limit ${limit}s): $*" | tee -a "$OUT/$log"
    timeout --kill-after=10 "$limit" "$@" >>"$OUT/$log" 2>&1
    local rc=$?
    local dt=$(( $(date +%s) - t0 ))
    local verdict=ok
    if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then verdict="timed out"; status=1
    elif [ $rc -ne 0 ]; then verdict="failed (exit $rc)"; status=1; fi
    echo "| $name | $verdict | ${dt} s | \`$log\` |" >>"$SUMMARY"
    echo "== $name: $verdict in ${dt}s" | tee -a "$OUT/$log"
}

{
    echo "# GPU check"
    echo
    "$PY" - <<'EOF'
import platform, torch, triton
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    device = f"{p.name}, {p.multi_processor_count} SMs, {p.total_memory / 2**30:.0f} GiB"
else:
    device = "no GPU (GPU_CHECK_CPU=1: the script's own check, under Triton's interpreter)"
print(f"Device: {device}; torch {torch.__version__} (CUDA {torch.version.cuda}), "
      f"triton {triton.__version__}, Python {platform.python_version()}")
EOF
    echo
    echo "| step | result | time | log |"
    echo "|---|---|---|---|"
} >"$SUMMARY"

# Packages the GPU image lacks, brought as wheels in .whl/ (`make gpu-wheels`: Torch-Pruning,
# which the coupled rows of the benchmark need to find ResNet-50's channel groups), installed
# into a folder of their own on PYTHONPATH; without them those rows say they were skipped.
if ls .whl/*.whl >/dev/null 2>&1; then
    SITE=$(mktemp -d)
    step wheels 60 build.log "$PY" -m pip install -q --no-index --no-deps --no-compile \
        --no-cache-dir --target "$SITE" .whl/*.whl
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi

# The extension, from this tree, against the torch already installed (no isolation, no deps).
step build "$T_BUILD" build.log env MAX_JOBS=16 "$PY" -m pip install --no-build-isolation \
    --no-deps --no-index -e .

# The kernel tests on CUDA, GPU-only ones included (pytest-xdist spreads the first compiles).
XDIST=()
if "$PY" -c "import xdist" 2>/dev/null; then XDIST=(-n 8); fi
if [ "$CPU" = 1 ]; then
    step tests "$T_TESTS" tests.log env TRITON_INTERPRET=1 "$PY" -m pytest tests_kernels -q \
        -p no:cacheprovider -k "test_foreach_matches_reference or test_registration"
else
    step tests "$T_TESTS" tests.log "$PY" -m pytest tests_kernels -q -p no:cacheprovider \
        "${XDIST[@]}"
fi

# One call of every kernel path under compute-sanitizer's memcheck.
if [ "$CPU" = 1 ]; then
    echo "| sanitizer | skipped: no GPU | - | - |" >>"$SUMMARY"
elif command -v compute-sanitizer >/dev/null; then
    step sanitizer "$T_SANITIZER" sanitizer.log compute-sanitizer --tool memcheck \
        --error-exitcode 3 "$PY" bench/gpu_sanitize.py
else
    echo "| sanitizer | compute-sanitizer not found | - | - |" >>"$SUMMARY"
fi

# The benchmark: every operator against the eager and compiled reference and the copy floor.
if [ "$CPU" = 1 ]; then
    step bench "$T_BENCH" bench.log env TRITON_INTERPRET=1 "$PY" bench/gpu_kernels.py --tiny \
        --dtypes fp32 --out "$OUT/gpu-kernels.json"
else
    step bench "$T_BENCH" bench.log "$PY" bench/gpu_kernels.py --out "$OUT/gpu-kernels.json" \
        --compile-ops group_shrink_ exclusive_shrink_ --compile-dtypes fp32 \
        --compile-mode default
fi

if [ -s "$OUT/gpu-kernels.json" ]; then
    "$PY" bench/gpu_report.py "$OUT/gpu-kernels.json" >>"$SUMMARY" 2>>"$OUT/bench.log"
fi
echo >>"$SUMMARY"
echo "Total: $(( $(date +%s) - START )) s" >>"$SUMMARY"
cat "$SUMMARY"
exit $status
