"""Rotary position embedding (GPT-NeoX / Llama "rotate half" style) over flattened q and k.

The inverse frequencies and the cos/sin table are computed in float32 on the CPU with the same
expressions as transformers, so results match HF; they are cast to the query dtype only when
applied, as HF does.
"""

from __future__ import annotations

import contextlib
import math
import weakref
from typing import Any, Iterable, Iterator, Optional

import torch
from torch import nn

from aserve.cuda import fused

_SUPPORTED = ("default", "linear", "llama3", "yarn", "longrope")
# Rope types whose scaling stretches the positions a model takes, as vLLM counts them.
_STRETCHING = ("linear", "dynamic", "yarn")


def get_rope_parameters(hf_config) -> dict[str, Any]:
    """The rope settings as one dict with at least rope_type and rope_theta.

    transformers >= 5 keeps them in `config.rope_parameters`; older configs (and config.json
    files written by older versions) use `rope_theta` plus an optional `rope_scaling` dict whose
    type key is "type" or "rope_type", and `partial_rotary_factor` (GPT-NeoX: `rotary_pct` and
    `rotary_emb_base`). Both forms are read.
    """
    params = getattr(hf_config, "rope_parameters", None)
    if isinstance(params, dict) and "rope_theta" in params:
        params = dict(params)
    else:
        scaling = getattr(hf_config, "rope_scaling", None)
        params = dict(scaling) if isinstance(scaling, dict) else {}
        # GPT-NeoX's older names: rotary_emb_base for the base, rotary_pct for the share rotated.
        params.setdefault("rope_theta", getattr(hf_config, "rope_theta", None)
                          or getattr(hf_config, "rotary_emb_base", None) or 10000.0)
        partial = getattr(hf_config, "partial_rotary_factor", None) or getattr(hf_config, "rotary_pct", None)
        if partial is not None:
            params.setdefault("partial_rotary_factor", partial)
        original = getattr(hf_config, "original_max_position_embeddings", None)   # Phi-3's LongRoPE
        if original is not None:
            params.setdefault("original_max_position_embeddings", original)
    params["rope_type"] = params.get("rope_type") or params.get("type") or "default"
    return params


def layer_rope_parameters(hf_config, layer_idx: int) -> dict[str, Any]:
    """The rope settings of one layer: Gemma 3 and OLMo 3 key them by layer type
    ({"sliding_attention": {...}, "full_attention": {...}}); the others have one set."""
    params = getattr(hf_config, "rope_parameters", None)
    layer_types = getattr(hf_config, "layer_types", None)
    if isinstance(params, dict) and layer_types and layer_types[layer_idx] in params:
        params = dict(params[layer_types[layer_idx]])
        params["rope_type"] = params.get("rope_type") or params.get("type") or "default"
        return params
    return get_rope_parameters(hf_config)


def rope_position_limit(hf_config, max_positions: int) -> int:
    """How many positions a model with this rope takes: its max_position_embeddings, stretched
    by the scaling factor of linear and YaRN scaling (from YaRN's original length), as vLLM
    derives a model's length. Qwen2.5 with YaRN factor 4 over 32768: 131072."""
    params = get_rope_parameters(hf_config)
    if params["rope_type"] not in _STRETCHING or not params.get("factor"):
        return max_positions
    base = params.get("original_max_position_embeddings") if params["rope_type"] == "yarn" else None
    return int((base or max_positions) * params["factor"])


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn(head_dim: int, params: dict[str, Any], max_position: int) -> tuple[torch.Tensor, float]:
    """YaRN's inverse frequencies (interpolated below, extrapolated above a ramp of dimensions)
    and its attention factor, which scales cos and sin; transformers' expressions."""
    base, factor = params["rope_theta"], params.get("factor")
    original = params["original_max_position_embeddings"]
    if factor is None:   # DeepSeek-V3's form: the ratio of the two lengths
        factor = max_position / original
    attention = params.get("attention_factor")
    if attention is None:
        mscale, mscale_all_dim = params.get("mscale"), params.get("mscale_all_dim")
        attention = (_yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim)
                     if mscale and mscale_all_dim else _yarn_mscale(factor))
    beta_fast, beta_slow = params.get("beta_fast") or 32, params.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return head_dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if params.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001   # no zero-width ramp
    ramp = torch.clamp((torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, head_dim, 2, device="cpu").to(dtype=torch.float) / head_dim)
    extrapolation = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq, float(attention)


def _longrope(head_dim: int, params: dict[str, Any], max_position: int) -> tuple[torch.Tensor, float]:
    """LongRoPE (Phi-3-mini-128k, Phi-3.5-mini, Phi-4-mini): the base frequencies divided by one
    factor per dimension pair, the long set or the short one as params["use_long_factor"] says
    (RotaryEmbedding decides), and cos and sin scaled by the attention factor; transformers'
    expressions."""
    original = params["original_max_position_embeddings"]
    factor = params.get("factor") or max_position / original
    attention = params.get("attention_factor")
    if attention is None:
        attention = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    factors = params["long_factor" if params["use_long_factor"] else "short_factor"]
    if len(factors) != head_dim // 2:
        raise ValueError(f"LongRoPE needs one factor per pair of the {head_dim} rotated dimensions "
                         f"({head_dim // 2}), got {len(factors)}")
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim
    return 1.0 / (torch.tensor(factors, dtype=torch.float32) * params["rope_theta"] ** exponents), float(attention)


# The longest context the engine serves (its max_model_len), while loader.load_model builds a
# model: LongRoPE chooses its factors by it.
_serving_max_len: Optional[int] = None


@contextlib.contextmanager
def serving_max_len(max_len: int) -> Iterator[None]:
    global _serving_max_len
    previous, _serving_max_len = _serving_max_len, max_len
    try:
        yield
    finally:
        _serving_max_len = previous


def _inv_freq(head_dim: int, params: dict[str, Any], max_position: int) -> tuple[torch.Tensor, float]:
    """(the inverse frequencies, the factor cos and sin are scaled by), for head_dim rotated
    dimensions (a partial rotary embedding's rotated part)."""
    base = params["rope_theta"]
    rope_type = params["rope_type"]
    if rope_type not in _SUPPORTED:
        raise ValueError(f"unsupported rope type {rope_type!r}; supported: {list(_SUPPORTED)}")
    if rope_type == "yarn":
        return _yarn(head_dim, params, max_position)
    if rope_type == "longrope":
        return _longrope(head_dim, params, max_position)
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim))
    if rope_type == "linear":
        inv_freq /= params["factor"]
    elif rope_type == "llama3":
        factor = params["factor"]
        low_freq_factor, high_freq_factor = params["low_freq_factor"], params["high_freq_factor"]
        old_context_len = params.get("original_max_position_embeddings", max_position)
        low_freq_wavelen = old_context_len / low_freq_factor
        high_freq_wavelen = old_context_len / high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
        inv_freq = torch.where(is_medium, smoothed, scaled)
    return inv_freq, 1.0


class _CosSinTables:
    """One cos/sin table pair, shared by every layer of a model (and by models alike) that
    lives on one device: model B's 32 layers each built and held their own 128 MiB pair (4 GiB
    of GPU memory and ~1.4 s of its start on an H200)."""

    __slots__ = ("cos", "sin", "__weakref__")

    def __init__(self, cos: torch.Tensor, sin: torch.Tensor) -> None:
        self.cos, self.sin = cos, sin


# Live tables by (head_dim, max_position, rope parameters, device): an entry goes when the last
# module holding it does.
_live_tables: "weakref.WeakValueDictionary[tuple, _CosSinTables]" = weakref.WeakValueDictionary()


def _cos_sin_tables(head_dim: int, max_position: int, params: dict[str, Any],
                    device: torch.device) -> _CosSinTables:
    key = (head_dim, max_position, tuple(sorted((k, repr(v)) for k, v in params.items())), str(device))
    tables = _live_tables.get(key)
    if tables is None and device.type == "meta":   # a layout-only build: shapes, no values
        shape = (max_position, head_dim)
        tables = _CosSinTables(torch.empty(shape, dtype=torch.float32, device=device),
                               torch.empty(shape, dtype=torch.float32, device=device))
        _live_tables[key] = tables
    elif tables is None:
        inv_freq, scale = _inv_freq(head_dim, params, max_position)
        # Built on the CPU whatever the default device is, so every device gets the same table.
        positions = torch.arange(max_position, dtype=torch.int64, device="cpu").float()
        freqs = positions[:, None] * inv_freq[None, :]           # one product, as HF's forward
        emb = torch.cat((freqs, freqs), dim=-1)                  # [max_position, head_dim]
        cos, sin = emb.cos(), emb.sin()
        if scale != 1.0:   # YaRN's attention factor, applied to the table as HF applies it
            cos, sin = cos * scale, sin * scale
        tables = _CosSinTables(cos.to(device), sin.to(device))
        _live_tables[key] = tables
    return tables


def rotary_dims(head_dim: int, params: dict[str, Any]) -> int:
    """How many leading dimensions of each head a rope rotates: all, or the partial rotary
    factor's share (GPT-NeoX/Pythia 0.25, Phi-2 0.4), as transformers counts them."""
    factor = params.get("partial_rotary_factor")
    rotated = head_dim if factor is None else int(head_dim * factor)
    if rotated % 2 or not 0 < rotated <= head_dim:
        raise ValueError(f"partial_rotary_factor {factor} rotates {rotated} of {head_dim} dimensions: "
                         f"it must be an even number from 2 to the head size")
    return rotated


class RotaryEmbedding(nn.Module):
    """Applies rotary embeddings to q [T, H*D] and k [T, KVH*D] at positions [T]: to the first
    rotary_dim dimensions of each head (all of them, or a partial rotary embedding's share;
    the rest pass through)."""

    def __init__(self, head_dim: int, max_position: int, rope_parameters: Optional[dict] = None):
        super().__init__()
        self.head_dim = head_dim
        params = rope_parameters or {"rope_type": "default", "rope_theta": 10000.0}
        if params.get("rope_type") == "longrope":
            # One set of factors for every position, as vLLM: the long one wherever the engine
            # serves contexts past the original length. transformers switches per forward call
            # (long once a sequence passes it), so the two agree while every sequence stays on
            # one side; keys cached under the other set would otherwise be rotated wrongly.
            params = {**params, "use_long_factor": (_serving_max_len or max_position)
                      > params["original_max_position_embeddings"]}
        self.rotary_dim = rotary_dims(head_dim, params)
        # The tables span the rotated dimensions only; the CUDA kernels rotate whole heads.
        self._settings = (self.rotary_dim, max_position, params)
        # On the construction device (the loader's); read-only, so shared by layers alike.
        self._tables = _cos_sin_tables(*self._settings, torch.empty(0).device)
        self.register_buffer("cos_cache", self._tables.cos, persistent=False)
        self.register_buffer("sin_cache", self._tables.sin, persistent=False)

    def _apply(self, fn, recurse=True):
        # The tables stay float32 through model.to(dtype) and only follow device moves, onto
        # the new device's shared pair.
        out = super()._apply(fn, recurse)
        device = self.cos_cache.device
        if device != self._tables.cos.device:
            self._tables = _cos_sin_tables(*self._settings, device)
        self.cos_cache, self.sin_cache = self._tables.cos, self._tables.sin
        return out

    @staticmethod
    def _rotate_half(x: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        return torch.cat((-x[..., half:], x[..., :half]), dim=-1)

    def rotate_and_cache(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                         v: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> bool:
        """Rotate q and k in place and store k and v at their cache slots in one CUDA kernel;
        False (nothing done) where that kernel does not apply: then forward() and the backend's
        own cache write serve."""
        if not fused.usable(q) or self.rotary_dim != self.head_dim:
            return False
        return fused.rotary_embedding_and_cache(positions, q, k, v, kv_cache[0], kv_cache[1], slot_mapping,
                                                self.cos_cache, self.sin_cache, self.head_dim)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
        """Rotate q and k (flattened heads) at `positions`; returns (q, k), rotated in place
        by the fused CUDA kernel on a GPU, as new tensors otherwise."""
        if fused.usable(q) and self.rotary_dim == self.head_dim:
            fused.rotary_embedding(positions, q, k, self.cos_cache, self.sin_cache, self.head_dim)
            return q, k
        cos = self.cos_cache.index_select(0, positions).to(q.dtype).unsqueeze(1)   # [T, 1, R]
        sin = self.sin_cache.index_select(0, positions).to(q.dtype).unsqueeze(1)
        num_tokens = q.shape[0]
        return self._rotate(q, cos, sin).reshape(num_tokens, -1), self._rotate(k, cos, sin).reshape(num_tokens, -1)

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [T, H*D] as [T, H, D], its first rotary_dim dimensions rotated (HF's expressions)."""
        x = x.view(x.shape[0], -1, self.head_dim)
        if self.rotary_dim == self.head_dim:
            return x * cos + self._rotate_half(x) * sin
        rotated, passed = x[..., :self.rotary_dim], x[..., self.rotary_dim:]
        return torch.cat((rotated * cos + self._rotate_half(rotated) * sin, passed), dim=-1)


# The q/k tensors whose rows follow each head's dimensions (projections, biases, per-head norms).
QK_TENSORS = (".q_proj.weight", ".q_proj.bias", ".k_proj.weight", ".k_proj.bias", ".q_norm.weight", ".k_norm.weight")


def interleaved_pairs_to_halves(weights: Iterable[tuple[str, torch.Tensor]], head_dim: int, rotary_dim: int,
                                names: tuple[str, ...] = QK_TENSORS) -> Iterator[tuple[str, torch.Tensor]]:
    """A checkpoint of a model that rotates interleaved pairs (dimensions 2i and 2i+1: Cohere,
    GLM), with q's and k's tensors (those ending in `names`) reordered so that each head's first
    rotary_dim dimensions come evens first, then odds: the pair lands on (i, i + rotary_dim / 2),
    which RotaryEmbedding rotates together. Attention sees only q.k, which one permutation of
    both leaves unchanged, so the half-rotating kernels then give the model's scores exactly;
    v and the dimensions past rotary_dim stay in place."""
    order = torch.cat((torch.arange(0, rotary_dim, 2), torch.arange(1, rotary_dim, 2),
                       torch.arange(rotary_dim, head_dim)))
    for name, tensor in weights:
        if name.endswith(names):
            # [heads * head_dim, hidden] for a projection's weight; [heads * head_dim] or
            # [heads, head_dim] for a bias or a per-head norm.
            rest = tensor.shape[1:] if name.endswith("_proj.weight") else ()
            tensor = tensor.reshape(-1, head_dim, *rest).index_select(1, order).reshape(tensor.shape)
        yield name, tensor
