"""Request bodies as JSON, with every integer kept exact.

orjson is fast, but an integer outside [-2**63, 2**64) comes back from it as a float (2**70 as
1.1805916207174113e+21, -2**63-1 as -9.223372036854776e+18): a seed of -2**63-1 was then
refused as a float, and a field checked by its range saw a rounded value. Integer literals that
long have 19 digits or more, so a body without such a run of digits is parsed by orjson alone;
one with it is parsed by orjson (which still decides what is valid JSON: no NaN, no lone
surrogates) and then again by the standard library, which keeps every integer exact. The
second parse only costs bodies with long digit runs (a prompt quoting one included).
"""

from __future__ import annotations

import json
import math
from typing import Any

import orjson

# Shorter integers are exact in orjson (|n| < 10**18 < 2**63). The run is found by mapping
# every digit to b"0" and everything else to b" ", then a plain bytes.find: ~70 ms for a 20 MB
# body, where a regex took ~700 ms of the event loop.
_DIGIT_RUN = b"0" * 19
_DIGITS_TO_ZERO = bytes(0x30 if 0x30 <= b <= 0x39 else 0x20 for b in range(256))


def loads_exact(raw: bytes) -> Any:
    """JSON text to Python values, every integer exact; JSONDecodeError / ValueError if invalid."""
    return with_exact_integers(raw, loads_fast(raw))


def loads_fast(raw: bytes) -> Any:
    """orjson's parse: what is valid JSON, with integers past 64 bits as floats (JSONDecodeError
    if invalid). with_exact_integers(raw, result) makes them exact."""
    return orjson.loads(raw)


def with_exact_integers(raw: bytes, data: Any) -> Any:
    """loads_fast(raw)'s result `data`, or, when raw has a run of 19 digits (an integer orjson
    may have rounded), the standard library's parse, which keeps every integer exact."""
    if raw.translate(_DIGITS_TO_ZERO).find(_DIGIT_RUN) == -1:
        return data
    # Python's int() refuses more than 4300 digits: a ValueError, reported as invalid JSON.
    return json.loads(raw, parse_float=_finite_float)


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # orjson refuses 1e400 too; both must agree
        raise ValueError(f"number {text} is out of range")
    return value

