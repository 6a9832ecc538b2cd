"""Beam-search bookkeeping of one request: pure logic, equal to Hugging Face transformers 5.24's
`GenerationMixin._beam_search` (generate(num_beams=k, do_sample=False, length_penalty=lp,
early_stopping=es, num_return_sequences=n)) for a batch of one.

The engine runs the model; this class picks the next live beams and keeps the finished hypotheses.
HF's rules, as read in transformers/generation/utils.py (5.24), and mirrored step for step here:

* Candidates: HF keeps the top K = max(2, 1 + #eos_ids) * num_beams (beam, token) pairs of
  cum_logprob + logprob over num_beams * V, computed in float32 with torch.topk (sorted, so ties
  break as torch does; we call the same op on the same shaped tensor).
* Running beams: the best num_beams of those K after adding -1e9 to the ones that hit a stopping
  criterion (eos, or max length). K is large enough that at least num_beams are not eos.
* Hypotheses: only eos candidates among the FIRST num_beams ranks of the K may finish; eos
  candidates at ranks >= num_beams are dropped (neither kept running nor finished).
  Score = cum_logprob / gen_len ** length_penalty, where gen_len is the number of GENERATED tokens,
  eos included (`cur_len + 1 - decoder_prompt_len`), not the total length as in older versions.
  The num_beams best (old hypotheses + new) are kept, via topk over their concatenation.
* At max length (max_new_tokens) every candidate hits the stopping criteria, so the top num_beams
  candidates of that last step join the hypotheses (ending in eos or not) and the search ends.
* Termination after each step (`_check_early_stop_heuristic`, `_beam_search_has_unfinished_sequences`):
  stop when all num_beams hypothesis slots are filled AND the best running beam's
  cum_logprob / L ** length_penalty <= the worst hypothesis score, with L = generated length so far,
  except early_stopping == "never" with length_penalty > 0, where L = max_tokens (the best case).
  early_stopping is True additionally stops as soon as the num_beams slots are filled.
* Output: the first num_return of the hypothesis slots, which topk keeps sorted best first.

Scores are compared in log space, where no length_penalty can overflow: HF's
`gen_len ** length_penalty` raises OverflowError in Python (or is inf in float32) once
length_penalty > ~709 / ln(gen_len). A score s = cum_logprob / L ** lp is <= 0, so it ranks as
its key (lp * ln(L) - ln(-cum_logprob)) / c = -ln(-s) / c, with c = max(1, |lp|): that orders
like s and stays finite for any finite lp. The reported score is -exp(-key * c), HF's value
wherever HF's is finite (0 or -inf where a float32 cannot hold it). An empty hypothesis slot
(HF's -1e9 placeholder) and HF's mask are -inf: any real hypothesis beats an empty slot, which
HF's -1e9 does not guarantee once scores fall below -1e9 (a negative lp on long outputs).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Union

import torch

_NEG = -1.0e9  # HF's "impossible" score, used both as placeholder and as a mask.


@dataclass
class Beam:
    token_ids: list[int]  # output tokens so far (prompt excluded)
    cum_logprob: float


@dataclass
class BeamChoice:
    parent: int  # index into the `beams` passed to step()
    token_id: int
    cum_logprob: float  # a float32 value, as HF accumulates in float32


@dataclass
class BeamResult:
    token_ids: list[int]  # includes the eos token when finished_by_eos, as HF's sequences do
    cum_logprob: float
    score: float  # cum_logprob / len(token_ids) ** length_penalty, float32 as HF's sequences_scores
    finished_by_eos: bool


class BeamSearchState:
    def __init__(self, beam_width: int, num_return: int, length_penalty: float,
                 early_stopping: Union[bool, str], max_tokens: int, eos_token_ids: set[int],
                 prompt_len: int):
        if beam_width < 1 or not 1 <= num_return <= beam_width:
            raise ValueError(f"need 1 <= num_return ({num_return}) <= beam_width ({beam_width})")
        self.beam_width = beam_width
        self.num_return = num_return
        self.length_penalty = length_penalty
        self.early_stopping = early_stopping
        self.max_tokens = max_tokens
        self.eos_token_ids = set(eos_token_ids)
        self.prompt_len = prompt_len  # kept for the engine; HF's lengths count generated tokens only
        self._eos = torch.tensor(sorted(self.eos_token_ids), dtype=torch.long)
        # HF: beams_to_keep = max(2, 1 + n_eos_tokens) * num_beams.
        self._k = max(2, 1 + len(self.eos_token_ids)) * beam_width
        # Hypothesis slots, as HF's `beam_scores` / `is_sent_finished`, ranked by keys (see the
        # module docstring): empty (-inf) at first.
        self._key_scale = max(1.0, abs(length_penalty))
        self._keys = torch.full((beam_width,), -math.inf, dtype=torch.float64)
        self._finished = torch.zeros(beam_width, dtype=torch.bool)
        self._hyps: list[Optional[BeamResult]] = [None] * beam_width
        self._num_generated = 0
        self._done = False

    @property
    def is_done(self) -> bool:
        return self._done

    def step(self, beams: list[Beam], logprobs: torch.Tensor) -> list[BeamChoice]:
        """One search step. `beams`: the live beams (first step: the single empty beam of the prompt),
        best first, i.e. in the order step() returned them (HF keeps that order; it matters only to
        break exact ties as HF does); `logprobs`: [len(beams), V] float32 log_softmax, any device.
        Returns the next live beams best first, or [] when the search is done."""
        if self._done:
            raise RuntimeError("beam search already finished")
        rows, vocab = logprobs.shape
        if rows != len(beams) or not 1 <= rows <= self.beam_width:
            raise ValueError(f"got {len(beams)} beams and {rows} logprob rows (beam_width {self.beam_width})")
        nb, first = self.beam_width, self._num_generated == 0
        logprobs = logprobs.detach().to(torch.float32)  # HF: log_softmax of float32 logits
        # HF always expands num_beams rows. On the first step rows 1.. are copies of the prompt with
        # score -1e9, so we add them as such (their candidates are real, with parent 0). Later, a row
        # is missing only if HF would run a masked (-1e9, already finished) beam there, which needs
        # fewer than num_beams non-eos candidates in the top K (impossible unless logprobs are -inf
        # or V is tiny); such rows cannot produce anything but -1e9 junk, which we never select.
        running = torch.full((nb,), _NEG, dtype=torch.float32)
        running[:rows] = torch.tensor([b.cum_logprob for b in beams], dtype=torch.float32)
        running = running.to(logprobs.device)
        if rows < nb:
            logprobs = torch.cat([logprobs, logprobs[:1].expand(nb - rows, vocab)], dim=0)
        acc = (logprobs + running[:, None]).reshape(-1)  # HF: log_probs + running_beam_scores[:, :, None]
        top_lp, top_idx = (t.cpu() for t in torch.topk(acc, k=min(self._k, acc.numel())))
        parents = (top_idx // vocab).tolist()
        tokens = top_idx % vocab
        valid = [p < rows or first for p in parents]
        parents = [p if p < rows else 0 for p in parents]

        gen_len = self._num_generated + 1  # HF: cur_len + 1 - decoder_prompt_len
        hit_eos = torch.isin(tokens, self._eos)
        at_max = gen_len >= self.max_tokens  # HF's MaxLengthCriteria: every candidate hits it
        hits = hit_eos | at_max

        # Next running beams (HF `_get_running_beams_for_next_iteration`): finished ones get -1e9.
        run_lp = top_lp + hits.to(torch.float32) * _NEG
        next_idx = torch.topk(run_lp, k=min(nb, run_lp.numel()))[1].tolist()
        best_running = run_lp[next_idx[0]]

        # New hypotheses (HF `_update_finished_beams`): only eos/max-length hits in the first
        # num_beams ranks count; their score uses the generated length, eos included.
        top_mask = torch.arange(top_lp.numel()) < nb
        just_finished = hits & top_mask & torch.tensor(valid)
        cand = self._score_keys(top_lp, gen_len)
        cand = cand.masked_fill(~just_finished, -math.inf)
        merged = torch.cat([self._keys, cand])
        keep = torch.topk(merged, k=nb)[1].tolist()
        old_hyps, old_fin = self._hyps, self._finished
        self._keys = merged[keep]
        self._hyps, fin = [], []
        for j in keep:
            if j < nb:
                self._hyps.append(old_hyps[j])
                fin.append(bool(old_fin[j]))
            else:
                c = j - nb
                if just_finished[c]:
                    p, t = parents[c], int(tokens[c])
                    self._hyps.append(BeamResult(beams[p].token_ids + [t], float(top_lp[c]),
                                                 self._score_from_key(cand[c]), bool(hit_eos[c])))
                    fin.append(True)
                else:
                    self._hyps.append(None)
                    fin.append(False)
        self._finished = torch.tensor(fin, dtype=torch.bool)
        self._num_generated = gen_len

        # Termination (HF `_check_early_stop_heuristic` + `_beam_search_has_unfinished_sequences`).
        if self.early_stopping == "never" and self.length_penalty > 0.0:
            hyp_len = self.max_tokens  # HF: max_length - decoder_prompt_len
        else:
            hyp_len = gen_len  # HF: cur_len - decoder_prompt_len, after cur_len += 1
        best_possible = self._score_keys(best_running.reshape(1), hyp_len)
        worst = torch.where(self._finished, self._keys.min(), torch.tensor(-math.inf, dtype=torch.float64))
        improvement_possible = bool(torch.any(best_possible > worst))
        all_full = bool(self._finished.all()) and self.early_stopping is True  # HF uses `is True`
        # at_max: every candidate hit a stopping criterion, so there is no valid continuation.
        if at_max or not improvement_possible or all_full:
            self._done = True
            return []
        return [BeamChoice(parents[c], int(tokens[c]), float(top_lp[c]))
                for c in next_idx if not hits[c] and valid[c]]

    def _score_keys(self, cum_logprobs: torch.Tensor, length: int) -> torch.Tensor:
        """The ranking keys (float64) of the scores cum_logprob / length ** lp: higher is better,
        as for the scores; a cum_logprob of 0 (a certain beam) is the best, +inf."""
        scale = self._key_scale
        # clamp: a sum of log-probabilities is <= 0; were rounding ever to make one positive, it
        # counts as certain instead of taking the log of a negative number (nan).
        neg_log = torch.log((-cum_logprobs.to(torch.float64)).clamp_min(0.0))
        return (self.length_penalty / scale) * math.log(length) - neg_log / scale

    def _score_from_key(self, key: torch.Tensor) -> float:
        """The score a key stands for, as a float32 value like HF's."""
        return float(torch.exp(-key * self._key_scale).neg().to(torch.float32))

    def final(self, beams: Optional[list[Beam]] = None) -> list[BeamResult]:
        """The best num_return hypotheses, best first, as HF's sequences[:num_return_sequences].

        When the search is done (the normal case) the live beams already joined the hypotheses if HF
        would have them join (at max length), so `beams` is ignored. If the engine must stop before
        (e.g. the context window is full), the live beams join now, scored at their current length,
        as HF does with sequences that hit its max length.
        """
        if not self._done and beams:
            nb = self.beam_width
            cum = torch.tensor([b.cum_logprob for b in beams], dtype=torch.float32)
            cand = torch.cat([self._score_keys(cum[i:i + 1], max(len(b.token_ids), 1))
                              for i, b in enumerate(beams)])
            merged = torch.cat([self._keys, cand])
            keep = torch.topk(merged, k=nb)[1].tolist()
            hyps = [self._hyps[j] if j < nb else
                    BeamResult(list(beams[j - nb].token_ids), float(cum[j - nb]),
                               self._score_from_key(cand[j - nb]), False) for j in keep]
            self._keys, self._hyps = merged[keep], hyps
            self._finished = torch.tensor([h is not None for h in hyps])
            self._done = True
        return [h for h in self._hyps[: self.num_return] if h is not None]

