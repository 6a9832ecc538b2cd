"""Cost of structured outputs' grammar masks per step (llguidance), on a large vocabulary.

    python bench/grammar_mask.py [--vocab 50272] [--rows 1,16,64,256] [--steps 30]

No hub here, so the vocabulary is a byte-level BPE trained on generated text to --vocab
tokens (model A's size by default, OPT-125m's 50272). For each batch size, that many
sequences under a JSON schema (and, separately, a regex) each take --steps tokens through
their grammar, chosen at random among the allowed ones; the time to fill all rows' masks for
a step (fill_next_token_bitmask_par, the call the sampler makes) is reported, median over the
steps, with the time to make a matcher and the tokenizer's one-time conversion.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time

import numpy as np

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 20}, "age": {"type": "integer"},
    "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 5},
    "role": {"enum": ["admin", "user", "guest"]}}, "required": ["name", "age", "role"]}


def train_tokenizer(vocab: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(0)
    syllables = [a + b for a in "bcdfghjklmnprstvwz" for b in "aeiouy"] + list("0123456789{}[]\":,. ")
    words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(60000)]
    lines = [" ".join(rng.choice(words) for _ in range(12)) for _ in range(60000)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(lines, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab", type=int, default=50272)
    p.add_argument("--rows", default="1,16,64,256")
    p.add_argument("--steps", type=int, default=30)
    args = p.parse_args()
    import llguidance
    import llguidance.hf
    import llguidance.numpy as lnp

    start = time.perf_counter()
    hf_tok = train_tokenizer(args.vocab)
    trained = time.perf_counter() - start
    start = time.perf_counter()
    tokenizer = llguidance.hf.from_tokenizer(hf_tok, n_vocab=args.vocab)
    converted = time.perf_counter() - start
    print(json.dumps({"vocab": args.vocab, "trained_vocab": len(hf_tok), "train_s": round(trained, 1),
                      "llguidance_tokenizer_s": round(converted, 3), "llguidance": llguidance.get_version()}))
    executor = llguidance.LLExecutor()
    grammars = {"json": llguidance.LLMatcher.grammar_from_json_schema(json.dumps(SCHEMA)),
                "regex": llguidance.LLMatcher.grammar_from_regex(r"[a-z ]{10,200}\.")}
    rng = np.random.default_rng(0)
    for name, grammar in grammars.items():
        for rows in [int(r) for r in args.rows.split(",")]:
            made = time.perf_counter()
            matchers = [llguidance.LLMatcher(tokenizer, grammar) for _ in range(rows)]
            make_ms = (time.perf_counter() - made) * 1e3 / rows
            bitmask = lnp.allocate_token_bitmask(rows, args.vocab)
            times = []
            for _ in range(args.steps):
                t0 = time.perf_counter()
                lnp.fill_next_token_bitmask_par(executor, [(m, i) for i, m in enumerate(matchers)], bitmask)
                times.append(time.perf_counter() - t0)
                for i, m in enumerate(matchers):   # advance each along a random allowed token
                    if m.is_stopped():
                        continue
                    bits = np.unpackbits(bitmask[i].view(np.uint8), bitorder="little")[:args.vocab]
                    allowed = np.flatnonzero(bits)
                    m.consume_token(int(rng.choice(allowed)))
            print(json.dumps({"grammar": name, "rows": rows, "mask_ms_p50": round(statistics.median(times) * 1e3, 3),
                              "mask_ms_max": round(max(times) * 1e3, 3),
                              "make_matcher_ms": round(make_ms, 3)}), flush=True)


if __name__ == "__main__":
    main()
