#!/usr/bin/env bash
# Fill .whl/ (git-ignored) with the wheels the GPU machine's image lacks, for bench/device_run.sh
# to install there (that machine reaches no package index). The image (Python 3.12, x86_64) has
# torch, transformers, aiohttp, uvloop, numba, pytest, hypothesis, httpx, anyio and tqdm, but not
# the server's pydantic and orjson, nor the tests' pytest-asyncio, openai and prometheus_client.
# Pinned; run on a machine that reaches PyPI:  bash scripts/fetch_device_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."

WHEELS=(
    pydantic==2.13.4
    pydantic-core==2.46.4      # exactly the one pydantic 2.13.4 requires
    annotated-types==0.8.0
    typing-inspection==0.4.5
    orjson==3.13.0
    pytest-asyncio==1.5.0
    openai==2.54.0             # the last major on httpx (3.x needs httpx2, not on the image)
    llguidance==1.9.1          # structured outputs (abi3: one wheel for every Python 3)
    prometheus_client==0.26.0  # its text parser reads /metrics in tests/test_server_metrics.py
    distro==1.9.0              # openai's dependencies the image lacks
    jiter==0.19.0
    sniffio==1.3.1
    py-spy==0.4.3              # bench: profiling the server under load (bench/profile_server.sh)
    nvidia-cuda-nvdisasm==13.5.37  # tests/test_cuda_instruction_order.py on the card's own NVRTC
)

# A fresh folder, swapped in at the end: two versions of one package would make pip refuse.
new=.whl.new
rm -rf "$new"
trap 'rm -rf "$new"' EXIT
# --only-binary with --platform also takes pure-Python (py3-none-any) wheels.
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_31_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 \
    -d "$new" "${WHEELS[@]}"
rm -rf .whl
mv "$new" .whl
ls .whl
du -sh .whl
