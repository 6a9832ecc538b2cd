"""Cross-origin calls from a browser, answered as vLLM's server answers them: by default any
origin, preflights before the API key, the origin's headers on errors and streams too."""

from __future__ import annotations

import requests

from aserve.server.cli import parse_args
from aserve.server.cors import CorsPolicy
from server_fixtures import ServerThread

ORIGIN = "http://app.example"
PREFLIGHT = {"Origin": ORIGIN, "Access-Control-Request-Method": "POST",
             "Access-Control-Request-Headers": "authorization, content-type"}
BODY = {"prompt": "Hello", "max_tokens": 2}


def test_by_default_any_origin_may_call_and_preflights_need_no_key():
    with ServerThread(api_key="secret") as srv:
        preflight = requests.options(srv.url + "/v1/completions", headers=PREFLIGHT, timeout=30)
        assert preflight.status_code == 200
        assert preflight.headers["Access-Control-Allow-Origin"] == "*"
        assert "POST" in preflight.headers["Access-Control-Allow-Methods"]
        assert preflight.headers["Access-Control-Allow-Headers"] == "authorization, content-type"
        ok = requests.post(srv.url + "/v1/completions", json=BODY, timeout=30,
                           headers={"Origin": ORIGIN, "Authorization": "Bearer secret"})
        assert ok.status_code == 200 and ok.headers["Access-Control-Allow-Origin"] == "*"
        # An error too: the browser's page may read why.
        refused = requests.post(srv.url + "/v1/completions", json=BODY, headers={"Origin": ORIGIN}, timeout=30)
        assert refused.status_code == 401 and refused.headers["Access-Control-Allow-Origin"] == "*"
        # A stream's headers go out before its body: they carry it as well.
        with requests.post(srv.url + "/v1/completions", json={**BODY, "stream": True}, stream=True, timeout=30,
                           headers={"Origin": ORIGIN, "Authorization": "Bearer secret"}) as streamed:
            assert streamed.headers["Access-Control-Allow-Origin"] == "*"
            assert streamed.content
        plain = requests.get(srv.url + "/health", timeout=30)
        assert "Access-Control-Allow-Origin" not in plain.headers   # no Origin, no CORS headers


def test_a_restricted_policy_names_its_origins():
    policy = CorsPolicy(origins=(ORIGIN,), methods=("GET", "POST"), headers=("content-type",), credentials=True)
    with ServerThread(state_options={"cors": policy}) as srv:
        ok = requests.get(srv.url + "/v1/models", headers={"Origin": ORIGIN}, timeout=30)
        assert ok.headers["Access-Control-Allow-Origin"] == ORIGIN and ok.headers["Vary"] == "Origin"
        assert ok.headers["Access-Control-Allow-Credentials"] == "true"
        other = requests.get(srv.url + "/v1/models", headers={"Origin": "http://evil.example"}, timeout=30)
        assert other.status_code == 200 and "Access-Control-Allow-Origin" not in other.headers
        refused = requests.options(srv.url + "/v1/models", timeout=30,
                                   headers={**PREFLIGHT, "Origin": "http://evil.example"})
        assert refused.status_code == 400 and "origin" in refused.text
        bad_headers = requests.options(srv.url + "/v1/models", headers=PREFLIGHT, timeout=30)
        assert bad_headers.status_code == 400 and "headers" in bad_headers.text   # authorization
        fine = requests.options(srv.url + "/v1/models", timeout=30, headers={
            "Origin": ORIGIN, "Access-Control-Request-Method": "GET", "Access-Control-Request-Headers": "Content-Type"})
        assert fine.status_code == 200 and fine.headers["Access-Control-Allow-Methods"] == "GET, POST"


def test_the_cli_takes_vllms_flags():
    ns = parse_args(["--allowed-origins", '["http://a.example"]', "--allowed-methods", '["GET"]',
                     "--allow-credentials"])
    assert (ns.allowed_origins, ns.allowed_methods, ns.allowed_headers, ns.allow_credentials) == (
        ["http://a.example"], ["GET"], ["*"], True)
