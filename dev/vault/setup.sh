#!/bin/sh
# Sets a Vault or OpenBao server up for credbroker: the commands of README's "Vault-side
# setup", for a Postgres database engine and transit signing. scripts/dev.sh and
# docker-compose.yml run it against an OpenBao dev server.
#
#   dev/vault/setup.sh OUT_DIR
#
# Environment: BAO_ADDR and BAO_TOKEN (an operator token), CREDBROKER_VAULT_PG
# (host:port/database the database engine manages), CREDBROKER_VAULT_PG_USER and
# CREDBROKER_VAULT_PG_PASSWORD (a login with CREATEROLE). Writes the broker's AppRole
# credentials to OUT_DIR/role-id and OUT_DIR/secret-id (0600), owned by
# CREDBROKER_VAULT_OUT_OWNER (uid:gid) when set. POSIX sh: the OpenBao image has no bash.
set -eu

[ $# -eq 1 ] || { echo "usage: $0 OUT_DIR" >&2; exit 2; }
out=$1
here=$(dirname "$0")
bao=${BAO:-bao}
: "${CREDBROKER_VAULT_PG:?set CREDBROKER_VAULT_PG to host:port/database}"
: "${CREDBROKER_VAULT_PG_USER:=postgres}"
: "${CREDBROKER_VAULT_PG_PASSWORD:=unused}"

# Safe to run again against a server that is already set up (compose reruns this job).
enable_auth() { "$bao" auth list -format=json | grep -q "\"$1/\"" || "$bao" auth enable "$1" >/dev/null; }
enable_secrets() { "$bao" secrets list -format=json | grep -q "\"$1/\"" || "$bao" secrets enable "$1" >/dev/null; }

enable_auth approle
"$bao" policy write credbroker "$here/credbroker.hcl" >/dev/null
"$bao" write auth/approle/role/credbroker token_policies=credbroker token_no_default_policy=true \
    token_period=1h secret_id_ttl=720h >/dev/null

enable_secrets database
"$bao" write database/config/postgres plugin_name=postgresql-database-plugin \
    allowed_roles="ci-*" \
    connection_url="postgresql://{{username}}:{{password}}@$CREDBROKER_VAULT_PG?sslmode=disable" \
    username="$CREDBROKER_VAULT_PG_USER" password="$CREDBROKER_VAULT_PG_PASSWORD" >/dev/null
"$bao" write database/roles/ci-reader db_name=postgres default_ttl=1h max_ttl=4h \
    creation_statements=@"$here/postgres-create-user.sql" \
    revocation_statements=@"$here/postgres-drop-user.sql" >/dev/null

enable_secrets transit
"$bao" read transit/keys/credbroker-kafka >/dev/null 2>&1 ||
    "$bao" write -f transit/keys/credbroker-kafka type=rsa-2048 >/dev/null

mkdir -p "$out"
umask 077
"$bao" read -field=role_id auth/approle/role/credbroker/role-id >"$out/role-id"
"$bao" write -f -field=secret_id auth/approle/role/credbroker/secret-id >"$out/secret-id"
if [ -n "${CREDBROKER_VAULT_OUT_OWNER:-}" ]; then
    chown "$CREDBROKER_VAULT_OUT_OWNER" "$out/role-id" "$out/secret-id"
fi
echo "setup.sh: configured $BAO_ADDR for credbroker; AppRole credentials in $out" >&2
