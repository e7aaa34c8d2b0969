//! The security team reading the log: `GET /v1/issuances` and `GET /v1/issuances/{id}`.
//! The caller proves who they are with an OIDC token; `[auditors]` in the policy decides
//! whether they may read. Every read is recorded (an `audit_read` row with the filters) before
//! any row is returned, and every refusal as a `denied` row.

pub mod csv;

use time::OffsetDateTime;
use uuid::Uuid;

use crate::audit::{AuditError, AuditEvent, Decision};
use crate::broker::{Broker, ExchangeError, ExchangeFailure, ExchangeInput};

/// Verifies the caller, checks `[auditors]` and records the read (`what`: the request, with its
/// filters). Returns the id of the `audit_read` row.
pub async fn authorize_read(broker: &Broker, input: &ExchangeInput<'_>, what: &str) -> Result<Uuid, ExchangeFailure> {
    let now = OffsetDateTime::now_utc();
    let id = Uuid::new_v4();
    let mut event = AuditEvent::new(id, Decision::Denied, now, input.request_id);
    event.client_addr = input.client_addr.clone();
    event.user_agent = input.user_agent.clone();
    event.target = Some("audit_log".to_owned());
    let slot = broker.audit.reserve().map_err(|error| {
        let error = match error {
            AuditError::Overloaded { .. } => ExchangeError::Overloaded(error),
            error => ExchangeError::AuditUnavailable(error),
        };
        ExchangeFailure { issuance_id: id, error }
    })?;
    let token = match broker.verify(input, now).await {
        Ok(token) => token,
        Err(error) => return Err(broker.refuse_unattributed(slot, event, error).await),
    };
    event.issuer = Some(token.issuer.to_string());
    event.subject = Some(token.subject.clone());
    event.job_token_sha256 = Some(token.token_sha256.clone());
    event.claims = Some(token.claims.clone());
    let user = event.claim_text("user_login").map(|user| format!(" (user {user})")).unwrap_or_default();
    let reader = format!("{}:{}{user}", token.issuer, token.subject);
    if let Err(denial) = broker.policies.authorize_auditor(&token.issuer, &token.claims) {
        event.code = Some("access_denied".into());
        event.detail = Some(format!("{what} refused for {reader}: {denial}"));
        if let Err(error) = broker.audit.record_in(slot, event).await {
            tracing::error!(%error, reader, "refused audit read not recorded");
        }
        let reason = format!("{reader} may not read the audit log: only identities bound under [auditors] in the policy may");
        return Err(ExchangeFailure { issuance_id: id, error: ExchangeError::AccessDenied { role: String::new(), reason, client_may_see: true } });
    }
    event.decision = Decision::AuditRead;
    event.detail = Some(format!("{reader}: {what}"));
    broker
        .audit
        .record_in(slot, event)
        .await
        .map_err(|error| ExchangeFailure { issuance_id: id, error: ExchangeError::AuditUnavailable(error) })?;
    Ok(id)
}
