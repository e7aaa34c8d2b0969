//! `POST /v1/hooks/gogs/{hook}`: the edge of [`crate::gogs`]. Gogs treats any 2xx as delivered;
//! refusals are problem+json so the reason shows in Gogs' "Recent deliveries".

use axum::extract::{Path, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use secrecy::ExposeSecret;
use serde_json::json;

use super::{AppState, Problem};
use crate::types::rfc3339;
use crate::broker::ErrorCode;
use crate::gogs::HookError;

pub async fn receive(State(state): State<AppState>, Path(hook): Path<String>, request: Request) -> Response {
    let Some(gogs) = state.broker.gogs.clone() else {
        return Problem::new(ErrorCode::NotFound, "Gogs webhooks are not configured on this broker").into_response();
    };
    let (parts, body) = request.into_parts();
    let limit = gogs.max_payload_bytes();
    let body = match axum::body::to_bytes(body, limit).await {
        Ok(body) => body,
        Err(_) => {
            tracing::warn!(%hook, "Gogs delivery refused: body exceeds {limit} bytes");
            let problem = Problem::new(ErrorCode::InvalidRequest, format!("request body exceeds {limit} bytes"));
            return (StatusCode::PAYLOAD_TOO_LARGE, problem).into_response();
        }
    };
    let incoming = crate::gogs::IncomingDelivery {
        hook: &hook,
        delivery_id: header_text(&parts.headers, "x-gogs-delivery"),
        event: header_text(&parts.headers, "x-gogs-event"),
        signature: header_text(&parts.headers, "x-gogs-signature"),
        content_type: header_text(&parts.headers, header::CONTENT_TYPE.as_str()),
        body: &body,
    };
    match gogs.receive(incoming, state.broker.audit.store().pool()).await {
        Ok(received) => {
            let mut body = json!({
                "delivery_id": received.delivery_id,
                "event": received.event,
                "status": if received.acted_on { "accepted" } else { "ignored" },
            });
            if let Some(status) = received.forward_status {
                body["forward_status"] = json!(status);
            }
            if let Some((token, expires_at)) = received.token_for_response {
                body["delivery_token"] = json!(token.expose_secret());
                body["delivery_token_expires_at"] = json!(rfc3339(expires_at));
            }
            let mut response = Json(body).into_response();
            response.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
            response
        }
        Err(error) => refusal(&hook, error),
    }
}

fn header_text<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|value| value.to_str().ok()).map(str::trim)
}

fn refusal(hook: &str, error: HookError) -> Response {
    let (status, code) = match &error {
        HookError::UnknownHook(_) => (StatusCode::NOT_FOUND, ErrorCode::NotFound),
        HookError::Unsigned | HookError::BadSignature => (StatusCode::UNAUTHORIZED, ErrorCode::InvalidSignature),
        HookError::Replayed(_) => (StatusCode::CONFLICT, ErrorCode::DeliveryReplayed),
        HookError::RepositoryNotAccepted(_) => (StatusCode::FORBIDDEN, ErrorCode::AccessDenied),
        HookError::UnsupportedContentType(_) => (StatusCode::UNSUPPORTED_MEDIA_TYPE, ErrorCode::InvalidRequest),
        HookError::MissingHeader(_) | HookError::MalformedHeader(_) | HookError::MissingFormPayload | HookError::Payload(_) => {
            (StatusCode::BAD_REQUEST, ErrorCode::InvalidRequest)
        }
        HookError::Secret(_) | HookError::Signing(_) => (StatusCode::INTERNAL_SERVER_ERROR, ErrorCode::BackendFailed),
        HookError::Audit(_) => (StatusCode::SERVICE_UNAVAILABLE, ErrorCode::AuditUnavailable),
    };
    if status.is_server_error() {
        tracing::error!(%hook, code = code.as_str(), error = %error, "Gogs delivery failed");
        let detail = "the delivery could not be recorded or acted on; redeliver once the broker is healthy";
        return (status, Problem::new(code, detail)).into_response();
    }
    tracing::warn!(%hook, code = code.as_str(), error = %error, "Gogs delivery refused");
    (status, Problem::new(code, error.to_string())).into_response()
}
