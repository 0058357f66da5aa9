#!/usr/bin/env bash
# Jaeger, for tests/jaeger.rs: a real trace backend (OTLP gRPC + HTTP receiver, query API).
#
#   bash scripts/jaeger.sh build   # build once, cached: prints the binary's path
#   bash scripts/jaeger.sh path    # the binary's path (whether or not it is built yet)
#
# `go install github.com/jaegertracing/jaeger/cmd/jaeger@v1.76.0` refuses (the module has
# replace directives), so the binary is built in a scratch module outside the work tree:
#   go mod init x && go get -tool github.com/jaegertracing/jaeger/cmd/jaeger@v1.76.0 &&
#   go build -o jaeger github.com/jaegertracing/jaeger/cmd/jaeger
# About 4 minutes on 2 cores, at nice 19 (scripts/test.sh runs it in the background while cargo
# builds). The binary is cached as $CACHE/jaeger-$JAEGER_VERSION/jaeger; a build that fails
# leaves no binary. The tests start their own instance (127.0.0.1, free ports, in-memory
# storage); they find the binary at $KAFKA_SIDECAR_JAEGER or at the cached path.
set -euo pipefail

JAEGER_VERSION=v1.76.0
CACHE="${KAFKA_SIDECAR_CACHE:-$HOME/.cache/kafka-sidecar}"
DIR="$CACHE/jaeger-$JAEGER_VERSION"
BIN="$DIR/jaeger"

case "${1:-}" in
  path)
    echo "$BIN"
    ;;
  build)
    if [[ -x $BIN ]]; then
      echo "$BIN"
      exit 0
    fi
    command -v go >/dev/null || { echo "jaeger: go is needed to build Jaeger (as for helm in scripts/check-packaging.sh): install Go" >&2; exit 1; }
    mkdir -p "$DIR"
    # One build at a time (two test runs starting together share it).
    exec 9>"$DIR/build.lock"
    flock 9
    if [[ -x $BIN ]]; then
      echo "$BIN"
      exit 0
    fi
    scratch="$DIR/module"
    rm -rf "$scratch"
    mkdir -p "$scratch"
    cd "$scratch"
    log="$DIR/build.log"
    echo "jaeger: building $JAEGER_VERSION in $scratch (a few minutes; log: $log)" >&2
    started=$SECONDS
    if ! {
      go mod init x &&
        nice -n 19 go get -tool "github.com/jaegertracing/jaeger/cmd/jaeger@$JAEGER_VERSION" &&
        nice -n 19 go build -o "$BIN.tmp" github.com/jaegertracing/jaeger/cmd/jaeger
    } >"$log" 2>&1; then
      cat "$log" >&2
      echo "jaeger: the build failed (log: $log)" >&2
      exit 1
    fi
    mv "$BIN.tmp" "$BIN"
    echo "jaeger: built in $((SECONDS - started)) s" >&2
    cd "$DIR"
    rm -rf "$scratch"
    echo "$BIN"
    ;;
  *)
    echo "usage: $0 build|path" >&2
    exit 2
    ;;
esac
