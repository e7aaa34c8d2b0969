//! `vault_kv`: Vault's KV v2 engine is a source of root material for other backends (see
//! `crate::vault::secret_source`: `{ vault_kv = "path", key = "field" }` in their tables),
//! never something a job receives. Static secrets are exactly what the broker replaces, so
//! this kind exists to say so clearly: any role that names such a backend is refused at load.

use std::sync::Arc;

use async_trait::async_trait;

use super::{Backend, BackendError, BuildContext, Credential, MintRequest};
use crate::config::ConfigError;
use crate::policy::{ParamSchema, PolicyError, Role};
use crate::types::Ttl;

pub const PARAMS: ParamSchema = ParamSchema {
    kind: "vault_kv",
    required: &[],
    optional: &[],
    ttl_note: "never issued: a static KV secret would outlive any job; use it as root material of another backend",
    ..ParamSchema::PLAIN
};

const REFUSAL: &str = "backend kind vault_kv never hands a static KV secret to a job (it would outlive the job \
                       and cannot be revoked); reference the secret from another backend's table as \
                       { vault_kv = \"<path>\", key = \"<field>\" } so the broker mints short-lived credentials from it";

pub struct VaultKv {
    name: String,
}

pub fn build(table: &toml::Table, context: &BuildContext<'_>) -> Result<Arc<dyn Backend>, ConfigError> {
    context.reject_unknown_keys(table, &["mount", "path"])?;
    Ok(Arc::new(VaultKv { name: context.name.to_string() }))
}

#[async_trait]
impl Backend for VaultKv {
    fn kind(&self) -> &'static str {
        PARAMS.kind
    }

    fn default_target(&self) -> &'static str {
        "vault_kv"
    }

    fn max_ttl(&self) -> Option<Ttl> {
        None
    }

    fn check_role(&self, role: &Role) -> Result<(), PolicyError> {
        Err(PolicyError {
            file: role.file.clone(),
            role: Some(role.name.to_string()),
            key: Some("backend".into()),
            message: format!("backend {} is of kind vault_kv: {REFUSAL}", role.backend),
        })
    }

    async fn mint(&self, _request: MintRequest<'_>) -> Result<Credential, BackendError> {
        Err(BackendError::Failed { backend: self.name.clone(), detail: REFUSAL.into() })
    }
}
