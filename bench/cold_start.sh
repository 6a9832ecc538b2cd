#!/usr/bin/env bash
# A machine's first engine start, on an empty cubin cache (issue 11's start goal), on the GPU machine:
#     [PREVIOUS_DIR=.previous] [ROUNDS=2] [MODEL=llama] bash bench/cold_start.sh
# Each start runs in a fresh process with ASERVE_CACHE_DIR a new empty folder, so every CUDA
# kernel build is compiled (aserve/cuda/compile_ahead.py compiles them while the weights load),
# then a second start in the same process reads them back (a user's later starts).
# PREVIOUS_DIR (an earlier version unpacked: `git archive REV | tar -x -C .previous`, carried):
# its starts take turns with this version's, ROUNDS times, for a before/after in one lease.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
ROUNDS=${ROUNDS:-2}
MODEL=${MODEL:-llama}
versions=.
[ -n "${PREVIOUS_DIR:-}" ] && versions="$PREVIOUS_DIR ."
nproc
for round in $(seq "$ROUNDS"); do
    for dir in $versions; do
        cache=$(mktemp -d)
        label=$([ "$dir" = . ] && echo "this version" || echo "previous ($dir)")
        echo "=== round $round, $label, empty cache $cache:"
        (cd "$dir" && ASERVE_CACHE_DIR=$cache timeout 150 python3 bench/profile_start.py --model "$MODEL" \
            --starts 2 --top 0 2>&1 | grep -E "^start [0-9]|compiling [0-9]+ CUDA")
        echo "    cubins compiled: $(ls "$cache/cubins" 2>/dev/null | wc -l)"
        rm -rf "$cache"
    done
done
