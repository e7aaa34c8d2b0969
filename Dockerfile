# Build: docker build -t credbroker .
# The runtime image expects the operator's config at /app/credbroker.toml (mount it);
# docker-compose.yml instead runs the built-in dev mode with dev/credbroker.toml.

# Build in the full Rust image, ship only the binary: the toolchain and sources
# would add ~1.5 GB and attack surface to every running broker.
FROM rust:1-bookworm AS builder
WORKDIR /src
# Any sqlx compile-time checked queries must build from the committed .sqlx
# metadata: there is no database inside `docker build`.
ENV SQLX_OFFLINE=true
# The whole tree (minus .dockerignore) rather than a hand-picked list, so files the
# build needs (migrations embedded by sqlx::migrate!, .sqlx) cannot be forgotten.
COPY . .
# --locked: the image must contain exactly the dependency versions CI tested.
RUN cargo build --release --locked \
    && cp target/release/credbroker /usr/local/bin/credbroker

# Same Debian release as the builder, so the binary's glibc matches.
FROM debian:bookworm-slim
# ca-certificates: the broker calls IdPs' JWKS endpoints and cloud APIs over TLS
# with the system's roots (rustls-tls-native-roots).
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/*
# A fixed numeric UID lets Kubernetes' runAsNonRoot verify the user without
# reading /etc/passwd, and keeps volume ownership stable across rebuilds.
RUN groupadd --system --gid 10001 credbroker \
    && useradd --system --uid 10001 --gid credbroker --home-dir /app --no-create-home \
        --shell /usr/sbin/nologin credbroker
COPY --from=builder /usr/local/bin/credbroker /usr/local/bin/credbroker
WORKDIR /app
# Policies and the dev config stay root-owned: the broker reads them, it must not
# be able to rewrite its own trust policies.
COPY policies /app/policies
COPY dev /app/dev
# Dev mode keeps its signing keys and state here; the directory must exist and be
# owned by the broker so a named volume mounted on it inherits that ownership.
RUN mkdir -p /app/.credbroker-dev && chown credbroker:credbroker /app/.credbroker-dev
USER 10001:10001
EXPOSE 8080
ENTRYPOINT ["credbroker"]
CMD ["serve", "--config", "/app/credbroker.toml"]
