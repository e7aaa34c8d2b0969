//! The security team's requests: revoke on demand (`POST /v1/revocations`), freeze and
//! unfreeze (`POST` / `DELETE /v1/freezes`), reload the policy files (`POST /v1/policies/reload`). The caller proves who they are with an OIDC token
//! from a trusted issuer, and `[admins]` in the policy decides whether they may. Every request
//! is audited before anything is done: an `admin_request` row naming who asked and for what,
//! or a `denied` row (403) for anyone else.

use serde::Deserialize;
use serde_json::{json, Value};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;
use uuid::Uuid;

use crate::audit::{AuditError, AuditEvent, Decision, IssuanceSelector, IssuedCredential, RevocationReason, SELECTOR_LIMIT};
use super::{Broker, ExchangeError, ExchangeFailure, ExchangeInput};
use crate::types::{parse_duration, rfc3339, BackendName};

/// Verifies the caller and checks `[admins]`; a refusal names in the row who tried and why.
/// Returns who asked, as the `admin_request` row names them.
async fn authorize(broker: &Broker, input: &ExchangeInput<'_>, event: &mut AuditEvent, action: &str, now: OffsetDateTime) -> Result<String, ExchangeError> {
    let caller = broker.identify_caller(input, event, now).await?;
    if let Err(denial) = broker.policies.current().authorize_admin(&caller.token.issuer, &*caller.token.claims) {
        return Err(caller.forbidden(event, action, action, "admins", denial));
    }
    Ok(caller.name)
}

/// Marks the row an authorised `admin_request`: once it is durable the request takes effect.
fn admit(event: &mut AuditEvent, detail: String) {
    event.decision = Decision::AdminRequest;
    event.detail = Some(detail);
}

fn unavailable(id: Uuid, error: AuditError) -> ExchangeFailure {
    ExchangeFailure { issuance_id: id, error: ExchangeError::AuditUnavailable(error) }
}

/// A JSON string or number as text (job and pipeline ids are numbers to some callers).
fn text_or_number<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Option<String>, D::Error> {
    match Option::<Value>::deserialize(deserializer)? {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(text)) => Ok(Some(text)),
        Some(Value::Number(number)) => Ok(Some(number.to_string())),
        Some(_) => Err(serde::de::Error::custom("must be a string or a number")),
    }
}

/// An RFC 3339 time, or a duration (`2h`, `90m`; [`parse_duration`]) counted back from (or,
/// for `until`, on from) now.
fn parse_time(raw: &str, now: OffsetDateTime, past: bool) -> Result<OffsetDateTime, String> {
    if let Ok(at) = OffsetDateTime::parse(raw, &Rfc3339) {
        return Ok(at);
    }
    let seconds = parse_duration(raw).map_err(|_| format!("{raw:?} is neither an RFC 3339 time nor a duration like \"2h\""))?;
    let span = time::Duration::seconds(i64::try_from(seconds).map_err(|_| format!("{raw:?} is too long"))?);
    now.checked_add(if past { -span } else { span }).ok_or_else(|| format!("{raw:?} is too long"))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RevocationRequest {
    issuance: Option<String>,
    #[serde(default, deserialize_with = "text_or_number")]
    job: Option<String>,
    #[serde(default, deserialize_with = "text_or_number")]
    pipeline: Option<String>,
    project: Option<String>,
    subject: Option<String>,
    issued_since: Option<String>,
    role: Option<String>,
    #[serde(default)]
    dry_run: bool,
}

const SELECTORS: &str = "issuance, job, pipeline, project, subject, issued_since";

fn parse_revocation(body: &[u8], now: OffsetDateTime) -> Result<(IssuanceSelector, bool, Value), ExchangeError> {
    let invalid = ExchangeError::InvalidRequest;
    let request: RevocationRequest =
        serde_json::from_slice(body).map_err(|e| invalid(format!("request body must be a JSON object with one selector ({SELECTORS}): {e}")))?;
    let chosen = [&request.issuance, &request.job, &request.pipeline, &request.project, &request.subject, &request.issued_since]
        .iter()
        .filter(|field| field.is_some())
        .count();
    if chosen != 1 {
        return Err(invalid(format!("exactly one selector is required ({SELECTORS}), optionally with role; got {chosen}")));
    }
    let texts = [&request.job, &request.pipeline, &request.project, &request.subject, &request.role];
    if texts.iter().any(|f| f.as_deref() == Some("")) {
        return Err(invalid("a selector must not be empty".into()));
    }
    if texts.iter().any(|f| f.as_deref().is_some_and(has_control_characters)) {
        return Err(invalid("a selector must not contain control characters".into()));
    }
    let issuance = request
        .issuance
        .as_deref()
        .map(|raw| Uuid::parse_str(raw).map_err(|_| invalid(format!("issuance {raw:?} is not an issuance id (a UUID)"))))
        .transpose()?;
    let issued_since = request
        .issued_since
        .as_deref()
        .map(|raw| parse_time(raw, now, true).map_err(|m| invalid(format!("issued_since: {m}"))))
        .transpose()?;
    let echo = json!({
        "issuance": issuance, "job": request.job, "pipeline": request.pipeline, "project": request.project,
        "subject": request.subject, "issued_since": issued_since.map(rfc3339), "role": request.role,
    });
    let echo = Value::Object(echo.as_object().into_iter().flatten().filter(|(_, v)| !v.is_null()).map(|(k, v)| (k.clone(), v.clone())).collect());
    let selector = IssuanceSelector {
        issuance,
        job: request.job,
        pipeline: request.pipeline,
        project: request.project,
        subject: request.subject,
        issued_since,
        role: request.role,
    };
    Ok((selector, request.dry_run, echo))
}

/// What happens to one matched credential.
enum Plan {
    Revoke,
    AlreadyRevoked,
    NotRevocable(String),
}

fn plan(broker: &Broker, issued: &IssuedCredential) -> Plan {
    if issued.revocation_state.as_deref() == Some("revoked") {
        return Plan::AlreadyRevoked;
    }
    let backend = issued.record.backend.as_deref().and_then(|name| BackendName::parse(name).ok()).and_then(|name| broker.backends.get(&name));
    match (backend, &issued.record.credential_handle) {
        (Some(backend), Some(_)) if backend.can_revoke() => Plan::Revoke,
        (Some(backend), _) => Plan::NotRevocable(format!(
            "a {} credential cannot be ended early by the broker; it stays valid until it expires",
            backend.kind()
        )),
        (None, _) => Plan::NotRevocable(format!(
            "backend {} is not configured on this broker, so it cannot revoke; the credential stays valid until it expires",
            issued.record.backend.as_deref().unwrap_or("(unknown)")
        )),
    }
}

/// `POST /v1/revocations`.
pub async fn revoke(broker: &Broker, input: ExchangeInput<'_>) -> Result<Value, ExchangeFailure> {
    let now = OffsetDateTime::now_utc();
    let mut row = broker.open_row(&input, now, Some("revoke"))?;
    let request_id = row.event.id;
    let decided: Result<_, ExchangeError> = async {
        let requested_by = authorize(broker, &input, &mut row.event, "revoke", now).await?;
        let (selector, dry_run, echo) = parse_revocation(input.body, now)?;
        admit(&mut row.event, format!("revoke{} by {requested_by}: {echo}", if dry_run { " (dry run)" } else { "" }));
        Ok((selector, dry_run, echo, requested_by))
    }
    .await;
    let (selector, dry_run, echo, requested_by) = broker.record(row, decided).await?;
    let store = broker.audit.store();
    let matched = store.select_live_issued(&selector).await.map_err(|e| unavailable(request_id, e))?;
    if matched.len() as i64 > SELECTOR_LIMIT {
        let error = ExchangeError::InvalidRequest(format!("the selector matches more than {SELECTOR_LIMIT} live credentials; narrow it (e.g. add role)"));
        return Err(ExchangeFailure { issuance_id: request_id, error });
    }
    let plans: Vec<Plan> = matched.iter().map(|issued| plan(broker, issued)).collect();

    let mut attempts = Vec::new();
    if !dry_run {
        let mut ids = Vec::new();
        for (issued, plan) in matched.iter().zip(&plans) {
            if let (Plan::Revoke, Some(backend), Some(handle)) = (plan, &issued.record.backend, &issued.record.credential_handle) {
                store
                    .schedule_revocation(issued.issuance_id(), backend, handle, now, RevocationReason::OnDemand, Some(&requested_by), None)
                    .await
                    .map_err(|e| unavailable(request_id, e))?;
                ids.push(issued.issuance_id());
            }
        }
        // Attempted here so the answer can say what happened; what fails is retried by the worker.
        for chunk in ids.chunks(32) {
            attempts.extend(broker.revoker.revoke_due(&broker.audit, &broker.backends, Some(chunk)).await.map_err(|e| unavailable(request_id, e))?);
        }
        broker.revoker.wake();
    }

    let mut counts = std::collections::BTreeMap::<&str, usize>::new();
    let mut remains_valid_until: Option<OffsetDateTime> = None;
    let credentials: Vec<Value> = matched
        .iter()
        .zip(&plans)
        .map(|(issued, plan)| {
            let (outcome, detail) = match plan {
                Plan::AlreadyRevoked => ("already_revoked", None),
                Plan::NotRevocable(reason) => ("not_revocable", Some(reason.clone())),
                Plan::Revoke if dry_run => ("would_revoke", None),
                Plan::Revoke => match attempts.iter().find(|a| a.issuance_id == issued.issuance_id()) {
                    Some(attempt) => match &attempt.result {
                        Ok(()) => ("revoked", None),
                        Err(error) if attempt.will_retry => ("revoke_failed", Some(format!("{error}; the broker keeps retrying"))),
                        Err(error) => ("revoke_failed", Some(format!("{error}; gave up: revoke it by hand"))),
                    },
                    // Another replica holds the claim on it right now.
                    None => ("pending", Some("another broker replica is revoking it now".to_owned())),
                },
            };
            if matches!(outcome, "not_revocable" | "revoke_failed" | "pending" | "would_revoke") {
                remains_valid_until = remains_valid_until.max(Some(issued.expires_at));
            }
            *counts.entry(outcome).or_default() += 1;
            json!({
                "issuance_id": issued.issuance_id(),
                "outcome": outcome,
                "detail": detail,
                "role": issued.record.role,
                "backend": issued.record.backend,
                "handle": issued.record.credential_handle,
                "subject": issued.record.subject,
                "project_path": issued.record.project_path,
                "pipeline_id": issued.record.pipeline_id,
                "job_id": issued.record.job_id,
                "issued_at": rfc3339(issued.record.occurred_at),
                "valid_until": rfc3339(issued.expires_at),
            })
        })
        .collect();
    Ok(json!({
        "request_id": request_id,
        "requested_by": requested_by,
        "dry_run": dry_run,
        "selector": echo,
        "matched": matched.len(),
        "summary": counts,
        "remains_valid_until": remains_valid_until.map(rfc3339),
        "credentials": credentials,
    }))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FreezeRequest {
    project: Option<String>,
    role: Option<String>,
    #[serde(default)]
    all: bool,
    until: Option<String>,
}

/// No project path, subject or role name holds one (and Postgres refuses U+0000 outright): a
/// selector or scope with one is malformed, not something to look up or store.
fn has_control_characters(text: &str) -> bool {
    text.chars().any(char::is_control)
}

/// `(scope, value)` of a freeze request: exactly one of project, role, all.
fn freeze_scope(request: &FreezeRequest) -> Result<(&'static str, String), ExchangeError> {
    if [&request.project, &request.role].iter().any(|f| f.as_deref().is_some_and(has_control_characters)) {
        return Err(ExchangeError::InvalidRequest("project and role must not contain control characters".into()));
    }
    match (&request.project, &request.role, request.all) {
        (Some(project), None, false) if !project.is_empty() => Ok(("project", project.clone())),
        (None, Some(role), false) if !role.is_empty() => Ok(("role", role.clone())),
        (None, None, true) => Ok(("all", "*".to_owned())),
        _ => Err(ExchangeError::InvalidRequest("exactly one of project, role or all = true is required".into())),
    }
}

/// `POST /v1/freezes` (freeze) and `DELETE /v1/freezes` (unfreeze).
pub async fn freeze(broker: &Broker, input: ExchangeInput<'_>, lift: bool) -> Result<Value, ExchangeFailure> {
    let action = if lift { "unfreeze" } else { "freeze" };
    let now = OffsetDateTime::now_utc();
    let mut row = broker.open_row(&input, now, Some(action))?;
    let request_id = row.event.id;
    let decided: Result<_, ExchangeError> = async {
        let requested_by = authorize(broker, &input, &mut row.event, action, now).await?;
        let (scope, value, until) = parse_freeze(broker, input.body, lift, now)?;
        let until_text = until.map(|until| format!(" until {}", rfc3339(until))).unwrap_or_default();
        admit(&mut row.event, format!("{action} {scope} {value}{until_text} by {requested_by}"));
        Ok((scope, value, until, requested_by))
    }
    .await;
    let (scope, value, until, requested_by) = broker.record(row, decided).await?;
    let store = broker.audit.store();
    if lift {
        let lifted = store.unfreeze(scope, &value, &requested_by).await.map_err(|e| unavailable(request_id, e))?;
        Ok(json!({ "request_id": request_id, "scope": scope, "value": value, "lifted": lifted, "lifted_by": requested_by }))
    } else {
        store.freeze(scope, &value, &requested_by, until).await.map_err(|e| unavailable(request_id, e))?;
        Ok(json!({
            "request_id": request_id, "scope": scope, "value": value,
            "until": until.map(rfc3339), "frozen_by": requested_by,
        }))
    }
}

/// `POST /v1/policies/reload`: the files are compiled in full before anything changes; the row
/// says which version replaced which, or that the files did not compile (422 `policy_invalid`,
/// the serving set untouched), and only a durable row lets the new set serve.
pub async fn reload_policies(broker: &Broker, input: ExchangeInput<'_>) -> Result<Value, ExchangeFailure> {
    let now = OffsetDateTime::now_utc();
    let mut row = broker.open_row(&input, now, Some("policy_reload"))?;
    let decided: Result<_, ExchangeError> = async {
        let requested_by = authorize(broker, &input, &mut row.event, "reload policies", now).await?;
        let serving = broker.policies.current().version().to_owned();
        match broker.policies.compile() {
            Ok(set) => {
                admit(&mut row.event, format!("policy reload by {requested_by}: version {serving} replaced by {}", set.version()));
                Ok(set)
            }
            Err(errors) => {
                tracing::error!(%errors, "policy reload failed; the previous policy set keeps serving");
                broker.policies.reload_failed(&errors);
                Err(ExchangeError::PolicyInvalid(errors))
            }
        }
    }
    .await;
    let set = broker.record(row, decided).await?;
    Ok(json!({ "policy_version": broker.policies.install(set) }))
}

/// `(scope, value, until)` of a freeze or unfreeze request.
fn parse_freeze(broker: &Broker, body: &[u8], lift: bool, now: OffsetDateTime) -> Result<(&'static str, String, Option<OffsetDateTime>), ExchangeError> {
    serde_json::from_slice::<FreezeRequest>(body)
        .map_err(|e| ExchangeError::InvalidRequest(format!("request body must be a JSON object with project, role or all: {e}")))
        .and_then(|request| {
            let (scope, value) = freeze_scope(&request)?;
            if scope == "role" && broker.policies.current().role(&value).is_none() {
                return Err(ExchangeError::InvalidRequest(format!("no role named {value:?} in the loaded policy")));
            }
            let until = match (&request.until, lift) {
                (Some(_), true) => return Err(ExchangeError::InvalidRequest("until applies to freeze, not unfreeze".into())),
                (Some(raw), false) => Some(parse_time(raw, now, false).map_err(|m| ExchangeError::InvalidRequest(format!("until: {m}")))?),
                (None, _) => None,
            };
            if until.is_some_and(|until| until <= now) {
                return Err(ExchangeError::InvalidRequest("until must be in the future".into()));
            }
            Ok((scope, value, until))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exactly_one_selector_is_accepted() {
        let now = OffsetDateTime::now_utc();
        assert!(parse_revocation(br#"{"job": 123, "role": "r"}"#, now).is_ok());
        let (selector, dry_run, _) = parse_revocation(br#"{"issued_since": "2h", "dry_run": true}"#, now).unwrap();
        assert!(dry_run);
        assert_eq!(selector.issued_since, Some(now - time::Duration::hours(2)));
        for bad in [r#"{}"#, r#"{"role": "r"}"#, r#"{"job": "1", "pipeline": "2"}"#, r#"{"issuance": "nope"}"#, r#"{"jobs": "1"}"#, r#"{"project": ""}"#, r#"{"subject": "a\u0000b"}"#] {
            assert!(parse_revocation(bad.as_bytes(), now).is_err(), "{bad}");
        }
    }

    #[test]
    fn freeze_needs_exactly_one_scope() {
        let request = |body: &str| serde_json::from_str::<FreezeRequest>(body).unwrap();
        assert_eq!(freeze_scope(&request(r#"{"all": true}"#)).unwrap(), ("all", "*".to_owned()));
        assert_eq!(freeze_scope(&request(r#"{"project": "a/b"}"#)).unwrap(), ("project", "a/b".to_owned()));
        assert!(freeze_scope(&request(r#"{"project": "a/b", "all": true}"#)).is_err());
        assert!(freeze_scope(&request(r#"{}"#)).is_err());
        assert!(freeze_scope(&request(r#"{"project": "a\u0000b"}"#)).is_err());
    }
}
