"""--api-key: every /v1 route, and /invocations (which serves the same completions), wants
'Authorization: Bearer <key>'; the rest stays open."""

from __future__ import annotations

import aiohttp
import openai
import pytest

from aserve.server.cli import make_parser, resolve_api_key
from server_fixtures import ServerThread

KEY = "sk-test-123"


@pytest.fixture(scope="module")
def server():
    with ServerThread(api_key=KEY) as s:
        yield s


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY},
                                     {"Authorization": f"Basic {KEY}"}])
@pytest.mark.parametrize("method, path", [("GET", "/v1/models"), ("GET", "/v1/models/any/name"),
                                          ("POST", "/v1/completions"),
                                          ("POST", "/v1/chat/completions"), ("POST", "/invocations")])
async def test_v1_routes_refuse_a_missing_or_wrong_key(server, headers, method, path):
    async with aiohttp.ClientSession() as session:
        async with session.request(method, server.url + path, headers=headers,
                                   json={"prompt": "Hi", "max_tokens": 1}) as resp:
            assert resp.status == 401
            error = (await resp.json())["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == "invalid_api_key"


def test_the_openai_client_with_the_key_is_served(server):
    client = server.openai_client(api_key=KEY)
    assert client.models.list().data[0].id == server.model_name
    resp = client.completions.create(model=server.model_name, prompt="Hi", max_tokens=2)
    assert resp.usage.completion_tokens >= 1


def test_the_openai_client_with_a_wrong_key_gets_authentication_error(server):
    client = server.openai_client(api_key="nope")
    with pytest.raises(openai.AuthenticationError):
        client.models.list()


@pytest.mark.parametrize("scheme", ["bearer", "BEARER", "Bearer"])
async def test_the_bearer_scheme_is_case_insensitive(server, scheme):
    async with aiohttp.ClientSession() as session:
        async with session.get(server.url + "/v1/models", headers={"Authorization": f"{scheme} {KEY}"}) as resp:
            assert resp.status == 200
        async with session.get(server.url + "/v1/models", headers={"Authorization": f"{scheme} wrong"}) as resp:
            assert resp.status == 401


async def test_options_runs_nothing_and_needs_no_key(server):
    async with aiohttp.ClientSession() as session:
        async with session.options(server.url + "/v1/models") as resp:
            assert resp.status != 401


@pytest.mark.parametrize("path", ["/health", "/metrics"])
async def test_non_v1_routes_need_no_key(server, path):
    async with aiohttp.ClientSession() as session:
        async with session.get(server.url + path) as resp:
            assert resp.status == 200


def test_the_key_may_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("ASERVE_API_KEY", "from-env")
    assert resolve_api_key(make_parser().parse_args([])) == "from-env"
    assert resolve_api_key(make_parser().parse_args(["--api-key", "flag"])) == "flag"
    monkeypatch.delenv("ASERVE_API_KEY")
    assert resolve_api_key(make_parser().parse_args([])) is None


def test_a_root_path_serves_every_route_under_it_too_behind_the_same_key():
    """vLLM's --root-path /llm (its test_root_path): /v1 and /llm/v1 both answer, both guarded."""
    import openai as openai_module

    with ServerThread(api_key="abc-123", state_options={"root_path": "/llm"}) as srv:
        for base in (srv.url + "/v1", srv.url + "/llm/v1"):
            good = openai_module.OpenAI(base_url=base, api_key="abc-123", max_retries=0)
            resp = good.chat.completions.create(model=srv.model_name, max_tokens=2,
                                                messages=[{"role": "user", "content": "tell me a saying"}])
            assert resp.choices[0].message.role == "assistant"
            assert good.models.retrieve(srv.model_name).id == srv.model_name   # a route with a pattern
            bad = openai_module.OpenAI(base_url=base, api_key="abc", max_retries=0)
            with pytest.raises(openai_module.AuthenticationError):
                bad.chat.completions.create(model=srv.model_name, max_tokens=2,
                                            messages=[{"role": "user", "content": "hi"}])
        import urllib.error
        import urllib.request

        with urllib.request.urlopen(srv.url + "/llm/health", timeout=10) as resp:
            assert resp.status == 200
        with pytest.raises(urllib.error.HTTPError) as missing:
            urllib.request.urlopen(srv.url + "/elsewhere/health", timeout=10)
        assert missing.value.code == 404
