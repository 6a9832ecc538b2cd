"""HealthProbe: /health latencies measured from a process of its own.

A thread of the test process measured that process too: late in a full test run it holds every
module and fixture loaded so far, and its garbage collections and other threads delayed the
probe by 100 ms and more, which counted as the server's (the /health p99 test failed in full CI
runs while passing alone at ~60 ms). A fresh interpreter that imports nothing but the standard
library measures the server alone.
"""

from __future__ import annotations

import json
import subprocess
import sys

# One probe due every `interval` seconds. A probe is timed from when it was due, and the probes
# that fell due while one waited count as waiting until it returned: a stalled loop then shows
# in every probe it held back, not in just one (no coordinated omission). The probe's own lateness
# does not count: a probe falling due before the request went out (the probe process woke late
# from its sleep, which on a 2-core machine under load happens for tens of milliseconds) is
# timed from the send. It runs until its stdin closes, then prints the latencies as JSON.
_PROBE = r"""
import http.client, json, sys, threading, time
port, interval = int(sys.argv[1]), float(sys.argv[2])
stop = threading.Event()
threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
latencies = []
print("ready", flush=True)
due = time.perf_counter()
while not stop.is_set():
    wait = due - time.perf_counter()
    if wait > 0:
        time.sleep(wait)
    sent = time.perf_counter()
    conn.request("GET", "/health")
    conn.getresponse().read()
    done = time.perf_counter()
    while due <= done:
        latencies.append(done - max(due, sent))
        due += interval
print(json.dumps(latencies), flush=True)
"""


class HealthProbe:
    """Use as a context manager around the load; `latencies` (seconds) once it exits."""

    def __init__(self, port: int, interval: float = 0.01):
        self.port, self.interval, self.latencies = port, interval, []
        self._proc = None

    def __enter__(self) -> "HealthProbe":
        self._proc = subprocess.Popen([sys.executable, "-c", _PROBE, str(self.port), str(self.interval)],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self._proc.stdout.readline().strip() == "ready", "the /health probe did not start"
        return self

    def __exit__(self, *exc):
        self._proc.stdin.close()   # the probe's signal to stop and report
        out = self._proc.stdout.read()
        self._proc.wait(timeout=30)
        self.latencies = json.loads(out.strip().splitlines()[-1])
