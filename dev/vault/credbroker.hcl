# The broker's Vault (or OpenBao) policy. Attach it to the broker's AppRole with
# token_no_default_policy=true: Vault's `default` policy grants more than this file
# (sys/leases/renew on any lease, cubbyhole, token creation helpers).

# Dynamic database users
path "database/creds/ci-*" { capabilities = ["read"] }
# Shorten (renew with a smaller increment) and revoke the leases it created
path "sys/leases/renew"  { capabilities = ["update"] }
path "sys/leases/revoke" { capabilities = ["update"] }
# Sign JWTs and read the public key versions for the JWKS
path "transit/sign/credbroker-kafka" { capabilities = ["update"] }
path "transit/keys/credbroker-kafka" { capabilities = ["read"] }
# The same for Gogs delivery tokens, when [gogs] signing uses vault_transit
path "transit/sign/credbroker-gogs" { capabilities = ["update"] }
path "transit/keys/credbroker-gogs" { capabilities = ["read"] }
# Seal revocation secrets (Looker session tokens), when revocation_secret_key uses vault_transit
path "transit/encrypt/credbroker-revocations" { capabilities = ["update"] }
path "transit/decrypt/credbroker-revocations" { capabilities = ["update"] }
# Root material for other backends, only under credbroker/: KV v2 (the data/ path) and v1
path "secret/data/credbroker/*" { capabilities = ["read"] }
path "kv/credbroker/*" { capabilities = ["read"] }
# Its own token: renew-self, and lookup-self (whether it is periodic)
path "auth/token/renew-self"  { capabilities = ["update"] }
path "auth/token/lookup-self" { capabilities = ["read"] }
