"""fill_graph_inputs (aserve/cuda/graph_inputs.py) against the torch copies it replaces in
DecodeGraphs.run, on fresh random inputs and buffers full of old values (GPU only), and its
setting (CPU)."""

from __future__ import annotations

import pytest
import torch

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")


def _buffers(batch: int, max_blocks: int, gen: torch.Generator):
    """A graph's static buffers, holding an earlier step's values (never zeros)."""
    def ints(*shape, dtype):
        return torch.randint(1, 1 << 20, shape, generator=gen, device="cuda", dtype=dtype)

    return (ints(batch, dtype=torch.int64), ints(batch, dtype=torch.int64), ints(batch, dtype=torch.int64),
            ints(batch, dtype=torch.int32), ints(batch, max_blocks, dtype=torch.int32))


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("n, batch, width, max_blocks", [
    (1, 1, 1, 512), (1, 1, 40, 512), (3, 4, 7, 16), (5, 8, 16, 16), (200, 256, 300, 512), (256, 256, 1, 4)])
def test_fill_graph_inputs_writes_what_the_torch_copies_write(n, batch, width, max_blocks):
    from aserve.cuda.graph_inputs import fill_graph_inputs

    gen = torch.Generator(device="cuda").manual_seed(n * 1009 + width)
    step64 = torch.randint(0, 1 << 40, (3 * n + 5,), generator=gen, device="cuda")
    step32 = torch.randint(0, 1 << 30, (2 * n + 1 + n * (width + 3),), generator=gen, device="cuda",
                           dtype=torch.int32)
    # As model_input lays them out: views of the step's two uploaded arrays, the block table's
    # rows strided (wider than the width used).
    ids, positions, slots = step64[:n], step64[n:2 * n], step64[2 * n:3 * n]
    seq_lens = step32[1:n + 1]
    tables = step32[2 * n + 1:].view(n, width + 3)[:, :width]
    expected = [b.clone() for b in _buffers(batch, max_blocks, torch.Generator(device="cuda").manual_seed(5))]
    got = _buffers(batch, max_blocks, torch.Generator(device="cuda").manual_seed(5))
    e_ids, e_positions, e_slots, e_seq_lens, e_tables = expected
    e_ids[:n].copy_(ids)
    e_positions[:n].copy_(positions)
    e_slots[:n].copy_(slots)
    e_seq_lens[:n].copy_(seq_lens)
    e_tables[:n, :width].copy_(tables)
    e_slots[n:batch].fill_(-1)
    e_seq_lens[n:batch].zero_()
    fill_graph_inputs(got, batch, ids, positions, slots, seq_lens, tables)
    for name, g, e in zip(("input_ids", "positions", "slot_mapping", "seq_lens", "block_tables"), got, expected):
        assert torch.equal(g, e), name


@cuda
@pytest.mark.cuda
def test_decode_graphs_fed_by_the_kernel_give_the_same_tokens(llm_cache, monkeypatch):
    """The engine's graphed decode steps, their inputs written by fill_graph_inputs, against
    the same engine eager (as tests/test_cuda_engine.py holds graphs to transformers)."""
    from aserve import SamplingParams
    from hf_reference import random_prompts

    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    prompts = random_prompts(47, [3, 17, 40, 9, 1, 26])
    monkeypatch.setenv("ASERVE_GRAPH_INPUTS_KERNEL", "1")
    with_graphs = llm_cache("llama")
    graphs = with_graphs.engine.runner.decode_graphs
    replays = graphs.num_replays
    got = [o.outputs[0].token_ids for o in with_graphs.generate(prompts, params, use_tqdm=False)]
    assert graphs.num_replays > replays
    eager = llm_cache("llama", enforce_eager=True)
    assert got == [o.outputs[0].token_ids for o in eager.generate(prompts, params, use_tqdm=False)]


@pytest.mark.parametrize("value, enabled", [(None, False), ("0", False)])
def test_graph_inputs_kernel_is_off_by_default(monkeypatch, value, enabled):
    from aserve.cuda.graph_inputs import graph_inputs_kernel_enabled

    if value is None:
        monkeypatch.delenv("ASERVE_GRAPH_INPUTS_KERNEL", raising=False)
    else:
        monkeypatch.setenv("ASERVE_GRAPH_INPUTS_KERNEL", value)
    assert graph_inputs_kernel_enabled() is enabled


def test_graph_inputs_kernel_setting_is_checked(monkeypatch):
    from aserve.cuda.graph_inputs import graph_inputs_kernel_enabled

    monkeypatch.setenv("ASERVE_GRAPH_INPUTS_KERNEL", "on")
    with pytest.raises(ValueError, match="ASERVE_GRAPH_INPUTS_KERNEL"):
        graph_inputs_kernel_enabled()
