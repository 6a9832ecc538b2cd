"""How a message's content reaches the chat template (vLLM's --chat-template-content-format).

Most templates print `message['content']` as a string. Some (multi-modal families, and
templates written for OpenAI's message shape) loop over it as a list of parts, each
{"type": "text", "text": ...}. `string` passes a string, `openai` a list of text parts, and
`auto` (the default, as vLLM) reads the template: a loop over a message's content means parts.
"""

from __future__ import annotations

import functools
from typing import Optional

FORMATS = ("auto", "string", "openai")
# Where a conversation's message keeps its content parts as sent (the content itself is their
# text joined); as_template_content takes it out before the template sees the message.
PARTS_KEY = "_content_parts"


@functools.lru_cache(maxsize=64)
def template_wants_parts(template: str) -> bool:
    """Whether the template loops over a message's content (`for x in m['content']` or
    `m.content`), read from its syntax tree as vLLM does."""
    import jinja2
    from jinja2 import nodes

    try:
        tree = jinja2.Environment().parse(template)
    except jinja2.TemplateSyntaxError:
        return False   # rendering will say what is wrong with it
    for loop in tree.find_all(nodes.For):
        source = loop.iter
        while isinstance(source, nodes.Filter) and source.node is not None:   # `m['content'] | list`
            source = source.node
        if isinstance(source, nodes.Getitem) and isinstance(source.arg, nodes.Const) and source.arg.value == "content":
            return True
        if isinstance(source, nodes.Getattr) and source.attr == "content":
            return True
    return False


def as_template_content(conversation: list[dict], fmt: str, template: Optional[str]) -> list[dict]:
    """The conversation with each message's content in the format the template takes: a
    string (text parts joined by newlines, as vLLM), or the parts as sent (a string content
    as one text part)."""
    wants_parts = not (fmt == "string" or (fmt == "auto" and not (template and template_wants_parts(template))))
    out = []
    for m in conversation:
        parts = m.get(PARTS_KEY)
        if parts is not None:
            m = {k: v for k, v in m.items() if k != PARTS_KEY}
        if wants_parts and isinstance(m.get("content"), str):
            m = {**m, "content": parts if parts is not None else [{"type": "text", "text": m["content"]}]}
        out.append(m)
    return out
