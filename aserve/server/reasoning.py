"""Reasoning models' thinking apart from their answer (vLLM's --reasoning-parser: deepseek_r1,
qwen3, seed_oss with <seed:think> tags, mistral with Magistral's [THINK] tags).

DeepSeek-R1 and its distills (Llama and Qwen2 architectures), QwQ, Qwen3 and the like write
their thinking first and close it with </think> (the opening <think> comes from the chat
template's generation prompt, or from the model itself); what follows is the answer. The split
is by the tags in the output's text, so it never depends on how the tokenizer cut them:
- thinking still open (no </think> yet): all of it is reasoning (a cut-off output included);
- a prompt that already closed the thinking (a template asked not to think, which writes
  <think></think> itself, as Qwen3's enable_thinking=false does): all of the output is the answer.

The parsers differ where neither the prompt nor the output opened the thinking: deepseek_r1
takes the output as thinking all the same (R1 distills often leave <think> out), qwen3 as the
answer (Qwen3-Instruct-2507 and other models that do not think). qwen3 also ends the thinking
at a tool call written inside it (<tool_call> then <function=...>, as Qwen3.5 and Qwen3-Coder
do), as vLLM's qwen3 parser does.

Chat answers carry the thinking in the message's (and each delta's) `reasoning` field, as vLLM
does, and `include_reasoning: false` leaves it out; /v1/responses gives it as a reasoning item.
Tool calls are looked for in the answer only. A constraint (structured outputs, a forced tool
call) applies from the end of the thinking on: the engine waits for the </think> token before
it starts the grammar (StructuredOutputsParams.after_token_id), as vLLM's engine does.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

START, END = "<think>", "</think>"
TOOL_CALL, FUNCTION = "<tool_call>", "<function"
# --reasoning-parser NAME -> (its opening and closing tags, whether an output that nothing
# opened is thinking all the same, whether a tool call inside the thinking ends it).
_STYLES = {"deepseek_r1": (START, END, True, False),
           "qwen3": (START, END, False, True),
           "seed_oss": ("<seed:think>", "</seed:think>", True, False),   # Seed-OSS, as deepseek_r1
           "mistral": ("[THINK]", "[/THINK]", False, False)}            # Magistral: thinks only if it opens
PARSERS = tuple(_STYLES)


@dataclass(frozen=True)
class Split:
    reasoning: str
    content: str


class ReasoningParser:
    def __init__(self, name: str, tokenizer) -> None:
        if name not in PARSERS:
            raise ValueError(f"--reasoning-parser must be one of {', '.join(PARSERS)}, got {name!r}.")
        if tokenizer is None:
            raise ValueError("--reasoning-parser needs the model's tokenizer (not --skip-tokenizer-init).")
        self.start, self.end, self.thinks_unopened, self.tool_call_ends_thinking = _STYLES[name]
        vocab = tokenizer.get_vocab()
        self.start_id, self.end_id = vocab.get(self.start), vocab.get(self.end)
        if self.start_id is None or self.end_id is None:
            raise ValueError(f"--reasoning-parser {name}: this model's tokenizer has no {self.start} and "
                             f"{self.end} tokens, so it writes no thinking to take apart.")
        self.name = name
        self.tool_call_id = vocab.get(TOOL_CALL)

    def prompt_closed_thinking(self, prompt_ids: list[int]) -> bool:
        """Whether the prompt ends with its thinking closed (the last of the two tags in it is
        </think>): then the whole output is the answer."""
        return self._last_tag(prompt_ids) == self.end_id

    def thinking(self, prompt_ids: list[int]) -> Optional[bool]:
        """Whether the output starts inside the thinking: False after a prompt that closed it,
        True after one that opened it; None where the prompt has neither tag: then the output
        thinks if it opens with <think>, or (deepseek_r1) all the same."""
        last = self._last_tag(prompt_ids)
        if last is not None:
            return last == self.start_id
        return True if self.thinks_unopened else None

    def _last_tag(self, prompt_ids: list[int]) -> Optional[int]:
        for token_id in reversed(prompt_ids):
            if token_id == self.start_id or token_id == self.end_id:
                return token_id
        return None

    def split(self, text: str, finished: bool = True, thinking: Optional[bool] = True) -> Split:
        """The output text so far as reasoning and answer. Unfinished, a tail that could be the
        start of a tag is held back (it goes out once the next text shows what it is), so the
        pieces only ever grow. thinking: as thinking() gives it for the prompt."""
        if thinking is False:
            return Split("", text)
        body = text.lstrip()
        if body.startswith(self.start):
            body = body[len(self.start):]
        elif not finished and self.start.startswith(body):
            return Split("", "")   # maybe the model's own opening tag, still arriving
        elif thinking is None:
            return Split("", text)   # nothing opened the thinking: no thinking (qwen3, mistral)
        else:
            body = text
        reasoning, end, content = body.partition(self.end)
        if self.tool_call_ends_thinking:
            # Whichever ends the thinking first wins: a later </think> is then the answer's.
            # Before a </think>, a <tool_call> is whole or never (nothing more comes between).
            cut, held = _tool_call_in(reasoning, finished or bool(end))
            if cut is not None:
                return Split(body[:cut], "" if held else body[cut:])
        if end:
            return Split(reasoning, content)
        if not finished:
            reasoning = reasoning[:len(reasoning) - max(_tag_prefix_at_end(reasoning, self.end),
                                                        _tag_prefix_at_end(reasoning, TOOL_CALL)
                                                        if self.tool_call_ends_thinking else 0)]
        return Split(reasoning, "")

    def gate(self, params, prompt_ids: list[int]):
        """The request's sampling params with its constraint set to start after </think>
        (unless the output starts outside the thinking, or there is no constraint)."""
        constraint = params.structured_outputs
        if constraint is None or not self.thinking(prompt_ids):
            return params
        params = params.clone()
        params.structured_outputs = dataclasses.replace(constraint, after_token_id=self.end_id)
        return params


def _tool_call_in(reasoning: str, finished: bool) -> tuple[Optional[int], bool]:
    """(where a tool call written inside the thinking starts, or None; whether it is only
    maybe one yet: <tool_call> then, so far, what may begin <function=, held back)."""
    at = reasoning.find(TOOL_CALL)
    while at >= 0:
        after = reasoning[at + len(TOOL_CALL):].lstrip()
        if after.startswith(FUNCTION):
            return at, False
        if not finished and FUNCTION.startswith(after):
            return at, True
        at = reasoning.find(TOOL_CALL, at + 1)
    return None, False


def _tag_prefix_at_end(text: str, tag: str) -> int:
    """The length of the longest proper prefix of tag that text ends with."""
    for size in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:size]):
            return size
    return 0


class ReasoningProgress:
    """How much of one choice's reasoning and answer has been streamed."""

    __slots__ = ("reasoning_len", "content_len")

    def __init__(self) -> None:
        self.reasoning_len = self.content_len = 0

    def step(self, split: Split) -> tuple[str, str]:
        """The new reasoning and answer text since the last step."""
        reasoning = split.reasoning[self.reasoning_len:]
        content = split.content[self.content_len:]
        self.reasoning_len, self.content_len = len(split.reasoning), len(split.content)
        return reasoning, content


def reasoning_parser_for(name: Optional[str], tokenizer) -> Optional[ReasoningParser]:
    return None if name is None else ReasoningParser(name, tokenizer)


class ReasoningView:
    """One request's thinking and answer, choice by choice; with no parser, all is answer."""

    def __init__(self, parser: Optional[ReasoningParser], prompt_ids: list[int], include: bool = True,
                 num_choices: int = 1, separate: bool = True) -> None:
        self.parser = parser
        self.thinking = parser.thinking(prompt_ids) if parser is not None else False
        self.include = include   # the request's include_reasoning
        self.separate = separate   # its separate_reasoning (vLLM's): false puts the thinking in the content
        self._progress = [ReasoningProgress() for _ in range(num_choices)]

    @property
    def active(self) -> bool:
        return self.parser is not None

    def final(self, text: str) -> tuple[Optional[str], str]:
        """(the reasoning, None where there is none or it is not wanted; the answer)."""
        if self.parser is None:
            return None, text
        split = self.parser.split(text, finished=True, thinking=self.thinking)
        return self._apart((split.reasoning or None) if self.include else None, split.content)

    def _apart(self, reasoning: Optional[str], content: str) -> tuple[Optional[str], str]:
        """(reasoning, content) as the request wants them: apart, or (separate_reasoning false,
        as vLLM merges them) the thinking first in the content."""
        if self.separate or reasoning is None:
            return reasoning, content
        return None, reasoning + (content or "")

    def reasoning_tokens(self, token_ids, text: str) -> int:
        """How many of a finished output's tokens are its thinking (usage's reasoning_tokens):
        up to its </think> (or, qwen3, the <tool_call> that ended it); all of them when the
        thinking never ended."""
        if self.parser is None or self.thinking is False:
            return 0
        split = self.parser.split(text, finished=True, thinking=self.thinking)
        if not split.reasoning:
            return 0
        ids = list(token_ids)
        ends = [ids.index(t) + (1 if t == self.parser.end_id else 0)
                for t in (self.parser.end_id, self.parser.tool_call_id) if t is not None and t in ids]
        if not split.content:
            return min(ends) if ends and self.parser.end_id in ids else len(ids)
        return min(ends) if ends else 0

    def step(self, choice: int, text: str, finished: bool) -> tuple[Optional[str], str]:
        """What choice's cumulative text adds to its reasoning and its answer since the last step."""
        split = self.parser.split(text, finished=finished, thinking=self.thinking)
        reasoning, content = self._progress[choice].step(split)
        return self._apart((reasoning or None) if self.include else None, content)
