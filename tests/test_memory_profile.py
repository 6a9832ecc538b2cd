"""The step that sizes the KV cache on a GPU (worker/memory_profile.profile_forward): the largest
step the scheduler can make, all of max_num_batched_tokens, even where max_model_len is shorter
(it profiled one prompt of min(max_num_batched_tokens, max_model_len) tokens before: a quarter
of a 16384-token step's activations at a 4096-token max_model_len)."""

from __future__ import annotations

import pytest
import torch

from aserve.config import EngineArgs
from aserve.models.loader import create_model_config, load_model
from aserve.worker.kv_cache import bytes_per_block
from aserve.worker.memory_profile import profile_forward, profile_step_lengths


@pytest.mark.parametrize("tokens, max_len, max_seqs, lengths", [
    (16384, 131072, 512, [16384]),            # one prompt can fill the step
    (16384, 4096, 512, [4096] * 4),           # four prompts fill it
    (16384, 2048, 512, [2048] * 8),
    (8192, 3000, 256, [3000, 3000, 2192]),
    (16384, 16, 512, [16] * 512),             # max_num_seqs bounds the step first
    (5, 16, 4, [5]),
])
def test_the_profiled_step_is_the_largest_the_scheduler_can_make(tokens, max_len, max_seqs, lengths):
    assert profile_step_lengths(tokens, max_len, max_seqs) == lengths


def test_the_profile_runs_every_token_of_a_step_of_several_prompts():
    """On the CPU (its budget is fixed there, but the step is the same): the model sees all the
    step's tokens, laid out as several prompts of at most max_model_len, and the logits rows."""
    from tiny_models import tiny_model_dir

    config = create_model_config(EngineArgs(model=tiny_model_dir("llama"), dtype="float32", max_model_len=64))
    model = load_model(config, "cpu")
    seen = {}

    def record(module, args, output):
        seen["tokens"], seen["seqs"] = args[0].shape[0], args[3].num_seqs
        seen["inference"] = torch.is_inference_mode_enabled()   # no autograd state in the peak

    handle = model.register_forward_hook(record)
    try:
        scratch = profile_forward(model, torch.device("cpu"), torch.float32, 150, 64, 8, 16)
    finally:
        handle.remove()
    assert seen == {"tokens": 150, "seqs": 3, "inference": True}
    # Its throwaway cache (which the caller takes off the measured peak): 4 + 4 + 2 blocks.
    assert scratch == 10 * bytes_per_block(model, 16, torch.float32)
