#!/usr/bin/env bash
# Where the server's time goes under load, on the GPU machine (carry .whl: it holds py-spy):
#     MODEL=A RATE=inf bash bench/profile_server.sh
# Starts `python -m aserve` on a random-weight model A (or B; host: a tiny one, for a CPU) under py-spy (sampling, not
# pausing the process), runs bench/serving.py against it, then prints bench/profile_summary.py's
# view of each thread. The raw profile is kept in $OUT (or /tmp) as server_profile.txt.
# Before it, one run without the profiler: the figures to quote.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
MODEL=${MODEL:-A}
RATE=${RATE:-inf}
NUM_PROMPTS=${NUM_PROMPTS:-1000}
out=${OUT:-/tmp}
PYSPY=$(command -v py-spy || echo /tmp/site/bin/py-spy)
shape=opt-125m dtype=float16 input=128 output=128
[ "$MODEL" = B ] && shape=llama-3.1-8b dtype=bfloat16 input=512 output=256
ids=30000
[ "$MODEL" = host ] && shape=opt-host dtype=float32 ids=4000   # a CPU's try-out: its vocabulary is 4096
python3 bench/make_random_model.py --shape $shape --out /tmp/$shape --dtype $dtype --config-only

serve_and_bench() {  # serve_and_bench LABEL DIR [py-spy record args...]: one server (aserve as in DIR), one run
    local label=$1 dir=$2
    shift 2
    # From DIR: `python -m` puts the working directory first on sys.path.
    (cd "$dir" && exec python3 -m aserve --model /tmp/$shape --load-format dummy --port 8124 \
        --disable-log-requests) > /tmp/profiled_server.log 2>&1 &
    local server=$! profiler=
    for _ in $(seq 120); do
        curl -sf localhost:8124/health >/dev/null && break
        kill -0 $server 2>/dev/null || { echo "=== the server exited"; tail -5 /tmp/profiled_server.log; return 1; }
        sleep 1
    done
    if [ $# -gt 0 ]; then  # attached once serving: the profile holds the benchmark, not the start-up
        "$@" --pid $server > /tmp/py-spy.log 2>&1 &
        profiler=$!
        sleep 1
    fi
    echo "=== $label: serving $MODEL at rate $RATE, $NUM_PROMPTS prompts"
    timeout 200 python3 bench/serving.py --base-url http://localhost:8124 --request-rate "$RATE" \
        --num-prompts "$NUM_PROMPTS" --input-len $input --output-len $output --random-token-ids $ids \
        --ignore-eos 2>&1 | grep -vE "^\s*$" | tail -22 | tee "$out/serving_${label// /_}.txt"
    [ -n "$profiler" ] && { kill -INT $profiler; wait $profiler; tail -2 /tmp/py-spy.log; }
    kill -INT $server
    wait $server 2>/dev/null
}

# PREVIOUS_DIR (an earlier version unpacked: `git archive REV | tar -x -C .previous`, carried):
# the same run against that version's server first, for a before/after in one lease.
if [ -n "${PREVIOUS_DIR:-}" ]; then
    PYTHONPATH="$PWD/$PREVIOUS_DIR:${PYTHONPATH:-}" serve_and_bench "previous version" "$PREVIOUS_DIR"
fi
serve_and_bench "without the profiler" .
if [ "${PROFILE:-1}" = 0 ]; then
    exit 0
elif [ -x "$PYSPY" ]; then
    # PYSPY_ARGS=--gil samples only the thread holding the GIL: where the one process's Python
    # time goes, engine thread and event loop together. On a CUDA device the engine steps in a
    # process of its own by default (--engine-process): PYSPY_ARGS=--subprocesses samples it
    # too (profile_summary.py names each thread with its process).
    # shellcheck disable=SC2086
    serve_and_bench "under py-spy" . "$PYSPY" record --nonblocking --threads -r 200 -f raw ${PYSPY_ARGS:-} \
        -o "$out/server_profile.txt"
    python3 bench/profile_summary.py "$out/server_profile.txt" --top ${TOP:-30} > "$out/profile_summary.txt"
    head -${SUMMARY_LINES:-80} "$out/profile_summary.txt"
else
    echo "no py-spy (carry .whl, filled by scripts/fetch_device_wheels.sh)"
fi
