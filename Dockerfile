# syntax=docker/dockerfile:1
#
# kafka-sidecar container image (docs/kubernetes.md).
#
#   docker build -t kafka-sidecar .
#
# Runs as UID/GID 10001 on a read-only root filesystem; reads /etc/kafka-sidecar/config.toml
# (mount a ConfigMap there; KAFKA_SIDECAR_<SECTION>__<KEY> env vars override it) and serves
# /metrics, /healthz, /readyz and /status on port 9464.

# ---- build -----------------------------------------------------------------------------------
# Debian 12 (bookworm), like the CI machines, so that the runtime stage below gets the same
# libssl3 ABI the binary was linked against.
FROM rust:1-bookworm AS build

# The apt build dependencies are the ones scripts/env.sh installs on CI machines (librdkafka is
# compiled from source by rdkafka-sys with make/perl; openssl-sys and libz-sys link the system
# libssl and zlib dynamically). Most are already in the rust image; listing them keeps the two
# lists in step.
# DL3008 (pin apt versions): bookworm's security updates replace package versions in place, so
# pinned versions stop resolving within weeks and the build breaks; the base image tag pins the
# Debian release instead.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc make perl pkg-config libssl-dev zlib1g-dev \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /src
# Only what the build needs (.dockerignore is an allowlist of the same paths).
COPY Cargo.toml Cargo.lock ./
COPY src ./src

# The build command is exactly the one CI runs: scripts/check-packaging.sh copies the paths
# COPYed above into a scratch directory and runs this same `cargo build --release --locked`
# there, so a build step (or a COPY) that would break `docker build` breaks CI first.
# The cache mounts only keep crates and build artifacts between local `docker build`s.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked \
 && install -D -m 0755 target/release/kafka-sidecar /out/kafka-sidecar

# ---- runtime ---------------------------------------------------------------------------------
# debian-slim rather than distroless: the binary needs libssl3 and libz.so.1 (zlib1g is part of
# every Debian image; libssl3 and the CA bundle are installed below).
FROM debian:bookworm-slim

LABEL org.opencontainers.image.title="kafka-sidecar" \
      org.opencontainers.image.description="Kafka consumer sidecar: delivers records to your app over HTTP" \
      org.opencontainers.image.licenses="Apache-2.0"

# DL3008: see the build stage.
# The config file shipped in the image holds only comments, so that a container configured
# purely through KAFKA_SIDECAR_* env vars starts (and names the missing keys) without a mount.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates libssl3 \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 kafka-sidecar \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin kafka-sidecar \
 && mkdir -p /etc/kafka-sidecar \
 && printf '%s\n' \
      '# Placeholder: mount your config.toml here (see config.toml.example next to it),' \
      '# or configure with KAFKA_SIDECAR_<SECTION>__<KEY> environment variables.' \
      > /etc/kafka-sidecar/config.toml

COPY config.toml.example /etc/kafka-sidecar/config.toml.example
COPY --from=build /out/kafka-sidecar /usr/local/bin/kafka-sidecar

ENV KAFKA_SIDECAR_CONFIG=/etc/kafka-sidecar/config.toml
# Numeric so that Kubernetes can verify runAsNonRoot.
USER 10001:10001
EXPOSE 9464
ENTRYPOINT ["kafka-sidecar"]
CMD ["run"]
