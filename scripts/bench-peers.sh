#!/usr/bin/env bash
# The side-by-side benchmark: kafka-sidecar beside the peers of ../shared/peers. Run it as
#   bash scripts/bench.sh --peers [--smoke]
# (scripts/bench.sh documents the knobs in its header; BENCHMARKS.md § Side by side the method).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO="$PWD"

SMOKE=0
for a in "$@"; do
  case "$a" in
    --peers) ;;
    --smoke) SMOKE=1 ;;
    *) echo "bench: unknown argument $a (expected --peers [--smoke])" >&2; exit 2 ;;
  esac
done

log() { echo "bench: $*" >&2; }
die() { echo "bench: ERROR: $*" >&2; exit 1; }

PEERS="${BENCH_PEERS_DIR:-$REPO/../shared/peers}"
[[ -f $PEERS/build-go.sh && -f $PEERS/run-goconsumer.sh && -f $PEERS/run-sink.sh ]] ||
  die "the peers are not at $PEERS: --peers needs ../shared/peers beside the repository (the Go consumer, the sink, Dapr and Camel with their build/run scripts), or BENCH_PEERS_DIR=/path/to/peers"
PEERS="$(cd "$PEERS" && pwd)"
PEERS_OUT="$HOME/.cache/kafka-sidecar-peers"

CACHE="${KAFKA_SIDECAR_CACHE:-$HOME/.cache/kafka-sidecar}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$CACHE/target}"
KAFKA_VERSION="${KAFKA_VERSION:-4.3.1}" # as in scripts/env.sh
LIBS="$CACHE/kafka-$KAFKA_VERSION/libs"
BENCH="$CACHE/bench"
BIN="$CARGO_TARGET_DIR/release/kafka-sidecar"
TOOLS="$BENCH/tools"
BROKER=127.0.0.1:9092
REDIS_URL="${BENCH_REDIS_URL:-redis://127.0.0.1:6379/0}"

if ((SMOKE)); then
  D_ROUNDS=1 D_RECORDS=10000 D_SYSTEMS="sc-key sc-batch-key go go-batch" D_SHAPES="1024x6"
  D_LATENCY=0 D_WRK=0 D_UNIX=0
else
  D_ROUNDS=3 D_RECORDS=200000
  D_SYSTEMS="raw sc-key sc-unordered sc-dedup sc-batch-key sc-batch-unordered sc-batch-dedup go go-batch dapr dapr-batch camel camel-batch"
  D_SHAPES="1024x6 256x6 16384x6 1024x24" D_LATENCY=1 D_WRK=1 D_UNIX=auto
fi
ROUNDS="${BENCH_ROUNDS:-$D_ROUNDS}"
N_BASE="${BENCH_RECORDS:-$D_RECORDS}"
read -r -a SYSTEMS <<<"${BENCH_SYSTEMS:-$D_SYSTEMS}"
read -r -a EXTRA_SYSTEMS <<<"${BENCH_EXTRA_SYSTEMS:-raw sc-key sc-batch-key go go-batch}"
read -r -a SHAPES <<<"${BENCH_SHAPES:-$D_SHAPES}"
LATENCY="${BENCH_LATENCY:-$D_LATENCY}"
LATENCY_SECONDS="${BENCH_LATENCY_SECONDS:-10}"
LATENCY_RATE="${BENCH_LATENCY_RATE:-}" # empty: half of the measured single-mode maximum
WRK="${BENCH_WRK:-$D_WRK}"
UNIX_ROW="${BENCH_UNIX:-$D_UNIX}"
WORKERS="${BENCH_WORKERS:-64}"
BATCH_RECORDS="${BENCH_BATCH_RECORDS:-500}"
RUN_TIMEOUT="${BENCH_RUN_TIMEOUT:-180}"
KEEP_TOPIC="${BENCH_KEEP_TOPIC:-0}"
[[ $ROUNDS =~ ^[1-9][0-9]*$ ]] || die "BENCH_ROUNDS must be a positive number, not '$ROUNDS'"
[[ $N_BASE =~ ^[1-9][0-9]*$ ]] || die "BENCH_RECORDS must be a positive number, not '$N_BASE'"

RUN_ID="$(date +%Y%m%d-%H%M%S)-$$"
OUT="$BENCH/peers-$RUN_ID"
RUNS="$OUT/runs.tsv"    # one line per run: shape system round status rec/s cpu/1M rss redeliv exit load
REPORT="$OUT/report.md" # the tables
mkdir -p "$OUT" "$TOOLS"
: >"$RUNS"

SINK_PID="" SYS_PID="" TOPICS=()
running() {
  local st
  [[ -n $1 ]] && st="$(awk '{ print $3 }' "/proc/$1/stat" 2>/dev/null)" && [[ -n $st && $st != Z ]]
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
  timeout 90 java -Xmx256m -cp "$LIBS/*" -Dlog4j2.configurationFile="$CACHE/run/log4j2-tools.properties" "$@"
}
cleanup() {
  local rc=$? t
  trap - EXIT INT TERM
  if [[ -n $SYS_PID ]] && running "$SYS_PID"; then stop_process system "$SYS_PID" 30; fi
  if [[ -n $SINK_PID ]] && running "$SINK_PID"; then stop_process sink "$SINK_PID" 5; fi
  if [[ $KEEP_TOPIC != 1 ]]; then
    for t in "${TOPICS[@]}"; do
      kafka_cli org.apache.kafka.tools.TopicCommand --bootstrap-server "$BROKER" --delete --topic "$t" \
        >/dev/null 2>&1 || log "could not delete topic $t"
    done
  fi
  ((rc == 0)) || echo "bench: FAILED (exit $rc); logs in $OUT/" >&2
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
free_port() {
  local p
  for ((p = $1; p < $1 + 400; p++)); do port_open "$p" || { echo "$p"; return 0; }; done
  die "no free port in $1..$(($1 + 399))"
}
load1() { awk '{ print $1 }' /proc/loadavg; }
field() { # field KEY LINE -> value of KEY=value in LINE
  local kv
  for kv in $2; do [[ ${kv%%=*} == "$1" ]] && { echo "${kv#*=}"; return; }; done
  echo "-"
}

# ---- systems --------------------------------------------------------------------------------------
label() {
  case "$1" in
    raw) if [[ ${2:-} == latency ]]; then echo "floor: librdkafka consumer, no group, no HTTP"; else echo "raw read limit: kcat -C, no group, no HTTP"; fi ;;
    sc-key) echo "kafka-sidecar single, ordering=key" ;;
    sc-unordered) echo "kafka-sidecar single, ordering=unordered" ;;
    sc-dedup) echo "kafka-sidecar single, key, dedup on (Redis)" ;;
    sc-batch-key) echo "kafka-sidecar batch $BATCH_RECORDS, ordering=key" ;;
    sc-batch-unordered) echo "kafka-sidecar batch $BATCH_RECORDS, ordering=unordered" ;;
    sc-batch-dedup) echo "kafka-sidecar batch $BATCH_RECORDS, key, dedup on (Redis)" ;;
    sc-tcp-app) echo "kafka-sidecar single, key → bench_app over TCP" ;;
    sc-unix) echo "kafka-sidecar single, key → bench_app over a Unix socket" ;;
    go) echo "Go consumer (sarama, $WORKERS workers) single" ;;
    go-batch) echo "Go consumer batch $BATCH_RECORDS" ;;
    dapr) echo "Dapr 1.14 single (one in flight per partition)" ;;
    dapr-batch) echo "Dapr 1.14 bulk subscribe $BATCH_RECORDS" ;;
    camel) echo "Camel 4.22 single (one consumer thread per partition)" ;;
    camel-batch) echo "Camel 4.22 batching $BATCH_RECORDS" ;;
    *) die "unknown system $1 (see the header of scripts/bench.sh)" ;;
  esac
}
is_batch() { [[ $1 == *batch* ]]; }
reference() { if is_batch "$1"; then echo go-batch; else echo go; fi; }
needs() { # the systems of the run -> needs dapr/camel?
  local s
  for s in "${SYSTEMS[@]}"; do [[ $s == "$1"* ]] && return 0; done
  return 1
}

# write_config NAME ORDERING MODE DEDUP APP_URL -> path of a sidecar config
write_config() {
  local name=$1 ordering=$2 mode=$3 dedup=$4 url=$5 file="$OUT/$1.toml" dd=""
  if [[ $dedup == on ]]; then
    dd="[dedup]
enabled = true
redis_url = \"$REDIS_URL\"
done_ttl = \"10m\"
prefix = \"kafka-sidecar-bench\""
  fi
  cat >"$file" <<EOF
# bench --peers run $name: defaults except the lines below
[kafka]
brokers = "$BROKER"
group_id = "$GROUP"
topics = ["$TOPIC"]
client_id = "kafka-sidecar-bench"

[app]
url = "$url"
mode = "$mode"

[pipeline]
ordering = "$ordering"
workers = $WORKERS

[batch]
max_records = $BATCH_RECORDS

[dlq]
topic = ""

[admin]
listen = "$ADMIN_ADDR"

[log]
level = "info"

$dd
EOF
  echo "$file"
}

# start_system SYSTEM NAME APP_URL: starts it in the background, sets SYS_PID.
start_system() {
  local sys=$1 name=$2 url=$3 cfg slog
  slog="$OUT/$name.log"
  case "$sys" in
    sc-key | sc-tcp-app | sc-unix) cfg="$(write_config "$name" key single off "$url")" ;;
    sc-unordered) cfg="$(write_config "$name" unordered single off "$url")" ;;
    sc-dedup) cfg="$(write_config "$name" key single on "$url")" ;;
    sc-batch-key) cfg="$(write_config "$name" key batch off "$url")" ;;
    sc-batch-unordered) cfg="$(write_config "$name" unordered batch off "$url")" ;;
    sc-batch-dedup) cfg="$(write_config "$name" key batch on "$url")" ;;
  esac
  case "$sys" in
    sc-*) "$BIN" run --config "$cfg" >"$slog" 2>&1 & ;;
    go | go-batch)
      BROKER="$BROKER" TOPIC="$TOPIC" GROUP="$GROUP" APP_URL="$url" WORKERS="$WORKERS" \
        BATCH="$(is_batch "$sys" && echo "$BATCH_RECORDS" || echo 1)" \
        bash "$PEERS/run-goconsumer.sh" >"$slog" 2>&1 & ;;
    dapr | dapr-batch)
      BROKER="$BROKER" TOPIC="$TOPIC" GROUP="$GROUP" APP_URL="$url" \
        BATCH="$(is_batch "$sys" && echo "$BATCH_RECORDS" || echo 1)" \
        DAPR_HTTP_PORT="$(free_port 23500)" DAPR_GRPC_PORT="$(free_port 25001)" \
        DAPR_INTERNAL_GRPC_PORT="$(free_port 25201)" DAPR_METRICS_PORT="$(free_port 29095)" \
        bash "$PEERS/run-dapr.sh" >"$slog" 2>&1 & ;;
    camel | camel-batch)
      BROKER="$BROKER" TOPIC="$TOPIC" GROUP="$GROUP" APP_URL="$url" \
        BATCH="$(is_batch "$sys" && echo "$BATCH_RECORDS" || echo 1)" \
        bash "$PEERS/run-camel.sh" >"$slog" 2>&1 & ;;
    *) die "start_system: unknown system $sys" ;;
  esac
  SYS_PID=$!
}

start_sink() { # starts the shared sink on SINK_ADDR
  SINK_LISTEN="$SINK_ADDR" bash "$PEERS/run-sink.sh" >>"$OUT/sink.log" 2>&1 &
  SINK_PID=$!
  wait_count "http://$SINK_ADDR/count" "" sink
}
wait_count() { # url unix-socket name: until GET answers
  local i args=()
  [[ -n $2 ]] && args=(--unix-socket "$2")
  for ((i = 0; i < 100; i++)); do
    curl -fs --max-time 1 "${args[@]}" -o /dev/null "$1" && return 0
    sleep 0.1
  done
  die "$3 did not answer $1 (logs in $OUT/)"
}

FAILURES=()
# record SHAPE SYSTEM ROUND STATUS RATE CPU_PER_M RSS_MIB REDELIVERIES EXIT LOAD
record() { printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$@" >>"$RUNS"; }

# run_raw SHAPE ROUND: kcat reads the topic from the beginning to the end.
run_raw() {
  local shape=$1 round=$2 t count user sys real load
  load="$(load1)"
  TIMEFORMAT='%U %S %R'
  t="$({ time kcat -C -b "$BROKER" -t "$TOPIC" -o beginning -e -q -f '%o\n' 2>>"$OUT/raw.log" | wc -l >"$OUT/raw.count"; } 2>&1)"
  read -r user sys real <<<"$t"
  count="$(cat "$OUT/raw.count")"
  local status=ok rate cpu
  ((count == N)) || { status="read $count of $N"; FAILURES+=("$shape raw r$round: kcat read $count of $N"); }
  rate="$(awk -v n="$count" -v r="$real" 'BEGIN { printf "%.0f", n / r }')"
  cpu="$(awk -v n="$count" -v u="$user" -v s="$sys" 'BEGIN { printf "%.2f", (u + s) / n * 1e6 }')"
  record "$shape" raw "$round" "$status" "$rate" "$cpu" - 0 0 "$load"
  log "  $shape r$round raw: $count records, $rate rec/s, $cpu CPU s/1M (load $load)"
}

# run_system SHAPE SYSTEM ROUND: fresh sink, fresh system, fresh group; measure; stop both.
run_system() {
  local shape=$1 sys=$2 round=$3 name url watch="" unix_sock="" load wargs=()
  if [[ $sys == raw ]]; then run_raw "$shape" "$round"; return; fi
  name="$shape-$sys-r$round"
  GROUP="benchp-$RUN_ID-$name"
  ADMIN_ADDR="127.0.0.1:$(free_port 19464)"
  load="$(load1)"
  case "$sys" in
    sc-unix)
      unix_sock="$OUT/app.sock"
      "$TOOLS/bench_app" -unix "$unix_sock" >>"$OUT/bench_app.log" 2>&1 &
      SINK_PID=$!
      wait_count "http://localhost/count" "$unix_sock" bench_app
      url="unix://$unix_sock:/records" wargs=(-unix "$unix_sock" -url http://localhost/count) ;;
    sc-tcp-app)
      "$TOOLS/bench_app" -listen "$SINK_ADDR" >>"$OUT/bench_app.log" 2>&1 &
      SINK_PID=$!
      wait_count "http://$SINK_ADDR/count" "" bench_app
      url="http://$SINK_ADDR/records" wargs=(-url "http://$SINK_ADDR/count") ;;
    *)
      start_sink
      url="http://$SINK_ADDR/records" wargs=(-url "http://$SINK_ADDR/count") ;;
  esac
  start_system "$sys" "$name" "$url"
  watch="$("$TOOLS/bench_watch" "${wargs[@]}" -n "$N" -pids "$SYS_PID" -timeout "${RUN_TIMEOUT}s" \
    -stall 60s -settle 1s 2>>"$OUT/watch.log")" || true
  stop_process "$sys" "$SYS_PID" 40
  local rc=$STOP_RC
  SYS_PID=""
  stop_process sink "$SINK_PID" 5
  SINK_PID=""
  [[ -n $unix_sock ]] && rm -f "$unix_sock"
  echo "$name $watch exit=$rc" >>"$OUT/watch.log"

  local status records distinct wrec rate cpuw cpu="-" rss redeliv=0
  status="$(field status "$watch")" records="$(field records "$watch")" distinct="$(field distinct "$watch")"
  wrec="$(field window_records "$watch")" rate="$(field rate "$watch")" cpuw="$(field cpu_window "$watch")"
  rss="$(awk -v k="$(field hwm_kib "$watch")" 'BEGIN { printf "%.0f", k / 1024 }')"
  [[ $cpuw != - && $wrec =~ ^[1-9] ]] && cpu="$(awk -v c="$cpuw" -v n="$wrec" 'BEGIN { printf "%.2f", c / n * 1e6 }')"
  if [[ $status != ok ]]; then
    FAILURES+=("$name: ${status:-the watcher printed nothing} (the sink saw ${records:-?} of $N; log $OUT/$name.log)")
  elif [[ $distinct =~ ^[0-9]+$ ]] && ((distinct < N)); then
    status="missing"
    FAILURES+=("$name: the sink saw $distinct distinct records of $N (log $OUT/$name.log)")
  fi
  [[ $distinct =~ ^[0-9]+$ && $records =~ ^[0-9]+$ ]] && redeliv=$((records - distinct))
  # Camel's JVM answers SIGTERM with 143 after a graceful stop (../shared/peers/README.md).
  if ((rc != 0)) && ! [[ $sys == camel* && $rc == 143 ]]; then
    FAILURES+=("$name: exit $rc on SIGTERM (log $OUT/$name.log)")
  fi
  record "$shape" "$sys" "$round" "$status" "$rate" "$cpu" "$rss" "$redeliv" "$rc" "$load"
  log "  $shape r$round $sys: $status, $rate rec/s, $cpu CPU s/1M, peak RSS $rss MiB, redeliveries $redeliv, exit $rc (load $load)"
}

# ---- latency ---------------------------------------------------------------------------------------
# run_latency SYSTEM ROUND RATE: fresh topic, the system delivering to latency_app; a 3 s warm-up at
# the rate, then LATENCY_SECONDS measured; p50/p99/p999 of (arrival at the app - the producer's stamp).
LAT_ROWS=()
run_latency() {
  local sys=$1 round=$2 lrate=$3 name port lat_addr lat status=ok want load
  name="lat-$sys-r$round"
  TOPIC="benchp-$RUN_ID-$name"
  create_topic "$TOPIC" 6
  GROUP="benchp-$RUN_ID-$name"
  ADMIN_ADDR="127.0.0.1:$(free_port 19464)"
  port="$(free_port 18090)"
  lat_addr="127.0.0.1:$port"
  load="$(load1)"
  if [[ $sys == raw ]]; then
    # The floor: a plain librdkafka consumer with the sidecar's fetch settings reads every
    # partition (no group) and prints each value as it arrives (examples/latency_floor.rs).
    local fifo="$OUT/$name.fifo"
    rm -f "$fifo" && mkfifo "$fifo"
    "$TOOLS/latency_app" -listen "$lat_addr" -stdin <"$fifo" >>"$OUT/latency_app.log" 2>&1 &
    SINK_PID=$!
    "$FLOOR_BIN" "$BROKER" "$TOPIC" 6 >"$fifo" 2>"$OUT/$name.log" &
    SYS_PID=$!
    wait_count "http://$lat_addr/count" "" latency_app
  else
    "$TOOLS/latency_app" -listen "$lat_addr" >>"$OUT/latency_app.log" 2>&1 &
    SINK_PID=$!
    wait_count "http://$lat_addr/count" "" latency_app
    start_system "$sys" "$name" "http://$lat_addr/records"
  fi
  produce_paced() { # seconds
    "$TOOLS/rate_producer" -rate "$lrate" -duration "${1}s" -size 1024 2>>"$OUT/latency-produce.log" |
      kcat -P -b "$BROKER" -t "$TOPIC" -K '|' -X linger.ms=5 2>>"$OUT/latency-produce.log"
  }
  wait_caught_up() { # until the app counted every record of the topic
    local end c deadline=$((SECONDS + 90))
    end="$(end_offset_sum "$TOPIC" 6)"
    while :; do
      read -r c _ <<<"$(curl -fs --max-time 2 "http://$lat_addr/count" || echo "0 0")"
      ((c >= end)) && return 0
      running "$SYS_PID" || return 1
      ((SECONDS < deadline)) || return 1
      sleep 0.2
    done
  }
  produce_paced 3
  wait_caught_up || status="warm-up: the app did not get every record"
  curl -fs -X POST "http://$lat_addr/reset-latency" >/dev/null || status="reset failed"
  if [[ $status == ok ]]; then
    produce_paced "$LATENCY_SECONDS"
    wait_caught_up || status="the app did not get every record"
  fi
  lat="$(curl -fs --max-time 5 "http://$lat_addr/latency" || echo "")"
  stop_process "$sys" "$SYS_PID" 40
  SYS_PID=""
  stop_process latency_app "$SINK_PID" 5
  SINK_PID=""
  want=$((LATENCY_SECONDS * ${lrate%.*}))
  [[ $status == ok ]] || FAILURES+=("$name: $status")
  echo "$name rate=$lrate $lat status=$status load=$load" >>"$OUT/latency.log"
  LAT_ROWS+=("$sys	$round	$(field p50_us "$lat")	$(field p99_us "$lat")	$(field p999_us "$lat")	$(field samples "$lat")	$want	$status	$load")
  log "  latency $sys r$round at $lrate rec/s: $lat ($status, load $load)"
}

# ---- setup -----------------------------------------------------------------------------------------
end_offset_sum() { # topic partitions
  local args=() p
  for ((p = 0; p < $2; p++)); do args+=(-t "$1:$p:-1"); done
  kcat -Q -b "$BROKER" -m 10 "${args[@]}" | awk '$3 == "offset" { s += $4 } END { print s + 0 }'
}
create_topic() { # name partitions
  kafka_cli org.apache.kafka.tools.TopicCommand --bootstrap-server "$BROKER" --create --topic "$1" \
    --partitions "$2" --replication-factor 1 >/dev/null
  TOPICS+=("$1")
}

BENCH_START=$SECONDS
log "run $RUN_ID (--peers$( ((SMOKE)) && echo " --smoke")): rounds=$ROUNDS, shapes: ${SHAPES[*]}; logs in $OUT/"
bash scripts/env.sh up >&2
for cmd in kcat curl java go cargo; do command -v "$cmd" >/dev/null || die "$cmd is not installed"; done
if ((WRK)) && ! command -v wrk >/dev/null; then die "wrk is not installed (Debian: apt-get install wrk), or BENCH_WRK=0"; fi
SINK_ADDR="127.0.0.1:$(free_port 18080)"

if [[ -n ${BENCH_SIDECAR_BIN:-} ]]; then
  BIN="$BENCH_SIDECAR_BIN"
  [[ -x $BIN ]] || die "BENCH_SIDECAR_BIN=$BIN is not an executable"
  log "using the sidecar binary $BIN (no cargo build)"
else
  log "building the sidecar (cargo build --release --locked; log: $OUT/build.log)"
  nice -n 10 cargo build --release --locked >"$OUT/build.log" 2>&1 || { tail -n 30 "$OUT/build.log" >&2; die "cargo build failed"; }
fi
# The latency floor (examples/latency_floor.rs): built against the same librdkafka as the sidecar.
FLOOR_BIN="$CARGO_TARGET_DIR/release/examples/latency_floor"
if ((LATENCY)); then
  log "building the latency floor (cargo build --release --locked --example latency_floor)"
  nice -n 10 cargo build --release --locked --example latency_floor >>"$OUT/build.log" 2>&1 || { tail -n 30 "$OUT/build.log" >&2; die "cargo build --example latency_floor failed"; }
fi
log "building the harness tools (examples/*.go) into $TOOLS"
for t in bench_app bench_watch latency_app rate_producer; do
  go build -o "$TOOLS/$t" "examples/$t.go" || die "go build examples/$t.go failed"
done
log "building the Go consumer and the sink ($PEERS/build-go.sh)"
bash "$PEERS/build-go.sh" >"$OUT/build-peers.log" 2>&1 || { cat "$OUT/build-peers.log" >&2; die "$PEERS/build-go.sh failed"; }
if needs camel && [[ ! -s $PEERS_OUT/camel-peer.jar ]]; then
  log "building Camel ($PEERS/build-camel.sh)"
  bash "$PEERS/build-camel.sh" >>"$OUT/build-peers.log" 2>&1 || die "$PEERS/build-camel.sh failed (log $OUT/build-peers.log)"
fi
if needs dapr && [[ ! -x ${DAPR_BIN:-$PEERS_OUT/daprd} ]]; then
  log "building Dapr ($PEERS/build-dapr.sh, about 4 minutes)"
  bash "$PEERS/build-dapr.sh" >>"$OUT/build-peers.log" 2>&1 || die "$PEERS/build-dapr.sh failed (log $OUT/build-peers.log)"
fi

UNIX_OK=0
if [[ $UNIX_ROW == auto || $UNIX_ROW == 1 ]]; then
  GROUP=probe TOPIC=probe ADMIN_ADDR=127.0.0.1:9
  probe="$(write_config unix-probe key single off "unix://$OUT/app.sock:/records")"
  if "$BIN" check-config --config "$probe" >"$OUT/unix-probe.log" 2>&1; then
    UNIX_OK=1
  else
    log "the sidecar does not accept app.url = \"unix://…\" (check-config: $(head -c 300 "$OUT/unix-probe.log" | tr '\n' ' ')); no Unix-socket row"
    [[ $UNIX_ROW == 1 ]] && die "BENCH_UNIX=1 but the sidecar does not accept a unix:// app.url"
  fi
fi

# produce_shape SIZE PARTITIONS N -> creates TOPIC and fills it (keys k0..k9999)
produce_shape() {
  local size=$1 parts=$2 n=$3 data="$BENCH/data-$3-$1.txt" t0 produced
  ((size >= 16)) || die "record size $size: at least 16"
  if [[ ! -s $data ]]; then
    awk -v n="$n" -v size="$size" 'BEGIN {
      srand(42); pad = ""
      for (i = 0; i < size - 12; i++) pad = pad sprintf("%c", 97 + int(rand() * 26))
      for (i = 0; i < n; i++) printf "k%d|%012d%s\n", i % 10000, i, pad
    }' >"$data.tmp"
    mv "$data.tmp" "$data"
  fi
  TOPIC="benchp-$RUN_ID-${size}x$parts"
  create_topic "$TOPIC" "$parts"
  t0=$SECONDS
  kcat -P -b "$BROKER" -t "$TOPIC" -K '|' -X linger.ms=50 -X batch.num.messages=10000 \
    -X queue.buffering.max.kbytes=262144 <"$data" 2>"$OUT/produce.log" ||
    { cat "$OUT/produce.log" >&2; die "kcat produce failed"; }
  produced="$(end_offset_sum "$TOPIC" "$parts")"
  ((produced == n)) || die "topic $TOPIC holds $produced records, expected $n"
  log "shape ${size}x$parts: $n records of $size B in $TOPIC ($((SECONDS - t0)) s)"
}

median() { sort -g | awk '{ a[NR] = $1 } END { if (NR == 0) print "-"; else if (NR % 2) print a[(NR + 1) / 2]; else printf "%.6g\n", (a[NR / 2] + a[NR / 2 + 1]) / 2 }'; }
# column SHAPE SYSTEM COL -> the values of that column over the ok runs
column() { awk -F'\t' -v s="$1" -v y="$2" -v c="$3" '$1 == s && $2 == y && $4 == "ok" && $c != "-" { print $c }' "$RUNS"; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (a == "-" || b == "-" || b + 0 == 0) print "-"; else printf "%.2f×", a / b }'; }
k() { awk -v x="$1" 'BEGIN { if (x == "-") print "-"; else if (x >= 1000) printf "%.1fk", x / 1000; else printf "%.0f", x }'; }

WRK_RATES=()
run_wrk() { # the sink's own single-mode ceiling: wrk POSTs SIZE-byte bodies, 64 connections, 5 s
  local size=$1 out
  printf 'wrk.method = "POST"\nwrk.body = string.rep("x", %d)\nwrk.headers["Content-Type"] = "application/octet-stream"\n' \
    "$size" >"$OUT/post.lua"
  start_sink
  out="$(wrk -t2 -c"$WORKERS" -d5s -s "$OUT/post.lua" "http://$SINK_ADDR/records" 2>&1)" || true
  stop_process sink "$SINK_PID" 5
  SINK_PID=""
  echo "$out" >>"$OUT/wrk.log"
  WRK_RATES+=("$(awk '/^Requests\/sec:/ { printf "%.0f", $2 }' <<<"$out")")
  log "  wrk against the sink: ${WRK_RATES[-1]} requests/s"
}

# ---- the runs: per shape, ROUNDS interleaved rounds over the systems ------------------------------
for shape in "${SHAPES[@]}"; do
  [[ $shape =~ ^([0-9]+)x([0-9]+)$ ]] || die "shape '$shape': expected SIZExPARTITIONS, e.g. 1024x6"
  size="${BASH_REMATCH[1]}" parts="${BASH_REMATCH[2]}"
  N=$N_BASE
  ((size > 4096)) && N=$((N_BASE / 5)) # 16 KiB x 200k would be 3 GiB
  if [[ $shape == "${SHAPES[0]}" ]]; then
    sys_list=("${SYSTEMS[@]}")
    ((UNIX_OK)) && sys_list+=(sc-tcp-app sc-unix)
  else
    sys_list=("${EXTRA_SYSTEMS[@]}")
  fi
  for s in "${sys_list[@]}"; do label "$s" >/dev/null; done
  produce_shape "$size" "$parts" "$N"
  for ((round = 1; round <= ROUNDS; round++)); do
    log "shape $shape, round $round of $ROUNDS ($(uptime | sed 's/.*load/load/'))"
    echo "$shape round $round: $(uptime)" >>"$OUT/uptime.log"
    [[ $shape == "${SHAPES[0]}" ]] && ((WRK)) && run_wrk "$size"
    for s in "${sys_list[@]}"; do run_system "$shape" "$s" "$round"; done
  done
done

if ((LATENCY)); then
  lrate="$LATENCY_RATE" lrate_note="BENCH_LATENCY_RATE"
  if [[ -z $lrate ]]; then
    lrate_note="half the lower single-mode maximum"
    a="$(column "${SHAPES[0]}" sc-key 5 | median)" b="$(column "${SHAPES[0]}" go 5 | median)"
    [[ $a != - && $b != - ]] || die "no single-mode maximum measured for the latency rate (set BENCH_LATENCY_RATE)"
    lrate="$(awk -v a="$a" -v b="$b" 'BEGIN { m = a < b ? a : b; printf "%.0f", m / 2 }')"
  fi
  log "latency: ${LATENCY_SECONDS} s at $lrate rec/s (1 KiB, 6 partitions) per run"
  for ((round = 1; round <= ROUNDS; round++)); do
    echo "latency round $round: $(uptime)" >>"$OUT/uptime.log"
    for s in raw sc-key go; do run_latency "$s" "$round" "$lrate"; done
  done
fi

# ---- report ----------------------------------------------------------------------------------------
{
  CPU_MODEL="$(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)"
  REV="$(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet HEAD -- src Cargo.toml Cargo.lock 2>/dev/null || echo "+dirty")"
  echo "## bench --peers $RUN_ID"
  echo
  echo "Machine: $(nproc) CPU(s), ${CPU_MODEL:-unknown CPU}, $(uname -sr); Kafka $KAFKA_VERSION, one node, same machine;"
  echo "kafka-sidecar $REV (release). $ROUNDS interleaved round(s), medians over the runs that delivered"
  echo "every record. App: ../shared/peers/sink (Unix-socket rows: examples/bench_app.go). records/s: from the"
  echo "first record at the app to the last (examples/bench_watch.go polls GET /count every 5 ms); CPU:"
  echo "utime+stime of the system's process in that window (/proc/PID/stat), per million records; peak"
  echo "RSS: VmHWM. Workers $WORKERS where a system has them, batches of $BATCH_RECORDS. Load average"
  echo "(1 min) at the runs' starts: $(cut -f10 "$RUNS" | sort -g | sed -n '1p;$p' | paste -sd- -)."
  if ((WRK)) && ((${#WRK_RATES[@]})); then
    echo "Single-mode ceiling: the sink alone under wrk (-t2 -c$WORKERS, $((${SHAPES[0]%x*})) B POSTs): $(k "$(printf '%s\n' "${WRK_RATES[@]}" | median)") requests/s (median of ${#WRK_RATES[@]})."
  fi
  for shape in "${SHAPES[@]}"; do
    echo
    echo "### ${shape%x*} B records × ${shape#*x} partitions"
    echo
    echo "| system | records/s | × Go | CPU s per 1M records | × Go | peak RSS (MiB) | redeliveries | runs ok |"
    echo "|---|---|---|---|---|---|---|---|"
    for s in $(awk -F'\t' -v s="$shape" '$1 == s && !seen[$2]++ { print $2 }' "$RUNS"); do
      ref="$(reference "$s")"
      r="$(column "$shape" "$s" 5 | median)" c="$(column "$shape" "$s" 6 | median)"
      rr="$(column "$shape" "$ref" 5 | median)" rc="$(column "$shape" "$ref" 6 | median)"
      rss="$(column "$shape" "$s" 7 | sort -g | sed -n '1p;$p' | uniq | awk '{ printf "%s%s", (NR > 1 ? "–" : ""), $1 }')"
      red="$(awk -F'\t' -v s="$shape" -v y="$s" '$1 == s && $2 == y { t += $8 } END { print t + 0 }' "$RUNS")"
      ok="$(awk -F'\t' -v s="$shape" -v y="$s" '$1 == s && $2 == y { n++; if ($4 == "ok") k++ } END { printf "%d/%d", k, n }' "$RUNS")"
      [[ $s == raw ]] && rss="-"
      echo "| $(label "$s") | **$(k "$r")** | $(ratio "$r" "$rr") | $c | $(ratio "$c" "$rc") | ${rss:--} | $red | $ok |"
    done
  done
  if ((${#LAT_ROWS[@]})); then
    echo
    echo "### End-to-end latency, 1 KiB × 6 partitions, at $lrate records/s ($lrate_note)"
    echo
    echo "Stamp: the Unix time in ns written into the value by examples/rate_producer.go as it hands the"
    echo "line to kcat (linger.ms=5, librdkafka's default); arrival: examples/latency_app.go. Medians over $ROUNDS round(s) of ${LATENCY_SECONDS} s after a 3 s warm-up."
    echo
    echo "The raw row is the floor (examples/latency_floor.rs into latency_app -stdin: producer, broker and"
    echo "a librdkafka consumer with the sidecar's fetch settings, no group, no HTTP); *added* is a system's"
    echo "median minus the raw median, per percentile."
    echo
    echo "| system | p50 (ms) | p99 (ms) | p99.9 (ms) | added p50 (ms) | added p99 (ms) | samples per run |"
    echo "|---|---|---|---|---|---|---|"
    lat_col() { printf '%s\n' "${LAT_ROWS[@]}" | awk -F'\t' -v s="$1" -v c="$2" '$1 == s && $8 == "ok" { print $c }' | median; }
    ms() { awk -v x="$1" 'BEGIN { if (x == "-") print "-"; else printf "%.2f", x / 1000 }'; }
    added() { awk -v x="$1" -v r="$2" 'BEGIN { if (x == "-" || r == "-") print "-"; else printf "%+.2f", (x - r) / 1000 }'; }
    for s in raw sc-key go; do
      p50="$(lat_col "$s" 3)" p99="$(lat_col "$s" 4)"
      a50="-" a99="-"
      [[ $s == raw ]] || { a50="$(added "$p50" "$(lat_col raw 3)")" a99="$(added "$p99" "$(lat_col raw 4)")"; }
      echo "| $(label "$s" latency) | $(ms "$p50") | $(ms "$p99") | $(ms "$(lat_col "$s" 5)") | $a50 | $a99 | $(lat_col "$s" 6) |"
    done
  fi
  echo
  echo "Every run: $RUNS (shape, system, round, status, records/s, CPU s/1M, RSS MiB, redeliveries, exit, load)."
} >"$REPORT"
echo
cat "$REPORT"
echo
log "total bench time $((SECONDS - BENCH_START)) s; report $REPORT; logs in $OUT/"
if ((${#FAILURES[@]})); then
  printf 'bench: problem: %s\n' "${FAILURES[@]}" >&2
  exit 1
fi
