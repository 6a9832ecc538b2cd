#!/usr/bin/env bash
# The server against the offline engine on model A, in one lease (issue 11's server goal):
#     bash bench/server_vs_offline.sh          (on the GPU machine; carry .whl)
# 1. Offline model A (bench/throughput.py: 1000 prompts of 128 random ids, 128 out, ignore_eos),
#    without a tokenizer (as bench/workloads.py runs it) and with one (detokenizing, as the
#    server does).
# 2. `python -m aserve` on the same model, all 1000 requests at once (bench/serving.py), once per
#    value of ASERVE_DELIVERY_REST in RESTS (the event loop's rest after writing a step's chunks,
#    aserve/engine/async_engine.py; "default", the default: the server's own, 2 with an engine
#    process and 6 in one process), then at the Poisson RATES at the default rest, each server
#    variant (SERVER_ARGS_SETS) in turn.
# PREVIOUS_DIR (an earlier version unpacked, carried; or several, space-separated, e.g. this
# version copied too, to see what the folder alone does): its server too, in every round, first in
# odd rounds and last in even ones (this version's servers, then, last and first); once per set
# of PREVIOUS_ARGS_SETS (as SERVER_ARGS_SETS) where given.
# CLIENT_PROCESSES: bench/serving.py's --processes (default 1) for the servers' runs; one client
# process parsing ~66k chunks a second may be what limits (its "Client CPU" row near 1.0). A
# list ("1 4") runs each server variant once per count.
# CLIENT_ARGS_SETS: bench/serving.py flags per run, ';' between sets, each run with every server
# variant, e.g. ";--warm-connections" (connections opened before the clock, and not). CLIENT_ARGS
# (one set) where CLIENT_ARGS_SETS is not given. The previous version's servers take the first set.
# SERVER_ARGS_SETS: server variants of one call, ';' between them, e.g.
# "--max-num-seqs 256;--max-num-seqs 512" (each adds to SERVER_ARGS; default: one, the defaults).
# TOKENIZER: bytes (default: a byte-level BPE, as OPT-125m's own) or words (earlier sessions'
# word-level tokenizer), bench/make_random_model.py --tokenizer.
# SERVER_ROUNDS (default 1): the server variants that many times, each round after an offline run with
# a tokenizer, so that a call shows each one's spread beside offline's (the H200's runs of one
# configuration spread 41-66k out tok/s in the twenty-fourth session).
# BUSY_OFFLINE=N (or a list, "2 5"): in each round, offline with a tokenizer once more beside N
# processes that spin on a core each, as a served run keeps the API server and the client
# processes busy (a host's all-core clock and shared caches: does offline slow as much? Not
# counted as the round's offline run).
# NO_HTTP="SPREADS" (ms, e.g. "0 200"): in each round, the served engine without HTTP too
# (bench/engine_process_burst.py: the burst handed straight to the server's engine driver, its
# submissions spread over that many ms): what the engine process costs apart from the server;
# with ENGINE_TIMING=1 its engine process's phases too (--timers), beside offline's.
# NO_TOKENIZER_SERVER=1: also a server with --skip-tokenizer-init, the same work as offline
# without a tokenizer (a diagnostic: its chunks carry no text, so only its throughput counts).
# ENGINE_TIMING=1: the offline runs and this version's servers through
# bench/engine_thread_timing.py, which adds where the engine thread's time goes per step (wall
# and thread CPU per phase); the timers cost a few percent. TIMELINE=1 with it: also when the
# burst's requests reached the handlers and the engine, and how full the steps were over the run.
# DETAIL=1 with it: also the parts of launch (the forward of decode steps, replayed graphs, apart
# from that of steps with prompt tokens, run eagerly) and of the step's tensors.
set -uo pipefail
cd "$(dirname "$0")/.."
# Everything printed also goes to a log, which bench/ratio_summary.py reads at the end: each
# server run's ratio to its round's offline run with a tokenizer, and the ratio of the means.
run_log=$(mktemp)
exec > >(tee "$run_log")
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
if ls .whl/*.whl >/dev/null 2>&1 && [ ! -d /tmp/site/pydantic ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
fi
export PYTHONPATH=/tmp/site:$PWD
RESTS=${RESTS:-default}
RATES=${RATES:-}
model=/tmp/opt-125m
python3 bench/make_random_model.py --shape opt-125m --out $model --dtype float16 --config-only \
    --tokenizer "${TOKENIZER:-bytes}" >/dev/null
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
# The host's cores (threads per core: whether busy neighbours share a core with the engine)
lscpu 2>/dev/null | grep -E "^(Model name|CPU\(s\)|Thread|Core|Socket|NUMA node\(s\)|CPU max MHz)" | tr -s ' ' | paste -sd';'

timing() { [ "${ENGINE_TIMING:-0}" = 1 ]; }
timeline=$([ "${TIMELINE:-0}" = 1 ] && echo --timeline)
[ "${DETAIL:-0}" = 1 ] && timeline="$timeline --detail"   # the timers' --detail, with ENGINE_TIMING=1

offline() {  # offline LABEL [flags]
    local label=$1
    shift
    if timing; then
        echo "=== offline A, $label:"
        python3 bench/engine_thread_timing.py offline $model $timeline "$@" 2>/dev/null \
            | grep -E "^(===|  )"
        return
    fi
    echo "=== offline A, $label: $(python3 bench/throughput.py --model $model --load-format dummy \
        --num-prompts 1000 --input-len 128 --output-len 128 "$@" 2>/dev/null | tail -1)"
}

serve() {  # serve LABEL RATE DIR [env...]: one server (SERVER_ARGS added), one run of bench/serving.py
    local label=$1 rate=$2 dir=$3
    shift 3
    local server_cmd="python3 -m aserve"
    timing && [ "$dir" = . ] && server_cmd="python3 $PWD/bench/engine_thread_timing.py server $timeline"
    # shellcheck disable=SC2086
    (cd "$dir" && exec env "$@" $server_cmd --model $model --load-format dummy --port 8125 \
        --disable-log-requests ${SERVER_ARGS:-}) > /tmp/sv_server.log 2>&1 &
    local server=$!
    for _ in $(seq 120); do
        curl -sf localhost:8125/health >/dev/null && break
        kill -0 $server 2>/dev/null || { echo "=== $label: the server exited"; tail -5 /tmp/sv_server.log; return 1; }
        sleep 1
    done
    local n=1000
    [ "$rate" != inf ] && n=${RATE_PROMPTS:-300}
    echo "=== server A, $label, rate $rate, $n prompts: $(timeout 200 python3 bench/serving.py \
        --base-url http://localhost:8125 --request-rate "$rate" --num-prompts $n --input-len 128 \
        --output-len 128 --random-token-ids 30000 --ignore-eos --processes "${CLIENT_PROCESSES:-1}" ${CLIENT_ARGS:-} 2>&1 \
        | grep -E 'Failed|Output token|Client CPU|MEAN|P50|P99' | tr -s ' ' | paste -sd' ')"
    kill -INT $server
    wait $server 2>/dev/null
    if timing && [ "$dir" = . ]; then grep -E "^(===|  )" /tmp/sv_server.log | head -90; fi
}

all_processes=${CLIENT_PROCESSES:-1}
first_processes=${all_processes%% *}
CLIENT_PROCESSES=$first_processes   # the previous version's server and the Poisson runs take the first
offline "no tokenizer" --skip-tokenizer-init
offline "with a tokenizer"
IFS=';' read -r -a previous_sets <<< "${PREVIOUS_ARGS_SETS:-}"
[ ${#previous_sets[@]} = 0 ] && previous_sets=("")
previous() {  # each PREVIOUS_DIR's server, once per set of PREVIOUS_ARGS_SETS
    local dir set
    for dir in ${PREVIOUS_DIR:-}; do
        for set in "${previous_sets[@]}"; do
            SERVER_ARGS="${SERVER_ARGS:-} $set" CLIENT_ARGS=${client_sets[0]} \
                serve "previous version ($dir)${set:+,$set}" inf "$dir" PYTHONPATH="/tmp/site:$PWD/$dir"
        done
    done
}
# Every server variant of one call: each set of SERVER_ARGS_SETS (';' between sets; a set adds
# to SERVER_ARGS) with each count of CLIENT_PROCESSES (a list), at each rest.
IFS=';' read -r -a arg_sets <<< "${SERVER_ARGS_SETS:-}"
[ ${#arg_sets[@]} = 0 ] && arg_sets=("")
base_args=${SERVER_ARGS:-}
# CLIENT_ARGS once reached the previous version's servers alone (the loop below set this
# version's from CLIENT_ARGS_SETS; fixed in the thirtieth session): both take the same clients.
IFS=';' read -r -a client_sets <<< "${CLIENT_ARGS_SETS:-${CLIENT_ARGS:-}}"
[ ${#client_sets[@]} = 0 ] && client_sets=("")
busy_offline() {  # BUSY_OFFLINE="N ...": offline with a tokenizer again beside N spinning processes
    local count pids i
    for count in ${BUSY_OFFLINE:-}; do
        pids=()
        for i in $(seq "$count"); do
            python3 -c "while True: pass" &
            pids+=($!)
        done
        offline "with a tokenizer, beside $count busy processes"
        kill "${pids[@]}" 2>/dev/null
        wait "${pids[@]}" 2>/dev/null
    done
}
no_http() {  # NO_HTTP="SPREADS": the engine process fed without HTTP, once per spread
    [ -n "${NO_HTTP:-}" ] || return 0
    local timers=
    timing && timers=--timers   # ENGINE_TIMING=1: its engine process's phases, as offline's
    # shellcheck disable=SC2086
    python3 bench/engine_process_burst.py $model --spread-ms "$(echo $NO_HTTP | tr ' ' ',')" $timers 2>/dev/null \
        | sed -n -e '/^{/{s/^/=== engine process, no HTTP: /;p;d}' -e '/^\(===\|  \)/p'
}
for round in $(seq "${SERVER_ROUNDS:-1}"); do
    [ "$round" -gt 1 ] && offline "with a tokenizer, round $round"
    busy_offline
    no_http
    # The previous version's server takes turns with this one's: first in odd rounds, last in even.
    [ $((round % 2)) = 1 ] && previous
    for set in "${arg_sets[@]}"; do
        for processes in $all_processes; do
            for client_set in "${client_sets[@]}"; do
                for rest in $RESTS; do
                    local_rest=ASERVE_DELIVERY_REST=$rest
                    [ "$rest" = default ] && local_rest=ASERVE_DELIVERY_REST=   # empty: the server's own
                    SERVER_ARGS="$base_args $set" CLIENT_PROCESSES=$processes CLIENT_ARGS=$client_set \
                        serve "ASERVE_DELIVERY_REST=$rest${set:+,$set}, $processes client process(es)${client_set:+ $client_set}" \
                        inf . "$local_rest"
                done
            done
        done
    done
    [ $((round % 2)) = 0 ] && previous
done
SERVER_ARGS=$base_args CLIENT_PROCESSES=$first_processes
if [ "${NO_TOKENIZER_SERVER:-0}" = 1 ]; then
    SERVER_ARGS=--skip-tokenizer-init serve "--skip-tokenizer-init" inf .
fi
for set in "${arg_sets[@]}"; do   # the Poisson rates, with each server variant
    for rate in $RATES; do
        SERVER_ARGS="$base_args $set" serve "default${set:+,$set}" "$rate" .
    done
done
offline "no tokenizer, again" --skip-tokenizer-init
sleep 1   # tee's last lines into the log
python3 bench/ratio_summary.py < "$run_log"
