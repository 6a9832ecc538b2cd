"""From a request's prompt to what the engine takes, without stalling the event loop.

A prompt that cannot fit in the context is refused before anything costly is done with it: a
text longer than max_model_len tokens could ever spell (max_prompt_chars) on the parsed JSON,
before validation, and a token-id list longer than the context before its ids are checked.
What remains is tokenized (chat messages rendered with the template, then tokenized) in a
small thread pool: tokenizers release the GIL, so a large prompt delays only its own request,
never /health or the token streams. (Tokenizing a 30 MB prompt on the loop blocked every
client for 30-48 s before its 400.)
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any, Union

from aserve.engine.request_factory import TokenizedPrompt
from aserve.server.errors import APIError

if TYPE_CHECKING:
    from aserve.server.app import ServerState

# A vocabulary string is never shorter than the text its token stands for (byte-level BPE
# spells each byte as one character, SentencePiece each character as itself, byte fallback
# <0xNN> one byte as six); normalizers may still merge characters (NFKC composes accents),
# hence the slack, and a floor for tokenizers whose vocabulary says little.
_CHARS_PER_TOKEN_SLACK = 2
# vLLM's words: clients match on them.
EMPTY_PROMPT = "The decoder prompt cannot be empty."
_MIN_CHARS_PER_TOKEN = 16


def max_prompt_chars(tokenizer, max_model_len: int) -> int:
    """The most characters a prompt of max_model_len tokens can have, generously bounded."""
    longest = max((len(token) for token in tokenizer.get_vocab()), default=0) if tokenizer else 0
    return max_model_len * _CHARS_PER_TOKEN_SLACK * max(longest, _MIN_CHARS_PER_TOKEN)


def refuse_giant_prompts(state: "ServerState", body: dict[str, Any]) -> None:
    """On a parsed JSON body, before validation (which costs ~1 s per million ids): a 400 for
    any prompt that cannot fit. Shapes that validation will refuse anyway are left to it."""
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        _check_text(state, prompt, "prompt")
    elif isinstance(prompt, list) and prompt:
        if isinstance(prompt[0], (str, list)):  # a batch: each prompt on its own
            for one in prompt:
                if isinstance(one, str):
                    _check_text(state, one, "prompt")
                elif isinstance(one, list):
                    _check_length(state, one)
        else:
            _check_length(state, prompt)
    messages = body.get("messages")
    if isinstance(messages, list):
        chars = sum(_content_chars(m.get("content")) for m in messages if isinstance(m, dict))
        if chars > state.max_prompt_chars:
            raise _too_long(state, chars, "messages")


async def prepare_prompt(state: "ServerState", prompt: Union[str, list[int]]):
    """A text prompt tokenized off the loop (TokenizedPrompt), or a token-id prompt checked."""
    if isinstance(prompt, str):
        _check_text(state, prompt, "prompt")
        tokenizer = state.require_tokenizer("prompt")
        if not prompt:
            raise APIError(400, EMPTY_PROMPT, param="prompt")
        return TokenizedPrompt(prompt, await run_off_loop(state, tokenizer.encode, prompt))
    if not prompt:
        raise APIError(400, EMPTY_PROMPT, param="prompt")
    _check_length(state, prompt)
    state.check_token_ids(prompt)
    return prompt


async def chat_prompt_ids(state: "ServerState", conversation: list[dict],
                          add_generation_prompt: bool) -> list[int]:
    """Messages rendered with the chat template and tokenized (no extra BOS, as vLLM), off the loop."""
    tokenizer = state.require_tokenizer("messages")
    template = state.chat_template or getattr(tokenizer, "chat_template", None)
    if not template:
        raise APIError(400, "This model has no chat template, so /v1/chat/completions cannot "
                            "render messages. Start the server with --chat-template "
                            "<file or Jinja string>, or use /v1/completions.", param="messages")

    def render() -> list[int]:
        try:
            text = tokenizer.apply_chat_template(
                conversation, chat_template=template, add_generation_prompt=add_generation_prompt,
                tokenize=False)
        except Exception as exc:  # template errors are about the messages the user sent
            raise APIError(400, f"The chat template could not render these messages: {exc}",
                           param="messages") from None
        return tokenizer(text, add_special_tokens=False).input_ids

    return await run_off_loop(state, render)


async def tokenize_text(state: "ServerState", text: str, add_special_tokens: bool) -> list[int]:
    tokenizer = state.require_tokenizer("prompt")
    return await run_off_loop(state, lambda: tokenizer(text, add_special_tokens=add_special_tokens).input_ids)


async def run_off_loop(state: "ServerState", fn, *args):
    return await asyncio.get_running_loop().run_in_executor(state.prompt_pool, fn, *args)


def _check_text(state: "ServerState", text: str, param: str) -> None:
    if len(text) > state.max_prompt_chars:
        raise _too_long(state, len(text), param)


def _check_length(state: "ServerState", token_ids: list) -> None:
    max_len = state.max_model_len
    if len(token_ids) >= max_len:
        raise APIError(400, f"The prompt is {len(token_ids)} tokens long, and this model's maximum "
                            f"context length is {max_len} tokens, which leaves no room to "
                            f"generate: shorten the prompt.",
                       param="prompt", code="context_length_exceeded")


def _too_long(state: "ServerState", chars: int, param: str) -> APIError:
    return APIError(400, f"This model's maximum context length is {state.max_model_len} tokens, "
                         f"and a prompt of {chars} characters is longer than any prompt of that "
                         f"many tokens (at most {state.max_prompt_chars} characters): shorten the "
                         f"prompt.", param=param, code="context_length_exceeded")


def _content_chars(content) -> int:
    if isinstance(content, str):
        return len(content)
    if isinstance(content, list):  # content parts
        return sum(len(p["text"]) for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return 0
