"""SamplingParams: how one request is decoded, with vLLM's field names and defaults.

Validation lives here, at the door: every bad value raises ValueError naming the field and
the allowed range, so that no bad value ever reaches the engine's batched tensors.
"""

from __future__ import annotations

import copy
import enum
import math
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from aserve.structured_output.params import StructuredOutputsParams

# Below this temperature sampling is treated as greedy, as vLLM does, to avoid dividing by ~0.
_GREEDY_EPS = 1e-5
# vLLM's (and OpenAI's) temperature range.
MAX_TEMPERATURE = 2.0
# vLLM only asks for a finite positive repetition penalty; the sampler divides and multiplies
# float32 logits by it, where 1e308 is inf and 1e-300 is 0: this range keeps every logit finite
# and is far wider than any useful penalty (HF and vLLM examples use 1.0 to 2.0).
REPETITION_PENALTY_RANGE = (0.01, 100.0)
# Stop strings are checked against every new token of every sample: their number and length
# bound that work (10k stop strings with n=256 held the event loop 1.4 s a step). OpenAI allows
# 4 strings; vLLM sets no limit; these bounds leave room for any chat template's stop words.
MAX_STOP_STRINGS = 32
MAX_STOP_STRING_CHARS = 256
# Seeds are int64, as in vLLM's API (torch generators take no more).
_INT64_RANGE = (-(1 << 63), (1 << 63) - 1)
_BOOL_FIELDS = ("use_beam_search", "include_stop_str_in_output", "ignore_eos", "detokenize",
                "skip_special_tokens", "spaces_between_special_tokens")


class RequestOutputKind(enum.IntEnum):
    """Which outputs a request reports while it runs (vLLM's): every state so far (CUMULATIVE),
    only what is new since its last output (DELTA), or nothing before its final output
    (FINAL_ONLY; the server's non-streaming requests, which wait for the end anyway)."""

    CUMULATIVE = 0
    DELTA = 1
    FINAL_ONLY = 2


@dataclass
class SamplingParams:
    """Decoding settings of one request (see vLLM's SamplingParams for the meaning of each)."""

    n: int = 1
    best_of: Optional[int] = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    seed: Optional[int] = None
    use_beam_search: bool = False
    length_penalty: float = 1.0
    early_stopping: Union[bool, str] = False
    stop: Optional[Union[str, list[str]]] = None
    stop_token_ids: Optional[list[int]] = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    max_tokens: Optional[int] = 16
    min_tokens: int = 0
    logprobs: Optional[int] = None
    prompt_logprobs: Optional[int] = None
    # vLLM's: the prompt's logprobs from logits divided by this (None: the raw distribution).
    prompt_logprobs_temperature: Optional[float] = None
    # vLLM's: False leaves every output's text empty (token ids only); stop strings need text.
    detokenize: bool = True
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    logit_bias: Optional[dict[int, float]] = None
    # The output must match a JSON schema, regex, choice or grammar (a StructuredOutputsParams
    # or a mapping of its fields); guided_decoding is vLLM's earlier name for the same.
    structured_outputs: Optional[Any] = None
    guided_decoding: Optional[Any] = None
    # Only these token ids may be sampled (vLLM's allowed_token_ids).
    allowed_token_ids: Optional[list[int]] = None
    # Words that must never be generated: the last token of each word's spelling is banned
    # whenever the output ends with the tokens before it (vLLM's bad_words).
    bad_words: Optional[list[str]] = None
    # Keep only the prompt's last k tokens (-1: as many as the context holds).
    truncate_prompt_tokens: Optional[int] = None
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE
    # Filled by the engine, never by users: the tokenizer's EOS ids (ignored when ignore_eos).
    all_stop_token_ids: set[int] = field(default_factory=set, repr=False)
    # Filled by the engine from bad_words: each word's token ids, as spelled alone and after a space.
    bad_words_token_ids: list[list[int]] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        if self.best_of is None:
            self.best_of = self.n
        if self.seed == -1:
            self.seed = None  # OpenAI's and vLLM's "no seed": a fresh random draw, not seed -1
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        elif self.stop is None:
            self.stop = []
        else:
            self.stop = list(self.stop)
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.logit_bias is not None:
            self.logit_bias = _parse_logit_bias(self.logit_bias)
        if self.top_k == 0:
            self.top_k = -1  # OpenAI-style clients send 0 for "off"
        if self.guided_decoding is not None:
            if self.structured_outputs is not None:
                raise ValueError("give structured_outputs or guided_decoding (its older name), not both.")
            self.structured_outputs, self.guided_decoding = self.guided_decoding, None
        if self.structured_outputs is not None:
            self.structured_outputs = StructuredOutputsParams.from_any(self.structured_outputs)
        self._verify()
        self.all_stop_token_ids = set(self.stop_token_ids)

    # ---------------------------------------------------------------- validation
    def _verify(self) -> None:
        _int_at_least("n", self.n, 1)
        _int_at_least("best_of", self.best_of, 1)
        if self.best_of < self.n:
            raise ValueError(f"best_of must be greater than or equal to n, got n={self.n} and best_of={self.best_of}.")
        _number_in("presence_penalty", self.presence_penalty, -2.0, 2.0)
        _number_in("frequency_penalty", self.frequency_penalty, -2.0, 2.0)
        _number_in("repetition_penalty", self.repetition_penalty, *REPETITION_PENALTY_RANGE)
        _number_in("temperature", self.temperature, 0.0, MAX_TEMPERATURE)
        _number_above("top_p", self.top_p, 0.0, "in (0, 1]", upper=1.0)
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < -1:
            raise ValueError(f"top_k must be -1 (disable), 0 (disable) or at least 1, got {self.top_k!r}.")
        _number_in("min_p", self.min_p, 0.0, 1.0)
        if self.seed is not None:
            _int_in("seed", self.seed, *_INT64_RANGE, bound_name="the signed 64-bit range")
        for name in _BOOL_FIELDS:
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}.")
        if self.max_tokens is not None:
            _int_at_least("max_tokens", self.max_tokens, 1)
        _int_at_least("min_tokens", self.min_tokens, 0)
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(
                f"min_tokens must be less than or equal to max_tokens={self.max_tokens}, got {self.min_tokens}.")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None:  # -1: the whole vocabulary; the engine bounds it (max_logprobs)
                _int_at_least(name, value, -1)
        if len(self.stop) > MAX_STOP_STRINGS:
            raise ValueError(f"stop must hold at most {MAX_STOP_STRINGS} strings, got {len(self.stop)}.")
        for s in self.stop:
            if not isinstance(s, str) or s == "":
                raise ValueError(f"stop must contain only non-empty strings, got {s!r}.")
            if len(s) > MAX_STOP_STRING_CHARS:
                raise ValueError(f"stop strings must be at most {MAX_STOP_STRING_CHARS} characters "
                                 f"long, got one of {len(s)}.")
        if self.stop and not self.detokenize:
            raise ValueError("stop strings are matched in the output's text: stop needs detokenize=True "
                             "(use stop_token_ids to stop on tokens without text).")
        for t in self.stop_token_ids:
            if not isinstance(t, int) or isinstance(t, bool) or t < 0:
                raise ValueError(f"stop_token_ids must be non-negative integers, got {t!r}.")
        self._verify_vllm_extras()
        if not _is_number(self.length_penalty) or not math.isfinite(self.length_penalty):
            raise ValueError(f"length_penalty must be a finite number, got {self.length_penalty!r}.")
        if self.early_stopping not in (True, False, "never"):
            raise ValueError(f"early_stopping must be True, False or 'never', got {self.early_stopping!r}.")
        if self.use_beam_search:
            if self.structured_outputs is not None:
                raise ValueError("structured_outputs cannot be used with beam search.")
            if self.best_of == 1:
                raise ValueError("best_of must be greater than 1 when using beam search, got 1.")
            if self.temperature > _GREEDY_EPS:
                raise ValueError("temperature must be 0 when using beam search, got "
                                 f"{self.temperature}.")
            if self.top_p < 1.0 - _GREEDY_EPS or self.top_k != -1 or self.min_p > _GREEDY_EPS:
                raise ValueError("top_p must be 1, top_k -1 and min_p 0 when using beam search.")
            if self.seed is not None:
                raise ValueError("seed cannot be used with beam search, which is deterministic.")
        else:
            if self.length_penalty != 1.0:
                raise ValueError("length_penalty is only used with beam search (use_beam_search=True).")
            if self.early_stopping is not False:
                raise ValueError("early_stopping is only used with beam search (use_beam_search=True).")
            if self.is_greedy and self.n > 1:  # vLLM's check; best_of >= n, so n is named first
                raise ValueError(f"n must be 1 when using greedy sampling (temperature 0), got {self.n}.")
            if self.is_greedy and self.best_of > 1:
                raise ValueError(f"best_of must be 1 when using greedy sampling (temperature 0), got {self.best_of}.")

    def _verify_vllm_extras(self) -> None:
        if self.prompt_logprobs_temperature is not None:
            _number_above("prompt_logprobs_temperature", self.prompt_logprobs_temperature, 0.0, "above 0",
                          upper=float("inf"))
        if self.allowed_token_ids is not None:
            if not isinstance(self.allowed_token_ids, (list, tuple)) or not self.allowed_token_ids:
                raise ValueError("allowed_token_ids must be a non-empty list of token ids, got "
                                 f"{self.allowed_token_ids!r}.")
            for t in self.allowed_token_ids:
                if not isinstance(t, int) or isinstance(t, bool) or t < 0:
                    raise ValueError(f"allowed_token_ids must be non-negative integers, got {t!r}.")
            self.allowed_token_ids = list(self.allowed_token_ids)
        if self.bad_words is not None:
            if not isinstance(self.bad_words, (list, tuple)):
                raise ValueError(f"bad_words must be a list of strings, got {self.bad_words!r}.")
            if len(self.bad_words) > MAX_STOP_STRINGS:  # each is matched every step, as stops are
                raise ValueError(f"bad_words must hold at most {MAX_STOP_STRINGS} words, got "
                                 f"{len(self.bad_words)}.")
            for w in self.bad_words:
                if not isinstance(w, str) or not w.strip() or len(w) > MAX_STOP_STRING_CHARS:
                    raise ValueError("bad_words must be non-blank strings of at most "
                                     f"{MAX_STOP_STRING_CHARS} characters, got {w!r}.")
            self.bad_words = list(self.bad_words)
        if self.use_beam_search:  # beams are ranked on the raw distribution: a mask would be ignored
            for name in ("allowed_token_ids", "bad_words"):
                if getattr(self, name):
                    raise ValueError(f"{name} cannot be used with beam search.")
        if type(self.output_kind) is not RequestOutputKind:
            if self.output_kind not in tuple(RequestOutputKind) or isinstance(self.output_kind, bool):
                raise ValueError("output_kind must be a RequestOutputKind (CUMULATIVE, DELTA or "
                                 f"FINAL_ONLY), got {self.output_kind!r}.")
            self.output_kind = RequestOutputKind(self.output_kind)
        if self.truncate_prompt_tokens is not None:
            t = self.truncate_prompt_tokens
            if not isinstance(t, int) or isinstance(t, bool) or not (t == -1 or t >= 1):
                raise ValueError(f"truncate_prompt_tokens must be -1 or at least 1, got {t!r}.")

    # ---------------------------------------------------------------- derived facts
    @property
    def is_greedy(self) -> bool:
        return self.temperature < _GREEDY_EPS

    @property
    def needs_penalties(self) -> bool:
        return (self.presence_penalty != 0.0 or self.frequency_penalty != 0.0
                or self.repetition_penalty != 1.0)

    @property
    def reads_output_history(self) -> bool:
        """Whether sampling looks at the tokens generated so far (on the host)."""
        return self.needs_penalties or bool(self.min_tokens) or bool(self.bad_words_token_ids)

    def clone(self) -> "SamplingParams":
        """A copy the engine may fill in without touching the caller's. Scalars are shared and
        everything else is copied deeply: a whole deepcopy walked every field and cost ~17 us a
        request on the development machine, a few percent of a saturated server's engine thread."""
        new = copy.copy(self)
        for name, value in vars(self).items():
            if not isinstance(value, _SCALARS):
                setattr(new, name, _copied(value))
        return new


_SCALARS = (type(None), bool, int, float, str)


def _copied(value):
    """A copy of a field's value: flat containers of scalars (stop strings and ids, logit_bias)
    by their constructor, anything else deeply."""
    kind = type(value)
    if kind in (list, set) and all(isinstance(v, _SCALARS) for v in value):
        return kind(value)
    if kind is dict and all(isinstance(k, _SCALARS) and isinstance(v, _SCALARS) for k, v in value.items()):
        return dict(value)
    return copy.deepcopy(value)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _int_in(name: str, value, low: int, high: int, bound_name: str = "") -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        named = f" ({bound_name})" if bound_name else ""
        # The bound broken, in pydantic's words (vLLM's message carries them; clients match them).
        broken = (" [greater_than_equal]" if isinstance(value, int) and value < low else
                  " [less_than_equal]" if isinstance(value, int) and value > high else "")
        raise ValueError(f"{name} must be an integer in [{low}, {high}]{named}, got {value!r}{broken}.")


def _int_at_least(name: str, value, low: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"{name} must be an integer at least {low}, got {value!r}.")


def _number_in(name: str, value, low: float, high: float) -> None:
    if not _is_number(value) or not (low <= value <= high):
        raise ValueError(f"{name} must be in [{low}, {high}], got {value!r}.")


def _number_above(name: str, value, low: float, wording: str, upper: float) -> None:
    if not _is_number(value) or not (low < value <= upper):
        raise ValueError(f"{name} must be {wording}, got {value!r}.")


def _parse_logit_bias(logit_bias) -> dict[int, float]:
    if not isinstance(logit_bias, dict):
        raise ValueError(f"logit_bias must be a mapping of token id to bias, got {type(logit_bias).__name__}.")
    not_ids = [key for key in logit_bias if not _is_token_id_key(key)]
    if not_ids:   # every one named, as vLLM does
        raise ValueError(f"logit_bias keys must be token ids, got {', '.join(map(repr, not_ids[:10]))}.")
    parsed: dict[int, float] = {}
    for key, bias in logit_bias.items():
        token_id = int(key)
        if token_id < 0:
            raise ValueError(f"logit_bias keys must be non-negative token ids, got {token_id}.")
        if not _is_number(bias) or not (-100.0 <= bias <= 100.0):
            raise ValueError(f"logit_bias values must be in [-100, 100], got {bias!r} for token {token_id}.")
        parsed[token_id] = float(bias)
    return parsed


def _is_token_id_key(key) -> bool:
    try:
        int(key)
    except (TypeError, ValueError):
        return False
    return True


@dataclass
class BeamSearchParams:
    """vLLM's parameters of LLM.beam_search: beam_width beams, all returned, best first."""

    beam_width: int
    max_tokens: int
    ignore_eos: bool = False
    temperature: float = 0.0
    length_penalty: float = 1.0
    include_stop_str_in_output: bool = False

    def to_sampling_params(self) -> SamplingParams:
        return SamplingParams(use_beam_search=True, n=self.beam_width, best_of=self.beam_width,
                              max_tokens=self.max_tokens, ignore_eos=self.ignore_eos,
                              temperature=self.temperature, length_penalty=self.length_penalty,
                              include_stop_str_in_output=self.include_stop_str_in_output)
