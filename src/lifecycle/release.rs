//! A job ending its own credentials early (`DELETE /v1/credentials/{issuance_id}`, used by
//! `credbroker exec` when a renewal supersedes a credential and when its command exits). The
//! job proves it is the holder by presenting the same job token the credential was issued
//! for: the issued row keeps its SHA-256. A refused request (401, 403, 400) writes a `denied`
//! row, like a refused exchange.
//!
//! The body is optional: `{"superseded_by": "<issuance id>"}` says a renewal replaced the
//! credential (the revocation's reason is then `superseded` rather than `exec_exit`).

use serde::Deserialize;
use serde_json::{json, Value};
use time::OffsetDateTime;
use uuid::Uuid;

use crate::audit::{AuditEvent, Decision, RevocationReason};
use crate::broker::{rfc3339, Broker, ExchangeError, ExchangeFailure, ExchangeInput};
use crate::types::BackendName;

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
    let mut event = AuditEvent::new(Uuid::new_v4(), Decision::Denied, now, input.request_id);
    event.client_addr = input.client_addr.clone();
    event.user_agent = input.user_agent.clone();
    event.target = Some("release".into());
    let slot = broker.reserve_row(event.id)?;
    let token = match broker.verify(&input, now).await {
        Ok(token) => token,
        Err(error) => {
            event.detail = Some(format!("release of credential {issuance:?} refused: {error}"));
            return Err(broker.refuse_unattributed(slot, event, error).await);
        }
    };
    event.issuer = Some(token.issuer.to_string());
    event.subject = Some(token.subject.clone());
    event.job_token_sha256 = Some(token.token_sha256.clone());
    event.claims = Some(token.claims.clone());
    event.job_deadline = Some(token.job_deadline);
    let requested_by = format!("{}:{}", token.issuer, token.subject);
    let (issuance_id, request) = match (Uuid::parse_str(issuance), parse_body(input.body)) {
        (Ok(id), Ok(request)) => (id, request),
        (Err(_), _) => return Err(broker.refuse(slot, event, ExchangeError::InvalidRequest(format!("{issuance:?} is not an issuance id"))).await),
        (_, Err(error)) => return Err(broker.refuse(slot, event, error).await),
    };
    let unavailable = |e| ExchangeFailure { issuance_id, error: ExchangeError::AuditUnavailable(e) };
    let store = broker.audit.store();
    let issued = store.issued_credential(issuance_id).await.map_err(unavailable)?;
    // Someone else's issuance looks exactly like a missing one; the row says which it was.
    let Some(issued) = issued.filter(|issued| issued.job_token_sha256.as_deref() == Some(token.token_sha256.as_str())) else {
        let reason = format!("no credential {issuance_id} was issued for this job token");
        event.detail = Some(format!("release of credential {issuance_id} refused for {requested_by}: {reason}"));
        let error = ExchangeError::AccessDenied { role: String::new(), reason, client_may_see: true };
        return Err(broker.refuse(slot, event, error).await);
    };
    drop(slot);
    let backend = issued.backend.as_deref().and_then(|name| BackendName::parse(name).ok()).and_then(|name| broker.backends.get(&name));
    let (Some(backend_name), Some(handle), Some(true)) = (&issued.backend, &issued.handle, backend.map(|b| b.can_revoke())) else {
        return Ok(json!({
            "issuance_id": issuance_id,
            "outcome": "not_revocable",
            "valid_until": rfc3339(issued.expires_at),
        }));
    };
    if issued.revocation_state.as_deref() == Some("revoked") {
        return Ok(json!({ "issuance_id": issuance_id, "outcome": "already_revoked" }));
    }
    let (reason, requested_by) = match request.superseded_by {
        Some(by) => (RevocationReason::Superseded, format!("{requested_by}, superseded by issuance {by}")),
        None => (RevocationReason::ExecExit, requested_by),
    };
    store.schedule_revocation(issuance_id, backend_name, handle, now, reason, Some(&requested_by), None).await.map_err(unavailable)?;
    let attempts = broker.lifecycle.revoke_due(&broker.audit, &broker.backends, Some(&[issuance_id])).await.map_err(unavailable)?;
    broker.lifecycle.wake();
    let outcome = match attempts.first().map(|attempt| &attempt.result) {
        Some(Ok(())) => "revoked",
        Some(Err(_)) => "revoke_failed",
        None => "pending",
    };
    Ok(json!({ "issuance_id": issuance_id, "outcome": outcome }))
}
