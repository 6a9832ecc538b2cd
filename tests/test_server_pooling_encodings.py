"""encoding_format, embed_dtype and endianness on /v1/embeddings and /pooling, through a real
pooling server on loopback, as vLLM encodes them: base64 and raw bytes ("bytes", with the
`metadata` header that says where each vector lies; "bytes_only", without it) decode to the
"float" answer's vectors within the dtype's rounding, in the byte order asked for; unknown
values are 400s naming their field."""

from __future__ import annotations

import base64
import json
import sys

import numpy as np
import pytest
import requests
import torch

from server_fixtures import ServerThread, small_engine_args

TEXTS = ["The sky is blue.", "Embeddings map text to vectors", "x"]
ROUTES = [("/v1/embeddings", "embedding"), ("/pooling", "data")]
# Each dtype: torch's type, the integer or float type its bits are read as, and the most a
# number may move when rounded to it (relative, and absolute near zero for fp8's subnormals).
DTYPES = {"float32": (torch.float32, torch.float32, 0, 0),
          "float16": (torch.float16, torch.float16, 2 ** -11, 2 ** -24),
          "bfloat16": (torch.bfloat16, torch.int16, 2 ** -8, 0),
          "fp8_e4m3": (torch.float8_e4m3fn, torch.uint8, 2 ** -4, 2 ** -10),
          "fp8_e5m2": (torch.float8_e5m2, torch.uint8, 2 ** -3, 2 ** -17)}
RUN_TO_RUN = 1e-6   # as test_server_embeddings compares the server's vectors with OfflineLLM's


@pytest.fixture(scope="module")
def server():
    with ServerThread(small_engine_args(runner="pooling")) as srv:
        yield srv


def post(server, path: str, **body) -> requests.Response:
    return requests.post(server.url + path, json={"input": TEXTS, **body}, timeout=60)


@pytest.fixture(scope="module")
def floats(server) -> list[np.ndarray]:
    answer = post(server, "/v1/embeddings", encoding_format="float").json()
    return [np.array(d["embedding"]) for d in answer["data"]]


def decode(raw: bytes, embed_dtype: str, endianness: str) -> np.ndarray:
    """A vector from its bytes, independently of the server: byte order first, then the bits."""
    dtype, bits, _, _ = DTYPES[embed_dtype]
    array = np.frombuffer(raw, dtype=torch.empty(0, dtype=bits).numpy().dtype).copy()
    if endianness not in ("native", sys.byteorder):
        array = array.byteswap()
    return torch.from_numpy(array).view(dtype).float().numpy()


def assert_rounded(got: np.ndarray, want: np.ndarray, embed_dtype: str) -> None:
    """want comes from another request, which may differ by float32 noise (a prefix-cache hit
    runs the last token alone): hence RUN_TO_RUN on top of the dtype's rounding."""
    _, _, rtol, atol = DTYPES[embed_dtype]
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=rtol, atol=atol + RUN_TO_RUN)


@pytest.mark.parametrize("path, key", ROUTES)
@pytest.mark.parametrize("embed_dtype", list(DTYPES))
@pytest.mark.parametrize("endianness", ["native", "big", "little"])
def test_base64_decodes_to_the_float_vectors_within_the_dtypes_rounding(server, floats, path, key, embed_dtype,
                                                                        endianness):
    answer = post(server, path, encoding_format="base64", embed_dtype=embed_dtype, endianness=endianness)
    assert answer.status_code == 200, answer.text
    for d, want in zip(answer.json()["data"], floats):
        raw = base64.b64decode(d[key])
        assert len(raw) == len(want) * torch.empty(0, dtype=DTYPES[embed_dtype][0]).element_size()
        assert_rounded(decode(raw, embed_dtype, endianness), want, embed_dtype)


def test_big_and_little_endian_bytes_are_each_others_byteswap(server):
    def raw(endianness: str) -> bytes:
        body = post(server, "/v1/embeddings", encoding_format="base64", embed_dtype="float16", endianness=endianness)
        return base64.b64decode(body.json()["data"][0]["embedding"])

    big, little, native = raw("big"), raw("little"), raw("native")
    assert big != little and native == (little if sys.byteorder == "little" else big)
    assert np.frombuffer(big, ">f2").tolist() == np.frombuffer(little, "<f2").tolist()


@pytest.mark.parametrize("path", [p for p, _ in ROUTES])
@pytest.mark.parametrize("embed_dtype, endianness", [("float32", "native"), ("bfloat16", "big"),
                                                     ("fp8_e4m3", "little")])
def test_bytes_is_every_vector_back_to_back_with_metadata_saying_where(server, floats, path, embed_dtype,
                                                                       endianness):
    answer = post(server, path, encoding_format="bytes", embed_dtype=embed_dtype, endianness=endianness)
    assert answer.status_code == 200, answer.text
    assert answer.headers["Content-Type"] == "application/octet-stream"
    metadata = json.loads(answer.headers["metadata"])
    assert metadata["model"] == server.model_name and metadata["id"].startswith(
        "embd-" if path == "/v1/embeddings" else "pooling-")
    assert metadata["usage"]["prompt_tokens"] == metadata["usage"]["total_tokens"] > 0
    size = torch.empty(0, dtype=DTYPES[embed_dtype][0]).element_size()
    offset = 0
    for i, (item, want) in enumerate(zip(metadata["data"], floats)):
        assert item == {"index": i, "embed_dtype": embed_dtype, "endianness": endianness, "start": offset,
                        "end": offset + len(want) * size, "shape": [len(want)]}
        assert_rounded(decode(answer.content[item["start"]:item["end"]], embed_dtype, endianness), want,
                       embed_dtype)
        offset = item["end"]
    assert len(answer.content) == offset


@pytest.mark.parametrize("path", [p for p, _ in ROUTES])
def test_bytes_only_is_the_same_body_without_metadata(server, path):
    with_metadata = post(server, path, encoding_format="bytes", embed_dtype="float16")
    only = post(server, path, encoding_format="bytes_only", embed_dtype="float16")
    assert only.status_code == 200 and "metadata" not in only.headers
    assert only.headers["Content-Type"] == "application/octet-stream"
    assert only.content == with_metadata.content and len(only.content) == 2 * 64 * len(TEXTS)


def test_float_ignores_embed_dtype(server, floats):
    answer = post(server, "/v1/embeddings", encoding_format="float", embed_dtype="float16", endianness="big")
    for d, want in zip(answer.json()["data"], floats):
        got = np.array(d["embedding"])
        np.testing.assert_allclose(got, want, atol=RUN_TO_RUN)
        assert not np.array_equal(got.astype(np.float16).astype(np.float64), got)   # not rounded to float16


@pytest.mark.parametrize("path", [p for p, _ in ROUTES])
@pytest.mark.parametrize("field, value", [("encoding_format", "int8"), ("encoding_format", "BASE64"),
                                          ("embed_dtype", "float64"), ("embed_dtype", "int8"),
                                          ("endianness", "middle"), ("endianness", 1)])
def test_unknown_encoding_values_are_400s_naming_the_field(server, path, field, value):
    answer = post(server, path, **{field: value})
    assert answer.status_code == 400
    error = answer.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == field and error["type"] == "invalid_request_error" and field in error["message"]
