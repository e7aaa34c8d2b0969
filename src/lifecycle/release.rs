//! A job ending its own credentials early (`DELETE /v1/credentials/{issuance_id}`, used by
//! `credbroker exec` when its command exits). The job proves it is the holder by presenting
//! the same job token the credential was issued for: the issued row keeps its SHA-256.

use serde_json::{json, Value};
use time::OffsetDateTime;
use uuid::Uuid;

use crate::audit::RevocationReason;
use crate::broker::{rfc3339, Broker, ExchangeError, ExchangeFailure, ExchangeInput};
use crate::types::BackendName;

pub async fn release(broker: &Broker, input: ExchangeInput<'_>, issuance: &str) -> Result<Value, ExchangeFailure> {
    let now = OffsetDateTime::now_utc();
    let fail = |issuance_id: Uuid, error: ExchangeError| ExchangeFailure { issuance_id, error };
    let issuance_id = Uuid::parse_str(issuance).map_err(|_| fail(Uuid::nil(), ExchangeError::InvalidRequest(format!("{issuance:?} is not an issuance id"))))?;
    let token = broker.verify(&input, now).await.map_err(|error| fail(issuance_id, error))?;
    let store = broker.audit.store();
    let issued = store.issued_credential(issuance_id).await.map_err(|e| fail(issuance_id, ExchangeError::AuditUnavailable(e)))?;
    // Someone else's issuance looks exactly like a missing one.
    let Some(issued) = issued.filter(|issued| issued.job_token_sha256.as_deref() == Some(token.token_sha256.as_str())) else {
        let reason = format!("no credential {issuance_id} was issued for this job token");
        return Err(fail(issuance_id, ExchangeError::AccessDenied { role: String::new(), reason, client_may_see: true }));
    };
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
    store
        .schedule_revocation(issuance_id, backend_name, handle, now, RevocationReason::ExecExit, Some(&format!("{}:{}", token.issuer, token.subject)), None)
        .await
        .map_err(|e| fail(issuance_id, ExchangeError::AuditUnavailable(e)))?;
    let attempts = broker.lifecycle.revoke_due(&broker.audit, &broker.backends, Some(&[issuance_id])).await.map_err(|e| fail(issuance_id, ExchangeError::AuditUnavailable(e)))?;
    broker.lifecycle.wake();
    let outcome = match attempts.first().map(|attempt| &attempt.result) {
        Some(Ok(())) => "revoked",
        Some(Err(_)) => "revoke_failed",
        None => "pending",
    };
    Ok(json!({ "issuance_id": issuance_id, "outcome": outcome }))
}
