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
    """The conversation with each message's string content in the format the template takes."""
    if fmt == "string" or (fmt == "auto" and not (template and template_wants_parts(template))):
        return conversation
    return [{**m, "content": [{"type": "text", "text": m["content"]}]} if isinstance(m.get("content"), str) else m
            for m in conversation]
