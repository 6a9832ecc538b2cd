"""Tool-call parsers for tool_choice "auto": the model writes its calls in its own format (its
chat template teaches it), and a parser finds them in the text, as vLLM's --tool-call-parser.

A parser works on a finished text (extract) and on a stream of text deltas (feed, then finish),
one instance per choice. PARSERS is the seam: add a class and its --tool-call-parser name.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Optional


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str          # JSON text, as OpenAI sends it
    id: str


def new_call_id() -> str:
    return f"chatcmpl-tool-{uuid.uuid4().hex}"   # vLLM's shape


@dataclass
class Delta:
    """What one step of a stream adds to a choice: content text and tool-call fragments in
    OpenAI's delta shape ({"index", "id", "type", "function": {"name", "arguments"}} first,
    then {"index", "function": {"arguments"}})."""

    content: str = ""
    tool_calls: list = field(default_factory=list)


def call_header(index: int, name: str, arguments: str = "") -> dict:
    return {"index": index, "id": new_call_id(), "type": "function",
            "function": {"name": name, "arguments": arguments}}


def call_arguments(index: int, arguments: str) -> dict:
    return {"index": index, "function": {"arguments": arguments}}


class ToolParser:
    """The seam: extract() for a finished text, feed()/finish() for a stream."""

    def extract(self, text: str) -> tuple[Optional[str], list[ToolCall]]:
        """(the message content, the calls) of a finished output."""
        raise NotImplementedError

    def feed(self, text: str) -> Delta:
        raise NotImplementedError

    def finish(self) -> Delta:
        """What the stream held back, once the output is finished."""
        raise NotImplementedError

    @property
    def called(self) -> bool:
        """Whether the stream has sent a tool call."""
        raise NotImplementedError


class HermesToolParser(ToolParser):
    """Hermes style (Hermes, Qwen2.5, many others): <tool_call>{"name": ..., "arguments":
    {...}}</tool_call> blocks; the text before the first one is the content. A last block the
    output ended inside (no closing tag) still counts when its JSON is whole, as in vLLM."""

    START, END = "<tool_call>", "</tool_call>"
    _BLOCK = re.compile(r"<tool_call>(.*?)</tool_call>|<tool_call>(.*)\Z", re.DOTALL)

    def __init__(self) -> None:
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
                    cut = len(self._pending) - _partial_suffix(self._pending, self.START)
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


def _partial_suffix(text: str, tag: str) -> int:
    """The length of the longest end of text that is a proper start of tag."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


# --tool-call-parser NAME -> its parser class.
PARSERS: dict[str, type[ToolParser]] = {"hermes": HermesToolParser}
