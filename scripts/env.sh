#!/usr/bin/env bash
# Local test environment for the Kafka consumer sidecar (Debian 12, no Docker, no systemd).
#
#   scripts/env.sh [up|down|status]      (default: up)
#
# up:     installs missing apt packages (redis-server, kcat, openssl, build deps) in one call,
#         fetches Apache Kafka jars from Maven Central with mvn (cached outside the work
#         tree), formats KRaft storage once, and starts a single-node broker+controller on
#         127.0.0.1:9092 (controller 127.0.0.1:9093) and Redis on 127.0.0.1:6379.
#         The broker also has a TLS + SASL/SCRAM-SHA-512 listener on 127.0.0.1:9094 (a test
#         CA and broker certificate made with openssl; the SCRAM user "sidecar", password
#         "sidecar-secret", made with Kafka's own tools); inter-broker traffic stays PLAINTEXT.
#         Idempotent: returns in ~1 s when both are already up and healthy. A broker started
#         here whose server.properties (or certificate) is out of date is restarted.
# down:   stops what this script started (SIGTERM, SIGKILL after 20 s). Data is kept.
# status: prints the state of each; exits 0 only if both are up.
#
# Cache/state: ${KAFKA_SIDECAR_CACHE:-$HOME/.cache/kafka-sidecar}
#   kafka-<version>/libs   jars     run/   pid files, logs, kafka-data, server.properties
#   run/tls/ca.pem         the CA that signed the broker's certificate (clients' ssl.ca.location)
# (Debian 12's kcat, librdkafka 2.0.2, cannot do SCRAM with Kafka 4: librdkafka >= 2.6.1 can,
# as the sidecar's bundled one does; Kafka's Java tools can too.)
# Ports (env, defaults above): KAFKA_PORT, CONTROLLER_PORT, KAFKA_SASL_PORT, REDIS_PORT, so a
# second, private environment can run beside the shared one, e.g.
#   KAFKA_SIDECAR_CACHE=/tmp/env2 KAFKA_PORT=19092 CONTROLLER_PORT=19093 KAFKA_SASL_PORT=19094 \
#     REDIS_PORT=16379 bash scripts/env.sh up
# (the jars are fetched per cache dir; symlinking kafka-<version> from another cache avoids that).
# Topic admin from the same jars (kcat cannot create topics), e.g.:
#   java -cp "$CACHE/kafka-<version>/libs/*" org.apache.kafka.tools.TopicCommand \
#        --bootstrap-server 127.0.0.1:9092 --create --topic t --partitions 3
set -euo pipefail

KAFKA_VERSION="${KAFKA_VERSION:-4.3.1}" # newest 4.x with kafka-tools on Central (4.4.0 lacks it)
LOG4J_VERSION=2.24.3
CACHE="${KAFKA_SIDECAR_CACHE:-$HOME/.cache/kafka-sidecar}"
LIBS="$CACHE/kafka-$KAFKA_VERSION/libs"
RUN="$CACHE/run"
DATA="$RUN/kafka-data"
HOST=127.0.0.1
KAFKA_PORT="${KAFKA_PORT:-9092}" CONTROLLER_PORT="${CONTROLLER_PORT:-9093}"
KAFKA_SASL_PORT="${KAFKA_SASL_PORT:-9094}" REDIS_PORT="${REDIS_PORT:-6379}"
TLS="$RUN/tls"
# Test-only credentials (the README's TLS + SCRAM example and tests/security.rs use them).
SCRAM_USER=sidecar SCRAM_PASSWORD=sidecar-secret
# Protects only the broker's own PKCS#12 keystore file, which never leaves $TLS.
KEYSTORE_PASSWORD=sidecar-keystore
JAVA="${JAVA_HOME:+$JAVA_HOME/bin/}java"

log() { echo "env: $*"; }
die() { echo "env: ERROR: $*" >&2; exit 1; }
SUDO=""; if [[ $EUID -ne 0 ]] && command -v sudo >/dev/null; then SUDO=sudo; fi

port_open() { (exec 3<>"/dev/tcp/$HOST/$1") 2>/dev/null; }
pid_alive() { [[ -s $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }
kafka_cli() { timeout 30 "$JAVA" -Xmx256m -cp "$LIBS/*" -Dlog4j2.configurationFile="$RUN/log4j2-tools.properties" "$@"; }

# Healthy = answers a metadata request (kcat if present, else a plain TCP connect).
kafka_healthy() {
  port_open "$KAFKA_PORT" || return 1
  if command -v kcat >/dev/null; then kcat -b "$HOST:$KAFKA_PORT" -L -m 3 >/dev/null 2>&1; fi
}
redis_healthy() { [[ "$(redis-cli -h "$HOST" -p "$REDIS_PORT" ping 2>/dev/null)" == PONG ]]; }

install_packages() {
  local want=() p
  command -v redis-server >/dev/null || want+=(redis-server)
  command -v kcat >/dev/null || want+=(kcat)
  command -v wrk >/dev/null || want+=(wrk) # the sink's own rate in bench.sh --peers
  # promtool (metrics and alert-rule checks) and the server tests/prometheus.rs starts
  { command -v promtool && command -v prometheus; } >/dev/null || want+=(prometheus)
  command -v "$JAVA" >/dev/null || want+=(openjdk-17-jdk-headless)
  command -v mvn >/dev/null || want+=(maven)
  command -v openssl >/dev/null || want+=(openssl) # the test CA and broker certificate
  for p in gcc make perl pkg-config libssl-dev zlib1g-dev; do
    dpkg -s "$p" >/dev/null 2>&1 || want+=("$p")
  done
  ((${#want[@]})) || return 0
  log "apt: installing ${want[*]}"
  mkdir -p "$RUN"
  { $SUDO apt-get update -qq &&
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${want[@]}"
  } >"$RUN/apt.log" 2>&1 || { tail -n 20 "$RUN/apt.log" >&2; die "apt-get failed (log: $RUN/apt.log)"; }
}

fetch_kafka() {
  [[ -f $LIBS/.complete ]] && return 0
  local dir="$CACHE/kafka-$KAFKA_VERSION" dep deps=""
  log "kafka: fetching $KAFKA_VERSION jars from Maven Central into $LIBS"
  mkdir -p "$dir"
  for dep in org.apache.kafka:kafka_2.13:$KAFKA_VERSION org.apache.kafka:kafka-tools:$KAFKA_VERSION \
             org.apache.logging.log4j:log4j-core:$LOG4J_VERSION org.apache.logging.log4j:log4j-slf4j-impl:$LOG4J_VERSION; do
    IFS=: read -r g a v <<<"$dep"
    deps+="<dependency><groupId>$g</groupId><artifactId>$a</artifactId><version>$v</version></dependency>"
  done
  cat >"$dir/pom.xml" <<EOF
<project xmlns="http://maven.apache.org/POM/4.0.0"><modelVersion>4.0.0</modelVersion>
<groupId>local</groupId><artifactId>kafka-sidecar-env</artifactId><version>1</version><packaging>pom</packaging>
<dependencies>$deps</dependencies></project>
EOF
  rm -rf "$LIBS.tmp"
  mvn -B -Dstyle.color=never -f "$dir/pom.xml" dependency:copy-dependencies -DincludeScope=runtime \
      -DoutputDirectory="$LIBS.tmp" >"$dir/mvn.log" 2>&1 ||
    { grep ERROR "$dir/mvn.log" | head -n 20 >&2; die "mvn could not fetch Kafka $KAFKA_VERSION (log: $dir/mvn.log)"; }
  rm -rf "$LIBS" && mv "$LIBS.tmp" "$LIBS" && touch "$LIBS/.complete"
}

# The test CA and the broker's certificate (SAN 127.0.0.1 and localhost, for librdkafka's
# hostname check), made once; the broker reads them as a PKCS#12 keystore.
make_tls() {
  [[ -s $TLS/ca.pem && -s $TLS/broker.p12 ]] && return 0
  local d="$TLS.tmp"
  log "tls: making a test CA and broker certificate in $TLS"
  rm -rf "$d" && mkdir -p "$d"
  { openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=kafka-sidecar test CA" \
      -keyout "$d/ca.key" -out "$d/ca.pem" &&
    openssl req -newkey rsa:2048 -nodes -subj "/CN=localhost" -keyout "$d/broker.key" -out "$d/broker.csr" &&
    printf '%s\n' "subjectAltName=IP:$HOST,DNS:localhost" "extendedKeyUsage=serverAuth" >"$d/broker.ext" &&
    openssl x509 -req -sha256 -days 3650 -in "$d/broker.csr" -CA "$d/ca.pem" -CAkey "$d/ca.key" \
      -CAcreateserial -extfile "$d/broker.ext" -out "$d/broker.pem" &&
    openssl pkcs12 -export -name broker -in "$d/broker.pem" -inkey "$d/broker.key" -certfile "$d/ca.pem" \
      -passout "pass:$KEYSTORE_PASSWORD" -out "$d/broker.p12"
  } >"$d/openssl.log" 2>&1 || { cat "$d/openssl.log" >&2; die "tls: openssl failed (log: $d/openssl.log)"; }
  rm -rf "$TLS" && mv "$d" "$TLS"
}

# The broker's configuration, printed. The keystore's hash is part of it, so that a new
# certificate counts as a changed configuration (and restarts the broker) too.
server_properties() {
  cat <<EOF
# Written by scripts/env.sh; rewritten (and the broker restarted) whenever it changes.
# keystore sha256: $(sha256sum "$TLS/broker.p12" | cut -d' ' -f1)
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@$HOST:$CONTROLLER_PORT
listeners=PLAINTEXT://$HOST:$KAFKA_PORT,CONTROLLER://$HOST:$CONTROLLER_PORT,SASL_SSL://$HOST:$KAFKA_SASL_PORT
advertised.listeners=PLAINTEXT://$HOST:$KAFKA_PORT,SASL_SSL://$HOST:$KAFKA_SASL_PORT
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT,SASL_SSL:SASL_SSL
inter.broker.listener.name=PLAINTEXT
controller.listener.names=CONTROLLER
sasl.enabled.mechanisms=SCRAM-SHA-512
listener.name.sasl_ssl.sasl.enabled.mechanisms=SCRAM-SHA-512
listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required;
listener.name.sasl_ssl.ssl.keystore.type=PKCS12
listener.name.sasl_ssl.ssl.keystore.location=$TLS/broker.p12
listener.name.sasl_ssl.ssl.keystore.password=$KEYSTORE_PASSWORD
listener.name.sasl_ssl.ssl.key.password=$KEYSTORE_PASSWORD
log.dirs=$DATA
num.partitions=3
auto.create.topics.enable=false
offsets.topic.replication.factor=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
EOF
}

write_log_configs() {
  mkdir -p "$RUN"
  local level
  for level in INFO:log4j2.properties WARN:log4j2-tools.properties; do
    printf '%s\n' 'appender.out.type=Console' 'appender.out.name=OUT' 'appender.out.layout.type=PatternLayout' \
      'appender.out.layout.pattern=[%d] %p %m (%c)%n' "rootLogger.level=${level%%:*}" \
      'rootLogger.appenderRef.out.ref=OUT' 'logger.sc.name=state.change.logger' 'logger.sc.level=WARN' \
      >"$RUN/${level#*:}"
  done
}

cluster_id() { sed -n 's/^cluster\.id=//p' "$DATA/meta.properties" 2>/dev/null; }

# What the SCRAM marker holds once the user exists in this data dir's cluster.
scram_marker() {
  echo "$(cluster_id) $SCRAM_USER $(printf '%s' "$SCRAM_PASSWORD" | sha256sum | cut -c1-16)"
}

format_storage() {
  [[ -f $DATA/meta.properties ]] && return 0
  mkdir -p "$DATA"
  local id; id="$(kafka_cli kafka.tools.StorageTool random-uuid)"
  log "kafka: formatting KRaft storage in $DATA (cluster id $id, SCRAM user $SCRAM_USER)"
  kafka_cli kafka.tools.StorageTool format -t "$id" -c "$RUN/server.properties" \
    --add-scram "SCRAM-SHA-512=[name=$SCRAM_USER,password=$SCRAM_PASSWORD]" >/dev/null
  scram_marker >"$RUN/scram-user"
}

# The SCRAM user in a data dir formatted before it existed (or by an older script): added
# through the PLAINTEXT listener, once (the marker remembers the cluster it was added to).
ensure_scram_user() {
  local want; want="$(scram_marker)"
  [[ -f $RUN/scram-user && "$(cat "$RUN/scram-user")" == "$want" ]] && return 0
  log "kafka: adding SCRAM-SHA-512 user $SCRAM_USER"
  kafka_cli kafka.admin.ConfigCommand --bootstrap-server "$HOST:$KAFKA_PORT" --alter --entity-type users \
    --entity-name "$SCRAM_USER" --add-config "SCRAM-SHA-512=[password=$SCRAM_PASSWORD]" >/dev/null ||
    die "kafka: could not add the SCRAM user $SCRAM_USER"
  echo "$want" >"$RUN/scram-user"
}

kafka_up() {
  make_tls
  local want; want="$(server_properties)"
  if kafka_healthy; then
    if ! pid_alive "$RUN/kafka.pid"; then
      port_open "$KAFKA_SASL_PORT" || log "kafka: WARNING: no SASL_SSL listener on $HOST:$KAFKA_SASL_PORT; tests/security.rs will fail"
      log "kafka: port $KAFKA_PORT already served by a healthy broker (not started here); using it"
      return 0
    fi
    if [[ "$want" == "$(cat "$RUN/server.properties" 2>/dev/null)" ]] && port_open "$KAFKA_SASL_PORT"; then
      ensure_scram_user
      log "kafka: already up (pid $(cat "$RUN/kafka.pid"))"
      return 0
    fi
    log "kafka: running with an out-of-date server.properties (or no SASL_SSL listener); restarting it"
    stop_pid kafka "$RUN/kafka.pid"
  fi
  pid_alive "$RUN/kafka.pid" && die "kafka: pid $(cat "$RUN/kafka.pid") alive but unhealthy; run '$0 down' first"
  port_open "$KAFKA_PORT" && die "kafka: port $KAFKA_PORT is taken by something that is not a healthy broker"
  port_open "$KAFKA_SASL_PORT" && die "kafka: port $KAFKA_SASL_PORT (SASL_SSL listener) is taken"
  fetch_kafka
  mkdir -p "$RUN" "$DATA"
  write_log_configs
  printf '%s\n' "$want" >"$RUN/server.properties"
  format_storage
  rm -f "$RUN/kafka.pid"
  log "kafka: starting $KAFKA_VERSION (log: $RUN/kafka.log)"
  # setsid+exec: the recorded pid is the JVM itself, detached from this shell.
  # shellcheck disable=SC2016 # expanded by the inner bash
  nohup setsid bash -c 'echo $$ >"$1"; shift; exec "$@"' _ "$RUN/kafka.pid" \
    "$JAVA" -Xms256m -Xmx1g -XX:+UseG1GC -Djava.awt.headless=true \
    -Dlog4j2.configurationFile="$RUN/log4j2.properties" -cp "$LIBS/*" kafka.Kafka "$RUN/server.properties" \
    >"$RUN/kafka.log" 2>&1 </dev/null &
  local deadline=$((SECONDS + 90))
  until [[ -s $RUN/kafka.pid ]]; do ((SECONDS < deadline)) || die "kafka: no pid file"; sleep 0.1; done
  # Ready = the Admin API can list topics (real request through the broker) and the
  # SASL_SSL listener accepts connections.
  until port_open "$KAFKA_PORT" && port_open "$KAFKA_SASL_PORT" &&
        kafka_cli org.apache.kafka.tools.TopicCommand --bootstrap-server "$HOST:$KAFKA_PORT" --list >/dev/null 2>&1; do
    if ((SECONDS >= deadline)) || ! pid_alive "$RUN/kafka.pid"; then
      tail -n 40 "$RUN/kafka.log" >&2
      die "kafka: not ready after $((SECONDS - deadline + 90)) s (log: $RUN/kafka.log)"
    fi
    sleep 1
  done
  ensure_scram_user
  log "kafka: ready on $HOST:$KAFKA_PORT, SASL_SSL on $HOST:$KAFKA_SASL_PORT (pid $(cat "$RUN/kafka.pid"))"
}

redis_up() {
  if redis_healthy; then
    if pid_alive "$RUN/redis.pid"; then log "redis: already up (pid $(cat "$RUN/redis.pid"))"
    else log "redis: port $REDIS_PORT already served (not started here); using it"; fi
    return 0
  fi
  mkdir -p "$RUN"
  log "redis: starting (log: $RUN/redis.log)"
  redis-server --daemonize yes --bind "$HOST" --port "$REDIS_PORT" --save '' --appendonly no \
    --dir "$RUN" --pidfile "$RUN/redis.pid" --logfile "$RUN/redis.log"
  local i
  for ((i = 0; i < 100; i++)); do redis_healthy && { log "redis: ready on $HOST:$REDIS_PORT"; return 0; }; sleep 0.1; done
  tail -n 20 "$RUN/redis.log" >&2; die "redis: no PONG after 10 s"
}

stop_pid() { # name pidfile
  if ! pid_alive "$2"; then log "$1: not running (no live pid in $2)"; rm -f "$2"; return 0; fi
  local pid i; pid="$(cat "$2")"
  log "$1: stopping pid $pid"
  kill "$pid"
  for ((i = 0; i < 200; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  if kill -0 "$pid" 2>/dev/null; then log "$1: still alive after 20 s, SIGKILL"; kill -9 "$pid"; sleep 0.5; fi
  rm -f "$2"
}

status() {
  local rc=0
  if ! kafka_healthy; then log "kafka: down"; rc=1
  elif pid_alive "$RUN/kafka.pid"; then log "kafka: up on $HOST:$KAFKA_PORT (pid $(cat "$RUN/kafka.pid"))"
  else log "kafka: up on $HOST:$KAFKA_PORT (not started by this script)"; fi
  if port_open "$KAFKA_SASL_PORT"; then log "kafka: SASL_SSL listener up on $HOST:$KAFKA_SASL_PORT (CA: $TLS/ca.pem)"
  else log "kafka: SASL_SSL listener down on $HOST:$KAFKA_SASL_PORT"; rc=1; fi
  if redis_healthy; then log "redis: up on $HOST:$REDIS_PORT"; else log "redis: down"; rc=1; fi
  return "$rc"
}

case "${1:-up}" in
  up) install_packages; redis_up; kafka_up ;;
  down) stop_pid kafka "$RUN/kafka.pid"; stop_pid redis "$RUN/redis.pid" ;;
  status) status ;;
  *) echo "usage: $0 [up|down|status]" >&2; exit 2 ;;
esac
