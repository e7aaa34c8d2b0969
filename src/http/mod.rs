//! The HTTP edge: routing, request ids, timeouts, body limits. Handlers only translate
//! between HTTP and the broker.

pub mod audit_page;
mod issuances;
mod gogs;
pub mod oauth;
mod problem;
mod serve;
pub mod tls;

use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{ConnectInfo, FromRequest, FromRequestParts, Path, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};

pub use problem::{status as status_for, Problem};
pub use serve::serve;

use crate::types::rfc3339;

use crate::broker::{admin, release, Broker, ErrorCode, ExchangeInput};

pub const MAX_BODY_BYTES: usize = 64 * 1024;
const REQUEST_ID_HEADER: &str = "x-request-id";

#[derive(Clone)]
pub struct AppState {
    pub broker: Arc<Broker>,
    /// Documents that never change while the process runs, rendered once. (The JWKS is
    /// rendered per request: a Vault transit key's versions change while the broker runs.)
    pub openid_configuration: Bytes,
    pub dev_issuer: Option<DevIssuerDocuments>,
    pub request_timeout: Duration,
    /// Where the `/audit` page links records back to the Git server.
    pub audit_links: Arc<audit_page::git_links::GitLinks>,
    /// The `/audit` session cookie is `Secure` when `public_url` is https.
    pub secure_cookies: bool,
    /// Whose `X-Forwarded-For` names the client for the audit row (`trusted_proxies`).
    pub trusted_proxies: Arc<Vec<crate::types::IpNetwork>>,
    /// `/metrics` is served on the main listener (no `metrics_listen`).
    pub metrics_on_listener: bool,
}

#[derive(Clone)]
pub struct DevIssuerDocuments {
    pub openid_configuration: Bytes,
    pub jwks: Bytes,
}

pub fn app(state: AppState) -> Router {
    let mut router = Router::new()
        .route("/v1/credentials", post(create_credential))
        .route("/oauth/token", post(oauth::token))
        .route("/v1/credentials/{issuance_id}", axum::routing::delete(release_credential))
        .route("/v1/revocations", post(|state, parts| admin(state, parts, AdminAction::Revoke)))
        .route(
            "/v1/freezes",
            post(|state, parts| admin(state, parts, AdminAction::Freeze))
                .delete(|state, parts| admin(state, parts, AdminAction::Unfreeze)),
        )
        .route("/v1/policies/reload", post(|state, parts| admin(state, parts, AdminAction::ReloadPolicies)))
        .route("/v1/issuances", get(issuances::list))
        .route("/v1/issuances/{issuance_id}", get(issuances::one))
        .route("/v1/hooks/gogs/{hook}", post(gogs::receive))
        .route("/.well-known/jwks.json", get(jwks))
        .route("/.well-known/openid-configuration", get(openid_configuration))
        .route("/openapi.json", get(openapi))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .merge(audit_page::router());
    if state.metrics_on_listener {
        router = router.route("/metrics", get(metrics));
    }
    if state.dev_issuer.is_some() {
        router = router
            .route("/dev/.well-known/openid-configuration", get(dev_openid_configuration))
            .route("/dev/jwks.json", get(dev_jwks));
    }
    let timeout = state.request_timeout;
    let trusted_proxies = state.trusted_proxies.clone();
    router
        .fallback(|| async { Problem::new(ErrorCode::NotFound, "no such endpoint") })
        .layer(middleware::from_fn(move |request, next| at_the_edge(timeout, trusted_proxies.clone(), request, next)))
        .with_state(state)
}

/// Every request's way in and out, in one layer rather than one per concern (each `from_fn`
/// layer boxes the service and its future again for every request; bench/README.md, eleventh
/// session). From the outside in: the request id, the span carrying it and the one log line
/// each request ends in; the client's address; the time limit.
async fn at_the_edge(timeout: Duration, trusted_proxies: Arc<Vec<crate::types::IpNetwork>>, mut request: Request, next: Next) -> Response {
    let request_id = request_id(&request);
    request.extensions_mut().insert(RequestId(request_id.clone()));
    let address = client_addr_of(&request, &trusted_proxies);
    request.extensions_mut().insert(address);
    // The exchange fills in `issuance_id` and `role`, so its one "request finished" line says
    // what was issued; the audit row holds the rest.
    let span = tracing::info_span!(
        "request",
        request_id = %request_id,
        method = %request.method(),
        path = %request.uri().path(),
        issuance_id = tracing::field::Empty,
        role = tracing::field::Empty,
    );
    let started = std::time::Instant::now();
    let mut response = tracing::Instrument::instrument(within(timeout, next.run(request)), span.clone()).await;
    span.in_scope(|| {
        tracing::info!(status = response.status().as_u16(), elapsed_ms = started.elapsed().as_millis() as u64, "request finished")
    });
    if let Ok(value) = HeaderValue::from_str(&request_id) {
        response.headers_mut().insert(REQUEST_ID_HEADER, value);
    }
    response
}

/// Accepts a caller's `x-request-id` when it is sane, otherwise makes one.
fn request_id(request: &Request) -> String {
    let supplied = request.headers().get(REQUEST_ID_HEADER).and_then(|v| v.to_str().ok()).filter(|id| {
        !id.is_empty() && id.len() <= 128 && id.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b))
    });
    // A random UUID from the thread's CSPRNG: `Uuid::new_v4` would make a system call per request.
    supplied.map(str::to_owned).unwrap_or_else(|| uuid::Builder::from_random_bytes(rand::random()).into_uuid().to_string())
}

async fn within(timeout: Duration, response: impl std::future::Future<Output = Response>) -> Response {
    match tokio::time::timeout(timeout, response).await {
        Ok(response) => response,
        Err(_) => Problem::new(ErrorCode::RequestTimeout, format!("the request took longer than {} s", timeout.as_secs()))
            .into_response(),
    }
}

/// `/metrics` alone, for `metrics_listen`.
pub fn metrics_app(state: AppState) -> Router {
    Router::new().route("/metrics", get(metrics)).with_state(state)
}

/// No token: Prometheus scrapes without one. Keep it private with `metrics_listen`.
async fn metrics(State(state): State<AppState>) -> Response {
    let text = state.broker.render_metrics().await;
    ([(header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)], text).into_response()
}

#[derive(Clone)]
struct RequestId(String);

/// The client's address as the audit row records it (see [`client_addr`]).
#[derive(Clone)]
pub(crate) struct ClientAddr(pub(crate) Option<String>);

fn client_addr_of(request: &Request, trusted: &[crate::types::IpNetwork]) -> ClientAddr {
    let peer = request.extensions().get::<ConnectInfo<tls::PeerAddr>>().map(|info| info.0 .0.ip());
    let forwarded: Vec<&str> = request.headers().get_all("x-forwarded-for").iter().filter_map(|value| value.to_str().ok()).collect();
    ClientAddr(peer.map(|peer| client_addr(peer, &forwarded.join(","), trusted).to_string()))
}

/// The TCP peer, unless it is a trusted proxy: then the right-most `X-Forwarded-For` address
/// that is not itself a trusted proxy (each proxy appends the address it saw, so everything
/// left of that one was written by the client and proves nothing). A header that does not
/// parse is ignored, and the peer stands.
fn client_addr(peer: std::net::IpAddr, forwarded_for: &str, trusted: &[crate::types::IpNetwork]) -> std::net::IpAddr {
    let is_trusted = |ip: std::net::IpAddr| trusted.iter().any(|network| network.contains(ip));
    if !is_trusted(peer) || forwarded_for.trim().is_empty() {
        return peer;
    }
    let Ok(chain) = forwarded_for.split(',').map(|hop| hop.trim().parse::<std::net::IpAddr>()).collect::<Result<Vec<_>, _>>() else {
        return peer;
    };
    chain.iter().rev().copied().find(|hop| !is_trusted(*hop)).or(chain.first().copied()).unwrap_or(peer)
}

/// A route's one path parameter, percent-decoded. As an extractor its rejection (a value that
/// is not UTF-8 once decoded) is the crate's problem+json, not axum's plain text; like a body
/// over the limit it is refused unread, before any audit row.
pub(crate) struct PathParam(pub(crate) String);

impl<S: Send + Sync> FromRequestParts<S> for PathParam {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut axum::http::request::Parts, state: &S) -> Result<Self, Response> {
        match Path::<String>::from_request_parts(parts, state).await {
            Ok(Path(value)) => Ok(Self(value)),
            Err(rejection) => Err(Problem::new(ErrorCode::InvalidRequest, rejection.body_text()).into_response()),
        }
    }
}

/// A request taken apart: what [`ExchangeInput`] borrows from. As an extractor its rejection
/// (a body over [`MAX_BODY_BYTES`]) is the crate's problem+json like every other refusal.
pub(crate) struct RequestParts {
    request_id: String,
    client_addr: Option<String>,
    pub(crate) headers: HeaderMap,
    /// The URI's query string, empty when there is none.
    pub(crate) query: String,
    pub(crate) body: Bytes,
}

impl<S: Send + Sync> FromRequest<S> for RequestParts {
    type Rejection = Response;

    async fn from_request(request: Request, _state: &S) -> Result<Self, Response> {
        let (parts, body) = request.into_parts();
        let request_id = parts.extensions.get::<RequestId>().map(|id| id.0.clone()).unwrap_or_default();
        let client_addr = parts.extensions.get::<ClientAddr>().and_then(|addr| addr.0.clone());
        let body = axum::body::to_bytes(body, MAX_BODY_BYTES)
            .await
            .map_err(|_| Problem::new(ErrorCode::PayloadTooLarge, format!("request body exceeds {MAX_BODY_BYTES} bytes")).into_response())?;
        let query = parts.uri.query().unwrap_or_default().to_owned();
        Ok(Self { request_id, client_addr, headers: parts.headers, query, body })
    }
}

impl RequestParts {
    pub(crate) fn input(&self) -> ExchangeInput<'_> {
        ExchangeInput {
            request_id: &self.request_id,
            bearer_token: bearer_token(&self.headers),
            delivery_token: self
                .headers
                .get(crate::gogs::DELIVERY_TOKEN_HEADER)
                .and_then(|v| v.to_str().ok())
                .map(str::trim),
            body: &self.body,
            client_addr: self.client_addr.clone(),
            user_agent: self.headers.get(header::USER_AGENT).and_then(|v| v.to_str().ok()).map(|ua| ua.chars().take(256).collect()),
        }
    }
}

#[derive(Clone, Copy)]
enum AdminAction {
    Revoke,
    Freeze,
    Unfreeze,
    ReloadPolicies,
}

async fn admin(State(state): State<AppState>, parts: RequestParts, action: AdminAction) -> Response {
    let outcome = match action {
        AdminAction::Revoke => admin::revoke(&state.broker, parts.input()).await,
        AdminAction::Freeze => admin::freeze(&state.broker, parts.input(), false).await,
        AdminAction::Unfreeze => admin::freeze(&state.broker, parts.input(), true).await,
        AdminAction::ReloadPolicies => admin::reload_policies(&state.broker, parts.input()).await,
    };
    match outcome {
        Ok(body) => Json(body).into_response(),
        Err(failure) => Problem::from(failure).into_response(),
    }
}

/// A job ending its own credential early (`credbroker exec` when its command exits).
async fn release_credential(State(state): State<AppState>, PathParam(issuance_id): PathParam, parts: RequestParts) -> Response {
    match release::release(&state.broker, parts.input(), &issuance_id).await {
        Ok(body) => Json(body).into_response(),
        Err(failure) => Problem::from(failure).into_response(),
    }
}

async fn create_credential(State(state): State<AppState>, parts: RequestParts) -> Response {
    // Boxed: axum moves this handler's future into a box of its own on every request, and
    // the exchange's future is most of it (bench/README.md, "futures copied").
    match Box::pin(state.broker.exchange(parts.input())).await {
        Ok(issued) => {
            let body = IssuedBody {
                issuance_id: issued.issuance_id,
                role: &issued.role,
                target: &issued.target,
                backend: &issued.backend,
                ttl_seconds: issued.ttl.seconds(),
                expires_at: rfc3339(issued.expires_at),
                job_deadline: rfc3339(issued.job_deadline),
                credential: issued.credential.expose_fields(),
                env: issued.credential.expose_env(),
            };
            let mut response = Json(body).into_response();
            // A credential must not sit in any cache between here and the job.
            response.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
            response
        }
        Err(failure) => Problem::from(failure).into_response(),
    }
}

/// `POST /v1/credentials`' answer (openapi.json `Credential`), serialized from the credential
/// itself: no intermediate JSON value holds a copy of its secrets.
#[derive(serde::Serialize)]
struct IssuedBody<'a> {
    issuance_id: uuid::Uuid,
    role: &'a str,
    target: &'a str,
    backend: &'a str,
    ttl_seconds: u32,
    expires_at: String,
    job_deadline: String,
    credential: crate::backend::ExposedFields<'a>,
    env: crate::backend::ExposedEnv<'a>,
}

/// The token, if the header is `Bearer <token>`. Size is checked by the verifier before any parsing.
fn bearer_token(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim()).filter(|t| !t.is_empty())
}

fn json_document(body: &Bytes) -> Response {
    let mut response = body.clone().into_response();
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("public, max-age=300"));
    response
}

async fn jwks(State(state): State<AppState>) -> Response {
    let mut keys = state.broker.backends.published_keys();
    keys.extend(state.broker.gogs.iter().flat_map(|gogs| gogs.published_keys()));
    let keys = json!({ "keys": keys });
    json_document(&Bytes::from(keys.to_string()))
}

/// The API contract, written by hand next to this file and kept true by tests/openapi.rs.
const OPENAPI: &str = include_str!("openapi.json");

async fn openapi() -> Response {
    json_document(&Bytes::from_static(OPENAPI.as_bytes()))
}

async fn openid_configuration(State(state): State<AppState>) -> Response {
    json_document(&state.openid_configuration)
}

async fn dev_jwks(State(state): State<AppState>) -> Response {
    state.dev_issuer.map(|dev| json_document(&dev.jwks)).unwrap_or_else(|| StatusCode::NOT_FOUND.into_response())
}

async fn dev_openid_configuration(State(state): State<AppState>) -> Response {
    state
        .dev_issuer
        .map(|dev| json_document(&dev.openid_configuration))
        .unwrap_or_else(|| StatusCode::NOT_FOUND.into_response())
}

async fn healthz() -> Json<Value> {
    Json(json!({ "status": "ok" }))
}

/// Ready when the audit log can be written, policies are loaded and (when configured) Vault
/// is reachable with a live broker token: without them exchanges would fail, so a load
/// balancer should look elsewhere.
async fn readyz(State(state): State<AppState>) -> Response {
    let postgres = state.broker.audit.ping().await;
    let policies = state.broker.policies.current();
    let roles = policies.len();
    let mut ready = postgres.is_ok() && roles > 0;
    // A failed reload leaves the loaded set serving, so readiness stands; the detail says it.
    let reload = match state.broker.policies.last_reload_error() {
        Some(error) => format!("; the last reload failed and this set still serves: {error}"),
        None => String::new(),
    };
    let mut checks = json!({
        "postgres": match &postgres { Ok(()) => "ok".to_owned(), Err(e) => e.to_string() },
        "policies": format!("{roles} roles loaded, policy version {}{reload}", policies.version()),
    });
    if let Some(vault) = state.broker.backends.vault() {
        use crate::vault::Health;
        let health = vault.health().await;
        ready &= health == Health::Ready;
        checks["vault"] = json!(match health {
            Health::Ready => "ok".to_owned(),
            Health::Unreachable(reason) => format!("unreachable: {reason}"),
            Health::Unauthenticated(reason) => format!("unauthenticated: {reason}"),
        });
    }
    let body = json!({
        "status": if ready { "ready" } else { "not_ready" },
        "checks": checks,
    });
    let status = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (status, Json(body)).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwarded_for_counts_only_from_trusted_proxies_and_only_its_right_most_untrusted_hop() {
        let trusted = [crate::types::IpNetwork::parse("10.0.0.0/8").unwrap()];
        let ip = |text: &str| text.parse::<std::net::IpAddr>().unwrap();
        let proxy = ip("10.0.0.5");
        assert_eq!(client_addr(proxy, "203.0.113.7", &trusted), ip("203.0.113.7"));
        assert_eq!(client_addr(proxy, "198.51.100.1, 203.0.113.7, 10.0.0.9", &trusted), ip("203.0.113.7"), "the client wrote the left part");
        assert_eq!(client_addr(ip("192.0.2.50"), "203.0.113.7", &trusted), ip("192.0.2.50"), "an untrusted peer's header is ignored");
        assert_eq!(client_addr(proxy, "203.0.113.7, not-an-ip", &trusted), proxy, "an unparseable header is ignored");
        assert_eq!(client_addr(proxy, "", &trusted), proxy);
        assert_eq!(client_addr(proxy, "10.0.0.7, 10.0.0.8", &trusted), ip("10.0.0.7"), "all proxies: the first hop");
    }
}
