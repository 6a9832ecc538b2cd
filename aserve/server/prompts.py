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
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional, Union

from aserve.engine.request_factory import TRUNCATION_TOO_LARGE, TokenizedPrompt
from aserve.server.content_format import as_template_content
from aserve.server.errors import EMPTY_PROMPT, APIError

if TYPE_CHECKING:
    from aserve.server.app import ServerState

# A vocabulary string is never shorter than the text its token stands for (byte-level BPE
# spells each byte as one character, SentencePiece each character as itself, byte fallback
# <0xNN> one byte as six); normalizers may still merge characters (NFKC composes accents),
# hence the slack, and a floor for tokenizers whose vocabulary says little.
_CHARS_PER_TOKEN_SLACK = 2
# vLLM's words: clients match on them.
_MIN_CHARS_PER_TOKEN = 16


def max_prompt_chars(tokenizer, max_model_len: int) -> int:
    """The most characters a prompt of max_model_len tokens can have, generously bounded."""
    longest = max((len(token) for token in tokenizer.get_vocab()), default=0) if tokenizer else 0
    return max_model_len * _CHARS_PER_TOKEN_SLACK * max(longest, _MIN_CHARS_PER_TOKEN)


def refuse_giant_prompts(state: "ServerState", body: dict[str, Any], field: str = "prompt") -> None:
    """On a parsed JSON body, before validation (which costs ~1 s per million ids): a 400 for
    any prompt that cannot fit. Shapes that validation will refuse anyway are left to it.
    With truncate_prompt_tokens, token-id lists are cut here, before validation, so a long one
    costs no more to validate than one that fits. field: where the body holds its prompts
    (/v1/embeddings' is `input`)."""
    _truncate_id_lists_early(state, body, field)
    prompt = body.get(field)
    if isinstance(prompt, str):
        _check_text(state, prompt, field)
    elif isinstance(prompt, list) and prompt:
        if isinstance(prompt[0], (str, list)):  # a batch: each prompt on its own
            for one in prompt:
                if isinstance(one, str):
                    _check_text(state, one, field)
                elif isinstance(one, list):
                    _check_length(state, one, field)
        else:
            _check_length(state, prompt, field)
    messages = body.get("messages")
    if isinstance(messages, list):
        chars = sum(_content_chars(m.get("content")) for m in messages if isinstance(m, dict))
        if chars > state.max_prompt_chars:
            raise _too_long(state, chars, "messages")


def _truncate_id_lists_early(state: "ServerState", body: dict[str, Any], field: str) -> None:
    keep, side = body.get("truncate_prompt_tokens"), body.get("truncation_side")
    if not isinstance(keep, int) or isinstance(keep, bool) or not (keep == -1 or keep >= 1) \
            or side not in (None, "left", "right"):
        return  # absent, or a bad value that validation refuses by name
    if keep > state.max_model_len:
        raise APIError(400, TRUNCATION_TOO_LARGE, param="truncate_prompt_tokens")
    prompt = body.get(field)
    if isinstance(prompt, list) and prompt and not isinstance(prompt[0], str):
        if isinstance(prompt[0], list):
            body[field] = [_truncate(state, one, keep, side) if isinstance(one, list) else one for one in prompt]
        else:
            body[field] = _truncate(state, prompt, keep, side)


async def prepare_prompt(state: "ServerState", prompt: Union[str, list[int]], add_special_tokens: bool = True,
                         truncate_prompt_tokens: Optional[int] = None, field: str = "prompt",
                         truncation_side: Optional[str] = None):
    """A text prompt tokenized off the loop (TokenizedPrompt), or a token-id prompt checked;
    either cut to its last truncate_prompt_tokens tokens (-1: the context length) first, or
    its first ones with truncation_side "right". field: the request's name for it, in errors."""
    if isinstance(prompt, str):
        _check_text(state, prompt, field)
        tokenizer = state.require_tokenizer(field)
        if not prompt:
            raise APIError(400, EMPTY_PROMPT, param=field)
        ids = await run_off_loop(state, lambda: tokenizer.encode(prompt, add_special_tokens=add_special_tokens))
        return TokenizedPrompt(prompt, _truncate(state, ids, truncate_prompt_tokens, truncation_side))
    if not prompt:
        raise APIError(400, EMPTY_PROMPT, param=field)
    prompt = _truncate(state, prompt, truncate_prompt_tokens, truncation_side)
    _check_length(state, prompt, field)
    state.check_token_ids(prompt)
    return prompt


def _truncate(state: "ServerState", token_ids: list[int], keep: Optional[int],
              side: Optional[str] = None) -> list[int]:
    """The last `keep` ids (vLLM's truncation_side "left", its default), or the first ones
    ("right"); -1 keeps the context length."""
    # A keep above the context length is left for the engine to refuse, with its message.
    if keep is None or (keep != -1 and keep > state.max_model_len):
        return token_ids
    keep = state.max_model_len if keep == -1 else keep
    return token_ids[:keep] if side == "right" else token_ids[-keep:]


@dataclass(frozen=True)
class ChatTemplateOptions:
    """How messages become a prompt beyond the messages themselves (vLLM's chat extras)."""

    continue_final_message: bool = False  # the last message stays open for the model to continue
    add_special_tokens: bool = False      # BOS on top of what the template writes
    chat_template: Optional[str] = None   # this request's template, in place of the server's
    chat_template_kwargs: Optional[dict[str, Any]] = None  # more variables for the template
    documents: Optional[list[dict[str, str]]] = None       # for templates that do RAG
    truncate_prompt_tokens: Optional[int] = None
    truncation_side: Optional[str] = None      # "right" keeps the first tokens, else the last


# apply_chat_template arguments that would change what it returns (token ids, a dict) or
# replace the conversation: never taken from chat_template_kwargs.
_RESERVED_TEMPLATE_KWARGS = frozenset({"conversation", "tokenize", "return_dict", "return_tensors",
                                       "return_assistant_tokens_mask", "tokenizer_kwargs", "padding",
                                       "truncation", "max_length"})


async def chat_prompt_ids(state: "ServerState", conversation: list[dict], add_generation_prompt: bool,
                          options: Optional[ChatTemplateOptions] = None,
                          tools: Optional[list[dict]] = None) -> list[int]:
    """Messages rendered with the chat template and tokenized (no extra BOS unless asked, as
    vLLM), off the loop; tools (OpenAI's request shape) reach the template as its `tools`
    variable."""
    options = options or ChatTemplateOptions()
    tokenizer = state.require_tokenizer("messages")
    kwargs = dict(options.chat_template_kwargs or {})
    request_template = options.chat_template or kwargs.pop("chat_template", None)
    if request_template is not None and not state.trust_request_chat_template:
        # A template is code the server runs: a client's only with the operator's consent, as vLLM.
        raise APIError(400, "Request chat templates require --trust-request-chat-template.",
                       param="chat_template")
    template = request_template or state.chat_template or getattr(tokenizer, "chat_template", None)
    template_kwargs = dict(add_generation_prompt=add_generation_prompt,
                           continue_final_message=options.continue_final_message)
    if options.documents is not None:
        template_kwargs["documents"] = options.documents
    reserved = _RESERVED_TEMPLATE_KWARGS & set(kwargs)
    if reserved:
        raise APIError(400, f"chat_template_kwargs may not set {', '.join(sorted(reserved))}.",
                       param="chat_template_kwargs")
    template_kwargs.update(kwargs)  # as vLLM: they may override the above
    if template_kwargs["continue_final_message"] and not conversation:
        raise APIError(400, "continue_final_message needs a final message to continue.",
                       param="continue_final_message")
    if not template:
        raise APIError(400, "This model has no chat template, so /v1/chat/completions cannot "
                            "render messages. Start the server with --chat-template "
                            "<file or Jinja string>, or use /v1/completions.", param="messages")

    def render() -> list[int]:
        messages = as_template_content(conversation, state.chat_template_content_format,
                                       template if isinstance(template, str) else None)
        try:
            text = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                                 tools=tools, **template_kwargs)
        except Exception as exc:  # template errors are about the messages (or template) the user sent
            raise APIError(400, f"The chat template could not render these messages: {exc}",
                           param="messages") from None
        ids = tokenizer(text, add_special_tokens=options.add_special_tokens).input_ids
        return _truncate(state, ids, options.truncate_prompt_tokens, options.truncation_side)

    return await run_off_loop(state, render)


async def tokenize_text(state: "ServerState", text: str, add_special_tokens: bool) -> list[int]:
    tokenizer = state.require_tokenizer("prompt")
    return await run_off_loop(state, lambda: tokenizer(text, add_special_tokens=add_special_tokens).input_ids)


async def run_off_loop(state: "ServerState", fn, *args):
    return await asyncio.get_running_loop().run_in_executor(state.prompt_pool, fn, *args)


def _check_text(state: "ServerState", text: str, param: str) -> None:
    if len(text) > state.max_prompt_chars:
        raise _too_long(state, len(text), param)


def _check_length(state: "ServerState", token_ids: list, field: str) -> None:
    """A prompt to generate from needs a position left for its first token; an input to a
    pooling model (embeddings, scores) may fill the whole context, as the engine allows."""
    max_len = state.max_model_len
    generates = not state.async_engine.engine.pooling
    if len(token_ids) >= max_len + (not generates):
        room = ", which leaves no room to generate" if generates else ""
        vllm_words = "" if generates else " Please reduce the length of the input prompt."   # its pooling tests
        raise APIError(400, f"The {field} is {len(token_ids)} tokens long, and this model's maximum "
                            f"context length is {max_len} tokens{room}: shorten the {field}.{vllm_words}",
                       param=field, code="context_length_exceeded")


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
