//! Gogs-triggered automation. Gogs signs each webhook delivery with a per-hook secret
//! (`X-Gogs-Signature`: lowercase hex HMAC-SHA256 of the payload JSON) but issues no tokens, so
//! the broker verifies the delivery, records it, and mints a short-lived delivery token of its
//! own (issuer `<public_url>/gogs`, trusted under the reserved issuer name `gogs`) that roles
//! bind like any job token, alone or together with the automation's own identity token.
//!
//! [`Gogs::receive`] reads top to bottom: reserve the audit row → check and claim the
//! delivery (`Gogs::accept`, which records nothing) → write the one audit row
//! (`Gogs::settle`) → only then hand the token over (forward or response).

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
use time::OffsetDateTime;
use uuid::Uuid;

pub use config::{GogsConfig, HookConfig};

use crate::audit::deliveries::{self, DeliveryRecord, Recorded};
use crate::audit::{log_unrecorded, Audit, AuditError, AuditEvent, AuditSlot, Decision, PgAudit};
use crate::signing::{JwtClaims, Signer};
use crate::types::ErrorCode;
use crate::oidc::{VerifiedToken, VerifyError};
use crate::types::{rfc3339, sha256_hex, IssuerName};

pub use crate::types::{DELIVERY_CLAIMS, GOGS_ISSUER_NAME};
/// Where a role that needs both identities expects the delivery token.
pub const DELIVERY_TOKEN_HEADER: &str = "x-credbroker-delivery";

#[derive(Debug, thiserror::Error)]
pub enum HookError {
    #[error("no Gogs hook named {0:?} is configured")]
    UnknownHook(String),
    #[error("request body exceeds {0} bytes (max_payload_bytes)")]
    TooLarge(usize),
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
    #[error("this payload was already accepted by this hook as delivery {first_delivery_id}; delivery {delivery_id} repeats it")]
    PayloadReplayed { delivery_id: String, first_delivery_id: String },
    #[error("the hook's secret cannot be read: {0}")]
    Secret(String),
    #[error("cannot sign the delivery token: {0}")]
    Signing(String),
    #[error(transparent)]
    Audit(#[from] AuditError),
    #[error("the broker is at capacity: {0}; redeliver shortly")]
    Overloaded(#[source] AuditError),
}

impl HookError {
    pub fn code(&self) -> ErrorCode {
        match self {
            HookError::UnknownHook(_) => ErrorCode::NotFound,
            HookError::TooLarge(_) => ErrorCode::PayloadTooLarge,
            HookError::UnsupportedContentType(_) => ErrorCode::UnsupportedMediaType,
            HookError::MissingHeader(_) | HookError::MalformedHeader(_) | HookError::MissingFormPayload | HookError::Payload(_) => {
                ErrorCode::InvalidRequest
            }
            HookError::Unsigned | HookError::BadSignature => ErrorCode::InvalidSignature,
            HookError::RepositoryNotAccepted(_) => ErrorCode::AccessDenied,
            HookError::Replayed(_) | HookError::PayloadReplayed { .. } => ErrorCode::DeliveryReplayed,
            HookError::Secret(_) | HookError::Signing(_) => ErrorCode::BackendFailed,
            HookError::Audit(_) => ErrorCode::AuditUnavailable,
            HookError::Overloaded(_) => ErrorCode::RateLimited,
        }
    }

    /// The broker's own failure rather than the delivery's fault.
    pub fn is_server_side(&self) -> bool {
        matches!(self, HookError::Secret(_) | HookError::Signing(_) | HookError::Audit(_) | HookError::Overloaded(_))
    }
}

/// The transport-level parts of a delivery, as the HTTP edge found them. Owned, so that
/// handling can run to its end on a task of its own.
pub struct IncomingDelivery {
    pub hook: String,
    pub request_id: String,
    pub client_addr: Option<String>,
    pub user_agent: Option<String>,
    pub delivery_id: Option<String>,
    pub event: Option<String>,
    pub signature: Option<String>,
    pub content_type: Option<String>,
    /// `None` when the body was longer than [`Gogs::max_payload_bytes`].
    pub body: Option<Vec<u8>>,
}

/// What happened to an accepted delivery.
pub struct Received {
    /// The delivery's row in `audit_events`.
    pub audit_id: Uuid,
    pub delivery_id: String,
    pub event: String,
    pub acted_on: bool,
    /// The delivery token and its end, when the hook returns it in the response.
    pub token_for_response: Option<(SecretString, OffsetDateTime)>,
    /// The automation's HTTP status (or the error) when the hook forwards deliveries.
    pub forward_status: Option<String>,
}

/// A refused delivery and the id of its audit row (absent when the row was aggregated with
/// other unattributed refusals, or could not be written).
#[derive(Debug)]
pub struct Refused {
    pub audit_id: Uuid,
    pub error: HookError,
}

/// A delivery that passed every check and is claimed, but not yet recorded in the audit log.
struct Accepted<'a> {
    hook: &'a HookConfig,
    record: DeliveryRecord,
    acted_on: bool,
    token: Option<(SecretString, OffsetDateTime)>,
    payload: Vec<u8>,
}

/// The audit row of a delivery, filled in as its checks pass.
struct Facts {
    row: AuditEvent,
    /// The signature matched: from here on the row names a verified delivery, and a refusal is
    /// written in full instead of sharing the unattributed budget.
    signed: bool,
    /// How the row's detail names the delivery.
    summary: String,
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

    /// Checks, records and acts on one delivery: every delivery, accepted or refused, gets
    /// exactly one audit row, written here and nowhere else.
    #[tracing::instrument(skip_all, fields(hook = %incoming.hook, delivery_id, event))]
    pub async fn receive(&self, incoming: IncomingDelivery, audit: &Audit) -> Result<Received, Refused> {
        let received_at = OffsetDateTime::now_utc();
        let mut row = AuditEvent::new(crate::audit::new_row_id(), Decision::Denied, received_at, &incoming.request_id);
        row.issuer = Some(GOGS_ISSUER_NAME.to_owned());
        row.backend = Some(GOGS_ISSUER_NAME.to_owned());
        row.target = Some(GOGS_ISSUER_NAME.to_owned());
        row.client_addr = incoming.client_addr.clone();
        row.user_agent = incoming.user_agent.clone();
        // The row's place is taken first, so an overloaded broker refuses before any work.
        let slot = match audit.reserve() {
            Ok(slot) => slot,
            Err(error @ AuditError::Overloaded { .. }) => {
                let error = HookError::Overloaded(error);
                row.code = Some(error.code().as_str().to_owned());
                audit.count_refused(&row);
                return Err(Refused { audit_id: row.id, error });
            }
            Err(error) => return Err(Refused { audit_id: row.id, error: HookError::Audit(error) }),
        };
        let mut facts = Facts { row, signed: false, summary: delivery_summary(&incoming) };
        let result = self.accept(&incoming, &mut facts, audit.store(), received_at).await;
        self.settle(audit, slot, facts, result).await
    }

    /// The checks, in order; nothing is acted on before the signature matched and the delivery
    /// and its payload were claimed for the first time. Records nothing in the audit log.
    async fn accept<'h>(&'h self, incoming: &IncomingDelivery, facts: &mut Facts, store: &PgAudit, received_at: OffsetDateTime) -> Result<Accepted<'h>, HookError> {
        let hook_name = incoming.hook.as_str();
        let hook = self.config.hooks.get(hook_name).ok_or_else(|| HookError::UnknownHook(hook_name.chars().take(64).collect()))?;
        let body = incoming.body.as_deref().ok_or(HookError::TooLarge(self.config.max_payload_bytes))?;
        let signature = incoming.signature.as_deref().filter(|s| !s.is_empty()).ok_or(HookError::Unsigned)?;
        let delivery_id = incoming.delivery_id.as_deref().ok_or(HookError::MissingHeader("X-Gogs-Delivery"))?;
        if delivery_id.is_empty() || delivery_id.len() > 128 || !delivery_id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
            return Err(HookError::MalformedHeader("X-Gogs-Delivery"));
        }
        let event = incoming.event.as_deref().ok_or(HookError::MissingHeader("X-Gogs-Event"))?;
        if event.is_empty() || event.len() > 64 || !event.bytes().all(|b| b.is_ascii_lowercase() || b == b'_') {
            return Err(HookError::MalformedHeader("X-Gogs-Event"));
        }
        tracing::Span::current().record("delivery_id", delivery_id).record("event", event);

        let payload = signed_payload(incoming.content_type.as_deref(), body)?;
        let secret = hook.secret.read().await.map_err(|e| HookError::Secret(e.to_string()))?;
        verify_signature(secret.expose_secret().as_bytes(), &payload, signature)?;

        // Signed from here on: the row names the delivery. The headers are not signed, so the
        // event is trusted only once the payload's shape agrees with it (payload::parse).
        let payload_sha256 = sha256_hex(&payload);
        facts.signed = true;
        let claims = std::sync::Arc::make_mut(facts.row.claims.insert(Default::default()));
        claims.insert("hook".into(), json!(hook_name));
        claims.insert("delivery_id".into(), json!(delivery_id));
        claims.insert("event".into(), json!(event));
        claims.insert("payload_sha256".into(), json!(payload_sha256));
        let delivery = payload::parse(event, &payload)?;
        for (name, value) in delivery_claims(&delivery) {
            if let Some(value) = value {
                claims.insert(name.into(), json!(value));
            }
        }
        let repository = delivery.repository.clone().unwrap_or_default();
        facts.row.subject = delivery.repository.as_ref().map(|_| subject(&delivery));
        if !hook.repositories.iter().any(|pattern| pattern.matches(&repository)) {
            return Err(HookError::RepositoryNotAccepted(repository));
        }
        let acted_on = payload::ACTED_ON.contains(&event);

        // The token is signed before the delivery is claimed so both rows can carry its
        // fingerprint; it leaves the broker only after the audit row committed.
        let wants_token = acted_on && (hook.respond_with_token || hook.forward_url.is_some());
        let token = match wants_token {
            true => Some(self.mint_token(hook_name, delivery_id, event, &delivery, received_at).await?),
            false => None,
        };
        let record = DeliveryRecord {
            delivery_id: delivery_id.to_owned(),
            audit_id: facts.row.id,
            hook: hook_name.to_owned(),
            event: event.to_owned(),
            acted_on,
            repository: delivery.repository.clone(),
            git_ref: delivery.git_ref.clone(),
            ref_type: delivery.ref_type.clone(),
            before_sha: delivery.before.clone(),
            after_sha: delivery.after.clone(),
            pusher: delivery.pusher.clone(),
            payload_sha256,
            received_at,
            token_sha256: token.as_ref().map(|(token, _)| sha256_hex(token.expose_secret().as_bytes())),
            token_expires_at: token.as_ref().map(|(_, expires_at)| *expires_at),
            forward_url: hook.forward_url.as_ref().filter(|_| acted_on).map(|url| url.to_string()),
        };
        match deliveries::record_delivery(store.pool(), &record).await? {
            Recorded::New => {}
            Recorded::DuplicateDelivery => return Err(HookError::Replayed(delivery_id.to_owned())),
            Recorded::DuplicatePayload { first_delivery_id } => {
                return Err(HookError::PayloadReplayed { delivery_id: delivery_id.to_owned(), first_delivery_id })
            }
        }
        Ok(Accepted { hook, record, acted_on, token, payload })
    }

    /// The one place a delivery's audit row is written. An accepted delivery's row commits
    /// before its token is forwarded or returned; if it cannot be written the delivery is
    /// withdrawn, so nothing was handed out and Gogs may redeliver it. Refusals of deliveries
    /// whose signature did not match share the unattributed budget (see `Audit::record_unattributed`).
    async fn settle(&self, audit: &Audit, slot: AuditSlot, facts: Facts, result: Result<Accepted<'_>, HookError>) -> Result<Received, Refused> {
        let Facts { mut row, signed, summary } = facts;
        let audit_id = row.id;
        let accepted = match result {
            Ok(accepted) => accepted,
            Err(error) => {
                let (decision, outcome) = match error.is_server_side() {
                    true => (Decision::Failed, "failed"),
                    false => (Decision::Denied, "refused"),
                };
                row.decision = decision;
                row.code = Some(error.code().as_str().to_owned());
                row.detail = Some(format!("{summary}{outcome}: {error}"));
                let written = match signed {
                    true => audit.record_in(slot, row.clone()).await,
                    false => audit.record_unattributed(slot, row.clone()).await,
                };
                if let Err(audit_error) = written {
                    log_unrecorded(&row, &audit_error);
                }
                match decision {
                    Decision::Failed => tracing::error!(code = error.code().as_str(), %error, "Gogs delivery failed"),
                    _ => tracing::warn!(code = error.code().as_str(), %error, "Gogs delivery refused"),
                }
                return Err(Refused { audit_id, error });
            }
        };
        let Accepted { hook, record, acted_on, token, payload } = accepted;
        let what = match (&token, acted_on) {
            (Some(_), _) => {
                row.decision = Decision::Issued;
                "accepted: delivery token minted"
            }
            (None, true) => {
                row.decision = Decision::Recorded;
                "accepted: recorded only (the hook neither forwards nor returns tokens)"
            }
            (None, false) => {
                row.decision = Decision::Recorded;
                "recorded and ignored (the broker does not act on this event)"
            }
        };
        row.detail = Some(format!("{summary}{what}"));
        if let Some((secret, expires_at)) = &token {
            row.credential_sha256 = Some(sha256_hex(secret.expose_secret().as_bytes()));
            row.expires_at = Some(*expires_at);
            row.granted_ttl_seconds = Some(self.config.token_lifetime.seconds());
        }
        if let Err(audit_error) = audit.record_in(slot, row.clone()).await {
            log_unrecorded(&row, &audit_error);
            if let Err(error) = deliveries::withdraw_delivery(audit.store().pool(), &record.delivery_id).await {
                tracing::error!(%error, "delivery not withdrawn: Gogs' redelivery of it will be refused as a replay");
            }
            return Err(Refused { audit_id, error: HookError::Audit(audit_error) });
        }
        tracing::info!(
            repository = record.repository.as_deref().unwrap_or_default(),
            git_ref = record.git_ref.as_deref().unwrap_or_default(),
            acted_on,
            "Gogs delivery accepted"
        );

        let forward_status = match (&hook.forward_url, &token) {
            (Some(url), Some((token, expires_at))) => {
                let status = self.forward(url, &record, token, *expires_at, &payload).await;
                if let Err(error) = deliveries::record_forward_status(audit.store().pool(), &record.delivery_id, &status).await {
                    tracing::error!(%error, forward_status = %status, "forward status not recorded");
                }
                Some(status)
            }
            _ => None,
        };
        Ok(Received {
            audit_id,
            delivery_id: record.delivery_id,
            event: record.event,
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
        let mut claims = json!({
            "iss": self.issuer_url,
            "aud": self.audience,
            "sub": subject(delivery),
            "iat": now.unix_timestamp(),
            "nbf": now.unix_timestamp(),
            "exp": expires_at.unix_timestamp(),
            // The delivery id: one delivery, one token, and replay protection per role keys on it.
            "jti": delivery_id,
            "event": event,
            "delivery_id": delivery_id,
            "hook": hook,
        });
        for (name, value) in delivery_claims(delivery) {
            claims[name] = json!(value.unwrap_or_default());
        }
        let signed = self.signer.sign(&JwtClaims::new(&claims)).await.map_err(|e| HookError::Signing(e.to_string()))?;
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
            "delivery_token_expires_at": rfc3339(expires_at),
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
        let header = crate::oidc::decode_header(token)?;
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
            claims: std::sync::Arc::new(claims.into()),
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

/// The delivery token's `sub`, and the audit row's subject.
fn subject(delivery: &payload::Delivery) -> String {
    let repository = delivery.repository.as_deref().unwrap_or_default();
    match &delivery.git_ref {
        Some(git_ref) => format!("repo:{repository}:ref:{git_ref}"),
        None => format!("repo:{repository}"),
    }
}

/// What the payload says, as the delivery token's claims and the audit row's claims name it.
fn delivery_claims(delivery: &payload::Delivery) -> [(&'static str, Option<&str>); 5] {
    [
        ("repository", delivery.repository.as_deref()),
        ("ref", delivery.git_ref.as_deref()),
        ("ref_type", delivery.ref_type.as_deref()),
        ("sha", delivery.after.as_deref()),
        ("pusher", delivery.pusher.as_deref()),
    ]
}

/// How a row's detail names the delivery. Before the signature matched these are only what
/// the request claimed, quoted and cut short.
fn delivery_summary(incoming: &IncomingDelivery) -> String {
    let quoted = |value: Option<&str>| value.map_or_else(|| "(none)".to_owned(), |v| format!("{:?}", v.chars().take(64).collect::<String>()));
    format!(
        "Gogs delivery {} (event {}) to hook {}: ",
        quoted(incoming.delivery_id.as_deref()),
        quoted(incoming.event.as_deref()),
        quoted(Some(&incoming.hook))
    )
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
