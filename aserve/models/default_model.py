"""The built-in default model: a tiny random-weight Llama with a small byte-level BPE tokenizer.

It lets `aserve` start with no model argument and no network (no Hugging Face hub), which makes
the server, the examples and the tests runnable anywhere. Its text is gibberish by design.
The folder is built once, deterministically, and cached on disk; it then loads through the
ordinary loader like any other local model folder.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

DEFAULT_MODEL_NAME = "aserve-tiny-random"
_CACHE_SUBDIR = "default-model-v1"  # bump the suffix whenever the built files change

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2

# ChatML, so /v1/chat/completions works against the default model and the tiny test models.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Training text for the tokenizer. Byte-level BPE can encode any string whatever it was trained
# on; this text only decides which merges exist, so ordinary English gets multi-byte tokens.
_CORPUS = """
The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single step.
Once upon a time there was a small town by the sea, where the people fished in the morning and
told stories in the evening. The children would run along the beach and the old men would sit on
the wall, watching the boats come back with the tide. Hello, world! How are you today? I am fine,
thank you. What is the capital of France? The capital of France is Paris. The weather is nice and
the sun is shining. Machine learning models generate text one token at a time. A language model
predicts the next word from the words that came before it. Large language models are served by
inference engines that batch many requests together and keep a cache of keys and values for every
token they have seen. The cache is split into blocks, like pages of memory in an operating system,
so that requests of different lengths can share the memory without waste. Numbers: 0 1 2 3 4 5 6 7
8 9 10 100 1000 2024. Please write a short poem about the ocean. The ocean is deep and blue, it
sings to me and you. Tell me a story about a dragon who wanted to learn to read. There once was a
dragon named Ember who lived in a cave on top of a mountain. Every day she watched the villagers
carry books to the school, and every day she wished she could read them too. She asked the teacher
for help, and the teacher said yes. They met every evening, and by winter Ember could read every
book in the library. The end. Question: what is two plus two? Answer: four. Explain why the sky is
blue. Sunlight is scattered by the air, and blue light is scattered more than red light, so the sky
looks blue during the day. In the afternoon we went to the market to buy bread, cheese, apples and
milk. The system is running. The server received the request and returned a response. Thank you!
"""


def build_tokenizer(vocab_size: int = 1024):
    """A trained byte-level BPE tokenizer (PreTrainedTokenizerFast) with ChatML chat template.

    Deterministic for a given vocab_size. Ids 0-4 are <pad>, <s>, </s>, <|im_start|>, <|im_end|>;
    <s> is prepended to every encoded text, as Llama tokenizers do, so no prompt is empty.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator([line for line in _CORPUS.splitlines() if line], trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", BOS_ID)])
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>",
                                   additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    fast.chat_template = CHAT_TEMPLATE
    fast.model_max_length = 2048
    return fast


def _build_default_model(path: str) -> None:
    """Write the default model's files (config, safetensors weights, tokenizer) into path."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer(1024)
    config = LlamaConfig(
        vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
        rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=BOS_ID, eos_token_id=EOS_ID,
        pad_token_id=PAD_ID, initializer_range=0.15, dtype="float32")
    config.architectures = ["LlamaForCausalLM"]
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.float32)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)


def default_model_dir() -> Path:
    """Where the default model is cached: $ASERVE_CACHE_DIR or ~/.cache/aserve, + a version."""
    root = os.environ.get("ASERVE_CACHE_DIR") or os.path.join(Path.home(), ".cache", "aserve")
    return Path(root) / _CACHE_SUBDIR


def default_model_path() -> str:
    """The local folder of the default model, building it on first use.

    Built in a temporary sibling folder and renamed into place, so a crash or a concurrent
    builder never leaves a half-written model behind (the loser of a rename race just uses
    the winner's identical folder).
    """
    target = default_model_dir()
    if (target / "config.json").is_file():
        return str(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".building-", dir=target.parent)
    try:
        _build_default_model(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(target)
