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
