"""The body of the commonest streamed chunk, a plain piece of text, built as a dict.

A stream of 256 requests writes 256 chunks per engine step from the one event loop. Building
each through the pydantic response models and model_dump() showed in the server's profile on
an H200 (model A at saturation); these helpers give exactly the same JSON (same keys, same
order) for a chunk with no logprobs, no usage and no tool calls. Anything richer still goes
through the models in protocol.py.
"""

from __future__ import annotations

from typing import Optional, Union


def completion_text_chunk(request_id: str, created: int, model: str, index: int, text: str,
                          finish_reason: Optional[str], stop_reason: Union[int, str, None]) -> dict:
    """CompletionStreamResponse(choices=[CompletionStreamChoice(...)]).model_dump()."""
    return {"id": request_id, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason,
                         "stop_reason": stop_reason}],
            "usage": None}


def chat_content_chunk(request_id: str, created: int, model: str, index: int, content: Optional[str],
                       finish_reason: Optional[str], stop_reason: Union[int, str, None]) -> dict:
    """api_chat._chunk's body for a delta of content only (None: an empty delta)."""
    return {"id": request_id, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": index, "delta": {} if content is None else {"content": content},
                         "logprobs": None, "finish_reason": finish_reason, "stop_reason": stop_reason}],
            "usage": None}
