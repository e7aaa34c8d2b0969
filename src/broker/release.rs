//! A job ending its own credentials early (`DELETE /v1/credentials/{issuance_id}`, used by
//! `credbroker exec` when a renewal supersedes a credential and when its command exits). The
//! job proves it is the holder by presenting the same job token the credential was issued
//! for: the issued row keeps its SHA-256. The request is an `admin_request` row naming the
//! issuance; a refused one (401, 403, 400) a `denied` row, like a refused exchange.
//!
//! The body is optional: `{"superseded_by": "<issuance id>"}` says a renewal replaced the
//! credential (the revocation's reason is then `superseded` rather than `exec_exit`).

use serde::Deserialize;
use serde_json::{json, Value};
use time::OffsetDateTime;
use uuid::Uuid;

use crate::audit::{AuditEvent, Decision, IssuedCredential, RevocationReason};
use super::{Broker, ExchangeError, ExchangeFailure, ExchangeInput};
use crate::types::{rfc3339, BackendName};

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ReleaseRequest {
    superseded_by: Option<Uuid>,
}

fn parse_body(body: &[u8]) -> Result<ReleaseRequest, ExchangeError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(ReleaseRequest::default());
    }
    serde_json::from_slice(body).map_err(|e| {
        ExchangeError::InvalidRequest(format!("the body is optional; when present it is {{\"superseded_by\": \"<issuance id>\"}}: {e}"))
    })
}

pub async fn release(broker: &Broker, input: ExchangeInput<'_>, issuance: &str) -> Result<Value, ExchangeFailure> {
    let now = OffsetDateTime::now_utc();
    let mut row = broker.open_row(&input, now, Some("release"))?;
    let decided = authorize(broker, &input, &mut row.event, issuance, now).await;
    let (issued, reason, requested_by) = broker.record(row, decided).await?;
    let issuance_id = issued.issuance_id();
    let unavailable = |e| ExchangeFailure { issuance_id, error: ExchangeError::AuditUnavailable(e) };
    let backend = issued.record.backend.as_deref().and_then(|name| BackendName::parse(name).ok()).and_then(|name| broker.backends.get(&name));
    let (Some(backend_name), Some(handle), Some(true)) = (&issued.record.backend, &issued.record.credential_handle, backend.map(|b| b.can_revoke())) else {
        return Ok(json!({
            "issuance_id": issuance_id,
            "outcome": "not_revocable",
            "valid_until": rfc3339(issued.expires_at),
        }));
    };
    if issued.revocation_state.as_deref() == Some("revoked") {
        return Ok(json!({ "issuance_id": issuance_id, "outcome": "already_revoked" }));
    }
    let store = broker.audit.store();
    store.schedule_revocation(issuance_id, backend_name, handle, now, reason, Some(&requested_by), None).await.map_err(unavailable)?;
    let attempts = broker.revoker.revoke_due(&broker.audit, &broker.backends, Some(&[issuance_id])).await.map_err(unavailable)?;
    broker.revoker.wake();
    let outcome = match attempts.first().map(|attempt| &attempt.result) {
        Some(Ok(())) => "revoked",
        Some(Err(_)) => "revoke_failed",
        None => "pending",
    };
    Ok(json!({ "issuance_id": issuance_id, "outcome": outcome }))
}

/// The caller must hold the job token the credential was issued for. Only then does the row
/// name the issuance (`about_issuance_id`): a refusal must not put a step into the history of
/// an issuance the caller does not hold.
async fn authorize(
    broker: &Broker,
    input: &ExchangeInput<'_>,
    event: &mut AuditEvent,
    issuance: &str,
    now: OffsetDateTime,
) -> Result<(IssuedCredential, RevocationReason, String), ExchangeError> {
    let token = match broker.identify(input, event, now).await {
        Ok(token) => token,
        Err(error) => {
            event.detail = Some(format!("release of credential {issuance:?} refused: {error}"));
            return Err(error);
        }
    };
    let requested_by = format!("{}:{}", token.issuer, token.subject);
    let issuance_id = Uuid::parse_str(issuance).map_err(|_| ExchangeError::InvalidRequest(format!("{issuance:?} is not an issuance id")))?;
    let request = parse_body(input.body)?;
    let issued = broker.audit.store().issued_credential(issuance_id).await.map_err(ExchangeError::AuditUnavailable)?;
    // Someone else's issuance looks exactly like a missing one; the row says which it was.
    let Some(issued) = issued.filter(|issued| issued.record.job_token_sha256.as_deref() == Some(token.token_sha256.as_str())) else {
        let reason = format!("no credential {issuance_id} was issued for this job token");
        event.detail = Some(format!("release of credential {issuance_id} refused for {requested_by}: {reason}"));
        return Err(ExchangeError::AccessDenied { role: String::new(), reason, client_may_see: true });
    };
    let (reason, requested_by) = match request.superseded_by {
        Some(by) => (RevocationReason::Superseded, format!("{requested_by}, superseded by issuance {by}")),
        None => (RevocationReason::ExecExit, requested_by),
    };
    event.about_issuance = Some(issuance_id);
    event.decision = Decision::AdminRequest;
    event.detail = Some(format!("release of credential {issuance_id} ({}) by {requested_by}", reason.as_str()));
    Ok((issued, reason, requested_by))
}
