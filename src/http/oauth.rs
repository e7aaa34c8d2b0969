//! `POST /oauth/token`: an OAuth 2.0 token endpoint (RFC 6749 §3.2) for clients that fetch and
//! refresh their own tokens, Kafka's OIDC login first. The job token arrives in the form as a
//! token-exchange `subject_token` (RFC 8693), a jwt-bearer `assertion` (RFC 7523 §2.1) or a
//! `client_assertion` (RFC 7523 §2.2); the role in `scope`. Past the form this is
//! `POST /v1/credentials` ([`Broker::exchange_oauth`]): the same verify, decide, single-use and
//! record path and the same audit row, with `endpoint = oauth_token`. The row keeps
//! credbroker's own code; the OAuth error a client sees is this edge's mapping of it.

use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use super::{AppState, Problem, RequestParts, MAX_BODY_BYTES};
use crate::broker::{CredentialRequest, ErrorCode};
use crate::policy::TtlRequest;

pub const TOKEN_EXCHANGE: &str = "urn:ietf:params:oauth:grant-type:token-exchange";
pub const JWT_BEARER: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";
pub const CLIENT_CREDENTIALS: &str = "client_credentials";
/// What the broker's discovery document advertises.
pub const GRANT_TYPES: [&str; 3] = [TOKEN_EXCHANGE, JWT_BEARER, CLIENT_CREDENTIALS];
const CLIENT_ASSERTION_TYPE: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";
/// The job tokens a token exchange accepts as `subject_token`.
const SUBJECT_TOKEN_TYPES: [&str; 2] = ["urn:ietf:params:oauth:token-type:id_token", "urn:ietf:params:oauth:token-type:jwt"];
/// What a token exchange may ask for: every token the broker issues here is a JWT, an access
/// token (Kafka) or an ID token (Snowflake); `issued_token_type` says which the role gives.
const REQUESTED_TOKEN_TYPES: [&str; 3] =
    ["urn:ietf:params:oauth:token-type:access_token", "urn:ietf:params:oauth:token-type:id_token", "urn:ietf:params:oauth:token-type:jwt"];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Grant {
    TokenExchange,
    JwtBearer,
    ClientCredentials,
}

impl Grant {
    /// The error for a job token that fails verification or is used up, as each grant's RFC
    /// says: RFC 8693 §2.2.2, RFC 7523 §3.1 and §3.2.
    fn bad_token(self) -> OauthError {
        match self {
            Grant::TokenExchange => OauthError::InvalidRequest,
            Grant::JwtBearer => OauthError::InvalidGrant,
            Grant::ClientCredentials => OauthError::InvalidClient,
        }
    }

    /// The form field that carries the job token.
    fn token_field(self) -> &'static str {
        match self {
            Grant::TokenExchange => "subject_token",
            Grant::JwtBearer => "assertion",
            Grant::ClientCredentials => "client_assertion",
        }
    }
}

/// The form field the role came from: a refusal of a role named by `audience` or `resource`
/// is `invalid_target` (RFC 8693 §2.2.2), of one named by `scope` `invalid_scope`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RoleFrom {
    Scope,
    Audience,
    Resource,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OauthError {
    InvalidRequest,
    InvalidClient,
    InvalidGrant,
    InvalidScope,
    InvalidTarget,
    UnsupportedGrantType,
    /// The broker or a system it needs cannot answer now (429/503): retry.
    TemporarilyUnavailable,
    /// A backend failed (502).
    ServerError,
}

impl OauthError {
    fn as_str(self) -> &'static str {
        match self {
            OauthError::InvalidRequest => "invalid_request",
            OauthError::InvalidClient => "invalid_client",
            OauthError::InvalidGrant => "invalid_grant",
            OauthError::InvalidScope => "invalid_scope",
            OauthError::InvalidTarget => "invalid_target",
            OauthError::UnsupportedGrantType => "unsupported_grant_type",
            OauthError::TemporarilyUnavailable => "temporarily_unavailable",
            OauthError::ServerError => "server_error",
        }
    }
}

/// What is wrong with a form, as the OAuth error the client gets.
#[derive(Debug, Clone, PartialEq, Eq)]
struct FormError {
    error: OauthError,
    description: String,
}

impl FormError {
    fn new(error: OauthError, description: impl Into<String>) -> Self {
        Self { error, description: description.into() }
    }
}

/// A token request's form, read: the job token it carries (when it carries one) goes to the
/// broker for verification even when something else in the form is wrong, so the row names
/// who asked.
#[derive(Debug)]
struct TokenForm {
    grant: Option<Grant>,
    role_from: RoleFrom,
    job_token: Option<String>,
    request: Result<CredentialRequest, FormError>,
}

impl TokenForm {
    /// A form refused before its job token is read: nothing goes to verification.
    fn refused(grant: Option<Grant>, error: FormError) -> Self {
        Self { grant, role_from: RoleFrom::Scope, job_token: None, request: Err(error) }
    }
}

fn read_form(headers: &HeaderMap, body: &[u8]) -> TokenForm {
    let invalid = |description: String| TokenForm::refused(None, FormError::new(OauthError::InvalidRequest, description));
    let content_type = headers.get(header::CONTENT_TYPE).and_then(|value| value.to_str().ok()).unwrap_or_default();
    let media_type = content_type.split(';').next().unwrap_or_default().trim();
    if !media_type.eq_ignore_ascii_case("application/x-www-form-urlencoded") {
        return invalid(format!(
            "the token endpoint takes application/x-www-form-urlencoded (RFC 6749 section 3.2), not {:?}",
            if content_type.is_empty() { "no content type" } else { content_type }
        ));
    }
    let mut fields: Vec<(String, String)> = Vec::new();
    for (name, value) in form_urlencoded::parse(body) {
        if fields.iter().any(|(seen, _)| *seen == name) {
            return invalid(format!("parameter {name} is given more than once (RFC 6749 section 3.2)"));
        }
        fields.push((name.into_owned(), value.into_owned()));
    }
    let field = |name: &str| field(&fields, name);

    let grant = match field("grant_type") {
        None => return invalid("grant_type is required".into()),
        Some(TOKEN_EXCHANGE) => Grant::TokenExchange,
        Some(JWT_BEARER) => Grant::JwtBearer,
        Some(CLIENT_CREDENTIALS) => Grant::ClientCredentials,
        Some(other) => {
            let error = FormError::new(OauthError::UnsupportedGrantType, format!("grant_type {other:?} is not supported; use one of {GRANT_TYPES:?}"));
            return TokenForm::refused(None, error);
        }
    };
    if grant == Grant::ClientCredentials {
        if headers.contains_key(header::AUTHORIZATION) || field("client_secret").is_some() {
            let error = FormError::new(
                OauthError::InvalidClient,
                "client secrets are not accepted: authenticate with the job token as client_assertion (RFC 7523 section 2.2)",
            );
            return TokenForm::refused(Some(grant), error);
        }
        if field("client_assertion_type") != Some(CLIENT_ASSERTION_TYPE) {
            let error = FormError::new(OauthError::InvalidClient, format!("client_assertion_type must be {CLIENT_ASSERTION_TYPE}"));
            return TokenForm::refused(Some(grant), error);
        }
    }
    let Some(job_token) = field(grant.token_field()).map(str::to_owned) else {
        let error = match grant {
            Grant::ClientCredentials => OauthError::InvalidClient,
            _ => OauthError::InvalidRequest,
        };
        let description = format!("{} is required: the job's OIDC token", grant.token_field());
        return TokenForm::refused(Some(grant), FormError::new(error, description));
    };
    let (role_from, request) = read_role(grant, &fields);
    TokenForm { grant: Some(grant), role_from, job_token: Some(job_token), request }
}

/// The role a form names, once its grant and job token are read; where it came from decides
/// the error of its refusal.
fn read_role(grant: Grant, fields: &[(String, String)]) -> (RoleFrom, Result<CredentialRequest, FormError>) {
    let field = |name: &str| field(fields, name);
    if grant == Grant::TokenExchange {
        let invalid = |description: String| (RoleFrom::Scope, Err(FormError::new(OauthError::InvalidRequest, description)));
        match field("subject_token_type") {
            Some(kind) if SUBJECT_TOKEN_TYPES.contains(&kind) => {}
            other => return invalid(format!("subject_token_type must be one of {SUBJECT_TOKEN_TYPES:?}, got {other:?}")),
        }
        if field("actor_token").is_some() {
            return invalid("actor_token is not supported: the broker issues to the job itself, not on behalf of another party".into());
        }
        if let Some(kind) = field("requested_token_type").filter(|kind| !REQUESTED_TOKEN_TYPES.contains(kind)) {
            return invalid(format!("requested_token_type {kind:?} cannot be issued; the broker issues {REQUESTED_TOKEN_TYPES:?}"));
        }
    }
    // The role: `scope`; a token exchange may name it by `audience` or `resource` instead,
    // and `scope` wins when several are given (then `audience`, then `resource`).
    let named = match (field("scope"), grant) {
        (Some(scope), _) => Some((scope, RoleFrom::Scope)),
        (None, Grant::TokenExchange) => {
            field("audience").map(|role| (role, RoleFrom::Audience)).or_else(|| field("resource").map(|role| (role, RoleFrom::Resource)))
        }
        (None, _) => None,
    };
    let Some((named, role_from)) = named else {
        let also = if grant == Grant::TokenExchange { " (or audience, or resource)" } else { "" };
        return (RoleFrom::Scope, Err(FormError::new(OauthError::InvalidScope, format!("scope{also} must name the credbroker role to issue for"))));
    };
    let refused = match role_from {
        RoleFrom::Scope => OauthError::InvalidScope,
        RoleFrom::Audience | RoleFrom::Resource => OauthError::InvalidTarget,
    };
    let mut roles = named.split(' ').filter(|part| !part.is_empty());
    let request = match (roles.next(), roles.next()) {
        (Some(role), None) if role.len() <= 128 => Ok(CredentialRequest { role: role.to_owned(), ttl: TtlRequest::default(), renews: None }),
        (Some(_), None) => Err(FormError::new(refused, "a role name has at most 128 characters")),
        _ => Err(FormError::new(refused, format!("{named:?} must name exactly one credbroker role"))),
    };
    (role_from, request)
}

/// A parameter's value; an empty one counts as absent (RFC 6749 section 3.1).
fn field<'a>(fields: &'a [(String, String)], name: &str) -> Option<&'a str> {
    fields.iter().find(|(seen, value)| seen == name && !value.is_empty()).map(|(_, value)| value.as_str())
}

pub(super) async fn token(State(state): State<AppState>, parts: Result<RequestParts, Response>) -> Response {
    let Ok(parts) = parts else {
        return refusal(OauthError::InvalidRequest, StatusCode::BAD_REQUEST, format!("the form exceeds {MAX_BODY_BYTES} bytes"), None);
    };
    let form = read_form(&parts.headers, &parts.body);
    let input = crate::broker::ExchangeInput { bearer_token: form.job_token.as_deref(), ..parts.input() };
    let request = form.request.clone().map_err(|problem| problem.description);
    // Boxed, as in `create_credential`: axum copies this handler's future on every request.
    match Box::pin(state.broker.exchange_oauth(input, request)).await {
        Ok(issued) => {
            let body = json!({
                "access_token": issued.credential.expose_primary(),
                "token_type": "Bearer",
                "expires_in": issued.ttl.seconds(),
                "issued_token_type": issued.bearer_token_type,
                "scope": issued.role,
                "issuance_id": issued.issuance_id,
            });
            let mut response = Json(body).into_response();
            // RFC 6749 section 5.1: a token response is never cached.
            response.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
            response
        }
        Err(failure) => {
            // The problem mapping logs the failure and words its detail for clients.
            let problem = Problem::from(failure);
            let error = match problem.code {
                ErrorCode::InvalidRequest => form.request.as_ref().err().map_or(OauthError::InvalidRequest, |problem| problem.error),
                ErrorCode::InvalidToken | ErrorCode::UntrustedIssuer | ErrorCode::TokenReplayed | ErrorCode::TtlNotSatisfiable => {
                    form.grant.map_or(OauthError::InvalidRequest, Grant::bad_token)
                }
                ErrorCode::AccessDenied => match form.role_from {
                    RoleFrom::Scope => OauthError::InvalidScope,
                    RoleFrom::Audience | RoleFrom::Resource => OauthError::InvalidTarget,
                },
                ErrorCode::BackendFailed => OauthError::ServerError,
                code if super::status_for(code).is_server_error() || code == ErrorCode::RateLimited => OauthError::TemporarilyUnavailable,
                _ => OauthError::InvalidRequest,
            };
            let status = match error {
                OauthError::InvalidClient => StatusCode::UNAUTHORIZED,
                OauthError::TemporarilyUnavailable | OauthError::ServerError => super::status_for(problem.code),
                _ => StatusCode::BAD_REQUEST,
            };
            let mut response = refusal(error, status, problem.detail, problem.issuance_id);
            // RFC 6749 section 5.2: a client that authenticated with an Authorization header
            // is told which scheme failed.
            let scheme = parts.headers.get(header::AUTHORIZATION).and_then(|value| value.to_str().ok()).and_then(|value| value.split(' ').next());
            if let (OauthError::InvalidClient, Some(scheme)) = (error, scheme) {
                if let Ok(challenge) = HeaderValue::from_str(&format!("{scheme} realm=\"credbroker\"")) {
                    response.headers_mut().insert(header::WWW_AUTHENTICATE, challenge);
                }
            }
            response
        }
    }
}

/// RFC 6749 section 5.2's error body; `issuance_id` names the audit row to quote.
fn refusal(error: OauthError, status: StatusCode, description: String, issuance_id: Option<uuid::Uuid>) -> Response {
    let mut body = json!({ "error": error.as_str(), "error_description": description_text(&description) });
    if let Some(id) = issuance_id {
        body["issuance_id"] = json!(id);
    }
    let mut response = (status, Json(body)).into_response();
    let headers = response.headers_mut();
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    if status == StatusCode::TOO_MANY_REQUESTS {
        headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    response
}

/// `error_description` may hold only printable ASCII without `"` and `\` (RFC 6749 section 5.2).
fn description_text(text: &str) -> String {
    text.chars()
        .map(|c| match c {
            '"' => '\'',
            '\\' => '/',
            ' '..='~' => c,
            _ => '?',
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn form(body: &str) -> TokenForm {
        let mut headers = HeaderMap::new();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/x-www-form-urlencoded; charset=UTF-8"));
        read_form(&headers, body.as_bytes())
    }

    fn exchange(extra: &str) -> TokenForm {
        form(&format!("grant_type={TOKEN_EXCHANGE}&subject_token=t&subject_token_type=urn:ietf:params:oauth:token-type:jwt{extra}"))
    }

    #[test]
    fn scope_wins_over_audience_and_resource_then_audience_over_resource() {
        let read = exchange("&scope=a&audience=b&resource=c");
        assert_eq!((read.request.unwrap().role, read.role_from), ("a".into(), RoleFrom::Scope));
        let read = exchange("&audience=b&resource=c");
        assert_eq!((read.request.unwrap().role, read.role_from), ("b".into(), RoleFrom::Audience));
        let read = exchange("&resource=c");
        assert_eq!((read.request.unwrap().role, read.role_from), ("c".into(), RoleFrom::Resource));
    }

    #[test]
    fn audience_and_resource_name_a_role_only_in_a_token_exchange() {
        let read = form(&format!("grant_type={JWT_BEARER}&assertion=t&audience=b"));
        assert_eq!(read.request.unwrap_err().error, OauthError::InvalidScope);
        assert_eq!(read.job_token.as_deref(), Some("t"), "the token is still verified, so the row names who asked");
    }

    #[test]
    fn a_form_is_refused_with_the_error_its_fault_calls_for() {
        let cases = [
            ("grant_type=password&username=u", OauthError::UnsupportedGrantType),
            ("scope=a", OauthError::InvalidRequest),
            (&format!("grant_type={JWT_BEARER}&assertion=t&assertion=u&scope=a"), OauthError::InvalidRequest),
            (&format!("grant_type={JWT_BEARER}&scope=a"), OauthError::InvalidRequest),
            (&format!("grant_type={JWT_BEARER}&assertion=t&scope=a%20b"), OauthError::InvalidScope),
            (&format!("grant_type={TOKEN_EXCHANGE}&subject_token=t&subject_token_type=urn:ietf:params:oauth:token-type:saml2&scope=a"), OauthError::InvalidRequest),
            (&format!("grant_type={TOKEN_EXCHANGE}&subject_token=t&subject_token_type=urn:ietf:params:oauth:token-type:jwt&audience=a%20b"), OauthError::InvalidTarget),
            ("grant_type=client_credentials&client_assertion=t&scope=a", OauthError::InvalidClient),
            (&format!("grant_type=client_credentials&client_assertion_type={CLIENT_ASSERTION_TYPE}&scope=a"), OauthError::InvalidClient),
            (&format!("grant_type=client_credentials&client_assertion_type={CLIENT_ASSERTION_TYPE}&client_assertion=t&client_secret=s&scope=a"), OauthError::InvalidClient),
        ];
        for (body, expected) in cases {
            assert_eq!(form(body).request.unwrap_err().error, expected, "{body}");
        }
        let ok = form(&format!("grant_type=client_credentials&client_assertion_type={CLIENT_ASSERTION_TYPE}&client_assertion=t&scope=a"));
        assert_eq!((ok.grant, ok.job_token.as_deref(), ok.request.unwrap().role.as_str()), (Some(Grant::ClientCredentials), Some("t"), "a"));
    }

    #[test]
    fn only_form_encoded_bodies_are_read() {
        let mut headers = HeaderMap::new();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        let read = read_form(&headers, format!("grant_type={JWT_BEARER}&assertion=t&scope=a").as_bytes());
        assert_eq!((read.request.unwrap_err().error, read.job_token), (OauthError::InvalidRequest, None));
    }

    #[test]
    fn descriptions_keep_to_the_characters_rfc_6749_allows() {
        assert_eq!(description_text("role \"x\" → \\y"), "role 'x' ? /y");
    }
}
