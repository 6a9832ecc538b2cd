#!/usr/bin/env bash
# The README's test command: install what the tests need, lint, then run the tests.
# torch is installed only when missing, so a GPU user's own CUDA build of torch is kept. On
# this project's machines `pip install torch==2.13.0` takes a CPU build that lies on disk; on
# a stock Linux machine PyPI's torch is the multi-GB CUDA build, and a machine without a GPU
# should first install the CPU build from PyTorch's index (see README).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -c "import torch" 2>/dev/null || python3 -m pip install -q torch==2.13.0
python3 -m pip install -q -e ".[test]"
python3 -m flake8 aserve tests bench examples
# -rs: the summary names why tests were skipped (most need an NVIDIA GPU).
python3 -m pytest -q -p no:cacheprovider -rs "$@"
