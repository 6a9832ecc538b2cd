"""Shared fixtures: tiny random-weight models built once per test session."""

from __future__ import annotations

import os
import sys

import pytest

# The tests import helpers (tiny_models, server_fixtures) from this folder.
sys.path.insert(0, os.path.dirname(__file__))
# No test may reach for the Hugging Face hub: everything is built locally.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")



def pytest_addoption(parser):
    parser.addoption("--fuzz-long", action="store_true",
                     help="the long reliability runs for bench/ (bench/reliability.sh): many more "
                          "fuzzed requests, a larger disconnect storm")


@pytest.fixture(scope="session")
def fuzz_long(request) -> bool:
    return request.config.getoption("--fuzz-long")


@pytest.fixture(scope="session")
def llama_dir() -> str:
    from tiny_models import tiny_model_dir

    return tiny_model_dir("llama")


@pytest.fixture(scope="session")
def llm_cache():
    """OfflineLLMs keyed by (family, settings), so tests that agree on settings share one."""
    from aserve import OfflineLLM
    from tiny_models import tiny_model_dir

    cache: dict = {}

    def get(family: str, **kwargs):
        # float32 everywhere, so that on a GPU machine the same tests compare exactly too.
        kwargs.setdefault("dtype", "float32")
        # A small cache: many engines share one process (and, on a GPU machine, one card).
        kwargs.setdefault("kv_cache_memory_gb", 0.25)
        key = (family, tuple(sorted(kwargs.items())))
        if key not in cache:
            cache[key] = OfflineLLM(model=tiny_model_dir(family), **kwargs)
        return cache[key]

    return get
