"""Build a random-weight Hugging Face model of a real model's shape, for benchmarks offline.

    python bench/make_random_model.py --shape opt-125m --out /tmp/opt-125m-random

The machines here reach no hub, so benchmark models are built: the architecture and sizes of
the named model, random weights, and a synthetic tokenizer covering the whole vocabulary, so
that served text is never empty. By default it is a byte-level BPE, as the real OPT, Llama-3 and
Qwen2 tokenizers are (the same decoder, so detokenizing costs what it costs for those models):
ids 3-258 are the 256 bytes and every id from 259 on decodes to the word " w<id>".
--tokenizer words builds the word-level tokenizer of earlier sessions (every id from 3 the word
"w<id>", joined by a WordPiece decoder: about 3x the detokenizing cost of a byte-level BPE).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from aserve.models.default_model import CHAT_TEMPLATE  # noqa: E402

SHAPES = {
    # facebook/opt-125m
    "opt-125m": ("OPTConfig", dict(vocab_size=50272, hidden_size=768, num_hidden_layers=12,
                                   ffn_dim=3072, num_attention_heads=12, max_position_embeddings=2048,
                                   word_embed_proj_dim=768, do_layer_norm_before=True)),
    # openai-community/gpt2
    "gpt2": ("GPT2Config", dict(vocab_size=50257, n_embd=768, n_layer=12, n_head=12, n_positions=1024)),
    # Qwen/Qwen2-0.5B
    "qwen2-0.5b": ("Qwen2Config", dict(vocab_size=151936, hidden_size=896, intermediate_size=4864,
                                       num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                                       max_position_embeddings=32768, tie_word_embeddings=True)),
    # meta-llama/Llama-3.1-8B (bench/workloads.py's model B; its rope scaling left out)
    "llama-3.1-8b": ("LlamaConfig", dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                                         num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                                         max_position_embeddings=131072, rope_theta=500000.0,
                                         rms_norm_eps=1e-5)),
    # Host-bound on a CPU: the engine's and the server's Python costs dominate its step (profiling
    # the serving path without a GPU); vocab 4096 keeps the sampler cheap.
    "opt-host": ("OPTConfig", dict(vocab_size=4096, hidden_size=32, num_hidden_layers=1, ffn_dim=64,
                                   num_attention_heads=2, max_position_embeddings=2048,
                                   word_embed_proj_dim=32, do_layer_norm_before=True)),
    # a Llama of ~1B parameters (TinyLlama-1.1B's shape)
    "llama-1b": ("LlamaConfig", dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632,
                                     num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
                                     max_position_embeddings=2048)),
}


TOKENIZERS = ("bytes", "words")


def synthetic_tokenizer(vocab_size: int, kind: str = "bytes"):
    """Ids 0-2 are <pad>, <s>, </s>. "bytes": a byte-level BPE whose ids 3-258 are the bytes
    (so any text encodes, a byte a token: there are no merges) and whose later ids are the words
    " w<id>". "words": every other id is the word "w<id>", and unknown words are <pad>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2}
    if kind == "bytes":
        alphabet = sorted(pre_tokenizers.ByteLevel.alphabet(), key=_byte_of_symbol)
        vocab.update({symbol: 3 + i for i, symbol in enumerate(alphabet)})
        vocab.update({f"\u0120w{i}": i for i in range(3 + len(alphabet), vocab_size)})  # \u0120: a space
        backend = Tokenizer(models.BPE(vocab, merges=[]))
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
    elif kind == "words":
        vocab.update({f"w{i}": i for i in range(3, vocab_size)})
        backend = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
        backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        backend.decoder = decoders.WordPiece(prefix="##")   # joins words with spaces
    else:
        raise ValueError(f"tokenizer must be one of {TOKENIZERS}, got {kind!r}")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>",
                                        eos_token="</s>", unk_token="<pad>")
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def _byte_of_symbol(symbol: str) -> int:
    """The byte a ByteLevel alphabet symbol stands for (GPT-2's printable remapping)."""
    code = ord(symbol)
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\u00a1"), ord("\u00ac") + 1)) \
        + list(range(ord("\u00ae"), ord("\u00ff") + 1))
    if code in printable:
        return code
    others = [b for b in range(256) if b not in printable]
    return others[code - 256]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    parser.add_argument("--config-only", action="store_true",
                        help="write the config and tokenizer, no weights: serve with --load-format dummy")
    parser.add_argument("--tokenizer", choices=TOKENIZERS, default="bytes")
    args = parser.parse_args()

    import transformers

    config_name, fields = SHAPES[args.shape]
    config = getattr(transformers, config_name)(**fields, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                                                torch_dtype=args.dtype)
    # from_config() records the model class; a bare config must name it for the loader.
    config.architectures = [transformers.models.auto.modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[
        config.model_type]]
    if args.config_only:
        config.save_pretrained(args.out)
        synthetic_tokenizer(config.vocab_size, args.tokenizer).save_pretrained(args.out)
        print(f"{args.shape}: config and tokenizer in {args.out} (serve with --load-format dummy)")
        return
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).to(getattr(torch, args.dtype))
    model.save_pretrained(args.out)
    synthetic_tokenizer(config.vocab_size, args.tokenizer).save_pretrained(args.out)
    print(f"{args.shape}: {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters in {args.out}")


if __name__ == "__main__":
    main()
