#!/usr/bin/env bash
# Throwaway Postgres clusters for tests and local development.
#
#   scripts/postgres.sh start DIR        create (or reuse) a cluster in DIR and run it
#   scripts/postgres.sh url DIR [DB]     print its connection URL (database DB, default credbroker)
#   scripts/postgres.sh stop DIR         stop it (no error if it is not running)
#
# Why a private cluster instead of the machine's own Postgres: tests must not depend
# on (or damage) whatever else runs on the host, CI machines usually have no running
# server at all, and Debian's service start is blocked in several sandboxes. A cluster
# per DIR, on its own port, with trust auth on loopback only, needs nothing but the
# server binaries.
set -euo pipefail

readonly DEFAULT_PORT="${CREDBROKER_PG_PORT:-54329}"
# Tests run in parallel and each opens its own pool, so the stock 100 runs out.
readonly MAX_CONNECTIONS=200
# How many ports we try when another process grabs the one we picked between our
# check and the server's bind (two test runs starting at the same moment).
readonly PORT_ATTEMPTS=20

die() {
    echo "postgres.sh: $*" >&2
    exit 1
}

usage() {
    echo "usage: $0 start DIR | stop DIR | url DIR [DB]" >&2
    exit 2
}

is_root() { [ "$(id -u)" -eq 0 ]; }

# pg_ctl and initdb refuse to run as root, so as root everything touching the data
# directory runs as the `postgres` user the Debian package creates.
as_pg() {
    if is_root; then
        runuser -u postgres -- "$@"
    else
        "$@"
    fi
}

# Debian installs server binaries outside PATH (/usr/lib/postgresql/N/bin); the
# wrappers in /usr/bin and /usr/local/bin may pick a different version than the
# server, so use the newest versioned directory directly.
find_pgbin() {
    local d
    d=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
    if [ -n "$d" ] && [ -x "$d/initdb" ] && [ -x "$d/pg_ctl" ] && [ -x "$d/psql" ]; then
        echo "$d"
    fi
}

ensure_binaries() {
    PGBIN=$(find_pgbin)
    if [ -z "$PGBIN" ]; then
        # A fresh CI machine has only Rust; installing here keeps `scripts/test.sh`
        # the single command a newcomer or CI needs.
        echo "postgres.sh: Postgres server binaries not found; installing the Debian package" >&2
        local sudo=()
        if ! is_root; then
            command -v sudo >/dev/null 2>&1 || die "need root or sudo to apt-get install postgresql"
            sudo=(sudo -n)
        fi
        "${sudo[@]}" apt-get update -qq </dev/null
        "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive \
            apt-get install -y -qq --no-install-recommends postgresql </dev/null >/dev/null
        PGBIN=$(find_pgbin)
        [ -n "$PGBIN" ] || die "installed postgresql but found no /usr/lib/postgresql/*/bin/initdb"
    fi
    if is_root; then
        id -u postgres >/dev/null 2>&1 ||
            die "running as root but there is no 'postgres' user to own the cluster (install the postgresql package)"
    fi
}

# Is something already listening on 127.0.0.1:PORT (or on every address)?
port_taken() {
    local port=$1
    if command -v ss >/dev/null 2>&1; then
        # Any listener on this port counts: a wildcard listener would also
        # answer on 127.0.0.1.
        [ -n "$(ss -Hltn "sport = :$port" 2>/dev/null)" ]
    else
        # Slim images lack iproute2; a successful connect means someone listens.
        (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null
    fi
}

pick_port() {
    local port=$1
    while port_taken "$port"; do
        port=$((port + 1))
        [ "$port" -lt 65536 ] || die "no free TCP port found from $DEFAULT_PORT upwards"
    done
    echo "$port"
}

psql_on() {
    local port=$1 db=$2
    shift 2
    # -X: ignore a developer's ~/.psqlrc, which could change output format.
    PGCONNECT_TIMEOUT=5 "$PGBIN/psql" -X -q -A -t -v ON_ERROR_STOP=1 \
        -h 127.0.0.1 -p "$port" -U postgres -d "$db" "$@"
}

# The whole point of the check: another cluster (a second test run, the host's own
# server) may hold the port we think is ours, and creating or dropping databases
# there would be wrong. Postgres reports the -D path it was started with; compare
# canonical paths.
is_our_cluster() {
    local port=$1 reported
    reported=$(psql_on "$port" postgres -c "select current_setting('data_directory')" 2>/dev/null) || return 1
    [ -n "$reported" ] || return 1
    [ "$(realpath -m -- "$reported")" = "$DATA" ]
}

running() {
    [ -f "$DATA/postmaster.pid" ] && as_pg "$PGBIN/pg_ctl" -D "$DATA" status >/dev/null 2>&1
}

# As root the cluster belongs to `postgres`, which must be able to reach DIR. A repo
# checked out under /root is not reachable, so the cluster then lives under /tmp and
# DIR becomes a symlink to it; realpath(DIR) is still the data directory, so the
# checks below stay the same.
prepare_dir() {
    local dir=$1 parent
    if [ -L "$dir" ] && [ ! -e "$dir" ]; then
        # The /tmp target of an earlier fallback is gone (reboot, tmp cleaner).
        rm -f -- "$dir"
    fi
    mkdir -p -- "$dir"
    if is_root; then
        parent=$(dirname -- "$(realpath -- "$dir")")
        if ! runuser -u postgres -- test -x "$parent"; then
            [ -L "$dir" ] && die "$dir points to $(realpath -- "$dir"), which user postgres cannot reach"
            [ -z "$(ls -A -- "$dir")" ] || die "$dir is not empty and user postgres cannot reach it"
            local target
            target=$(mktemp -d /tmp/credbroker-pg.XXXXXXXX)
            rmdir -- "$dir"
            ln -s -- "$target" "$dir"
            echo "postgres.sh: user postgres cannot reach $parent; cluster lives in $target" >&2
        fi
        chown postgres:postgres -- "$(realpath -- "$dir")"
    fi
    # initdb and the server insist on a private data directory.
    chmod 0700 -- "$(realpath -- "$dir")"
}

cmd_start() {
    local dir=$1
    [[ "$dir" != *"'"* ]] || die "DIR must not contain a single quote: $dir"
    # Checked before prepare_dir, which chowns and chmods: a mistyped DIR must
    # not get someone's files handed to the postgres user.
    if [ -d "$dir" ] && [ ! -f "$dir/PG_VERSION" ] && [ -n "$(ls -A -- "$dir")" ]; then
        die "$dir is neither empty nor a Postgres cluster; refusing to touch it"
    fi
    ensure_binaries
    prepare_dir "$dir"
    DATA=$(realpath -- "$dir")

    if running; then
        local port
        port=$(cat "$DATA/port" 2>/dev/null || true)
        if [ -n "$port" ] && is_our_cluster "$port"; then
            ensure_database "$port"
            echo "postgres.sh: reusing cluster in $DATA on 127.0.0.1:$port" >&2
            return 0
        fi
        die "a server is running from $DATA but is not reachable as ours on port '${port:-?}'; stop it first: $0 stop $dir"
    fi

    if [ ! -f "$DATA/PG_VERSION" ]; then
        [ -z "$(ls -A -- "$DATA")" ] || die "$DATA is neither empty nor a Postgres cluster; refusing to touch it"
        # Trust auth is acceptable only because the server listens on loopback
        # alone and the cluster is disposable. An explicit locale keeps initdb
        # from failing on a CI image whose LANG names a locale that is not
        # installed. --no-sync: a throwaway cluster need not survive power loss.
        local out
        out=$(as_pg "$PGBIN/initdb" -D "$DATA" -A trust -U postgres -E UTF8 --locale=C.UTF-8 --no-sync 2>&1) ||
            { echo "$out" >&2; die "initdb failed in $DATA"; }
    fi

    # Unix sockets go into the data directory so we never collide with (or need
    # write access to) /var/run/postgresql. The kernel limits socket paths to 107
    # bytes; with a deep DIR, go TCP-only rather than fail to start.
    local sockdir="$DATA"
    if [ $((${#DATA} + 17)) -gt 107 ]; then
        sockdir=""
    fi

    local port attempt started=0
    port=$DEFAULT_PORT
    for ((attempt = 0; attempt < PORT_ATTEMPTS; attempt++)); do
        port=$(pick_port "$port")
        # Only log lines from this attempt tell why it failed; the log survives
        # restarts of a reused cluster.
        local logsize
        logsize=$(stat -c %s "$DATA/log" 2>/dev/null || echo 0)
        # The server writes its log as the postgres user, so the file must be
        # writable by it; the data directory is.
        local ctl_out
        if ctl_out=$(as_pg "$PGBIN/pg_ctl" -D "$DATA" -l "$DATA/log" -w -t 60 \
            -o "-p $port -k '$sockdir' -c listen_addresses=127.0.0.1 -c fsync=on -c max_connections=$MAX_CONNECTIONS" \
            start 2>&1); then
            started=1
            break
        fi
        # Lost a race for the port: someone bound it after our check. Anything
        # else is a real failure worth showing.
        if tail -c +$((logsize + 1)) "$DATA/log" 2>/dev/null | grep -qE 'could not bind|Address already in use|could not create any TCP/IP sockets'; then
            echo "postgres.sh: port $port was taken meanwhile; trying the next one" >&2
            port=$((port + 1))
            continue
        fi
        echo "$ctl_out" >&2
        tail -c +$((logsize + 1)) "$DATA/log" 2>/dev/null | tail -n 30 >&2 || true
        die "pg_ctl start failed for $DATA"
    done
    [ "$started" -eq 1 ] || die "could not start a server after $PORT_ATTEMPTS ports"

    echo "$port" >"$DATA/port"

    if ! is_our_cluster "$port"; then
        as_pg "$PGBIN/pg_ctl" -D "$DATA" -m fast stop >/dev/null 2>&1 || true
        die "127.0.0.1:$port does not answer as the cluster in $DATA; another server holds the port"
    fi
    ensure_database "$port"
    echo "postgres.sh: started cluster in $DATA on 127.0.0.1:$port" >&2
}

# With trust auth for everyone, a database user Vault minted would "log in" with any password,
# so a test or the dev demo could not show that the minted password is what grants access.
# Members of this group (directly or through another role) must present their password.
readonly PASSWORD_GROUP=credbroker_password_login
readonly HBA_LINE="host all +$PASSWORD_GROUP 127.0.0.1/32 scram-sha-256"

ensure_password_group() {
    local port=$1 hba
    hba=$(psql_on "$port" postgres -c "select current_setting('hba_file')")
    if ! as_pg grep -qxF -- "$HBA_LINE" "$hba"; then
        # pg_hba.conf is read top down: the group's line must come before the trust lines.
        as_pg sh -c 'f=$1; line=$2; { printf "%s\n" "$line"; cat "$f"; } > "$f.new" && mv "$f.new" "$f"' sh "$hba" "$HBA_LINE"
        psql_on "$port" postgres -c "select pg_reload_conf()" >/dev/null
    fi
    psql_on "$port" postgres -c "do \$\$ begin create role $PASSWORD_GROUP nologin; exception when duplicate_object then null; end \$\$" >/dev/null
}

ensure_database() {
    local port=$1
    ensure_password_group "$port"
    if [ -z "$(psql_on "$port" postgres -c "select 1 from pg_database where datname = 'credbroker'")" ]; then
        psql_on "$port" postgres -c "create database credbroker" >/dev/null
    fi
}

cmd_url() {
    local dir=$1 db=${2:-credbroker} port
    [ -e "$dir" ] || die "$dir does not exist; run: $0 start $dir"
    port=$(cat "$(realpath -- "$dir")/port" 2>/dev/null) || die "no port recorded in $dir; run: $0 start $dir"
    echo "postgres://postgres@127.0.0.1:$port/$db"
}

cmd_stop() {
    local dir=$1
    # Stopping must never fail a cleanup trap: nothing there means nothing to stop.
    [ -e "$dir" ] || return 0
    DATA=$(realpath -- "$dir")
    [ -f "$DATA/postmaster.pid" ] || return 0
    PGBIN=$(find_pgbin)
    [ -n "$PGBIN" ] || return 0
    if running; then
        as_pg "$PGBIN/pg_ctl" -D "$DATA" -m fast -w stop >/dev/null ||
            echo "postgres.sh: pg_ctl stop failed for $DATA" >&2
    fi
    return 0
}

[ $# -ge 2 ] || usage
case "$1" in
start) [ $# -eq 2 ] || usage; cmd_start "$2" ;;
url) [ $# -le 3 ] || usage; cmd_url "$2" "${3:-}" ;;
stop) [ $# -eq 2 ] || usage; cmd_stop "$2" ;;
*) usage ;;
esac
