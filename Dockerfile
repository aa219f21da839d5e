# The kernel as a container image: a release build on the toolchain
# rust-toolchain.toml pins, then the binary alone on Debian slim.
#
#   docker build -t commerce-kernel .
#
# The committed plugin components (plugins/defaults) are compiled into the
# binary, so the build needs no wasm target. CI has no Docker engine: this
# file has not been built there.

FROM rust:1.95.0-slim-bookworm AS build
WORKDIR /src
COPY . .
# Cache mounts keep the registry and the build between image builds.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p commerce-kernel \
 && cp target/release/commerce-kernel /usr/local/bin/commerce-kernel

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --create-home --home-dir /var/lib/commerce commerce
COPY --from=build /usr/local/bin/commerce-kernel /usr/local/bin/commerce-kernel
USER 10001
WORKDIR /var/lib/commerce
# The API; the metrics listener when COMMERCE_METRICS_ADDR names this port.
ENV COMMERCE_LISTEN_ADDR=0.0.0.0:8084 \
    COMMERCE_DATA_DIR=/var/lib/commerce/data
EXPOSE 8084 9184
# SIGTERM drains in-flight requests for up to COMMERCE_SHUTDOWN_TIMEOUT_SECS.
STOPSIGNAL SIGTERM
ENTRYPOINT ["commerce-kernel"]
CMD ["serve"]
