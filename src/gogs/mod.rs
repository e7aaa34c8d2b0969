//! Gogs-triggered automation. Gogs signs each webhook delivery with a per-hook secret
//! (`X-Gogs-Signature`: lowercase hex HMAC-SHA256 of the payload JSON) but issues no tokens, so
//! the broker verifies the delivery, records it, and mints a short-lived delivery token of its
//! own (issuer `<public_url>/gogs`, trusted under the reserved issuer name `gogs`) that roles
//! bind like any job token, alone or together with the automation's own identity token.

mod config;
pub mod payload;

use std::collections::BTreeMap;
use std::sync::Arc;

use hmac::{Hmac, Mac};
use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{DecodingKey, Validation};
use secrecy::{ExposeSecret, SecretString};
use serde_json::{json, Map, Value};
use sha2::Sha256;
use sqlx::PgPool;
use time::OffsetDateTime;

pub use config::{GogsConfig, HookConfig};

use crate::audit::deliveries::{self, DeliveryRecord, Recorded};
use crate::audit::AuditError;
use crate::backend::signing::Signer;
use crate::oidc::{VerifiedToken, VerifyError};
use crate::types::{sha256_hex, IssuerName};

/// The issuer name policies use for delivery tokens; reserved when `[gogs]` is configured.
pub const GOGS_ISSUER_NAME: &str = "gogs";
/// Where a role that needs both identities expects the delivery token.
pub const DELIVERY_TOKEN_HEADER: &str = "x-credbroker-delivery";
/// The claims of a delivery token a policy can bind (`[role.claims]` of a `gogs` role, or
/// `[role.delivery]` of a role that also wants the automation's own identity token).
pub const DELIVERY_CLAIMS: &[&str] = &["repository", "ref", "ref_type", "sha", "pusher", "event", "delivery_id", "hook"];

#[derive(Debug, thiserror::Error)]
pub enum HookError {
    #[error("no Gogs hook named {0:?} is configured")]
    UnknownHook(String),
    #[error("missing header {0}")]
    MissingHeader(&'static str),
    #[error("header {0} is malformed")]
    MalformedHeader(&'static str),
    #[error("the delivery is not signed (no X-Gogs-Signature)")]
    Unsigned,
    #[error("X-Gogs-Signature does not match the payload")]
    BadSignature,
    #[error("unsupported content type {0:?}: configure the hook with application/json or application/x-www-form-urlencoded")]
    UnsupportedContentType(String),
    #[error("form delivery has no `payload` field")]
    MissingFormPayload,
    #[error(transparent)]
    Payload(#[from] payload::PayloadError),
    #[error("repository {0:?} is not accepted by this hook")]
    RepositoryNotAccepted(String),
    #[error("delivery {0} was already received")]
    Replayed(String),
    #[error("the hook's secret cannot be read: {0}")]
    Secret(String),
    #[error("cannot sign the delivery token: {0}")]
    Signing(String),
    #[error(transparent)]
    Audit(#[from] AuditError),
}

/// The transport-level parts of a delivery, as the HTTP edge found them.
pub struct IncomingDelivery<'a> {
    pub hook: &'a str,
    pub delivery_id: Option<&'a str>,
    pub event: Option<&'a str>,
    pub signature: Option<&'a str>,
    pub content_type: Option<&'a str>,
    pub body: &'a [u8],
}

/// What happened to an accepted delivery.
pub struct Received {
    pub delivery_id: String,
    pub event: String,
    pub acted_on: bool,
    /// The delivery token and its end, when the hook returns it in the response.
    pub token_for_response: Option<(SecretString, OffsetDateTime)>,
    /// The automation's HTTP status (or the error) when the hook forwards deliveries.
    pub forward_status: Option<String>,
}

pub struct Gogs {
    config: GogsConfig,
    /// `<public_url>/gogs`.
    issuer_url: String,
    audience: String,
    leeway_seconds: u64,
    signer: Arc<dyn Signer>,
    issuer_name: IssuerName,
    client: reqwest::Client,
}

impl Gogs {
    pub fn new(config: GogsConfig, public_url: &str, audience: &str, leeway_seconds: u64) -> Result<Self, reqwest::Error> {
        let client = reqwest::Client::builder()
            .timeout(std::time::Duration::from_secs(config.forward_timeout_seconds))
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        Ok(Self {
            signer: config.signer.clone(),
            config,
            issuer_url: format!("{public_url}/gogs"),
            audience: audience.to_owned(),
            leeway_seconds,
            issuer_name: IssuerName::parse(GOGS_ISSUER_NAME).expect("reserved name is valid"),
            client,
        })
    }

    pub fn issuer_url(&self) -> &str {
        &self.issuer_url
    }

    pub fn max_payload_bytes(&self) -> usize {
        self.config.max_payload_bytes
    }

    pub fn published_keys(&self) -> Vec<Jwk> {
        self.signer.published_keys()
    }

    /// Loads and keeps fresh a remote key list (Vault transit); run after Vault login.
    pub async fn start(&self) {
        self.signer.start().await;
    }

    /// Checks, records and acts on one delivery. Nothing is acted on before the signature
    /// matched and the delivery id was recorded for the first time.
    #[tracing::instrument(skip_all, fields(hook = incoming.hook, delivery_id, event))]
    pub async fn receive(&self, incoming: IncomingDelivery<'_>, store: &PgPool) -> Result<Received, HookError> {
        let received_at = OffsetDateTime::now_utc();
        let hook = self.config.hooks.get(incoming.hook).ok_or_else(|| HookError::UnknownHook(incoming.hook.chars().take(64).collect()))?;
        let signature = incoming.signature.filter(|s| !s.is_empty()).ok_or(HookError::Unsigned)?;
        let delivery_id = incoming.delivery_id.ok_or(HookError::MissingHeader("X-Gogs-Delivery"))?;
        if delivery_id.is_empty() || delivery_id.len() > 128 || !delivery_id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
            return Err(HookError::MalformedHeader("X-Gogs-Delivery"));
        }
        let event = incoming.event.ok_or(HookError::MissingHeader("X-Gogs-Event"))?;
        if event.is_empty() || event.len() > 64 || !event.bytes().all(|b| b.is_ascii_lowercase() || b == b'_') {
            return Err(HookError::MalformedHeader("X-Gogs-Event"));
        }
        tracing::Span::current().record("delivery_id", delivery_id).record("event", event);

        let payload = signed_payload(incoming.content_type, incoming.body)?;
        let secret = hook.secret.read().await.map_err(|e| HookError::Secret(e.to_string()))?;
        verify_signature(secret.expose_secret().as_bytes(), &payload, signature)?;

        let delivery = payload::parse(event, &payload)?;
        let repository = delivery.repository.clone().unwrap_or_default();
        if !hook.repositories.iter().any(|pattern| pattern.matches(&repository)) {
            return Err(HookError::RepositoryNotAccepted(repository));
        }
        let acted_on = payload::ACTED_ON.contains(&event);

        // The token is signed before the row is written so the row can carry its fingerprint;
        // it leaves the broker only after the row committed, and never if the id was seen before.
        let wants_token = acted_on && (hook.respond_with_token || hook.forward_url.is_some());
        let token = match wants_token {
            true => Some(self.mint_token(incoming.hook, delivery_id, event, &delivery, received_at).await?),
            false => None,
        };
        let record = DeliveryRecord {
            delivery_id: delivery_id.to_owned(),
            hook: incoming.hook.to_owned(),
            event: event.to_owned(),
            acted_on,
            repository: delivery.repository.clone(),
            git_ref: delivery.git_ref.clone(),
            ref_type: delivery.ref_type.clone(),
            before_sha: delivery.before.clone(),
            after_sha: delivery.after.clone(),
            pusher: delivery.pusher.clone(),
            payload_sha256: sha256_hex(&payload),
            received_at,
            token_sha256: token.as_ref().map(|(token, _)| sha256_hex(token.expose_secret().as_bytes())),
            token_expires_at: token.as_ref().map(|(_, expires_at)| *expires_at),
            forward_url: hook.forward_url.as_ref().filter(|_| acted_on).map(|url| url.to_string()),
        };
        if deliveries::record_delivery(store, &record).await? == Recorded::Duplicate {
            return Err(HookError::Replayed(delivery_id.to_owned()));
        }
        tracing::info!(repository = %repository, git_ref = delivery.git_ref.as_deref().unwrap_or_default(), acted_on, "Gogs delivery accepted");

        let forward_status = match (&hook.forward_url, &token) {
            (Some(url), Some((token, expires_at))) => {
                let status = self.forward(url, &record, token, *expires_at, &payload).await;
                if let Err(error) = deliveries::record_forward_status(store, delivery_id, &status).await {
                    tracing::error!(%error, forward_status = %status, "forward status not recorded");
                }
                Some(status)
            }
            _ => None,
        };
        Ok(Received {
            delivery_id: delivery_id.to_owned(),
            event: event.to_owned(),
            acted_on,
            token_for_response: token.filter(|_| hook.respond_with_token),
            forward_status,
        })
    }

    async fn mint_token(
        &self,
        hook: &str,
        delivery_id: &str,
        event: &str,
        delivery: &payload::Delivery,
        now: OffsetDateTime,
    ) -> Result<(SecretString, OffsetDateTime), HookError> {
        let expires_at = now + self.config.token_lifetime.as_duration();
        let repository = delivery.repository.as_deref().unwrap_or_default();
        let git_ref = delivery.git_ref.as_deref().unwrap_or_default();
        let claims = json!({
            "iss": self.issuer_url,
            "aud": self.audience,
            "sub": format!("repo:{repository}:ref:{git_ref}"),
            "iat": now.unix_timestamp(),
            "nbf": now.unix_timestamp(),
            "exp": expires_at.unix_timestamp(),
            // The delivery id: one delivery, one token, and replay protection per role keys on it.
            "jti": delivery_id,
            "repository": repository,
            "ref": git_ref,
            "ref_type": delivery.ref_type.as_deref().unwrap_or_default(),
            "sha": delivery.after.as_deref().unwrap_or_default(),
            "pusher": delivery.pusher.as_deref().unwrap_or_default(),
            "event": event,
            "delivery_id": delivery_id,
            "hook": hook,
        });
        let signed = self.signer.sign(&claims).await.map_err(|e| HookError::Signing(e.to_string()))?;
        Ok((SecretString::from(signed.token), expires_at))
    }

    /// POSTs the delivery and its token to the automation (see the README's Gogs section).
    async fn forward(&self, url: &url::Url, record: &DeliveryRecord, token: &SecretString, expires_at: OffsetDateTime, payload: &[u8]) -> String {
        let original: Value = serde_json::from_slice(payload).unwrap_or(Value::Null);
        let body = json!({
            "delivery_id": record.delivery_id,
            "hook": record.hook,
            "event": record.event,
            "repository": record.repository,
            "ref": record.git_ref,
            "ref_type": record.ref_type,
            "before": record.before_sha,
            "after": record.after_sha,
            "pusher": record.pusher,
            "delivery_token": token.expose_secret(),
            "delivery_token_expires_at": expires_at.format(&time::format_description::well_known::Rfc3339).unwrap_or_default(),
            "payload": original,
        });
        match self.client.post(url.clone()).header(DELIVERY_TOKEN_HEADER, token.expose_secret()).json(&body).send().await {
            Ok(response) => response.status().as_u16().to_string(),
            // reqwest's error names the URL, never the body.
            Err(error) => format!("error: {error}"),
        }
    }

    /// Whether a token claims to be one of ours (read unverified, only to route it).
    pub fn issued(&self, token: &str) -> bool {
        crate::oidc::Verifier::claimed_issuer(token).is_some_and(|iss| iss == self.issuer_url)
    }

    /// Verifies a delivery token against our own keys, with the same rules as any issuer.
    pub fn verify_token(&self, token: &str, now: OffsetDateTime) -> Result<VerifiedToken, VerifyError> {
        if token.len() > crate::oidc::MAX_TOKEN_BYTES {
            return Err(VerifyError::TooLarge);
        }
        crate::oidc::reject_critical_extensions(token)?;
        let header = jsonwebtoken::decode_header(token).map_err(|e| VerifyError::Malformed(e.to_string()))?;
        let kid = header.kid.ok_or_else(|| VerifyError::Malformed("header has no `kid`".into()))?;
        let keys = self.signer.published_keys();
        let jwk = keys.iter().find(|key| key.common.key_id.as_deref() == Some(kid.as_str())).ok_or_else(|| VerifyError::UnknownKey(kid.chars().take(128).collect()))?;
        let key = DecodingKey::from_jwk(jwk).map_err(|e| VerifyError::Invalid(e.to_string()))?;
        if !matches!(header.alg, jsonwebtoken::Algorithm::RS256 | jsonwebtoken::Algorithm::ES256) {
            return Err(VerifyError::DisallowedAlgorithm(format!("{:?}", header.alg)));
        }
        let mut validation = Validation::new(header.alg);
        validation.set_issuer(&[&self.issuer_url]);
        validation.set_audience(&[&self.audience]);
        // The broker mints every delivery token with `nbf`.
        validation.set_required_spec_claims(&["iss", "aud", "exp", "sub", "jti", "nbf"]);
        validation.leeway = self.leeway_seconds;
        validation.validate_nbf = true;
        let claims = jsonwebtoken::decode::<Map<String, Value>>(token, &key, &validation)
            .map_err(|e| match e.into_kind() {
                jsonwebtoken::errors::ErrorKind::InvalidSignature => VerifyError::BadSignature,
                jsonwebtoken::errors::ErrorKind::ExpiredSignature => VerifyError::Expired,
                jsonwebtoken::errors::ErrorKind::ImmatureSignature => VerifyError::NotYetValid,
                jsonwebtoken::errors::ErrorKind::InvalidAudience => VerifyError::WrongAudience(self.audience.clone()),
                other => VerifyError::Invalid(format!("{other:?}")),
            })?
            .claims;
        let text = |name: &str| claims.get(name).and_then(Value::as_str).filter(|v| !v.is_empty()).map(str::to_owned).ok_or_else(|| VerifyError::MissingClaim(name.into()));
        let expires_at = claims.get("exp").and_then(Value::as_i64).ok_or_else(|| VerifyError::MissingClaim("exp".into()))?;
        let job_deadline = OffsetDateTime::from_unix_timestamp(expires_at).map_err(|_| VerifyError::Invalid("`exp` is out of range".into()))?;
        if claims.get("iat").and_then(Value::as_i64).is_some_and(|iat| iat > now.unix_timestamp() + self.leeway_seconds as i64) {
            return Err(VerifyError::IssuedInFuture);
        }
        Ok(VerifiedToken {
            issuer: self.issuer_name.clone(),
            subject: text("sub")?,
            jti: text("jti")?,
            job_deadline,
            token_sha256: sha256_hex(token.as_bytes()),
            claims,
        })
    }

    pub fn hooks(&self) -> &BTreeMap<String, HookConfig> {
        &self.config.hooks
    }
}

/// The bytes Gogs signed: the body of a JSON delivery, the `payload` field of a form one.
fn signed_payload(content_type: Option<&str>, body: &[u8]) -> Result<Vec<u8>, HookError> {
    let media_type = content_type.unwrap_or("application/json").split(';').next().unwrap_or_default().trim().to_ascii_lowercase();
    match media_type.as_str() {
        "application/json" => Ok(body.to_vec()),
        "application/x-www-form-urlencoded" => form_urlencoded::parse(body)
            .find(|(name, _)| name == "payload")
            .map(|(_, value)| value.into_owned().into_bytes())
            .ok_or(HookError::MissingFormPayload),
        other => Err(HookError::UnsupportedContentType(other.chars().take(64).collect())),
    }
}

/// Lowercase hex HMAC-SHA256, compared in constant time by the `hmac` crate.
fn verify_signature(secret: &[u8], payload: &[u8], signature: &str) -> Result<(), HookError> {
    let signature = signature.trim();
    if signature.len() != 64 || !signature.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
        return Err(HookError::BadSignature);
    }
    let expected = hex::decode(signature).map_err(|_| HookError::BadSignature)?;
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC accepts keys of any length");
    mac.update(payload);
    mac.verify_slice(&expected).map_err(|_| HookError::BadSignature)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_must_be_lowercase_hex_hmac_of_the_payload() {
        // RFC 4231 test case 2: key "Jefe", data "what do ya want for nothing?".
        let good = "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843";
        verify_signature(b"Jefe", b"what do ya want for nothing?", good).unwrap();
        assert!(verify_signature(b"Jefe", b"what do ya want for nothing!", good).is_err());
        assert!(verify_signature(b"Jefe", b"what do ya want for nothing?", &good.to_uppercase()).is_err());
        assert!(verify_signature(b"Jefe", b"what do ya want for nothing?", &format!("sha256={good}")).is_err());
        assert!(verify_signature(b"Jefe", b"what do ya want for nothing?", "").is_err());
    }

    #[test]
    fn form_deliveries_sign_the_payload_field() {
        let body = b"payload=%7B%22a%22%3A1%7D";
        assert_eq!(signed_payload(Some("application/x-www-form-urlencoded"), body).unwrap(), br#"{"a":1}"#);
        assert!(signed_payload(Some("application/x-www-form-urlencoded"), b"other=1").is_err());
        assert!(signed_payload(Some("text/plain"), b"{}").is_err());
        assert_eq!(signed_payload(Some("application/json; charset=utf-8"), b"{}").unwrap(), b"{}");
    }
}
