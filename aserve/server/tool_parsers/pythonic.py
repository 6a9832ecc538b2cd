"""Python-call lists: [get_weather(city="Paris"), get_time()], as Llama 3.2 and Llama 4 write
them with vLLM's pythonic templates (vLLM's --tool-call-parser pythonic)."""

from __future__ import annotations

import ast
import json
from typing import Optional

from aserve.server.tool_parsers.base import CallBlockParser, ParsedCalls, opening_or_tag


class PythonicToolParser(CallBlockParser):
    """The answer is a Python list of calls with keyword arguments whose values are literals
    (Llama 4 wraps it in <|python_start|>...<|python_end|>). A `[` starts the calls only at the
    start of the answer; the list goes out once it is whole, since only then is it Python."""

    START, END = "<|python_start|>", "<|python_end|>"

    def find_start(self, text: str) -> tuple[int, int]:
        return opening_or_tag(text, self.content_so_far, "[", self.START)

    def parse_calls(self, body: str, final: bool) -> ParsedCalls:
        code = body.replace(self.START, "").replace(self.END, "").strip()
        if not final and not code.endswith("]"):
            return ParsedCalls([], 0)
        try:
            tree = ast.parse(code, mode="eval").body
        except (SyntaxError, ValueError, MemoryError, RecursionError):   # not (yet) Python
            return ParsedCalls([], 0, valid=not final)
        calls = _calls_of(tree)
        if calls is None:
            return ParsedCalls([], 0, valid=False)
        return ParsedCalls(calls, len(body))


def _calls_of(tree: ast.AST) -> Optional[list[tuple[str, str]]]:
    """[(name, arguments JSON)] of a list of f(key=literal, ...) calls, else None."""
    if not isinstance(tree, ast.List) or not tree.elts:
        return None
    calls = []
    for node in tree.elts:
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name) or node.args:
            return None
        arguments = {}
        for keyword in node.keywords:
            if keyword.arg is None:      # **kwargs
                return None
            try:
                arguments[keyword.arg] = ast.literal_eval(keyword.value)
            except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
                return None
        try:
            calls.append((node.func.id, json.dumps(arguments, ensure_ascii=False)))
        except TypeError:                # a literal JSON has no form for (a set, bytes)
            return None
    return calls
