"""Tiny random-weight Hugging Face models of every supported family, for tests.

`tiny_model_dir(family)` builds each model once per process (in a temporary folder) so tests can
share them; `make_tiny_model(family, path, **overrides)` builds one into a chosen folder.
Weights are drawn with a large spread so that logits are well separated: greedy decoding of a
near-tie would otherwise flip between implementations on rounding noise.
"""

from __future__ import annotations

import os
import tempfile

import torch

from aserve.models.default_model import BOS_ID, EOS_ID, PAD_ID, build_tokenizer

FAMILIES = ("opt", "opt-postln", "llama", "mistral", "qwen2", "qwen3", "gpt2", "mixtral", "qwen2_moe",
            "qwen3_moe", "phi3", "gemma", "gemma2", "gemma3", "granite", "olmo2", "olmo3", "starcoder2",
            "gpt_neox", "gpt_neox-sequential", "phi", "gpt_bigcode", "cohere", "cohere2", "smollm3", "olmoe",
            "granitemoe", "glm", "glm4", "ernie4_5", "seed_oss", "arcee", "olmo", "exaone4",
            "stablelm")
VOCAB_SIZE = 512
MAX_POSITIONS = 512

_GPU_WIDTH_SCALE = 4
_WIDTH_KEYS = ("hidden_size", "intermediate_size", "ffn_dim", "word_embed_proj_dim", "n_embd", "head_dim",
               "moe_intermediate_size", "shared_expert_intermediate_size")
_COMMON = dict(vocab_size=VOCAB_SIZE, bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID)
_LLAMA_LIKE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=MAX_POSITIONS, rms_norm_eps=1e-6)


def _config(family: str, overrides: dict):
    # Each family's config class is looked up when asked for: a transformers without one fails
    # that family alone.
    import transformers as hf

    if family in ("opt", "opt-postln"):
        kw = dict(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=MAX_POSITIONS, word_embed_proj_dim=64,
                  do_layer_norm_before=True, architectures=["OPTForCausalLM"])
        if family == "opt-postln":
            # Like facebook/opt-350m: post-LayerNorm and a smaller embedding projected in/out.
            kw.update(do_layer_norm_before=False, word_embed_proj_dim=32)
        cls = hf.OPTConfig
    elif family == "llama":
        kw = dict(_LLAMA_LIKE, tie_word_embeddings=False, architectures=["LlamaForCausalLM"])
        cls = hf.LlamaConfig
    elif family == "mistral":
        # A window shorter than typical test prompts, so the sliding-window mask is exercised.
        kw = dict(_LLAMA_LIKE, sliding_window=16, head_dim=32, tie_word_embeddings=False,
                  architectures=["MistralForCausalLM"])
        cls = hf.MistralConfig
    elif family == "qwen2":
        # Tied like the small Qwen2 checkpoints, so the loader's tying path is exercised.
        kw = dict(_LLAMA_LIKE, tie_word_embeddings=True, use_sliding_window=False,
                  architectures=["Qwen2ForCausalLM"])
        cls = hf.Qwen2Config
    elif family == "qwen3":
        # Heads wider than hidden / heads (as Qwen3-0.6B: 16 x 128 over 1024), tied like the
        # small checkpoints; q_norm and k_norm are drawn around 1 like every norm here.
        kw = dict(_LLAMA_LIKE, head_dim=32, tie_word_embeddings=True, use_sliding_window=False,
                  architectures=["Qwen3ForCausalLM"])
        cls = hf.Qwen3Config
    elif family == "mixtral":
        kw = dict(_LLAMA_LIKE, num_local_experts=4, num_experts_per_tok=2, tie_word_embeddings=False,
                  architectures=["MixtralForCausalLM"])
        cls = hf.MixtralConfig
    elif family == "qwen2_moe":
        # Layer 0 dense, layer 1 sparse (every 2nd layer), with a shared expert; no renormalising.
        kw = dict(_LLAMA_LIKE, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                  shared_expert_intermediate_size=48, decoder_sparse_step=2, norm_topk_prob=False,
                  use_sliding_window=False, tie_word_embeddings=False, architectures=["Qwen2MoeForCausalLM"])
        cls = hf.Qwen2MoeConfig
    elif family == "qwen3_moe":
        # As Qwen3-30B-A3B: every layer sparse, top-k renormalised, Qwen3's attention.
        kw = dict(_LLAMA_LIKE, head_dim=32, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                  decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=True, use_sliding_window=False,
                  tie_word_embeddings=False, architectures=["Qwen3MoeForCausalLM"])
        cls = hf.Qwen3MoeConfig
    elif family == "phi3":
        # Fused qkv_proj and gate_up_proj in the checkpoint; a sliding window as Phi-3-mini-4k's.
        kw = dict(_LLAMA_LIKE, sliding_window=16, tie_word_embeddings=False, architectures=["Phi3ForCausalLM"])
        cls = hf.Phi3Config
    elif family in ("gemma", "gemma2", "gemma3"):
        # Heads of 32 over a hidden size of 64 (Gemma's heads are wider than hidden / heads).
        kw = dict(_LLAMA_LIKE, head_dim=32, tie_word_embeddings=True)
        if family == "gemma":
            kw.update(hidden_act="gelu_pytorch_tanh", architectures=["GemmaForCausalLM"])
            cls = hf.GemmaConfig
        elif family == "gemma2":
            # Capped scores and logits, a sliding first layer and a full second, a query scalar
            # that is not head_dim.
            # (A final cap of 3 squashed the top logits into near-ties that rounding on a GPU
            # flipped; 10 still bends logits of 4-8 well away from the identity.)
            kw.update(hidden_activation="gelu_pytorch_tanh", sliding_window=16, query_pre_attn_scalar=24,
                      attn_logit_softcapping=5.0, final_logit_softcapping=10.0,
                      layer_types=["sliding_attention", "full_attention"], architectures=["Gemma2ForCausalLM"])
            cls = hf.Gemma2Config
        else:
            # Sliding and full layers with rotary bases of their own, the full ones scaled.
            kw.update(hidden_activation="gelu_pytorch_tanh", sliding_window=16, query_pre_attn_scalar=24,
                      layer_types=["sliding_attention", "full_attention"],
                      rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                       "full_attention": {"rope_type": "linear", "rope_theta": 1000000.0,
                                                          "factor": 8.0}},
                      architectures=["Gemma3ForCausalLM"])
            cls = hf.Gemma3TextConfig
    elif family == "granite":
        # Multipliers far from 1, so each shows (granite-3.1-8b: 12, 0.22, 1/128, 16).
        kw = dict(_LLAMA_LIKE, embedding_multiplier=6.0, residual_multiplier=0.5, attention_multiplier=0.3,
                  logits_scaling=4.0, tie_word_embeddings=True, architectures=["GraniteForCausalLM"])
        cls = hf.GraniteConfig
    elif family == "olmo2":
        kw = dict(_LLAMA_LIKE, tie_word_embeddings=False, architectures=["Olmo2ForCausalLM"])
        cls = hf.Olmo2Config
    elif family == "olmo3":
        # A sliding first layer, a full second, each with its own rotary base.
        kw = dict(_LLAMA_LIKE, sliding_window=16, layer_types=["sliding_attention", "full_attention"],
                  rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                   "full_attention": {"rope_type": "default", "rope_theta": 500000.0}},
                  tie_word_embeddings=False, architectures=["Olmo3ForCausalLM"])
        cls = hf.Olmo3Config
    elif family == "starcoder2":
        # Biases everywhere, LayerNorm, a plain GELU MLP, a sliding window; tied as the checkpoints.
        kw = dict(_LLAMA_LIKE, use_bias=True, norm_epsilon=1e-5, hidden_act="gelu_pytorch_tanh", sliding_window=16,
                  tie_word_embeddings=True, architectures=["Starcoder2ForCausalLM"])
        kw.pop("rms_norm_eps")
        cls = hf.Starcoder2Config
    elif family in ("gpt_neox", "gpt_neox-sequential"):
        # A quarter of each head rotated and parallel attention and MLP, as Pythia; the other
        # form (as some GPT-NeoX fine-tunes) rotates half and runs them one after the other.
        sequential = family == "gpt_neox-sequential"
        kw = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=MAX_POSITIONS, layer_norm_eps=1e-5, use_parallel_residual=not sequential,
                  rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                   "partial_rotary_factor": 0.5 if sequential else 0.25},
                  tie_word_embeddings=False, architectures=["GPTNeoXForCausalLM"])
        cls = hf.GPTNeoXConfig
    elif family == "phi":
        # As phi-2: attention and MLP side by side, 0.4 of each head rotated (a quarter of these
        # 16-wide heads is 6.4: 0.5 keeps the rotated share even on the CPU's and the GPU's
        # widths), biases everywhere, an LM head with a bias; per-head q/k LayerNorms as phi's
        # qk_layernorm variant, so that path is held to transformers too.
        kw = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=4, max_position_embeddings=MAX_POSITIONS, layer_norm_eps=1e-5,
                  hidden_act="gelu_new", qk_layernorm=True,
                  rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
                  tie_word_embeddings=False, architectures=["PhiForCausalLM"])
        cls = hf.PhiConfig
    elif family in ("cohere", "cohere2"):
        # Interleaved rotary pairs, a logit scale far from 1, tied; Cohere with Command-R+'s
        # per-head q/k norms, Cohere 2 with a sliding rotary layer and a full one without rope.
        kw = dict(_LLAMA_LIKE, logit_scale=0.25, layer_norm_eps=1e-5, tie_word_embeddings=True)
        kw.pop("rms_norm_eps")
        if family == "cohere":
            kw.update(use_qk_norm=True, architectures=["CohereForCausalLM"])
            cls = hf.CohereConfig
        else:
            kw.update(sliding_window=16, layer_types=["sliding_attention", "full_attention"],
                      architectures=["Cohere2ForCausalLM"])
            cls = hf.Cohere2Config
    elif family == "stablelm":
        # stablelm-2-12b's form: q/k/v biases, per-head q/k LayerNorms, parallel attention and MLP;
        # a quarter of each head rotated.
        kw = dict(_LLAMA_LIKE, use_qkv_bias=True, qk_layernorm=True, use_parallel_residual=True,
                  layer_norm_eps=1e-5, tie_word_embeddings=False, architectures=["StableLmForCausalLM"],
                  rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25})
        kw.pop("rms_norm_eps")
        cls = hf.StableLmConfig
    elif family == "exaone4":
        # As the 32B: a sliding rotary layer, then a full one without rope.
        kw = dict(_LLAMA_LIKE, sliding_window=16, layer_types=["sliding_attention", "full_attention"],
                  tie_word_embeddings=False, architectures=["Exaone4ForCausalLM"])
        cls = hf.Exaone4Config
    elif family == "arcee":
        kw = dict(_LLAMA_LIKE, hidden_act="relu2", tie_word_embeddings=False, architectures=["ArceeForCausalLM"])
        cls = hf.ArceeConfig
    elif family == "olmo":
        # Weightless LayerNorms; q/k/v clipped at a value that bites (OLMo-7B-0424: 8).
        kw = dict(_LLAMA_LIKE, clip_qkv=2.0, tie_word_embeddings=False, architectures=["OlmoForCausalLM"])
        kw.pop("rms_norm_eps")
        cls = hf.OlmoConfig
    elif family == "ernie4_5":
        # Interleaved rotary pairs over whole heads, biases everywhere, tied as ERNIE-4.5-0.3B.
        kw = dict(_LLAMA_LIKE, use_bias=True, tie_word_embeddings=True, architectures=["Ernie4_5ForCausalLM"])
        cls = hf.Ernie4_5Config
    elif family == "seed_oss":
        # q/k/v biases without an output bias, as Seed-OSS-36B.
        kw = dict(_LLAMA_LIKE, attention_bias=True, attention_out_bias=False, tie_word_embeddings=False,
                  architectures=["SeedOssForCausalLM"])
        cls = hf.SeedOssConfig
    elif family in ("glm", "glm4"):
        # Interleaved rotary pairs on half of each head, q/k/v biases, a merged gate/up in the
        # checkpoint; GLM-4 with its two extra norms a layer.
        kw = dict(_LLAMA_LIKE, attention_bias=True, tie_word_embeddings=False,
                  rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5})
        kw.update(architectures=["GlmForCausalLM"] if family == "glm" else ["Glm4ForCausalLM"])
        cls = hf.GlmConfig if family == "glm" else hf.Glm4Config
    elif family == "granitemoe":
        # Granite's multipliers (far from 1) over 4 experts, 2 a token.
        kw = dict(_LLAMA_LIKE, intermediate_size=32, num_local_experts=4, num_experts_per_tok=2,
                  embedding_multiplier=6.0, residual_multiplier=0.5, attention_multiplier=0.3, logits_scaling=4.0,
                  tie_word_embeddings=True, architectures=["GraniteMoeForCausalLM"])
        cls = hf.GraniteMoeConfig
    elif family == "olmoe":
        # 4 experts, 2 a token, not renormalised (as OLMoE-1B-7B), q/k/v clipped at a value that bites.
        kw = dict(_LLAMA_LIKE, num_experts=4, num_experts_per_tok=2, norm_topk_prob=False, clip_qkv=2.0,
                  tie_word_embeddings=False, architectures=["OlmoeForCausalLM"])
        cls = hf.OlmoeConfig
    elif family == "smollm3":
        # The second of the two layers without rope (SmolLM3-3B: every fourth), tied as the 3B.
        kw = dict(_LLAMA_LIKE, no_rope_layers=[1, 0], tie_word_embeddings=True, architectures=["SmolLM3ForCausalLM"])
        cls = hf.SmolLM3Config
    elif family == "gpt_bigcode":
        # As StarCoder 1 / SantaCoder: one key/value head shared by all (multi-query), tied.
        kw = dict(n_embd=64, n_layer=2, n_head=4, n_positions=MAX_POSITIONS, multi_query=True,
                  architectures=["GPTBigCodeForCausalLM"])
        cls = hf.GPTBigCodeConfig
    elif family == "gpt2":
        kw = dict(n_embd=64, n_layer=2, n_head=4, n_positions=MAX_POSITIONS,
                  architectures=["GPT2LMHeadModel"])
        cls = hf.GPT2Config
    else:
        raise ValueError(f"unknown tiny model family {family!r}; choose from {FAMILIES}")
    if torch.cuda.is_available():
        # Head size 64 (not 16/32) on a GPU, so the CUDA attention kernels serve these models.
        for key in _WIDTH_KEYS:
            if key in kw:
                kw[key] *= _GPU_WIDTH_SCALE
    kw.update(_COMMON)
    kw.update(overrides)
    return cls(**kw)


@torch.no_grad()
def _spread_weights(model: torch.nn.Module) -> None:
    """Redraw every parameter: matrices N(0, 0.2^2) (embeddings and lm_head 0.5, which gives
    logits a standard deviation of about 4-8), norm scales around 1, biases small."""
    for name, param in model.named_parameters():
        if param.dim() >= 2:
            big = any(k in name for k in ("embed_tokens", "lm_head", "wte"))
            param.normal_(0.0, 0.5 if big else 0.2)
        elif "norm" in name or name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
            param.normal_(1.0, 0.1)  # not all ones, so a misloaded norm weight shows
        else:
            param.normal_(0.0, 0.1)


def make_tiny_model(family: str, path, **config_overrides) -> str:
    """Build a tiny random model of `family` (see FAMILIES) with a tokenizer into `path`.

    Deterministic (seed 0). Saved as safetensors unless `safe_serialization=False` is passed.
    Extra keyword arguments override config fields (e.g. rope_parameters=...). Returns path.
    """
    from transformers import AutoModelForCausalLM

    safe = config_overrides.pop("safe_serialization", True)
    path = str(path)
    config = _config(family, config_overrides)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).to(torch.float32)
    _spread_weights(model)
    if safe:
        model.save_pretrained(path)
    else:
        # transformers 5 ignores save_pretrained(safe_serialization=False) and always writes
        # safetensors, so the legacy pickle checkpoint is written by hand.
        model.config.save_pretrained(path)
        model.generation_config.save_pretrained(path)
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        torch.save(state, os.path.join(path, "pytorch_model.bin"))
    build_tokenizer(VOCAB_SIZE).save_pretrained(path)
    return path


_cache_root: str | None = None
_built: dict[str, str] = {}


def tiny_model_dir(family: str) -> str:
    """The folder of the tiny `family` model, built once per process and shared by all tests."""
    global _cache_root
    if family not in _built:
        if _cache_root is None:
            _cache_root = tempfile.mkdtemp(prefix="aserve-tiny-models-")
        _built[family] = make_tiny_model(family, os.path.join(_cache_root, family))
    return _built[family]


# A DeepSeek-R1-style chat template: the generation prompt opens the thinking; with
# enable_thinking false it writes the thinking closed and empty, as Qwen3's template does.
THINKING_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{% if enable_thinking is defined and not enable_thinking %}{{ '<think>\\n\\n</think>\\n\\n' }}"
    "{% else %}{{ '<think>\\n' }}{% endif %}{% endif %}"
)
THINKING_PROMPT = [{"role": "user", "content": "Why is the sky blue?"}]


@torch.no_grad()
def make_thinking_model(path) -> str:
    """A tiny Llama whose tokenizer has <think> and </think> (ids VOCAB_SIZE and +1) and whose
    greedy answer to THINKING_PROMPT thinks for a few tokens, then writes </think>, then its
    answer: the LM head's row of </think> becomes a slightly scaled copy of the row of a token
    that greedy decoding writes later on, so </think> wins where that token would."""
    from transformers import AutoModelForCausalLM

    path = make_tiny_model("llama", path, vocab_size=VOCAB_SIZE + 2)
    tokenizer = build_tokenizer(VOCAB_SIZE)
    tokenizer.add_tokens(["<think>", "</think>"])
    tokenizer.chat_template = THINKING_TEMPLATE
    tokenizer.save_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    text = tokenizer.apply_chat_template(THINKING_PROMPT, add_generation_prompt=True, tokenize=False)
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
    end_id = tokenizer.convert_tokens_to_ids("</think>")
    head = model.lm_head.weight

    def greedy() -> list[int]:
        return model.generate(ids, max_new_tokens=16, do_sample=False)[0, ids.shape[1]:].tolist()

    original = head[end_id].clone()
    for candidate in greedy()[2:]:
        head[end_id] = head[candidate] * 1.01
        out = greedy()
        if end_id in out and 2 <= out.index(end_id) <= 8 and len(out) > out.index(end_id) + 4:
            model.save_pretrained(path)
            return path
        head[end_id] = original
    raise RuntimeError("no token of the greedy answer gives a thinking of 2 to 8 tokens")
