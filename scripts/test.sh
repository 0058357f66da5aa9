#!/usr/bin/env bash
# Runs every test on a fresh machine: installs and starts Kafka + Redis (scripts/env.sh),
# checks formatting and lints, runs unit and integration tests against the real broker,
# and validates the packaging (Dockerfile, Helm chart) offline.
#
#   bash scripts/test.sh            # everything (what CI runs)
#   bash scripts/test.sh -- NAME    # only cargo tests matching NAME (environment still started)
set -euo pipefail
cd "$(dirname "$0")/.."

# Build cache outside the work tree so reruns (and fresh clones) are fast.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/kafka-sidecar/target}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
step() { echo "test: $*"; }

bash scripts/env.sh up

if [[ "${1:-}" == "--" ]]; then
  shift
  cargo test --locked -- --test-threads=2 "$@"
  exit
fi

step "cargo fmt --check"
cargo fmt --all -- --check
step "cargo clippy"
cargo clippy --locked --all-targets -- -D warnings
step "cargo test (unit + integration against 127.0.0.1:9092)"
# Two at a time: the machines are small and the tests share one broker.
cargo test --locked -- --test-threads=2
if [[ -f scripts/check-packaging.sh ]]; then
  step "packaging checks"
  bash scripts/check-packaging.sh
fi
step "all tests passed"
