"""What every tool-call parser shares: the call and delta shapes, the parser seam, and the
streaming frame of the formats whose calls follow a marker (CallBlockParser)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

from aserve.server.random_ids import random_hex_id


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str          # JSON text, as OpenAI sends it
    id: str


def new_call_id() -> str:
    return f"chatcmpl-tool-{random_hex_id()}"   # vLLM's shape


@dataclass
class Delta:
    """What one step of a stream adds to a choice: content text and tool-call fragments in
    OpenAI's delta shape ({"index", "id", "type", "function": {"name", "arguments"}} first,
    then {"index", "function": {"arguments"}})."""

    content: str = ""
    tool_calls: list = field(default_factory=list)


def call_header(index: int, name: str, arguments: str = "", call_id: Optional[str] = None) -> dict:
    return {"index": index, "id": call_id or new_call_id(), "type": "function",
            "function": {"name": name, "arguments": arguments}}


def call_arguments(index: int, arguments: str) -> dict:
    return {"index": index, "function": {"arguments": arguments}}


class ToolParser:
    """The seam: extract() for a finished text, feed()/finish() for a stream.

    A parser class is built with the request's tools (objects with .name and .parameters, a
    JSON schema), which formats that write arguments as text need to type them.
    keeps_special_tokens: the format's marker is a special token, so a request parsed with
    it must not skip special tokens (vLLM's adjust_request does the same)."""

    keeps_special_tokens = False

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


def partial_suffix(text: str, tag: str) -> int:
    """The length of the longest end of text that is a proper start of tag."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


def opening_or_tag(text: str, content_so_far: str, opening: str, tag: str) -> tuple[int, int]:
    """find_start() of formats whose calls open the answer with `opening` (`{`, `[`) or follow
    a tag anywhere: the opening counts only before any other content, so a later one (code in
    an answer) is text; while only whitespace has come, all of it is held."""
    at = text.find(tag)
    if not content_so_far.strip():
        lead = len(text) - len(text.lstrip())
        if lead == len(text):
            return -1, len(text)
        if text[lead] == opening and (at < 0 or lead < at):
            return lead, 0
    return at, (0 if at >= 0 else partial_suffix(text, tag))


@dataclass
class ParsedCalls:
    """What CallBlockParser.parse_calls found at the start of the held text."""

    calls: list[tuple[str, str]]    # (name, arguments JSON text), each one whole
    consumed: int                   # characters of the held text those calls took
    valid: bool = True              # False: what follows is not a call of this format


class CallBlockParser(ToolParser):
    """The frame of formats whose calls come after a marker (`[TOOL_CALLS]`, `<tool_call>`, a
    leading `{` or `[`): text before the marker is content and streams as it comes (a tail
    that may begin a marker is held back); from the marker on the text is held, and each call
    goes out whole (header and arguments in one delta) as soon as parse_calls finds it
    complete. Held text that turns out not to be calls becomes content, unless calls were
    already made: as with vLLM, text after the first call is not content.

    extract() runs the same stream over the whole text, so a streamed answer and an unstreamed
    one agree. Subclasses give find_start() and parse_calls()."""

    def __init__(self, tools: Sequence = ()) -> None:
        self.tool_schemas = {t.name: t.parameters for t in tools}
        self._pending = ""          # text not yet sent: a possible marker, or the held calls
        self._in_calls = False
        self._content = ""          # content sent so far
        self._num_calls = 0

    # ------------------------------------------------------------------ the format
    def find_start(self, text: str) -> tuple[int, int]:
        """(where the first marker starts in text, or -1; how long a tail of text may be the
        start of a marker, to hold back). self.content_so_far is the content sent before."""
        raise NotImplementedError

    def parse_calls(self, body: str, final: bool) -> ParsedCalls:
        """The whole calls at the start of body (the held text, from the marker on); final:
        the output has ended, so nothing more will complete a call."""
        raise NotImplementedError

    new_id: Callable[[], str] = staticmethod(new_call_id)

    @property
    def content_so_far(self) -> str:
        return self._content

    # ------------------------------------------------------------------ streaming
    @property
    def called(self) -> bool:
        return self._num_calls > 0

    def feed(self, text: str) -> Delta:
        self._pending += text
        out = Delta()
        if not self._in_calls:
            start, hold = self.find_start(self._pending)
            if start < 0:
                cut = len(self._pending) - hold
                self._add_content(out, self._pending[:cut])
                self._pending = self._pending[cut:]
                return out
            self._add_content(out, self._pending[:start])
            self._pending, self._in_calls = self._pending[start:], True
        self._take_calls(out, final=False)
        return out

    def finish(self) -> Delta:
        out = Delta()
        if self._in_calls:
            self._take_calls(out, final=True)
        self._add_content(out, self._pending)
        self._pending, self._in_calls = "", False
        return out

    def _take_calls(self, out: Delta, final: bool) -> None:
        parsed = self.parse_calls(self._pending, final)
        for name, arguments in parsed.calls:
            out.tool_calls.append(call_header(self._num_calls, name, call_id=self.new_id()))
            out.tool_calls.append(call_arguments(self._num_calls, arguments))
            self._num_calls += 1
        self._pending = self._pending[parsed.consumed:]
        if not parsed.valid:
            # Not calls after all: the held text is content (dropped after a call, see above).
            self._add_content(out, self._pending)
            self._pending, self._in_calls = "", False

    def _add_content(self, out: Delta, text: str) -> None:
        if text and not self.called:
            out.content += text
            self._content += text

    # ------------------------------------------------------------------ a finished text
    def extract(self, text: str) -> tuple[Optional[str], list[ToolCall]]:
        first, rest = self.feed(text), self.finish()
        deltas = first.tool_calls + rest.tool_calls
        if not deltas:
            return text, []
        content = first.content + rest.content
        return (content if content.strip() else None), calls_from_deltas(deltas)


def calls_from_deltas(deltas: list[dict]) -> list[ToolCall]:
    """The calls that a stream's tool-call fragments add up to."""
    calls: dict[int, list] = {}
    for delta in deltas:
        function = delta["function"]
        if "id" in delta:
            calls[delta["index"]] = [delta["id"], function["name"], function.get("arguments", "")]
        else:
            calls[delta["index"]][2] += function["arguments"]
    return [ToolCall(name, arguments, call_id) for call_id, name, arguments in calls.values()]
