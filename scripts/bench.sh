#!/usr/bin/env bash
# Throughput and memory benchmark of the release sidecar against the local broker.
#
#   bash scripts/bench.sh                    # the sidecar alone (below)
#   bash scripts/bench.sh --peers            # side by side with the peers (next paragraph)
#   bash scripts/bench.sh --peers --smoke    # the CI smoke of the side-by-side harness
#
# --peers (implemented in scripts/bench-peers.sh): the same topic, the same sink, the same broker
# for every system; each run starts a fresh sink and a fresh system with its own consumer group;
# BENCH_ROUNDS interleaved rounds over the systems; medians. The peers come from ../shared/peers
# beside the repository (BENCH_PEERS_DIR overrides; the run fails if they are absent): the Go
# consumer (sarama), Dapr 1.14 and Camel 4.22, built with their build-*.sh into
# ~/.cache/kafka-sidecar-peers/ when missing (Dapr: ~4 min), and the neutral sink
# (../shared/peers/sink, GET /count -> "records requests distinct"). Per run: records/s from the
# first record at the sink to the last (examples/bench_watch.go polls /count every 5 ms over a
# keep-alive connection), CPU seconds per million records of the system's process in that
# window (/proc/PID/stat), peak RSS (VmHWM), redeliveries (records - distinct offsets); the exit
# status on SIGTERM. Also: the raw read limit (kcat -C, no group, no HTTP); the sink's own request
# rate under wrk (the single-mode ceiling); end-to-end latency p50/p99/p99.9 at a fixed rate (half
# the lower single-mode maximum of kafka-sidecar and the Go consumer; examples/rate_producer.go
# stamps the send time into each value, piped into kcat -P with linger.ms=5; examples/latency_app.go
# measures the arrival) for kafka-sidecar and the Go consumer, against the floor of
# examples/latency_floor.rs (a plain librdkafka consumer) reading the same topic into
# latency_app -stdin (no group, no HTTP: their "added" latency); when
# `kafka-sidecar check-config` accepts app.url = "unix://PATH:/records", kafka-sidecar into
# examples/bench_app.go over a Unix socket vs TCP.
# Every row carries its ratio to the Go consumer in the same mode (single/batch). The report goes
# to ~/.cache/kafka-sidecar/bench/peers-<run>/report.md (each run: runs.tsv) and is printed; it
# fails (exit 1, with the reasons) if any run does not deliver every record, exits non-zero on
# SIGTERM (Camel's JVM: 143 accepted) or the harness breaks.
#   Systems (BENCH_SYSTEMS, first shape): raw sc-key sc-unordered sc-dedup sc-batch-key
#     sc-batch-unordered sc-batch-dedup go go-batch dapr dapr-batch camel camel-batch
#     (sc = kafka-sidecar; *-dedup: Redis at BENCH_REDIS_URL=redis://127.0.0.1:6379/0)
#   BENCH_SHAPES="1024x6 256x6 16384x6 1024x24" (value bytes x partitions; 16 KiB: BENCH_RECORDS/5)
#   BENCH_EXTRA_SYSTEMS="raw sc-key sc-batch-key go go-batch" (the shapes after the first)
#   BENCH_ROUNDS=3  BENCH_RECORDS=200000  BENCH_WORKERS=64  BENCH_BATCH_RECORDS=500
#   BENCH_LATENCY=1  BENCH_LATENCY_SECONDS=10  BENCH_LATENCY_RATE (default: half the maximum)
#   BENCH_WRK=1  BENCH_UNIX=auto (1: fail if unsupported, 0: off)  BENCH_RUN_TIMEOUT=180
#   BENCH_SIDECAR_BIN (a prebuilt kafka-sidecar binary: no cargo build)
#   --smoke: 1 round of 10,000 records x 1 KiB x 6 partitions, sc-key sc-batch-key go go-batch,
#     no latency/wrk/Unix rows (scripts/test.sh runs it; ~20 s warm, plus the Go consumer's first
#     build on a fresh machine, ~1 min).
#
# Without --peers:
# 1. produces N records (value size S bytes, keys k0..k9999) into a fresh topic with P partitions;
# 2. baseline: the raw librdkafka read rate of that topic (kcat from the beginning to the end);
# 3. for each scenario, a fresh consumer group and a fresh sidecar (release build) delivering to
#    examples/bench_app.go (Go net/http, answers 200 at once, counts records): wall time from
#    the sidecar's start until the app has seen N records and until the committed offsets
#    reach the end, records/s, peak RSS (VmRSS sampled every 200 ms, and the kernel's VmHWM),
#    CPU time; then SIGTERM (the exit status is reported).
# Prints a markdown table. Speed and memory targets are checked here, not in the tests.
#
# Environment (defaults):
#   BENCH_RECORDS=200000  BENCH_VALUE_SIZE=1024  BENCH_PARTITIONS=6  BENCH_WORKERS=64
#   BENCH_SCENARIOS="key unordered batch"   (key|partition|unordered: single mode with that
#                                            ordering; batch: batch mode, max_records=500, ordering=key)
#   BENCH_BATCH_RECORDS=500  BENCH_RUN_TIMEOUT=60 (seconds per scenario; the run is then
#                            reported as partial, with the rate it reached)
#   BENCH_MAX_IN_FLIGHT_RECORDS, BENCH_MAX_IN_FLIGHT_BYTES (e.g. 20000, "64MiB"; default: the
#                            sidecar's defaults, pipeline.max_in_flight_records/bytes)
#   BENCH_KEEP_TOPIC=0       (1: keep the topic instead of deleting it at the end)
#   BENCH_APP_PORT, BENCH_ADMIN_PORT  (default: the first free port from 18080 / 19464)
# Logs, configs and the generated data: ${KAFKA_SIDECAR_CACHE:-$HOME/.cache/kafka-sidecar}/bench/
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ ${1:-} == --peers ]]; then exec bash scripts/bench-peers.sh "$@"; fi
[[ $# == 0 ]] || { echo "bench: unknown argument $1 (expected none, or --peers [--smoke])" >&2; exit 2; }

CACHE="${KAFKA_SIDECAR_CACHE:-$HOME/.cache/kafka-sidecar}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$CACHE/target}"
KAFKA_VERSION="${KAFKA_VERSION:-4.3.1}" # as in scripts/env.sh
LIBS="$CACHE/kafka-$KAFKA_VERSION/libs"
BENCH="$CACHE/bench"
BIN="$CARGO_TARGET_DIR/release/kafka-sidecar"
APP_BIN="$BENCH/bench_app"
BROKER=127.0.0.1:9092

N="${BENCH_RECORDS:-200000}"
SIZE="${BENCH_VALUE_SIZE:-1024}"
PARTITIONS="${BENCH_PARTITIONS:-6}"
WORKERS="${BENCH_WORKERS:-64}"
BATCH_RECORDS="${BENCH_BATCH_RECORDS:-500}"
read -r -a SCENARIOS <<<"${BENCH_SCENARIOS:-key unordered batch}"
RUN_TIMEOUT="${BENCH_RUN_TIMEOUT:-60}"
MAX_IN_FLIGHT_RECORDS="${BENCH_MAX_IN_FLIGHT_RECORDS:-}" # empty: the sidecar's default
MAX_IN_FLIGHT_BYTES="${BENCH_MAX_IN_FLIGHT_BYTES:-}"
KEEP_TOPIC="${BENCH_KEEP_TOPIC:-0}"
((SIZE >= 16)) || { echo "bench: BENCH_VALUE_SIZE must be at least 16" >&2; exit 2; }

log() { echo "bench: $*" >&2; }
die() { echo "bench: ERROR: $*" >&2; exit 1; }

RUN_ID="$(date +%Y%m%d-%H%M%S)-$$"
TOPIC="bench-$RUN_ID"
OUT="$BENCH/$RUN_ID"
APP_PID="" SIDECAR_PID="" TOPIC_CREATED=0

running() {
  local state
  [[ -n $1 ]] && state="$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null)" && [[ $state != Z ]]
}

STOP_RC=0
stop_process() { # name pid timeout-seconds; sets STOP_RC
  local name=$1 pid=$2 deadline=$((SECONDS + $3))
  STOP_RC=0
  kill -TERM "$pid" 2>/dev/null || true
  while running "$pid" && ((SECONDS < deadline)); do sleep 0.1; done
  if running "$pid"; then
    log "$name (pid $pid) still running after $3 s; SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
  fi
  wait "$pid" 2>/dev/null || STOP_RC=$?
}

kafka_cli() {
  timeout 60 java -Xmx256m -cp "$LIBS/*" -Dlog4j2.configurationFile="$CACHE/run/log4j2-tools.properties" "$@"
}

cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  if [[ -n $SIDECAR_PID ]] && running "$SIDECAR_PID"; then stop_process sidecar "$SIDECAR_PID" 30; fi
  if [[ -n $APP_PID ]] && running "$APP_PID"; then stop_process bench_app "$APP_PID" 5; fi
  if ((TOPIC_CREATED)) && [[ $KEEP_TOPIC != 1 ]]; then
    log "deleting topic $TOPIC"
    kafka_cli org.apache.kafka.tools.TopicCommand --bootstrap-server "$BROKER" --delete --topic "$TOPIC" \
      >/dev/null 2>&1 || log "could not delete topic $TOPIC"
  fi
  ((rc == 0)) || echo "bench: FAILED (exit $rc); logs in $OUT/" >&2
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

now() { date +%s.%N; }
# elapsed START END -> seconds with 1 decimal
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f", b - a }'; }
rate() { awk -v n="$1" -v a="$2" -v b="$3" 'BEGIN { printf "%.0f", n / (b - a) }'; }
mib() { awk -v k="$1" 'BEGIN { printf "%.1f", k / 1024 }'; }

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
# free_port BASE: the first port from BASE on that nobody listens on.
free_port() {
  local p
  for ((p = $1; p < $1 + 200; p++)); do port_open "$p" || { echo "$p"; return 0; }; done
  die "no free port in $1..$(($1 + 199))"
}

# Sum of the end offsets of $TOPIC.
end_offset_sum() {
  local args=() p
  for ((p = 0; p < PARTITIONS; p++)); do args+=(-t "$TOPIC:$p:-1"); done
  kcat -Q -b "$BROKER" -m 10 "${args[@]}" | awk '$3 == "offset" { s += $4 } END { print s + 0 }'
}

# Sum of the offsets the sidecar had confirmed committed ("-1" if /status does not answer).
committed_sum() {
  local body
  body="$(curl -fsS --max-time 2 "http://$ADMIN_ADDR/status" 2>/dev/null)" || { echo -1; return; }
  grep -o '"committed":[0-9]*' <<<"$body" | awk -F: '{ s += $2 } END { print s + 0 }'
}

app_count() { curl -fsS --max-time 2 "http://$APP_ADDR/count" 2>/dev/null || echo "-1 -1"; }

start_app() {
  "$APP_BIN" -listen "$APP_ADDR" >>"$OUT/bench_app.log" 2>&1 &
  APP_PID=$!
  local i
  for ((i = 0; i < 50; i++)); do
    [[ $(app_count) == "0 0" ]] && return 0
    sleep 0.1
  done
  die "bench_app did not start on $APP_ADDR (log: $OUT/bench_app.log)"
}

# write_config NAME ORDERING MODE -> path of a sidecar config for that scenario.
write_config() {
  local name=$1 ordering=$2 mode=$3 file="$OUT/$1.toml" extra=""
  [[ -n $MAX_IN_FLIGHT_RECORDS ]] && extra+="max_in_flight_records = $MAX_IN_FLIGHT_RECORDS"$'\n'
  [[ -n $MAX_IN_FLIGHT_BYTES ]] && extra+="max_in_flight_bytes = \"$MAX_IN_FLIGHT_BYTES\""$'\n'
  cat >"$file" <<EOF
# bench scenario $name: defaults except the lines below
[kafka]
brokers = "$BROKER"
group_id = "bench-$RUN_ID-$name"
topics = ["$TOPIC"]
client_id = "kafka-sidecar-bench"

[app]
url = "http://$APP_ADDR/records"
mode = "$mode"

[pipeline]
ordering = "$ordering"
workers = $WORKERS
$extra

[batch]
max_records = $BATCH_RECORDS

[dlq]
topic = ""

[admin]
listen = "$ADMIN_ADDR"

[log]
level = "info"
EOF
  echo "$file"
}

ROWS=()
FAILURES=()

# run_scenario NAME LABEL ORDERING MODE
run_scenario() {
  local name=$1 label=$2 ordering=$3 mode=$4 config slog
  config="$(write_config "$name" "$ordering" "$mode")"
  slog="$OUT/sidecar-$name.log"
  start_app
  log "scenario $name: $label (log: $slog)"
  local t0 t_ready="" t_app="" t_commit="" max_rss=0 rss hwm=0 count=0 reqs=0 committed status=ok
  t0="$(now)"
  "$BIN" run --config "$config" >"$slog" 2>&1 &
  SIDECAR_PID=$!
  local deadline=$((SECONDS + RUN_TIMEOUT))
  while :; do
    if ! running "$SIDECAR_PID"; then status="sidecar died"; break; fi
    rss="$(awk '/^VmRSS:/ { print $2 }' "/proc/$SIDECAR_PID/status" 2>/dev/null || true)"
    ((${rss:-0} > max_rss)) && max_rss=$rss
    if [[ -z $t_ready ]] && curl -fs --max-time 1 -o /dev/null "http://$ADMIN_ADDR/readyz"; then t_ready="$(now)"; fi
    if [[ -z $t_app ]]; then
      read -r count reqs <<<"$(app_count)"
      ((count >= N)) && t_app="$(now)"
    fi
    if [[ -n $t_app ]]; then
      committed="$(committed_sum)"
      if ((committed >= N)); then t_commit="$(now)"; break; fi
    fi
    if ((SECONDS >= deadline)); then status="timeout after ${RUN_TIMEOUT}s"; break; fi
    sleep 0.2
  done
  local cpu="-" rc_text
  if running "$SIDECAR_PID"; then
    hwm="$(awk '/^VmHWM:/ { print $2 }' "/proc/$SIDECAR_PID/status" 2>/dev/null || true)"
    hwm="${hwm:-0}"
    # utime + stime (fields 14, 15), in clock ticks
    cpu="$(awk -v hz="$(getconf CLK_TCK)" '{ printf "%.1f", ($14 + $15) / hz }' "/proc/$SIDECAR_PID/stat")"
  fi
  local t_stop sidecar_rc
  t_stop="$(now)"
  stop_process sidecar "$SIDECAR_PID" 40
  sidecar_rc=$STOP_RC SIDECAR_PID=""
  rc_text="exit $sidecar_rc in $(elapsed "$t_stop" "$(now)") s"
  read -r count reqs <<<"$(app_count)"
  stop_process bench_app "$APP_PID" 5
  APP_PID=""
  ((sidecar_rc == 0)) || FAILURES+=("$name: sidecar $rc_text")
  [[ $status == ok ]] || FAILURES+=("$name: $status (app saw $count of $N)")
  ((count <= N)) || FAILURES+=("$name: the app saw $count records for $N produced (redeliveries)")

  local to_app="-" rps="-" to_commit="-" ready="-"
  [[ -n $t_ready ]] && ready="$(elapsed "$t0" "$t_ready")"
  if [[ -n $t_app ]]; then
    to_app="$(elapsed "$t0" "$t_app")" rps="$(rate "$N" "$t0" "$t_app")"
  else # incomplete: the rate over the time it ran
    to_app="> $(elapsed "$t0" "$t_stop") ($status)" rps="$(rate "$count" "$t0" "$t_stop") (partial)"
  fi
  [[ -n $t_commit ]] && to_commit="$(elapsed "$t0" "$t_commit")"
  ROWS+=("| $label | $count | $reqs | $ready | $to_app | **$rps** | $to_commit | $(mib "$max_rss") | $(mib "$hwm") | $cpu | $rc_text |")
  log "  $label: $count records; to app: $to_app s; $rps rec/s; committed: $to_commit s; peak RSS $(mib "$max_rss") MiB; $rc_text"
}

# --- setup -------------------------------------------------------------------------------
BENCH_START=$SECONDS
mkdir -p "$OUT"
log "run $RUN_ID: $N records x $SIZE B, $PARTITIONS partitions, workers=$WORKERS; logs in $OUT/"
bash scripts/env.sh up >&2
for cmd in kcat curl java go cargo; do command -v "$cmd" >/dev/null || die "$cmd is not installed"; done
APP_ADDR="127.0.0.1:${BENCH_APP_PORT:-$(free_port 18080)}"
ADMIN_ADDR="127.0.0.1:${BENCH_ADMIN_PORT:-$(free_port 19464)}"
log "bench_app on $APP_ADDR, sidecar admin on $ADMIN_ADDR"

log "building the sidecar (cargo build --release --locked; log: $OUT/build.log)"
cargo build --release --locked >"$OUT/build.log" 2>&1 || { tail -n 30 "$OUT/build.log" >&2; die "cargo build failed"; }
log "building examples/bench_app.go"
go build -o "$APP_BIN" examples/bench_app.go

DATA="$BENCH/data-$N-$SIZE.txt"
if [[ ! -s $DATA ]]; then
  log "generating $DATA"
  awk -v n="$N" -v size="$SIZE" 'BEGIN {
    srand(42); pad = ""
    for (i = 0; i < size - 12; i++) pad = pad sprintf("%c", 97 + int(rand() * 26))
    for (i = 0; i < n; i++) printf "k%d|%012d%s\n", i % 10000, i, pad
  }' >"$DATA.tmp"
  mv "$DATA.tmp" "$DATA"
fi

log "creating topic $TOPIC ($PARTITIONS partitions)"
kafka_cli org.apache.kafka.tools.TopicCommand --bootstrap-server "$BROKER" --create --topic "$TOPIC" \
  --partitions "$PARTITIONS" --replication-factor 1 >/dev/null
TOPIC_CREATED=1

log "producing $N records with kcat"
t0="$(now)"
kcat -P -b "$BROKER" -t "$TOPIC" -K '|' -X linger.ms=50 -X batch.num.messages=10000 \
  -X queue.buffering.max.kbytes=262144 <"$DATA" 2>"$OUT/produce.log" ||
  { cat "$OUT/produce.log" >&2; die "kcat produce failed"; }
t1="$(now)"
produced="$(end_offset_sum)"
((produced == N)) || die "the topic holds $produced records, expected $N"
PRODUCE_LINE="produced $N records ($((N * SIZE / 1048576)) MiB of values) in $(elapsed "$t0" "$t1") s ($(rate "$N" "$t0" "$t1") rec/s)"
log "$PRODUCE_LINE"

# --- baseline: librdkafka read rate ------------------------------------------------------
log "baseline: kcat -C from the beginning to the end of $TOPIC"
t0="$(now)"
read_count="$(kcat -C -b "$BROKER" -t "$TOPIC" -o beginning -e -q -f '%o\n' 2>"$OUT/baseline.log" | wc -l)"
t1="$(now)"
((read_count == N)) || FAILURES+=("baseline: kcat read $read_count of $N records")
ROWS+=("| kcat baseline (librdkafka read, no HTTP) | $read_count | - | - | $(elapsed "$t0" "$t1") | **$(rate "$read_count" "$t0" "$t1")** | - | - | - | - | - |")
log "  baseline: $read_count records in $(elapsed "$t0" "$t1") s"

# --- sidecar scenarios -------------------------------------------------------------------
for s in "${SCENARIOS[@]}"; do
  case "$s" in
    key | partition | unordered)
      run_scenario "$s" "sidecar single, ordering=$s, workers=$WORKERS" "$s" single ;;
    batch)
      run_scenario batch "sidecar batch (max_records=$BATCH_RECORDS), ordering=key, workers=$WORKERS" key batch ;;
    *) die "unknown scenario $s (expected key, partition, unordered or batch)" ;;
  esac
done

# --- report ------------------------------------------------------------------------------
CPU_MODEL="$(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)"
MEM_TOTAL="$(awk '/^MemTotal:/ { printf "%.1f GiB", $2 / 1048576; exit }' /proc/meminfo)"
REV="$(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet HEAD -- src Cargo.toml Cargo.lock 2>/dev/null || echo "+dirty")"
cat <<EOF

## kafka-sidecar benchmark ($RUN_ID)

Machine: $(nproc) CPU(s), ${CPU_MODEL:-unknown CPU}, $MEM_TOTAL RAM, $(uname -sr); Kafka $KAFKA_VERSION single node
on the same machine; sidecar $REV (release). Topic: $N records x $SIZE B values, $PARTITIONS
partitions, 10,000 distinct keys; $PRODUCE_LINE.
App: examples/bench_app.go (answers 200 at once). Sidecar: config defaults except the scenario's
settings (max_in_flight_records=${MAX_IN_FLIGHT_RECORDS:-1000 (default)}, max_in_flight_bytes=${MAX_IN_FLIGHT_BYTES:-32MiB (default)},
commit_interval=5s, no DLQ). Times are wall clock from the
sidecar's start; "to app" = the app has seen all records, "committed" = the committed offsets
(/status) reached the end; records/s = records / "to app".

| run | records seen | requests | ready (s) | to app (s) | records/s | committed (s) | peak RSS sampled (MiB) | VmHWM (MiB) | CPU (s) | SIGTERM |
|---|---|---|---|---|---|---|---|---|---|---|
EOF
printf '%s\n' "${ROWS[@]}"
echo
log "total bench time $((SECONDS - BENCH_START)) s; logs in $OUT/"
if ((${#FAILURES[@]})); then
  printf 'bench: problem: %s\n' "${FAILURES[@]}" >&2
  exit 1
fi
