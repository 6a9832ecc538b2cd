"""EngineArgs' step-size defaults: they follow the device, as vLLM's follow the GPU's memory."""

from __future__ import annotations

import pytest
import torch

from aserve.config import (DEFAULT_MAX_NUM_BATCHED_TOKENS, DEFAULT_MAX_NUM_SEQS, LARGE_GPU_BYTES, EngineArgs,
                           device_class)


def test_cpu_takes_the_small_steps():
    args = EngineArgs()
    cpu = torch.device("cpu")
    assert device_class(cpu) == "cpu"
    assert (args.resolve_max_num_seqs(cpu), args.resolve_max_num_batched_tokens(cpu)) == (256, 2048)


def test_a_large_gpu_takes_larger_steps_than_a_small_one():
    assert DEFAULT_MAX_NUM_SEQS["large-gpu"] > DEFAULT_MAX_NUM_SEQS["cuda"]
    assert DEFAULT_MAX_NUM_BATCHED_TOKENS["large-gpu"] > DEFAULT_MAX_NUM_BATCHED_TOKENS["cuda"]


def test_settings_the_user_gives_win_over_the_defaults():
    args = EngineArgs(max_num_seqs=7, max_num_batched_tokens=300)
    assert args.resolve_max_num_seqs(torch.device("cpu")) == 7
    assert args.resolve_max_num_batched_tokens(torch.device("cpu")) == 300


@pytest.mark.parametrize("field, value", [("max_num_seqs", 0), ("max_num_batched_tokens", 0),
                                          ("usage_context", "batch")])
def test_a_bad_setting_names_its_field(field, value):
    with pytest.raises(ValueError, match=field):
        EngineArgs(**{field: value})


def test_the_api_server_keeps_the_smaller_steps_on_a_large_gpu(monkeypatch):
    """No large GPU here: device_class is what the resolution asks, so it stands in for one."""
    import aserve.config as config

    monkeypatch.setattr(config, "device_class", lambda device: "large-gpu")
    gpu = torch.device("cuda")
    offline, server = EngineArgs(), EngineArgs(usage_context="api_server")
    assert (offline.resolve_max_num_seqs(gpu), offline.resolve_max_num_batched_tokens(gpu)) == (512, 16384)
    assert (server.resolve_max_num_seqs(gpu), server.resolve_max_num_batched_tokens(gpu)) == (256, 8192)
    # An engine in a process of its own steps alone, as offline.
    engine_process = EngineArgs(usage_context="engine_process")
    assert (engine_process.resolve_max_num_seqs(gpu), engine_process.resolve_max_num_batched_tokens(gpu)) == (512, 16384)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
def test_the_gpu_class_follows_its_memory():
    device = torch.device("cuda")
    large = torch.cuda.get_device_properties(0).total_memory >= LARGE_GPU_BYTES
    assert device_class(device) == ("large-gpu" if large else "cuda")
    assert EngineArgs().resolve_max_num_seqs(device) == (512 if large else 256)
    assert EngineArgs().resolve_max_num_batched_tokens(device) == (16384 if large else 8192)
    server = EngineArgs(usage_context="api_server")
    assert (server.resolve_max_num_seqs(device), server.resolve_max_num_batched_tokens(device)) == (256, 8192)
    engine_process = EngineArgs(usage_context="engine_process")
    assert engine_process.resolve_max_num_seqs(device) == (512 if large else 256)
