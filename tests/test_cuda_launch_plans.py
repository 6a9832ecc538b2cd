"""The host-side launch planning of the GPU path, which needs no GPU: the CUDA-graph batch
ladder, the decode kernel's context splits and the packed input upload."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from aserve.cuda.ops import MAX_PARTITION, MAX_SPLITS, MIN_PARTITION, decode_partition
from aserve.worker.cuda_graphs import batch_size_ladder
from aserve.worker.input_upload import InputUploader


def test_batch_size_ladder_covers_every_batch_up_to_max_num_seqs():
    assert batch_size_ladder(256)[:5] == [1, 2, 4, 8, 16] and batch_size_ladder(256)[-1] == 256
    assert batch_size_ladder(3) == [1, 2, 3]
    assert batch_size_ladder(100)[-2:] == [96, 100]
    for max_num_seqs in (1, 5, 8, 77, 256):
        ladder = batch_size_ladder(max_num_seqs)
        assert ladder == sorted(set(ladder))
        assert all(any(b >= n for b in ladder) for n in range(1, max_num_seqs + 1))


@pytest.mark.parametrize("num_seqs", [1, 3, 64, 256])
@pytest.mark.parametrize("max_seq_len", [1, 15, 640, 2048, 8192, 131072])
@pytest.mark.parametrize("block_size", [8, 16, 32, 128])
def test_decode_partition_covers_the_context_in_whole_blocks(num_seqs, max_seq_len, block_size):
    partition, splits = decode_partition(num_seqs, 8, max_seq_len, block_size, num_sms=132)
    assert partition % block_size == 0            # the kernel loads whole blocks' ids
    assert max(MIN_PARTITION, block_size) <= partition <= MAX_PARTITION
    assert splits == math.ceil(max_seq_len / partition) and splits <= MAX_SPLITS


def test_decode_partition_splits_a_lone_long_context_but_not_a_full_batch():
    _, lone = decode_partition(1, 8, 8192, 16, num_sms=132)
    _, full = decode_partition(256, 8, 640, 16, num_sms=132)
    assert lone >= 32          # one sequence still gives hundreds of CTAs
    assert full <= 2           # 2048 CTAs per split already fill the card


def test_decode_partition_refuses_contexts_beyond_the_kernel():
    with pytest.raises(ValueError, match="context"):
        decode_partition(1, 8, MAX_SPLITS * MAX_PARTITION + 1, 16, num_sms=132)


def test_input_upload_returns_the_array_in_the_asked_dtype():
    uploader = InputUploader(torch.device("cpu"))
    a = uploader.upload(np.arange(5), torch.int64)
    assert a.dtype == torch.int64 and a.tolist() == list(range(5))
    d = uploader.upload(np.array([7, 8], dtype=np.int64), torch.int32)
    assert d.dtype == torch.int32 and d.tolist() == [7, 8]
    assert uploader.upload(np.array([], dtype=np.int64), torch.int64).numel() == 0


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
