#!/usr/bin/env bash
# The main job, end to end, on a fresh Debian/Ubuntu machine:
#
#   1. Kafka (KRaft, 127.0.0.1:9092) and Redis up           (scripts/env.sh up)
#   2. build the sidecar                                      (cargo build --release --locked)
#   3. topics demo-orders (3 partitions) and demo-orders-dlq (1), if missing
#   4. the sample app (examples/demo_app.py, :8080) and the sidecar on config.toml.example,
#      with dedup on against the local Redis (KAFKA_SIDECAR_DEDUP__* env overrides)
#   5. 1,000 keyed records produced with kcat, a few of them "poison" (the app answers 422)
#   6. wait until the group's lag is 0, print a summary, SIGTERM the sidecar (must exit 0)
#
#   bash scripts/demo.sh
#
# Idempotent: every run tags its records with a run id and counts only those; the consumer
# group (demo-app) simply continues from its committed offsets. Kafka and Redis are left
# running; stop them with `bash scripts/env.sh down`.
#
# Environment: DEMO_RECORDS (1000), DEMO_TIMEOUT (seconds to reach lag 0, 120).
# Logs: ${KAFKA_SIDECAR_CACHE:-$HOME/.cache/kafka-sidecar}/demo/ (overwritten by each run).
set -euo pipefail
cd "$(dirname "$0")/.."

CACHE="${KAFKA_SIDECAR_CACHE:-$HOME/.cache/kafka-sidecar}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$CACHE/target}"
KAFKA_VERSION="${KAFKA_VERSION:-4.3.1}" # as in scripts/env.sh
LIBS="$CACHE/kafka-$KAFKA_VERSION/libs"
LOGS="$CACHE/demo"
BIN="$CARGO_TARGET_DIR/release/kafka-sidecar"
CONFIG=config.toml.example
# These must match config.toml.example.
BROKER=127.0.0.1:9092
TOPIC=demo-orders
DLQ_TOPIC=demo-orders-dlq
GROUP=demo-app
APP_PORT=8080
ADMIN_URL=http://127.0.0.1:9464
RECORDS="${DEMO_RECORDS:-1000}"
TIMEOUT="${DEMO_TIMEOUT:-120}"
POISON_EVERY=200 # every 200th record is poison: 5 of 1,000

log() { echo "demo: $*"; }
die() { echo "demo: ERROR: $*" >&2; exit 1; }

APP_PID="" SIDECAR_PID=""

# True while the process runs (a zombie that has not been waited for does not count).
running() {
  local state
  [[ -n $1 ]] && state="$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null)" && [[ $state != Z ]]
}

# stop_process NAME PID TIMEOUT: SIGTERM, SIGKILL after TIMEOUT s; sets STOP_RC to its exit status.
STOP_RC=0
stop_process() {
  local name=$1 pid=$2 deadline=$((SECONDS + $3))
  STOP_RC=0
  kill -TERM "$pid" 2>/dev/null || true
  while running "$pid" && ((SECONDS < deadline)); do sleep 0.2; done
  if running "$pid"; then
    log "$name (pid $pid) still running after $3 s; SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
  fi
  wait "$pid" 2>/dev/null || STOP_RC=$?
}

cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  if [[ -n $SIDECAR_PID ]] && running "$SIDECAR_PID"; then
    log "cleanup: stopping the sidecar (pid $SIDECAR_PID)"
    stop_process sidecar "$SIDECAR_PID" 30
  fi
  if [[ -n $APP_PID ]] && running "$APP_PID"; then
    log "cleanup: stopping the demo app (pid $APP_PID)"
    stop_process app "$APP_PID" 5
  fi
  if ((rc != 0)); then
    echo "demo: FAILED (exit $rc); logs in $LOGS/" >&2
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# http_ok URL: true if the URL answers 2xx.
http_ok() {
  python3 -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)' "$1" 2>/dev/null
}

kafka_cli() {
  timeout 60 java -Xmx256m -cp "$LIBS/*" -Dlog4j2.configurationFile="$CACHE/run/log4j2-tools.properties" "$@"
}

# Partition numbers of a topic, one per line.
partitions() {
  kcat -b "$BROKER" -L -t "$1" -m 10 | awk '$1 == "partition" { sub(",", "", $2); print $2 }'
}

# "partition end-offset" lines for $TOPIC.
end_offsets() {
  local args=() p
  for p in "${PARTS[@]}"; do args+=(-t "$TOPIC:$p:-1"); done
  kcat -Q -b "$BROKER" -m 10 "${args[@]}" | awk '$3 == "offset" { gsub(/[][]/, "", $2); print $2, $4 }'
}

sum_second_column() { awk '{ s += $2 } END { print s + 0 }'; }

# "partition committed" lines for $TOPIC from the sidecar's /status ("-": nothing committed yet).
status_committed() {
  python3 - "$ADMIN_URL/status" "$TOPIC" <<'PY'
import json, sys, urllib.request
status = json.load(urllib.request.urlopen(sys.argv[1], timeout=5))
for p in status["partitions"]:
    if p["topic"] == sys.argv[2]:
        print(p["partition"], "-" if p["committed"] is None else p["committed"])
PY
}

# Records of this run seen by the app with the given status (distinct partition/offset).
app_count() {
  { grep -F "\"run\":\"$RUN_ID\"" "$LOGS/app.log" || true; } | { grep -F " status=$1 " || true; } |
    awk '{ print $4, $5, $6 }' | sort -u | wc -l
}

# Records of this run in the dead-letter topic.
dlq_count() {
  kcat -C -b "$BROKER" -t "$DLQ_TOPIC" -o beginning -e -q -f '%s\n' | grep -cF "\"run\":\"$RUN_ID\"" || true
}

START=$SECONDS
mkdir -p "$LOGS"
RUN_ID="$(date +%Y%m%d-%H%M%S)-$$"
log "run $RUN_ID, logs in $LOGS/"

# 1. Environment ------------------------------------------------------------------------
log "starting Kafka and Redis (scripts/env.sh up)"
bash scripts/env.sh up
for cmd in python3 kcat java; do command -v "$cmd" >/dev/null || die "$cmd is not installed"; done
command -v cargo >/dev/null || die "cargo is not installed (https://rustup.rs)"

# 2. Build ------------------------------------------------------------------------------
log "building the sidecar: cargo build --release --locked (first build takes a few minutes; log: $LOGS/build.log)"
if ! cargo build --release --locked >"$LOGS/build.log" 2>&1; then
  tail -n 30 "$LOGS/build.log" >&2
  die "cargo build failed (log: $LOGS/build.log)"
fi
log "built $BIN ($((SECONDS - START)) s since start)"

# 3. Topics -----------------------------------------------------------------------------
for spec in "$TOPIC:3" "$DLQ_TOPIC:1"; do
  log "topic ${spec%%:*} (${spec##*:} partition(s)), created if missing"
  kafka_cli org.apache.kafka.tools.TopicCommand --bootstrap-server "$BROKER" --create --if-not-exists \
    --topic "${spec%%:*}" --partitions "${spec##*:}" --replication-factor 1 >/dev/null
done
mapfile -t PARTS < <(partitions "$TOPIC")
((${#PARTS[@]})) || die "topic $TOPIC has no partitions"

# 4. App and sidecar --------------------------------------------------------------------
port_open "$APP_PORT" && die "port $APP_PORT is in use (a demo app left running?); free it and retry"
port_open "${ADMIN_URL##*:}" && die "port ${ADMIN_URL##*:} (sidecar admin) is in use; free it and retry"

log "starting the demo app on :$APP_PORT (log: $LOGS/app.log)"
python3 examples/demo_app.py --port "$APP_PORT" >"$LOGS/app.log" 2>&1 &
APP_PID=$!
deadline=$((SECONDS + 15))
until http_ok "http://127.0.0.1:$APP_PORT/healthz"; do
  running "$APP_PID" || { cat "$LOGS/app.log" >&2; die "the demo app exited"; }
  ((SECONDS < deadline)) || die "the demo app did not answer on :$APP_PORT within 15 s"
  sleep 0.2
done

log "starting the sidecar with $CONFIG (log: $LOGS/sidecar.log)"
# Env vars override the file: dedup on, against the Redis that env.sh started.
KAFKA_SIDECAR_DEDUP__ENABLED=true KAFKA_SIDECAR_DEDUP__REDIS_URL=redis://127.0.0.1:6379/0 \
  "$BIN" run --config "$CONFIG" >"$LOGS/sidecar.log" 2>&1 &
SIDECAR_PID=$!
deadline=$((SECONDS + 60))
until http_ok "$ADMIN_URL/readyz"; do
  running "$SIDECAR_PID" || { tail -n 30 "$LOGS/sidecar.log" >&2; die "the sidecar exited"; }
  ((SECONDS < deadline)) || { tail -n 30 "$LOGS/sidecar.log" >&2; die "the sidecar was not ready within 60 s"; }
  sleep 0.5
done
log "sidecar ready (pid $SIDECAR_PID, joined group $GROUP, admin $ADMIN_URL; $((SECONDS - START)) s since start)"

# 5. Produce ----------------------------------------------------------------------------
before="$(end_offsets | sum_second_column)"
POISON=$((RECORDS / POISON_EVERY))
log "producing $RECORDS records to $TOPIC ($POISON poison) with kcat (log: $LOGS/produce.log)"
awk -v n="$RECORDS" -v run="$RUN_ID" -v every="$POISON_EVERY" 'BEGIN {
  split("apples pears plums cherries lemons", items, " ")
  for (i = 1; i <= n; i++) {
    note = (i % every == 0) ? "poison" : "ok"
    printf "customer-%d|{\"run\":\"%s\",\"order\":%d,\"item\":\"%s\",\"qty\":%d,\"note\":\"%s\"}\n",
      i % 37, run, i, items[i % 5 + 1], i % 9 + 1, note
  }
}' | kcat -P -b "$BROKER" -t "$TOPIC" -K '|' -X linger.ms=20 >"$LOGS/produce.log" 2>&1 ||
  { cat "$LOGS/produce.log" >&2; die "kcat could not produce"; }
produced=$(($(end_offsets | sum_second_column) - before))
((produced == RECORDS)) || die "expected $RECORDS new records in $TOPIC, the end offsets moved by $produced"

# 6. Wait for lag 0 ---------------------------------------------------------------------
log "waiting until the group's committed offsets reach the end offsets (timeout ${TIMEOUT} s)"
declare -A committed
deadline=$((SECONDS + TIMEOUT)) next_report=$((SECONDS + 5))
while :; do
  running "$SIDECAR_PID" || { tail -n 30 "$LOGS/sidecar.log" >&2; die "the sidecar exited unexpectedly"; }
  committed=()
  while read -r p c; do committed[$p]=$c; done < <(status_committed || true)
  lag=0 unknown=0
  while read -r p end; do
    c="${committed[$p]:--}"
    if [[ $c == - ]]; then unknown=$((unknown + 1)); else lag=$((lag + end - c)); fi
  done < <(end_offsets)
  ((lag == 0 && unknown == 0)) && break
  ((SECONDS < deadline)) || die "lag still $lag (and $unknown partition(s) without a commit) after ${TIMEOUT} s"
  if ((SECONDS >= next_report)); then
    log "  delivered $(app_count 200), rejected $(app_count 422) of this run's $RECORDS; lag $lag"
    next_report=$((SECONDS + 5))
  fi
  sleep 1
done
log "lag is 0 on every partition of $TOPIC ($((SECONDS - START)) s since start)"

delivered="$(app_count 200)"
rejected="$(app_count 422)"
in_dlq="$(dlq_count)"
deliveries="$(grep -cF "\"run\":\"$RUN_ID\"" "$LOGS/app.log" || true)"

# 7. Graceful shutdown ------------------------------------------------------------------
log "stopping the sidecar with SIGTERM (it must exit 0)"
stop_process sidecar "$SIDECAR_PID" 40
SIDECAR_PID=""
((STOP_RC == 0)) || { tail -n 30 "$LOGS/sidecar.log" >&2; die "the sidecar exited with status $STOP_RC"; }
log "sidecar exited 0"
stop_process app "$APP_PID" 5
APP_PID=""

# Lag as the broker sees it, after the final commit (the group has no members now).
log "checking the group's lag as the broker reports it (ConsumerGroupCommand --describe)"
kafka_cli org.apache.kafka.tools.consumer.group.ConsumerGroupCommand --bootstrap-server "$BROKER" \
  --describe --group "$GROUP" 2>&1 | awk -v t="$TOPIC" '$2 == t { print $3, $4, $5, $6 }' | sort -n >"$LOGS/lag.txt"
lag_lines=()
while read -r p cur end lag; do
  lag_lines+=("partition $p: committed $cur, end $end, lag $lag")
  [[ $lag == 0 ]] || die "partition $p of $TOPIC still has lag $lag after shutdown"
done <"$LOGS/lag.txt"
((${#lag_lines[@]} == ${#PARTS[@]})) || die "ConsumerGroupCommand did not report every partition (see $LOGS/lag.txt)"

cat <<EOF

demo: ---------------------------------------------------------------- summary
demo: run id               $RUN_ID ($((SECONDS - START)) s)
demo: produced             $RECORDS records to $TOPIC ($POISON poison)
demo: delivered (200)      $delivered records
demo: rejected (422)       $rejected records (poison), dead-lettered
demo: requests to the app  $deliveries ($((deliveries - delivered - rejected)) redeliveries)
demo: dead-letter topic    $in_dlq records of this run in $DLQ_TOPIC
EOF
for line in "${lag_lines[@]}"; do echo "demo: $TOPIC $line"; done
cat <<EOF
demo: sidecar              exited 0 on SIGTERM
demo: logs                 $LOGS/{app,sidecar,build,produce}.log
demo: ----------------------------------------------------------------
demo: a delivered record:  $(grep -F "\"run\":\"$RUN_ID\"" "$LOGS/app.log" | grep -m1 -F ' status=200 ' | cut -d' ' -f3-)
demo: a dead letter:       $(kcat -C -b "$BROKER" -t "$DLQ_TOPIC" -o -1 -e -q -f 'key=%k headers=%h value=%s\n' | tail -n 1)
demo: Kafka and Redis are still running; stop them with: bash scripts/env.sh down
EOF

((delivered == RECORDS - POISON)) || die "expected $((RECORDS - POISON)) delivered records of this run, the app saw $delivered"
((in_dlq == POISON)) || die "expected $POISON records of this run in $DLQ_TOPIC, found $in_dlq"
