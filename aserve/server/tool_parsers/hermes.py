"""Hermes-style tool calls (Hermes, Qwen2.5, Qwen3 and many others)."""

from __future__ import annotations

import json
import re
from typing import Optional, Sequence

from aserve.server.tool_parsers.base import (Delta, ToolCall, ToolParser, call_arguments, call_header,
                                             new_call_id, partial_suffix)


class HermesToolParser(ToolParser):
    """Hermes style (Hermes, Qwen2.5, many others): <tool_call>{"name": ..., "arguments":
    {...}}</tool_call> blocks; the text before the first one is the content. A last block the
    output ended inside (no closing tag) still counts when its JSON is whole, as in vLLM."""

    START, END = "<tool_call>", "</tool_call>"
    _BLOCK = re.compile(r"<tool_call>(.*?)</tool_call>|<tool_call>(.*)\Z", re.DOTALL)

    def __init__(self, tools: Sequence = ()) -> None:   # the calls are JSON: no schema needed
        self._pending = ""      # text not yet sent: a possible start tag, or an open block
        self._in_block = False
        self._num_calls = 0

    def extract(self, text: str) -> tuple[Optional[str], list[ToolCall]]:
        if self.START not in text:
            return text, []
        calls = []
        for closed, unclosed in self._BLOCK.findall(text):
            call = _parse_call(closed or unclosed)
            if call is None:
                return text, []   # not a well-formed call: the text is plain content
            calls.append(ToolCall(call[0], call[1], new_call_id()))
        content = text[:text.index(self.START)]
        return (content or None), calls

    # ------------------------------------------------------------------ streaming
    @property
    def called(self) -> bool:
        return self._num_calls > 0

    def feed(self, text: str) -> Delta:
        self._pending += text
        out = Delta()
        while True:
            if not self._in_block:
                start = self._pending.find(self.START)
                if start < 0:
                    # Hold back a tail that may be the start of a tag split across deltas.
                    cut = len(self._pending) - partial_suffix(self._pending, self.START)
                    self._add_content(out, self._pending[:cut])
                    self._pending = self._pending[cut:]
                    return out
                self._add_content(out, self._pending[:start])
                self._pending, self._in_block = self._pending[start + len(self.START):], True
            end = self._pending.find(self.END)
            if end < 0:
                return out
            self._emit_call(out, self._pending[:end], self.START + self._pending[:end + len(self.END)])
            self._pending, self._in_block = self._pending[end + len(self.END):], False

    def finish(self) -> Delta:
        out = Delta()
        if self._in_block:
            self._emit_call(out, self._pending, self.START + self._pending)
        else:
            self._add_content(out, self._pending)
        self._pending, self._in_block = "", False
        return out

    def _add_content(self, out: Delta, text: str) -> None:
        # Text after the first call is not content (extract() keeps only the text before it).
        if text and not self.called:
            out.content += text

    def _emit_call(self, out: Delta, body: str, raw: str) -> None:
        call = _parse_call(body)
        if call is None:   # not a call after all: it was text
            self._add_content(out, raw)
            return
        out.tool_calls.append(call_header(self._num_calls, call[0]))
        out.tool_calls.append(call_arguments(self._num_calls, call[1]))
        self._num_calls += 1


def _parse_call(body: str) -> Optional[tuple[str, str]]:
    """(name, arguments JSON) of one Hermes call body, or None if it is not one."""
    try:
        call = json.loads(body)
    except ValueError:
        return None
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        return None
    return call["name"], json.dumps(call.get("arguments", {}), ensure_ascii=False)
