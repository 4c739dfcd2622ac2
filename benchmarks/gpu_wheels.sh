#!/usr/bin/env bash
# Download the wheels the GPU machine lacks, so the GPU check (benchmarks/gpu_check.sh) can run
# there without a network. That machine (CPython 3.12, Linux x86_64) already has torch, triton,
# transformers, tokenizers, safetensors, numpy, aiohttp, pluggy, prometheus-client, uvloop,
# tqdm, pytest and hypothesis; it lacks only these three, none of which needs anything more
# that it lacks (msgspec needs nothing; pytest-asyncio needs pytest>=8.4 and, below Python
# 3.13, typing-extensions; pytest-aiohttp needs pytest, aiohttp and pytest-asyncio).
#
# Exact versions, one each: two versions of one package in the folder break the install there.
# pytest-asyncio 1.5 is the one our development environment runs (pyproject: >=1.0) and
# supports pytest 9.
#
# Usage (here, with internet):  bash benchmarks/gpu_wheels.sh [DEST]      (default: .whl)
# Then name DEST in the device run's `carry`; gpu_check.sh installs it with pip --no-index.
set -euo pipefail

DEST=${1:-.whl}
PYTHON=${PYTHON:-python3}
WHEELS=(msgspec==0.23.0 pytest-asyncio==1.5.0 pytest-aiohttp==1.1.1)

mkdir -p "$DEST"
rm -f "$DEST"/*.whl  # only the wheels named here, one version each
"$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --dest "$DEST" \
    --implementation cp --python-version 3.12 \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux1_x86_64 \
    "${WHEELS[@]}"
ls -l "$DEST"
du -sh "$DEST"
