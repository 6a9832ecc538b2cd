"""The server's random ids: uuid4's shape and randomness, without a system call per id."""

from __future__ import annotations

import os
import threading
import uuid

import aserve.server.random_ids as random_ids
from aserve.server.random_ids import random_hex_id


def test_ids_are_distinct_version_4_uuids_in_hex():
    ids = [random_hex_id() for _ in range(2000)]
    assert len(set(ids)) == len(ids)
    for hex_id in ids[:300]:
        parsed = uuid.UUID(hex=hex_id)
        assert parsed.hex == hex_id and len(hex_id) == 32
        assert parsed.version == 4 and parsed.variant == uuid.RFC_4122


def test_the_system_randomness_is_read_once_per_batch_of_ids(monkeypatch):
    reads = []
    real_urandom = os.urandom
    monkeypatch.setattr(random_ids.os, "urandom", lambda n: reads.append(n) or real_urandom(n))
    monkeypatch.setattr(random_ids, "_ids", random_ids._RandomHexIds())
    for _ in range(3 * random_ids._IDS_PER_READ):
        random_hex_id()
    assert reads == [16 * random_ids._IDS_PER_READ] * 3


def test_threads_never_get_the_same_id():
    got: list[list[str]] = [[] for _ in range(4)]

    def take(out: list[str]) -> None:
        for _ in range(5000):
            out.append(random_hex_id())

    threads = [threading.Thread(target=take, args=(out,)) for out in got]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    everything = [i for out in got for i in out]
    assert len(set(everything)) == len(everything)
