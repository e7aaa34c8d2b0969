//! The security team reading the log: `GET /v1/issuances` and `GET /v1/issuances/{id}`.
//! The caller proves who they are with an OIDC token; `[auditors]` in the policy decides
//! whether they may read. Every read is recorded (an `audit_read` row with the filters) before
//! any row is returned, and every refusal as a `denied` row.

use time::OffsetDateTime;
use uuid::Uuid;

use crate::audit::Decision;
use super::{Broker, ExchangeError, ExchangeFailure, ExchangeInput};

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
    let now = OffsetDateTime::now_utc();
    let mut row = broker.open_row(input, now, Some("audit_log"))?;
    let id = row.event.id;
    let decided: Result<AuditRead, ExchangeError> = async {
        let caller = broker.identify_caller(input, &mut row.event, now).await?;
        if let Err(denial) = broker.policies.current().authorize_auditor(&caller.token.issuer, &*caller.token.claims) {
            return Err(caller.forbidden(&mut row.event, what, "read the audit log", "auditors", denial));
        }
        row.event.decision = Decision::AuditRead;
        row.event.detail = Some(format!("{}: {what}", caller.name));
        Ok(AuditRead { id, reader: caller.name, token_expires_at: caller.token.job_deadline })
    }
    .await;
    broker.record(row, decided).await
}
