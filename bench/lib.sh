# Shared setup of the broker benchmarks (bench/issuance, bench/faults), sourced with WORK set
# and PIDS declared: the release broker and the load generator, a private Postgres, the keys,
# the load generator's OIDC issuer, the bench policies (1 role; 1,000 roles in 50 files) and
# write_config.

log "building (release)"
cargo build --release --quiet --bin credbroker
# LOADGEN=path: another build of the load generator (as BROKER below).
LOADGEN=${LOADGEN:-$(cargo bench --quiet --bench loadgen --no-run --message-format=json 2>/dev/null |
    python3 -c 'import json,sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "loadgen" and m.get("executable"):
        print(m["executable"])')}
# BROKER=path: measure another build of the broker (an A/B of two trees in one sitting).
BROKER=${BROKER:-target/release/credbroker}

PG_BIN=$(dirname "$(command -v pg_ctl 2>/dev/null || echo /usr/lib/postgresql/15/bin/pg_ctl)")
[ -x "$PG_BIN/pgbench" ] || PG_BIN=/usr/lib/postgresql/15/bin
bash scripts/postgres.sh start "$WORK/pg" </dev/null >&2
# POSTGRES_SETTINGS="shared_buffers=1GB bgwriter_lru_maxpages=1000": server settings a deployment
# would tune (bench/README.md), set with `alter system` and a restart; unset keeps Debian's defaults.
if [ -n "${POSTGRES_SETTINGS:-}" ]; then
    for setting in $POSTGRES_SETTINGS; do
        "$PG_BIN/psql" "$(bash scripts/postgres.sh url "$WORK/pg" postgres)" -qAtX -v ON_ERROR_STOP=1 \
            -c "alter system set ${setting%%=*} = '${setting#*=}'" >/dev/null
    done
    bash scripts/postgres.sh stop "$WORK/pg" >/dev/null
    bash scripts/postgres.sh start "$WORK/pg" </dev/null >&2
fi
ADMIN_URL=$(bash scripts/postgres.sh url "$WORK/pg" postgres)
psql_admin() { "$PG_BIN/psql" "$ADMIN_URL" -qAtX -v ON_ERROR_STOP=1 "$@"; }
# A server that has been running reuses its WAL files: each checkpoint renames old ones for
# the WAL to come. A fresh cluster has none, so each time a 16 MB file fills it creates and
# zero-fills the next, every 0.7 s at 10,000 issuances/s, and the commits waiting on it stall
# for 10-20 ms. Make a gigabyte of WAL files before measuring and keep them (`min_wal_size`),
# as that server would have. FRESH_WAL=1 measures a fresh cluster instead.
if [ -z "${FRESH_WAL:-}" ]; then
    psql_admin -c "alter system set min_wal_size = '1GB'" -c "select pg_reload_conf()" >/dev/null
    for _ in $(seq 1 64); do echo "select pg_logical_emit_message(false, 'credbroker-bench', 'warm-up'), pg_switch_wal();"; done |
        psql_admin >/dev/null
    psql_admin -c "checkpoint"
fi

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# Keys: the issuer signs job tokens RS256 as GitLab does; the broker mints Kafka tokens ES256.
openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out "$WORK/issuer.pem" 2>/dev/null
openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$WORK/kafka.pem" 2>/dev/null

ISSUER_PORT=$(free_port)
"$LOADGEN" serve-issuer --key "$WORK/issuer.pem" --listen "127.0.0.1:$ISSUER_PORT" &
PIDS+=($!)
ISSUER_BASE="http://127.0.0.1:$ISSUER_PORT"

# Policies: one role for the main runs; 1,000 roles in 50 files for the cost-growth run.
mkdir -p "$WORK/policies" "$WORK/policies-many"
role_toml() { # name issuer
    cat <<EOF
[[role]]
name = "$1"
backend = "kafka"
issuer = "$2"
default_ttl = "10m"
max_ttl = "15m"
max_uses_per_token = 1000
principal = "ci:{project_path}"
scope = "orders.write"

[role.claims]
project_path = "bench/*"
ref_protected = "true"

EOF
}
role_toml bench-kafka i01 >"$WORK/policies/bench.toml"
for file in $(seq -w 1 50); do
    for role in $(seq 1 20); do
        issuer=$(printf 'i%02d' $(( (10#$file + role) % 20 + 1 )))
        role_toml "bench-$file-$role" "$issuer"
    done >"$WORK/policies-many/roles-$file.toml"
done
# The roles the cost-growth run requests, all bound to issuer i01, spread over the files.
MANY_ROLES=$(grep -h -B3 'issuer = "i01"' "$WORK"/policies-many/*.toml | sed -n 's/^name = "\(.*\)"/\1/p' | paste -sd, -)

write_config() { # file policy_dir issuers
    {
        cat <<EOF
listen = "127.0.0.1:0"
public_url = "http://127.0.0.1:1"
audience = "credbroker-bench"
database_url = "postgres://unused"
policy_dir = "$2"
log_format = "json"
EOF
        for i in $(seq 1 "$3"); do
            printf '\n[[issuers]]\nname = "i%02d"\nissuer = "%s/i%02d"\n' "$i" "$ISSUER_BASE" "$i"
        done
        cat <<EOF

[backends.kafka]
type = "kafka_oauthbearer"
audience = "kafka-bench"
signing_key_file = "$WORK/kafka.pem"
max_ttl = "1h"
EOF
    } >"$1"
}
# Waits up to 10 s for URL to answer 2xx.
wait_ready() {
    for _ in $(seq 1 100); do
        curl -fsS "$1" >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    return 1
}
