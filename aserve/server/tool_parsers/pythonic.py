"""Python-call lists: [get_weather(city="Paris"), get_time()], as Llama 3.2 and Llama 4 write
them with vLLM's pythonic templates (vLLM's --tool-call-parser pythonic); and OLMo 3's calls, one
a line inside <function_calls> (olmo3)."""

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


def _calls_of(tree: ast.AST, json_names: bool = False) -> Optional[list[tuple[str, str]]]:
    """[(name, arguments JSON)] of a list of f(key=literal, ...) calls, else None. json_names:
    JSON's null, true and false count as literals too (OLMo 3 writes them, its tools being
    described in JSON; vLLM's pythonic parser takes Python's only)."""
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
                value = _JsonNames().visit(keyword.value) if json_names else keyword.value
                arguments[keyword.arg] = ast.literal_eval(value)
            except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
                return None
        try:
            calls.append((node.func.id, json.dumps(arguments, ensure_ascii=False)))
        except TypeError:                # a literal JSON has no form for (a set, bytes)
            return None
    return calls


class _JsonNames(ast.NodeTransformer):
    """JSON's null, true and false as Python's None, True and False."""

    VALUES = {"null": None, "true": True, "false": False}

    def visit_Name(self, node: ast.Name) -> ast.AST:
        return ast.Constant(self.VALUES[node.id]) if node.id in self.VALUES else node


class Olmo3ToolParser(CallBlockParser):
    """OLMo 3 (vLLM's olmo3): <function_calls> opening the answer, then one Python call a line,
    then </function_calls>. As vLLM's streaming parser, calls come only at the start of the
    answer; the block goes out once it is closed (or the output ends), since only whole lines
    are Python."""

    OPEN, CLOSE = "<function_calls>", "</function_calls>"

    def find_start(self, text: str) -> tuple[int, int]:
        if self.content_so_far.strip():
            return -1, 0
        rest = text.lstrip()
        if rest.startswith(self.OPEN):
            return len(text) - len(rest), 0
        return -1, (len(text) if self.OPEN.startswith(rest) else 0)   # undecided: hold it all

    def parse_calls(self, body: str, final: bool) -> ParsedCalls:
        inner = body[len(self.OPEN):]
        end = inner.find(self.CLOSE)
        if end < 0 and not final:
            return ParsedCalls([], 0)
        lines = [line.strip() for line in (inner if end < 0 else inner[:end]).splitlines() if line.strip()]
        try:
            tree = ast.parse(f"[{', '.join(lines)}]", mode="eval").body
        except (SyntaxError, ValueError, MemoryError, RecursionError):
            return ParsedCalls([], 0, valid=False)
        calls = _calls_of(tree, json_names=True)
        if calls is None:
            return ParsedCalls([], 0, valid=False)
        return ParsedCalls(calls, len(body) if end < 0 else len(self.OPEN) + end + len(self.CLOSE))
