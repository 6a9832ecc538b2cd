#!/usr/bin/env bash
# One GPU session's check-and-benchmark, as run through the device tool (carry .whl for the
# server's pydantic/orjson, which the GPU image lacks):
#   1. correctness of the engine on CUDA (engine tests in float32 against transformers);
#   2. offline throughput against transformers' generate on random-weight models of real shapes;
#   3. the serving benchmark against `python -m aserve` on the opt-125m shape.
# Output goes to stdout and, when $OUT is set, to $OUT/gpu_run.log.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site
fi
log=${OUT:-/tmp}/gpu_run.log
{
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__)"
[ -n "${SKIP_TESTS:-}" ] || python3 -m pytest -q -x -p no:cacheprovider tests/test_engine_greedy.py tests/test_engine_logprobs.py \
    tests/test_engine_beam_search.py tests/test_engine_sampling.py tests/test_sampler.py 2>&1 | tail -25
for shape in ${SHAPES:-opt-125m qwen2-0.5b llama-1b}; do
    python3 bench/make_random_model.py --shape "$shape" --out "/tmp/$shape" --dtype float16
    python3 bench/throughput.py --model "/tmp/$shape" --num-prompts 256 --input-len 128 --output-len 128 \
        --baseline hf --hf-batch-size 256 --engine-overhead 2>&1 | grep '^{'
done
if python3 -c "import pydantic, orjson" 2>/dev/null; then
    python3 -m aserve --model /tmp/opt-125m --port 8123 > /tmp/server.log 2>&1 &
    server=$!
    for _ in $(seq 120); do curl -sf localhost:8123/health >/dev/null && break; sleep 1; done
    python3 bench/serving.py --base-url http://localhost:8123 --num-prompts 400 --request-rate 40 \
        --input-len 128 --output-len 128 --ignore-eos 2>&1 | tail -24
    python3 bench/serving.py --base-url http://localhost:8123 --num-prompts 400 --request-rate inf \
        --input-len 128 --output-len 128 --ignore-eos 2>&1 | tail -24
    kill $server
    grep -iE "error|exception" /tmp/server.log | head -5
fi
} 2>&1 | tee "$log"
