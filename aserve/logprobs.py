"""Logprob, and FlatLogprobs: the logprobs of a request's positions kept in flat arrays.

As list[dict[int, Logprob]], every candidate of every position is an object the garbage
collector tracks, and a full collection walks them all while it holds the GIL. A server whose
streams ask for logprobs (32 streams echoing 300 prompt positions with 6 candidates each hold
~60k of them) then paused for 60-270 ms per full collection on a 2-core host, and /health and
every stream with it. FlatLogprobs keeps the same numbers in typed arrays, which the collector
never walks, and builds a position's dict when it is read: reading code sees the list of dicts
it expects (indexing, slices, iteration, len, ==). vLLM keeps the same layout for the same
reason (its FlatLogprobs).

The sampler hands a step's logprobs over as one FlatLogprobs, one position per row, built from
its packed tensor column by column (`from_columns`); the engine copies a row into its request's
own with `append_row`, array slices and no object per candidate (at 256 rows with 5 logprobs,
a Logprob per candidate cost ~1 ms a step). What it hands out are snapshots (`snapshot()`),
which share the arrays and see the positions that existed when taken: a step's output costs no
copy however long the request's logprobs grow.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Callable, Optional, Union

import numpy as np


@dataclass
class Logprob:
    """The log probability of one token, its rank in the distribution and its decoded text."""

    logprob: float
    rank: Optional[int] = None
    decoded_token: Optional[str] = None


_NO_RANK = 0  # ranks start at 1


class FlatLogprobs(Sequence):
    """A sequence of positions, each a dict token id -> Logprob or None (a prompt's first token,
    which nothing predicts)."""

    __slots__ = ("_ends", "_absent", "_token_ids", "_logprobs", "_ranks", "_decoded", "_length",
                 "_frozen")

    def __init__(self, positions: Iterable[Optional[Mapping[int, Logprob]]] = ()) -> None:
        self._ends = array("q")        # per position: the end of its candidates in the arrays below
        self._absent = array("b")      # per position: 1 where the position is None
        self._token_ids = array("q")   # per candidate
        self._logprobs = array("d")
        self._ranks = array("q")
        self._decoded: list[Optional[str]] = []
        self._length = 0
        self._frozen = False
        for entry in positions:
            self.append(entry)

    # ------------------------------------------------------------------ writing
    def append(self, entry: Optional[Mapping[int, Logprob]],
               decode: Optional[Callable[[int], str]] = None) -> None:
        """Add a position. `decode` (token id -> text) fills each candidate's decoded_token."""
        if self._frozen:
            raise TypeError("a FlatLogprobs snapshot is read-only")
        if entry is not None:
            for token_id, lp in entry.items():
                self._token_ids.append(token_id)
                self._logprobs.append(lp.logprob)
                self._ranks.append(_NO_RANK if lp.rank is None else lp.rank)
                self._decoded.append(decode(token_id) if decode is not None else lp.decoded_token)
        self._ends.append(len(self._token_ids))
        self._absent.append(entry is None)
        self._length += 1

    def append_row(self, source: "FlatLogprobs", index: int,
                   decode: Optional[Callable[[int], str]] = None) -> None:
        """Add a copy of `source`'s position `index` (a row of the sampler's step). `decode`
        (token id -> text) fills each candidate's decoded_token, else source's text is kept."""
        if self._frozen:
            raise TypeError("a FlatLogprobs snapshot is read-only")
        # Called once per request per step: array slices, no per-candidate Python work but decode.
        ends = source._ends
        start, end = ends[index - 1] if index else 0, ends[index]
        token_ids = self._token_ids
        if end > start:  # a None position has no candidates
            ids = source._token_ids[start:end]
            token_ids.extend(ids)
            self._logprobs.extend(source._logprobs[start:end])
            self._ranks.extend(source._ranks[start:end])
            self._decoded.extend(map(decode, ids) if decode is not None else source._decoded[start:end])
        self._ends.append(len(token_ids))
        self._absent.append(source._absent[index])
        self._length += 1

    @classmethod
    def from_columns(cls, ends: np.ndarray, absent: np.ndarray, token_ids: np.ndarray,
                     logprobs: np.ndarray, ranks: np.ndarray) -> "FlatLogprobs":
        """Positions from numpy columns: per position the end of its candidates and whether it is
        None; per candidate its token id, logprob and rank (>= 1). No text is decoded."""
        new = cls()
        new._ends.frombytes(np.ascontiguousarray(ends, dtype=np.int64).tobytes())
        new._absent.frombytes(np.ascontiguousarray(absent, dtype=np.int8).tobytes())
        new._token_ids.frombytes(np.ascontiguousarray(token_ids, dtype=np.int64).tobytes())
        new._logprobs.frombytes(np.ascontiguousarray(logprobs, dtype=np.float64).tobytes())
        new._ranks.frombytes(np.ascontiguousarray(ranks, dtype=np.int64).tobytes())
        new._decoded = [None] * len(new._token_ids)
        new._length = len(new._ends)
        assert len(new._absent) == new._length and len(new._logprobs) == len(new._ranks) == len(new._decoded)
        return new

    def snapshot(self) -> "FlatLogprobs":
        """A read-only view of the positions there are now. It shares the arrays: appends made
        here later are beyond its length and never show in it."""
        view = FlatLogprobs.__new__(FlatLogprobs)
        view._ends, view._absent = self._ends, self._absent
        view._token_ids, view._logprobs = self._token_ids, self._logprobs
        view._ranks, view._decoded = self._ranks, self._decoded
        view._length = self._length
        view._frozen = True
        return view

    def copy(self) -> "FlatLogprobs":
        """An independent, writable copy (a forked sample continues from its parent's)."""
        length = self._length
        end = self._ends[length - 1] if length else 0
        new = FlatLogprobs.__new__(FlatLogprobs)
        new._ends, new._absent = self._ends[:length], self._absent[:length]
        new._token_ids, new._logprobs = self._token_ids[:end], self._logprobs[:end]
        new._ranks, new._decoded = self._ranks[:end], self._decoded[:end]
        new._length = length
        new._frozen = False
        return new

    def tail(self, start: int) -> "FlatLogprobs":
        """A read-only copy of the positions from `start` on (a DELTA output's new ones)."""
        length = self._length
        start = min(start, length)
        first = self._ends[start - 1] if start else 0
        new = FlatLogprobs.__new__(FlatLogprobs)
        new._ends = array("q", (end - first for end in self._ends[start:length]))
        new._absent = self._absent[start:length]
        end = self._ends[length - 1] if length else 0
        new._token_ids, new._logprobs = self._token_ids[first:end], self._logprobs[first:end]
        new._ranks, new._decoded = self._ranks[first:end], self._decoded[first:end]
        new._length = length - start
        new._frozen = True
        return new

    def joined(self, later: "FlatLogprobs") -> "FlatLogprobs":
        """A read-only copy of these positions followed by `later`'s (two DELTA outputs merged)."""
        new = self.tail(0)
        offset = new._ends[-1] if new._length else 0
        new._ends.extend(end + offset for end in later._ends[:later._length])
        end = later._ends[later._length - 1] if later._length else 0
        new._absent.extend(later._absent[:later._length])
        new._token_ids.extend(later._token_ids[:end])
        new._logprobs.extend(later._logprobs[:end])
        new._ranks.extend(later._ranks[:end])
        new._decoded.extend(later._decoded[:end])
        new._length += later._length
        return new

    # ------------------------------------------------------------------ reading
    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: Union[int, slice]):
        if isinstance(index, slice):
            return [self._position(i) for i in range(*index.indices(self._length))]
        if index < 0:
            index += self._length
        if not 0 <= index < self._length:
            raise IndexError("FlatLogprobs index out of range")
        return self._position(index)

    def __iter__(self) -> Iterator[Optional[dict[int, Logprob]]]:
        for index in range(self._length):
            yield self._position(index)

    def logprob_of(self, index: int, token_id: int) -> Optional[float]:
        """Position index's logprob of token_id; None where the position is None or lacks it.
        Builds no dict."""
        ends = self._ends
        try:  # a None position has no candidates: not found
            found = self._token_ids.index(token_id, ends[index - 1] if index else 0, ends[index])
        except ValueError:
            return None
        return self._logprobs[found]

    def _position(self, index: int) -> Optional[dict[int, Logprob]]:
        if self._absent[index]:
            return None
        start = self._ends[index - 1] if index else 0
        ranks, logprobs, decoded = self._ranks, self._logprobs, self._decoded
        return {token_id: Logprob(logprobs[i], None if ranks[i] == _NO_RANK else ranks[i], decoded[i])
                for i, token_id in enumerate(self._token_ids[start:self._ends[index]], start)}

    def __eq__(self, other) -> bool:
        if not isinstance(other, Sequence) or isinstance(other, (str, bytes)):
            return NotImplemented
        return len(self) == len(other) and all(a == b for a, b in zip(self, other))

    __hash__ = None  # mutable, like the list it stands for

    def __repr__(self) -> str:
        return f"FlatLogprobs({list(self)!r})"


# One entry per generated position: token id -> Logprob (the chosen token always included).
SampleLogprobs = Union[FlatLogprobs, list[dict[int, Logprob]]]
# Prompt logprobs: None for the first prompt token, which has no context to be predicted from.
PromptLogprobs = Union[FlatLogprobs, list[Optional[dict[int, Logprob]]]]
