"""Logprobs in OpenAI's shapes (completions and chat), built in slices that leave the loop free.

Formatting is Python work per token (a dict per position, each candidate's text): thousands
of positions (an echoed prompt, a long non-streamed answer) would hold the event loop for tens
of milliseconds at once. Every SLICE_TOKENS positions the builders yield to the loop, so no
response, however large, delays /health or the other streams by more than one slice.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from aserve.server.protocol import ChatTokenLogprob, ChatTopLogprob, CompletionLogProbs

if TYPE_CHECKING:
    from aserve.server.app import ServerState

MIN_LOGPROB = -9999.0  # -inf is not JSON; vLLM clamps to the same value
SLICE_TOKENS = 128


async def add_completion_logprobs(state: "ServerState", out: CompletionLogProbs, token_ids,
                                  logprobs, offset: int) -> int:
    """Append tokens (with their logprob dicts, None where unknown) in the completions shape;
    returns the text offset after them."""
    logprobs = logprobs or [None] * len(token_ids)
    for index, (token_id, entry) in enumerate(zip(token_ids, logprobs)):
        if index and index % SLICE_TOKENS == 0:
            await asyncio.sleep(0)
        chosen = entry.get(token_id) if entry else None
        token = _token_text(state, token_id, chosen)
        out.tokens.append(token)
        out.token_logprobs.append(_clamp(chosen.logprob) if chosen else None)
        out.top_logprobs.append(_top_by_text(state, entry) if entry else None)
        out.text_offset.append(offset)
        offset += len(token)
    return offset


def copy_completion_logprobs(lps: CompletionLogProbs) -> CompletionLogProbs:
    """A copy to extend (an echoed prompt's logprobs, built once for the n choices)."""
    return CompletionLogProbs(text_offset=list(lps.text_offset), token_logprobs=list(lps.token_logprobs),
                              tokens=list(lps.tokens), top_logprobs=list(lps.top_logprobs))


async def chat_logprobs(state: "ServerState", token_ids, logprobs, top_n: int) -> list[ChatTokenLogprob]:
    content = []
    for index, (token_id, entry) in enumerate(zip(token_ids, logprobs or [])):
        if index and index % SLICE_TOKENS == 0:
            await asyncio.sleep(0)
        chosen = entry.get(token_id) if entry else None
        token = _token_text(state, token_id, chosen)
        top = sorted((entry or {}).items(), key=lambda kv: -kv[1].logprob)[:top_n]
        content.append(ChatTokenLogprob(
            token=token, logprob=_clamp(chosen.logprob) if chosen else MIN_LOGPROB,
            bytes=list(token.encode("utf-8")),
            top_logprobs=[ChatTopLogprob(token=(s := _token_text(state, t, lp)), logprob=_clamp(lp.logprob),
                                         bytes=list(s.encode("utf-8"))) for t, lp in top]))
    return content


def _top_by_text(state: "ServerState", entry) -> dict[str, float]:
    # OpenAI keys top_logprobs by token text; two tokens can share a text (partial UTF-8
    # bytes decode to the same '\ufffd'): keep the likelier, so the chosen token never loses.
    top: dict[str, float] = {}
    for token_id, lp in entry.items():
        text = _token_text(state, token_id, lp)
        top[text] = max(top.get(text, MIN_LOGPROB), _clamp(lp.logprob))
    return top


def _token_text(state: "ServerState", token_id: int, lp) -> str:
    if lp is not None and lp.decoded_token is not None:
        return lp.decoded_token
    return state.decode([token_id])


def _clamp(x: float) -> float:
    return max(float(x), MIN_LOGPROB)
