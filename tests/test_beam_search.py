"""BeamSearchState against Hugging Face transformers' own beam search (generate(num_beams=...)).

A tiny random Llama is the oracle: HF's generate() and a loop that drives BeamSearchState with the
same model must return the same sequences (eos included, HF's padding stripped) and scores.
generate() runs with use_cache=False and our loop forwards the same [num_beams, len] batch HF does
(the first step pads with copies of the prompt, as HF's expanded input), so logits agree bitwise and
near-ties cannot make the two disagree for numerical reasons.
"""

import math

import pytest
import torch

from aserve.engine.beam_search import Beam, BeamSearchState

transformers = pytest.importorskip("transformers")

PAD = 3


def _model(vocab=96, seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=4, initializer_range=0.2,
                                   max_position_embeddings=128, pad_token_id=PAD, bos_token_id=None,
                                   eos_token_id=None)
    return transformers.LlamaForCausalLM(cfg).eval()


def _forward(model, seqs, rows):
    batch = seqs + [seqs[0]] * (rows - len(seqs))  # HF always forwards num_beams rows
    with torch.no_grad():
        ids = torch.tensor(batch)
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[:, -1, :].float()
    return torch.log_softmax(logits, dim=-1)[: len(seqs)]


def _greedy(model, prompt, steps):
    seq = list(prompt)
    for _ in range(steps):
        seq.append(int(_forward(model, [seq], 1)[0].argmax()))
    return seq[len(prompt):]


def _ours(model, prompt, k, n, lp, es, m, eos, proc=None):
    state = BeamSearchState(k, n, lp, es, m, set(eos), len(prompt))
    beams, steps = [Beam([], 0.0)], 0
    while True:
        logprobs = _forward(model, [prompt + b.token_ids for b in beams], k)
        if proc is not None:
            logprobs = proc(None, logprobs)
        choices = state.step(beams, logprobs)
        steps += 1
        assert steps <= m
        if not choices:
            assert state.is_done
            break
        assert not state.is_done and len(choices) <= k
        beams = [Beam(beams[c.parent].token_ids + [c.token_id], c.cum_logprob) for c in choices]
    return state.final(beams)


def _hf(model, prompt, k, n, lp, es, m, eos, proc=None):
    ids = torch.tensor([prompt])
    procs = transformers.LogitsProcessorList([proc] if proc is not None else [])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), num_beams=k,
                             num_return_sequences=n, do_sample=False, length_penalty=lp, early_stopping=es,
                             max_new_tokens=m, eos_token_id=list(eos) or None, pad_token_id=PAD,
                             use_cache=False, return_dict_in_generate=True, output_scores=True,
                             logits_processor=procs)
    return out.sequences[:, len(prompt):].tolist(), out.sequences_scores.tolist()


def _compare(model, prompt, k, n, lp, es, m, eos, proc=None):
    ours = _ours(model, prompt, k, n, lp, es, m, eos, proc)
    seqs, scores = _hf(model, prompt, k, n, lp, es, m, eos, proc)
    assert len(ours) == n == len(seqs)
    # HF fills unused positions with `pad_token_id or eos_token_id[0]` (or -1 without eos).
    fill = (PAD or eos[0]) if eos else -1
    for r, seq, score in zip(ours, seqs, scores):
        assert r.token_ids + [fill] * (len(seq) - len(r.token_ids)) == seq, (r, seq)
        assert r.score == pytest.approx(score, rel=1e-6, abs=1e-6)
        assert r.finished_by_eos == (r.token_ids[-1] in eos)
        assert r.score == pytest.approx(r.cum_logprob / len(r.token_ids) ** lp, rel=1e-5)
        if not r.finished_by_eos:
            assert len(r.token_ids) == m  # only max length ends a hypothesis without eos
    assert [r.score for r in ours] == sorted((r.score for r in ours), reverse=True)
    return ours


MODEL = None


def _shared_model():
    global MODEL
    if MODEL is None:
        MODEL = _model()
    return MODEL


PROMPTS = [[5, 17, 42, 8], [60, 2, 33], [11, 11, 90, 7, 45, 23]]


@pytest.mark.parametrize("prompt", PROMPTS)
@pytest.mark.parametrize("k,n", [(2, 2), (4, 1), (4, 3)])
@pytest.mark.parametrize("lp", [0.0, 1.0, 2.0, -0.5])
@pytest.mark.parametrize("es", [True, False, "never"])
def test_matches_hf_with_early_eos(prompt, k, n, lp, es):
    model = _shared_model()
    # eos = a token the model generates greedily soon, so hypotheses finish early and often.
    eos = [_greedy(model, prompt, 3)[1]]
    _compare(model, prompt, k, n, lp, es, 10, eos)


@pytest.mark.parametrize("prompt", PROMPTS)
@pytest.mark.parametrize("es", [True, False, "never"])
@pytest.mark.parametrize("lp", [1.0, -0.5])
def test_matches_hf_with_two_eos_ids(prompt, es, lp):
    # Two eos ids widen the candidate set to K = 3 * num_beams.
    model = _shared_model()
    g = _greedy(model, prompt, 4)
    eos = [g[0], g[2]] if g[0] != g[2] else [g[0], (g[0] + 1) % 96]
    _compare(model, prompt, 4, 3, lp, es, 8, eos)


@pytest.mark.parametrize("prompt", PROMPTS)
@pytest.mark.parametrize("k", [2, 4])
def test_matches_hf_with_first_token_eos(prompt, k):
    # The greedy first token is eos: the best first-step candidate finishes at length 1.
    model = _shared_model()
    eos = [_greedy(model, prompt, 1)[0]]
    _compare(model, prompt, k, k, 1.0, False, 6, eos)


@pytest.mark.parametrize("prompt", PROMPTS)
@pytest.mark.parametrize("es", [True, False, "never"])
def test_matches_hf_without_eos(prompt, es):
    # No eos (ignore_eos): only max length ends the search; every result has max_tokens tokens.
    model = _shared_model()
    ours = _compare(model, prompt, 4, 4, 1.0, es, 5, [])
    assert all(len(r.token_ids) == 5 and not r.finished_by_eos for r in ours)


@pytest.mark.parametrize("es", [True, False, "never"])
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("vocab", [4, 5])
def test_matches_hf_tiny_vocab(es, seed, vocab):
    # V < K=8: HF's first step also draws candidates from its -1e9 dummy copies of the prompt; with
    # V=4 one of them (score -1e9) even becomes a running beam, whose parent is the prompt.
    model = _model(vocab=vocab, seed=seed)
    prompt = [1, 3, 2]
    eos = [_greedy(model, prompt, 2)[1]]
    _compare(model, prompt, 4, 2, 1.0, es, 6, eos)


class _BoostEos:
    """A logits processor (HF applies it to the log-probs) that puts every eos id on top of every beam
    (by lowering the other tokens: scores stay negative, so finished hypotheses don't end the search)."""

    def __init__(self, eos):
        self.eos = eos

    def __call__(self, input_ids, scores):
        keep = scores[:, self.eos].clone()
        scores = scores - 8.0
        scores[:, self.eos] = keep
        return scores


@pytest.mark.parametrize("es,lp", [("never", 1.0), ("never", 2.0), (False, 1.0), (True, 0.0)])
@pytest.mark.parametrize("k", [2, 4])
def test_matches_hf_when_eos_crowd_the_top(es, lp, k):
    # With 2 eos ids boosted, from the 2nd step on the top 2*k candidates are all eos: only HF's
    # K = 3*k candidates leave k beams running, and only the eos at ranks < k may finish. The search
    # goes on only with "never" and lp > 0, which rates running beams at max length.
    model = _shared_model()
    _compare(model, PROMPTS[1], k, k, lp, es, 7, [9, 50], proc=_BoostEos([9, 50]))


@pytest.mark.parametrize("m", [1, 2])
def test_max_tokens_short(m):
    model = _shared_model()
    prompt = PROMPTS[0]
    _compare(model, prompt, 4, 4, 1.0, False, m, [_greedy(model, prompt, 1)[0]])


def test_final_before_done_joins_live_beams():
    # The engine may have to stop early (context full): live beams join, scored at their length.
    state = BeamSearchState(2, 2, 1.0, False, 10, {0}, 3)
    lp = torch.log_softmax(torch.tensor([[0.0, 3.0, 2.0, 1.0]]), dim=-1)
    choices = state.step([Beam([], 0.0)], lp)
    assert [(c.parent, c.token_id) for c in choices] == [(0, 1), (0, 2)]
    beams = [Beam([c.token_id], c.cum_logprob) for c in choices]
    res = state.final(beams)
    assert [r.token_ids for r in res] == [[1], [2]] and state.is_done
    assert res[0].score == pytest.approx(float(lp[0, 1]))
    with pytest.raises(RuntimeError):
        state.step(beams, lp.expand(2, 4))


@pytest.mark.parametrize("lp", [1e308, 800.0, -800.0, -1e308])
def test_an_extreme_length_penalty_ranks_in_log_space_without_overflow(lp):
    # HF's L ** lp overflows here (OverflowError at 800 from L = 3); the search must finish and
    # rank the hypotheses as their exact scores cum_logprob / L ** lp would.
    model = _shared_model()
    prompt = PROMPTS[0]
    eos = [_greedy(model, prompt, 3)[1]]
    ours = _ours(model, prompt, 4, 4, lp, "never", 10, eos)
    assert len(ours) == 4

    def exact_key(r):  # -ln(-score) / |lp|: higher is better, like the score, and finite
        return math.copysign(1.0, lp) * math.log(len(r.token_ids)) - math.log(-r.cum_logprob) / abs(lp)

    keys = [exact_key(r) for r in ours]
    assert keys == sorted(keys, reverse=True)
    lengths = [len(r.token_ids) for r in ours]
    # A huge positive penalty favours length above all, a huge negative one brevity.
    assert lengths[0] == (max(lengths) if lp > 0 else min(lengths))
    assert all(r.score <= 0.0 for r in ours)  # 0 or -inf where a float32 cannot hold it, never nan
