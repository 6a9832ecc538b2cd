"""What structured outputs cost: model A's throughput with a share of its requests under a grammar.

    python bench/structured.py [--num-prompts 1000] [--fractions 0,0.5,1] [--tiny]

Model A of bench/workloads.py (OPT-125m shape, float16, random weights) with a byte-level BPE
tokenizer of model A's vocabulary size trained here (no hub: see bench/grammar_mask.py), so the
grammar engine works on a realistic vocabulary. Every request: 128 random prompt tokens, up to
128 output tokens, temperature 1. A --fractions share of them is constrained by a JSON schema
(an object holding a long array of short strings, so that a constrained output runs to its
max_tokens like a free one); the rest are free with ignore_eos. Default engine settings (CUDA
graphs, async scheduling), one warm-up round, then one timed round per fraction.

Prints one JSON line per fraction: output tokens/s, elapsed, the mean output length of the
constrained and free requests, how many constrained outputs a fresh matcher of the schema
accepts token by token (a cut-off one, finish_reason "length", as a prefix), and how many ran
to completion and then parse and validate against the schema.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

from grammar_mask import train_tokenizer  # noqa: E402
from workloads import MODEL_DTYPES, hf_config  # noqa: E402

SCHEMA = {"type": "object", "properties": {
    "items": {"type": "array", "items": {"type": "string", "maxLength": 8}, "minItems": 60},
    "count": {"type": "integer"}}, "required": ["items", "count"]}


def _params(constrained: bool, output_len: int):
    from aserve import SamplingParams
    from aserve.structured_output import StructuredOutputsParams

    if constrained:
        return SamplingParams(temperature=1.0, max_tokens=output_len, seed=None,
                              structured_outputs=StructuredOutputsParams(json=SCHEMA))
    return SamplingParams(temperature=1.0, max_tokens=output_len, ignore_eos=True)


def _grammar_checker(hf_tokenizer):
    """A function telling whether a token sequence is one the schema's grammar accepts (as a
    prefix: an output cut at max_tokens is one), replayed through a fresh llguidance matcher."""
    import llguidance
    import llguidance.hf

    tokenizer = llguidance.hf.from_tokenizer(hf_tokenizer)
    grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(SCHEMA))

    def accepts(token_ids, eos_id) -> bool:
        matcher = llguidance.LLMatcher(tokenizer, grammar)
        ids = token_ids[:-1] if token_ids and token_ids[-1] == eos_id else token_ids
        return all(matcher.consume_token(t) for t in ids) and not matcher.is_error()
    return accepts


def _round(llm, prompts, fraction: float, output_len: int, accepts) -> dict:
    every = round(1 / fraction) if fraction else 0
    constrained = [bool(every) and i % every == 0 for i in range(len(prompts))] if fraction < 1 else \
        [True] * len(prompts)
    params = [_params(c, output_len) for c in constrained]
    start = time.perf_counter()
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    lengths = {True: [], False: []}
    complete = valid = grammatical = 0
    eos_id = llm.get_tokenizer().eos_token_id
    for c, out in zip(constrained, outputs):
        sample = out.outputs[0]
        lengths[c].append(len(sample.token_ids))
        if c:
            grammatical += accepts(list(sample.token_ids), eos_id)
        if c and sample.finish_reason == "stop":
            complete += 1
            valid += _validates(sample.text)
    total = sum(len(o.outputs[0].token_ids) for o in outputs)
    mean = {k: round(float(np.mean(v)), 1) if v else None for k, v in lengths.items()}
    return {"fraction_constrained": fraction, "requests": len(prompts), "output_tokens": total,
            "output_tokens_per_s": round(total / elapsed, 1), "elapsed_s": round(elapsed, 3),
            "mean_len_constrained": mean[True], "mean_len_free": mean[False],
            "constrained_in_grammar": grammatical, "constrained_complete": complete,
            "complete_and_valid": valid}


def _validates(text: str) -> bool:
    """SCHEMA checked by hand: the GPU machine's image has no jsonschema."""
    try:
        value = json.loads(text)
    except ValueError:
        return False
    items = value.get("items") if isinstance(value, dict) else None
    return (isinstance(value.get("count") if items is not None else None, int) and isinstance(items, list)
            and len(items) >= 60 and all(isinstance(i, str) and len(i) <= 8 for i in items))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-prompts", type=int, default=1000)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--fractions", default="0,0.5,1")
    p.add_argument("--tiny", action="store_true", help="2-layer model A, 64 prompts: a CPU smoke run")
    args = p.parse_args()
    from aserve import OfflineLLM, SamplingParams

    num_prompts = 64 if args.tiny else args.num_prompts
    with tempfile.TemporaryDirectory() as folder:
        config = hf_config("opt", args.tiny)
        start = time.perf_counter()
        tokenizer = train_tokenizer(config.vocab_size)
        tokenizer.save_pretrained(folder)
        # OPT's config names id 2 as EOS, a plain byte in the trained vocabulary: the engine would
        # stop wherever the grammar allows that byte. The tokenizer's </s> is the one EOS here.
        config.bos_token_id = config.eos_token_id = config.pad_token_id = tokenizer.eos_token_id
        config.save_pretrained(folder)
        print(json.dumps({"tokenizer_trained_s": round(time.perf_counter() - start, 1),
                          "vocab": config.vocab_size}), flush=True)
        accepts = _grammar_checker(tokenizer)
        llm = OfflineLLM(model=folder, load_format="dummy", dtype="float32" if args.tiny else MODEL_DTYPES["opt"],
                         max_model_len=2048, seed=0)
        # Fresh prompts for the warm-up and for each round: prompts seen before would start from
        # the prefix cache (on by default) and skip their prefill.
        def fresh_prompts(seed: int, count: int) -> list[list[int]]:
            return np.random.RandomState(seed).randint(100, 30000, size=(count, args.input_len)).tolist()

        # Warm-up: graphs, the grammar's compile and the tokenizer's conversion for llguidance.
        warm_up = fresh_prompts(1000, 32)
        llm.generate([{"prompt_token_ids": q} for q in warm_up],
                     [_params(i % 2 == 0, 16) for i in range(32)], use_tqdm=False)
        llm.generate([{"prompt_token_ids": q} for q in warm_up[:8]],
                     SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False)
        for seed, fraction in enumerate(float(f) for f in args.fractions.split(",")):
            prompts = fresh_prompts(seed, num_prompts)
            print(json.dumps(_round(llm, prompts, fraction, args.output_len, accepts)), flush=True)
        llm.shutdown()


if __name__ == "__main__":
    main()
