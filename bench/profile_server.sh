#!/usr/bin/env bash
# Where the server's time goes under load, on the GPU machine (carry .whl: it holds py-spy):
#     MODEL=A RATE=inf bash bench/profile_server.sh
# Starts `python -m aserve` on a random-weight model A (or B) under py-spy (sampling, not
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
python3 bench/make_random_model.py --shape $shape --out /tmp/$shape --dtype $dtype --config-only

serve_and_bench() {  # serve_and_bench LABEL [py-spy args...]: one server, one benchmark run
    local label=$1
    shift
    "$@" python3 -m aserve --model /tmp/$shape --load-format dummy --port 8124 --disable-log-requests \
        > /tmp/profiled_server.log 2>&1 &
    local server=$!
    for _ in $(seq 120); do
        curl -sf localhost:8124/health >/dev/null && break
        kill -0 $server 2>/dev/null || { echo "=== the server exited"; tail -5 /tmp/profiled_server.log; return 1; }
        sleep 1
    done
    echo "=== $label: serving $MODEL at rate $RATE, $NUM_PROMPTS prompts"
    timeout 200 python3 bench/serving.py --base-url http://localhost:8124 --request-rate "$RATE" \
        --num-prompts "$NUM_PROMPTS" --input-len $input --output-len $output --random-token-ids 30000 \
        --ignore-eos 2>&1 | grep -vE "^\s*$" | tail -22 | tee "$out/serving_${label// /_}.txt"
    pkill -INT -f "aserve --model /tmp/$shape" 
    wait $server 2>/dev/null
}

# SWITCH_INTERVALS="0.005 0.0005": one unprofiled run per GIL switch interval (the engine's
# ASERVE_SWITCH_INTERVAL_S); by default one run at the engine's own setting.
for interval in ${SWITCH_INTERVALS:-default}; do
    if [ "$interval" = default ]; then
        serve_and_bench "without the profiler"
    else
        serve_and_bench "switch interval $interval" env ASERVE_SWITCH_INTERVAL_S=$interval
    fi
done
if [ "${PROFILE:-1}" = 0 ]; then
    exit 0
elif [ -x "$PYSPY" ]; then
    # PYSPY_ARGS=--gil samples only the thread holding the GIL: where the one process's Python
    # time goes, engine thread and event loop together.
    # shellcheck disable=SC2086
    serve_and_bench "under py-spy" "$PYSPY" record --nonblocking --threads -r 200 -f raw ${PYSPY_ARGS:-} \
        -o "$out/server_profile.txt" --
    python3 bench/profile_summary.py "$out/server_profile.txt" --top ${TOP:-30} > "$out/profile_summary.txt"
    head -${SUMMARY_LINES:-80} "$out/profile_summary.txt"
else
    echo "no py-spy (carry .whl, filled by scripts/fetch_device_wheels.sh)"
fi
