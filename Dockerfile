# securechat: one binary on a small Debian image, run as a non-root user.
#
# Build:
#
#     docker build -t securechat .
#
# Run (see docs/operations.md for the volume layout and the configuration
# changes a container needs):
#
#     docker run -d --name securechat \
#         --stop-timeout 30 \
#         --read-only --tmpfs /tmp \
#         --env-file /srv/securechat/env \
#         -v /srv/securechat:/etc/securechat:ro \
#         -p 443:8443 -p 127.0.0.1:9464:9464 \
#         securechat
#
# With Compose, the same stop grace is `stop_grace_period: 30s`. On SIGTERM the
# server drains: /readyz answers 503, sessions are closed with 1001, and it
# exits 0 within server.shutdown_grace_ms (default 10 s). Docker's default
# grace is 10 s, after which it sends SIGKILL; 30 s leaves room for a longer
# shutdown_grace_ms.

# The toolchain CI tests with; override with --build-arg RUST_VERSION=...
ARG RUST_VERSION=1.95

FROM rust:${RUST_VERSION}-bookworm AS build
WORKDIR /src

# Dependencies first, in their own layer: it is rebuilt only when Cargo.toml
# or Cargo.lock change, not on every change to the sources.
COPY Cargo.toml Cargo.lock ./
RUN mkdir src \
    && echo 'fn main() {}' > src/main.rs \
    && touch src/lib.rs \
    && cargo build --release --locked --bin securechat \
    && rm -rf src

# src/web.rs embeds the browser client from client/.
COPY src ./src
COPY client ./client
# COPY keeps the files' modification times, which can be older than the
# placeholder build above: touch them so that cargo rebuilds the crate.
RUN touch src/main.rs src/lib.rs \
    && cargo build --release --locked --bin securechat \
    && install -m 0755 target/release/securechat /usr/local/bin/securechat


# A slim Debian rather than distroless: the health check needs an HTTP client,
# and the server has no subcommand that could play that part.
FROM debian:bookworm-slim

# curl for HEALTHCHECK only. Versions are not pinned: the Debian stable
# security archive replaces them, and a pin would break the build on the next
# security update.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends curl \
    && rm -rf /var/lib/apt/lists/*

# A dedicated user with a fixed UID and GID, so that files in mounted volumes
# (the private key and secrets, mode 0600) can be owned by it from the host:
# chown 10001:10001.
RUN groupadd --system --gid 10001 securechat \
    && useradd --system --uid 10001 --gid securechat --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin securechat \
    && install -d -o securechat -g securechat -m 0750 /var/log/securechat

COPY --from=build /usr/local/bin/securechat /usr/local/bin/securechat

# Configuration, certificates and keys: securechat.toml, certs/, env.
# Relative paths in securechat.toml resolve against this folder.
VOLUME ["/etc/securechat"]

# 8443: TLS, WebSocket and the health endpoints (/healthz, /readyz).
# 9464: Prometheus /metrics. It listens on 127.0.0.1 by default, which cannot
# be published from a container: set [metrics] listen = "0.0.0.0:9464" in the
# configuration, and publish it to a private address only (or firewall it),
# as metrics describe your traffic.
EXPOSE 8443 9464

USER 10001:10001

# -k: the certificate may be self-signed or not name 127.0.0.1. /healthz
# answers 200 as long as the process serves; it stays 200 while draining,
# so Docker does not restart a container that is shutting down.
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD ["curl", "-fsk", "--max-time", "4", "-o", "/dev/null", "https://127.0.0.1:8443/healthz"]

STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/securechat"]
CMD ["serve", "--config", "/etc/securechat/securechat.toml"]
