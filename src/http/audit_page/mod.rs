//! `/audit`: the audit log for people. Server-rendered HTML over the same reads as
//! `GET /v1/issuances` (same filters, same `[auditors]` check, every view recorded before
//! anything is shown), plus a chart of issued and denied per target drawn by Chart.js,
//! vendored and served from here so the page needs nothing but the broker.
//!
//! Browsers send no bearer token when they navigate, so an auditor signs in once by pasting an
//! OIDC token. It is kept in an HttpOnly, SameSite=Strict cookie scoped to `/audit` and verified
//! again on every view: the session ends when the token expires, and a change to `[auditors]`
//! applies at the next click. Verifying does not spend one of the token's uses.

pub mod git_links;
mod render;

use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use time::OffsetDateTime;
use uuid::Uuid;

use super::{status_for, AppState, RequestParts};
use crate::audit::query::IssuanceFilter;
use crate::broker::audit_read::{self, AuditRead};
use crate::broker::{ErrorCode, ExchangeFailure};

const SESSION_COOKIE: &str = "credbroker_audit";

/// Vendored from npm `chart.js` 4.6.1 (`dist/chart.umd.min.js`, MIT; licence beside it).
const CHART_JS: &[u8] = include_bytes!("assets/chart.umd.min.js");
const AUDIT_JS: &[u8] = include_bytes!("assets/audit.js");
const AUDIT_CSS: &[u8] = include_bytes!("assets/audit.css");

/// Scripts and styles only from the broker itself, no inline code, no framing, forms that post
/// only back here.
const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
     connect-src 'none'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/audit", get(search))
        .route("/audit/session", post(sign_in))
        .route("/audit/session/end", post(sign_out))
        .route("/audit/issuances/{issuance_id}", get(detail))
        .route("/audit/assets/{file}", get(asset))
}

fn html(status: StatusCode, body: String) -> Response {
    let mut response = (status, body).into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/html; charset=utf-8"));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CONTENT_SECURITY_POLICY));
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    response
}

fn session_token(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(';'))
        .filter_map(|pair| pair.trim().strip_prefix(SESSION_COOKIE)?.strip_prefix('='))
        .find(|token| !token.is_empty())
        .map(str::to_owned)
}

fn session_cookie(token: &str, max_age_seconds: i64, secure: bool) -> Option<HeaderValue> {
    let secure = if secure { "; Secure" } else { "" };
    HeaderValue::from_str(&format!("{SESSION_COOKIE}={token}; Path=/audit; HttpOnly; SameSite=Strict; Max-Age={max_age_seconds}{secure}")).ok()
}

fn redirect(location: &'static str, cookie: Option<HeaderValue>) -> Response {
    let mut response = StatusCode::SEE_OTHER.into_response();
    response.headers_mut().insert(header::LOCATION, HeaderValue::from_static(location));
    if let Some(cookie) = cookie {
        response.headers_mut().insert(header::SET_COOKIE, cookie);
    }
    response
}

/// Verifies the session's token and records the view; a missing or no longer valid token
/// leads back to the sign-in form (with the cookie cleared), a refusal to an error page.
async fn authorize(state: &AppState, parts: &RequestParts, what: &str) -> Result<AuditRead, Response> {
    let Some(token) = session_token(&parts.headers) else {
        return Err(html(StatusCode::OK, render::sign_in(None)));
    };
    let input = crate::broker::ExchangeInput { bearer_token: Some(&token), ..parts.input() };
    audit_read::authorize_read(&state.broker, &input, what).await.map_err(|failure| refusal(state, failure))
}

fn refusal(state: &AppState, failure: ExchangeFailure) -> Response {
    let problem = super::Problem::from(failure);
    let status = status_for(problem.code);
    match problem.code {
        ErrorCode::InvalidToken | ErrorCode::UntrustedIssuer => {
            let mut response = html(status, render::sign_in(Some(&format!("Sign in again: {}", problem.detail))));
            if let Some(cookie) = session_cookie("", 0, state.secure_cookies) {
                response.headers_mut().insert(header::SET_COOKIE, cookie);
            }
            response
        }
        ErrorCode::AccessDenied => html(status, render::problem(None, "Not an auditor", &problem.detail)),
        _ => html(status, render::problem(None, "The audit log cannot be read right now", &problem.detail)),
    }
}

async fn search(State(state): State<AppState>, parts: RequestParts) -> Response {
    let query = &parts.query;
    // A GET form sends every field; an empty one means "not filtered on".
    let filters: Vec<(String, String)> =
        form_urlencoded::parse(query.as_bytes()).filter(|(_, value)| !value.trim().is_empty()).map(|(k, v)| (k.into_owned(), v.into_owned())).collect();
    let read = match authorize(&state, &parts, &format!("GET /audit?{query}")).await {
        Ok(read) => read,
        Err(response) => return response,
    };
    let now = OffsetDateTime::now_utc();
    let filter = match IssuanceFilter::parse(filters.iter().map(|(k, v)| (k.as_str(), v.as_str())), now) {
        Ok(filter) => filter,
        Err(error) => {
            let view = render::Search { reader: &read.reader, filters: &filters, error: Some(&error.to_string()), page: None, timeline: None };
            return html(StatusCode::BAD_REQUEST, render::search(&view));
        }
    };
    let store = state.broker.audit.store();
    let (page, timeline) = match tokio::try_join!(store.query_issuances(&filter), store.issuance_timeline(&filter, now)) {
        Ok(results) => results,
        Err(error) => {
            tracing::error!(%error, "audit page query failed");
            return html(StatusCode::SERVICE_UNAVAILABLE, render::problem(Some(&read.reader), "The audit log cannot be read right now", "retry shortly"));
        }
    };
    let view = render::Search { reader: &read.reader, filters: &filters, error: None, page: Some(&page), timeline: Some(&timeline) };
    html(StatusCode::OK, render::search(&view))
}

async fn detail(State(state): State<AppState>, Path(issuance_id): Path<String>, parts: RequestParts) -> Response {
    let read = match authorize(&state, &parts, &format!("GET /audit/issuances/{issuance_id}")).await {
        Ok(read) => read,
        Err(response) => return response,
    };
    let Ok(id) = Uuid::parse_str(&issuance_id) else {
        return html(StatusCode::BAD_REQUEST, render::problem(Some(&read.reader), "No such record", "a record id is a UUID"));
    };
    match state.broker.audit.store().issuance_lifecycle(id).await {
        Ok(Some(record)) => {
            let links = state.audit_links.for_record(record.issuance.issuer.as_deref(), record.issuance.claims.as_ref());
            html(StatusCode::OK, render::detail(&read.reader, &record, &links))
        }
        Ok(None) => html(StatusCode::NOT_FOUND, render::problem(Some(&read.reader), "No such record", &format!("no audit record {id}"))),
        Err(error) => {
            tracing::error!(%error, "audit page query failed");
            html(StatusCode::SERVICE_UNAVAILABLE, render::problem(Some(&read.reader), "The audit log cannot be read right now", "retry shortly"))
        }
    }
}

/// Takes the pasted token, and keeps it in the session cookie if `[auditors]` binds it.
async fn sign_in(State(state): State<AppState>, parts: RequestParts) -> Response {
    // Another site must not be able to sign a browser in under its own token.
    if parts.headers.get("sec-fetch-site").is_some_and(|site| site.as_bytes() == b"cross-site") {
        return html(StatusCode::FORBIDDEN, render::problem(None, "Refused", "sign-in must come from this page"));
    }
    let token = form_urlencoded::parse(&parts.body).find(|(name, _)| *name == "token").map(|(_, token)| token.trim().to_owned());
    let Some(token) = token.filter(|token| !token.is_empty()) else {
        return html(StatusCode::BAD_REQUEST, render::sign_in(Some("Paste a token first.")));
    };
    let input = crate::broker::ExchangeInput { bearer_token: Some(&token), ..parts.input() };
    let read = match audit_read::authorize_read(&state.broker, &input, "sign in to /audit").await {
        Ok(read) => read,
        Err(failure) => return refusal(&state, failure),
    };
    let max_age = (read.token_expires_at - OffsetDateTime::now_utc()).whole_seconds().max(0);
    match session_cookie(&token, max_age, state.secure_cookies) {
        Some(cookie) => redirect("/audit", Some(cookie)),
        None => html(StatusCode::BAD_REQUEST, render::sign_in(Some("That is not a token."))),
    }
}

async fn sign_out(State(state): State<AppState>) -> Response {
    redirect("/audit", session_cookie("", 0, state.secure_cookies))
}

async fn asset(Path(file): Path<String>) -> Response {
    let (body, content_type) = match file.as_str() {
        "chart.umd.min.js" => (CHART_JS, "text/javascript; charset=utf-8"),
        "audit.js" => (AUDIT_JS, "text/javascript; charset=utf-8"),
        "audit.css" => (AUDIT_CSS, "text/css; charset=utf-8"),
        _ => return StatusCode::NOT_FOUND.into_response(),
    };
    let mut response = body.into_response();
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response.headers_mut().insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    response.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("public, max-age=3600"));
    response
}
