#!/usr/bin/env bash
# One call on the GPU machine (through the device tool; carry .whl, filled here by
# scripts/fetch_device_wheels.sh, for the packages its image lacks):
#     STAGES="tests bench" WORKLOADS=A,A1,B1,B bash bench/device_run.sh
# Stages, each bounded by `timeout` (one device call may run 600 s: split the stages over calls):
#   tests    the CUDA tests (-m cuda; CUDA_TESTS picks others), then the engine-vs-transformers tests
#            on the card (~6 min on an H200: a call of its own)
#   kernels  bench/decode_attention.py (paged decode vs the copy ceiling; KERNELS_ARGS) and bench/gemv.py (vs
#            cuBLAS; GEMV=0 leaves it out)
#   serving  bench/serving.py against `python -m aserve` on models A and B (random weights), at
#            Poisson 10 and 40 req/s and all at once (SERVING_MODELS, SERVING_RATES)
#   bench    bench/workloads.py --baseline hf (WORKLOADS; BENCH_ARGS adds flags, e.g. --num-prompts 200;
#            BASELINE="" leaves transformers out), after WARMUP_RUNS (default 2) untimed runs of A1,A
#   serverratio  bench/server_vs_offline.sh at the server's own delivery rest (RESTS): offline A, then
#            model A served all at once, in the same call (the issue's server goal); runs after
#            bench, on a machine warmed up; 4 client processes on warm connections unless
#            CLIENT_PROCESSES / CLIENT_ARGS say otherwise
#   structured  bench/structured.py: model A with 0, 50% and 100% of its requests under a JSON schema
#   previous the same workloads, engine only, run by an earlier version of aserve unpacked in
#            $PREVIOUS_DIR (default .previous/: `git archive REV | tar -x -C .previous`, carried),
#            just before `bench`: a regression check within one lease
#   ab       the same workloads, engine only, once per value of an environment variable, taking
#            turns (AB_VAR, AB_VALUES; default ASERVE_PDL over "0 1 0 1"): a switch's effect in one lease.
#            AB_VAR=env: each value is itself a comma-separated list of VAR=value settings, e.g.
#            AB_VALUES="ASERVE_GEMV_BULK=0 ASERVE_GEMV_BULK=4,ASERVE_SMEM_CARVEOUT=100"
#   profile  bench/profile_step.py $PROFILE_ARGS, once per value of AB_VAR (kernel table, step wall time)
#   runprofile  bench/profile_run.py $RUN_PROFILE_ARGS (default workload B): a whole offline run's
#            steps by kind, and the kernels of a window of its steps by group
#   coldstart  bench/cold_start.sh: model B's first start on an empty cubin cache, then a second one,
#            taking turns with $PREVIOUS_DIR's when set (ROUNDS, default 2); DROP_CACHES=1 empties the
#            page cache before each (a fresh machine's first start), START_ENVS takes turns over settings
#   startprofile  bench/profile_start.py $START_PROFILE_ARGS (default model B, 2 starts), once per
#            value of AB_VAR when AB_VAR is set (e.g. ASERVE_GRAPH_WARMUP over "each needed"): each
#            start's time and capture, and a cProfile of the last start
# The issue's whole table in one call (~450 s on an H200; carry .whl):
#     STAGES="coldstart bench serverratio" ROUNDS=1 SERVER_ROUNDS=2 SERVER_RATIO_TIMEOUT=150 bash bench/device_run.sh
# Output goes to stdout and, when $OUT is set, to $OUT/device_run.log; the workloads' table is last.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
STAGES=${STAGES:-tests bench}
WORKLOADS=${WORKLOADS:-A,A1,B1,B}
# The CUDA tests (1,221 on the H200, seventeenth session) ran past 270 s: 1,071 done by then.
# test_cuda_engine.py runs every tiny family (35 since the twenty-second session, 18 before).
TESTS_TIMEOUT=${TESTS_TIMEOUT:-540}
SERVING_TIMEOUT=${SERVING_TIMEOUT:-300}
KERNELS_TIMEOUT=${KERNELS_TIMEOUT:-150}
BENCH_TIMEOUT=${BENCH_TIMEOUT:-540}
bench_log=/tmp/workloads.log
status_file=/tmp/device_run.status   # a file: run() may sit in a pipeline's subshell

run() {  # run NAME SECONDS CMD...: one step, bounded, its exit status reported
    local name=$1 limit=$2
    shift 2
    echo "=== $name (at most ${limit}s): $*"
    timeout --kill-after=10 "$limit" "$@"
    local rc=$?
    [ $rc -eq 124 ] && echo "=== $name: timed out after ${limit}s"
    echo "$name: rc=$rc$([ $rc -eq 5 ] && echo ' (pytest: no test selected)')" >> "$status_file"
    return $rc
}

stage_tests() {
    # The machine code's order of loads and waits as the card's own NVRTC compiles it (its
    # ptxas may differ from CI's); needs the nvdisasm wheel in .whl.
    run "instruction order" 180 python3 -m pytest -q -p no:cacheprovider tests/test_cuda_instruction_order.py
    # CUDA_TESTS narrows the run (pytest arguments), e.g. "tests/test_cuda_gemv.py -k fused".
    # shellcheck disable=SC2086
    run "cuda tests" "$TESTS_TIMEOUT" python3 -m pytest -q -x -p no:cacheprovider ${CUDA_TESTS:--m cuda tests/}
    # The engine against transformers (float32) on the card, and dummy loading on CUDA
    # (ENGINE_TESTS=0 leaves them out).
    [ "${ENGINE_TESTS:-1}" = 0 ] && return
    run "engine tests" "$TESTS_TIMEOUT" python3 -m pytest -q -x -p no:cacheprovider \
        tests/test_engine_greedy.py tests/test_engine_logprobs.py tests/test_engine_beam_search.py \
        tests/test_engine_sampling.py tests/test_sampler.py tests/test_load_format.py \
        tests/test_engine_prefix_caching.py
}

stage_kernels() {
    run "decode kernel" "$KERNELS_TIMEOUT" python3 bench/decode_attention.py ${KERNELS_ARGS:-}
    [ "${GEMV:-1}" = 0 ] || run "gemv" "$KERNELS_TIMEOUT" python3 bench/gemv.py ${GEMV_ARGS:-}
}

stage_serving() {
    if ! python3 -c "import pydantic, orjson" 2>/dev/null; then
        echo "=== serving: skipped, pydantic/orjson missing (carry .whl)"; return
    fi
    # The offline workloads' shapes and lengths (A: 128 in, 128 out; B: 512 in, 256 out),
    # random weights, random token-id prompts; SERVING_MODELS / SERVING_RATES choose.
    for model in ${SERVING_MODELS:-A B}; do
        local shape=opt-125m dtype=float16 input=128 output=128
        [ "$model" = B ] && shape=llama-3.1-8b dtype=bfloat16 input=512 output=256
        python3 bench/make_random_model.py --shape $shape --out /tmp/$shape --dtype $dtype --config-only
        python3 -m aserve --model /tmp/$shape --load-format dummy --port 8123 > /tmp/server.log 2>&1 &
        local server=$!
        for _ in $(seq 180); do
            curl -sf localhost:8123/health >/dev/null && break
            kill -0 $server 2>/dev/null || { echo "=== serving $model: the server exited"; tail -5 /tmp/server.log; break; }
            sleep 1
        done
        for rate in ${SERVING_RATES:-10 40 inf}; do
            # SERVING_NUM_PROMPTS bounds the runs at a finite rate (1000 at 10/s take 100 s).
            local num_prompts=1000
            [ "$rate" != inf ] && num_prompts=${SERVING_NUM_PROMPTS:-1000}
            run "serving $model rate=$rate" "$SERVING_TIMEOUT" python3 bench/serving.py \
                --base-url http://localhost:8123 --request-rate $rate --input-len $input \
                --num-prompts $num_prompts \
                --output-len $output --random-token-ids 30000 --ignore-eos 2>&1 | tail -24
        done
        kill $server
        wait $server 2>/dev/null
        grep -iE "error|exception" /tmp/server.log | head -5
    done
}

stage_structured() {
    run "structured outputs" "${STRUCTURED_TIMEOUT:-240}" python3 bench/structured.py ${STRUCTURED_ARGS:-}
}

stage_previous() {
    local dir=${PREVIOUS_DIR:-.previous}
    if [ ! -f "$dir/bench/workloads.py" ]; then echo "=== previous: no $dir/bench/workloads.py"; return; fi
    # shellcheck disable=SC2086
    run "previous workloads" "$BENCH_TIMEOUT" env PYTHONPATH="$PWD/$dir:${PYTHONPATH:-}" \
        python3 "$dir/bench/workloads.py" --workloads "$WORKLOADS" --time-limit $((BENCH_TIMEOUT - 15)) \
        ${PREVIOUS_ARGS:-} 2>&1 | tee /tmp/previous.log
}

settings() {  # settings VALUE: the environment assignments of one AB value (see AB_VAR=env)
    if [ "${AB_VAR:-ASERVE_PDL}" = env ]; then echo "${1//,/ }"; else echo "${AB_VAR:-ASERVE_PDL}=$1"; fi
}

stage_ab() {
    local value
    for value in ${AB_VALUES:-0 1 0 1}; do
        # shellcheck disable=SC2086,SC2046
        run "workloads $(settings "$value")" "${AB_TIMEOUT:-150}" env $(settings "$value") python3 bench/workloads.py \
            --workloads "$WORKLOADS" --time-limit $((${AB_TIMEOUT:-150} - 15)) ${AB_ARGS:-} 2>&1 \
            | sed -n '/^| workload |/,$p'
    done
}

stage_profile() {
    local value
    for value in $(echo ${AB_VALUES:-0 1} | tr ' ' '\n' | sort -u); do
        # shellcheck disable=SC2086,SC2046
        run "profile $(settings "$value")" "${PROFILE_TIMEOUT:-120}" env $(settings "$value") python3 bench/profile_step.py \
            ${PROFILE_ARGS:---batch 1 --context 128 --async-scheduling} 2>&1 | tail -${PROFILE_LINES:-30}
    done
}

stage_runprofile() {
    # shellcheck disable=SC2086
    run "run profile" "${RUN_PROFILE_TIMEOUT:-200}" python3 bench/profile_run.py ${RUN_PROFILE_ARGS:-} 2>&1 \
        | grep -v -E "^(USDT|\[W)"
}

stage_startprofile() {
    local value
    for value in ${AB_VAR:+${AB_VALUES:-0 1}}; do
        # shellcheck disable=SC2086
        run "start profile $AB_VAR=$value" "${START_PROFILE_TIMEOUT:-150}" env "$AB_VAR=$value" \
            python3 bench/profile_start.py ${START_PROFILE_ARGS:-} 2>&1 | grep -v -E "^(USDT|\[W)"
    done
    # shellcheck disable=SC2086
    [ -n "${AB_VAR:-}" ] || run "start profile" "${START_PROFILE_TIMEOUT:-150}" python3 bench/profile_start.py \
        ${START_PROFILE_ARGS:-} 2>&1 | grep -v -E "^(USDT|\[W)"
}

stage_bench() {
    # A machine fresh from its start runs the host-bound workloads slowly for its first minutes
    # (A1 0.96 ms in a lease's first run, 0.61 from its second on; bench/RESULTS.md, 2026-12-03):
    # WARMUP_RUNS untimed engine-only runs of A1 and A come first.
    local i
    for i in $(seq "${WARMUP_RUNS:-2}"); do
        run "warm-up $i" 90 python3 bench/workloads.py --workloads A1,A --time-limit 75 2>&1 | grep -E '^\| A'
    done
    # --time-limit leaves the script time to print its table if a model runs long.
    # shellcheck disable=SC2086
    run "workloads" "$BENCH_TIMEOUT" python3 bench/workloads.py ${BASELINE---baseline hf} --workloads "$WORKLOADS" \
        --time-limit $((BENCH_TIMEOUT - 15)) ${BENCH_ARGS:-} 2>&1 | tee "$bench_log"
}

stage_coldstart() {
    run "cold start" "${COLD_START_TIMEOUT:-420}" bash bench/cold_start.sh
}

stage_serverratio() {
    # The clients of every server measurement since the twenty-ninth session (four processes on
    # connections opened before the clock: one client process parsing a burst's chunks may be what
    # limits); CLIENT_PROCESSES and CLIENT_ARGS (empty for cold connections) override them.
    run "server vs offline" "${SERVER_RATIO_TIMEOUT:-240}" env RESTS="${RESTS:-default}" \
        CLIENT_PROCESSES="${CLIENT_PROCESSES:-4}" CLIENT_ARGS="${CLIENT_ARGS---warm-connections}" \
        bash bench/server_vs_offline.sh
}

main() {
    if ls .whl/*.whl >/dev/null 2>&1; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
    else
        echo "no .whl/ (scripts/fetch_device_wheels.sh fills it): the server and some tests need it"
        export PYTHONPATH=$PWD
    fi
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    python3 -c "import sys, torch, transformers; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__)"
    # coldstart first: a machine's first start is what it measures. The workloads' table is printed last.
    for stage in coldstart tests kernels structured serving profile runprofile startprofile ab previous bench serverratio; do
        case " $STAGES " in *" $stage "*) "stage_$stage" ;; esac
    done
    echo "=== steps:"
    cat "$status_file" 2>/dev/null
    if [ -s /tmp/previous.log ]; then echo "previous version:"; sed -n '/^| workload |/,$p' /tmp/previous.log; fi
    if [ -s "$bench_log" ]; then sed -n '/^| workload |/,$p' "$bench_log"; fi
}

rm -f "$bench_log" "$status_file" /tmp/previous.log
if [ -n "${OUT:-}" ]; then
    main 2>&1 | tee "$OUT/device_run.log"
else
    main 2>&1
fi
