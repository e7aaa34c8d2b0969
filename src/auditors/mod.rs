//! The security team reading the log: `GET /v1/issuances` and `GET /v1/issuances/{id}`.
//! The caller proves who they are with an OIDC token; `[auditors]` in the policy decides
//! whether they may read. Every read is recorded (an `audit_read` row with the filters) before
//! any row is returned, and every refusal as a `denied` row.

pub mod csv;
pub mod links;

use time::OffsetDateTime;
use uuid::Uuid;

use crate::audit::Decision;
use crate::broker::{Broker, Caller, ExchangeError, ExchangeFailure, ExchangeInput};

/// A read that was allowed and recorded.
#[derive(Debug, Clone)]
pub struct AuditRead {
    /// The `audit_read` row.
    pub id: Uuid,
    /// `issuer:subject (user login)`, as the row names the reader.
    pub reader: String,
    /// When the reader's token expires: a browser session on `/audit` ends then.
    pub token_expires_at: OffsetDateTime,
}

/// Verifies the caller, checks `[auditors]` and records the read (`what`: the request, with its
/// filters).
pub async fn authorize_read(broker: &Broker, input: &ExchangeInput<'_>, what: &str) -> Result<AuditRead, ExchangeFailure> {
    let caller = broker.identify_caller(input, "audit_log", OffsetDateTime::now_utc()).await?;
    if let Err(denial) = broker.policies.authorize_auditor(&caller.token.issuer, &caller.token.claims) {
        return Err(caller.forbid(broker, what, "read the audit log", "auditors", denial).await);
    }
    let Caller { name: reader, mut event, slot, token } = caller;
    let id = event.id;
    event.decision = Decision::AuditRead;
    event.detail = Some(format!("{reader}: {what}"));
    broker
        .audit
        .record_in(slot, event)
        .await
        .map_err(|error| ExchangeFailure { issuance_id: id, error: ExchangeError::AuditUnavailable(error) })?;
    Ok(AuditRead { id, reader, token_expires_at: token.job_deadline })
}
