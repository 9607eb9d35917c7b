# syntax=docker/dockerfile:1
#
# outbox-relay container image.
#
#   docker build -t outbox-relay:0.1.0 .
#
# Two stages: a Rust builder on Debian 12 (bookworm), and a bookworm-slim
# runtime holding only the binary, its migrations, its default config and the
# shared libraries it links dynamically. .ci/check-image-libs checks that last
# claim against a real build (ldd + dpkg -S against the runtime stage's
# apt-get install line), so keep the runtime package list on ONE
# `apt-get install` line in the final stage.

# ---------------------------------------------------------------------------
# Builder
# ---------------------------------------------------------------------------
FROM rust:1-slim-bookworm AS builder

# librdkafka is built from source by rdkafka-sys (its ./configure + make):
#   make, g++, perl, python3   librdkafka's mklove configure and build
#   pkg-config, libssl-dev     openssl-sys (rdkafka "ssl", native-tls for PostgreSQL)
#   zlib1g-dev                 libz-sys (rdkafka's default "libz" feature)
# zstd is compiled in from zstd-sys's bundled source, so no libzstd-dev.
#
# DL3008 (pin apt versions) is ignored on purpose: Debian's mirrors keep only
# the current version of a package in a stable release, so a pinned version
# stops resolving at the next point or security release and the build breaks;
# unpinned packages from a fixed release (bookworm) are what pick up security
# fixes. Reproducibility comes from pinning the base image by digest in the
# release pipeline, not from apt pins.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        g++ \
        libssl-dev \
        make \
        perl \
        pkg-config \
        python3 \
        zlib1g-dev \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /build

# 1) Dependencies only, in their own layer: a manifest-only change rebuilds
#    this, a source-only change does not. The dummy crate has the same lib and
#    bin targets as the real one, so `--bin outbox-relay` compiles the whole
#    dependency graph (librdkafka included, the slow part).
COPY Cargo.toml Cargo.lock ./
RUN mkdir src \
    && echo 'fn main() {}' > src/main.rs \
    && touch src/lib.rs \
    && cargo build --release --locked --bin outbox-relay \
    && rm -rf src \
        target/release/outbox-relay \
        target/release/deps/outbox_relay-* \
        target/release/deps/liboutbox_relay-* \
        target/release/.fingerprint/outbox-relay-*

# 2) The real sources. migrations/ is copied too: the SQL files are compiled
#    into the binary with include_str!.
COPY src ./src
COPY migrations ./migrations
# COPY keeps the files' original mtimes, which can be older than the dummy
# build above; touch them so cargo never reuses the dummy crate.
RUN touch src/main.rs src/lib.rs \
    && cargo build --release --locked --bin outbox-relay \
    && ./target/release/outbox-relay --help > /dev/null

# ---------------------------------------------------------------------------
# Runtime
# ---------------------------------------------------------------------------
FROM debian:bookworm-slim AS runtime

# Only what the binary needs at run time:
#   ca-certificates  roots for TLS to Kafka (SASL_SSL) and PostgreSQL
#   libssl3          OpenSSL 3, linked dynamically (openssl-sys, librdkafka)
#   zlib1g           libz, linked dynamically by librdkafka (already in
#                    bookworm-slim; listed so the dependency is explicit)
# librdkafka and zstd are linked statically. libc6 and libgcc-s1 come with
# the base image. See the builder stage for why DL3008 is ignored.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates libssl3 zlib1g \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 outbox-relay \
    && useradd --system --uid 10001 --gid 10001 \
        --home-dir /nonexistent --no-create-home \
        --shell /usr/sbin/nologin outbox-relay

COPY --from=builder /build/target/release/outbox-relay /usr/local/bin/outbox-relay
COPY migrations /app/migrations
COPY config/default.toml /etc/outbox-relay/default.toml

# The Kubernetes Deployment points this at its mounted relay.toml instead.
ENV OUTBOX_CONFIG=/etc/outbox-relay/default.toml

WORKDIR /app
# HTTP: /health, /health/deep, /metrics
EXPOSE 8080
# Numeric, so Kubernetes' runAsNonRoot can verify it without reading /etc/passwd.
USER 10001

ENTRYPOINT ["outbox-relay"]
CMD ["run"]
