"""Send many requests at once from a process of its own, so that measuring the server from
the test process is not skewed by the load's own CPU and GIL use.

    python tests/load_client.py URL < bodies.json   ->  prints {"statuses": [...], "seconds": s}

Each body is POSTed to /v1/completions (or to body["_path"]); streamed answers are read to the end.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time

import aiohttp


async def _one(session: aiohttp.ClientSession, url: str, body: dict) -> int:
    body = dict(body)
    path = body.pop("_path", "/v1/completions")
    async with session.post(url + path, json=body) as resp:
        async for _ in resp.content.iter_any():
            pass
        return resp.status


async def send_all(url: str, bodies: list[dict]) -> list[int]:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                     timeout=aiohttp.ClientTimeout(total=600)) as session:
        return await asyncio.gather(*(_one(session, url, b) for b in bodies))


def start(url: str, bodies: list[dict]) -> subprocess.Popen:
    """This script as a child process, already sending; .communicate() gives its result."""
    proc = subprocess.Popen([sys.executable, __file__, url], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    proc.stdin.write(json.dumps(bodies))
    proc.stdin.close()
    return proc


def result(proc: subprocess.Popen, timeout: float = 600) -> dict:
    out = proc.stdout.read()
    assert proc.wait(timeout) == 0, out
    return json.loads(out)


if __name__ == "__main__":
    started = time.monotonic()
    statuses = asyncio.run(send_all(sys.argv[1], json.load(sys.stdin)))
    print(json.dumps({"statuses": statuses, "seconds": time.monotonic() - started}))
