#!/usr/bin/env bash
# Runs every test on a fresh machine: installs and starts Kafka + Redis (scripts/env.sh),
# checks formatting and lints, runs unit and integration tests against the real broker,
# validates the packaging (Dockerfile, Helm chart) offline, and runs the smoke of the
# side-by-side benchmark (`scripts/bench.sh --peers --smoke`: needs ../shared/peers beside the
# repository and Go >= 1.26; builds the Go consumer and the sink with its build-go.sh).
#
#   bash scripts/test.sh            # everything (what CI runs)
#   bash scripts/test.sh -- NAME    # only cargo tests matching NAME (environment still started)
#
# On a fresh machine most of the time goes into compiling, so:
# - the packaging tools (helm, which tests/packaging.rs needs too, and hadolint,
#   kubernetes-validate, checkov) are installed by `scripts/check-packaging.sh --tools`, and
#   Jaeger (tests/jaeger.rs) is built by `scripts/jaeger.sh build` (cached after the first run),
#   in the background, while the environment comes up and cargo builds;
# - the tests are built and run in the release profile, so that the Docker build step of
#   scripts/check-packaging.sh (the Dockerfile's `cargo build --release --locked`) reuses that
#   build instead of compiling every dependency a third time (clippy's check, debug, release).
#   It recompiles only the crates whose features the dev-dependencies change (tokio's
#   test-util, libc's extra_traits from nix: about a fifth of the crates).
set -euo pipefail
cd "$(dirname "$0")/.."

# Build cache outside the work tree so reruns (and fresh clones) are fast.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/kafka-sidecar/target}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
CACHE="${KAFKA_SIDECAR_CACHE:-$HOME/.cache/kafka-sidecar}"
mkdir -p "$CACHE"
started=$SECONDS
step() { echo "test: [$((SECONDS - started))s] $*"; }

# ---- packaging tools, in the background ---------------------------------------------------------
tools_log="$CACHE/test-tools.log"
# Its own session, so that an early exit can stop the whole install (go, pip) and not only bash.
setsid bash scripts/check-packaging.sh --tools >"$tools_log" 2>&1 </dev/null &
tools_pid=$!
# Jaeger for tests/jaeger.rs (built from source once, ~4 min, then cached: scripts/jaeger.sh).
jaeger_log="$CACHE/jaeger-build.log"
setsid bash scripts/jaeger.sh build >"$jaeger_log" 2>&1 </dev/null &
jaeger_pid=$!
stop_tools() {
  [[ -z $tools_pid ]] || kill -- "-$tools_pid" 2>/dev/null || true
  [[ -z $jaeger_pid ]] || kill -- "-$jaeger_pid" 2>/dev/null || true
}
trap stop_tools EXIT
tools_ready() {
  [[ -n $tools_pid ]] || return 0
  step "waiting for the packaging tools"
  if ! wait "$tools_pid"; then
    tools_pid=""
    cat "$tools_log" >&2
    echo "test: installing the packaging tools failed (log: $tools_log)" >&2
    exit 1
  fi
  tools_pid=""
  sed 's/^/  /' "$tools_log"
  step "waiting for Jaeger (scripts/jaeger.sh build)"
  if ! wait "$jaeger_pid"; then
    jaeger_pid=""
    cat "$jaeger_log" >&2
    echo "test: building Jaeger failed (log: $jaeger_log)" >&2
    exit 1
  fi
  jaeger_pid=""
  sed 's/^/  /' "$jaeger_log"
}

step "environment (scripts/env.sh up)"
bash scripts/env.sh up

CARGO_TEST=(cargo test --release --locked)
# The chaos suite (tests/chaos.rs) appends one line per scenario here; printed at the end.
export KAFKA_SIDECAR_CHAOS_REPORT="$CACHE/chaos-report.txt"
: >"$KAFKA_SIDECAR_CHAOS_REPORT"
chaos_report() {
  [[ -s $KAFKA_SIDECAR_CHAOS_REPORT ]] || return 0
  step "chaos suite (per scenario: records produced, delivered, dead-lettered, lost, duplicates)"
  sed 's/^/  /' "$KAFKA_SIDECAR_CHAOS_REPORT"
}
if [[ "${1:-}" == "--" ]]; then
  shift
  "${CARGO_TEST[@]}" --no-run
  tools_ready
  "${CARGO_TEST[@]}" -- --test-threads=2 "$@"
  chaos_report
  exit
fi

step "cargo fmt --check"
cargo fmt --all -- --check
step "cargo clippy"
cargo clippy --locked --all-targets -- -D warnings
step "cargo test --release --no-run (build the tests)"
"${CARGO_TEST[@]}" --no-run
tools_ready
step "cargo test --release (unit + integration against 127.0.0.1:9092)"
# Two at a time: the machines are small and the tests share one broker.
"${CARGO_TEST[@]}" --no-fail-fast -- --test-threads=2
chaos_report
step "packaging checks"
bash scripts/check-packaging.sh
step "side-by-side bench smoke (scripts/bench.sh --peers --smoke: 10,000 records, kafka-sidecar and the Go consumer)"
bash scripts/bench.sh --peers --smoke
step "all tests passed"
