//! Where credentials are minted. Every target sits behind the small [`Backend`] trait; adding
//! one is a file in this folder plus a line in [`KINDS`].

mod aws_sts;
mod kafka;
mod looker;
mod snowflake_keypair;
mod snowflake_workload_identity;
mod vault_database;
mod vault_kv;

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;
use jsonwebtoken::jwk::Jwk;
use secrecy::{ExposeSecret, SecretString};
use serde_json::Value;
use time::OffsetDateTime;
use uuid::Uuid;

use crate::config::{Config, ConfigError};
use crate::policy::{ParamSchema, PolicyError, Role};
use crate::types::{sha256_hex, BackendName, RoleName, Ttl};
use crate::vault::Vault;

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The target refused or failed; the detail is safe to show the client.
    #[error("{backend} failed: {detail}")]
    Failed { backend: String, detail: String },
}

pub struct MintRequest<'a> {
    pub issuance_id: Uuid,
    pub role: &'a RoleName,
    /// The role's parameters, rendered from the verified claims.
    pub params: &'a BTreeMap<String, String>,
    /// The role's table parameters (e.g. `session_tags`), rendered the same way.
    pub tables: &'a BTreeMap<String, BTreeMap<String, String>>,
    pub ttl: Ttl,
    pub issued_at: OffsetDateTime,
    pub expires_at: OffsetDateTime,
}

/// What a client needs to use a credential. Secret fields are exposed only when the HTTP
/// response is serialised; `Debug` and the audit log see a fingerprint instead.
pub struct Credential {
    /// Public fields, in name order (the response's): every name is the backend's own
    /// constant, so none is copied per credential.
    pub public: Vec<(&'static str, Value)>,
    secrets: Vec<(&'static str, SecretString)>,
    pub env: Vec<(&'static str, EnvValue)>,
    /// SHA-256 of the primary secret: what the audit log keeps.
    pub fingerprint: String,
    /// The backend's own reference (key id, lease id): never a secret.
    pub handle: Option<String>,
    /// When the target itself ends the credential, if earlier than the granted expiry (Vault
    /// capped the lease): the broker reports and records this instead of what it asked for.
    pub expires_at: Option<OffsetDateTime>,
    /// The target keeps this credential alive past the granted expiry unless the broker
    /// revokes it (Vault would not shorten the lease): the broker schedules its revocation.
    pub outlives_grant: bool,
    /// What [`Backend::revoke`] will need besides the handle (a Looker session's own token):
    /// the broker keeps it only sealed in the revocation schedule (`revocation::secret_encryption`).
    pub revocation_secret: Option<SecretString>,
}

pub enum EnvValue {
    Public(String),
    /// The named secret field.
    Secret(&'static str),
}

impl Credential {
    pub fn new(primary_field: &'static str, primary: SecretString) -> Self {
        let fingerprint = sha256_hex(primary.expose_secret().as_bytes());
        Self { public: Vec::new(), secrets: vec![(primary_field, primary)], env: Vec::new(), fingerprint, handle: None, expires_at: None, outlives_grant: false, revocation_secret: None }
    }

    /// A further secret field (e.g. a session token next to a secret key).
    pub fn with_secret(mut self, field: &'static str, secret: SecretString) -> Self {
        self.secrets.push((field, secret));
        self
    }

    /// A public field; one set again takes the new value.
    pub fn with_public(mut self, field: &'static str, value: impl Into<Value>) -> Self {
        let value = value.into();
        match self.public.binary_search_by(|(name, _)| name.cmp(&field)) {
            Ok(index) => self.public[index].1 = value,
            Err(index) => self.public.insert(index, (field, value)),
        }
        self
    }

    pub fn with_env(mut self, name: &'static str, value: EnvValue) -> Self {
        self.env.push((name, value));
        self
    }

    pub fn with_handle(mut self, handle: String) -> Self {
        self.handle = Some(handle);
        self
    }

    pub fn with_expires_at(mut self, expires_at: OffsetDateTime) -> Self {
        self.expires_at = Some(expires_at);
        self
    }

    /// See [`Credential::outlives_grant`]; only for backends that can [`Backend::revoke`].
    pub fn outliving_grant(mut self) -> Self {
        self.outlives_grant = true;
        self
    }

    /// See [`Credential::revocation_secret`]; only for backends whose
    /// [`Backend::revokes_with_secret`] is true. The broker schedules the credential's
    /// revocation at its expiry, so it can also be ended on demand.
    pub fn revocable_with(mut self, secret: SecretString) -> Self {
        self.revocation_secret = Some(secret);
        self
    }

    /// The credential object of the HTTP response, secrets included. It serializes straight
    /// from the secrets, so the response body is the only copy made of them.
    pub fn expose_fields(&self) -> ExposedFields<'_> {
        ExposedFields(self)
    }

    /// The primary secret (the field [`Credential::new`] named): for `POST /oauth/token`,
    /// where it is the whole credential.
    pub fn expose_primary(&self) -> &str {
        self.secrets[0].1.expose_secret()
    }

    /// Environment variables for `credbroker exchange --format env`, secrets included,
    /// serialized the same way as [`Credential::expose_fields`].
    pub fn expose_env(&self) -> ExposedEnv<'_> {
        ExposedEnv(self)
    }

    fn secret(&self, field: &str) -> Option<&str> {
        self.secrets.iter().find(|(name, _)| *name == field).map(|(_, secret)| secret.expose_secret())
    }
}

/// See [`Credential::expose_fields`]: the public fields, then the secret ones (a secret field
/// wins over a public one of the same name).
pub struct ExposedFields<'a>(&'a Credential);

impl serde::Serialize for ExposedFields<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let credential = self.0;
        let mut map = serializer.serialize_map(None)?;
        for (name, value) in credential.public.iter().filter(|(name, _)| credential.secret(name).is_none()) {
            map.serialize_entry(name, value)?;
        }
        for (name, secret) in &credential.secrets {
            map.serialize_entry(name, secret.expose_secret())?;
        }
        map.end()
    }
}

/// See [`Credential::expose_env`]: a variable naming a secret field the credential lacks is left out.
pub struct ExposedEnv<'a>(&'a Credential);

impl serde::Serialize for ExposedEnv<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let credential = self.0;
        let mut map = serializer.serialize_map(None)?;
        for (name, value) in &credential.env {
            let value = match value {
                EnvValue::Public(text) => Some(text.as_str()),
                EnvValue::Secret(field) => credential.secret(field),
            };
            if let Some(value) = value {
                map.serialize_entry(name, value)?;
            }
        }
        map.end()
    }
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credential").field("public", &self.public).field("fingerprint", &self.fingerprint).finish()
    }
}

#[async_trait]
pub trait Backend: Send + Sync {
    /// The kind as written in `type = "..."`.
    fn kind(&self) -> &'static str;
    /// What the credential is for (`kafka`, `aws`, ...) unless the role names a target.
    fn default_target(&self) -> &'static str;
    /// The longest lifetime this backend can issue, if it has a ceiling of its own.
    fn max_ttl(&self) -> Option<Ttl>;
    /// The shortest lifetime this backend can issue (AWS STS: 900 s); shorter grants are
    /// raised to it, or refused when that would outlive the job (see `on_short_deadline`).
    fn min_ttl(&self) -> Option<Ttl> {
        None
    }
    async fn mint(&self, request: MintRequest<'_>) -> Result<Credential, BackendError>;
    /// When the credential is one bearer token (its primary secret) and nothing else a client
    /// must be told: that token's RFC 8693 type. Only such backends answer `POST /oauth/token`.
    fn bearer_token_type(&self) -> Option<&'static str> {
        None
    }
    /// Public keys verifiers need (served at `/.well-known/jwks.json`).
    fn published_keys(&self) -> Vec<Jwk> {
        Vec::new()
    }
    /// Checks a role that names this backend, at load, beyond its parameter names (e.g. a
    /// template where only a literal is safe). The error names the role's file, role and key.
    fn check_role(&self, _role: &Role) -> Result<(), PolicyError> {
        Ok(())
    }
    /// Whether minting only computes (signs with a key the broker holds or fetches) and leaves
    /// nothing behind at the target: no user, session or lease to end. Such a credential,
    /// minted and then refused, never existed, so the broker mints it before claiming the
    /// job token's use and writes the claim and the issued row in one statement. Such a
    /// backend cannot revoke.
    fn mints_without_side_effects(&self) -> bool {
        false
    }
    /// Whether [`Backend::revoke`] can end this backend's credentials early. Those that cannot
    /// (STS sessions, broker-signed JWTs) stay valid until they expire, and on-demand
    /// revocation says so.
    fn can_revoke(&self) -> bool {
        false
    }
    /// Whether [`Backend::revoke`] needs a secret of the credential (its
    /// [`Credential::revocation_secret`]): such a backend needs `revocation_secret_key`, and
    /// the broker refuses to start without one.
    fn revokes_with_secret(&self) -> bool {
        false
    }
    /// Ends a credential before its expiry, by the handle its mint put in the audit row
    /// (lease id, session id; never a secret) and, for backends that
    /// [`Backend::revokes_with_secret`], the decrypted secret (None when it is no longer
    /// held). Ending one that is already gone is success, so a retry after a lost answer is
    /// harmless.
    async fn revoke(&self, _handle: &str, _secret: Option<&SecretString>) -> Result<(), BackendError> {
        Err(BackendError::Failed { backend: self.kind().to_owned(), detail: "this backend cannot revoke credentials".into() })
    }
    /// Background work started once the application is built (e.g. keeping a remote key
    /// list fresh).
    async fn start(&self) {}
}

/// Everything a backend's constructor may need from outside its own table.
pub struct BuildContext<'a> {
    pub config: &'a Config,
    pub name: &'a BackendName,
    /// Dev mode's state directory: missing key files inside it may be generated.
    pub dev_state_dir: Option<&'a Path>,
    /// The broker's Vault connection, when `[vault]` is configured.
    pub vault: Option<&'a Vault>,
}

type Constructor = fn(&toml::Table, &BuildContext<'_>) -> Result<Arc<dyn Backend>, ConfigError>;

struct Kind {
    name: &'static str,
    params: ParamSchema,
    build: Constructor,
}

const KINDS: &[Kind] = &[
    Kind { name: "kafka_oauthbearer", params: kafka::PARAMS, build: kafka::build },
    Kind { name: "aws_sts", params: aws_sts::PARAMS, build: aws_sts::build },
    Kind { name: "vault_database", params: vault_database::PARAMS, build: vault_database::build },
    Kind { name: "vault_kv", params: vault_kv::PARAMS, build: vault_kv::build },
    Kind { name: "looker", params: looker::PARAMS, build: looker::build },
    Kind { name: "snowflake_keypair", params: snowflake_keypair::PARAMS, build: snowflake_keypair::build },
    Kind { name: "snowflake_workload_identity", params: snowflake_workload_identity::PARAMS, build: snowflake_workload_identity::build },
];

pub fn all_param_schemas() -> Vec<ParamSchema> {
    KINDS.iter().map(|kind| kind.params).collect()
}

/// Cheap to clone: every backend is shared.
#[derive(Clone)]
pub struct Backends {
    by_name: HashMap<BackendName, (Arc<dyn Backend>, ParamSchema)>,
    vault: Option<Vault>,
}

impl Backends {
    pub fn build(config: &Config, dev_state_dir: Option<&Path>) -> Result<Self, ConfigError> {
        // Before any key is parsed: jsonwebtoken fixes its provider at first use.
        crate::oidc::install_crypto_provider();
        let vault = match &config.vault {
            Some(vault) => Some(Vault::new(vault.clone()).map_err(|e| ConfigError::new(config.source_name(), "vault", e.to_string()))?),
            None => None,
        };
        let mut by_name = HashMap::new();
        for (name, table) in &config.backends {
            let key = format!("backends.{name}.type");
            let kind_name = table
                .get("type")
                .and_then(toml::Value::as_str)
                .ok_or_else(|| ConfigError::new(config.source_name(), &key, "is required"))?;
            let kind = KINDS.iter().find(|kind| kind.name == kind_name).ok_or_else(|| {
                let known: Vec<&str> = KINDS.iter().map(|k| k.name).collect();
                ConfigError::new(config.source_name(), &key, format!("unknown backend type {kind_name:?}; known: {known:?}"))
            })?;
            let context = BuildContext { config, name, dev_state_dir, vault: vault.as_ref() };
            by_name.insert(name.clone(), ((kind.build)(table, &context)?, kind.params));
        }
        Ok(Self { by_name, vault })
    }

    /// The Vault connection, when configured (for `/readyz`).
    pub fn vault(&self) -> Option<&Vault> {
        self.vault.as_ref()
    }

    /// Logs in to Vault and starts every backend's background work.
    pub async fn start(&self) {
        if let Some(vault) = &self.vault {
            vault.start().await;
        }
        for (backend, _) in self.by_name.values() {
            backend.start().await;
        }
    }

    /// The backends whose revocations need a sealed secret (see [`Backend::revokes_with_secret`]).
    pub fn needing_revocation_key(&self) -> Vec<&BackendName> {
        let mut names: Vec<&BackendName> = self.by_name.iter().filter(|(_, (backend, _))| backend.revokes_with_secret()).map(|(name, _)| name).collect();
        names.sort();
        names
    }

    /// Each backend's own checks of the roles that use it.
    pub fn check_roles<'r>(&self, roles: impl Iterator<Item = &'r Role>) -> Result<(), PolicyError> {
        for role in roles {
            if let Some(backend) = self.get(&role.backend) {
                backend.check_role(role)?;
            }
        }
        Ok(())
    }

    pub fn get(&self, name: &BackendName) -> Option<&Arc<dyn Backend>> {
        self.by_name.get(name).map(|(backend, _)| backend)
    }

    pub fn schemas(&self) -> HashMap<BackendName, ParamSchema> {
        self.by_name.iter().map(|(name, (_, schema))| (name.clone(), *schema)).collect()
    }

    pub fn published_keys(&self) -> Vec<Jwk> {
        let mut keys: Vec<Jwk> = self.by_name.values().flat_map(|(backend, _)| backend.published_keys()).collect();
        keys.sort_by(|a, b| a.common.key_id.cmp(&b.common.key_id));
        keys.dedup_by(|a, b| a.common.key_id == b.common.key_id);
        keys
    }
}

/// Reads a backend key from its table, naming the key on error.
fn table_string<'a>(table: &'a toml::Table, context: &BuildContext<'_>, key: &str) -> Result<Option<&'a str>, ConfigError> {
    match table.get(key) {
        None => Ok(None),
        Some(toml::Value::String(value)) => Ok(Some(value)),
        Some(_) => Err(context.error(key, "must be a string")),
    }
}

impl BuildContext<'_> {
    fn error(&self, key: &str, message: impl Into<String>) -> ConfigError {
        ConfigError::new(self.config.source_name(), format!("backends.{}.{key}", self.name), message)
    }

    fn reject_unknown_keys(&self, table: &toml::Table, known: &[&str]) -> Result<(), ConfigError> {
        match table.keys().find(|key| key.as_str() != "type" && !known.contains(&key.as_str())) {
            Some(key) => Err(self.error(key, format!("unknown key; expected one of {known:?}"))),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_response_fields_and_env_serialize_from_the_secrets() {
        let credential = Credential::new("password", SecretString::from("s3cret".to_owned()))
            .with_secret("token", SecretString::from("t0ken".to_owned()))
            .with_public("user", "job-41")
            // A public field of a secret's name does not shadow the secret.
            .with_public("password", "not this")
            .with_public("account", "acme")
            // Set again, a field takes the new value.
            .with_public("user", "job-42")
            .with_env("DB_USER", EnvValue::Public("job-42".into()))
            .with_env("DB_PASSWORD", EnvValue::Secret("password"))
            .with_env("MISSING", EnvValue::Secret("absent"));
        let fields = serde_json::to_value(credential.expose_fields()).unwrap();
        assert_eq!(fields, serde_json::json!({"account": "acme", "user": "job-42", "password": "s3cret", "token": "t0ken"}));
        // Public fields in name order, then the secrets.
        let text = serde_json::to_string(&credential.expose_fields()).unwrap();
        assert_eq!(text, r#"{"account":"acme","user":"job-42","password":"s3cret","token":"t0ken"}"#);
        let env = serde_json::to_value(credential.expose_env()).unwrap();
        assert_eq!(env, serde_json::json!({"DB_USER": "job-42", "DB_PASSWORD": "s3cret"}));
    }
}
