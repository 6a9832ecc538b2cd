"""File descriptors: the soft limit raised to the hard one at start (as vLLM does), and a
watch that says, once, when the process runs out.

Every client connection holds a descriptor. Out of them, uvloop (libuv) keeps serving the
connections it has and closes new ones at once, silently, until descriptors free up; the
watch turns that into one WARNING when it starts and one INFO line when it is over.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import resource
from typing import Optional

logger = logging.getLogger("aserve.server")

_UNLIMITED_TARGET = 1 << 20   # an infinite hard limit: the kernel's usual nr_open
# Within this many descriptors of the limit, new connections are about to be refused.
_HEADROOM = 8


def raise_open_file_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit; returns the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = _UNLIMITED_TARGET if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:
            logger.warning("could not raise the open-file limit from %d to %d (%s); the server "
                           "can hold about %d connections", soft, target, exc, soft)
    return soft


def _count_open_files() -> Optional[int]:
    """Descriptors open now; None when not even one more can be opened to count them."""
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError as exc:
        if exc.errno in (errno.EMFILE, errno.ENFILE):
            return None
        raise


async def watch_open_files(interval_s: float = 1.0) -> None:
    """Log once when the process runs out of file descriptors, and once when it recovers."""
    if not os.path.isdir("/proc/self/fd"):  # Linux only; elsewhere nothing is watched
        return
    exhausted = False
    while True:
        await asyncio.sleep(interval_s)
        limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        open_files = await asyncio.to_thread(_count_open_files)  # O(descriptors): not on the loop
        if open_files is None:
            open_files = limit
        if not exhausted and open_files >= limit - _HEADROOM:
            exhausted = True
            logger.warning("out of file descriptors (%d open, limit %d): new connections are "
                           "refused until some close; open connections are still served. Raise "
                           "the limit (ulimit -n) or lower --timeout-keep-alive.", open_files, limit)
        elif exhausted and open_files < limit - 2 * _HEADROOM:
            exhausted = False
            logger.info("file descriptors are available again (%d open, limit %d)", open_files, limit)
