"""A shared-memory ring: one writer (rank 0) hands byte messages to the readers on its node.

The segment holds a write counter, one read counter per reader (each on its own cache line)
and num_slots slots of slot_bytes. A message is written as one or more chunks, one per slot,
so a message of any size passes through a ring of fixed size. The writer may fill slot
k % num_slots only once every reader has read chunk k - num_slots; a reader may read chunk k
once the write counter passes k. Each counter has a single writer, and a counter is stored
only after the bytes it publishes (with a fence between), so no lock is shared across
processes.

Readers wait by spinning (yielding the CPU) for a while after the last message, because the
next step normally follows within milliseconds and a sleeping reader would delay every step;
after that they poll every millisecond so an idle server costs no CPU.

The segment is a file under /dev/shm, mapped by each process; the writer removes the name once
the readers have mapped it (remove_name) or when it closes, so nothing is left behind even
when a process is killed.
"""

from __future__ import annotations

import mmap
import os
import threading
import time
import uuid
from typing import Callable, Optional, Sequence

import numpy as np

_LINE = 64                      # one cache line per counter: no false sharing
_WRITE = 0                      # uint64 index of the write counter in the control block
_SLOT_HEADER = 16               # per slot: chunk bytes, whole message bytes
_SPIN_SECONDS = 1.0             # spin this long after the last message before polling slowly
_IDLE_POLL_SECONDS = 0.001

_fence_lock = threading.Lock()


def _fence() -> None:
    # A lock's acquire and release are full memory barriers: the bytes of a chunk are visible
    # before the counter that publishes them (x86 keeps store order anyway; Arm does not).
    with _fence_lock:
        pass


def _shm_dir() -> str:
    return "/dev/shm" if os.path.isdir("/dev/shm") else "/tmp"


class RingClosed(RuntimeError):
    """The other side is gone (the check passed to a wait said so)."""


class ShmRing:
    def __init__(self, path: str, buffer: mmap.mmap, num_readers: int, num_slots: int,
                 slot_bytes: int, reader: Optional[int]) -> None:
        self.path = path
        self._buffer = buffer
        self.num_readers, self.num_slots, self.slot_bytes = num_readers, num_slots, slot_bytes
        self.reader = reader    # None: the writer
        control = np.ndarray((_LINE // 8) * (1 + num_readers), dtype=np.uint64, buffer=buffer)
        self._counters = control[::_LINE // 8]   # [write, read_0, read_1, ...]
        base = _LINE * (1 + num_readers)
        stride = _SLOT_HEADER + slot_bytes
        self._slot_headers = [np.ndarray(2, dtype=np.uint64, buffer=buffer, offset=base + i * stride)
                              for i in range(num_slots)]
        self._slots = [np.ndarray(slot_bytes, dtype=np.uint8, buffer=buffer,
                                  offset=base + i * stride + _SLOT_HEADER) for i in range(num_slots)]
        self._last_message = time.monotonic()

    # ------------------------------------------------------------------ creation
    @staticmethod
    def _size(num_readers: int, num_slots: int, slot_bytes: int) -> int:
        return _LINE * (1 + num_readers) + num_slots * (_SLOT_HEADER + slot_bytes)

    @classmethod
    def create(cls, num_readers: int, num_slots: int = 8, slot_bytes: int = 1 << 20) -> "ShmRing":
        """A new ring, owned by its writer (this process)."""
        path = os.path.join(_shm_dir(), f"aserve-ring-{os.getpid()}-{uuid.uuid4().hex[:12]}")
        size = cls._size(num_readers, num_slots, slot_bytes)
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        try:
            os.ftruncate(fd, size)
            buffer = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        return cls(path, buffer, num_readers, num_slots, slot_bytes, None)

    @classmethod
    def attach(cls, path: str, num_readers: int, num_slots: int, slot_bytes: int,
               reader: int) -> "ShmRing":
        """The ring at path, as reader number `reader`."""
        fd = os.open(path, os.O_RDWR)
        try:
            buffer = mmap.mmap(fd, cls._size(num_readers, num_slots, slot_bytes))
        finally:
            os.close(fd)
        return cls(path, buffer, num_readers, num_slots, slot_bytes, reader)

    @property
    def spec(self) -> tuple:
        """What a reader passes to attach() (with its own reader number)."""
        return self.path, self.num_readers, self.num_slots, self.slot_bytes

    def remove_name(self) -> None:
        """Unlink the file; mappings stay valid. Safe to call more than once."""
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    def close(self) -> None:
        if self.reader is None:
            self.remove_name()
        self._counters = self._slot_headers = self._slots = None
        try:
            self._buffer.close()
        except BufferError:  # a view still alive somewhere: the mapping goes with the process
            pass

    # ------------------------------------------------------------------ writer
    def write(self, parts: Sequence, check: Optional[Callable[[], None]] = None) -> None:
        """Write one message made of `parts` (buffers, written back to back). check() is
        called while waiting for room and raises to stop waiting (a reader died)."""
        views = [memoryview(p).cast("B") for p in parts]
        total = sum(v.nbytes for v in views)
        counters = self._counters
        part, offset = 0, 0
        remaining = total
        while True:
            index = int(counters[_WRITE])
            slot = index % self.num_slots
            if index - int(counters[1:].min()) >= self.num_slots:
                self._wait(lambda: index - int(counters[1:].min()) < self.num_slots, check)
            dest = self._slots[slot]
            chunk = min(remaining, self.slot_bytes)
            filled = 0
            while filled < chunk:  # copy parts into this slot until it holds `chunk` bytes
                view = views[part]
                n = min(view.nbytes - offset, chunk - filled)
                dest[filled:filled + n] = np.frombuffer(view[offset:offset + n], dtype=np.uint8)
                filled += n
                offset += n
                if offset == view.nbytes:
                    part, offset = part + 1, 0
            header = self._slot_headers[slot]
            header[0], header[1] = chunk, total
            _fence()
            counters[_WRITE] = index + 1
            remaining -= chunk
            if remaining <= 0:
                self._last_message = time.monotonic()
                return

    # ------------------------------------------------------------------ reader
    def read(self, check: Optional[Callable[[], None]] = None) -> np.ndarray:
        """The next message, as a new uint8 array. check() is called now and then while
        waiting and raises to stop waiting (the writer died)."""
        counters, me = self._counters, 1 + self.reader
        out, filled, total = None, 0, None
        while total is None or filled < total:
            index = int(counters[me])
            if int(counters[_WRITE]) <= index:
                self._wait(lambda: int(counters[_WRITE]) > index, check)
            _fence()
            slot = index % self.num_slots
            chunk, whole = (int(v) for v in self._slot_headers[slot])
            if out is None:
                total = whole
                out = np.empty(total, dtype=np.uint8)
            out[filled:filled + chunk] = self._slots[slot][:chunk]
            filled += chunk
            _fence()
            counters[me] = index + 1
        self._last_message = time.monotonic()
        return out

    # ------------------------------------------------------------------ waiting
    def _wait(self, ready: Callable[[], bool], check: Optional[Callable[[], None]]) -> None:
        next_check = time.monotonic() + 0.1
        while not ready():
            now = time.monotonic()
            if now - self._last_message < _SPIN_SECONDS:
                os.sched_yield()
            else:
                time.sleep(_IDLE_POLL_SECONDS)
            if check is not None and now >= next_check:
                check()
                next_check = now + 0.1
