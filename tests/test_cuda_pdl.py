"""Programmatic dependent launch (aserve/cuda/compiler.py): a chain of kernels that each read
what the previous one wrote gives the same bits with it and without it, eagerly and replayed
from a CUDA graph, and the chain matches its torch reference (GPU only; on a GPU older than
Hopper the launches simply run without it).

The chain is a decode layer's at batch 1 (norm, GEMV, rotary, KV write, attention, GEMV, norm,
GEMV, SiLU-and-mul, GEMV), repeated so that every kernel follows one that writes its input: a
kernel that read before its wait would read a stale or half-written tensor, and the bits would
differ between the two modes on some run.
"""

from __future__ import annotations

import pytest
import torch

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, FFN = 1024, 8, 2, 128, 2816
BLOCK, NUM_BLOCKS, CONTEXT = 16, 64, 300
LAYERS = 12


def test_pdl_setting_is_checked(monkeypatch):
    from aserve.cuda.compiler import PDL_ENV, pdl_enabled

    monkeypatch.setenv(PDL_ENV, "yes")
    with pytest.raises(ValueError, match=PDL_ENV):
        pdl_enabled(0)
    monkeypatch.setenv(PDL_ENV, "0")
    assert not pdl_enabled(0)


def _weights(dtype):
    gen = torch.Generator(device="cuda").manual_seed(0)

    def randn(*shape, scale=1.0):
        return (torch.randn(shape, generator=gen, device="cuda") * scale).to(dtype)

    layers = [dict(norm1=1 + randn(HIDDEN, scale=0.1), norm2=1 + randn(HIDDEN, scale=0.1),
                   qkv=randn((HEADS + 2 * KV_HEADS) * HEAD_DIM, HIDDEN, scale=HIDDEN ** -0.5),
                   o=randn(HIDDEN, HEADS * HEAD_DIM, scale=(HEADS * HEAD_DIM) ** -0.5),
                   gate_up=randn(2 * FFN, HIDDEN, scale=HIDDEN ** -0.5),
                   down=randn(HIDDEN, FFN, scale=FFN ** -0.5),
                   k_cache=randn(NUM_BLOCKS, BLOCK, KV_HEADS, HEAD_DIM),
                   v_cache=randn(NUM_BLOCKS, BLOCK, KV_HEADS, HEAD_DIM))
              for _ in range(LAYERS)]
    x = randn(1, HIDDEN)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, HEAD_DIM, 2, device="cuda").float() / HEAD_DIM))
    angles = torch.outer(torch.arange(4096, device="cuda").float(), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return layers, x, angles.cos().contiguous(), angles.sin().contiguous()


def _step_inputs():
    """The one sequence's position, block table, length and slots, made before any capture
    (a copy from the host cannot be captured)."""
    table = torch.randperm(NUM_BLOCKS, device="cuda", generator=torch.Generator(device="cuda").manual_seed(1))
    tokens = torch.arange(CONTEXT, device="cuda")
    return dict(positions=torch.tensor([CONTEXT - 1], device="cuda"), block_tables=table[None, :].to(torch.int32),
                seq_lens=torch.tensor([CONTEXT], dtype=torch.int32, device="cuda"),
                slots=table[tokens // BLOCK] * BLOCK + tokens % BLOCK)


def _chain(layers, x, cos, sin, inputs, kernels: bool, copy=torch.clone):
    """The layers on x: through aserve's kernels, or through the torch reference. copy makes
    the step's private copies of the residual stream and the caches."""
    from aserve.cuda import fused, ops
    from aserve.cuda.gemv import launch_gemv

    q_size, kv_size = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM
    position = CONTEXT - 1
    positions, block_tables, seq_lens, slots = (
        inputs[name] for name in ("positions", "block_tables", "seq_lens", "slots"))
    residual = copy(x)
    h = x
    for layer in layers:
        k_cache, v_cache = copy(layer["k_cache"]), copy(layer["v_cache"])
        if kernels:
            h = fused.rms_norm(h, layer["norm1"], 1e-5, residual)
            q, k, v = launch_gemv(h, layer["qkv"]).split([q_size, kv_size, kv_size], dim=-1)
            fused.rotary_embedding(positions, q, k, cos, sin, HEAD_DIM)
            ops.reshape_and_cache(k.view(1, KV_HEADS, HEAD_DIM), v.view(1, KV_HEADS, HEAD_DIM),
                                  k_cache, v_cache, slots[position:])
            attn = torch.empty(1, HEADS, HEAD_DIM, dtype=x.dtype, device="cuda")
            ops.paged_decode_attention(attn, q.view(1, HEADS, HEAD_DIM), k_cache, v_cache, block_tables,
                                       seq_lens, HEAD_DIM ** -0.5, CONTEXT)
            h = launch_gemv(attn.view(1, -1), layer["o"])
            h = fused.rms_norm(h, layer["norm2"], 1e-5, residual)
            h = launch_gemv(fused.silu_and_mul(launch_gemv(h, layer["gate_up"])), layer["down"])
            continue

        def norm(weight):
            residual.add_(h)
            var = residual.float().pow(2).mean(-1, keepdim=True)
            return weight * (residual.float() * torch.rsqrt(var + 1e-5)).to(x.dtype)

        def linear(a, weight):
            return (a.float() @ weight.float().T).to(x.dtype)

        def rotate(t, heads):
            t = t.view(heads, HEAD_DIM).float()
            c, s = cos[position], sin[position]
            return (t * c + torch.cat([-t[:, HEAD_DIM // 2:], t[:, :HEAD_DIM // 2]], -1) * s).to(x.dtype)

        q, k, v = linear(norm(layer["norm1"]), layer["qkv"]).split([q_size, kv_size, kv_size], dim=-1)
        q, k = rotate(q, HEADS), rotate(k, KV_HEADS)
        k_cache.view(-1, KV_HEADS, HEAD_DIM)[slots[position]] = k
        v_cache.view(-1, KV_HEADS, HEAD_DIM)[slots[position]] = v.view(KV_HEADS, HEAD_DIM)
        keys = k_cache.view(-1, KV_HEADS, HEAD_DIM)[slots].float().repeat_interleave(HEADS // KV_HEADS, 1)
        values = v_cache.view(-1, KV_HEADS, HEAD_DIM)[slots].float().repeat_interleave(HEADS // KV_HEADS, 1)
        scores = torch.einsum("hd,thd->ht", q.float(), keys) * HEAD_DIM ** -0.5
        attn = torch.einsum("ht,thd->hd", scores.softmax(-1), values).to(x.dtype)
        h = linear(attn.reshape(1, -1), layer["o"])
        gate, up = linear(norm(layer["norm2"]), layer["gate_up"]).chunk(2, dim=-1)
        h = linear((torch.nn.functional.silu(gate.float()).to(x.dtype) * up), layer["down"])
    return h


# How the chain copies its inputs: clone() of a dense tensor is a device-to-device memcpy (a
# memcpy node in a graph); mul(1) is a torch kernel. A kernel launched with PDL after either
# must still see the copy whole.
COPIES = {"memcpy": torch.clone, "kernel": lambda t: t.mul(1)}


def _run(layers, x, cos, sin, graph: bool, copy):
    inputs = _step_inputs()
    if not graph:
        out = _chain(layers, x, cos, sin, inputs, kernels=True, copy=copy)
        torch.cuda.synchronize()
        return out.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        # Compiles, loads and allocates before the capture.
        _chain(layers, x, cos, sin, inputs, kernels=True, copy=copy)
    torch.cuda.current_stream().wait_stream(stream)
    captured = torch.cuda.CUDAGraph()
    with torch.cuda.graph(captured):
        out = _chain(layers, x, cos, sin, inputs, kernels=True, copy=copy)
    results = []
    for _ in range(5):
        captured.replay()
        torch.cuda.synchronize()
        results.append(out.clone())
    return results


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("graph", [False, True], ids=["eager", "graph"])
@pytest.mark.parametrize("copies", list(COPIES))
def test_dependent_chain_gives_the_same_bits_with_and_without_pdl(monkeypatch, dtype, graph, copies):
    from aserve.cuda.compiler import PDL_ENV

    layers, x, cos, sin = _weights(dtype)
    outputs = {}
    for pdl in ("0", "1"):
        monkeypatch.setenv(PDL_ENV, pdl)
        got = _run(layers, x, cos, sin, graph, COPIES[copies])
        if graph:
            differing = [i for i, r in enumerate(got) if not torch.equal(r, got[0])]
            assert not differing, f"{PDL_ENV}={pdl}: graph replays {differing} differ from the first"
            got = got[0]
        outputs[pdl] = got
    assert torch.equal(outputs["1"], outputs["0"])
    reference = _chain(layers, x, cos, sin, _step_inputs(), kernels=False).float()
    error = ((outputs["1"].float() - reference).abs().max() / reference.abs().max()).item()
    # Twelve layers of rounding to the dtype in other places and orders; a wrong or stale input
    # anywhere in the chain costs an error of the order of the output itself.
    assert error <= {torch.float16: 0.05, torch.bfloat16: 0.15}[dtype], error
