"""Specification of the sampler: seeded reproducibility, distributions, filters, penalties, logprobs."""

import pytest
import torch

from aserve.sampling_params import SamplingParams
from aserve.worker.logits_processors import apply_min_p, apply_penalties, apply_top_k_top_p
from aserve.worker.sampler import Sampler, SamplingMetadata, logprobs_for_tokens

V = 8


def metadata(params, generators=None, prompts=None, outputs=None):
    n = len(params)
    return SamplingMetadata.build(params, generators or [None] * n, prompts or [[] for _ in range(n)],
                                  outputs or [[] for _ in range(n)])


def gen(seed):
    return torch.Generator().manual_seed(seed)


def sample(logits, params, **kwargs):
    return Sampler()(logits, metadata(params, **kwargs))


def empirical(tokens, vocab_size=V):
    return torch.bincount(torch.tensor(tokens), minlength=vocab_size).double() / len(tokens)


# ------------------------------------------------------------------ reproducibility
def test_seeded_row_reproduces_alone_and_at_another_position_in_another_batch():
    torch.manual_seed(0)
    row = torch.randn(1, 50)
    g_alone, g_mixed = gen(7), gen(7)
    s1, s2 = Sampler(seed=1), Sampler(seed=2)
    alone = [s1(row, metadata([SamplingParams(seed=7)], [g_alone])).sampled_token_ids[0] for _ in range(20)]
    params = [SamplingParams(temperature=0.5), SamplingParams(top_k=3), SamplingParams(seed=7),
              SamplingParams(temperature=0), SamplingParams(seed=99)]
    mixed = [s2(torch.cat([torch.randn(2, 50), row, torch.randn(2, 50)]),
                metadata(params, [None, None, g_mixed, None, gen(step)])).sampled_token_ids[2] for step in range(20)]
    assert alone == mixed
    assert len(set(alone)) > 1  # it really sampled, not a degenerate distribution


def test_rows_sharing_a_generator_draw_from_it_in_turn():
    torch.manual_seed(1)
    row = torch.randn(1, 30)
    g = gen(3)
    together = Sampler()(row.expand(3, 30), metadata([SamplingParams(n=3, seed=3)] * 3, [g] * 3))
    g = gen(3)
    one_by_one = [Sampler()(row, metadata([SamplingParams(seed=3)], [g])).sampled_token_ids[0] for _ in range(3)]
    assert together.sampled_token_ids == one_by_one


# ------------------------------------------------------------------ distributions
@pytest.mark.parametrize("temperature", [0.6, 1.7])
def test_seeded_samples_follow_softmax_of_logits_over_temperature(temperature):
    logits = torch.tensor([[1.0, 0.5, 0.0, -0.5, 2.0, -1.0, 0.3, 1.2]])
    draws = 20000
    g = gen(11)
    out = Sampler()(logits.expand(draws, V), metadata([SamplingParams(temperature=temperature, seed=11)] * draws,
                                                       [g] * draws))
    expected = torch.softmax(logits[0].double() / temperature, dim=-1)
    # Sampling noise alone gives a total-variation distance of about 0.007 here.
    assert 0.5 * (empirical(out.sampled_token_ids) - expected).abs().sum() < 0.02


def test_unseeded_rows_follow_softmax_of_logits():
    logits = torch.tensor([[0.2, -0.3, 1.5, 0.0, 0.7, -2.0, 1.0, 0.1]])
    draws = 20000
    out = Sampler(seed=5)(logits.expand(draws, V), metadata([SamplingParams(temperature=0.9)] * draws))
    expected = torch.softmax(logits[0].double() / 0.9, dim=-1)
    assert 0.5 * (empirical(out.sampled_token_ids) - expected).abs().sum() < 0.02


# ------------------------------------------------------------------ greedy and filters
def test_top_k_1_equals_greedy():
    torch.manual_seed(2)
    logits = torch.randn(16, 100)
    top1 = sample(logits, [SamplingParams(top_k=1, temperature=1.3)] * 16).sampled_token_ids
    greedy = sample(logits, [SamplingParams(temperature=0)] * 16).sampled_token_ids
    assert top1 == greedy == logits.argmax(-1).tolist()


def test_mixed_batch_greedy_rows_take_argmax():
    torch.manual_seed(3)
    logits = torch.randn(6, 40)
    params = [SamplingParams(temperature=0 if i % 2 else 1.0) for i in range(6)]
    out = sample(logits, params).sampled_token_ids
    assert [out[i] for i in (1, 3, 5)] == logits.argmax(-1)[1::2].tolist()


def test_top_k_masks_all_but_the_k_largest():
    logits = torch.tensor([[3.0, 1.0, 2.0, 0.0], [3.0, 1.0, 2.0, 0.0]])
    out = apply_top_k_top_p(logits.clone(), [2, -1], None)
    assert out[0].tolist() == [3.0, float("-inf"), 2.0, float("-inf")]
    assert out[1].tolist() == logits[1].tolist()


def test_top_p_keeps_smallest_set_reaching_p():
    probs = torch.tensor([0.1, 0.5, 0.05, 0.3, 0.05])
    logits = probs.log().unsqueeze(0).repeat(3, 1)
    out = apply_top_k_top_p(logits.clone(), None, [0.75, 0.85, 0.05])
    kept = [torch.isfinite(row).nonzero().flatten().tolist() for row in out]
    assert kept == [[1, 3], [0, 1, 3], [1]]  # 0.5 < 0.75 <= 0.8; 0.8 < 0.85 <= 0.9; always >= 1


def test_top_p_is_applied_after_top_k_renormalisation():
    probs = torch.tensor([0.4, 0.3, 0.2, 0.1])
    out = apply_top_k_top_p(probs.log().unsqueeze(0), [2], [0.6])
    # after top-2 the distribution is 4/7, 3/7: 4/7 < 0.6, so both stay
    assert torch.isfinite(out[0]).tolist() == [True, True, False, False]


def test_top_p_excluded_tokens_are_never_sampled():
    probs = torch.tensor([0.45, 0.3, 0.1, 0.05, 0.04, 0.03, 0.02, 0.01])
    draws = 5000
    out = sample(probs.log().expand(draws, V), [SamplingParams(top_p=0.7)] * draws).sampled_token_ids
    assert set(out) == {0, 1}


def test_min_p_drops_tokens_below_fraction_of_max_prob():
    probs = torch.tensor([0.5, 0.26, 0.24, 0.0])
    out = apply_min_p(probs.log().unsqueeze(0), [0.5])
    assert torch.isfinite(out[0]).tolist() == [True, True, False, False]
    draws = 5000
    logits = torch.tensor([0.5, 0.26, 0.24, 0.0, 0.0, 0.0, 0.0, 0.0]).clamp_min(1e-9).log()
    sampled = sample(logits.expand(draws, V), [SamplingParams(min_p=0.5)] * draws).sampled_token_ids
    assert set(sampled) == {0, 1}


# ------------------------------------------------------------------ logits processing
def test_repetition_penalty_divides_positive_and_multiplies_negative_seen_logits():
    logits = torch.tensor([[2.0, -1.0, 3.0, -4.0, 5.0]])
    # seen: 0 (prompt), 1 (output), 3 (prompt and output); unseen 2 and 4 untouched
    out = apply_penalties(logits, [[0, 3]], [[1, 3, 3]], [2.0], [0.0], [0.0])
    assert out.tolist() == [[1.0, -2.0, 3.0, -8.0, 5.0]]


def test_frequency_penalty_subtracts_penalty_times_output_count_only():
    logits = torch.tensor([[1.0, 1.0, 1.0, 1.0]])
    out = apply_penalties(logits, [[0, 0, 0]], [[1, 2, 2, 2]], [1.0], [0.5], [0.0])
    assert out.tolist() == [[1.0, 0.5, -0.5, 1.0]]


def test_presence_penalty_subtracts_once_for_tokens_in_output_only():
    logits = torch.tensor([[1.0, 1.0, 1.0, 1.0]])
    out = apply_penalties(logits, [[0]], [[1, 2, 2, 2]], [1.0], [0.0], [-0.75])
    assert out.tolist() == [[1.0, 1.75, 1.75, 1.0]]


def test_penalties_leave_other_rows_of_the_batch_untouched():
    torch.manual_seed(4)
    logits = torch.randn(3, 10)
    top = logits.argmax(-1).tolist()
    params = [SamplingParams(temperature=0), SamplingParams(temperature=0, frequency_penalty=1.0),
              SamplingParams(temperature=0)]
    out = sample(logits, params, outputs=[[top[0]] * 50, [top[1]] * 50, [top[2]] * 50])
    assert out.sampled_token_ids[0] == top[0] and out.sampled_token_ids[2] == top[2]
    assert out.sampled_token_ids[1] != top[1]


def test_greedy_with_penalties_takes_argmax_of_penalised_logits():
    logits = torch.tensor([[4.0, 3.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    out = sample(logits, [SamplingParams(temperature=0, repetition_penalty=2.0)], prompts=[[0]])
    assert out.sampled_token_ids == [1]  # 4 / 2 = 2 < 3
    out = sample(logits, [SamplingParams(temperature=0, presence_penalty=1.5)], prompts=[[0]])
    assert out.sampled_token_ids == [0]  # presence counts output tokens only
    out = sample(logits, [SamplingParams(temperature=0, presence_penalty=1.5)], outputs=[[0]])
    assert out.sampled_token_ids == [1]


def test_logit_bias_is_added_before_sampling():
    logits = torch.zeros(2, V)
    params = [SamplingParams(temperature=0, logit_bias={5: 3.0, 2: 1.0}),
              SamplingParams(temperature=0.8, logit_bias={6: 100.0, 999: 5.0})]  # 999: out of vocab, skipped
    assert sample(logits, params).sampled_token_ids == [5, 6]


def test_min_tokens_suppresses_stop_ids_until_reached():
    logits = torch.tensor([[0.0, 0.0, 9.0, 8.0, 0.0, 0.0, 0.0, 0.0]])
    params = SamplingParams(temperature=0, min_tokens=2, stop_token_ids=[3])
    params.all_stop_token_ids = {2, 3}  # the engine adds EOS (2) to the request's stop ids
    assert sample(logits, [params], outputs=[[7]]).sampled_token_ids == [0]
    assert sample(logits, [params], outputs=[[7, 7]]).sampled_token_ids == [2]


def test_sampler_never_modifies_the_callers_logits():
    torch.manual_seed(5)
    logits = torch.randn(4, V)
    before = logits.clone()
    params = [SamplingParams(logit_bias={1: 2.0}, repetition_penalty=1.5, top_p=0.5, min_p=0.1, top_k=3,
                             min_tokens=3, stop_token_ids=[0], logprobs=2) for _ in range(4)]
    sample(logits, params, outputs=[[1, 2]] * 4)
    assert torch.equal(logits, before)


# ------------------------------------------------------------------ logprobs
def test_logprobs_are_raw_log_softmax_with_sampled_token_and_ranks():
    logits = torch.tensor([[3.0, 1.0, 2.0, 0.0, -1.0, 0.5, -2.0, 1.5]])
    raw = torch.log_softmax(logits, -1)[0]
    # bias forces token 6 (rank 8 in the raw distribution); temperature must not change logprobs
    params = SamplingParams(temperature=0.3, logprobs=2, logit_bias={6: 100.0}, repetition_penalty=1.3)
    out = sample(logits, [params], prompts=[[0]])
    assert out.sampled_token_ids == [6]
    entry = out.logprobs[0]
    assert list(entry) == [0, 2, 6]  # top-2 in rank order, then the sampled token: k + 1 entries
    assert [entry[t].rank for t in (0, 2, 6)] == [1, 2, 8]
    for t in (0, 2, 6):
        assert entry[t].logprob == pytest.approx(float(raw[t]), abs=1e-6)
        assert entry[t].decoded_token is None


def test_logprobs_has_k_entries_when_sampled_token_is_in_top_k_and_none_for_rows_not_asking():
    logits = torch.tensor([[3.0, 1.0, 2.0, 0.0, -1.0, 0.5, -2.0, 1.5]] * 3)
    params = [SamplingParams(temperature=0, logprobs=3), SamplingParams(temperature=0),
              SamplingParams(temperature=0, logprobs=0)]
    out = sample(logits, params)
    assert list(out.logprobs[0]) == [0, 2, 7]
    assert out.logprobs[1] is None
    assert list(out.logprobs[2]) == [0] and out.logprobs[2][0].rank == 1
    assert sample(logits, [SamplingParams(temperature=0)] * 3).logprobs is None


def test_logprobs_for_tokens_ranks_count_strictly_greater_logprobs():
    logprobs = torch.log_softmax(torch.tensor([[1.0, 2.0, 2.0, 0.0, 2.0], [0.0, 1.0, 2.0, 3.0, 4.0]]), -1)
    out = logprobs_for_tokens(logprobs, [3, 0], num_top=2)
    assert {t: lp.rank for t, lp in out[0].items()} in ({1: 1, 2: 1, 3: 5}, {1: 1, 4: 1, 3: 5}, {2: 1, 4: 1, 3: 5})
    assert {t: lp.rank for t, lp in out[1].items()} == {4: 1, 3: 2, 0: 5}
    assert out[1][0].logprob == pytest.approx(float(logprobs[1, 0]))


# ------------------------------------------------------------------ metadata
def test_metadata_flags_describe_the_batch():
    md = metadata([SamplingParams(temperature=0, top_k=5, logprobs=1),
                   SamplingParams(top_p=0.9, frequency_penalty=0.1, logprobs=4)])
    assert (md.all_greedy, md.all_random, md.any_penalties, md.any_top_k, md.any_top_p) == (
        False, False, True, False, True)
    assert md.max_num_logprobs == 4 and not md.any_min_tokens and not md.any_logit_bias
    assert metadata([SamplingParams(temperature=0)]).all_greedy


@pytest.mark.parametrize("top_p", [1.0, 0.8])   # the one-pass path and the filtering path
def test_a_reused_metadata_makes_its_row_tensors_once_and_samples_as_a_fresh_one(top_p):
    # A decode step's metadata serves step after step (engine/row_planner.py): its per-row
    # tensors are made at the first step and reused, with the same draws as fresh metadata.
    torch.manual_seed(4)
    params = [SamplingParams(temperature=0.7, top_p=top_p, seed=1), SamplingParams(temperature=0),
              SamplingParams(temperature=1.3, top_p=top_p, seed=2)]
    reused = metadata(params, [gen(1), None, gen(2)])
    fresh_generators = [gen(1), None, gen(2)]
    steps = [torch.randn(3, 40) for _ in range(6)]
    sampler = Sampler()
    kept = [sampler(steps[0], reused).sampled_token_ids]
    made = dict(reused._device_tensors)
    kept += [sampler(logits, reused).sampled_token_ids for logits in steps[1:]]
    assert made and reused._device_tensors.keys() == made.keys()
    assert all(reused._device_tensors[key] is tensor for key, tensor in made.items())
    sampler = Sampler()
    again = [sampler(logits, metadata(params, fresh_generators)).sampled_token_ids for logits in steps]
    assert kept == again
    assert reused.temperatures(torch.device("cpu")).tolist() == pytest.approx([0.7, 0.0, 1.3])
    assert reused.random_rows == [0, 2]


def test_top_k_with_top_p_matches_whether_or_not_every_row_has_a_top_k():
    torch.manual_seed(6)
    logits = torch.randn(4, 64)
    all_rows = apply_top_k_top_p(logits.clone(), [5, 10, 3, 64], [0.5, 0.9, 0.99, 0.3])
    # a fifth row without top-k forces the full-sort path for the same first four rows
    mixed = apply_top_k_top_p(torch.cat([logits, logits[:1]]), [5, 10, 3, 64, -1], [0.5, 0.9, 0.99, 0.3, 0.5])
    assert torch.equal(all_rows, mixed[:4])
    assert (torch.isfinite(all_rows).sum(-1) <= torch.tensor([5, 10, 3, 64])).all()


# ------------------------------------------------------------------ accelerator (skipped on CPU-only hosts)
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@cuda
@pytest.mark.parametrize("generator_device", ["cuda", "cpu"])
def test_cuda_seeded_row_reproduces_at_another_position(generator_device):
    row = torch.randn(1, 1000, device="cuda")

    def run(batch_rows, position, seed_others):
        g = torch.Generator(device=generator_device).manual_seed(7)
        tokens = []
        for _ in range(10):
            batch = torch.randn(batch_rows, 1000, device="cuda")
            batch[position] = row[0]
            gens = [torch.Generator(device="cuda").manual_seed(seed_others) for _ in range(batch_rows)]
            gens[position] = g
            out = Sampler()(batch, metadata([SamplingParams(top_p=0.95)] * batch_rows, gens))
            tokens.append(out.sampled_token_ids[position])
        return tokens

    assert run(1, 0, 0) == run(5, 3, 1) == run(64, 40, 2)


@cuda
def test_cuda_processing_and_logprobs_match_cpu():
    torch.manual_seed(8)
    logits = torch.randn(32, 500)
    params = [SamplingParams(temperature=0, repetition_penalty=1.3, frequency_penalty=0.5, presence_penalty=0.2,
                             logit_bias={3: 2.0}, logprobs=5, min_tokens=4, stop_token_ids=[7]) for _ in range(32)]
    outputs = [torch.randint(0, 500, (i,)).tolist() for i in range(32)]
    prompts = [torch.randint(0, 500, (20,)).tolist() for _ in range(32)]
    cpu = sample(logits, params, prompts=prompts, outputs=outputs)
    gpu = sample(logits.cuda(), params, prompts=prompts, outputs=outputs)
    assert cpu.sampled_token_ids == gpu.sampled_token_ids
    for a, b in zip(cpu.logprobs, gpu.logprobs):
        assert list(a) == list(b) and [x.rank for x in a.values()] == [x.rank for x in b.values()]
        assert [x.logprob for x in a.values()] == pytest.approx([x.logprob for x in b.values()], abs=1e-5)


@cuda
def test_cuda_samples_follow_softmax():
    logits = torch.tensor([[1.0, 0.5, 0.0, -0.5, 2.0, -1.0, 0.3, 1.2]], device="cuda")
    out = Sampler()(logits.expand(20000, V), metadata([SamplingParams(temperature=0.8)] * 20000))
    expected = torch.softmax(logits[0].double().cpu() / 0.8, dim=-1)
    assert 0.5 * (empirical(out.sampled_token_ids) - expected).abs().sum() < 0.02
