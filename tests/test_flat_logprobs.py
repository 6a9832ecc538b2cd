"""FlatLogprobs reads as the list of dicts it stands for, and leaves the collector nothing to walk."""

from __future__ import annotations

import gc
import pickle
import random

import numpy as np
import pytest

from aserve.logprobs import FlatLogprobs, Logprob


def random_positions(rng: random.Random, count: int, first_none: bool = False) -> list:
    positions = []
    for index in range(count):
        if first_none and index == 0:
            positions.append(None)
            continue
        ids = rng.sample(range(50_000), rng.randint(1, 7))
        positions.append({token_id: Logprob(rng.uniform(-30.0, 0.0), rng.choice([None, rng.randint(1, 50_000)]),
                                            rng.choice([None, f"t{token_id}"]))
                          for token_id in ids})
    return positions


def test_reads_back_what_was_appended():
    rng = random.Random(0)
    positions = random_positions(rng, 40, first_none=True)
    flat = FlatLogprobs(positions)
    assert len(flat) == 40 and flat == positions and list(flat) == positions
    assert flat[0] is None and flat[-1] == positions[-1] and flat[5:9] == positions[5:9]
    assert flat[::7] == positions[::7] and flat[50:] == []
    for token_id, lp in positions[3].items():  # candidates keep their order, ranks their None
        assert flat[3][token_id] == lp
    assert list(flat[3]) == list(positions[3])
    with pytest.raises(IndexError):
        flat[40]
    with pytest.raises(IndexError):
        flat[-41]
    assert flat != positions[:-1] and flat != positions[:-1] + [{1: Logprob(0.0)}]
    assert pickle.loads(pickle.dumps(flat)) == positions


def test_decode_fills_the_decoded_text():
    flat = FlatLogprobs()
    flat.append({7: Logprob(-0.5, 1), 3: Logprob(-1.5, 2, "kept?")}, decode=lambda t: f"<{t}>")
    flat.append({9: Logprob(-0.1, 1, "given")})
    assert flat[0] == {7: Logprob(-0.5, 1, "<7>"), 3: Logprob(-1.5, 2, "<3>")}
    assert flat[1] == {9: Logprob(-0.1, 1, "given")}


def test_snapshot_sees_only_what_existed_and_is_read_only():
    rng = random.Random(1)
    positions = random_positions(rng, 30)
    flat = FlatLogprobs(positions[:10])
    view = flat.snapshot()
    for entry in positions[10:]:
        flat.append(entry)
    assert view == positions[:10] and len(view) == 10 and flat == positions
    with pytest.raises(TypeError):
        view.append(positions[0])


def test_copy_is_independent():
    rng = random.Random(2)
    positions = random_positions(rng, 12)
    parent = FlatLogprobs(positions[:6])
    child = parent.snapshot().copy()  # a copy of a view is writable again
    child.append(positions[6])
    parent.append(positions[7])
    assert child == positions[:7] and parent == positions[:6] + [positions[7]]


def test_positions_add_no_objects_for_the_collector():
    rng = random.Random(3)
    positions = random_positions(rng, 2_000)
    flat = FlatLogprobs()
    gc.collect()
    before = len(gc.get_objects())
    for entry in positions:
        flat.append(entry)
    del entry
    gc.collect()
    # The dicts and Logprobs above were built before counting; the flat copy of 2,000
    # positions (~8,000 candidates) adds its few arrays and lists, nothing per token.
    assert len(gc.get_objects()) - before < 10


def test_from_columns_reads_as_the_positions_it_describes():
    flat = FlatLogprobs.from_columns(ends=np.array([2, 2, 3]), absent=np.array([False, True, False]),
                                     token_ids=np.array([5, 9, 4]), logprobs=np.array([-0.25, -1.5, -3.0]),
                                     ranks=np.array([1, 2, 7]))
    assert flat == [{5: Logprob(-0.25, 1), 9: Logprob(-1.5, 2)}, None, {4: Logprob(-3.0, 7)}]
    assert all(type(t) is int and type(lp.logprob) is float and type(lp.rank) is int
               for t, lp in flat[0].items())


def test_append_row_copies_one_position_of_another_with_its_text_decoded():
    rng = random.Random(4)
    positions = random_positions(rng, 8, first_none=True)
    step = FlatLogprobs(positions)
    flat = FlatLogprobs()
    flat.append_row(step, 3)
    flat.append_row(step, 0)
    flat.append_row(step.snapshot(), 5, decode=lambda t: f"<{t}>")
    decoded = {t: Logprob(lp.logprob, lp.rank, f"<{t}>") for t, lp in positions[5].items()}
    assert flat == [positions[3], None, decoded]
    with pytest.raises(TypeError):
        flat.snapshot().append_row(step, 1)


def test_logprob_of_finds_a_token_of_a_position_or_none():
    flat = FlatLogprobs([None, {3: Logprob(-0.5, 1), 8: Logprob(-2.0, 4)}, {8: Logprob(-0.75, 1)}])
    assert flat.logprob_of(1, 8) == -2.0 and flat.logprob_of(2, 8) == -0.75
    assert flat.logprob_of(0, 3) is None and flat.logprob_of(2, 3) is None
