//! The one mapping from failures to HTTP: RFC 9457 `application/problem+json` with a stable
//! `code`. Clients get the class and a useful detail; the log gets the error chain.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;
use uuid::Uuid;

use crate::broker::{ErrorCode, ExchangeFailure};

/// The status of every code, for every endpoint: a code always means the same status.
pub fn status(code: ErrorCode) -> StatusCode {
    match code {
        ErrorCode::InvalidRequest => StatusCode::BAD_REQUEST,
        ErrorCode::InvalidToken | ErrorCode::UntrustedIssuer | ErrorCode::InvalidSignature => StatusCode::UNAUTHORIZED,
        ErrorCode::DeliveryReplayed => StatusCode::CONFLICT,
        ErrorCode::AccessDenied => StatusCode::FORBIDDEN,
        ErrorCode::NotFound => StatusCode::NOT_FOUND,
        ErrorCode::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
        ErrorCode::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
        ErrorCode::TokenReplayed => StatusCode::CONFLICT,
        ErrorCode::TtlNotSatisfiable | ErrorCode::PolicyInvalid => StatusCode::UNPROCESSABLE_ENTITY,
        ErrorCode::RateLimited => StatusCode::TOO_MANY_REQUESTS,
        ErrorCode::BackendFailed => StatusCode::BAD_GATEWAY,
        ErrorCode::AuditUnavailable | ErrorCode::IssuerUnavailable | ErrorCode::RequestTimeout => {
            StatusCode::SERVICE_UNAVAILABLE
        }
    }
}

pub struct Problem {
    pub code: ErrorCode,
    pub detail: String,
    pub issuance_id: Option<Uuid>,
    /// The query parameter or field at fault, for `invalid_request`.
    pub parameter: Option<String>,
}

impl Problem {
    pub fn new(code: ErrorCode, detail: impl Into<String>) -> Self {
        Self { code, detail: detail.into(), issuance_id: None, parameter: None }
    }

    pub fn with_parameter(mut self, parameter: impl Into<String>) -> Self {
        self.parameter = Some(parameter.into());
        self
    }
}

impl From<ExchangeFailure> for Problem {
    fn from(failure: ExchangeFailure) -> Self {
        let code = failure.error.code();
        if status(code).is_server_error() {
            // A backend's detail is written to be shown (Vault's or STS's message, never a
            // secret); other server-side failures get fixed wording. The full chain is logged.
            let detail = match code {
                ErrorCode::BackendFailed => failure.error.client_detail(),
                _ => server_detail(code),
            };
            tracing::error!(issuance_id = %failure.issuance_id, code = code.as_str(), error = ?anyhow::Error::from(failure.error), "exchange failed");
            return Self { code, detail, issuance_id: Some(failure.issuance_id), parameter: None };
        }
        tracing::info!(issuance_id = %failure.issuance_id, code = code.as_str(), error = %failure.error, "exchange refused");
        Self { code, detail: failure.error.client_detail(), issuance_id: Some(failure.issuance_id), parameter: None }
    }
}

fn server_detail(code: ErrorCode) -> String {
    match code {
        ErrorCode::AuditUnavailable => "the audit log cannot be written, so no credential is issued; retry shortly".into(),
        ErrorCode::IssuerUnavailable => "the token's issuer cannot be reached to fetch its keys; retry shortly".into(),
        _ => "the broker could not complete the request".into(),
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let status = status(self.code);
        let mut body = json!({
            "type": format!("https://credbroker.dev/problems/{}", self.code.as_str()),
            "title": status.canonical_reason().unwrap_or("Error"),
            "status": status.as_u16(),
            "code": self.code.as_str(),
            "detail": self.detail,
        });
        if let Some(id) = self.issuance_id {
            body["issuance_id"] = json!(id);
        }
        if let Some(parameter) = &self.parameter {
            body["parameter"] = json!(parameter);
        }
        let mut response = (status, body.to_string()).into_response();
        let headers = response.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/problem+json"));
        if status == StatusCode::TOO_MANY_REQUESTS {
            headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        if status == StatusCode::UNAUTHORIZED {
            // RFC 6750: every 401 tells the client which scheme and what went wrong.
            let challenge = format!(
                "Bearer error=\"invalid_token\", error_description=\"{}\"",
                self.code.as_str()
            );
            if let Ok(value) = HeaderValue::from_str(&challenge) {
                headers.insert(header::WWW_AUTHENTICATE, value);
            }
        }
        response
    }
}
