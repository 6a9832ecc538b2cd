"""What OfflineLLM accepts beyond plain prompts, as vLLM's LLM does: prompt dicts, chat
conversations rendered with the chat template, and beam search's own result shape."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Sequence, Union

PromptInput = Union[str, list[int], dict]


def as_prompt_list(prompts) -> list:
    """One prompt or a list of them, each a string, a token-id list, or vLLM's
    {"prompt": text} / {"prompt_token_ids": ids} dict, as strings or id lists."""
    if isinstance(prompts, (str, dict)):
        prompts = [prompts]
    elif isinstance(prompts, (list, tuple)) and prompts and all(
            isinstance(t, int) and not isinstance(t, bool) for t in prompts):
        return [list(prompts)]  # one prompt given as token ids
    elif not isinstance(prompts, (list, tuple)):
        raise ValueError(f"prompts must be a string, a list of strings or token-id lists, got "
                         f"{type(prompts).__name__}.")
    return [_unwrap(p, i) for i, p in enumerate(prompts)]


def _unwrap(prompt, index: int):
    if not isinstance(prompt, dict):
        return prompt
    keys = set(prompt)
    if keys == {"prompt"}:
        return prompt["prompt"]
    if keys == {"prompt_token_ids"}:
        return list(prompt["prompt_token_ids"])
    raise ValueError(f"prompt {index}: a prompt dict holds exactly one of 'prompt' (text) or "
                     f"'prompt_token_ids', got keys {sorted(keys)}.")


def chat_prompt_ids(tokenizer, conversation: Sequence[dict], chat_template: Optional[str],
                    add_generation_prompt: bool, continue_final_message: bool,
                    chat_template_kwargs: Optional[dict]) -> list[int]:
    """A conversation rendered with the chat template and tokenized as vLLM does (the template
    brings its own special tokens, so none are added)."""
    if tokenizer is None:
        raise ValueError("chat needs a tokenizer, and this engine has none (skip_tokenizer_init).")
    if add_generation_prompt and continue_final_message:
        raise ValueError("add_generation_prompt and continue_final_message cannot both be true.")
    template = chat_template or getattr(tokenizer, "chat_template", None)
    if not template:
        raise ValueError("this model's tokenizer has no chat template: pass chat_template=...")
    messages = [dict(m, content=_text(m.get("content"))) for m in conversation]
    text = tokenizer.apply_chat_template(
        messages, chat_template=template, add_generation_prompt=add_generation_prompt,
        continue_final_message=continue_final_message, tokenize=False, **(chat_template_kwargs or {}))
    return tokenizer(text, add_special_tokens=False).input_ids


def _text(content: Any) -> str:
    """A message's content: a string, or OpenAI's list of parts (text parts only)."""
    if content is None or isinstance(content, str):
        return content or ""
    parts = []
    for part in content:
        if not isinstance(part, dict) or part.get("type") != "text":
            raise ValueError(f"only text content parts are supported, got {part!r:.80}.")
        parts.append(part.get("text", ""))
    return "".join(parts)


def is_conversation(messages) -> bool:
    """One conversation (a list of message dicts), as opposed to a list of them."""
    return bool(messages) and isinstance(messages[0], dict)


@dataclass
class BeamSearchSequence:
    """One beam: its tokens (the prompt's included, as vLLM), text (decoded, prompt included)
    and cumulative log probability."""

    tokens: list[int]
    cum_logprob: float = 0.0
    text: Optional[str] = None
    finish_reason: Optional[str] = None
    stop_reason: Union[int, str, None] = None
    logprobs: list = field(default_factory=list)


@dataclass
class BeamSearchOutput:
    sequences: list[BeamSearchSequence]
