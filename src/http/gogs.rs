//! `POST /v1/hooks/gogs/{hook}`: the edge of [`crate::gogs`]. Gogs treats any 2xx as delivered;
//! refusals are problem+json so the reason shows in Gogs' "Recent deliveries". Every delivery's
//! audit row is written by [`crate::gogs::Gogs::receive`]; this only turns its result into the answer.


use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::Json;
use secrecy::ExposeSecret;
use serde_json::json;

use super::{AppState, PathParam, Problem, RequestId};
use crate::types::rfc3339;
use crate::broker::ErrorCode;
use crate::gogs::{IncomingDelivery, Received, Refused};
use crate::metrics::Metrics;

pub async fn receive(State(state): State<AppState>, PathParam(hook): PathParam, request: Request) -> Response {
    // Not configured: the endpoint does not exist, so there is no delivery to record.
    let Some(gogs) = state.broker.gogs.clone() else {
        return Problem::new(ErrorCode::NotFound, "Gogs webhooks are not configured on this broker").into_response();
    };
    let (parts, body) = request.into_parts();
    let body = axum::body::to_bytes(body, gogs.max_payload_bytes()).await.ok();
    let headers = &parts.headers;
    let incoming = IncomingDelivery {
        hook,
        request_id: parts.extensions.get::<RequestId>().map(|id| id.0.clone()).unwrap_or_default(),
        client_addr: parts.extensions.get::<super::ClientAddr>().and_then(|addr| addr.0.clone()),
        user_agent: header_text(headers, header::USER_AGENT.as_str()).map(|agent| agent.chars().take(256).collect()),
        delivery_id: header_text(headers, "x-gogs-delivery").map(str::to_owned),
        event: header_text(headers, "x-gogs-event").map(str::to_owned),
        signature: header_text(headers, "x-gogs-signature").map(str::to_owned),
        content_type: header_text(headers, header::CONTENT_TYPE.as_str()).map(str::to_owned),
        body: body.map(|body| body.to_vec()),
    };
    // On a task of its own, so a client that goes away or the request timeout cannot stop it
    // between claiming the delivery and writing its row (or forwarding its token).
    let audit = state.broker.audit.clone();
    let deliveries = &state.broker.metrics.gogs_deliveries;
    match tokio::spawn(async move { gogs.receive(incoming, &audit).await }).await {
        Ok(Ok(received)) => {
            Metrics::count(deliveries, if received.acted_on { "accepted" } else { "ignored" });
            accepted(received)
        }
        Ok(Err(refused)) => {
            Metrics::count(deliveries, refused.error.code().as_str());
            refusal(refused)
        }
        Err(error) => {
            tracing::error!(%error, "Gogs delivery handling panicked");
            Problem::new(ErrorCode::AuditUnavailable, SERVER_SIDE_DETAIL).into_response()
        }
    }
}

const SERVER_SIDE_DETAIL: &str = "the delivery could not be recorded or acted on; redeliver once the broker is healthy";

fn header_text<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|value| value.to_str().ok()).map(str::trim)
}

fn accepted(received: Received) -> Response {
    let mut body = json!({
        "issuance_id": received.audit_id,
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

fn refusal(Refused { audit_id, error }: Refused) -> Response {
    let detail = match error.is_server_side() {
        true => match error.code() {
            ErrorCode::RateLimited => error.to_string(),
            _ => SERVER_SIDE_DETAIL.to_owned(),
        },
        false => error.to_string(),
    };
    let mut problem = Problem::new(error.code(), detail);
    problem.issuance_id = Some(audit_id);
    problem.into_response()
}
