//! Dynamic database users from Vault's database secrets engine, first for Snowflake (Vault's
//! Snowflake plugin): `GET {mount}/creds/{vault_role}` creates a user with a password or, for
//! the plugin's `rsa_private_key` credential type, a key pair. The lease is bounded by the
//! job: shortened right away to the granted TTL (`sys/leases/renew`, increment counted from
//! now), so Vault itself drops the user at the deadline; a lease Vault will not shorten is
//! revoked at once and never handed out. Vault also revokes every lease when the broker's
//! token that created it dies, so no lease is granted past that token's life.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use secrecy::SecretString;
use serde_json::Value;
use time::OffsetDateTime;

use super::{table_string, Backend, BackendError, BuildContext, Credential, EnvValue, MintRequest};
use crate::config::ConfigError;
use crate::policy::{Param, ParamSchema, PolicyError, Role};
use crate::types::Ttl;
use crate::vault::{Vault, VaultError};

pub const PARAMS: ParamSchema = ParamSchema {
    kind: "vault_database",
    required: &["vault_role"],
    optional: &["mount", "vault_role_template", "account", "warehouse", "database", "schema", "role", "host", "port"],
    ttl_note: "Vault database lease: shortened to the granted TTL at once (sys/leases/renew), and never past \
               the life of the broker's Vault token; a lease Vault will not shorten is revoked and refused; the \
               response reports the TTL Vault actually set",
    ..ParamSchema::PLAIN
};

const DEFAULT_MOUNT: &str = "database";
const TTL_GRANULARITY: Duration = Duration::from_secs(2);
/// The opt-in that lets `vault_role` be a claim template.
const SANITISE: &str = "sanitise";

pub struct VaultDatabase {
    name: String,
    vault: Vault,
    max_ttl: Option<Ttl>,
    plugin: Plugin,
}

/// The database plugin behind the mount, which decides the variables a job gets: each
/// database's own client reads different ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Plugin {
    /// `snowflake-database-plugin`: the Snowflake CLI's `SNOWFLAKE_*` variables.
    Snowflake,
    /// `postgresql-database-plugin`: libpq's `PG*` variables.
    Postgres,
}

pub fn build(table: &toml::Table, context: &BuildContext<'_>) -> Result<Arc<dyn Backend>, ConfigError> {
    context.reject_unknown_keys(table, &["max_ttl", "plugin"])?;
    let vault = context.vault.ok_or_else(|| context.error("type", "vault_database needs a [vault] section"))?.clone();
    let max_ttl = table_string(table, context, "max_ttl")?.map(Ttl::parse).transpose().map_err(|m| context.error("max_ttl", m))?;
    let plugin = match table_string(table, context, "plugin")? {
        None | Some("snowflake") => Plugin::Snowflake,
        Some("postgres") => Plugin::Postgres,
        Some(other) => return Err(context.error("plugin", format!("{other:?} is not a plugin this backend knows; use \"snowflake\" (the default) or \"postgres\""))),
    };
    Ok(Arc::new(VaultDatabase { name: context.name.to_string(), vault, max_ttl, plugin }))
}

impl VaultDatabase {
    fn failed(&self, detail: impl Into<String>) -> BackendError {
        BackendError::Failed { backend: self.name.clone(), detail: detail.into() }
    }

    fn vault_failed(&self, error: VaultError) -> BackendError {
        self.failed(error.to_string())
    }

    /// Revokes a lease the broker will not hand over (unusable, or Vault would not bound it),
    /// so no database user is left behind. No issuance exists for it, so nothing is scheduled: a
    /// failure is logged with the lease id for an operator.
    async fn discard(&self, lease_id: &str) {
        if let Err(error) = self.vault.revoke_lease(lease_id).await {
            tracing::error!(lease_id, %error, "could not revoke an unusable lease; revoke it by hand");
        }
    }
}

/// Vault role names: letters, digits, `-`, `_`, `.`. A templated name is lower-cased and every
/// other character becomes `-` (`ci-{job_project_path}` → `ci-platform-orders`).
fn sanitise_role_name(raw: &str) -> String {
    raw.chars()
        .map(|c| if c.is_ascii_alphanumeric() || c == '_' || c == '.' || c == '-' { c.to_ascii_lowercase() } else { '-' })
        .collect()
}

fn valid_role_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && !name.starts_with('.')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

#[async_trait]
impl Backend for VaultDatabase {
    fn kind(&self) -> &'static str {
        PARAMS.kind
    }

    fn default_target(&self) -> &'static str {
        match self.plugin {
            Plugin::Snowflake => "snowflake",
            Plugin::Postgres => "postgres",
        }
    }

    fn max_ttl(&self) -> Option<Ttl> {
        self.max_ttl
    }

    /// `mount` must be literal; `vault_role` may use claims only with
    /// `vault_role_template = "sanitise"` and only claims the role binds, so the set of Vault
    /// roles a policy can reach is visible in the policy itself.
    fn check_role(&self, role: &Role) -> Result<(), PolicyError> {
        let error = |key: &str, message: String| PolicyError {
            file: role.file.clone(),
            role: Some(role.name.to_string()),
            key: Some(key.to_owned()),
            message,
        };
        if let Some(mount) = role.params.get("mount").and_then(Param::as_template) {
            if mount.placeholders().next().is_some() {
                return Err(error("mount", "must be a literal mount path, not a claim template".into()));
            }
        }
        let opt_in = match role.params.get("vault_role_template").and_then(Param::as_template) {
            None => false,
            Some(value) if value.as_str() == SANITISE => true,
            Some(value) => {
                return Err(error("vault_role_template", format!("{:?} is not an option; the only value is {SANITISE:?}", value.as_str())))
            }
        };
        let Some(vault_role) = role.params.get("vault_role").and_then(Param::as_template) else { return Ok(()) };
        let claims: Vec<&str> = vault_role.placeholders().collect();
        if claims.is_empty() {
            if !valid_role_name(vault_role.as_str()) {
                return Err(error("vault_role", format!("{:?} is not a Vault role name (letters, digits, - _ .)", vault_role.as_str())));
            }
            return Ok(());
        }
        if !opt_in {
            return Err(error(
                "vault_role",
                format!(
                    "is a claim template ({:?}); set vault_role_template = {SANITISE:?} to allow it (the rendered name is \
                     lower-cased and every character other than a-z 0-9 - _ . becomes -)",
                    vault_role.as_str()
                ),
            ));
        }
        if let Some(unbound) = claims.iter().find(|claim| !role.bindings.iter().any(|(bound, _)| bound == *claim)) {
            return Err(error(
                "vault_role",
                format!("uses claim {unbound}, which the role does not bind under [role.claims]: any value would pick a Vault role"),
            ));
        }
        Ok(())
    }

    #[tracing::instrument(skip_all, fields(backend = %self.name, role = %request.role))]
    async fn mint(&self, request: MintRequest<'_>) -> Result<Credential, BackendError> {
        let param = |key: &str| request.params.get(key).map(String::as_str).filter(|v| !v.is_empty());
        let mount = param("mount").unwrap_or(DEFAULT_MOUNT).trim_matches('/');
        let mut vault_role = param("vault_role").unwrap_or_default().to_owned();
        if param("vault_role_template") == Some(SANITISE) {
            vault_role = sanitise_role_name(&vault_role);
        }
        if !valid_role_name(&vault_role) {
            return Err(self.failed(format!("the rendered vault_role {vault_role:?} is not a Vault role name")));
        }

        let path = format!("{mount}/creds/{vault_role}");
        let (envelope, token_end) = self.vault.create_lease(&path, request.expires_at).await.map_err(|e| self.vault_failed(e))?;
        let lease_id = envelope.lease_id.clone();
        if lease_id.is_empty() {
            return Err(self.failed(format!("Vault returned no lease for {path}; is {mount} a database secrets engine?")));
        }
        let data = envelope.data.clone().unwrap_or_default();
        let text = |field: &str| data.get(field).and_then(Value::as_str).filter(|v| !v.is_empty()).map(str::to_owned);
        let (Some(username), secret) = (text("username"), text("rsa_private_key").map(|key| ("private_key", key)).or_else(|| text("password").map(|p| ("password", p))))
        else {
            self.discard(&lease_id).await;
            return Err(self.failed(format!("Vault's answer for {path} has no username")));
        };
        let Some((secret_field, secret)) = secret else {
            self.discard(&lease_id).await;
            return Err(self.failed(format!("Vault's answer for {path} has neither a password nor an rsa_private_key")));
        };

        // The lease must end by the grant, and by the death of the token that created it
        // (Vault revokes it then anyway). Vault counts the increment from now.
        let must_end = token_end.map_or(request.expires_at, |end| end.min(request.expires_at));
        let mut lease = Duration::from_secs(envelope.lease_duration);
        let remaining = (must_end - OffsetDateTime::now_utc()).whole_seconds().max(1) as u64;
        if lease.as_secs() > remaining {
            let refusal = match self.vault.renew_lease(&lease_id, Duration::from_secs(remaining)).await {
                Ok(renewed) if renewed.duration.as_secs() <= remaining => {
                    lease = renewed.duration;
                    None
                }
                Ok(renewed) => Some(format!("it kept {} s", renewed.duration.as_secs())),
                Err(error) => Some(error.to_string()),
            };
            // Only Vault's own expiry is sure to end the user on time, whatever happens to
            // the broker; a lease Vault will not bound is never handed out.
            if let Some(reason) = refusal {
                self.discard(&lease_id).await;
                return Err(self.failed(format!(
                    "Vault would not shorten the {} s lease from {path} to the {remaining} s granted ({reason}); it was revoked and \
                     no credential issued. Give the Vault role a default_ttl no longer than the broker grants, renewable leases, \
                     and the broker's policy update on sys/leases/renew",
                    lease.as_secs()
                )));
            }
        }
        let vault_expires_at = OffsetDateTime::now_utc() + lease;

        let mut credential = Credential::new(secret_field, SecretString::from(secret))
            .with_public("username", username.as_str())
            .with_public("lease_id", lease_id.as_str())
            .with_public("lease_duration_seconds", lease.as_secs())
            .with_handle(lease_id.clone());
        let hints: &[(&str, &str)] = match self.plugin {
            Plugin::Snowflake => {
                let authenticator = if secret_field == "private_key" { "SNOWFLAKE_JWT" } else { "snowflake" };
                credential = credential
                    .with_public("authenticator", authenticator)
                    .with_env("SNOWFLAKE_USER", EnvValue::Public(username.clone()))
                    .with_env("SNOWFLAKE_AUTHENTICATOR", EnvValue::Public(authenticator.into()))
                    .with_env(if secret_field == "private_key" { "SNOWFLAKE_PRIVATE_KEY_RAW" } else { "SNOWFLAKE_PASSWORD" }, EnvValue::Secret(secret_field));
                &[
                    ("account", "SNOWFLAKE_ACCOUNT"),
                    ("warehouse", "SNOWFLAKE_WAREHOUSE"),
                    ("database", "SNOWFLAKE_DATABASE"),
                    ("schema", "SNOWFLAKE_SCHEMA"),
                    ("role", "SNOWFLAKE_ROLE"),
                ]
            }
            Plugin::Postgres => {
                credential = credential.with_env("PGUSER", EnvValue::Public(username.clone())).with_env("PGPASSWORD", EnvValue::Secret(secret_field));
                &[("host", "PGHOST"), ("port", "PGPORT"), ("database", "PGDATABASE")]
            }
        };
        for (hint, variable) in hints {
            if let Some(value) = param(hint) {
                credential = credential.with_public(hint, value).with_env(variable, EnvValue::Public(value.to_owned()));
            }
        }
        // Vault counts whole seconds, so a lease shortened to the deadline may end up to a
        // second early; only a real cap (the Vault role's max TTL) changes what is reported.
        if vault_expires_at + TTL_GRANULARITY < request.expires_at {
            credential = credential.with_expires_at(vault_expires_at);
        }
        Ok(credential)
    }

    fn can_revoke(&self) -> bool {
        true
    }

    /// `sys/leases/revoke`: Vault drops the database user. Vault answers 204 for a lease that
    /// has already expired or been revoked, so a repeated attempt is harmless.
    #[tracing::instrument(skip(self), fields(backend = %self.name))]
    async fn revoke(&self, handle: &str, _secret: Option<&SecretString>) -> Result<(), BackendError> {
        self.vault.revoke_lease(handle).await.map_err(|e| self.vault_failed(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templated_role_names_are_sanitised_to_vaults_charset() {
        assert_eq!(sanitise_role_name("ci-Platform/Orders@main"), "ci-platform-orders-main");
        assert!(valid_role_name("ci-platform-orders"));
        for bad in ["", ".hidden", "a/b", "a b", &"x".repeat(129)] {
            assert!(!valid_role_name(bad), "{bad:?}");
        }
    }
}
