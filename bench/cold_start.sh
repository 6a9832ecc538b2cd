#!/usr/bin/env bash
# A machine's first engine start, on an empty cubin cache (issue 11's start goal), on the GPU machine:
#     [PREVIOUS_DIR=.previous] [ROUNDS=2] [MODEL=llama] [DROP_CACHES=1] [START_ENVS=...] bash bench/cold_start.sh
# Each start runs in a fresh process with ASERVE_CACHE_DIR a new empty folder, so every CUDA
# kernel build is compiled (aserve/cuda/compile_ahead.py compiles them while the weights load),
# then a second start in the same process reads them back (a user's later starts).
# PREVIOUS_DIR (an earlier version unpacked: `git archive REV | tar -x -C .previous`, carried):
# its starts take turns with this version's, ROUNDS times, for a before/after in one lease.
# DROP_CACHES=1: the page cache emptied before each start (root only), so every start reads the
# libraries from disk as a fresh machine's first does; the twenty-fourth session's starts on an
# empty cubin cache took 10.4 s as a machine's first run of model B and 3.3 s after it.
# START_ENVS: this version's starts once per setting, taking turns (';' between settings, each
# VAR=value words), e.g. "ASERVE_PREFETCH_LIBRARIES=0;ASERVE_PREFETCH_LIBRARIES=1".
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
ROUNDS=${ROUNDS:-2}
MODEL=${MODEL:-llama}
IFS=';' read -r -a settings <<< "${START_ENVS:-}"
[ ${#settings[@]} = 0 ] && settings=("")
nproc
drop_caches() {
    [ "${DROP_CACHES:-0}" = 1 ] || return 0
    sync && echo 3 > /proc/sys/vm/drop_caches || echo "    (could not drop the page cache: not root?)"
}
start() {  # start LABEL DIR [VAR=value...]: one fresh process on an empty cubin cache, two starts
    local label=$1 dir=$2
    shift 2
    local cache
    cache=$(mktemp -d)
    drop_caches
    echo "=== round $round, $label, empty cache $cache:"
    # shellcheck disable=SC2068
    (cd "$dir" && env ASERVE_CACHE_DIR="$cache" $@ timeout 150 python3 bench/profile_start.py --model "$MODEL" \
        --starts 2 --top 0 2>&1 | grep -E "^start [0-9]|compiling [0-9]+ CUDA|read ahead")
    echo "    cubins compiled: $(ls "$cache/cubins" 2>/dev/null | wc -l)"
    rm -rf "$cache"
}
for round in $(seq "$ROUNDS"); do
    [ -n "${PREVIOUS_DIR:-}" ] && start "previous ($PREVIOUS_DIR)" "$PREVIOUS_DIR"
    for setting in "${settings[@]}"; do
        # shellcheck disable=SC2086
        start "this version${setting:+, $setting}" . $setting
    done
done
