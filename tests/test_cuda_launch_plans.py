"""The host-side launch planning of the GPU path, which needs no GPU: the CUDA-graph batch
ladder, the decode kernel's context splits and the packed input upload."""

from __future__ import annotations


import numpy as np
import pytest
import torch

from aserve.cuda.ops import MAX_PARTITION, MAX_SPLITS, MIN_PARTITION, decode_partition
from aserve.worker.cuda_graphs import MAX_GRAPH_BATCH, batch_size_ladder
from aserve.worker.input_upload import InputUploader


def test_batch_size_ladder_covers_every_batch_up_to_max_num_seqs():
    assert batch_size_ladder(256)[:5] == [1, 2, 4, 8, 16] and batch_size_ladder(256)[-1] == 256
    assert batch_size_ladder(3) == [1, 2, 3]
    assert batch_size_ladder(100)[-2:] == [96, 100]
    for max_num_seqs in (1, 5, 8, 77, 256, 300, 512):
        ladder = batch_size_ladder(max_num_seqs)
        assert ladder == sorted(set(ladder)) and ladder[-1] == max_num_seqs
        assert all(any(b >= n for b in ladder) for n in range(1, max_num_seqs + 1))
        # A batch is padded up to its graph's size by fewer than 8 rows to 256, 16 past it.
        assert all(min(b for b in ladder if b >= n) - n < (8 if n <= 256 else 16) for n in range(1, max_num_seqs + 1))


def test_batch_size_ladder_stops_at_512_as_vllm_does():
    ladder = batch_size_ladder(1024)
    assert ladder[-1] == MAX_GRAPH_BATCH == 512 and len(ladder) == 51
    assert ladder[ladder.index(256):ladder.index(256) + 3] == [256, 272, 288]


def _partitions(seq_len: int, unit: int, splits: int) -> list[tuple[int, int]]:
    """The kernel's division of one sequence's context (paged_attention.cu), in Python."""
    partition = -(-(-(-seq_len // splits)) // unit) * unit
    return [(start, min(start + partition, seq_len)) for start in range(0, seq_len, partition)]


@pytest.mark.parametrize("num_seqs", [1, 3, 64, 256])
@pytest.mark.parametrize("max_seq_len", [1, 15, 640, 2048, 8192, 131072])
@pytest.mark.parametrize("block_size", [8, 16, 32, 128])
def test_decode_partition_covers_every_context_in_whole_blocks(num_seqs, max_seq_len, block_size):
    unit, splits = decode_partition(num_seqs, 8, max_seq_len, block_size, num_sms=132)
    assert unit % block_size == 0 and unit >= MIN_PARTITION  # the kernel loads whole blocks' ids
    assert 1 <= splits <= MAX_SPLITS
    for seq_len in {1, max(1, max_seq_len // 3), max_seq_len - 1, max_seq_len} - {0}:
        parts = _partitions(seq_len, unit, splits)
        assert len(parts) <= splits and parts[-1][1] == seq_len
        assert all(end - start <= MAX_PARTITION for start, end in parts)
        assert all(start % unit == 0 for start, _ in parts)


def test_decode_partition_splits_a_lone_long_context_but_not_a_full_batch():
    _, lone = decode_partition(1, 8, 8192, 16, num_sms=132)
    _, full = decode_partition(256, 8, 8192, 16, num_sms=132)
    assert lone >= 32          # one sequence still gives hundreds of CTAs
    assert full == 1           # 2048 CTAs already fill the card: none idle, even for 8k tokens
    # A short sequence in a launch sized for long ones gets as many splits as it has units.
    unit, splits = decode_partition(1, 8, 8192, 16, num_sms=132)
    assert len(_partitions(640, unit, splits)) == 20


def test_decode_partition_refuses_contexts_beyond_the_kernel():
    with pytest.raises(ValueError, match="context"):
        decode_partition(1, 8, MAX_SPLITS * MAX_PARTITION + 1, 16, num_sms=132)


def test_input_upload_returns_both_arrays_in_their_dtypes():
    uploader = InputUploader(torch.device("cpu"))
    a, d = uploader.upload(np.arange(5), np.array([7, 8], dtype=np.int64))
    assert a.dtype == torch.int64 and a.tolist() == list(range(5))
    assert d.dtype == torch.int32 and d.tolist() == [7, 8]
    a, d = uploader.upload(np.array([], dtype=np.int64), np.array([], dtype=np.int32))
    assert a.numel() == 0 and d.numel() == 0


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
def test_input_upload_on_a_gpu_keeps_every_step_intact_through_the_ring_and_growth():
    """Each upload is one copy out of a pinned buffer used in turns; a buffer refilled too early,
    or the int32 part misplaced, would show in an earlier step's tensors."""
    uploader = InputUploader(torch.device("cuda"))
    rng = np.random.default_rng(0)
    kept = []
    for size in (3, 0, 5000, 17, 40000, 1, 8):   # growth past the first buffers, and back
        int64 = rng.integers(-2**40, 2**40, size)
        int32 = rng.integers(-2**30, 2**30, 2 * size + 1, dtype=np.int32)
        a, d = uploader.upload(int64, int32)
        assert a.device.type == "cuda" and a.dtype == torch.int64 and d.dtype == torch.int32
        kept.append((int64, int32, a, d))
    torch.cuda.synchronize()
    for int64, int32, a, d in kept:
        assert a.cpu().numpy().tolist() == int64.tolist() and d.cpu().numpy().tolist() == int32.tolist()


def test_decode_shortcuts_give_what_the_gathers_give():
    """A decode step whose logits rows and placeholders are 0..n-1 skips both gathers; any
    other step gathers."""
    from aserve.worker.model_runner import ModelInput, _is_arange

    assert _is_arange(np.arange(7)) and _is_arange(np.array([], dtype=np.int64))
    assert not _is_arange(np.array([0, 2, 1])) and not _is_arange(np.array([1, 2, 3]))
    assert _is_arange(np.arange(100_000))   # past the cached range
    hidden = torch.randn(4, 3)
    previous = torch.tensor([40, 41, 42, 43])

    def model_input(logits_indices, fill_index, fill_rows, **flags):
        return ModelInput(torch.tensor([1, -1, -1, 4]), torch.arange(4), None, [], torch.tensor(logits_indices),
                          len(logits_indices), 0, None, [], [], torch.tensor(fill_index),
                          torch.tensor(fill_rows), None, **flags)

    fast = model_input([0, 1, 2, 3], [0, 1, 2, 3], [0, 1, 2, 3], logits_all_tokens=True, fills_all_tokens=True)
    slow = model_input([0, 1, 2, 3], [0, 1, 2, 3], [0, 1, 2, 3])
    assert fast.logits_rows(hidden) is hidden and torch.equal(slow.logits_rows(hidden), hidden)
    assert fast.filled_input_ids(previous) is previous
    assert torch.equal(slow.filled_input_ids(previous), previous)
    # A previous step of another size (a request left): the gather, even with the flag.
    assert fast.filled_input_ids(torch.tensor([7, 8, 9, 10, 11])).tolist() == [7, 8, 9, 10]
    partial = model_input([3, 1], [1, 2], [3, 0])
    assert partial.logits_rows(hidden).tolist() == hidden[[3, 1]].tolist()
    assert partial.filled_input_ids(previous).tolist() == [1, 43, 40, 4]


def test_a_gpu_without_nvrtc_falls_back_to_the_torch_attention(monkeypatch):
    from aserve.attention import get_attention_backend
    from aserve.cuda import fused

    monkeypatch.setattr(fused, "kernels_available", lambda: False)
    assert get_attention_backend(torch.device("cuda"), 128).name == "torch"


def test_aserve_kernels_torch_forces_the_reference_and_bad_values_are_refused(monkeypatch):
    from aserve.attention import get_attention_backend

    monkeypatch.setenv("ASERVE_KERNELS", "torch")
    assert get_attention_backend(torch.device("cuda"), 128).name == "torch"
    monkeypatch.setenv("ASERVE_KERNELS", "fast")
    with pytest.raises(ValueError, match="ASERVE_KERNELS"):
        get_attention_backend(torch.device("cuda"), 128)


def test_gemv_geometry_override_names_its_rows_and_refuses_what_does_not_fit():
    from aserve.cuda.gemv import GEOMETRY_ENV, parse_geometry

    assert parse_geometry("") == {}
    assert parse_geometry("1=2x8, 2=2X8") == {1: (2, 8), 2: (2, 8)}
    assert parse_geometry("4=1x16") == {4: (1, 16)}
    for bad in ("1=2x", "2x8", "0=2x4", "5=2x4", "1=3x4", "1=2x0", "1=2x17"):
        with pytest.raises(ValueError, match=GEOMETRY_ENV):
            parse_geometry(bad)


def test_gemv_deep_geometry_goes_only_where_its_grid_fits_one_wave():
    from aserve.cuda.gemv import _grid, deep_fits_one_wave

    sms = 132   # an H200; the deep build holds 4 CTAs of 128 threads an SM there (126 registers)
    # Llama-8B at one row: o_proj and down (4,096 outputs, two a warp) fit one wave, QKV does not.
    assert _grid(4096, 2, sms) == (512, 4) and deep_fits_one_wave(512, 4, sms)
    assert _grid(6144, 2, sms) == (768, 4) and not deep_fits_one_wave(768, 4, sms)
    # A small layer spreads over every SM with fewer warps a CTA, and fits.
    assert _grid(768, 2, sms) == (192, 2) and deep_fits_one_wave(192, 4, sms)
    # A kernel the driver says cannot be resident at all never fits.
    assert not deep_fits_one_wave(1, 0, sms)


def test_gemv_deep_switch_names_itself_and_refuses_what_does_not_fit():
    from aserve.cuda.gemv import DEEP_ENV, DEEP_GEOMETRY, parse_deep

    assert parse_deep("") is None and parse_deep("0") is None
    assert parse_deep("1") == DEEP_GEOMETRY == (2, 8)
    assert parse_deep(" 2X6 ") == (2, 6)
    for bad in ("yes", "2x", "3x4", "2x0", "2x17"):
        with pytest.raises(ValueError, match=DEEP_ENV):
            parse_deep(bad)
