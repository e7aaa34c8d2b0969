//! The security team reading the log: `GET /v1/issuances` and `GET /v1/issuances/{id}`.
//! The caller proves who they are with an OIDC token; `[auditors]` in the policy decides
//! whether they may read. Every read is recorded (an `audit_read` row with the filters) before
//! any row is returned, and every refusal as a `denied` row.

pub mod csv;

use time::OffsetDateTime;
use uuid::Uuid;

use crate::audit::Decision;
use crate::broker::{Broker, Caller, ExchangeError, ExchangeFailure, ExchangeInput};

/// Verifies the caller, checks `[auditors]` and records the read (`what`: the request, with its
/// filters). Returns the id of the `audit_read` row.
pub async fn authorize_read(broker: &Broker, input: &ExchangeInput<'_>, what: &str) -> Result<Uuid, ExchangeFailure> {
    let caller = broker.identify_caller(input, "audit_log", OffsetDateTime::now_utc()).await?;
    if let Err(denial) = broker.policies.authorize_auditor(&caller.token.issuer, &caller.token.claims) {
        return Err(caller.forbid(broker, what, "read the audit log", "auditors", denial).await);
    }
    let Caller { name: reader, mut event, slot, .. } = caller;
    let id = event.id;
    event.decision = Decision::AuditRead;
    event.detail = Some(format!("{reader}: {what}"));
    broker
        .audit
        .record_in(slot, event)
        .await
        .map_err(|error| ExchangeFailure { issuance_id: id, error: ExchangeError::AuditUnavailable(error) })?;
    Ok(id)
}
