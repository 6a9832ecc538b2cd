"""The grammar engine behind structured outputs: llguidance.

Chosen over xgrammar and outlines-core (bench/RESULTS.md has the figures): an MIT-licensed,
3 MB abi3 wheel with no dependencies (xgrammar pulls in triton and tvm-ffi), JSON schemas,
regexes and Lark grammars (GBNF converted), and masks computed on demand with no up-front
tables per grammar. A grammar's text is compiled once per (kind, spec) and cached; each
sequence gets its own matcher, made off the caller's thread.

Thread safety: the server validates a request's grammar at the door (validate(), in this
backend's pool), the engine thread checks it again when the request is added (check(), then a
cache hit, so the engine thread never compiles a grammar the server has seen) and asks for its
matcher (matcher(), made in the pool). The grammar cache is the only shared state: a lock
guards it. Matchers are used by one thread at a time: the pool makes one, the engine thread
alone uses it after that.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Optional

from aserve.structured_output.params import StructuredOutputsParams

logger = logging.getLogger(__name__)

_GRAMMAR_CACHE_SIZE = 512


class GrammarBackend:
    def __init__(self, tokenizer, vocab_size: int) -> None:
        self._tokenizer = tokenizer
        self._vocab_size = vocab_size
        self._executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="aserve-grammar")
        # llguidance's view of the tokenizer (about a second for a 128k vocabulary): built in
        # the background from the start, so the first structured request rarely waits for it.
        self._ll_tokenizer: Future = self._executor.submit(self._build_tokenizer)
        # (kind, spec, whitespace) -> [grammar text, validated against the tokenizer yet].
        self._grammars: OrderedDict[tuple[str, str, bool], list] = OrderedDict()
        self._lock = threading.Lock()

    def _build_tokenizer(self):
        import llguidance.hf

        return llguidance.hf.from_tokenizer(self._tokenizer, n_vocab=self._vocab_size)

    # ------------------------------------------------------------------ at the door
    def check(self, params: StructuredOutputsParams) -> None:
        """ValueError naming the field when the schema, regex or grammar cannot be used (a full
        compile against the tokenizer, done once per grammar: later calls are cache hits)."""
        import llguidance

        entry = self._entry(params)
        if entry[1]:
            return
        error = llguidance.LLMatcher.validate_grammar(entry[0], self._ll_tokenizer.result())
        if error:
            raise ValueError(f"structured_outputs.{params.kind} is not usable: {error.strip()}")
        entry[1] = True

    def is_validated(self, params: StructuredOutputsParams) -> bool:
        """Whether check() has passed for this grammar already (a dict lookup, never a compile:
        callers on an event loop skip the thread hop for a schema seen before)."""
        with self._lock:
            entry = self._grammars.get((params.kind, params.spec, params.disable_any_whitespace))
        return entry is not None and entry[1]

    def validate(self, params: StructuredOutputsParams) -> Future:
        """check() in this backend's pool: a future that raises check()'s ValueError."""
        return self._executor.submit(self.check, params)

    def matcher(self, params: StructuredOutputsParams) -> Future:
        """A future of a fresh matcher at the start of the grammar (made in a worker thread)."""
        return self._executor.submit(self._new_matcher, params)

    def _new_matcher(self, params: StructuredOutputsParams):
        import llguidance

        # log_level 0: llguidance would print its own warnings to stderr (a whole parser state per
        # refused token); the errors reach the request through get_error() instead.
        matcher = llguidance.LLMatcher(self._ll_tokenizer.result(), self._entry(params)[0], log_level=0)
        if matcher.is_error():
            raise ValueError(f"structured_outputs.{params.kind} is not usable: {matcher.get_error()}")
        return matcher

    # ------------------------------------------------------------------ grammars
    def _entry(self, params: StructuredOutputsParams) -> list:
        key = (params.kind, params.spec, params.disable_any_whitespace)
        with self._lock:
            entry = self._grammars.get(key)
            if entry is not None:
                self._grammars.move_to_end(key)
                return entry
        entry = [_compile(params), False]   # outside the lock: a large schema takes a while
        with self._lock:
            entry = self._grammars.setdefault(key, entry)
            if len(self._grammars) > _GRAMMAR_CACHE_SIZE:
                self._grammars.popitem(last=False)
        return entry

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


def _compile(params: StructuredOutputsParams) -> str:
    """The llguidance grammar text of a constraint."""
    from llguidance import LLMatcher
    from llguidance.gbnf_to_lark import any_to_lark

    options: Optional[dict] = {"whitespace_flexible": False} if params.disable_any_whitespace else None
    try:
        if params.kind == "json":
            return LLMatcher.grammar_from_json_schema(params.spec, defaults=options)
        if params.kind == "json_object":
            return LLMatcher.grammar_from_json_schema(json.dumps({"type": "object"}), defaults=options)
        if params.kind == "regex":
            return LLMatcher.grammar_from_regex(params.spec)
        if params.kind == "structural_tag":
            return _structural_tag_grammar(json.loads(params.spec))
        if params.kind == "choice":
            # Lark string literals take JSON's quoting, so any text is matched literally.
            return LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in params.choice))
        return LLMatcher.grammar_from_lark(any_to_lark(params.spec))
    except Exception as exc:  # a parse error of the user's text: a bad request
        raise ValueError(f"structured_outputs.{params.kind} is not usable: {exc}") from None


def _structural_tag_grammar(tag: dict) -> str:
    """Free text in which each trigger, once written, must go on as one of the structures
    that begin with it (llguidance's lazy lexemes)."""
    from llguidance import StructTag

    tags = [StructTag(trigger=next(t for t in tag["triggers"] if s["begin"].startswith(t)),
                      begin=s["begin"], grammar=s["schema"], end=s["end"]) for s in tag["structures"]]
    return StructTag.to_grammar(tags)
