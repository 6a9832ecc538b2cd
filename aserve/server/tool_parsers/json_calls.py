"""Formats whose calls are JSON objects after a marker: Llama 3's (llama3_json), Mistral's,
Granite's and Phi-4-mini's (phi4_mini_json)."""

from __future__ import annotations

import json
import random
import re
import string
from typing import Any, Optional

from aserve.server.tool_parsers.base import CallBlockParser, ParsedCalls, opening_or_tag, partial_suffix

_DECODER = json.JSONDecoder()


def _call_of(obj: Any, arguments_keys: tuple[str, ...]) -> Optional[tuple[str, str]]:
    """(name, arguments JSON) of {"name": ..., <an arguments key>: {...}}, else None."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    for key in arguments_keys:
        if key in obj:
            arguments = obj[key]
            break
    else:
        return None
    if isinstance(arguments, str):   # some models write the arguments as JSON text
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return None
    if not isinstance(arguments, dict):
        return None
    return obj["name"], json.dumps(arguments, ensure_ascii=False)


def _skip_space(body: str, pos: int, also: str = "") -> int:
    while pos < len(body) and (body[pos].isspace() or body[pos] in also):
        pos += 1
    return pos


class Llama3JsonToolParser(CallBlockParser):
    """Llama 3.1-3.3 (and 4) with vLLM's JSON tool template: the answer is one call,
    {"name": ..., "parameters": {...}} ("arguments" also taken), or several separated by
    ";", after an optional <|python_tag|>. As vLLM's streaming parser, a `{` starts calls only
    at the start of the answer (a later one is text, such as code); <|python_tag|> anywhere."""

    TAG = "<|python_tag|>"

    def find_start(self, text: str) -> tuple[int, int]:
        return opening_or_tag(text, self.content_so_far, "{", self.TAG)

    def parse_calls(self, body: str, final: bool) -> ParsedCalls:
        calls, pos, consumed = [], 0, 0    # consumed: the end of the last whole call
        while True:
            pos = _skip_space(body, pos, ";")
            if body.startswith(self.TAG, pos):
                pos += len(self.TAG)
                continue
            if pos == len(body):
                return ParsedCalls(calls, consumed)
            if body[pos] != "{":
                return ParsedCalls(calls, consumed, valid=False)
            try:
                obj, end = _DECODER.raw_decode(body, pos)
            except ValueError:
                # Not yet whole (or never): wait, unless nothing more will come.
                return ParsedCalls(calls, consumed, valid=not final)
            call = _call_of(obj, ("parameters", "arguments"))
            if call is None:
                return ParsedCalls(calls, consumed, valid=False)
            calls.append(call)
            pos = consumed = end


_MISTRAL_ID_CHARS = string.ascii_letters + string.digits
_MISTRAL_NAME = re.compile(r"[A-Za-z0-9_.\-]+")


def mistral_call_id() -> str:
    """Mistral's chat templates refuse any call id but 9 letters and digits."""
    return "".join(random.choices(_MISTRAL_ID_CHARS, k=9))


class MistralToolParser(CallBlockParser):
    """Mistral's [TOOL_CALLS] marker, followed by a JSON array (or object) of {"name",
    "arguments"} (Mistral-7B-Instruct-v0.3, Mixtral-8x22B), or by name[ARGS]{...} (the v11+
    tokenizers': Mistral-Small-3, Magistral, Devstral), one marker per call. The marker is a
    special token, so requests parsed with it keep special tokens in their text, as vLLM's do;
    call ids are 9 letters and digits, which Mistral's templates require."""

    TAG = "[TOOL_CALLS]"
    ARGS, CALL_ID = "[ARGS]", "[CALL_ID]"
    keeps_special_tokens = True
    new_id = staticmethod(mistral_call_id)

    def find_start(self, text: str) -> tuple[int, int]:
        at = text.find(self.TAG)
        return at, (0 if at >= 0 else partial_suffix(text, self.TAG))

    def parse_calls(self, body: str, final: bool) -> ParsedCalls:
        calls, pos, consumed = [], 0, 0    # consumed: the end of the last whole call
        while True:
            pos = _skip_space(body, pos)
            if body.startswith(self.TAG, pos):
                pos += len(self.TAG)
                continue
            if pos == len(body) or (not final and self.TAG.startswith(body[pos:])):
                return ParsedCalls(calls, consumed)
            found = self._json_calls(body, pos) if body[pos] in "[{" else self._named_call(body, pos)
            if found is None:      # incomplete: wait for more, unless the output has ended
                return ParsedCalls(calls, consumed, valid=not final)
            if not found:
                return ParsedCalls(calls, consumed, valid=False)
            more, pos = found
            calls += more
            consumed = pos

    def _json_calls(self, body: str, pos: int):
        """([calls], end) of a JSON array or object of calls at pos; None: not whole yet;
        (): not calls."""
        try:
            obj, end = _DECODER.raw_decode(body, pos)
        except ValueError:
            return None
        items = obj if isinstance(obj, list) else [obj]
        calls = [_call_of(item, ("arguments", "parameters")) for item in items]
        if not calls or None in calls:
            return ()
        return calls, end

    def _named_call(self, body: str, pos: int):
        """([(name, arguments)], end) of name[ARGS]{...} at pos (an optional [CALL_ID]id
        before [ARGS], which the v13 tokenizers write); None: not whole yet; (): not a call."""
        match = _MISTRAL_NAME.match(body, pos)
        if match is None:
            return ()
        name, pos = match.group(), match.end()
        if body.startswith(self.CALL_ID, pos):
            call_id = _MISTRAL_NAME.match(body, pos + len(self.CALL_ID))
            if call_id is None:
                return None if pos + len(self.CALL_ID) == len(body) else ()
            pos = call_id.end()
        if body.startswith(self.ARGS, pos):
            pos += len(self.ARGS)
        elif pos == len(body) or self.ARGS.startswith(body[pos:]) or self.CALL_ID.startswith(body[pos:]):
            return None
        found = self._json_object(body, pos)
        if found is None or not found:
            return found
        arguments, end = found
        return [(name, json.dumps(arguments, ensure_ascii=False))], end

    @staticmethod
    def _json_object(body: str, pos: int):
        if pos == len(body):
            return None
        if body[pos] != "{":
            return ()
        try:
            obj, end = _DECODER.raw_decode(body, pos)
        except ValueError:
            return None
        return (obj, end) if isinstance(obj, dict) else ()


def _json_list_of_calls(body: str, pos: int, final: bool) -> ParsedCalls:
    """The calls of a JSON array of {"name", "arguments"} objects at pos: whole calls once the
    array is whole, a wait while it may still come or complete (unless the output has ended),
    else not calls."""
    if pos == len(body) or body[pos] != "[":
        return ParsedCalls([], 0, valid=pos == len(body) and not final)
    try:
        items, end = _DECODER.raw_decode(body, pos)
    except ValueError:
        return ParsedCalls([], 0, valid=not final)
    calls = [_call_of(item, ("arguments", "parameters")) for item in items] if isinstance(items, list) else [None]
    if not calls or None in calls:
        return ParsedCalls([], 0, valid=False)
    return ParsedCalls(calls, end)


class GraniteToolParser(CallBlockParser):
    """IBM Granite 3.x (vLLM's granite): an answer that opens with a JSON array of {"name",
    "arguments"}, after <|tool_call|> (Granite 3.0's token) or <tool_call> (3.1 on), or bare. As
    vLLM's, calls come only at the start of the answer: once other text has come, it is all text."""

    MARKERS = ("<|tool_call|>", "<tool_call>")

    def find_start(self, text: str) -> tuple[int, int]:
        if self.content_so_far.strip():
            return -1, 0
        lead = len(text) - len(text.lstrip())
        rest = text[lead:]
        if rest.startswith(("[", *self.MARKERS)):
            return lead, 0
        if not rest or any(m.startswith(rest) for m in self.MARKERS):
            return -1, len(text)   # undecided: hold it all
        return -1, 0

    def parse_calls(self, body: str, final: bool) -> ParsedCalls:
        pos = _skip_space(body, 0)
        for marker in self.MARKERS:
            if body.startswith(marker, pos):
                pos = _skip_space(body, pos + len(marker))
            elif not final and marker.startswith(body[pos:]) and pos < len(body):
                return ParsedCalls([], 0)   # a marker still arriving
        return _json_list_of_calls(body, pos, final)


class Phi4MiniJsonToolParser(CallBlockParser):
    """Phi-4-mini (vLLM's phi4_mini_json): functools[{"name": ..., "arguments": {...}}, ...]
    anywhere in the answer; the text before it is the content."""

    TAG = "functools"

    def find_start(self, text: str) -> tuple[int, int]:
        at = text.find(self.TAG)
        return at, (0 if at >= 0 else partial_suffix(text, self.TAG))

    def parse_calls(self, body: str, final: bool) -> ParsedCalls:
        pos = _skip_space(body, 0)
        if pos == len(body):   # the calls so far were all there was
            return ParsedCalls([], pos)
        if not body.startswith(self.TAG, pos):
            waiting = not final and self.TAG.startswith(body[pos:])
            return ParsedCalls([], 0, valid=waiting)
        return _json_list_of_calls(body, _skip_space(body, pos + len(self.TAG)), final)
