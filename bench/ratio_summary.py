"""The server-to-offline ratio of a bench/server_vs_offline.sh log (read from stdin): each
all-at-once server run against the offline run with a tokenizer before it (its round), and each
server variant's mean against the mean of those offline runs.

On the H100 hosts of 2026-12-06 runs of one configuration spread 20-30% within a call, more
than the gap to issue 11's goal (0.85x), so a claim rests on the means of several rounds
(SERVER_ROUNDS), not on one.
"""

from __future__ import annotations

import json
import re
import sys
from collections import defaultdict

_OFFLINE = re.compile(r"^=== offline A, with a tokenizer(?:, round \d+)?: (\{.*\})$")
_OFFLINE_TIMED = re.compile(r"^=== offline: (\d+) output tok/s$")
_SERVER = re.compile(r"^=== server A, (.*), rate inf, \d+ prompts: .*Output token throughput \(tok/s\) ([\d.]+)")
# bench/serving.py's MEAN rows, in its order: TTFT, TPOT, ITL (ms).
_MEANS = re.compile(r"MEAN \(ms\) ([\d.]+)")


def summarize(lines) -> list[str]:
    offline: list[float] = []
    runs: dict[str, list[tuple[float, float]]] = defaultdict(list)   # label -> (served, its round's offline)
    latencies: dict[str, list[list[float]]] = defaultdict(list)      # label -> each run's TTFT, TPOT, ITL means
    with_tokenizer = False
    for line in lines:
        line = line.rstrip("\n")
        if line.startswith("=== offline A, "):
            with_tokenizer = "with a tokenizer" in line
        match = _OFFLINE.match(line)
        if match:
            offline.append(json.loads(match.group(1))["output_tokens_per_s"])
            continue
        match = _OFFLINE_TIMED.match(line)
        if match and with_tokenizer:   # bench/engine_thread_timing.py's form (ENGINE_TIMING=1)
            offline.append(float(match.group(1)))
            continue
        match = _SERVER.match(line)
        if match and offline:
            runs[match.group(1)].append((float(match.group(2)), offline[-1]))
            means = [float(m) for m in _MEANS.findall(line)]
            if len(means) >= 3:
                latencies[match.group(1)].append(means[:3])
    if not offline or not runs:
        return ["=== summary: no offline run with a tokenizer, or no server run all at once"]
    mean_offline = sum(offline) / len(offline)
    out = [f"=== summary: offline A with a tokenizer, {len(offline)} run(s): "
           f"{', '.join(f'{x:,.0f}' for x in offline)}; mean {mean_offline:,.0f} out tok/s"]
    for label, pairs in runs.items():
        served = [s for s, _ in pairs]
        mean = sum(served) / len(served)
        rounds = ", ".join(f"{s:,.0f} ({s / o:.2f}x)" for s, o in pairs)
        out.append(f"    {label}: {rounds}; mean {mean:,.0f}, {mean / mean_offline:.2f}x the offline mean"
                   + _latency_ranges(latencies.get(label, [])))
    return out


def _latency_ranges(runs: list[list[float]]) -> str:
    """'; TTFT a-b, TPOT c-d, ITL e-f ms (means of the runs)' where the runs printed them."""
    if not runs:
        return ""
    parts = []
    for name, values in zip(("TTFT", "TPOT", "ITL"), zip(*runs)):
        low, high = min(values), max(values)
        parts.append(f"{name} {low:,.1f}" + (f"-{high:,.1f}" if high != low else ""))
    return "; " + ", ".join(parts) + " ms (each run's mean)"


if __name__ == "__main__":
    print("\n".join(summarize(sys.stdin)))
