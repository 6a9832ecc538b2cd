# cold-start A/B, the compile-ahead GPU test, the server under py-spy (one device call)
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl 2>&1 | tail -1
export PYTHONPATH=/tmp/site HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
nproc; lscpu | grep "Model name"
for round in 1 2; do
  for v in previous head; do
    dir=.; [ $v = previous ] && dir=.previous
    c=$(mktemp -d)
    echo "=== cold start $v round $round"
    (cd $dir && ASERVE_CACHE_DIR=$c timeout 120 python3 bench/profile_start.py --starts 2 --top 0 2>&1 | grep -E "^start|compiling")
  done
done
echo "=== test_compile_ahead"
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_compile_ahead.py 2>&1 | tail -3
echo "=== server profile"
PYTHONPATH=/tmp/site:$PWD MODEL=A RATE=inf PYSPY_ARGS=--gil SUMMARY_LINES=120 timeout 280 bash bench/profile_server.sh 2>&1 | tail -150
