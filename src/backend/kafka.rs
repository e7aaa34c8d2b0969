//! Kafka SASL/OAUTHBEARER: the broker signs a JWT that Kafka's KIP-768 validator accepts
//! (JWKS from our `/.well-known/jwks.json`, expected audience and issuer, `sub` as principal,
//! `scope`). Nothing to call: minting is local, so it cannot leak a half-made credential.

use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;
use jsonwebtoken::jwk::Jwk;
use secrecy::SecretString;
use serde::Serialize;

use super::signing::SigningKey;
use super::{table_string, Backend, BackendError, BuildContext, Credential, EnvValue, MintRequest};
use crate::config::ConfigError;
use crate::policy::ParamSchema;
use crate::types::Ttl;

pub const PARAMS: ParamSchema = ParamSchema {
    kind: "kafka_oauthbearer",
    required: &["principal"],
    optional: &["scope"],
    ttl_note: "broker-signed JWT: cannot be revoked early, so its exp is the only bound; set \
               connections.max.reauth.ms on the Kafka brokers so connections do not outlive it",
    ..ParamSchema::PLAIN
};

const DEFAULT_MAX_TTL_SECONDS: u64 = 3600;

pub struct KafkaOauthbearer {
    name: String,
    issuer: String,
    audience: String,
    signing_key: SigningKey,
    /// Keys rotated out of signing but still published until every token they signed expired.
    retired_keys: Vec<SigningKey>,
    max_ttl: Ttl,
}

#[derive(Serialize)]
struct Claims<'a> {
    iss: &'a str,
    aud: &'a str,
    sub: &'a str,
    #[serde(skip_serializing_if = "str::is_empty")]
    scope: &'a str,
    iat: i64,
    exp: i64,
    jti: String,
}

pub fn build(table: &toml::Table, context: &BuildContext<'_>) -> Result<Arc<dyn Backend>, ConfigError> {
    context.reject_unknown_keys(table, &["audience", "signing_key_file", "retired_signing_key_files", "max_ttl"])?;
    let audience = table_string(table, context, "audience")?
        .filter(|a| !a.trim().is_empty())
        .ok_or_else(|| context.error("audience", "is required"))?
        .to_owned();
    let key_path = context.config.resolve(&PathBuf::from(
        table_string(table, context, "signing_key_file")?.ok_or_else(|| context.error("signing_key_file", "is required"))?,
    ));
    let may_generate = context.dev_state_dir.is_some_and(|dir| key_path.starts_with(dir));
    let signing_key = SigningKey::load_or_generate(&key_path, may_generate)
        .map_err(|e| context.error("signing_key_file", e.to_string()))?;
    let mut retired_keys = Vec::new();
    if let Some(files) = table.get("retired_signing_key_files") {
        let files = files.as_array().ok_or_else(|| context.error("retired_signing_key_files", "must be a list"))?;
        for file in files {
            let path = file.as_str().ok_or_else(|| context.error("retired_signing_key_files", "must list paths"))?;
            let key = SigningKey::from_pem_file(&context.config.resolve(&PathBuf::from(path)))
                .map_err(|e| context.error("retired_signing_key_files", e.to_string()))?;
            retired_keys.push(key);
        }
    }
    let max_ttl = match table_string(table, context, "max_ttl")? {
        Some(raw) => Ttl::parse(raw).map_err(|m| context.error("max_ttl", m))?,
        None => Ttl::from_seconds(DEFAULT_MAX_TTL_SECONDS).expect("default is a valid TTL"),
    };
    Ok(Arc::new(KafkaOauthbearer {
        name: context.name.to_string(),
        issuer: context.config.public_url.clone(),
        audience,
        signing_key,
        retired_keys,
        max_ttl,
    }))
}

#[async_trait]
impl Backend for KafkaOauthbearer {
    fn kind(&self) -> &'static str {
        PARAMS.kind
    }

    fn default_target(&self) -> &'static str {
        "kafka"
    }

    fn max_ttl(&self) -> Option<Ttl> {
        Some(self.max_ttl)
    }

    #[tracing::instrument(skip_all, fields(backend = %self.name, role = %request.role))]
    async fn mint(&self, request: MintRequest<'_>) -> Result<Credential, BackendError> {
        let principal = request.params.get("principal").map(String::as_str).unwrap_or_default();
        if principal.is_empty() {
            return Err(BackendError::Failed { backend: self.name.clone(), detail: "the rendered principal is empty".into() });
        }
        let scope = request.params.get("scope").map(String::as_str).unwrap_or_default();
        let claims = Claims {
            iss: &self.issuer,
            aud: &self.audience,
            sub: principal,
            scope,
            iat: request.issued_at.unix_timestamp(),
            exp: request.expires_at.unix_timestamp(),
            // The issuance id: a Kafka-side log line leads straight to the audit row.
            jti: request.issuance_id.to_string(),
        };
        let token = self
            .signing_key
            .sign(&claims)
            .map_err(|e| BackendError::Failed { backend: self.name.clone(), detail: e.to_string() })?;
        Ok(Credential::new("token", SecretString::from(token))
            .with_public("token_type", "Bearer")
            .with_public("mechanism", "OAUTHBEARER")
            .with_public("principal", principal)
            .with_public("scope", scope)
            .with_public("key_id", self.signing_key.kid())
            .with_public(
                "client_properties",
                serde_json::json!({
                    "sasl.mechanism": "OAUTHBEARER",
                    "security.protocol": "SASL_SSL",
                }),
            )
            .with_env("KAFKA_SASL_MECHANISM", EnvValue::Public("OAUTHBEARER".into()))
            .with_env("KAFKA_OAUTHBEARER_TOKEN", EnvValue::Secret("token"))
            .with_env("KAFKA_PRINCIPAL", EnvValue::Public(principal.to_owned()))
            .with_handle(self.signing_key.kid().to_owned()))
    }

    fn published_keys(&self) -> Vec<Jwk> {
        std::iter::once(&self.signing_key).chain(&self.retired_keys).map(|key| key.public_jwk().clone()).collect()
    }
}
