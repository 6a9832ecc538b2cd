"""The CUDA kernels against their torch references on fresh random inputs (GPU only).

Error bounds fit the dtype: the reference runs in float64 on the same (rounded) inputs, so
what is left is the kernel's float32 arithmetic and the rounding of its output.
"""

from __future__ import annotations

import math

import pytest
import torch

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")]

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Relative error bounds (norm of the error over norm of the reference).
TOLERANCE = {torch.float32: 1e-5, torch.float16: 1.5e-3, torch.bfloat16: 1e-2}
# (query heads, KV heads): multi-head, grouped (4 and 7 per KV head), multi-query.
HEADS = [(4, 4), (8, 2), (14, 2), (16, 1)]
# Context lengths: a single token, shorter than a block, block multiples and off by one around
# them, several decode partitions (the longer ones are split over CTAs and combined).
LENGTHS = [1, 7, 16, 17, 33, 511, 512, 513, 1500]


@pytest.fixture(params=["simt", "simt/cluster=1", "simt/cluster=4", "simt/cluster=16", "mma"])
def decode_kernel(request, monkeypatch):
    """Each decode test runs the CUDA-core kernel and the tensor-core kernel (where it applies).
    The CUDA-core kernel also runs with no thread block clusters, and with clusters of 4 and 16
    CTAs at every launch size whose contexts one cluster covers (Hopper and newer; by default
    only small launches use them)."""
    from aserve.cuda import ops

    kernel, _, cluster = request.param.partition("/cluster=")
    monkeypatch.setattr(ops, "DECODE_KERNEL", kernel)
    if cluster:
        if cluster != "1" and torch.cuda.get_device_capability() < (9, 0):
            pytest.skip("thread block clusters need compute capability 9.0")
        monkeypatch.setattr(ops, "DECODE_CLUSTER", cluster)
        monkeypatch.setattr(ops, "CLUSTER_MAX_GROUPS", 1 << 30)
    return kernel


def _skip_unless_kernel_applies(kernel, dtype, head_dim, num_heads, num_kv_heads):
    from aserve.cuda import ops

    group = ops.decode_group_size(num_heads, num_kv_heads)
    if kernel == "mma" and ops.decode_kernel_source(dtype, head_dim, group, 1, 0) != "paged_attention_mma.cu":
        pytest.skip("the tensor-core decode kernel does not cover this shape")


def _relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref).norm() / ref.norm()).item()


def _random_cache(num_blocks, block_size, num_kv_heads, head_dim, dtype, gen):
    shape = (2, num_blocks, block_size, num_kv_heads, head_dim)
    return torch.randn(shape, generator=gen, device="cuda").to(dtype)


def _random_tables(lengths, block_size, num_blocks, gen):
    """Each sequence gets distinct random blocks, so wrong block arithmetic shows."""
    need = [math.ceil(n / block_size) for n in lengths]
    perm = torch.randperm(num_blocks, generator=gen, device="cuda")
    tables = torch.zeros(len(lengths), max(need), dtype=torch.int32, device="cuda")
    used = 0
    for i, n in enumerate(need):
        tables[i, :n] = perm[used:used + n].int()
        used += n
    return tables


def _decode_reference(query, kv_cache, tables, lengths, scale, sliding_window=None):
    """float64 attention of one query per sequence over its context read through its table."""
    out = torch.empty(query.shape, dtype=torch.float64, device=query.device)
    block_size, num_kv_heads = kv_cache.shape[2], kv_cache.shape[3]
    group = query.shape[1] // num_kv_heads
    for i, n in enumerate(lengths):
        positions = torch.arange(n, device=query.device)
        blocks = tables[i, positions // block_size].long()
        keys = kv_cache[0][blocks, positions % block_size].double()      # [n, KVH, D]
        values = kv_cache[1][blocks, positions % block_size].double()
        if sliding_window is not None:
            keys, values = keys[max(0, n - sliding_window):], values[max(0, n - sliding_window):]
        keys = keys.repeat_interleave(group, dim=1)
        values = values.repeat_interleave(group, dim=1)
        scores = torch.einsum("hd,nhd->hn", query[i].double(), keys) * scale
        out[i] = torch.einsum("hn,nhd->hd", scores.softmax(dim=-1), values)
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 80, 96, 128, 256])
@pytest.mark.parametrize("heads", HEADS)
@pytest.mark.parametrize("block_size", [16, 32])
def test_paged_decode_matches_reference(dtype, head_dim, heads, block_size, decode_kernel):
    from aserve.cuda import ops

    gen = torch.Generator(device="cuda").manual_seed(hash((str(dtype), head_dim, heads, block_size)) % 2**31)
    num_heads, num_kv_heads = heads
    _skip_unless_kernel_applies(decode_kernel, dtype, head_dim, num_heads, num_kv_heads)
    lengths = LENGTHS
    num_blocks = sum(math.ceil(n / block_size) for n in lengths) + 7
    kv_cache = _random_cache(num_blocks, block_size, num_kv_heads, head_dim, dtype, gen)
    tables = _random_tables(lengths, block_size, num_blocks, gen)
    # Queries as a strided view into a wider tensor, as the model's fused qkv gives them.
    fused = torch.randn(len(lengths), (num_heads + 2 * num_kv_heads) * head_dim, generator=gen,
                        device="cuda").to(dtype)
    query = fused[:, :num_heads * head_dim].view(len(lengths), num_heads, head_dim)
    out = torch.full(query.shape, float("nan"), dtype=dtype, device="cuda")
    scale = head_dim ** -0.5
    ops.paged_decode_attention(out, query, kv_cache[0], kv_cache[1], tables,
                               torch.tensor(lengths, dtype=torch.int32, device="cuda"), scale, max(lengths))
    torch.cuda.synchronize()
    assert torch.isfinite(out).all(), "some outputs were never written"
    ref = _decode_reference(query, kv_cache, tables, lengths, scale)
    for i in range(len(lengths)):   # every sequence on its own: a short one cannot hide in the norm
        assert _relative_error(out[i], ref[i]) < TOLERANCE[dtype], (lengths[i], _relative_error(out[i], ref[i]))


@pytest.mark.parametrize("kernel,tuning", [
    ("simt", {"NUM_THREADS": 256}), ("simt", {"UNROLL": 2}), ("simt", {"UNROLL": 1, "MAX_STAGES": 2}),
    ("simt", {"MIN_BLOCKS": 4}), ("simt", {"SMEM_BUDGET": 40960}),
    ("mma", {"NUM_WARPS": 2, "STAGES": 3}), ("mma", {"NUM_WARPS": 4, "STAGES": 3}),
    ("mma", {"NUM_WARPS": 8, "STAGES": 2}), ("mma", {"NUM_WARPS": 3, "STAGES": 2})])
def test_paged_decode_tuning_builds_match_reference(kernel, tuning, monkeypatch):
    """The builds bench/decode_attention.py --variants compares compute the same attention."""
    from aserve.cuda import ops

    monkeypatch.setattr(ops, "DECODE_KERNEL", kernel)
    monkeypatch.setattr(ops, "DECODE_TUNING", dict(tuning))
    gen = torch.Generator(device="cuda").manual_seed(5)
    dtype, block_size, num_heads, num_kv_heads, head_dim = torch.bfloat16, 16, 32, 8, 128
    lengths = [1, 17, 300, 2048, 1111]
    num_blocks = sum(math.ceil(n / block_size) for n in lengths) + 5
    kv_cache = _random_cache(num_blocks, block_size, num_kv_heads, head_dim, dtype, gen)
    tables = _random_tables(lengths, block_size, num_blocks, gen)
    query = torch.randn(len(lengths), num_heads, head_dim, generator=gen, device="cuda").to(dtype)
    out = torch.full_like(query, float("nan"))
    ops.paged_decode_attention(out, query, kv_cache[0], kv_cache[1], tables,
                               torch.tensor(lengths, dtype=torch.int32, device="cuda"), 0.09, 2048)
    ref = _decode_reference(query, kv_cache, tables, lengths, 0.09)
    for i in range(len(lengths)):
        assert _relative_error(out[i], ref[i]) < TOLERANCE[dtype], (tuning, lengths[i])


def test_paged_decode_split_counters_are_left_zero(decode_kernel):
    """The last split of each sequence resets its counter, so back-to-back launches of other
    shapes (and graph replays) start from zero."""
    from aserve.cuda import ops

    gen = torch.Generator(device="cuda").manual_seed(9)
    dtype, block_size, num_heads, num_kv_heads, head_dim = torch.float16, 16, 8, 2, 64
    for lengths in ([4000, 3, 900], [129, 2500], [4096] * 6):
        num_blocks = sum(math.ceil(n / block_size) for n in lengths) + 1
        kv_cache = _random_cache(num_blocks, block_size, num_kv_heads, head_dim, dtype, gen)
        tables = _random_tables(lengths, block_size, num_blocks, gen)
        query = torch.randn(len(lengths), num_heads, head_dim, generator=gen, device="cuda").to(dtype)
        out = torch.empty_like(query)
        ops.paged_decode_attention(out, query, kv_cache[0], kv_cache[1], tables,
                                   torch.tensor(lengths, dtype=torch.int32, device="cuda"), 0.125, 4096)
        ref = _decode_reference(query, kv_cache, tables, lengths, 0.125)
        assert _relative_error(out, ref) < TOLERANCE[dtype], lengths
        assert int(ops._split_counters[0].count_nonzero()) == 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_paged_decode_long_context_single_sequence(dtype, decode_kernel):
    from aserve.cuda import ops

    gen = torch.Generator(device="cuda").manual_seed(7)
    lengths, block_size, num_heads, num_kv_heads, head_dim = [8191], 16, 32, 8, 128
    num_blocks = math.ceil(lengths[0] / block_size) + 3
    kv_cache = _random_cache(num_blocks, block_size, num_kv_heads, head_dim, dtype, gen)
    tables = _random_tables(lengths, block_size, num_blocks, gen)
    query = torch.randn(1, num_heads, head_dim, generator=gen, device="cuda").to(dtype)
    out = torch.empty_like(query)
    ops.paged_decode_attention(out, query, kv_cache[0], kv_cache[1], tables,
                               torch.tensor(lengths, dtype=torch.int32, device="cuda"), 0.088, 8192)
    ref = _decode_reference(query, kv_cache, tables, lengths, 0.088)
    assert _relative_error(out, ref) < TOLERANCE[dtype]


@pytest.mark.parametrize("sliding_window", [None, 1000])
def test_paged_decode_big_batch_runs_each_long_context_in_one_cta(sliding_window, decode_kernel):
    """A batch that fills the card gets one split per sequence (grid.z 1) even in a launch
    sized for 8k tokens, so one CTA walks a context of thousands of tokens; mixed with short
    contexts and padding rows, as a CUDA graph's batch is."""
    from aserve.cuda import ops

    gen = torch.Generator(device="cuda").manual_seed(13)
    dtype, block_size, num_heads, num_kv_heads, head_dim = torch.bfloat16, 16, 32, 8, 128
    lengths = torch.randint(1, 700, (200,), generator=torch.Generator().manual_seed(1)).tolist()
    lengths[:4] = [8192, 5000, 1025, 4097]
    unit, splits = ops.decode_partition(len(lengths), num_heads // ops.decode_group_size(num_heads, num_kv_heads),
                                        8192, block_size, ops.num_sms(0))
    assert splits == 1 or ops.num_sms(0) > 132   # the case under test, on cards up to an H100/H200
    num_blocks = sum(math.ceil(n / block_size) for n in lengths) + 3
    kv_cache = _random_cache(num_blocks, block_size, num_kv_heads, head_dim, dtype, gen)
    tables = _random_tables(lengths + [1], block_size, num_blocks, gen)
    query = torch.randn(len(lengths) + 1, num_heads, head_dim, generator=gen, device="cuda").to(dtype)
    out = torch.full_like(query, 7.0)
    seq_lens = torch.tensor(lengths + [0], dtype=torch.int32, device="cuda")
    ops.paged_decode_attention(out, query, kv_cache[0], kv_cache[1], tables, seq_lens, 0.088, 8192,
                               sliding_window=sliding_window)
    ref = _decode_reference(query[:-1], kv_cache, tables, lengths, 0.088, sliding_window=sliding_window)
    for i in range(len(lengths)):
        assert _relative_error(out[i], ref[i]) < TOLERANCE[dtype], lengths[i]
    assert (out[-1] == 7.0).all()


def test_paged_decode_sliding_window_and_padding_rows(decode_kernel):
    from aserve.cuda import ops

    gen = torch.Generator(device="cuda").manual_seed(11)
    dtype, block_size, num_heads, num_kv_heads, head_dim, window = torch.float16, 16, 8, 2, 64, 600
    lengths = [5, 599, 600, 601, 1700]
    num_blocks = sum(math.ceil(n / block_size) for n in lengths) + 2
    kv_cache = _random_cache(num_blocks, block_size, num_kv_heads, head_dim, dtype, gen)
    tables = _random_tables(lengths + [1], block_size, num_blocks, gen)
    query = torch.randn(len(lengths) + 1, num_heads, head_dim, generator=gen, device="cuda").to(dtype)
    out = torch.full_like(query, 123.0)
    seq_lens = torch.tensor(lengths + [0], dtype=torch.int32, device="cuda")   # last row: padding
    ops.paged_decode_attention(out, query, kv_cache[0], kv_cache[1], tables, seq_lens, 0.125, 4096,
                               sliding_window=window)
    ref = _decode_reference(query[:-1], kv_cache, tables, lengths, 0.125, sliding_window=window)
    for i in range(len(lengths)):
        assert _relative_error(out[i], ref[i]) < TOLERANCE[dtype], lengths[i]
    assert (out[-1] == 123.0).all(), "a padding row (seq_len 0) must not be written"


def test_paged_decode_replays_in_a_cuda_graph_with_new_inputs(decode_kernel):
    from aserve.cuda import ops

    gen = torch.Generator(device="cuda").manual_seed(3)
    dtype, block_size, num_heads, num_kv_heads, head_dim = torch.bfloat16, 16, 8, 2, 128
    num_blocks, batch, max_len = 400, 4, 2048
    kv_cache = _random_cache(num_blocks, block_size, num_kv_heads, head_dim, dtype, gen)
    query = torch.empty(batch, num_heads, head_dim, dtype=dtype, device="cuda")
    tables = torch.zeros(batch, max_len // block_size, dtype=torch.int32, device="cuda")
    seq_lens = torch.ones(batch, dtype=torch.int32, device="cuda")
    out = torch.empty_like(query)
    ops.paged_decode_attention(out, query, kv_cache[0], kv_cache[1], tables, seq_lens, 0.1, max_len)  # warm-up
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ops.paged_decode_attention(out, query, kv_cache[0], kv_cache[1], tables, seq_lens, 0.1, max_len)
    for lengths in ([3, 700, 1, 2048], [1500, 16, 17, 513]):
        query.copy_(torch.randn(query.shape, generator=gen, device="cuda"))
        fresh = _random_tables(lengths, block_size, num_blocks, gen)
        tables.zero_()
        tables[:, :fresh.shape[1]] = fresh
        seq_lens.copy_(torch.tensor(lengths, dtype=torch.int32))
        graph.replay()
        ref = _decode_reference(query, kv_cache, tables, lengths, 0.1)
        assert _relative_error(out, ref) < TOLERANCE[dtype]


def _clustered_decode_kernel(dtype, head_dim, block_size, group):
    from aserve.cuda import ops

    options = ops.paged_attention_options(dtype, head_dim, block_size, group, cluster_combine=True)
    return ops.load_module("paged_attention.cu", options, 0).kernel("paged_decode")


def test_hopper_holds_clusters_of_the_decode_kernel():
    """The driver's answer that sizes the launcher's clusters: at least the portable 8 CTAs of
    the clustered build on sm_90 and newer (16 on an H100 or H200)."""
    from aserve.cuda import ops

    if torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("thread block clusters need compute capability 9.0")
    big_hopper = any(name in torch.cuda.get_device_name() for name in ("H100 80GB HBM3", "H200"))
    for group in (1, 4, 8):
        limit = _clustered_decode_kernel(torch.bfloat16, 128, 16, group).max_cluster_size((ops._NUM_THREADS, 1, 1), 0)
        assert limit == 16 if big_hopper else 8 <= limit <= 32, (group, limit)


@pytest.mark.parametrize("cluster", ["16", "8", "4", "3"])
def test_paged_decode_lone_sequence_in_a_graph_in_clusters(cluster, monkeypatch):
    """A lone sequence, as B1 runs it: one CUDA graph captured for the longest context a cluster
    covers, replayed at lengths that give one split, a cluster with idle members, a full cluster
    and partitions grown to fit one cluster, up to that longest context."""
    from aserve.cuda import ops

    if torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("thread block clusters need compute capability 9.0")
    monkeypatch.setattr(ops, "DECODE_CLUSTER", cluster)
    gen = torch.Generator(device="cuda").manual_seed(int(cluster))
    dtype, block_size, num_heads, num_kv_heads, head_dim = torch.bfloat16, 16, 32, 8, 128
    limit = _clustered_decode_kernel(dtype, head_dim, block_size, 4).max_cluster_size((ops._NUM_THREADS, 1, 1), 0)
    if limit < int(cluster):
        pytest.skip(f"this GPU holds clusters of at most {limit} of these CTAs")
    max_len = int(cluster) * ops.CLUSTER_MAX_PARTITION
    assert ops.decode_cluster(8, 64, max_len, 0, limit)[0] == int(cluster)
    num_blocks = max_len // block_size + 3
    kv_cache = _random_cache(num_blocks, block_size, num_kv_heads, head_dim, dtype, gen)
    query = torch.empty(1, num_heads, head_dim, dtype=dtype, device="cuda")
    tables = torch.zeros(1, max_len // block_size, dtype=torch.int32, device="cuda")
    seq_lens = torch.ones(1, dtype=torch.int32, device="cuda")
    out = torch.empty_like(query)
    ops.paged_decode_attention(out, query, kv_cache[0], kv_cache[1], tables, seq_lens, 0.1, max_len)  # warm-up
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ops.paged_decode_attention(out, query, kv_cache[0], kv_cache[1], tables, seq_lens, 0.1, max_len)
    lengths = [n for n in (1, 32, 33, 100, 384, 512, 640, 1024, 1025, 2049, 4096, 5000) if n < max_len] + [max_len]
    for length in lengths:
        query.copy_(torch.randn(query.shape, generator=gen, device="cuda"))
        fresh = _random_tables([length], block_size, num_blocks, gen)
        tables.zero_()
        tables[:, :fresh.shape[1]] = fresh
        seq_lens.fill_(length)
        out.fill_(float("nan"))
        graph.replay()
        ref = _decode_reference(query, kv_cache, tables, [length], 0.1)
        assert _relative_error(out, ref) < TOLERANCE[dtype], (cluster, length)


@pytest.mark.parametrize("dtype", DTYPES)
def test_reshape_and_cache_matches_reference(dtype):
    from aserve.attention.torch_ref import write_kv_cache
    from aserve.cuda import ops

    gen = torch.Generator(device="cuda").manual_seed(5)
    num_tokens, num_heads, num_kv_heads, head_dim, num_blocks, block_size = 37, 8, 2, 80, 20, 16
    fused = torch.randn(num_tokens, (num_heads + 2 * num_kv_heads) * head_dim, generator=gen,
                        device="cuda").to(dtype)
    q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
    key = fused[:, q_size:q_size + kv_size].view(num_tokens, num_kv_heads, head_dim)
    value = fused[:, q_size + kv_size:].view(num_tokens, num_kv_heads, head_dim)
    slots = torch.randperm(num_blocks * block_size, generator=gen, device="cuda")[:num_tokens]
    initial = _random_cache(num_blocks, block_size, num_kv_heads, head_dim, dtype, gen)
    expected = initial.clone()
    write_kv_cache(key, value, expected, slots)
    got = initial.clone()
    padded_slots = slots.clone()
    padded_slots[::5] = -1                      # padding tokens write nothing
    ops.reshape_and_cache(key, value, got[0], got[1], padded_slots)
    expected_padded = initial.clone()
    keep = padded_slots >= 0
    write_kv_cache(key[keep], value[keep], expected_padded, slots[keep])
    assert torch.equal(got, expected_padded)


def test_copy_blocks_matches_reference():
    from aserve.cuda import ops
    from aserve.worker.kv_cache import copy_blocks_reference

    gen = torch.Generator(device="cuda").manual_seed(9)
    caches = [_random_cache(30, 16, 2, 64, torch.bfloat16, gen) for _ in range(3)]
    expected = [c.clone() for c in caches]
    pairs = [(3, 7), (12, 0), (29, 28)]
    copy_blocks_reference(expected, pairs)
    ops.copy_blocks(caches, torch.tensor(pairs, dtype=torch.int64, device="cuda"))
    for got, want in zip(caches, expected):
        assert torch.equal(got, want)


# (query lengths, context lengths) per sequence: the 25-token chunk follows 35 cached tokens.
MIXED_LAYOUTS = {
    "interleaved": ([1, 40, 1, 25, 1], [30, 40, 100, 60, 1]),   # gathered and scattered by index
    "decode_first": ([1, 1, 1, 40, 25], [30, 100, 1, 40, 60]),  # the scheduler's order: views
    "fresh_prompts": ([40, 7, 33], [40, 7, 33]),                # flash attention's output is all
    "prompts": ([40, 25], [40, 60]),                            # the same, one with context
}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("sliding_window", [None, 24])
@pytest.mark.parametrize("layout", sorted(MIXED_LAYOUTS))
@pytest.mark.parametrize("fused_qkv", [False, True])
def test_cuda_backend_matches_reference_on_mixed_steps(dtype, sliding_window, layout, fused_qkv):
    """Decodes, a fresh prompt and a prompt chunk with cached context in one step, or prompts
    alone; q, k and v as tensors of their own or, as the models pass them, as views into one
    fused QKV projection."""
    from aserve.attention.cuda_backend import CudaAttentionBackend
    from aserve.attention.metadata import AttentionMetadata
    from aserve.attention.torch_ref import TorchReferenceBackend

    gen = torch.Generator(device="cuda").manual_seed(13)
    num_heads, num_kv_heads, head_dim, block_size, num_blocks = 8, 2, 128, 16, 64
    query_lens, seq_lens = MIXED_LAYOUTS[layout]
    tables = _random_tables(seq_lens, block_size, num_blocks, gen)
    cache = _random_cache(num_blocks, block_size, num_kv_heads, head_dim, dtype, gen)
    num_tokens = sum(query_lens)
    positions = [p for q, s in zip(query_lens, seq_lens) for p in range(s - q, s)]
    seq_of = [i for i, q in enumerate(query_lens) for _ in range(q)]
    slots = torch.tensor([tables[i, p // block_size].item() * block_size + p % block_size
                          for i, p in zip(seq_of, positions)], device="cuda")
    starts = [0]
    for q in query_lens:
        starts.append(starts[-1] + q)
    metadata = AttentionMetadata(
        num_tokens=num_tokens, query_start_loc=torch.tensor(starts, dtype=torch.int32, device="cuda"),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device="cuda"), block_tables=tables,
        slot_mapping=slots, max_query_len=max(query_lens), max_seq_len=max(seq_lens),
        query_lens_cpu=query_lens, seq_lens_cpu=seq_lens)
    if fused_qkv:
        qkv = torch.randn(num_tokens, (num_heads + 2 * num_kv_heads) * head_dim, generator=gen,
                          device="cuda").to(dtype)
        q, k, v = (part.view(num_tokens, -1, head_dim) for part in qkv.split(
            [num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], dim=-1))
        assert not k.is_contiguous()
    else:
        q, k, v = (torch.randn(num_tokens, h, head_dim, generator=gen, device="cuda").to(dtype)
                   for h in (num_heads, num_kv_heads, num_kv_heads))
    ref_cache = cache.clone()
    ref = TorchReferenceBackend().forward(q, k, v, ref_cache, metadata, 0.09, sliding_window)
    out = CudaAttentionBackend().forward(q, k, v, cache, metadata, 0.09, sliding_window)
    assert torch.equal(cache, ref_cache)
    for i in range(len(query_lens)):
        rows = slice(starts[i], starts[i + 1])
        assert _relative_error(out[rows], ref[rows].double()) < TOLERANCE[dtype], i


# ------------------------------------------------------------------ fused layer ops
# The fused kernels round where the torch layers round, so they match the torch code (their
# reference) to about one rounding step of the dtype.
FUSED_TOLERANCE = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}


@pytest.mark.parametrize("dtype", DTYPES)
# 100 is no whole number of 16-byte vectors (the scalar kernel); the rest run in vectors.
@pytest.mark.parametrize("hidden", [64, 100, 896, 4096, 5120])
def test_fused_rms_norm_matches_torch_layer(dtype, hidden, monkeypatch):
    from aserve.models.layers.layernorm import RMSNorm

    gen = torch.Generator(device="cuda").manual_seed(hidden)
    norm = RMSNorm(hidden, eps=1e-5).cuda().to(dtype)
    norm.weight.copy_(torch.randn(hidden, generator=gen, device="cuda"))
    x = (3 * torch.randn(37, hidden, generator=gen, device="cuda")).to(dtype)
    residual = torch.randn(37, hidden, generator=gen, device="cuda").to(dtype)
    fused = norm(x)
    fused_with_add, fused_residual = norm(x, residual.clone())
    monkeypatch.setenv("ASERVE_KERNELS", "torch")
    reference = norm(x)
    reference_with_add, reference_residual = norm(x, residual.clone())
    assert fused.dtype == dtype and fused.shape == x.shape
    assert _relative_error(fused, reference.double()) < FUSED_TOLERANCE[dtype]
    assert torch.equal(fused_residual, reference_residual)   # one rounded add, both ways
    assert _relative_error(fused_with_add, reference_with_add.double()) < FUSED_TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
# 100 runs element by element; 768 (OPT-125m) and 1600 (GPT-2 XL) in vectors; 40960 element by
# element too, being over the vector kernel's budget (4 vectors a thread, 1024 threads).
@pytest.mark.parametrize("hidden", [100, 768, 1600, 40960])
@pytest.mark.parametrize("affine,bias", [(True, True), (True, False), (False, False)])
def test_fused_layer_norm_matches_torch_layer(dtype, hidden, affine, bias, monkeypatch):
    from aserve.models.layers.layernorm import LayerNorm

    gen = torch.Generator(device="cuda").manual_seed(hidden)
    norm = LayerNorm(hidden, eps=1e-5, elementwise_affine=affine, bias=bias).cuda().to(dtype)
    if affine:
        norm.weight.copy_(torch.randn(hidden, generator=gen, device="cuda"))
    if norm.bias is not None:
        norm.bias.copy_(torch.randn(hidden, generator=gen, device="cuda"))
    # Rows with a mean far from zero, so that the mean's subtraction is tested too.
    offsets = 4 * torch.randn(37, 1, generator=gen, device="cuda")
    x = (2 * torch.randn(37, hidden, generator=gen, device="cuda") + offsets).to(dtype)
    fused = norm(x)
    fused_strided = norm(torch.cat([x, x], dim=1)[:, hidden:])   # rows of a wider tensor
    monkeypatch.setenv("ASERVE_KERNELS", "torch")
    reference = norm(x)
    assert fused.dtype == dtype and fused.shape == x.shape
    assert _relative_error(fused, reference.double()) < FUSED_TOLERANCE[dtype]
    assert torch.equal(fused_strided, fused)


@pytest.mark.parametrize("dtype", DTYPES)
# A half head of 36 is no whole number of 16-bit vectors (the scalar kernel, but for float32).
@pytest.mark.parametrize("head_dim,num_heads,num_kv_heads", [(64, 4, 2), (128, 32, 8), (80, 6, 6), (72, 4, 1)])
def test_fused_rotary_matches_torch_layer(dtype, head_dim, num_heads, num_kv_heads, monkeypatch):
    from aserve.models.layers.rotary import RotaryEmbedding

    gen = torch.Generator(device="cuda").manual_seed(head_dim)
    with torch.device("cuda"):
        rotary = RotaryEmbedding(head_dim, 4096, {"rope_type": "default", "rope_theta": 500000.0})
    num_tokens = 29
    q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
    # q and k as the views of a fused qkv tensor that the model passes.
    qkv = torch.randn(num_tokens, q_size + 2 * kv_size, generator=gen, device="cuda").to(dtype)
    positions = torch.randint(0, 4096, (num_tokens,), generator=gen, device="cuda")
    monkeypatch.setenv("ASERVE_KERNELS", "torch")
    q_ref, k_ref = rotary(positions, qkv[:, :q_size].clone(), qkv[:, q_size:q_size + kv_size].clone())
    monkeypatch.setenv("ASERVE_KERNELS", "auto")
    fused_qkv = qkv.clone()
    q, k = rotary(positions, fused_qkv[:, :q_size], fused_qkv[:, q_size:q_size + kv_size])
    assert _relative_error(q, q_ref.double()) < FUSED_TOLERANCE[dtype]
    assert _relative_error(k, k_ref.double()) < FUSED_TOLERANCE[dtype]
    assert torch.equal(fused_qkv[:, q_size + kv_size:], qkv[:, q_size + kv_size:]), "values were touched"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim,num_heads,num_kv_heads", [(64, 4, 2), (128, 32, 8), (80, 6, 6), (72, 4, 1)])
def test_rotary_with_cache_write_equals_the_two_kernels(dtype, head_dim, num_heads, num_kv_heads):
    from aserve.attention.torch_ref import write_kv_cache
    from aserve.cuda import fused, ops
    from aserve.models.layers.rotary import RotaryEmbedding

    gen = torch.Generator(device="cuda").manual_seed(head_dim + num_heads)
    with torch.device("cuda"):
        rotary = RotaryEmbedding(head_dim, 4096, {"rope_type": "default", "rope_theta": 500000.0})
    num_tokens, num_blocks, block_size = 29, 12, 16
    q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
    qkv = torch.randn(num_tokens, q_size + 2 * kv_size, generator=gen, device="cuda").to(dtype)
    positions = torch.randint(0, 4096, (num_tokens,), generator=gen, device="cuda")
    slots = torch.randperm(num_blocks * block_size, generator=gen, device="cuda")[:num_tokens]
    slots[::6] = -1                             # padding tokens: rotated, but nothing stored
    initial = _random_cache(num_blocks, block_size, num_kv_heads, head_dim, dtype, gen)

    def views(t):
        return t[:, :q_size], t[:, q_size:q_size + kv_size], t[:, q_size + kv_size:]

    two_qkv, two_cache = qkv.clone(), initial.clone()
    q2, k2, v2 = views(two_qkv)
    rotary(positions, q2, k2)
    ops.reshape_and_cache(k2.view(num_tokens, num_kv_heads, head_dim), v2.view(num_tokens, num_kv_heads, head_dim),
                          two_cache[0], two_cache[1], slots)
    one_qkv, one_cache = qkv.clone(), initial.clone()
    q1, k1, v1 = views(one_qkv)
    done = fused.rotary_embedding_and_cache(positions, q1, k1, v1, one_cache[0], one_cache[1], slots,
                                            rotary.cos_cache, rotary.sin_cache, head_dim)
    element = qkv.element_size()
    assert done == ((head_dim // 2) * element % 16 == 0)   # only rows of whole 16-byte vectors
    if not done:
        assert torch.equal(one_qkv, qkv) and torch.equal(one_cache, initial)
        return
    # The same kernel without a slot mapping, then reshape_and_cache: the same bits, in the
    # tensors and the cache.
    assert torch.equal(one_qkv, two_qkv) and torch.equal(one_cache, two_cache)
    # The cache holds the rotated keys and the values at the real slots only (the rotation
    # itself is checked against the torch layer in test_fused_rotary_matches_torch_layer).
    reference = initial.clone()
    keep = slots >= 0
    write_kv_cache(k1.view(num_tokens, num_kv_heads, head_dim)[keep],
                   views(qkv)[2].view(num_tokens, num_kv_heads, head_dim)[keep], reference, slots[keep])
    assert torch.equal(one_cache, reference)
    assert torch.equal(v1, views(qkv)[2])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("width", [100, 128, 14336])
def test_fused_silu_and_mul_matches_torch_layer(dtype, width, monkeypatch):
    from aserve.models.layers.activation import ActAndMul

    gen = torch.Generator(device="cuda").manual_seed(width)
    act = ActAndMul("silu")
    x = (2 * torch.randn(19, 2 * width, generator=gen, device="cuda")).to(dtype)
    fused = act(x)
    monkeypatch.setenv("ASERVE_KERNELS", "torch")
    reference = act(x)
    assert fused.shape == (19, width)
    assert _relative_error(fused, reference.double()) < FUSED_TOLERANCE[dtype]
