#!/usr/bin/env bash
# The whole GPU check of issue 10 as one command, sized for a 15-minute device lease and the
# device tool's 600 s per command: about 8 minutes expected on an H200, at most ~9.5 (tests
# 170 s + kernels 70 s + benchmark 300 s + ~15 s of set-up, each part under its own time limit,
# so one hang cannot eat the lease; what a part printed before its limit stays in its log). Run from the repository root; on the device machine, with the wheels of
# benchmarks/gpu_wheels.sh carried in `.whl/`:
#
#   run(command="bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=600)
#
# Parts, each logged (to $OUT, else to LOGDIR, else benchmarks/out/gpu_check) and timed:
#   env      versions, nvidia-smi -L                                      -> env.log
#   tests    the kernel, CUDA-graph, decoder and engine tests on the GPU   -> tests.log
#   kernels  python3 benchmarks/gpu_kernels.py (per-op times of a step)   -> kernels.log
#   bench    python3 benchmarks/gpu.py (both models)                       -> gpu.log
# A failing test does not stop the benchmarks; the exit status is the first failing part's.
#
# Usage: bash benchmarks/gpu_check.sh [--dry-run] [LOGDIR]
#   --dry-run  on a machine without CUDA: the same steps, the benchmark as --smoke (checks the
#              script itself; its figures mean nothing). Without it, no CUDA is an error.
# Limits (seconds) can be changed through TESTS_LIMIT, KERNELS_LIMIT and BENCH_LIMIT; GPU_ARGS
# replaces the benchmark's arguments (e.g. GPU_ARGS="--models qwen3-0.6b").
set -uo pipefail

DRY=0
if [[ ${1:-} == --dry-run ]]; then DRY=1; shift; fi
LOG=${OUT:-${1:-benchmarks/out/gpu_check}}
TESTS_LIMIT=${TESTS_LIMIT:-170}
BENCH_LIMIT=${BENCH_LIMIT:-300}
KERNELS_LIMIT=${KERNELS_LIMIT:-70}
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 HF_HUB_DISABLE_PROGRESS_BARS=1  # unbuffered logs, no progress bars
mkdir -p "$LOG"
BEGIN=$SECONDS
STATUS=0

stamp() { printf '\n== [%d s] %s\n' "$((SECONDS - BEGIN))" "$*"; }
ended() {  # PART RC START: one line per part, saying whether its time limit stopped it
    local why=""
    [[ $2 == 124 || $2 == 137 ]] && why=" (stopped at its time limit)"
    stamp "$1: exit $2 after $((SECONDS - $3)) s$why"
    [[ $STATUS == 0 ]] && STATUS=$2
}

# Packages the device lacks travel as wheels; install them only where they are missing, so
# the same script runs unchanged on a machine that has them.
if ! "$PY" -c "import msgspec, pytest_asyncio, pytest_aiohttp" 2>/dev/null; then
    if ! compgen -G ".whl/*.whl" >/dev/null; then
        echo "msgspec/pytest-asyncio/pytest-aiohttp missing and no .whl/: run" \
             "benchmarks/gpu_wheels.sh here and carry .whl" >&2
        exit 2
    fi
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 2
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

stamp "env"
{
    "$PY" - <<'EOF'
import importlib.metadata as md
import sys

import torch

print("python", sys.version.split()[0], sys.executable)
for name in ("torch", "triton", "transformers", "tokenizers", "numpy", "pytest",
             "pytest-asyncio", "pytest-aiohttp", "hypothesis", "msgspec", "aiohttp"):
    try:
        print(f"{name} {md.version(name)}")
    except md.PackageNotFoundError:
        print(f"{name} MISSING")
print("cuda available:", torch.cuda.is_available(),
      torch.cuda.get_device_name() if torch.cuda.is_available() else "")
EOF
    nvidia-smi -L 2>&1 || echo "nvidia-smi: not available"
} 2>&1 | tee "$LOG/env.log"

if ! grep -q "^cuda available: True" "$LOG/env.log"; then
    if [[ $DRY == 0 ]]; then
        echo "no CUDA device here: this check needs a GPU (use --dry-run to test the script" \
             "on a CPU machine)" >&2
        exit 2
    fi
    echo "no CUDA device: dry run (tests on the CPU path, benchmark as --smoke)"
    GPU_ARGS=${GPU_ARGS:---smoke}
fi

# Our tests with our pytest options; the device's own pytest plugins (xdist, cov, benchmark,
# timeout...) are not loaded, ours are named. pyproject's filterwarnings=error stays, except
# that UserWarning, DeprecationWarning and FutureWarning are shown (in the log's warnings
# summary) instead of failing: torch 2.11 and Triton 3.6 (whose compiler, unlike the CPU
# interpreter, warns about kernel code) may raise them, and this one run cannot be redone.
# pytest's -W takes exact module names, so the filter is by category; CI stays strict.
stamp "tests (limit ${TESTS_LIMIT} s)"
T0=$SECONDS
PYTEST_DISABLE_PLUGIN_AUTOLOAD=1 timeout -s INT -k 15 "$TESTS_LIMIT" \
    "$PY" -m pytest -q -rfEs -p no:cacheprovider \
    -p pytest_asyncio.plugin -p pytest_aiohttp.plugin -p _hypothesis_pytestplugin \
    -W default::UserWarning -W default::DeprecationWarning -W default::FutureWarning \
    tests/unit/test_kernels_attention.py tests/unit/test_kernels_fused.py \
    tests/unit/test_kernels_cuda_graphs.py \
    tests/unit/test_decoder.py tests/integration/test_engine_cuda.py \
    tests/integration/test_engine_parity.py \
    2>&1 | tee "$LOG/tests.log"
ended tests $? "$T0"

# Per-op times of one scoring step (matmuls, attention tiles, fused element-wise kernels vs
# the torch path): where the step's time goes, whatever the end-to-end figure below says.
stamp "kernels (limit ${KERNELS_LIMIT} s)"
T0=$SECONDS
KERNEL_ARGS=$([[ $DRY == 1 ]] && echo --smoke || true)
# shellcheck disable=SC2086  # KERNEL_ARGS is empty or one word
timeout -s INT -k 15 "$KERNELS_LIMIT" "$PY" benchmarks/gpu_kernels.py $KERNEL_ARGS 2>&1 \
    | tee "$LOG/kernels.log"
ended kernels $? "$T0"

stamp "bench (limit ${BENCH_LIMIT} s)"
T0=$SECONDS
# shellcheck disable=SC2086  # GPU_ARGS is a list of words
timeout -s INT -k 15 "$BENCH_LIMIT" "$PY" benchmarks/gpu.py ${GPU_ARGS:-} 2>&1 \
    | tee "$LOG/gpu.log"
ended bench $? "$T0"

stamp "done, exit $STATUS; logs in $LOG"
exit "$STATUS"
