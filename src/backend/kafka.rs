//! Kafka SASL/OAUTHBEARER: the broker signs a JWT that Kafka's KIP-768 validator accepts
//! (JWKS from our `/.well-known/jwks.json`, expected audience and issuer, `sub` as principal,
//! `scope`). Nothing to call: minting is local, so it cannot leak a half-made credential.

use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;
use jsonwebtoken::jwk::Jwk;
use secrecy::SecretString;
use serde::Serialize;

use crate::signing::{JwtClaims, LocalSigner, Signer, SigningKey};
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
    /// A local PEM key (with retired keys still published) or a Vault transit key.
    signer: Arc<dyn Signer>,
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
    context.reject_unknown_keys(table, &["audience", "signing_key_file", "retired_signing_key_files", "signing", "max_ttl"])?;
    let audience = table_string(table, context, "audience")?
        .filter(|a| !a.trim().is_empty())
        .ok_or_else(|| context.error("audience", "is required"))?
        .to_owned();
    let max_ttl = match table_string(table, context, "max_ttl")? {
        Some(raw) => Ttl::parse(raw).map_err(|m| context.error("max_ttl", m))?,
        None => Ttl::from_seconds(DEFAULT_MAX_TTL_SECONDS).expect("default is a valid TTL"),
    };
    let signer = match (table.get("signing"), table_string(table, context, "signing_key_file")?) {
        (Some(_), Some(_)) => return Err(context.error("signing", "set either signing_key_file or signing, not both")),
        (Some(signing), None) => {
            if table.contains_key("retired_signing_key_files") {
                return Err(context.error("retired_signing_key_files", "applies to signing_key_file only; Vault keeps old transit versions itself"));
            }
            // A retired version stays published for the longest token plus Kafka's 30 s clock skew.
            let retain_for = std::time::Duration::from_secs(u64::from(max_ttl.seconds()) + 30);
            crate::vault::transit::signer_from_config(signing, context.vault, retain_for, &|key, message| context.error(key, message))?
        }
        (None, Some(key_file)) => local_signer(table, context, key_file)?,
        (None, None) => return Err(context.error("signing_key_file", "is required (or signing = { vault_transit = \"<key>\" })")),
    };
    Ok(Arc::new(KafkaOauthbearer { name: context.name.to_string(), issuer: context.config.public_url.clone(), audience, signer, max_ttl }))
}

pub(super) fn local_signer(table: &toml::Table, context: &BuildContext<'_>, key_file: &str) -> Result<Arc<dyn Signer>, ConfigError> {
    let key_path = context.config.resolve(&PathBuf::from(key_file));
    let may_generate = context.dev_state_dir.is_some_and(|dir| key_path.starts_with(dir));
    let current = SigningKey::load_or_generate(&key_path, may_generate).map_err(|e| context.error("signing_key_file", e.to_string()))?;
    let mut retired = Vec::new();
    if let Some(files) = table.get("retired_signing_key_files") {
        let files = files.as_array().ok_or_else(|| context.error("retired_signing_key_files", "must be a list"))?;
        for file in files {
            let path = file.as_str().ok_or_else(|| context.error("retired_signing_key_files", "must list paths"))?;
            let key = SigningKey::from_pem_file(&context.config.resolve(&PathBuf::from(path)))
                .map_err(|e| context.error("retired_signing_key_files", e.to_string()))?;
            retired.push(key);
        }
    }
    Ok(Arc::new(LocalSigner { current, retired }))
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

    // Debug level: local signing on every exchange; the request span names the role.
    #[tracing::instrument(level = "debug", skip_all, fields(backend = %self.name, role = %request.role))]
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
        let claims = JwtClaims::new(&claims);
        let signed = self
            .signer
            .sign(&claims)
            .await
            .map_err(|e| BackendError::Failed { backend: self.name.clone(), detail: e.to_string() })?;
        Ok(Credential::new("token", SecretString::from(signed.token))
            .with_public("token_type", "Bearer")
            .with_public("mechanism", "OAUTHBEARER")
            .with_public("principal", principal)
            .with_public("scope", scope)
            .with_public("key_id", signed.kid.clone())
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
            .with_handle(signed.kid))
    }

    fn mints_without_side_effects(&self) -> bool {
        true
    }

    fn bearer_token_type(&self) -> Option<&'static str> {
        // A JWT access token for Kafka's KIP-768 validator.
        Some("urn:ietf:params:oauth:token-type:access_token")
    }

    fn published_keys(&self) -> Vec<Jwk> {
        self.signer.published_keys()
    }

    async fn start(&self) {
        self.signer.start().await;
    }
}
