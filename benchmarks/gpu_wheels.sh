#!/usr/bin/env bash
# Download the wheels slmserve (and its tests) need that a CUDA box with torch, triton and
# transformers already installed usually lacks, for Linux x86_64, CPython 3.11 and 3.12.
# Run on a machine with internet; carry the folder and the checkout to the GPU box; there:
#
#   pip install --no-index --find-links wheels/ msgspec pluggy aiohttp prometheus-client uvloop
#   pip install --no-index --find-links wheels/ pytest pytest-asyncio pytest-aiohttp hypothesis
#   python benchmarks/gpu.py                      # the benchmark (runs from the checkout)
#   python -m pytest tests/unit/test_kernels_attention.py tests/unit/test_kernels_cuda_graphs.py \
#       tests/unit/test_decoder.py tests/integration/test_engine_parity.py
#
# Usage: benchmarks/gpu_wheels.sh [DEST]   (default: wheels/)
set -euo pipefail

DEST=${1:-wheels}
RUNTIME=(msgspec pluggy aiohttp aiohappyeyeballs aiosignal attrs frozenlist multidict propcache
         yarl idna typing-extensions prometheus-client uvloop tqdm)
TESTS=(pytest pytest-asyncio pytest-aiohttp hypothesis sortedcontainers iniconfig packaging
       pygments)

mkdir -p "$DEST"
for py in 311 312; do
    python -m pip download --quiet --dest "$DEST" --no-deps --only-binary=:all: \
        --implementation cp --python-version "$py" \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 \
        "${RUNTIME[@]}" "${TESTS[@]}"
done
ls "$DEST"
