"""The shared libraries' read-ahead (aserve/cuda/library_prefetch.py): which mapped files it
picks from the process's maps, and that asking the kernel to read them ahead works here."""

from __future__ import annotations

import os

import torch

from aserve.cuda.library_prefetch import PREFETCH_ENV, mapped_libraries, read_ahead, start_prefetch


def _sparse_file(path, size: int) -> str:
    with open(path, "wb") as f:
        f.truncate(size)
    return str(path)


def test_this_process_maps_torchs_own_library():
    names = [os.path.basename(p) for p in mapped_libraries()]
    # torch is imported (above), so libtorch_cpu.so (and on a GPU machine libtorch_cuda.so) is mapped.
    assert torch.__version__ and any(name.startswith("libtorch_c") for name in names), names


def test_the_maps_are_read_for_large_shared_objects_each_once(tmp_path):
    big = _sparse_file(tmp_path / "libbig.so", 32 << 20)
    versioned = _sparse_file(tmp_path / "libcublasLt.so.13", 20 << 20)
    small = _sparse_file(tmp_path / "libsmall.so", 1 << 20)
    data = _sparse_file(tmp_path / "weights.bin", 64 << 20)
    maps = tmp_path / "maps"
    maps.write_text("\n".join([
        f"7f0000000000-7f0000100000 r--p 00000000 08:01 11 {big}",
        f"7f0000100000-7f0000200000 r-xp 00100000 08:01 11 {big}",
        f"7f0000200000-7f0000300000 r--p 00000000 08:01 12 {versioned}",
        f"7f0000300000-7f0000400000 r--p 00000000 08:01 13 {small}",
        f"7f0000400000-7f0000500000 r--p 00000000 08:01 14 {data}",
        f"7f0000500000-7f0000600000 r--p 00000000 08:01 15 {tmp_path}/libgone.so (deleted)",
        "7ffc00000000-7ffc00021000 rw-p 00000000 00:00 0 [stack]",
        "7ffc00100000-7ffc00200000 rw-p 00000000 00:00 0",
    ]) + "\n")
    assert mapped_libraries(maps_path=str(maps)) == [big, versioned]
    assert mapped_libraries(min_bytes=1, maps_path=str(maps)) == [big, versioned, small]
    assert mapped_libraries(maps_path=str(tmp_path / "no-such-maps")) == []
    assert read_ahead([big, versioned, str(tmp_path / "missing.so")]) == (32 << 20) + (20 << 20)


def test_the_prefetch_runs_only_when_asked(monkeypatch):
    monkeypatch.delenv(PREFETCH_ENV, raising=False)
    assert start_prefetch() is None
    monkeypatch.setenv(PREFETCH_ENV, "1")
    thread = start_prefetch()
    assert thread is not None
    thread.join(timeout=30)
    assert not thread.is_alive()
