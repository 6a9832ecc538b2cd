"""--chat-template-content-format: a template that loops over a message's content gets a list
of text parts (read from the template when auto, as vLLM), one that prints it gets a string."""

from __future__ import annotations

import pytest
import requests

from aserve.server.content_format import as_template_content, template_wants_parts
from server_fixtures import ServerThread

PARTS_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{% for p in m['content'] %}{{ p['text'] }}"
                  "{% endfor %}{% endfor %}<assistant>")
STRING_TEMPLATE = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}<assistant>"
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]


def test_the_template_says_which_it_wants():
    assert template_wants_parts(PARTS_TEMPLATE)
    assert template_wants_parts("{% for m in messages %}{% for p in m.content | list %}{% endfor %}{% endfor %}")
    assert not template_wants_parts(STRING_TEMPLATE)
    parts = as_template_content(MESSAGES, "auto", PARTS_TEMPLATE)
    assert parts[1]["content"] == [{"type": "text", "text": "Hello there"}]
    assert as_template_content(MESSAGES, "auto", STRING_TEMPLATE) == MESSAGES
    assert as_template_content(MESSAGES, "string", PARTS_TEMPLATE) == MESSAGES
    assert as_template_content(MESSAGES, "openai", STRING_TEMPLATE) == parts


@pytest.mark.parametrize("fmt, works", [("auto", True), ("openai", True), ("string", False)])
def test_a_parts_template_renders_the_same_prompt_as_a_string_template(fmt, works):
    with ServerThread(chat_template=STRING_TEMPLATE) as plain:
        expected = plain.openai_client().chat.completions.create(model="", messages=MESSAGES, max_tokens=1)
    with ServerThread(chat_template=PARTS_TEMPLATE, state_options={"chat_template_content_format": fmt}) as srv:
        resp = requests.post(srv.url + "/v1/chat/completions", timeout=30,
                             json={"messages": MESSAGES, "max_tokens": 1})
    assert resp.status_code == 200
    # With strings, the loop walks the content's characters, which have no 'text': the words are lost.
    assert (resp.json()["usage"]["prompt_tokens"] == expected.usage.prompt_tokens) == works


def _prompt_text(srv, messages) -> str:
    resp = requests.post(srv.url + "/v1/chat/completions", timeout=30,
                         json={"messages": messages, "max_tokens": 1, "return_token_ids": True})
    assert resp.status_code == 200, resp.text
    return srv.state.tokenizer.decode(resp.json()["prompt_token_ids"])


def test_text_parts_reach_a_string_template_joined_by_newlines():
    """As vLLM's chat_utils joins them: ["A", "B"] is "A\\nB"."""
    with ServerThread(chat_template=STRING_TEMPLATE) as srv:
        parts = _prompt_text(srv, [{"role": "user", "content": [{"type": "text", "text": "one"},
                                                                  {"type": "text", "text": "two"}]}])
        joined = _prompt_text(srv, [{"role": "user", "content": "one\ntwo"}])
    assert parts == joined and "one\ntwo" in parts


def test_a_parts_template_gets_the_parts_as_sent_with_their_own_fields():
    """vLLM passes each part with its extra fields (TranslateGemma's language codes) to a
    template that takes parts."""
    template = ("{% for m in messages %}<{{ m['role'] }}>{% for p in m['content'] %}[{{ p['text'] }}|"
                "{{ p['source_lang_code'] }}]{% endfor %}{% endfor %}<assistant>")
    content = [{"type": "text", "text": "fox", "source_lang_code": "en"},
               {"type": "text", "text": "zorro", "source_lang_code": "es"}]
    with ServerThread(chat_template=template, state_options={"chat_template_content_format": "openai"}) as srv:
        text = _prompt_text(srv, [{"role": "user", "content": content}])
    assert "[fox|en][zorro|es]" in text
