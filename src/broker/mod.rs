//! One exchange, top to bottom: verify → decide → claim the token use → mint → record → hand
//! over. A backend that signs in memory (`Backend::mints_without_side_effects`) mints before
//! the claim, and the claim and the issued row go in one statement. Every request kind
//! (exchange, release, revocation, freeze, audit read) fills in its row as it goes and returns
//! a result; [`Broker::record`] alone turns that result into the row, so there is exactly one
//! row per request and no exit can forget it.

pub mod admin;
pub mod audit_read;
pub mod policies;
pub mod release;

use std::future::Future;
use std::sync::Arc;

use serde::Deserialize;
use time::OffsetDateTime;
use uuid::Uuid;

use crate::audit::{log_unrecorded, project_identities, Audit, AuditError, AuditEvent, AuditSlot, Decision, RevocationReason, TokenUse, UseClaim};
use crate::backend::{BackendError, Backends, Credential, MintRequest};
use crate::metrics::{BackendLabel, DecisionLabel, ExchangeLabels, Metrics};
use crate::oidc::{Verifier, VerifiedToken, VerifyError};
use crate::policy::{self, TtlRequest};
use crate::revocation::{Revoker, Undelivered};
use crate::types::{claim_text, rfc3339, Ttl};

pub use crate::types::ErrorCode;

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
    #[error("the policy files do not compile, so the loaded set keeps serving: {0}")]
    PolicyInvalid(String),
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
            ExchangeError::PolicyInvalid(_) => ErrorCode::PolicyInvalid,
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

impl ExchangeError {
    /// What the row records: a refusal is `denied`; the broker or a system it depends on
    /// failing is `failed`.
    fn decision(&self) -> Decision {
        match self {
            ExchangeError::BackendFailed(_) | ExchangeError::AuditUnavailable(_) | ExchangeError::PolicyInvalid(_) => Decision::Failed,
            _ => Decision::Denied,
        }
    }
}

/// A failed request and the id of its audit row, for the client to quote.
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

/// The audit row of one request, its place in the writer's queue reserved. Request handlers
/// fill in the row and hand it, with their result, to [`Broker::record`]: the only place a
/// request's row is written.
pub struct RequestRow {
    pub event: AuditEvent,
    slot: AuditSlot,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CredentialBody {
    role: String,
    ttl_seconds: Option<u64>,
    min_ttl_seconds: Option<u64>,
    /// The issuance this one renews (`credbroker exec`): recorded on the issued row to link them.
    renews: Option<Uuid>,
}

/// Which door a credential request came through: the row's `endpoint`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// `POST /v1/credentials` (`credbroker exchange`, `exec`).
    Credentials,
    /// `POST /oauth/token`, for clients that fetch their own tokens (Kafka's OIDC login).
    OauthToken,
}

impl Endpoint {
    pub fn as_str(self) -> &'static str {
        match self {
            Endpoint::Credentials => "credentials",
            Endpoint::OauthToken => "oauth_token",
        }
    }
}

/// A credential request as its door read it.
#[derive(Debug, Clone)]
pub struct CredentialRequest {
    pub role: String,
    pub ttl: TtlRequest,
    /// The issuance this one renews (`credbroker exec`).
    pub renews: Option<Uuid>,
}

/// How the request reached [`Broker::issue`]: `POST /v1/credentials` brings a JSON body the
/// broker parses once the job token is verified; the token endpoint's edge has read its form
/// already (the job token is in it), and hands over the request or what is wrong with it.
enum Door {
    Credentials,
    OauthToken(Result<CredentialRequest, String>),
}

impl Door {
    fn endpoint(&self) -> Endpoint {
        match self {
            Door::Credentials => Endpoint::Credentials,
            Door::OauthToken(_) => Endpoint::OauthToken,
        }
    }
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
    /// The RFC 8693 type of the credential's primary secret when that one bearer token is the
    /// whole credential (see [`crate::backend::Backend::bearer_token_type`]).
    pub bearer_token_type: Option<&'static str>,
}

/// A person (not a job) calling an administrative endpoint or reading the log, verified (see
/// [`Broker::identify_caller`]).
pub(crate) struct Caller {
    /// `issuer:subject (user login)`, for audit rows and replies.
    pub name: String,
    pub token: VerifiedToken,
}

impl Caller {
    /// The refusal of a caller the policy's `[section]` does not bind: the client hears only
    /// that it may not; the row keeps which binding failed.
    pub(crate) fn forbidden(&self, event: &mut AuditEvent, request: &str, may_not: &str, section: &str, denial: policy::Denial) -> ExchangeError {
        event.detail = Some(format!("{request} refused for {}: {}", self.name, denial.0));
        let reason = format!("{} may not {may_not}: only identities bound under [{section}] in the policy may", self.name);
        ExchangeError::AccessDenied { role: String::new(), reason, client_may_see: true }
    }
}

pub struct Broker {
    pub verifier: Verifier,
    pub policies: policies::Policies,
    pub backends: Backends,
    pub audit: Audit,
    pub max_uses_per_token: u32,
    pub revoker: Revoker,
    /// Gogs webhooks and delivery tokens, when `[gogs]` is configured.
    pub gogs: Option<Arc<crate::gogs::Gogs>>,
    pub metrics: Arc<Metrics>,
}

/// A credential minted for an exchange whose issued row is still to be written.
struct Minted {
    issued: Issued,
    /// Revokes the credential if it never reaches the client.
    undelivered: Undelivered,
    /// The token use still to claim, with the issued row ([`Broker::record_claiming`]).
    deferred_claim: Option<UseClaim>,
}

impl Broker {
    /// `POST /v1/credentials`: verify → decide → claim → mint (or mint → claim with the row),
    /// then [`Broker::record`], then hand over. Only a durable `issued` row lets the credential leave.
    ///
    /// Both doors return [`Broker::exchange_through`]'s future itself: a wrapping `async fn`
    /// would be a second future of that size, copied on every exchange (bench/README.md).
    pub fn exchange<'a>(&'a self, input: ExchangeInput<'a>) -> impl Future<Output = Result<Issued, ExchangeFailure>> + Send + 'a {
        self.exchange_through(input, Door::Credentials)
    }

    /// `POST /oauth/token`: the same path as [`Broker::exchange`]. The edge has read the form:
    /// `input.bearer_token` is the job token it carried (None when it carried none, and then
    /// `request` says what is missing), `request` the role asked for or what is wrong with the form.
    pub fn exchange_oauth<'a>(
        &'a self,
        input: ExchangeInput<'a>,
        request: Result<CredentialRequest, String>,
    ) -> impl Future<Output = Result<Issued, ExchangeFailure>> + Send + 'a {
        self.exchange_through(input, Door::OauthToken(request))
    }

    /// Records `issuance_id` and `role` on the current span (the HTTP edge's request span),
    /// which ends in the request's one log line.
    async fn exchange_through(&self, input: ExchangeInput<'_>, door: Door) -> Result<Issued, ExchangeFailure> {
        let started = std::time::Instant::now();
        let now = OffsetDateTime::now_utc();
        let mut row = self.open_row(&input, now, None).inspect_err(|failure| self.count_exchange(None, None, Err(&failure.error), started))?;
        tracing::Span::current().record("issuance_id", tracing::field::display(row.event.id));
        let outcome = self.issue(&input, &door, &mut row.event, now).await;
        let (role, backend) = (row.event.role.clone(), row.event.backend.clone());
        let outcome = outcome.map(|mut minted| {
            let claim = minted.deferred_claim.take();
            (minted, claim)
        });
        // Boxed for the same reason as `issue`'s rare paths: this state is the largest.
        let recorded = Box::pin(self.record_claiming(row, outcome)).await;
        self.count_exchange(role.as_deref(), backend.as_deref(), recorded.as_ref().map(|_| ()).map_err(|failure| &failure.error), started);
        let minted = recorded?;
        minted.undelivered.delivered();
        Ok(minted.issued)
    }

    /// One exchange in the metrics, labelled only with names from the configuration and the
    /// fixed sets of decisions and codes: a role no policy declares counts as `unknown`.
    fn count_exchange(&self, role: Option<&str>, backend: Option<&str>, outcome: Result<(), &ExchangeError>, started: std::time::Instant) {
        let role = role.filter(|name| self.policies.current().role(name).is_some()).unwrap_or(crate::metrics::UNKNOWN_ROLE);
        let (decision, code) = match outcome {
            Ok(()) => (Decision::Issued, crate::metrics::NONE),
            Err(error) => (error.decision(), error.code().as_str()),
        };
        let labels = ExchangeLabels {
            role: role.to_owned(),
            backend: backend.unwrap_or(crate::metrics::NONE).to_owned(),
            decision: decision.as_str(),
            code,
        };
        self.metrics.exchanges.get_or_create(&labels).inc();
        self.metrics.exchange_duration.get_or_create(&DecisionLabel { decision: labels.decision }).observe(started.elapsed().as_secs_f64());
    }

    /// The metrics text, with the gauges read now. A database that cannot be read leaves the
    /// database gauges at their last values; the failure shows in the readiness check.
    pub async fn render_metrics(&self) -> String {
        self.metrics.audit_queue_depth.set(self.audit.queue_depth() as i64);
        match self.audit.store().backlog().await {
            Ok(backlog) => {
                self.metrics.revocations_due.set(backlog.revocations_due);
                self.metrics.outbox_backlog.set(backlog.outbox_events);
                self.metrics.outbox_oldest_age.set(backlog.outbox_oldest_age_seconds);
                self.metrics.audit_timeline_lag.set(backlog.timeline_lag_seconds);
            }
            Err(error) => tracing::warn!(%error, "cannot read the backlog (revocations, outbox, the chart's rollup) for /metrics"),
        }
        self.metrics.render()
    }

    /// Awaits off the common path (a renewal, a claim before minting, a sealed revocation)
    /// are boxed: an exchange's future is copied as it is set up, at the size of its largest
    /// state, whichever path it takes (bench/README.md, fourteenth session).
    async fn issue(&self, input: &ExchangeInput<'_>, door: &Door, event: &mut AuditEvent, now: OffsetDateTime) -> Result<Minted, ExchangeError> {
        event.endpoint = Some(door.endpoint().as_str());
        // A token request whose form carries no job token has nothing to verify.
        if let (Door::OauthToken(Err(problem)), None) = (door, input.bearer_token) {
            return Err(ExchangeError::InvalidRequest(problem.clone()));
        }
        // Verify. Until this succeeds nobody can be held to the request.
        let mut token = self.identify(input, event, now).await?;
        let request = match door {
            Door::Credentials => parse_request(input.body)?,
            Door::OauthToken(request) => request.clone().map_err(ExchangeError::InvalidRequest)?,
        };
        tracing::Span::current().record("role", request.role.as_str());
        event.role = Some(request.role.chars().take(128).collect());
        event.requested_ttl_seconds = request.ttl.ttl.map(Ttl::seconds);

        // Decide (pure).
        let policies = self.policies.current();
        event.policy_version = Some(policies.version().to_owned());
        let role = policies.decide(&request.role, &token.issuer, &*token.claims).map_err(|denial| ExchangeError::AccessDenied {
            role: request.role.clone(),
            reason: denial.0,
            client_may_see: false,
        })?;
        // A role that also wants a Gogs delivery: its claims join the identity's under
        // `delivery_*` names (overwriting any the identity token carried), so templates and the
        // audit row see which repository and commit the credential is for.
        let delivery = match &role.delivery {
            Some(requirement) => {
                let delivery = self.verify_delivery(input, &request.role, requirement, now).await?;
                for name in crate::gogs::DELIVERY_CLAIMS {
                    if let Some(value) = delivery.claims.get(name) {
                        // `delivery_id` already names itself (the README promises that name).
                        let joined = if name.starts_with("delivery_") { (*name).to_owned() } else { format!("delivery_{name}") };
                        std::sync::Arc::make_mut(&mut token.claims).insert(joined, value.clone());
                    }
                }
                event.claims = Some(token.claims.clone());
                Some((delivery, requirement.max_uses))
            }
            None => None,
        };
        let backend = self
            .backends
            .get(&role.backend)
            .ok_or_else(|| BackendError::Failed { backend: role.backend.to_string(), detail: "backend is not configured".into() })?;
        event.backend = Some(role.backend.to_string());
        event.target = Some(role.target.clone().unwrap_or_else(|| backend.default_target().to_owned()));
        // A client that fetches its own tokens takes one bearer token and nothing else.
        if door.endpoint() == Endpoint::OauthToken && backend.bearer_token_type().is_none() {
            let reason = format!(
                "role {} is served by a {} backend, whose credential is more than one bearer token: request it with POST /v1/credentials \
                 (`credbroker exchange`); the token endpoint serves roles of kafka_oauthbearer and snowflake_workload_identity backends",
                role.name,
                backend.kind()
            );
            return Err(ExchangeError::AccessDenied { role: request.role.clone(), reason, client_may_see: true });
        }
        let params = role.render_params(&*token.claims).map_err(|reason| ExchangeError::AccessDenied {
            role: request.role.clone(),
            reason: format!("role {} cannot be rendered from this token: {reason}", role.name),
            client_may_see: true,
        })?;
        let limits = role.ttl_limits(backend.max_ttl()).with_backend_min(backend.min_ttl());
        let granted = policy::grant(request.ttl, limits, token.job_deadline, now)?;
        event.granted_ttl_seconds = Some(granted.ttl.seconds());
        event.expires_at = Some(granted.expires_at);
        event.overshoot_seconds = granted.overshoot_seconds;

        // A freeze (`credbroker freeze`) stops issuance on every replica at once.
        if let Some(first) = request.renews {
            event.renews_issuance = Some(Box::pin(self.check_renewal(first, &token, role.name.as_str())).await?);
        }

        // The same statement as the claim refuses while a freeze (`credbroker freeze`) covers
        // the request, which stops issuance on every replica at once.
        let max_uses = role.max_uses_per_token.unwrap_or(self.max_uses_per_token);
        let claim = UseClaim {
            issuer: token.issuer.as_str().to_owned(),
            jti: token.jti.clone(),
            role: role.name.as_str().to_owned(),
            max_uses,
            token_expires_at: token.job_deadline,
            unless_frozen_for: Some(project_identities(event)),
        };
        // A credential that exists only in this process until its row is written is minted
        // first, and its claim rides in the issued row's statement: one round trip per
        // exchange, and a refused claim leaves nothing behind. Any other is claimed before
        // minting, so two replicas racing on one token cannot both mint.
        let deferred_claim = if backend.mints_without_side_effects() && delivery.is_none() {
            Some(claim)
        } else {
            let answer = Box::pin(self.audit.claim_token_use(claim.clone())).await.map_err(ExchangeError::AuditUnavailable)?;
            refused_use(answer, claim.max_uses, &claim.role)?;
            None
        };
        if let Some((delivery, max_uses)) = &delivery {
            let claim = UseClaim {
                issuer: delivery.issuer.as_str().to_owned(),
                jti: delivery.jti.clone(),
                role: role.name.as_str().to_owned(),
                max_uses: *max_uses,
                token_expires_at: delivery.job_deadline,
                unless_frozen_for: None,
            };
            if !matches!(Box::pin(self.audit.claim_token_use(claim)).await.map_err(ExchangeError::AuditUnavailable)?, TokenUse::Claimed(_)) {
                let reason = format!("the delivery token was already used {max_uses} time(s) for role {}", role.name);
                return Err(ExchangeError::AccessDenied { role: request.role.clone(), reason, client_may_see: true });
            }
        }

        // Mint.
        let mint = MintRequest {
            issuance_id: event.id,
            role: &role.name,
            params: &params.text,
            tables: &params.tables,
            ttl: granted.ttl,
            issued_at: now,
            expires_at: granted.expires_at,
        };
        let minting = std::time::Instant::now();
        let credential = backend.mint(mint).await;
        self.metrics.mint_duration.get_or_create(&BackendLabel { backend: role.backend.to_string() }).observe(minting.elapsed().as_secs_f64());
        let credential = credential?;
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
        let undelivered = self.revoker.guard_undelivered(&self.audit, backend, &role.backend, event.id, &credential);
        // A credential that needs a secret to be revoked (a Looker session) is always
        // scheduled, with the secret sealed, so it can also be ended on demand.
        let schedule = credential.outlives_grant || credential.revocation_secret.is_some();
        if let (true, true, Some(handle)) = (schedule, backend.can_revoke(), &credential.handle) {
            let due_at = expires_at.min(token.job_deadline);
            let sealed = Box::pin(self.revoker.seal(event.id, &credential))
                .await
                .map_err(|detail| BackendError::Failed { backend: role.backend.to_string(), detail })?;
            let store = self.audit.store();
            Box::pin(store.schedule_revocation(event.id, role.backend.as_str(), handle, due_at, RevocationReason::Deadline, None, sealed.as_deref()))
                .await
                .map_err(ExchangeError::AuditUnavailable)?;
        }

        event.decision = Decision::Issued;
        event.credential_sha256 = Some(credential.fingerprint.clone());
        event.credential_handle = credential.handle.clone();
        if let Some(overshoot) = granted.overshoot_seconds {
            event.detail = Some(format!(
                "issued {} (the backend's minimum), {overshoot} s past the job deadline: the role allows overshoot",
                granted.ttl
            ));
        }
        let issued = Issued {
            issuance_id: event.id,
            role: role.name.to_string(),
            target: event.target.clone().unwrap_or_default(),
            backend: role.backend.to_string(),
            ttl,
            expires_at,
            job_deadline: token.job_deadline,
            credential,
            bearer_token_type: backend.bearer_token_type(),
        };
        Ok(Minted { issued, undelivered, deferred_claim })
    }

    /// A renewal (`credbroker exec`) continues an earlier issuance only for the same job: same
    /// issuer, subject and role, the same `job_id` when the issuer sends one (absent never
    /// matches absent: without a job id only the same job token proves the same job), and no
    /// issuance of the chain revoked on demand. Returns the chain's first issuance, which the
    /// row then names in `renews_issuance_id`.
    async fn check_renewal(&self, renews: Uuid, token: &VerifiedToken, role: &str) -> Result<Uuid, ExchangeError> {
        let refuse = |why: &str| ExchangeError::InvalidRequest(format!("`renews`: issuance {renews} {why}"));
        let store = self.audit.store();
        let named = store.issued_credential(renews).await.map_err(ExchangeError::AuditUnavailable)?.ok_or_else(|| refuse("is not an issued credential"))?;
        let first = match named.record.renews_issuance_id {
            Some(first) => store.issued_credential(first).await.map_err(ExchangeError::AuditUnavailable)?.ok_or_else(|| refuse("continues no issued credential"))?,
            None => named,
        };
        let same_job = match (token.claims.get("job_id").map(claim_text), &first.record.job_id) {
            (Some(Some(job)), Some(first_job)) => *job == **first_job,
            (Some(_), _) => false,
            (None, _) => first.record.job_token_sha256.as_deref() == Some(token.token_sha256.as_str()),
        };
        if first.record.issuer.as_deref() != Some(token.issuer.as_str()) || first.record.subject.as_deref() != Some(token.subject.as_str()) || !same_job {
            return Err(refuse("was issued to another job; a renewal must come from the job that holds the first credential"));
        }
        if first.record.role.as_deref() != Some(role) {
            return Err(refuse(&format!("is for role {:?}, not {role:?}", first.record.role.as_deref().unwrap_or_default())));
        }
        if store.chain_revoked_on_demand(first.issuance_id()).await.map_err(ExchangeError::AuditUnavailable)? {
            return Err(refuse("was revoked by the security team; it cannot be renewed"));
        }
        Ok(first.issuance_id())
    }

    /// Reserves the row of a request before any work is done for it, so an overloaded broker
    /// refuses at once (429) instead of doing work it then cannot record; the refusal is
    /// counted into an aggregated row.
    pub(crate) fn open_row(&self, input: &ExchangeInput<'_>, now: OffsetDateTime, target: Option<&str>) -> Result<RequestRow, ExchangeFailure> {
        let mut event = AuditEvent::new(crate::audit::new_row_id(), Decision::Denied, now, input.request_id);
        event.client_addr = input.client_addr.clone();
        event.user_agent = input.user_agent.clone();
        event.target = target.map(str::to_owned);
        event.policy_version = Some(self.policies.current().version().to_owned());
        match self.audit.reserve() {
            Ok(slot) => Ok(RequestRow { event, slot }),
            Err(error @ AuditError::Overloaded { .. }) => {
                let error = ExchangeError::Overloaded(error);
                event.code = Some(error.code().as_str().to_owned());
                self.audit.count_refused(&event);
                Err(ExchangeFailure { issuance_id: event.id, error })
            }
            Err(error) => Err(ExchangeFailure { issuance_id: event.id, error: ExchangeError::AuditUnavailable(error) }),
        }
    }

    /// The one place a request's row is written. A success is written as the handler left
    /// the row (its decision set); a refusal or failure gets its decision, code and detail
    /// here. Denials no verified identity can be held to go through the unattributed budget.
    /// If even a refusal's row cannot be written the refusal still stands, and the row goes to
    /// the error log so it is not lost; a success whose row cannot be written is not one.
    pub(crate) async fn record<T>(&self, row: RequestRow, outcome: Result<T, ExchangeError>) -> Result<T, ExchangeFailure> {
        self.record_claiming(row, outcome.map(|value| (value, None))).await
    }

    /// [`Broker::record`] for a success that may still have its token use to claim: the claim
    /// and the issued row then go in one statement, and a refused claim turns the success into
    /// that refusal, recorded like any other (without the credential that never left).
    pub(crate) async fn record_claiming<T>(&self, row: RequestRow, outcome: Result<(T, Option<UseClaim>), ExchangeError>) -> Result<T, ExchangeFailure> {
        let RequestRow { mut event, slot } = row;
        let issuance_id = event.id;
        let unrecorded = |error: AuditError| {
            tracing::error!(%issuance_id, %error, "row not recorded; the request does not take effect");
            ExchangeFailure { issuance_id, error: ExchangeError::AuditUnavailable(error) }
        };
        let error = match outcome {
            Ok((value, None)) => return self.audit.record_in(slot, event).await.map(|()| value).map_err(unrecorded),
            Ok((value, Some(claim))) => {
                let (max_uses, role) = (claim.max_uses, claim.role.clone());
                let (answer, row) = self.audit.claim_and_record(claim, event).await.map_err(unrecorded)?;
                event = row;
                match refused_use(answer, max_uses, &role) {
                    Ok(()) => return Ok(value),
                    Err(refusal) => {
                        event.credential_sha256 = None;
                        event.credential_handle = None;
                        event.detail = None;
                        refusal
                    }
                }
            }
            Err(error) => error,
        };
        event.decision = error.decision();
        if event.decision == Decision::Denied {
            // Nothing was issued: a lifetime on the row would describe a credential that never existed.
            event.granted_ttl_seconds = None;
            event.expires_at = None;
            event.overshoot_seconds = None;
        }
        event.code = Some(error.code().as_str().to_owned());
        event.detail.get_or_insert_with(|| error.to_string());
        let written = match event.issuer {
            None => Box::pin(self.audit.record_unattributed(slot, event.clone())).await,
            Some(_) => self.audit.record_in(slot, event.clone()).await,
        };
        if let Err(audit_error) = written {
            log_unrecorded(&event, &audit_error);
        }
        Err(ExchangeFailure { issuance_id, error })
    }

    /// Verifies the bearer token and fills the row's identity from it. A failure names the
    /// issuer the token claimed, for the row only.
    pub(crate) async fn identify(&self, input: &ExchangeInput<'_>, event: &mut AuditEvent, now: OffsetDateTime) -> Result<VerifiedToken, ExchangeError> {
        let token = self.verify(input, now).await.inspect_err(|error| {
            if let Some(iss) = input.bearer_token.and_then(Verifier::claimed_issuer) {
                event.detail = Some(format!("{error} (claimed iss {iss:?})"));
            }
        })?;
        event.issuer = Some(token.issuer.to_string());
        event.subject = Some(token.subject.clone());
        event.job_token_sha256 = Some(token.token_sha256.clone());
        event.claims = Some(token.claims.clone());
        event.job_deadline = Some(token.job_deadline);
        Ok(token)
    }

    async fn verify(&self, input: &ExchangeInput<'_>, now: OffsetDateTime) -> Result<VerifiedToken, ExchangeError> {
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
        match requirement.first_mismatch(&*delivery.claims) {
            Some(reason) => Err(denied(reason, false)),
            None => Ok(delivery),
        }
    }

    /// A person (not a job) calling an administrative endpoint or reading the log, verified,
    /// with the row's identity filled in.
    pub(crate) async fn identify_caller(&self, input: &ExchangeInput<'_>, event: &mut AuditEvent, now: OffsetDateTime) -> Result<Caller, ExchangeError> {
        let token = self.identify(input, event, now).await?;
        let user = event.claim_text("user_login").map(|user| format!(" (user {user})")).unwrap_or_default();
        Ok(Caller { name: format!("{}:{}{user}", token.issuer, token.subject), token })
    }
}


/// A claim's answer as the exchange's outcome: a use taken goes on, anything else is refused.
fn refused_use(answer: TokenUse, max_uses: u32, role: &str) -> Result<(), ExchangeError> {
    match answer {
        TokenUse::Claimed(_) => Ok(()),
        TokenUse::Exhausted => Err(ExchangeError::TokenReplayed(max_uses)),
        TokenUse::Frozen(freeze) => {
            let until = freeze.until.map(|until| format!(" until {}", rfc3339(until))).unwrap_or_default();
            let reason = format!(
                "frozen: new credentials for {} {} are stopped by {} since {}{until}",
                freeze.scope,
                freeze.value,
                freeze.frozen_by,
                rfc3339(freeze.frozen_at)
            );
            Err(ExchangeError::AccessDenied { role: role.to_owned(), reason, client_may_see: true })
        }
    }
}

fn parse_request(body: &[u8]) -> Result<CredentialRequest, ExchangeError> {
    let invalid = |message: String| ExchangeError::InvalidRequest(message);
    let request: CredentialBody = serde_json::from_slice(body)
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
    Ok(CredentialRequest { role: request.role, ttl: ttl_request, renews: request.renews })
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
