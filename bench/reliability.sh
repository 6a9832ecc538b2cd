#!/usr/bin/env bash
# The long reliability runs (issue 12), on any machine (CPU is enough); the figures they print
# go to bench/RESULTS.md:
#     bash bench/reliability.sh            # about 30 min on the 2-core development VM
# - the fuzz of every route with --fuzz-long (random seeds, ~38,000 requests): counts of
#   requests sent and of 2xx / 4xx / 5xx answers (5xx must be 0);
# - the disconnect storm with --fuzz-long (1,000 mixed requests, a third dropped): sent,
#   dropped, KV blocks leaked (must be 0);
# - /health p50 / p99 / max under load, three times (this VM's timings swing from run to run).
# CI runs the same tests in their short forms (tests/test_server_fuzz.py and friends).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
status=0
python3 -m pytest -q -s -p no:cacheprovider --fuzz-long tests/test_server_fuzz.py \
    tests/test_server_disconnects.py 2>&1 | grep -E "^(fuzz|disconnect storm):|passed|failed" || status=1
for run in 1 2 3; do
    python3 -m pytest -q -s -p no:cacheprovider tests/test_server_health_latency.py 2>&1 \
        | grep -E "^/health under load|passed|failed" || status=1
done
exit $status
