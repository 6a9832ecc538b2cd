"""The big shared libraries' pages read ahead while the weights load, on a machine whose page
cache does not hold them yet.

torch maps cuBLAS, cuBLASLt, NCCL and its own CUDA kernels (libtorch_cuda.so) when it is
imported, but a page comes from disk only when something in it is first touched: with CUDA's
lazy loading, when a kernel is first launched. On a machine's first start of model B that
happened in the eager warm-up runs, a fault at a time: the previous version's first start on
an H200 host spent 6.39 s in them, the next start 0.38 s, both on empty cubin caches
(bench/RESULTS.md, twenty-fourth session). Here the kernel is asked to read every large mapped
library ahead (posix_fadvise WILLNEED: it queues the reads and copies nothing), from a thread
of its own, so that the later faults find the pages in memory. Where the pages are cached
already, it costs a system call a file.

Off by default until a card has measured it (bench/cold_start.sh with DROP_CACHES=1):
ASERVE_PREFETCH_LIBRARIES=1.
"""

from __future__ import annotations

import logging
import os
import threading

from aserve.cuda.compiler import env_switch

logger = logging.getLogger(__name__)

PREFETCH_ENV = "ASERVE_PREFETCH_LIBRARIES"
# The CUDA libraries are hundreds of MB each; the small ones are not worth a read.
MIN_LIBRARY_BYTES = 16 << 20


def mapped_libraries(min_bytes: int = MIN_LIBRARY_BYTES, maps_path: str = "/proc/self/maps") -> list[str]:
    """The shared objects this process has mapped (from /proc/self/maps) of min_bytes or more,
    each once, in the order first mapped. Empty where the maps cannot be read (not Linux)."""
    try:
        with open(maps_path) as maps:
            lines = maps.readlines()
    except OSError:
        return []
    paths: dict[str, None] = {}
    for line in lines:
        fields = line.split(maxsplit=5)
        if len(fields) < 6:
            continue
        path = fields[5].strip()
        name = os.path.basename(path)
        if path.startswith("/") and (name.endswith(".so") or ".so." in name):
            paths.setdefault(path, None)
    return [path for path in paths if _size(path) >= min_bytes]


def _size(path: str) -> int:
    try:
        return os.stat(path).st_size
    except OSError:   # deleted or replaced since it was mapped
        return 0


def read_ahead(paths: list[str]) -> int:
    """Ask the kernel to read each file into the page cache; the bytes asked for."""
    asked = 0
    for path in paths:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
            asked += os.fstat(fd).st_size
        except OSError:
            pass
        finally:
            os.close(fd)
    return asked


def start_prefetch() -> threading.Thread | None:
    """With ASERVE_PREFETCH_LIBRARIES=1 (and posix_fadvise, on Linux): the large mapped
    libraries read ahead from a daemon thread (a WILLNEED may wait for the disk's queue)."""
    if not env_switch(PREFETCH_ENV, "0") or not hasattr(os, "posix_fadvise"):
        return None

    def run() -> None:
        paths = mapped_libraries()
        asked = read_ahead(paths)
        logger.info("asked the kernel to read ahead %d shared libraries (%.0f MB)", len(paths), asked / 1e6)

    thread = threading.Thread(target=run, name="aserve-library-prefetch", daemon=True)
    thread.start()
    return thread
