# Multi-stage build: a release binary on a slim Debian runtime.
FROM rust:1.89-slim-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY fixtures ./fixtures
# The web console, compiled into the binary.
COPY assets ./assets
# Declared in Cargo.toml; cargo wants every declared target present, built or not.
COPY benches ./benches
COPY config.toml ./
# Only the relay binary is built; loadgen, soak and the benches are not.
RUN cargo build --release --locked --bin exchange-relay

FROM debian:bookworm-slim
# curl for the container health check; CA roots for wss:// and https:// to the exchanges.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 relay
COPY --from=build /src/target/release/exchange-relay /usr/local/bin/exchange-relay
COPY config.toml /etc/exchange-relay/config.toml
USER relay
EXPOSE 3000
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s \
  CMD curl -fsS http://127.0.0.1:3000/health || exit 1
# SIGTERM (docker stop) closes clients with 1001 and upstreams cleanly.
STOPSIGNAL SIGTERM
ENTRYPOINT ["exchange-relay", "--config", "/etc/exchange-relay/config.toml"]
