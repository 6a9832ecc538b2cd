"""Random ids for responses, requests and tool calls, as uuid.uuid4().hex gives them (vLLM's
random_uuid), without a system call per id.

uuid4 reads 16 bytes from os.urandom, and os.urandom lets go of the GIL for its getrandom()
call: on the event loop, every id was a chance for the engine thread to take the GIL, and the
loop then waited for it back (up to the 5 ms switch interval). In a burst of 1000 requests on
the development VM, py-spy put ~9% of the loop's samples in that one line. The same
cryptographic randomness is read here 256 ids at a time; ids stay unguessable, which matters
for those a client can fetch by (stored responses).
"""

from __future__ import annotations

import os

_IDS_PER_READ = 256


class _RandomHexIds:
    def __init__(self) -> None:
        self._ids = iter(())

    def __call__(self) -> str:
        # next() on a list iterator is atomic under the GIL, so threads never share an id; two
        # threads refilling at once only read the system's randomness twice.
        for hex_id in self._ids:
            return hex_id
        self._ids = iter(self._read())
        return next(self._ids)

    @staticmethod
    def _read() -> list[str]:
        raw = bytearray(os.urandom(16 * _IDS_PER_READ))
        ids = []
        for start in range(0, len(raw), 16):
            chunk = raw[start:start + 16]
            chunk[6] = (chunk[6] & 0x0F) | 0x40   # version 4, and RFC 4122's variant, as uuid4
            chunk[8] = (chunk[8] & 0x3F) | 0x80
            ids.append(chunk.hex())
        return ids


_ids = _RandomHexIds()


def random_hex_id() -> str:
    """32 hex digits of a random (version 4) UUID, as uuid.uuid4().hex."""
    return _ids()
