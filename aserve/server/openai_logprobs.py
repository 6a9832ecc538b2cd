"""Logprobs in OpenAI's shapes (completions and chat), built in slices that leave the loop free.

Formatting is Python work per token (a dict per position, each candidate's text): thousands
of positions (an echoed prompt, a long non-streamed answer) would hold the event loop for tens
of milliseconds at once. Every SLICE_TOKENS positions the builders yield to the loop, so no
response, however large, delays /health or the other streams by more than one slice.

as_ids (vLLM's return_tokens_as_token_ids) names every token 'token_id:N' in place of its
text, so tokens that are not valid UTF-8 on their own can still be told apart.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from aserve.server.protocol_answers import (ChatTokenLogprob, ChatTopLogprob, CompletionLogProbs, PromptLogprob,
                                            PromptLogprobsOut)

if TYPE_CHECKING:
    from aserve.server.app import ServerState

MIN_LOGPROB = -9999.0  # -inf is not JSON; vLLM clamps to the same value
SLICE_TOKENS = 128


async def add_completion_logprobs(state: "ServerState", out: CompletionLogProbs, token_ids,
                                  logprobs, offset: int, as_ids: bool = False) -> int:
    """Append tokens (with their logprob dicts, None where unknown) in the completions shape;
    returns the text offset after them."""
    logprobs = logprobs or [None] * len(token_ids)
    for index, (token_id, entry) in enumerate(zip(token_ids, logprobs)):
        if index and index % SLICE_TOKENS == 0:
            await asyncio.sleep(0)
        chosen = entry.get(token_id) if entry else None
        token = _token_text(state, token_id, chosen, as_ids)
        out.tokens.append(token)
        out.token_logprobs.append(_clamp(chosen.logprob) if chosen else None)
        out.top_logprobs.append(_top_by_text(state, entry, token_id, as_ids) if entry else None)
        out.text_offset.append(offset)
        offset += len(token)
    return offset


def copy_completion_logprobs(lps: CompletionLogProbs) -> CompletionLogProbs:
    """A copy to extend (an echoed prompt's logprobs, built once for the n choices)."""
    return CompletionLogProbs(text_offset=list(lps.text_offset), token_logprobs=list(lps.token_logprobs),
                              tokens=list(lps.tokens), top_logprobs=list(lps.top_logprobs))


async def chat_logprobs(state: "ServerState", token_ids, logprobs, top_n: int,
                        as_ids: bool = False) -> list[ChatTokenLogprob]:
    """top_n -1: every candidate the engine returned (the whole vocabulary when asked so)."""
    content = []
    for index, (token_id, entry) in enumerate(zip(token_ids, logprobs or [])):
        if index and index % SLICE_TOKENS == 0:
            await asyncio.sleep(0)
        chosen = entry.get(token_id) if entry else None
        token = _token_text(state, token_id, chosen, as_ids)
        top = sorted((entry or {}).items(), key=lambda kv: -kv[1].logprob)
        top = top if top_n == -1 else top[:top_n]
        content.append(ChatTokenLogprob(
            token=token, logprob=_clamp(chosen.logprob) if chosen else MIN_LOGPROB,
            bytes=list(token.encode("utf-8")),
            top_logprobs=[ChatTopLogprob(token=(s := _token_text(state, t, lp, as_ids)),
                                         logprob=_clamp(lp.logprob), bytes=list(s.encode("utf-8")))
                          for t, lp in top]))
    return content


async def prompt_logprobs_out(prompt_logprobs) -> PromptLogprobsOut:
    """vLLM's prompt_logprobs: None for the first position (nothing predicts it), then per
    position token id -> {logprob, rank, decoded_token}, -inf clamped as vLLM clamps it."""
    out: PromptLogprobsOut = []
    for index, entry in enumerate(prompt_logprobs):
        if index and index % SLICE_TOKENS == 0:
            await asyncio.sleep(0)
        out.append(None if entry is None else {
            str(token_id): PromptLogprob(logprob=_clamp(lp.logprob), rank=lp.rank, decoded_token=lp.decoded_token)
            for token_id, lp in entry.items()})
    return out


def _top_by_text(state: "ServerState", entry, chosen_id: int, as_ids: bool) -> dict[str, float]:
    # vLLM's order: the chosen token first, then the others by probability. OpenAI keys
    # top_logprobs by token text; two tokens can share a text (partial UTF-8 bytes decode to
    # the same '\ufffd'): keep the likelier, so the chosen token never loses.
    ordered = sorted(entry.items(), key=lambda kv: (kv[0] != chosen_id, -kv[1].logprob))
    top: dict[str, float] = {}
    for token_id, lp in ordered:
        text = _token_text(state, token_id, lp, as_ids)
        top[text] = max(top.get(text, MIN_LOGPROB), _clamp(lp.logprob))
    return top


def _token_text(state: "ServerState", token_id: int, lp, as_ids: bool = False) -> str:
    if as_ids:
        return f"token_id:{token_id}"
    if lp is not None and lp.decoded_token is not None:
        return lp.decoded_token
    return state.decode([token_id])


def _clamp(x: float) -> float:
    return max(float(x), MIN_LOGPROB)
