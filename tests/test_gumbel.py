"""Gumbel-max sampling with hashed noise (aserve/worker/gumbel.py, aserve/cuda/sampling.cu): the
noise's bits, its distribution, what the samples follow, and the GPU kernel against the torch
reference on fresh random logits."""

from __future__ import annotations

import math

import pytest
import torch

from aserve.worker import gumbel
from aserve.worker.gumbel import gumbel_noise, sample_gumbel_max, sample_gumbel_max_reference


def _mix32(x: int) -> int:
    x ^= x >> 16
    x = (x * 0x21F0AAAD) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0xD35A2D97) & 0xFFFFFFFF
    return x ^ (x >> 15)


def _noise(key: int, token: int) -> float:
    """The kernel's noise in plain Python integers (exact) and float64 logs."""
    key &= (1 << 64) - 1
    h = _mix32((_mix32(token ^ (key & 0xFFFFFFFF)) + (key >> 32)) & 0xFFFFFFFF)
    v = ((h >> 9) * 2 + 1) * 2.0 ** -24
    q = v * (1 + 0.5 * v) if v < 2.0 ** -10 else -math.log1p(-v)
    return -math.log(q)


def test_noise_hashes_key_and_token_as_the_kernel_does():
    keys = torch.tensor([0, 1, 12345678901234, -1, -(2 ** 63), 2 ** 63 - 1], dtype=torch.int64)
    noise = gumbel_noise(keys, 3000)
    for r, key in enumerate(keys.tolist()):
        for token in (0, 1, 2, 777, 2999):
            assert noise[r, token].item() == pytest.approx(_noise(key, token), rel=1e-6, abs=1e-6)


def test_noise_is_gumbel_distributed_and_differs_between_keys():
    noise = gumbel_noise(torch.tensor([3, 4]), 200_000).double()
    euler = 0.5772156649
    for row in noise:
        assert row.mean().item() == pytest.approx(euler, abs=0.01)
        assert row.var().item() == pytest.approx(math.pi ** 2 / 6, rel=0.02)
        assert row.max().item() < 16.7   # the uniform's resolution bounds it (sampling.cu's GUMBEL_BOUND)
    assert torch.corrcoef(noise)[0, 1].abs().item() < 0.01


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_samples_follow_softmax_of_logits_over_temperature(temperature):
    logits = torch.tensor([1.0, 0.5, 0.0, -0.5, 2.0, -1.0, 0.3, 1.2])
    draws = 40_000
    keys = torch.randint(-(2 ** 63), 2 ** 63 - 1, (draws,), generator=torch.Generator().manual_seed(1))
    ids = sample_gumbel_max_reference(logits.expand(draws, 8), torch.full((draws,), temperature), keys)
    empirical = torch.bincount(ids, minlength=8).double() / draws
    expected = torch.softmax(logits.double() / temperature, dim=-1)
    assert 0.5 * (empirical - expected).abs().sum().item() < 0.015


def test_greedy_rows_masked_tokens_and_masked_rows():
    logits = torch.randn(5, 40, generator=torch.Generator().manual_seed(2))
    logits[1, :] = -math.inf
    logits[1, 17] = 0.0                  # the only token left
    logits[2, :] = -math.inf             # every token masked
    temps = torch.tensor([0.0, 1.0, 1.0, 0.0, 0.7])
    ids = sample_gumbel_max_reference(logits, temps, torch.arange(5) * 7919)
    assert ids[0] == logits[0].argmax() and ids[3] == logits[3].argmax()
    assert ids[1] == 17 and ids[2] == 0


def test_reference_in_row_chunks_gives_the_same_ids(monkeypatch):
    logits = torch.randn(37, 500, generator=torch.Generator().manual_seed(3))
    temps = torch.rand(37, generator=torch.Generator().manual_seed(4)) + 0.2
    keys = torch.arange(37) * 104729
    whole = sample_gumbel_max_reference(logits, temps, keys)
    monkeypatch.setattr(gumbel, "_REFERENCE_CHUNK", 1200)   # 2 rows at a time
    assert torch.equal(sample_gumbel_max_reference(logits, temps, keys), whole)


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rows,vocab", [(1, 50272), (7, 1000), (300, 32000), (64, 128256), (3, 31)])
def test_kernel_matches_reference(dtype, rows, vocab):
    gen = torch.Generator(device="cuda").manual_seed(rows * vocab)
    logits = (3 * torch.randn(rows, vocab, generator=gen, device="cuda")).to(dtype)
    temps = torch.rand(rows, generator=gen, device="cuda") * 2
    temps[::3] = 0.0                                       # greedy rows among them
    keys = torch.randint(-(2 ** 62), 2 ** 62, (rows,), generator=gen, device="cuda")
    got = sample_gumbel_max(logits, temps, keys)
    want = sample_gumbel_max_reference(logits, temps, keys)
    # The kernel's logs are approximate (__logf): where the two disagree, the reference's
    # scores of the two tokens must be a near-tie.
    greedy = temps == 0
    assert torch.equal(got[greedy], want[greedy]), "greedy rows take the exact argmax"
    scores = logits.float() / torch.where(greedy, 1.0, temps).unsqueeze(1)
    scores = torch.where(greedy.unsqueeze(1), scores, scores + gumbel_noise(keys, vocab).cuda())
    best = scores.gather(1, want.unsqueeze(1)).squeeze(1)
    chosen = scores.gather(1, got.unsqueeze(1)).squeeze(1)
    assert ((best - chosen) <= 1e-4 * (1 + best.abs())).all()
    assert (got != want).sum().item() <= max(1, rows // 50)


@cuda
@pytest.mark.cuda
def test_kernel_reads_strided_rows_and_masked_logits():
    gen = torch.Generator(device="cuda").manual_seed(5)
    wide = torch.randn(20, 2 * 4096, generator=gen, device="cuda").to(torch.bfloat16)
    logits = wide[:, 100:100 + 4000]                       # rows of stride 8192
    logits[4, :] = -math.inf
    logits[5, :] = -math.inf
    logits[5, 1234] = 1.0
    temps = torch.full((20,), 0.8, device="cuda")
    keys = torch.arange(20, device="cuda") * 31337
    got = sample_gumbel_max(logits, temps, keys)
    assert got[4] == 0 and got[5] == 1234
    assert torch.equal(got, sample_gumbel_max_reference(logits, temps, keys))


def test_greedy_ids_off_the_gpu_is_torch_argmax(monkeypatch):
    logits = torch.randn(5, 300)
    assert torch.equal(gumbel.greedy_ids(logits), logits.argmax(dim=-1))
    from aserve.cuda import sampling

    monkeypatch.delenv("ASERVE_ARGMAX_KERNEL", raising=False)
    assert sampling.argmax_kernel_enabled()   # on by default (where logits are on a GPU)
    monkeypatch.setenv("ASERVE_ARGMAX_KERNEL", "0")
    assert not sampling.argmax_kernel_enabled()
    monkeypatch.setenv("ASERVE_ARGMAX_KERNEL", "2")
    with pytest.raises(ValueError, match="ASERVE_ARGMAX_KERNEL"):
        sampling.argmax_kernel_enabled()


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rows,vocab", [(1, 128256), (1, 50272), (3, 32001), (64, 128256), (5, 7), (2, 1)])
@pytest.mark.parametrize("parts", ["1", "3", "16"])
def test_argmax_kernel_picks_torch_argmax_ids(dtype, rows, vocab, parts, monkeypatch):
    """The greedy kernel against torch.argmax on fresh random logits: ties go to the lower index
    (values repeated on purpose, and float16's coarse steps make more), a row of -inf gives 0,
    the first NaN wins; rows aligned (16-byte loads) and misaligned (one element at a time);
    a row in one CTA, or (Hopper) cut into parts of a thread block cluster (ASERVE_ARGMAX_PARTS)."""
    from aserve.cuda.sampling import argmax_rows

    monkeypatch.setenv("ASERVE_ARGMAX_PARTS", parts)

    gen = torch.Generator(device="cuda").manual_seed(rows * vocab + 7)
    wide = (4 * torch.randn(rows, vocab + 9, generator=gen, device="cuda")).to(dtype)
    for logits in (wide[:, :vocab], wide[:, 1:1 + vocab], wide[:, :vocab].contiguous()):
        top = logits.max(dim=-1).values
        for r in range(rows):   # the row's maximum again, at random places before and after it
            places = torch.randint(0, vocab, (3,), generator=gen, device="cuda")
            logits[r, places] = top[r]
        if rows > 2:
            logits[1] = -math.inf
            logits[2, vocab // 2] = math.nan
            logits[2, vocab - 1] = math.nan
        assert torch.equal(argmax_rows(logits), logits.argmax(dim=-1)), (dtype, rows, vocab)
    monkeypatch.setenv("ASERVE_ARGMAX_KERNEL", "1")
    assert torch.equal(gumbel.greedy_ids(wide), wide.argmax(dim=-1))


@pytest.mark.parametrize("rows, vocab, element_size, cluster_limit, max_parts, expected", [
    (1, 128256, 2, 16, 16, 16),    # Llama-3's vocabulary in bfloat16: 16 CTAs of 8192 elements
    (1, 128256, 4, 16, 16, 16),    # float32: more passes would fit 32, the cluster holds 16
    (1, 50272, 2, 16, 16, 7),      # OPT's: 7 CTAs cover it in one pass each
    (1, 128256, 2, 8, 16, 8),      # a GPU whose clusters hold 8
    (64, 128256, 2, 16, 16, 2),    # 64 rows x 2 parts fill the 132 SMs
    (256, 128256, 2, 16, 16, 1),   # more rows than SMs: a CTA a row
    (2, 7, 2, 16, 16, 1),          # a tiny vocabulary
    (1, 128256, 2, 16, 1, 1),      # parts turned off
])
def test_argmax_parts_fill_idle_sms_within_a_cluster(rows, vocab, element_size, cluster_limit, max_parts, expected):
    from aserve.cuda.sampling import argmax_parts

    assert argmax_parts(rows, vocab, element_size, 132, cluster_limit, max_parts) == expected


@pytest.mark.parametrize("value", ["0", "17", "two", ""])
def test_argmax_parts_setting_is_checked(monkeypatch, value):
    from aserve.cuda import sampling

    monkeypatch.setenv("ASERVE_ARGMAX_PARTS", value)
    with pytest.raises(ValueError, match="ASERVE_ARGMAX_PARTS"):
        sampling.argmax_max_parts()
    monkeypatch.delenv("ASERVE_ARGMAX_PARTS")
    assert sampling.argmax_max_parts() == sampling.ARGMAX_MAX_PARTS   # clusters of 16 measured faster on the H200
