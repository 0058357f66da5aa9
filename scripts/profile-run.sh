#!/usr/bin/env bash
# One profiling run for issue 10 (BENCHMARKS.md, "Profile (issue 10)"): consumes a pre-produced topic
# ($TOPIC, $N records) once with kafka-sidecar ($BIN) or the Go consumer (../shared/peers) into the
# neutral sink and prints records/s, CPU s per 1M records (utime+stime of the process, /proc) and
# peak RSS (VmHWM). PERF=1: perf record -g; WRAP="valgrind --tool=callgrind ...": instruction counts;
# PRELOAD=<lib>: LD_PRELOAD (allocator trials); EXTRA_PIPELINE: extra [pipeline] lines.
# URL=unix://SOCK:/records needs a sink that also serves on a socket: the peers sink with a
# `-unix PATH` flag added (net.Listen("unix", PATH) + http.Serve), built to /tmp/h10/sink-uds.
#   TOPIC=h10-prof-200k N=200000 BIN=target/release/kafka-sidecar bash scripts/profile-run.sh sidecar batch key
set -euo pipefail
SYS=$1 MODE=$2 ORD=$3 DEDUP=${4:-0}
: "${TOPIC:?}" "${N:?}"
BIN=${BIN:-${CARGO_TARGET_DIR:-$HOME/.cache/kafka-sidecar/target}/release/kafka-sidecar}
PORT=${PORT:-18380}; APORT=$((PORT+1))
GROUP="prof-$SYS-$MODE-$ORD-$DEDUP-$RANDOM$RANDOM"
D=${PROFILE_DIR:-/tmp/kafka-sidecar-profile}/run-$GROUP; mkdir -p $D
URL=${URL:-http://127.0.0.1:$PORT/records}
if [[ $URL == unix://* ]]; then SOCK=${URL#unix://}; SOCK=${SOCK%%:*}; rm -f $SOCK; ${SINK_UDS:-/tmp/h10/sink-uds} -listen 127.0.0.1:$PORT -unix $SOCK >$D/sink.log 2>&1 & else
~/.cache/kafka-sidecar-peers/sink -listen 127.0.0.1:$PORT >$D/sink.log 2>&1 & fi
SINK=$!
sleep 0.3
kill -0 $SINK || { echo "sink did not start" >&2; exit 1; }
count() { curl -fsS --max-time 2 http://127.0.0.1:$PORT/count 2>/dev/null | awk '{print $1}' || echo 0; }
if [[ $SYS == go ]]; then
  B=1; [[ $MODE == batch ]] && B=500
  TOPIC=$TOPIC GROUP=$GROUP BATCH=$B WORKERS=64 APP_URL=$URL bash /work/shared/peers/run-goconsumer.sh >$D/p.log 2>&1 &
else
  cat >$D/c.toml <<T
[kafka]
brokers = "127.0.0.1:9092"
group_id = "$GROUP"
topics = ["$TOPIC"]
[app]
url = "$URL"
mode = "$MODE"
[pipeline]
ordering = "$ORD"
workers = 64
${EXTRA_PIPELINE:-}
[batch]
max_records = 500
[dedup]
enabled = $([[ $DEDUP == 1 ]] && echo true || echo false)
redis_url = "redis://127.0.0.1:6379/"
[admin]
listen = "127.0.0.1:$APORT"
T
  if [[ ${PERF:-0} == 1 ]]; then
    perf record -F ${PERF_FREQ:-499} -g --call-graph dwarf,16384 -o $D/perf.data $BIN run --config $D/c.toml >$D/p.log 2>&1 &
  else
    env ${PRELOAD:+LD_PRELOAD=$PRELOAD} ${WRAP:-} $BIN run --config $D/c.toml >$D/p.log 2>&1 &
  fi
fi
P=$!
sleep 0.2
PID=$P
if [[ ${PERF:-0} == 1 ]]; then for i in $(seq 50); do PID=$(pgrep -P $P | head -1 || true); [[ -n $PID ]] && break; sleep 0.1; done; fi
t_first="" maxrss=0
end=$((SECONDS+${TIMEOUT:-120}))
while ((SECONDS<end)); do
  c=$(count); c=${c:-0}
  [[ -z $t_first && $c -gt 0 ]] && { t_first=$(date +%s.%N); c_first=$c; }
  r=$(awk '/^VmHWM:/{print $2}' /proc/$PID/status 2>/dev/null || echo 0); ((r>maxrss)) && maxrss=$r
  ((c>=N)) && break
  sleep 0.05
done
t_last=$(date +%s.%N)
read -r ut st < <(awk '{print $14, $15}' /proc/$PID/stat)
kill -TERM $PID; wait $P 2>/dev/null || true; kill $SINK; wait $SINK 2>/dev/null || true
tck=$(getconf CLK_TCK)
awk -v n=$N -v c=$c -v cf=${c_first:-0} -v a=${t_first:-0} -v b=$t_last -v u=$ut -v s=$st -v t=$tck -v rss=$maxrss -v sys="$SYS $MODE $ORD dedup=$DEDUP" \
 'BEGIN{printf "%-36s got=%d rec/s=%.0f cpu_s_per_1M=%.2f (user %.2f sys %.2f) peakRSS=%.1fMiB\n", sys, c, (c-cf)/(b-a), (u+s)/t/n*1e6, u/t/n*1e6, s/t/n*1e6, rss/1024}'
echo "dir: $D" >&2
