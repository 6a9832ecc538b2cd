"""How pooled vectors go back to the client, as vLLM encodes them (its serial_utils and
pooling utils): `encoding_format` "float" (JSON numbers), "base64" (the vector's bytes, base64
in the JSON), "bytes" (every vector's bytes, one after another, as the whole response body,
application/octet-stream, with a `metadata` header holding the JSON that says where each one
lies) or "bytes_only" (that body without the header).

The bytes are the vector in `embed_dtype` (float32 by default, as OpenAI's client decodes
base64; float16, bfloat16, or an fp8 format), in the byte order `endianness` names ("native":
the server's own, vLLM's default). bfloat16 and fp8 have no numpy type: their raw bits are
written (2 bytes and 1 byte a number), and byte order swaps bfloat16's two bytes as float16's.
"""

from __future__ import annotations

import base64
import json
import sys
from typing import Literal, Optional, Union

import torch
from aiohttp import web

EncodingFormat = Literal["float", "base64", "bytes", "bytes_only"]
EmbedDType = Literal["float32", "float16", "bfloat16", "fp8_e4m3", "fp8_e5m2"]
Endianness = Literal["native", "big", "little"]

# Each dtype as torch rounds to it, and as the integer or float type its bits are written as
# (numpy, which writes them, knows neither bfloat16 nor fp8).
_DTYPES: dict[str, tuple[torch.dtype, torch.dtype]] = {
    "float32": (torch.float32, torch.float32),
    "float16": (torch.float16, torch.float16),
    "bfloat16": (torch.bfloat16, torch.int16),
    "fp8_e4m3": (torch.float8_e4m3fn, torch.uint8),
    "fp8_e5m2": (torch.float8_e5m2, torch.uint8),
}


def vector_bytes(vector: list[float], embed_dtype: str, endianness: str) -> bytes:
    """One vector's bytes: rounded to embed_dtype, in the byte order endianness names."""
    dtype, bits = _DTYPES[embed_dtype]
    array = torch.tensor(vector, dtype=torch.float32).to(dtype).view(bits).numpy()
    if endianness != "native" and endianness != sys.byteorder:
        array = array.byteswap()
    return array.tobytes()


def encoded_vector(vector: list[float], encoding_format: str, embed_dtype: str,
                   endianness: str) -> Union[list[float], str]:
    """A vector as a JSON answer carries it: numbers ("float"), or its bytes in base64."""
    if encoding_format == "float":
        return vector
    return base64.b64encode(vector_bytes(vector, embed_dtype, endianness)).decode("ascii")


def is_binary(encoding_format: str) -> bool:
    """Whether the answer is raw bytes (bytes_response), not JSON."""
    return encoding_format in ("bytes", "bytes_only")


def bytes_response(vectors: list[list[float]], prompt_tokens: int, request_id: str, created: int, model: str,
                   encoding_format: str, embed_dtype: str, endianness: str) -> web.Response:
    """Every vector's bytes as the body; with "bytes", the `metadata` header says, for each,
    its index, dtype, byte order, [start, end) in the body and shape, plus the id and usage."""
    parts, items, offset = [], [], 0
    for index, vector in enumerate(vectors):
        part = vector_bytes(vector, embed_dtype, endianness)
        items.append({"index": index, "embed_dtype": embed_dtype, "endianness": endianness,
                      "start": offset, "end": offset + len(part), "shape": [len(vector)]})
        parts.append(part)
        offset += len(part)
    headers: Optional[dict[str, str]] = None
    if encoding_format == "bytes":
        headers = {"metadata": json.dumps({
            "id": request_id, "created": created, "model": model, "data": items,
            "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}})}
    return web.Response(body=b"".join(parts), headers=headers, content_type="application/octet-stream")
