"""The warm-up policy of the decode graphs' capture (ASERVE_GRAPH_WARMUP, worker/cuda_graphs.py):
a kernel's one-time set-up is refused inside a capture (GPU), captures taken after fewer eager
runs replay the same tokens (GPU), and the setting is checked (CPU)."""

from __future__ import annotations

import uuid

import pytest
import torch

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")


@cuda
@pytest.mark.cuda
def test_loading_a_module_during_a_capture_is_refused_and_the_next_capture_works():
    from aserve.cuda.compiler import SetUpDuringCapture, load_module

    never_loaded = [f"-DASERVE_TEST_ONLY_{uuid.uuid4().hex}=1"]   # a module no test loaded before
    x = torch.randn(1000, device="cuda")
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(SetUpDuringCapture, match="graph_inputs.cu"):
        with torch.cuda.graph(graph):
            y = x * 2
            load_module("graph_inputs.cu", never_loaded, torch.cuda.current_device())
    del graph, y
    assert not torch.cuda.is_current_stream_capturing()
    load_module("graph_inputs.cu", never_loaded, torch.cuda.current_device())   # eagerly: allowed
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        z = x * 3
    x.copy_(torch.randn(1000, device="cuda"))
    graph.replay()
    torch.testing.assert_close(z, x * 3)


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("policy", ["needed", "each"])
def test_graphs_give_the_same_tokens_as_eager_under_either_warm_up(llm_cache, monkeypatch, policy):
    """ASERVE_GRAPH_WARMUP=needed (the default: fewer eager runs than sizes) and each (one per
    size) against the same model eager (tests/test_cuda_engine.py holds the graphs to
    transformers)."""
    from aserve import SamplingParams
    from hf_reference import random_prompts

    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    prompts = random_prompts(53, [3, 17, 40, 9, 1, 26, 5, 12, 33])
    monkeypatch.setenv("ASERVE_GRAPH_WARMUP", policy)
    # max_num_seqs makes each policy's engine its own (llm_cache shares engines of equal settings).
    with_graphs = llm_cache("llama", max_num_seqs=40 if policy == "needed" else 41)
    graphs = with_graphs.engine.runner.decode_graphs
    assert len(graphs.sizes) == len(graphs.graphs)
    if policy == "needed":
        assert 1 <= graphs.num_warmups < len(graphs.sizes)
    else:
        assert graphs.num_warmups == len(graphs.sizes)
    replays = graphs.num_replays
    got = [o.outputs[0].token_ids for o in with_graphs.generate(prompts, params, use_tqdm=False)]
    assert graphs.num_replays > replays
    eager = llm_cache("llama", enforce_eager=True)
    assert got == [o.outputs[0].token_ids for o in eager.generate(prompts, params, use_tqdm=False)]


@pytest.mark.parametrize("value, policy", [(None, "needed"), ("each", "each"), ("needed", "needed")])
def test_only_refused_captures_are_warmed_up_by_default(monkeypatch, value, policy):
    from aserve.worker.cuda_graphs import graph_warmup_policy

    if value is None:
        monkeypatch.delenv("ASERVE_GRAPH_WARMUP", raising=False)
    else:
        monkeypatch.setenv("ASERVE_GRAPH_WARMUP", value)
    assert graph_warmup_policy() == policy


def test_graph_warmup_setting_is_checked(monkeypatch):
    from aserve.worker.cuda_graphs import graph_warmup_policy

    monkeypatch.setenv("ASERVE_GRAPH_WARMUP", "some")
    with pytest.raises(ValueError, match="ASERVE_GRAPH_WARMUP"):
        graph_warmup_policy()


def test_set_up_outside_a_capture_is_allowed():
    from aserve.cuda.compiler import refuse_set_up_during_capture

    refuse_set_up_during_capture("anything")   # no capture here (and no GPU in CI): nothing raised


def _capture_turns(sizes, refused_here, refused_elsewhere, warm_each=False):
    """capture_in_turn over sizes as one rank sees it: its own captures refused at
    refused_here, another rank's at refused_elsewhere (the agreement is a minimum over ranks)."""
    from aserve.worker.cuda_graphs import capture_in_turn

    events = []

    def try_capture(batch):
        events.append(("try", batch))
        return batch not in refused_here

    def agree(captured):
        batch = events[-1][1] if events and events[-1][0] == "try" else None
        return captured and batch not in refused_elsewhere

    capture_in_turn(sizes, try_capture, lambda batch: events.append(("retake", batch)), agree, warm_each)
    return events


def test_captures_are_tried_after_the_first_size_and_retaken_where_refused():
    assert _capture_turns([32, 16, 8], refused_here={8}, refused_elsewhere=set()) == [
        ("retake", 32), ("try", 16), ("try", 8), ("retake", 8)]


def test_a_size_refused_on_another_rank_is_retaken_on_every_rank():
    """The retake's eager warm-up runs the forward's collectives: a rank whose own capture
    worked must join it, or the ranks would wait on each other for ever."""
    assert _capture_turns([32, 16, 8], refused_here=set(), refused_elsewhere={16}) == [
        ("retake", 32), ("try", 16), ("retake", 16), ("try", 8)]


def test_each_policy_retakes_every_size_without_trying():
    assert _capture_turns([32, 16, 8], set(), set(), warm_each=True) == [
        ("retake", 32), ("retake", 16), ("retake", 8)]
