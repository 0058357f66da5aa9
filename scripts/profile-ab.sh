#!/usr/bin/env bash
# Interleaved A/B rounds of scripts/profile-run.sh over several kafka-sidecar binaries (issue 10,
# BENCHMARKS.md "Changes, measured"): per run the profile-run figures plus the Redis server's
# CPU time (utime+stime from /proc) in that run. With DEDUP=1 the Redis database is flushed
# before each run (FLUSHALL: use the shared test Redis only when no test is running).
#   TOPIC=h10-prof-200k N=200000 bash scripts/profile-ab.sh ROUNDS MODE DEDUP BIN...
#   e.g. bash scripts/profile-ab.sh 2 batch 1 /tmp/ks-old /tmp/ks-new
set -euo pipefail
ROUNDS=$1 MODE=$2 DEDUP=$3; shift 3
: "${TOPIC:?}" "${N:?}"
HERE="$(cd "$(dirname "$0")" && pwd)"
REDIS_PID=$(pgrep -x redis-server | head -1 || true)
[[ -n $REDIS_PID ]] || { echo "profile-ab: no redis-server running (bash scripts/env.sh up)" >&2; exit 1; }
redis_ms() { awk '{print ($14 + $15) * 10}' "/proc/$REDIS_PID/stat"; }
for round in $(seq "$ROUNDS"); do
  for bin in "$@"; do
    [[ $DEDUP == 1 ]] && redis-cli flushall >/dev/null
    before=$(redis_ms)
    result=$(BIN=$bin TIMEOUT=${TIMEOUT:-300} bash "$HERE/profile-run.sh" sidecar "$MODE" key "$DEDUP" 2>&1 | grep "got=" || echo "run failed")
    echo "round $round $bin: $result redis_cpu_ms=$(($(redis_ms) - before)) load=$(cut -d' ' -f1 /proc/loadavg)"
  done
done
