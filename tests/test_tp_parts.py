"""The parts of tensor parallelism on their own: the shared-memory ring, the packed step
message, the group at world size 1, sharded layers and the split check (no worker processes,
except the ring's reader)."""

from __future__ import annotations

import multiprocessing
import os

import numpy as np
import pytest
import torch

from aserve.config import EngineArgs
from aserve.distributed import SINGLE_RANK, TensorParallelGroup, building_with
from aserve.executor.shm_ring import RingClosed, ShmRing
from aserve.models.layers import (MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear,
                                  VocabParallelEmbedding)
from aserve.models.layers.embedding import ParallelLMHead
from aserve.models.loader import check_tensor_parallel_split, create_model_config, load_model
from aserve.worker.step_arrays import SHUTDOWN, STEP_LAUNCH, StepArrays, control_message
from tiny_models import make_tiny_model, tiny_model_dir


# ---------------------------------------------------------------------------- the ring
def _echo_sums(spec, reader, count, queue):
    ring = ShmRing.attach(*spec, reader=reader)
    queue.put([(len(m), int(m.astype(np.int64).sum()), bytes(m[:3])) for m in
               (ring.read() for _ in range(count))])
    ring.close()


def test_ring_delivers_every_message_whole_to_every_reader_across_chunks_and_wraps():
    # Slots of 1000 bytes, 3 of them: messages up to 5 kB span several chunks and the ring
    # wraps hundreds of times while two readers keep up at their own pace.
    ring = ShmRing.create(num_readers=2, num_slots=3, slot_bytes=1000)
    rng = np.random.default_rng(7)
    messages = [rng.integers(0, 256, size=int(n), dtype=np.uint8) for n in rng.integers(1, 5000, 150)]
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    readers = [context.Process(target=_echo_sums, args=(ring.spec, r, len(messages), queue))
               for r in range(2)]
    for p in readers:
        p.start()
    try:
        for m in messages:
            ring.write([m[:5], m[5:]])   # a message may come in several parts
        expected = [(len(m), int(m.astype(np.int64).sum()), bytes(m[:3])) for m in messages]
        assert queue.get(timeout=60) == expected
        assert queue.get(timeout=60) == expected
    finally:
        for p in readers:
            p.join(30)
        ring.close()
    assert not os.path.exists(ring.path)


def test_ring_writer_stops_waiting_when_its_check_raises():
    ring = ShmRing.create(num_readers=1, num_slots=2, slot_bytes=64)
    try:
        ring.write([np.zeros(64, np.uint8)])
        ring.write([np.zeros(64, np.uint8)])   # full now: no reader ever reads

        def dead_reader():
            raise RingClosed("the reader died")

        with pytest.raises(RingClosed):
            ring.write([np.zeros(8, np.uint8)], check=dead_reader)
    finally:
        ring.close()


def test_ring_name_can_go_while_mapped():
    ring = ShmRing.create(num_readers=1, num_slots=2, slot_bytes=64)
    reader = ShmRing.attach(*ring.spec, reader=0)
    ring.remove_name()
    ring.write([np.arange(10, dtype=np.uint8)])
    assert reader.read().tolist() == list(range(10))
    reader.close()
    ring.close()


# ---------------------------------------------------------------------------- the step message
def _arrays(num_copies: int = 1) -> StepArrays:
    return StepArrays.build(
        input_ids=np.array([5, 6, 7]), positions=np.array([0, 1, 9]), slots=np.array([32, 33, 57]),
        logits_indices=np.array([1, 2]), fill_index=np.array([2]), fill_rows=np.array([0]),
        block_copies=np.array([[3, 4]] * num_copies).reshape(-1, 2),
        query_start=np.array([0, 2, 3], dtype=np.int32), seq_lens=np.array([2, 10], dtype=np.int32),
        block_tables=np.array([[2, 0], [1, 3]], dtype=np.int32), max_query_len=2, max_seq_len=10)


@pytest.mark.parametrize("num_copies", [0, 2])
def test_step_arrays_pack_and_unpack_to_the_same_inputs(num_copies):
    arrays = _arrays(num_copies)
    message = np.concatenate([np.frombuffer(p, np.uint8) for p in arrays.pack(STEP_LAUNCH)])
    kind, back = StepArrays.unpack(message)
    assert kind == STEP_LAUNCH
    input_ids, positions, slots, logits, fill_index, fill_rows = back.int64_views(back.int64)
    assert (input_ids.tolist(), positions.tolist(), slots.tolist()) == ([5, 6, 7], [0, 1, 9], [32, 33, 57])
    assert (logits.tolist(), fill_index.tolist(), fill_rows.tolist()) == ([1, 2], [2], [0])
    query_start, seq_lens, tables = back.int32_views(back.int32)
    assert (query_start.tolist(), seq_lens.tolist(), tables.tolist()) == ([0, 2, 3], [2, 10], [[2, 0], [1, 3]])
    assert back.block_copies() == [(3, 4)] * num_copies
    assert (back.max_query_len, back.max_seq_len, back.table_width) == (2, 10, 2)


def test_a_control_message_carries_no_step():
    message = np.concatenate([np.frombuffer(p, np.uint8) for p in control_message(SHUTDOWN)])
    assert StepArrays.unpack(message) == (SHUTDOWN, None)


# ---------------------------------------------------------------------------- the group
def test_one_rank_collectives_are_the_identity():
    x = torch.randn(3, 4)
    assert SINGLE_RANK.all_reduce(x) is x and SINGLE_RANK.all_gather(x) is x
    assert SINGLE_RANK.min_over_ranks(7) == 7 and SINGLE_RANK.all_ranks_agree(True)
    assert SINGLE_RANK.collectives_capturable


# ---------------------------------------------------------------------------- sharded layers
def _shards(make, world_size: int):
    shards = []
    for rank in range(world_size):
        with building_with(TensorParallelGroup.layout_only(rank, world_size)):
            shards.append(make())
    return shards


def test_qkv_shards_hold_each_ranks_heads_and_replicate_scarce_kv_heads():
    head, hidden = 4, 8
    q = torch.randn(4 * head, hidden)
    k = torch.randn(1 * head, hidden)   # one KV head (MQA): every rank keeps a copy
    v = torch.randn(1 * head, hidden)
    shards = _shards(lambda: QKVParallelLinear(hidden, head, 4, 1, bias=False), 2)
    for rank, layer in enumerate(shards):
        for sid, full in (("q", q), ("k", k), ("v", v)):
            layer.weight_loader(layer.weight, full, sid)
        q_part, k_part, v_part = layer.weight.split([2 * head, head, head])
        assert torch.equal(q_part, q[rank * 2 * head:(rank + 1) * 2 * head])
        assert torch.equal(k_part, k) and torch.equal(v_part, v)


def test_merged_shards_split_each_projection_on_its_own():
    gate, up = torch.randn(6, 4), torch.randn(6, 4)
    shards = _shards(lambda: MergedColumnParallelLinear(4, [6, 6], bias=False), 2)
    for rank, layer in enumerate(shards):
        layer.weight_loader(layer.weight, gate, 0)
        layer.weight_loader(layer.weight, up, 1)
        assert torch.equal(layer.weight, torch.cat([gate[3 * rank:3 * rank + 3], up[3 * rank:3 * rank + 3]]))


def test_row_parallel_bias_is_replicated_and_weights_split_by_columns():
    weight, bias = torch.randn(3, 8), torch.randn(3)
    shards = _shards(lambda: RowParallelLinear(8, 3, bias=True), 2)
    for rank, layer in enumerate(shards):
        layer.weight.weight_loader(layer.weight, weight)
        layer.bias.weight_loader(layer.bias, bias)
        assert torch.equal(layer.weight, weight[:, 4 * rank:4 * rank + 4]) and torch.equal(layer.bias, bias)
    # The partial products sum to the full layer; the bias is added once after the reduce.
    x = torch.randn(2, 8)
    partial = sum(torch.nn.functional.linear(x[:, 4 * r:4 * r + 4], s.weight) for r, s in enumerate(shards))
    assert torch.allclose(partial + bias, torch.nn.functional.linear(x, weight, bias), atol=1e-6)


def test_an_odd_vocabulary_is_padded_with_zero_rows_that_no_token_reaches():
    full = torch.randn(5, 3)
    shards = _shards(lambda: VocabParallelEmbedding(5, 3), 2)
    assert [s.weight.shape[0] for s in shards] == [3, 3]
    for s in shards:
        s.weight_loader(s.weight, full)
    assert torch.equal(torch.cat([s.weight for s in shards])[:5], full)
    assert torch.count_nonzero(shards[1].weight[2]) == 0
    heads = _shards(lambda: ParallelLMHead(5, 3), 2)
    assert heads[1].vocab_start == 3 and heads[1].num_embeddings == 5


def test_shards_of_a_real_model_concatenate_to_its_weights(tmp_path):
    path = make_tiny_model("llama", tmp_path / "m")
    config = create_model_config(EngineArgs(model=path, dtype="float32"))
    whole = load_model(config, "cpu")
    parts = [load_model(config, "cpu", TensorParallelGroup.layout_only(r, 2)) for r in range(2)]
    down = [p.model.layers[0].mlp.down_proj.weight for p in parts]
    assert torch.equal(torch.cat(down, dim=1), whole.model.layers[0].mlp.down_proj.weight)
    embed = [p.model.embed_tokens.weight for p in parts]
    assert torch.equal(torch.cat(embed), whole.model.embed_tokens.weight)


# ---------------------------------------------------------------------------- the split check
def test_a_model_that_cannot_be_split_is_refused_by_name_before_loading():
    config = create_model_config(EngineArgs(model=tiny_model_dir("llama")))   # 4 heads
    with pytest.raises(ValueError, match=r"attention heads \(4\) is not divisible by tensor_parallel_size 3"):
        check_tensor_parallel_split(config, 3)
    check_tensor_parallel_split(config, 4)   # 2 KV heads over 4 ranks: replicated, allowed


def test_engine_args_check_the_node_layout():
    with pytest.raises(ValueError, match="nnodes"):
        EngineArgs(tensor_parallel_size=3, nnodes=2)
    with pytest.raises(ValueError, match="master_addr"):
        EngineArgs(tensor_parallel_size=2, nnodes=2, node_rank=1)
    with pytest.raises(ValueError, match="node_rank"):
        EngineArgs(tensor_parallel_size=2, nnodes=2, node_rank=2, master_addr="h", master_port=1)
    parallel = EngineArgs(tensor_parallel_size=4, nnodes=2, node_rank=1, master_addr="h",
                          master_port=29500).parallel_config()
    assert list(parallel.node_ranks()) == [2, 3] and parallel.local_rank(3) == 1
