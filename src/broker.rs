//! One exchange, top to bottom: verify → decide → record (claim the token use) → mint →
//! record (the issued row) → hand over. Every exit writes exactly one audit row.

use std::sync::Arc;

use serde::Deserialize;
use time::OffsetDateTime;
use uuid::Uuid;

use crate::audit::{Audit, AuditError, AuditEvent, AuditSlot, Decision, RevocationReason, TokenUse};
use crate::backend::{BackendError, Backends, Credential, MintRequest};
use crate::lifecycle::Lifecycle;
use crate::oidc::{Verifier, VerifiedToken, VerifyError};
use crate::policy::{self, PolicySet, TtlRequest};
use crate::types::Ttl;

/// The stable, machine-readable vocabulary of failures (`code` in problem+json).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    InvalidRequest,
    InvalidToken,
    UntrustedIssuer,
    AccessDenied,
    TokenReplayed,
    TtlNotSatisfiable,
    RateLimited,
    BackendFailed,
    AuditUnavailable,
    IssuerUnavailable,
    RequestTimeout,
    NotFound,
    /// A Gogs delivery whose X-Gogs-Signature is missing or wrong.
    InvalidSignature,
    /// A Gogs delivery id, or a payload, seen before.
    DeliveryReplayed,
    /// A request body over the size limit.
    PayloadTooLarge,
    /// A request body in a content type the endpoint does not read.
    UnsupportedMediaType,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidRequest => "invalid_request",
            ErrorCode::InvalidToken => "invalid_token",
            ErrorCode::UntrustedIssuer => "untrusted_issuer",
            ErrorCode::AccessDenied => "access_denied",
            ErrorCode::TokenReplayed => "token_replayed",
            ErrorCode::TtlNotSatisfiable => "ttl_not_satisfiable",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::BackendFailed => "backend_failed",
            ErrorCode::AuditUnavailable => "audit_unavailable",
            ErrorCode::IssuerUnavailable => "issuer_unavailable",
            ErrorCode::RequestTimeout => "request_timeout",
            ErrorCode::NotFound => "not_found",
            ErrorCode::InvalidSignature => "invalid_signature",
            ErrorCode::DeliveryReplayed => "delivery_replayed",
            ErrorCode::PayloadTooLarge => "payload_too_large",
            ErrorCode::UnsupportedMediaType => "unsupported_media_type",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ExchangeError {
    #[error("{0}")]
    InvalidRequest(String),
    #[error(transparent)]
    InvalidToken(VerifyError),
    #[error("access denied: {reason}")]
    AccessDenied { role: String, reason: String, client_may_see: bool },
    #[error("job token already used {0} time(s) for this role")]
    TokenReplayed(u32),
    #[error(transparent)]
    TtlNotSatisfiable(#[from] policy::TtlNotSatisfiable),
    #[error(transparent)]
    BackendFailed(#[from] BackendError),
    #[error("audit log unavailable: {0}")]
    AuditUnavailable(#[source] AuditError),
    #[error("the broker is at capacity: {0}; retry shortly")]
    Overloaded(#[source] AuditError),
}

impl ExchangeError {
    pub fn code(&self) -> ErrorCode {
        match self {
            ExchangeError::InvalidRequest(_) => ErrorCode::InvalidRequest,
            ExchangeError::InvalidToken(VerifyError::UntrustedIssuer(_)) => ErrorCode::UntrustedIssuer,
            ExchangeError::InvalidToken(VerifyError::IssuerUnavailable(_)) => ErrorCode::IssuerUnavailable,
            ExchangeError::InvalidToken(_) => ErrorCode::InvalidToken,
            ExchangeError::AccessDenied { .. } => ErrorCode::AccessDenied,
            ExchangeError::TokenReplayed(_) => ErrorCode::TokenReplayed,
            ExchangeError::TtlNotSatisfiable(_) => ErrorCode::TtlNotSatisfiable,
            ExchangeError::BackendFailed(_) => ErrorCode::BackendFailed,
            ExchangeError::AuditUnavailable(_) => ErrorCode::AuditUnavailable,
            ExchangeError::Overloaded(_) => ErrorCode::RateLimited,
        }
    }

    /// What the client is told for a refusal (4xx; server-side failures get fixed wording at
    /// the HTTP edge so internals stay in the log). Denials of a role are worded identically whether the role
    /// exists or not, so a token holder cannot map the policy.
    pub fn client_detail(&self) -> String {
        match self {
            ExchangeError::AccessDenied { role, client_may_see: false, .. } => {
                format!("role {role:?} does not exist or does not accept this token (see `credbroker policy explain`)")
            }
            ExchangeError::AccessDenied { reason, .. } => reason.clone(),
            other => other.to_string(),
        }
    }
}

/// A failed exchange and the id of its audit row, for the client to quote.
#[derive(Debug)]
pub struct ExchangeFailure {
    pub issuance_id: Uuid,
    pub error: ExchangeError,
}

/// What the HTTP edge hands the broker: nothing parsed yet but the transport.
pub struct ExchangeInput<'a> {
    pub request_id: &'a str,
    pub bearer_token: Option<&'a str>,
    /// `X-Credbroker-Delivery`: a Gogs delivery token, for roles with `[role.delivery]`.
    pub delivery_token: Option<&'a str>,
    pub body: &'a [u8],
    pub client_addr: Option<String>,
    pub user_agent: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CredentialRequest {
    role: String,
    ttl_seconds: Option<u64>,
    min_ttl_seconds: Option<u64>,
    /// The issuance this one renews (`credbroker exec`): recorded on the issued row to link them.
    renews: Option<Uuid>,
}

pub struct Issued {
    pub issuance_id: Uuid,
    pub role: String,
    pub target: String,
    pub backend: String,
    pub ttl: Ttl,
    pub expires_at: OffsetDateTime,
    pub job_deadline: OffsetDateTime,
    pub credential: Credential,
}

/// Who called an administrative endpoint (see [`Broker::identify_caller`]).
pub(crate) struct Caller {
    /// `issuer:subject (user login)`, for audit rows and replies.
    pub name: String,
    pub token: VerifiedToken,
    /// The caller's audit row, identity filled in, decision still to be set.
    pub event: AuditEvent,
    pub slot: AuditSlot,
}

impl Caller {
    /// The 403 for a caller the policy's `[section]` does not bind: the client hears only that
    /// it may not; the row keeps which binding failed.
    pub(crate) async fn forbid(self, broker: &Broker, request: &str, may_not: &str, section: &str, denial: policy::Denial) -> ExchangeFailure {
        let Caller { name, mut event, slot, .. } = self;
        let id = event.id;
        event.code = Some(ErrorCode::AccessDenied.as_str().to_owned());
        event.detail = Some(format!("{request} refused for {name}: {}", denial.0));
        if let Err(error) = broker.audit.record_in(slot, event).await {
            tracing::error!(%error, request, caller = name, "refused request not recorded");
        }
        let reason = format!("{name} may not {may_not}: only identities bound under [{section}] in the policy may");
        ExchangeFailure { issuance_id: id, error: ExchangeError::AccessDenied { role: String::new(), reason, client_may_see: true } }
    }
}

pub struct Broker {
    pub verifier: Verifier,
    pub policies: Arc<PolicySet>,
    pub backends: Backends,
    pub audit: Audit,
    pub max_uses_per_token: u32,
    pub lifecycle: Lifecycle,
    /// Gogs webhooks and delivery tokens, when `[gogs]` is configured.
    pub gogs: Option<Arc<crate::gogs::Gogs>>,
}

impl Broker {
    #[tracing::instrument(skip_all, fields(request_id = input.request_id, issuance_id, role))]
    pub async fn exchange(&self, input: ExchangeInput<'_>) -> Result<Issued, ExchangeFailure> {
        let now = OffsetDateTime::now_utc();
        let issuance_id = Uuid::new_v4();
        tracing::Span::current().record("issuance_id", tracing::field::display(issuance_id));
        let mut event = AuditEvent::new(issuance_id, Decision::Denied, now, input.request_id);
        event.client_addr = input.client_addr.clone();
        event.user_agent = input.user_agent.clone();

        // The row's place is taken before any work, so an overloaded broker refuses at once
        // instead of minting a credential it then cannot record.
        let slot = match self.audit.reserve() {
            Ok(slot) => slot,
            Err(error @ AuditError::Overloaded { .. }) => {
                let error = ExchangeError::Overloaded(error);
                event.code = Some(error.code().as_str().to_owned());
                self.audit.count_refused(&event);
                return Err(ExchangeFailure { issuance_id, error });
            }
            Err(error) => return Err(ExchangeFailure { issuance_id, error: ExchangeError::AuditUnavailable(error) }),
        };

        // Verify. Until this succeeds nobody can be held to the request.
        let mut token = match self.verify(&input, now).await {
            Ok(token) => token,
            Err(error) => {
                if let Some(iss) = input.bearer_token.and_then(Verifier::claimed_issuer) {
                    event.detail = Some(format!("{error} (claimed iss {iss:?})"));
                }
                return Err(self.refuse_unattributed(slot, event, error).await);
            }
        };
        event.issuer = Some(token.issuer.to_string());
        event.subject = Some(token.subject.clone());
        event.job_token_sha256 = Some(token.token_sha256.clone());
        event.claims = Some(token.claims.clone());
        event.job_deadline = Some(token.job_deadline);

        let request = match parse_request(input.body) {
            Ok(request) => request,
            Err(error) => return Err(self.refuse(slot, event, error).await),
        };
        tracing::Span::current().record("role", request.role.as_str());
        event.role = Some(request.role.chars().take(128).collect());
        event.requested_ttl_seconds = request.ttl.ttl.map(Ttl::seconds);

        // Decide (pure).
        let role = match self.policies.decide(&request.role, &token.issuer, &token.claims) {
            Ok(role) => role,
            Err(denial) => {
                let error = ExchangeError::AccessDenied { role: request.role.clone(), reason: denial.0, client_may_see: false };
                return Err(self.refuse(slot, event, error).await);
            }
        };
        // A role that also wants a Gogs delivery: its claims join the identity's under
        // `delivery_*` names (overwriting any the identity token carried), so templates and the
        // audit row see which repository and commit the credential is for.
        let delivery = match &role.delivery {
            Some(requirement) => match self.verify_delivery(&input, &request.role, requirement, now).await {
                Ok(delivery) => {
                    for name in crate::gogs::DELIVERY_CLAIMS {
                        if let Some(value) = delivery.claims.get(*name) {
                            // `delivery_id` already names itself (the README promises that name).
                            let joined = if name.starts_with("delivery_") { (*name).to_owned() } else { format!("delivery_{name}") };
                            token.claims.insert(joined, value.clone());
                        }
                    }
                    event.claims = Some(token.claims.clone());
                    Some((delivery, requirement.max_uses))
                }
                Err(error) => return Err(self.refuse(slot, event, error).await),
            },
            None => None,
        };
        let Some(backend) = self.backends.get(&role.backend) else {
            let error = BackendError::Failed { backend: role.backend.to_string(), detail: "backend is not configured".into() };
            return Err(self.fail(slot, event, error.into()).await);
        };
        event.backend = Some(role.backend.to_string());
        event.target = Some(role.target.clone().unwrap_or_else(|| backend.default_target().to_owned()));
        let params = match role.render_params(&token.claims) {
            Ok(params) => params,
            Err(reason) => {
                let reason = format!("role {} cannot be rendered from this token: {reason}", role.name);
                let error = ExchangeError::AccessDenied { role: request.role.clone(), reason, client_may_see: true };
                return Err(self.refuse(slot, event, error).await);
            }
        };
        let limits = role.ttl_limits(backend.max_ttl()).with_backend_min(backend.min_ttl());
        let granted = match policy::grant(request.ttl, limits, token.job_deadline, now) {
            Ok(granted) => granted,
            Err(shortfall) => return Err(self.refuse(slot, event, shortfall.into()).await),
        };
        event.granted_ttl_seconds = Some(granted.ttl.seconds());
        event.expires_at = Some(granted.expires_at);
        event.overshoot_seconds = granted.overshoot_seconds;

        // A freeze (`credbroker freeze`) stops issuance on every replica at once.
        match self.audit.store().active_freeze(role.name.as_str(), event.claim_text("project_path").as_deref()).await {
            Ok(None) => {}
            Ok(Some(freeze)) => {
                let until = freeze.until.map(|until| format!(" until {}", rfc3339(until))).unwrap_or_default();
                let reason = format!(
                    "frozen: new credentials for {} {} are stopped by {} since {}{until}",
                    freeze.scope,
                    freeze.value,
                    freeze.frozen_by,
                    rfc3339(freeze.frozen_at)
                );
                let error = ExchangeError::AccessDenied { role: request.role.clone(), reason, client_may_see: true };
                return Err(self.refuse(slot, event, error).await);
            }
            Err(error) => return Err(self.fail(slot, event, ExchangeError::AuditUnavailable(error)).await),
        }

        // Record the use before minting, so two replicas racing on one token cannot both mint.
        let max_uses = role.max_uses_per_token.unwrap_or(self.max_uses_per_token);
        match self
            .audit
            .claim_token_use(token.issuer.as_str(), &token.jti, role.name.as_str(), max_uses, token.job_deadline)
            .await
        {
            Ok(TokenUse::Claimed(_)) => {}
            Ok(TokenUse::Exhausted) => return Err(self.refuse(slot, event, ExchangeError::TokenReplayed(max_uses)).await),
            Err(error) => return Err(self.fail(slot, event, ExchangeError::AuditUnavailable(error)).await),
        }
        if let Some((delivery, max_uses)) = &delivery {
            match self
                .audit
                .claim_token_use(delivery.issuer.as_str(), &delivery.jti, role.name.as_str(), *max_uses, delivery.job_deadline)
                .await
            {
                Ok(TokenUse::Claimed(_)) => {}
                Ok(TokenUse::Exhausted) => {
                    let reason = format!("the delivery token was already used {max_uses} time(s) for role {}", role.name);
                    let error = ExchangeError::AccessDenied { role: request.role.clone(), reason, client_may_see: true };
                    return Err(self.refuse(slot, event, error).await);
                }
                Err(error) => return Err(self.fail(slot, event, ExchangeError::AuditUnavailable(error)).await),
            }
        }

        // Mint.
        let mint = MintRequest {
            issuance_id,
            role: &role.name,
            params: &params.text,
            tables: &params.tables,
            ttl: granted.ttl,
            issued_at: now,
            expires_at: granted.expires_at,
        };
        let credential = match backend.mint(mint).await {
            Ok(credential) => credential,
            Err(error) => return Err(self.fail(slot, event, error.into()).await),
        };
        // The target may have set an earlier end than asked (Vault capped the lease): report
        // and record what really holds.
        let (ttl, expires_at) = match credential.expires_at.filter(|at| *at < granted.expires_at) {
            Some(at) => match Ttl::from_seconds((at - now).whole_seconds().max(1) as u64) {
                Ok(ttl) => (ttl, at),
                Err(_) => (granted.ttl, granted.expires_at),
            },
            None => (granted.ttl, granted.expires_at),
        };
        event.granted_ttl_seconds = Some(ttl.seconds());
        event.expires_at = Some(expires_at);

        // From here until the response is built, a credential that does not reach the client
        // is revoked (the guard), and one the target would keep past its grant is scheduled
        // for revocation before the issued row lets it out.
        let undelivered = self.lifecycle.guard_undelivered(&self.audit, backend, &role.backend, issuance_id, &credential);
        // A credential that needs a secret to be revoked (a Looker session) is always
        // scheduled, with the secret sealed, so it can also be ended on demand.
        let schedule = credential.outlives_grant || credential.revocation_secret.is_some();
        if let (true, true, Some(handle)) = (schedule, backend.can_revoke(), &credential.handle) {
            let due_at = expires_at.min(token.job_deadline);
            let sealed = match self.lifecycle.seal(issuance_id, &credential).await {
                Ok(sealed) => sealed,
                Err(detail) => {
                    let error = crate::backend::BackendError::Failed { backend: role.backend.to_string(), detail };
                    return Err(self.fail(slot, event, error.into()).await);
                }
            };
            let scheduled = self
                .audit
                .store()
                .schedule_revocation(issuance_id, role.backend.as_str(), handle, due_at, RevocationReason::Deadline, None, sealed.as_deref())
                .await;
            if let Err(error) = scheduled {
                return Err(self.fail(slot, event, ExchangeError::AuditUnavailable(error)).await);
            }
        }

        // Record the issuance; only a durable row lets the credential leave.
        event.decision = Decision::Issued;
        event.credential_sha256 = Some(credential.fingerprint.clone());
        event.credential_handle = credential.handle.clone();
        if let Some(overshoot) = granted.overshoot_seconds {
            event.detail = Some(format!(
                "issued {} (the backend's minimum), {overshoot} s past the job deadline: the role allows overshoot",
                granted.ttl
            ));
        }
        if let Some(first) = request.renews {
            let renewal = format!("renews issuance {first}");
            event.detail = Some(event.detail.take().map(|detail| format!("{detail}; {renewal}")).unwrap_or(renewal));
        }
        let target = event.target.clone().unwrap_or_default();
        if let Err(error) = self.audit.record_in(slot, event).await {
            tracing::error!(%issuance_id, error = %error, "issued row not recorded; credential withheld");
            return Err(ExchangeFailure { issuance_id, error: ExchangeError::AuditUnavailable(error) });
        }
        tracing::info!(%issuance_id, role = %role.name, ttl = ttl.seconds(), "credential issued");
        undelivered.delivered();
        Ok(Issued {
            issuance_id,
            role: role.name.to_string(),
            target,
            backend: role.backend.to_string(),
            ttl,
            expires_at,
            job_deadline: token.job_deadline,
            credential,
        })
    }

    pub(crate) async fn verify(&self, input: &ExchangeInput<'_>, now: OffsetDateTime) -> Result<VerifiedToken, ExchangeError> {
        let token = input
            .bearer_token
            .ok_or_else(|| ExchangeError::InvalidToken(VerifyError::Malformed("no bearer token in Authorization".into())))?;
        if let Some(gogs) = self.gogs.as_ref().filter(|gogs| gogs.issued(token)) {
            return gogs.verify_token(token, now).map_err(ExchangeError::InvalidToken);
        }
        self.verifier.verify(token, now).await.map_err(ExchangeError::InvalidToken)
    }

    /// The delivery token a `[role.delivery]` role needs, verified and held to its bindings.
    async fn verify_delivery(
        &self,
        input: &ExchangeInput<'_>,
        role: &str,
        requirement: &policy::DeliveryRequirement,
        now: OffsetDateTime,
    ) -> Result<VerifiedToken, ExchangeError> {
        let denied = |reason: String, client_may_see: bool| ExchangeError::AccessDenied { role: role.to_owned(), reason, client_may_see };
        let Some(raw) = input.delivery_token else {
            return Err(denied("this role needs a Gogs delivery token in the X-Credbroker-Delivery header".into(), true));
        };
        let Some(gogs) = self.gogs.as_ref().filter(|gogs| gogs.issued(raw)) else {
            return Err(denied("X-Credbroker-Delivery does not hold a delivery token of this broker".into(), true));
        };
        let delivery = gogs.verify_token(raw, now).map_err(|e| denied(format!("delivery token: {e}"), true))?;
        match requirement.first_mismatch(&delivery.claims) {
            Some(reason) => Err(denied(reason, false)),
            None => Ok(delivery),
        }
    }

    /// Reserves the audit row of a request other than an exchange (admin requests, releases);
    /// a full queue is `overloaded`.
/// A person (not a job) calling an administrative endpoint, verified, with their audit row
    /// started and its place reserved.
    pub(crate) async fn identify_caller(
        &self,
        input: &ExchangeInput<'_>,
        target: &str,
        now: OffsetDateTime,
    ) -> Result<Caller, ExchangeFailure> {
        let id = Uuid::new_v4();
        let mut event = AuditEvent::new(id, Decision::Denied, now, input.request_id);
        event.client_addr = input.client_addr.clone();
        event.user_agent = input.user_agent.clone();
        event.target = Some(target.to_owned());
        let slot = self.reserve_row(id)?;
        let token = match self.verify(input, now).await {
            Ok(token) => token,
            Err(error) => return Err(self.refuse_unattributed(slot, event, error).await),
        };
        event.issuer = Some(token.issuer.to_string());
        event.subject = Some(token.subject.clone());
        event.job_token_sha256 = Some(token.token_sha256.clone());
        event.claims = Some(token.claims.clone());
        let user = event.claim_text("user_login").map(|user| format!(" (user {user})")).unwrap_or_default();
        let name = format!("{}:{}{user}", token.issuer, token.subject);
        Ok(Caller { name, token, event, slot })
    }

    pub(crate) fn reserve_row(&self, row_id: Uuid) -> Result<AuditSlot, ExchangeFailure> {
        self.audit.reserve().map_err(|error| {
            let error = match error {
                AuditError::Overloaded { .. } => ExchangeError::Overloaded(error),
                error => ExchangeError::AuditUnavailable(error),
            };
            ExchangeFailure { issuance_id: row_id, error }
        })
    }

    pub(crate) async fn refuse_unattributed(&self, slot: AuditSlot, mut event: AuditEvent, error: ExchangeError) -> ExchangeFailure {
        event.code = Some(error.code().as_str().to_owned());
        event.detail.get_or_insert_with(|| error.to_string());
        let issuance_id = event.id;
        if let Err(audit_error) = self.audit.record_unattributed(slot, event.clone()).await {
            log_unrecorded(&event, &audit_error);
        }
        ExchangeFailure { issuance_id, error }
    }

    pub(crate) async fn refuse(&self, slot: AuditSlot, event: AuditEvent, error: ExchangeError) -> ExchangeFailure {
        self.finish(slot, event, Decision::Denied, error).await
    }

    async fn fail(&self, slot: AuditSlot, event: AuditEvent, error: ExchangeError) -> ExchangeFailure {
        self.finish(slot, event, Decision::Failed, error).await
    }

    /// Writes the row for a refused or failed exchange. If even that fails the refusal still
    /// stands; the event goes to the error log so it is not lost.
    async fn finish(&self, slot: AuditSlot, mut event: AuditEvent, decision: Decision, error: ExchangeError) -> ExchangeFailure {
        event.decision = decision;
        if decision == Decision::Denied {
            // Nothing was issued: a lifetime on the row would describe a credential that never existed.
            event.granted_ttl_seconds = None;
            event.expires_at = None;
            event.overshoot_seconds = None;
        }
        event.code = Some(error.code().as_str().to_owned());
        event.detail = Some(error.to_string());
        let issuance_id = event.id;
        if let Err(audit_error) = self.audit.record_in(slot, event.clone()).await {
            log_unrecorded(&event, &audit_error);
        }
        ExchangeFailure { issuance_id, error }
    }
}

pub(crate) fn rfc3339(at: OffsetDateTime) -> String {
    at.format(&time::format_description::well_known::Rfc3339).unwrap_or_default()
}

pub(crate) fn log_unrecorded(event: &AuditEvent, error: &AuditError) {
    tracing::error!(
        issuance_id = %event.id,
        decision = event.decision.as_str(),
        code = event.code.as_deref().unwrap_or_default(),
        detail = event.detail.as_deref().unwrap_or_default(),
        issuer = event.issuer.as_deref().unwrap_or_default(),
        subject = event.subject.as_deref().unwrap_or_default(),
        role = event.role.as_deref().unwrap_or_default(),
        client_addr = event.client_addr.as_deref().unwrap_or_default(),
        error = %error,
        "audit row could not be written"
    );
}

struct ParsedRequest {
    role: String,
    ttl: TtlRequest,
    renews: Option<Uuid>,
}

fn parse_request(body: &[u8]) -> Result<ParsedRequest, ExchangeError> {
    let invalid = |message: String| ExchangeError::InvalidRequest(message);
    let request: CredentialRequest = serde_json::from_slice(body)
        .map_err(|e| invalid(format!("body must be a JSON object {{\"role\", \"ttl_seconds\"?, \"min_ttl_seconds\"?, \"renews\"?}}: {e}")))?;
    if request.role.is_empty() || request.role.len() > 128 {
        return Err(invalid("`role` must be a non-empty string of at most 128 characters".into()));
    }
    let ttl = |field: &str, value: Option<u64>| {
        value.map(|seconds| Ttl::from_seconds(seconds).map_err(|m| invalid(format!("`{field}`: {m}")))).transpose()
    };
    let ttl_request = TtlRequest { ttl: ttl("ttl_seconds", request.ttl_seconds)?, min_ttl: ttl("min_ttl_seconds", request.min_ttl_seconds)? };
    if let (Some(ttl), Some(min_ttl)) = (ttl_request.ttl, ttl_request.min_ttl) {
        if min_ttl > ttl {
            return Err(invalid(format!("`min_ttl_seconds` ({min_ttl}) exceeds `ttl_seconds` ({ttl})")));
        }
    }
    Ok(ParsedRequest { role: request.role, ttl: ttl_request, renews: request.renews })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_parsing_accepts_the_contract_and_nothing_else() {
        let ok = parse_request(br#"{"role":"r","ttl_seconds":900,"min_ttl_seconds":600}"#).unwrap();
        assert_eq!(ok.ttl.ttl.unwrap().seconds(), 900);
        for bad in [
            &br#"{"role":"r","ttl_seconds":0}"#[..],
            br#"{"role":"r","ttl_seconds":-5}"#,
            br#"{"role":"r","ttl_seconds":1.5}"#,
            br#"{"role":"r","ttl_seconds":"900"}"#,
            br#"{"role":"r","extra":1}"#,
            br#"{"role":""}"#,
            br#"{"ttl_seconds":900}"#,
            br#"{"role":"r","ttl_seconds":600,"min_ttl_seconds":900}"#,
            b"not json",
            b"",
        ] {
            let error = parse_request(bad).err().unwrap_or_else(|| panic!("{:?} accepted", String::from_utf8_lossy(bad)));
            assert_eq!(error.code(), ErrorCode::InvalidRequest);
        }
    }
}
