#!/usr/bin/env bash
# One GPU session's check-and-benchmark, as run through the device tool:
#   correctness of the engine on CUDA (engine tests in float32 against transformers), then
#   offline throughput against transformers' generate on random-weight models of real shapes.
# Output goes to stdout and, when $OUT is set, to $OUT/gpu_run.log.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
log=${OUT:-/tmp}/gpu_run.log
{
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__)"
python3 -m pytest -q -x -p no:cacheprovider tests/test_engine_greedy.py tests/test_engine_logprobs.py \
    tests/test_engine_beam_search.py tests/test_engine_sampling.py tests/test_sampler.py 2>&1 | tail -25
for shape in opt-125m qwen2-0.5b; do
    python3 bench/make_random_model.py --shape "$shape" --out "/tmp/$shape" --dtype float16
    python3 bench/throughput.py --model "/tmp/$shape" --num-prompts 256 --input-len 128 --output-len 128 \
        --baseline hf --hf-batch-size 256 --engine-overhead 2>&1 | grep '^{'
done
} 2>&1 | tee "$log"
