"""Our model implementations over the paged KV cache match Hugging Face transformers' logits."""

from __future__ import annotations

import json
import random
import shutil

import pytest
import torch

from aserve.attention import AttentionMetadata
from aserve.config import EngineArgs
from aserve.models import create_model_config, get_model_class, load_model
from tiny_models import FAMILIES, VOCAB_SIZE, make_tiny_model, tiny_model_dir

BLOCK_SIZE = 8
ATOL = 1e-4


class PagedRunner:
    """Drives a model step by step like the engine would: per-sequence block tables over a
    shared pool of blocks, handed out in shuffled order so no sequence's blocks are contiguous."""

    def __init__(self, model, num_blocks: int = 64):
        self.model = model
        gen = torch.Generator().manual_seed(1)
        # Garbage, not zeros: a slot that is read before being written would show up.
        self.kv_caches = [torch.randn(2, num_blocks, BLOCK_SIZE, model.num_kv_heads, model.head_dim,
                                      generator=gen) for _ in range(model.num_layers)]
        self.free_blocks = list(range(num_blocks))
        random.Random(0).shuffle(self.free_blocks)
        self.blocks: dict[str, list[int]] = {}
        self.lengths: dict[str, int] = {}

    def step(self, chunks: list[tuple[str, list[int]]]) -> torch.Tensor:
        """Run one step over (sequence id, new token ids) chunks; float32 logits [T, vocab]."""
        input_ids, positions, slots, query_lens, seq_lens, tables = [], [], [], [], [], []
        for seq, tokens in chunks:
            start = self.lengths.get(seq, 0)
            end = start + len(tokens)
            blocks = self.blocks.setdefault(seq, [])
            while len(blocks) * BLOCK_SIZE < end:
                blocks.append(self.free_blocks.pop())
            input_ids += tokens
            positions += range(start, end)
            slots += [blocks[p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE for p in range(start, end)]
            query_lens.append(len(tokens))
            seq_lens.append(end)
            tables.append(blocks)
            self.lengths[seq] = end
        width = max(len(t) for t in tables)
        metadata = AttentionMetadata(
            num_tokens=len(input_ids),
            query_start_loc=torch.tensor([0] + list(torch.tensor(query_lens).cumsum(0)), dtype=torch.int32),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
            block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32),
            slot_mapping=torch.tensor(slots, dtype=torch.int64),
            max_query_len=max(query_lens), max_seq_len=max(seq_lens),
            query_lens_cpu=query_lens, seq_lens_cpu=seq_lens)
        with torch.no_grad():
            hidden = self.model(torch.tensor(input_ids), torch.tensor(positions), self.kv_caches, metadata)
            return self.model.compute_logits(hidden)


def _load(path: str, **kwargs):
    config = create_model_config(EngineArgs(model=path, device="cpu", **kwargs))
    return load_model(config, "cpu")


def _hf_logits(path: str, tokens: list[int]) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return hf(torch.tensor([tokens])).logits[0].float()


def _tokens(n: int, seed: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(5, VOCAB_SIZE, (n,), generator=gen).tolist()


_VARIANTS = {
    "qwen2-sliding": ("qwen2", dict(use_sliding_window=True, max_window_layers=1, sliding_window=8)),
    "llama-rope-llama3": ("llama", dict(rope_parameters=dict(
        rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
        high_freq_factor=4.0, original_max_position_embeddings=64))),
    "llama-rope-linear": ("llama", dict(rope_parameters=dict(rope_type="linear", rope_theta=10000.0,
                                                             factor=2.0))),
    "llama-biases": ("llama", dict(attention_bias=True, mlp_bias=True, tie_word_embeddings=True)),
    # As Qwen2.5's long-context setting: YaRN over a short original length, so the ramp of
    # interpolated dimensions and the attention factor both show at the tested positions.
    "qwen2-rope-yarn": ("qwen2", dict(rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0,
                                                           original_max_position_embeddings=16))),
    # stablelm-2-1_6b's form: sequential layers, no q/k norms, no biases.
    "stablelm-2-1_6b": ("stablelm", dict(use_qkv_bias=False, qk_layernorm=False, use_parallel_residual=False)),
    # EXAONE-4.0-1.2B's form: no sliding layers, so every layer rotary.
    "exaone4-full": ("exaone4", dict(sliding_window=None, layer_types=["full_attention", "full_attention"])),
    # Command-R's form: no q/k norms, and biases (reordered with q's and k's rows).
    "cohere-bias": ("cohere", dict(use_qk_norm=False, attention_bias=True)),
    # GPT-BigCode without multi-query attention: c_attn keeps each head's q, k, v together.
    "gpt_bigcode-mha": ("gpt_bigcode", dict(multi_query=False)),
    # phi-2 itself: no q/k LayerNorms, an odd share of the head rotated (6 of 16 dimensions).
    "phi-2": ("phi", dict(qk_layernorm=False, rope_parameters=dict(
        rope_type="default", rope_theta=10000.0, partial_rotary_factor=0.375))),
    "qwen3-rope-yarn-mscale": ("qwen3", dict(rope_parameters=dict(
        rope_type="yarn", rope_theta=10000.0, factor=8.0, original_max_position_embeddings=16,
        mscale=1.0, mscale_all_dim=0.5, beta_fast=16, beta_slow=2))),
}


@pytest.fixture(scope="module")
def variant_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("variants")
    return {name: make_tiny_model(family, root / name, **kw) for name, (family, kw) in _VARIANTS.items()}


def _model_dir(name: str, variant_dirs) -> str:
    return variant_dirs[name] if name in _VARIANTS else tiny_model_dir(name)


ALL = list(FAMILIES) + list(_VARIANTS)


@pytest.mark.parametrize("family", FAMILIES)
def test_each_tiny_family_builds_its_own_architecture(family):
    """A guard on tests/tiny_models.py: a family's config names that family's architecture
    (one of its branches once caught three new families' names and built GPT-NeoX for them)."""
    from tiny_models import _config

    architecture = _config(family, {}).architectures[0].lower().replace("_", "")
    assert family.split("-")[0].replace("_", "") in architecture, (family, architecture)


@pytest.mark.parametrize("name", ALL)
def test_prefill_matches_hf_at_every_position(name, variant_dirs):
    path = _model_dir(name, variant_dirs)
    tokens = _tokens(37, seed=0)
    logits = PagedRunner(_load(path)).step([("a", tokens)])
    torch.testing.assert_close(logits, _hf_logits(path, tokens), atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", ALL)
def test_chunked_prefill_then_decode_matches_hf(name, variant_dirs):
    path = _model_dir(name, variant_dirs)
    tokens = _tokens(34, seed=1)
    runner = PagedRunner(_load(path))
    got = [runner.step([("a", tokens[:17])]), runner.step([("a", tokens[17:30])])]
    got += [runner.step([("a", [t])]) for t in tokens[30:]]
    torch.testing.assert_close(torch.cat(got), _hf_logits(path, tokens), atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", ALL)
def test_batch_of_sequences_with_different_lengths_matches_hf(name, variant_dirs):
    path = _model_dir(name, variant_dirs)
    a, b = _tokens(21, seed=2), _tokens(34, seed=3)
    runner = PagedRunner(_load(path))
    first = runner.step([("a", a[:20]), ("b", b[:25])])
    second = runner.step([("a", a[20:]), ("b", b[25:])])    # a decodes while b finishes prefill
    ref_a, ref_b = _hf_logits(path, a), _hf_logits(path, b)
    torch.testing.assert_close(first[:20], ref_a[:20], atol=ATOL, rtol=0)
    torch.testing.assert_close(first[20:], ref_b[:25], atol=ATOL, rtol=0)
    torch.testing.assert_close(second[:1], ref_a[20:], atol=ATOL, rtol=0)
    torch.testing.assert_close(second[1:], ref_b[25:], atol=ATOL, rtol=0)


def test_model_exposes_cache_geometry():
    model = _load(tiny_model_dir("mistral"))
    assert (model.num_layers, model.num_kv_heads, model.head_dim) == (2, 2, 32)


def test_bin_checkpoint_loads_identically(tmp_path):
    path = make_tiny_model("llama", tmp_path / "bin", safe_serialization=False)
    assert not list((tmp_path / "bin").glob("*.safetensors"))
    tokens = _tokens(12, seed=4)
    from_bin = PagedRunner(_load(path)).step([("a", tokens)])
    from_safetensors = PagedRunner(_load(tiny_model_dir("llama"))).step([("a", tokens)])
    assert torch.equal(from_bin, from_safetensors)


def test_unknown_architecture_lists_supported_ones(tmp_path):
    with pytest.raises(ValueError, match="LlamaForCausalLM") as err:
        get_model_class("BertForMaskedLM")
    assert "GPT2LMHeadModel" in str(err.value) and "BertForMaskedLM" in str(err.value)
    path = tmp_path / "bert"
    shutil.copytree(tiny_model_dir("llama"), path)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "architectures": ["FooForCausalLM"]}))
    with pytest.raises(ValueError, match="FooForCausalLM.*Supported architectures: .*OPTForCausalLM"):
        create_model_config(EngineArgs(model=str(path), device="cpu"))


def test_checkpoint_with_unknown_weight_name_is_rejected():
    model = get_model_class("LlamaForCausalLM")(create_model_config(
        EngineArgs(model=tiny_model_dir("llama"), device="cpu")).hf_config)
    with pytest.raises(ValueError, match="no matching parameter"):
        model.load_weights([("model.layers.0.self_attn.bogus.weight", torch.zeros(1))])


def test_bfloat16_model_runs_close_to_float32():
    path = tiny_model_dir("llama")
    model = _load(path, dtype="bfloat16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    runner = PagedRunner(model)
    runner.kv_caches = [c.to(torch.bfloat16) for c in runner.kv_caches]
    tokens = _tokens(10, seed=5)
    logits = runner.step([("a", tokens)])
    assert logits.dtype == torch.bfloat16   # the sampler reads the model's dtype as it is
    torch.testing.assert_close(logits.float(), _hf_logits(path, tokens), atol=0.5, rtol=0.05)


def test_rope_settings_are_read_from_old_and_new_config_forms():
    from types import SimpleNamespace

    from aserve.models.layers import get_rope_parameters

    new = SimpleNamespace(rope_parameters={"rope_type": "linear", "rope_theta": 1e6, "factor": 2.0})
    old = SimpleNamespace(rope_theta=1e6, rope_scaling={"type": "linear", "factor": 2.0})
    assert get_rope_parameters(new) | {"type": "linear"} == get_rope_parameters(old)
    assert get_rope_parameters(SimpleNamespace()) == {"rope_theta": 10000.0, "rope_type": "default"}
    neox_4x = SimpleNamespace(rotary_pct=0.25, rotary_emb_base=500)   # GPT-NeoX under transformers 4
    assert get_rope_parameters(neox_4x) == {"rope_theta": 500, "rope_type": "default", "partial_rotary_factor": 0.25}


def test_unsupported_rope_type_is_rejected():
    from aserve.models.layers import RotaryEmbedding

    with pytest.raises(ValueError, match="unsupported rope type 'dynamic'"):
        RotaryEmbedding(16, 32, {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 4.0})
    with pytest.raises(ValueError, match="one factor per pair of the 16 rotated dimensions"):
        RotaryEmbedding(16, 32, {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0] * 4,
                                 "long_factor": [1.0] * 4, "original_max_position_embeddings": 8})
    with pytest.raises(ValueError, match="partial_rotary_factor 0.5625 rotates 9 of 16"):
        RotaryEmbedding(16, 32, {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5625})


def test_a_partial_rotary_embedding_rotates_the_leading_dimensions_as_transformers():
    """GPT-NeoX's rope (a quarter of each head rotated) against transformers' own rotary module
    and apply_rotary_pos_emb, at random positions, on random q and k; the rest passes through."""
    from transformers import GPTNeoXConfig
    from transformers.models.gpt_neox import modeling_gpt_neox as hf

    from aserve.models.layers import RotaryEmbedding

    config = GPTNeoXConfig(hidden_size=128, num_attention_heads=4, max_position_embeddings=64)
    config.rope_parameters = {**config.rope_parameters, "partial_rotary_factor": 0.25, "rope_theta": 500.0}
    rope = RotaryEmbedding(32, 64, config.rope_parameters)
    assert rope.rotary_dim == 8 and tuple(rope.cos_cache.shape) == (64, 8)
    generator = torch.Generator().manual_seed(3)
    positions = torch.randint(0, 64, (5,), generator=generator)
    q, k = torch.randn(5, 4 * 32, generator=generator), torch.randn(5, 2 * 32, generator=generator)
    got_q, got_k = rope(positions, q.clone(), k.clone())
    cos, sin = hf.GPTNeoXRotaryEmbedding(config)(q, positions[None])
    want_q, want_k = hf.apply_rotary_pos_emb(q.view(1, 5, 4, 32).transpose(1, 2), k.view(1, 5, 2, 32).transpose(1, 2),
                                             cos, sin)
    torch.testing.assert_close(got_q.view(5, 4, 32), want_q.transpose(1, 2)[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_k.view(5, 2, 32), want_k.transpose(1, 2)[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_q.view(5, 4, 32)[..., 8:], q.view(5, 4, 32)[..., 8:], rtol=0, atol=0)


def test_longrope_picks_its_factors_by_the_served_length_and_matches_transformers(tmp_path):
    """Phi-3.5's LongRoPE on a tiny Phi-3 (original length 48 of 512, factors per dimension
    pair): served up to 48 tokens, the short factors, equal to transformers on a 37-token prompt;
    served longer (the default, the config's 512), the long ones, equal to transformers on a
    100-token prompt, where it switches to them too. The middle case (served long, a short
    sequence) is where vLLM and aserve keep the long set and transformers does not."""
    from tiny_models import _GPU_WIDTH_SCALE

    pairs = (64 * (_GPU_WIDTH_SCALE if torch.cuda.is_available() else 1) // 4) // 2
    rope = dict(rope_type="longrope", rope_theta=10000.0, original_max_position_embeddings=48,
                short_factor=[1.0 + 0.3 * i for i in range(pairs)], long_factor=[2.0 + 1.5 * i for i in range(pairs)])
    path = make_tiny_model("phi3", tmp_path / "phi3-longrope", rope_parameters=rope, max_position_embeddings=512,
                           original_max_position_embeddings=48, sliding_window=None)
    short, long = _tokens(37, seed=4), _tokens(100, seed=5)
    served_short = PagedRunner(_load(path, max_model_len=48)).step([("a", short)])
    torch.testing.assert_close(served_short, _hf_logits(path, short), atol=ATOL, rtol=0)
    served_long = PagedRunner(_load(path))
    torch.testing.assert_close(served_long.step([("b", long)]), _hf_logits(path, long), atol=ATOL, rtol=0)
    assert not torch.allclose(served_long.step([("c", short)]), served_short, atol=ATOL)   # the long set
    # Phi-4-mini's form: LongRoPE on a share of each head (half here: half as many factors).
    half = {**rope, "partial_rotary_factor": 0.5, "short_factor": rope["short_factor"][:pairs // 2],
            "long_factor": rope["long_factor"][:pairs // 2]}
    partial = make_tiny_model("phi3", tmp_path / "phi3-longrope-partial", rope_parameters=half,
                              max_position_embeddings=512, original_max_position_embeddings=48, sliding_window=None)
    torch.testing.assert_close(PagedRunner(_load(partial)).step([("d", long)]), _hf_logits(partial, long),
                               atol=ATOL, rtol=0)


def test_layers_share_one_rotary_table_and_keep_it_in_float32():
    """One cos/sin pair per model and device, not one per layer (model B's 32 copies were 4 GiB
    of GPU memory), still float32 after the model's cast; the tables' values are held to
    transformers by the logits tests above."""
    import gc
    import weakref

    from aserve.models.layers import RotaryEmbedding

    model = _load(tiny_model_dir("llama"), dtype="float32")
    rotaries = [m for m in model.modules() if isinstance(m, RotaryEmbedding)]
    assert len(rotaries) > 1
    assert len({m.cos_cache.data_ptr() for m in rotaries}) == 1
    assert len({m.sin_cache.data_ptr() for m in rotaries}) == 1
    model.to(torch.bfloat16)
    assert {m.cos_cache.dtype for m in rotaries} == {torch.float32}
    assert len({m.cos_cache.data_ptr() for m in rotaries}) == 1
    # Other rope settings get tables of their own.
    head_dim = rotaries[0].head_dim
    scaled = RotaryEmbedding(head_dim, 64, {"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0})
    plain = RotaryEmbedding(head_dim, 64)
    assert not torch.equal(scaled.cos_cache, plain.cos_cache)
    assert RotaryEmbedding(head_dim, 64).cos_cache is plain.cos_cache
    # A table goes with the last module that holds it.
    tables = weakref.ref(scaled._tables)
    del scaled
    gc.collect()
    assert tables() is None
    # A layout-only build (the tensor-parallel split check) gets shapes, not values.
    with torch.device("meta"):
        layout = RotaryEmbedding(head_dim, 1 << 20)
    assert layout.cos_cache.is_meta and layout.cos_cache.shape == (1 << 20, head_dim)
    assert layout.cos_cache.dtype == torch.float32


def test_yarn_stretches_the_length_the_model_takes_and_its_rotary_table(tmp_path):
    """As vLLM: YaRN's factor times its original length (Qwen2.5: 4 x 32768); the cos/sin
    table covers every position of that length."""
    yarn = dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=256)
    path = make_tiny_model("qwen2", tmp_path / "yarn", rope_parameters=yarn)
    config = create_model_config(EngineArgs(model=path, device="cpu"))
    assert config.max_model_len == 1024
    model = load_model(config, "cpu")
    assert model.model.layers[0].self_attn.rotary_emb.cos_cache.shape[0] == 1024
    runner = PagedRunner(model, num_blocks=160)
    logits = runner.step([("a", _tokens(700, seed=3))])   # past the config's 512 positions
    assert torch.isfinite(logits).all()


def test_disable_sliding_window_caps_the_length_at_the_window_and_attends_fully():
    """vLLM's --disable-sliding-window: within the window, full attention is the same."""
    path = tiny_model_dir("mistral")   # window 16
    config = create_model_config(EngineArgs(model=path, device="cpu", disable_sliding_window=True))
    assert config.max_model_len == 16
    model = load_model(config, "cpu")
    assert all(layer.self_attn.attn.sliding_window is None for layer in model.model.layers)
    tokens = _tokens(16, seed=9)
    torch.testing.assert_close(PagedRunner(model).step([("a", tokens)]), _hf_logits(path, tokens), atol=ATOL, rtol=0)
    with pytest.raises(ValueError, match="sliding window, 16 tokens"):
        create_model_config(EngineArgs(model=path, device="cpu", disable_sliding_window=True, max_model_len=64))
    # A model without a window is unchanged.
    assert create_model_config(EngineArgs(model=tiny_model_dir("llama"), device="cpu",
                                          disable_sliding_window=True)).max_model_len == 512


def _multimodal_checkpoint(kind: str, path) -> str:
    """A tiny multimodal checkpoint saved by transformers: its language model, vision tower
    and projector (which aserve leaves unread)."""
    from transformers import (Gemma3Config, Gemma3ForConditionalGeneration, Mistral3Config,
                              Mistral3ForConditionalGeneration)

    text = dict(vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=512)
    if kind == "gemma3":
        config = Gemma3Config(text_config=dict(text, sliding_window=16, layer_types=["sliding_attention",
                                                                                   "full_attention"]),
                              vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                 num_attention_heads=2, image_size=28, patch_size=14),
                              mm_tokens_per_image=4)
        model = Gemma3ForConditionalGeneration(config)
    else:
        config = Mistral3Config(text_config=dict(text, model_type="mistral"),
                                vision_config=dict(model_type="pixtral", hidden_size=32, intermediate_size=64,
                                                   num_hidden_layers=1, num_attention_heads=2, image_size=28,
                                                   patch_size=14, head_dim=16), tie_word_embeddings=False)
        model = Mistral3ForConditionalGeneration(config)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.normal_(1.0 if "norm" in name else 0.0, 0.1 if "norm" in name else 0.3)
    model.save_pretrained(path)
    return str(path)


@pytest.mark.parametrize("kind", ["gemma3", "mistral3"])
def test_a_multimodal_checkpoint_serves_its_language_model_as_transformers_does(kind, tmp_path):
    """gemma-3-27b-it or Mistral-Small-3.1 for text: the language model alone, as the whole
    model computes text-only input; the vision weights are not read."""
    from transformers import AutoModelForImageTextToText

    path = _multimodal_checkpoint(kind, tmp_path / kind)
    config = create_model_config(EngineArgs(model=path, device="cpu"))
    assert config.text_part_only and config.architecture in ("Gemma3ForCausalLM", "MistralForCausalLM")
    tokens = _tokens(30, seed=11)
    ours = PagedRunner(load_model(config, "cpu")).step([("a", tokens)])
    hf = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = hf(input_ids=torch.tensor([tokens])).logits[0].float()
    torch.testing.assert_close(ours, expected, atol=ATOL, rtol=0)
    from aserve.models.loader import is_vision_weight, iterate_weights

    every = [name for name, _ in iterate_weights(path)]
    read = [name for name, _ in iterate_weights(path, skip=is_vision_weight)]
    assert any(is_vision_weight(n) for n in every) and not any(is_vision_weight(n) for n in read)
