//! Snowflake workload identity federation (OIDC): Snowflake trusts the broker as an OIDC issuer
//! (`ALTER USER … SET WORKLOAD_IDENTITY = (TYPE = OIDC ISSUER = '<public_url>' SUBJECT = '…')`),
//! and the broker mints a short-lived ID token with the role's subject. The standard drivers
//! log in with it (`authenticator = WORKLOAD_IDENTITY`, `workload_identity_provider = OIDC`),
//! so no Snowflake private key or password exists anywhere. Minting is local, like Kafka's.

use std::sync::Arc;

use async_trait::async_trait;
use jsonwebtoken::jwk::Jwk;
use secrecy::SecretString;
use serde::Serialize;

use super::kafka::local_signer;
use super::snowflake_keypair::url_account;
use super::{table_string, Backend, BackendError, BuildContext, Credential, EnvValue, MintRequest};
use crate::config::ConfigError;
use crate::policy::ParamSchema;
use crate::signing::{JwtClaims, Signer};
use crate::types::Ttl;

pub const PARAMS: ParamSchema = ParamSchema {
    kind: "snowflake_workload_identity",
    required: &["subject"],
    optional: &["user"],
    ttl_note: "broker-signed OIDC ID token for Snowflake's workload identity login: it cannot be revoked early, so \
               its exp is the only bound (a Snowflake session it opened follows Snowflake's own session rules)",
    ..ParamSchema::PLAIN
};

/// Snowflake's documented audience for workload identity ID tokens.
const DEFAULT_AUDIENCE: &str = "snowflakecomputing.com";
const DEFAULT_MAX_TTL_SECONDS: u64 = 3600;

pub struct SnowflakeWorkloadIdentity {
    name: String,
    issuer: String,
    audience: String,
    account: String,
    host: String,
    signer: Arc<dyn Signer>,
    max_ttl: Ttl,
}

#[derive(Serialize)]
struct Claims<'a> {
    iss: &'a str,
    aud: &'a str,
    sub: &'a str,
    iat: i64,
    exp: i64,
    jti: String,
}

pub fn build(table: &toml::Table, context: &BuildContext<'_>) -> Result<Arc<dyn Backend>, ConfigError> {
    context.reject_unknown_keys(table, &["account", "audience", "signing_key_file", "retired_signing_key_files", "max_ttl"])?;
    let account = table_string(table, context, "account")?
        .map(str::trim)
        .filter(|account| !account.is_empty())
        .ok_or_else(|| context.error("account", "is required: the Snowflake account identifier, e.g. \"ORG-ACCOUNT\""))?
        .to_owned();
    if !account.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.')) {
        return Err(context.error("account", format!("{account:?} is not a Snowflake account identifier (letters, digits, _ - .)")));
    }
    let audience = match table_string(table, context, "audience")? {
        Some(audience) if audience.trim().is_empty() => return Err(context.error("audience", "must not be empty")),
        Some(audience) => audience.to_owned(),
        None => DEFAULT_AUDIENCE.to_owned(),
    };
    let max_ttl = match table_string(table, context, "max_ttl")? {
        Some(raw) => Ttl::parse(raw).map_err(|m| context.error("max_ttl", m))?,
        None => Ttl::from_seconds(DEFAULT_MAX_TTL_SECONDS).expect("default is a valid TTL"),
    };
    let key_file = table_string(table, context, "signing_key_file")?.ok_or_else(|| context.error("signing_key_file", "is required"))?;
    let signer = local_signer(table, context, key_file)?;
    let host = format!("{}.snowflakecomputing.com", url_account(&account));
    Ok(Arc::new(SnowflakeWorkloadIdentity {
        name: context.name.to_string(),
        issuer: context.config.public_url.clone(),
        audience,
        account,
        host,
        signer,
        max_ttl,
    }))
}

#[async_trait]
impl Backend for SnowflakeWorkloadIdentity {
    fn kind(&self) -> &'static str {
        PARAMS.kind
    }

    fn default_target(&self) -> &'static str {
        "snowflake"
    }

    fn max_ttl(&self) -> Option<Ttl> {
        Some(self.max_ttl)
    }

    #[tracing::instrument(skip_all, fields(backend = %self.name, role = %request.role))]
    async fn mint(&self, request: MintRequest<'_>) -> Result<Credential, BackendError> {
        let subject = request.params.get("subject").map(String::as_str).unwrap_or_default();
        if subject.is_empty() {
            return Err(BackendError::Failed { backend: self.name.clone(), detail: "the rendered subject is empty".into() });
        }
        let claims = Claims {
            iss: &self.issuer,
            aud: &self.audience,
            sub: subject,
            iat: request.issued_at.unix_timestamp(),
            exp: request.expires_at.unix_timestamp(),
            // The issuance id: Snowflake's login history leads straight to the audit row.
            jti: request.issuance_id.to_string(),
        };
        let claims = JwtClaims::new(&claims);
        let signed = self.signer.sign(&claims).await.map_err(|e| BackendError::Failed { backend: self.name.clone(), detail: e.to_string() })?;
        let mut credential = Credential::new("token", SecretString::from(signed.token))
            .with_public("authenticator", "WORKLOAD_IDENTITY")
            .with_public("workload_identity_provider", "OIDC")
            .with_public("account", self.account.as_str())
            .with_public("host", self.host.as_str())
            .with_public("subject", subject)
            .with_public("key_id", signed.kid.clone())
            .with_env("SNOWFLAKE_ACCOUNT", EnvValue::Public(self.account.clone()))
            .with_env("SNOWFLAKE_AUTHENTICATOR", EnvValue::Public("WORKLOAD_IDENTITY".into()))
            .with_env("SNOWFLAKE_WORKLOAD_IDENTITY_PROVIDER", EnvValue::Public("OIDC".into()))
            .with_env("SNOWFLAKE_TOKEN", EnvValue::Secret("token"))
            .with_handle(signed.kid);
        if let Some(user) = request.params.get("user").filter(|user| !user.is_empty()) {
            credential = credential.with_public("user", user.as_str()).with_env("SNOWFLAKE_USER", EnvValue::Public(user.clone()));
        }
        Ok(credential)
    }

    fn mints_without_side_effects(&self) -> bool {
        true
    }

    fn bearer_token_type(&self) -> Option<&'static str> {
        Some("urn:ietf:params:oauth:token-type:id_token")
    }

    fn published_keys(&self) -> Vec<Jwk> {
        self.signer.published_keys()
    }

    async fn start(&self) {
        self.signer.start().await;
    }
}
