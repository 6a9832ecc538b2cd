#!/usr/bin/env bash
# The README's test command: install what the tests need, then run them.
# torch is installed first and only when missing, so pip never picks a multi-GB CUDA build on
# a CPU machine, and a GPU user's own CUDA torch is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -c "import torch" 2>/dev/null || python3 -m pip install -q torch==2.13.0
python3 -m pip install -q -e ".[test]"
python3 -m pytest -q -p no:cacheprovider "$@"
