//! `GET /v1/issuances` (filtered, paged; JSON or `Accept: text/csv`) and
//! `GET /v1/issuances/{id}` (one record with its lifecycle), for `[auditors]`.

use axum::extract::State;
use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::Json;
use time::OffsetDateTime;
use uuid::Uuid;

use super::{AppState, PathParam, Problem, RequestParts};
use crate::audit::query::IssuanceFilter;
use crate::audit::csv;
use crate::broker::audit_read;
use crate::broker::ErrorCode;

/// The header carrying the next page's cursor on CSV responses (JSON has `next_cursor`).
pub const NEXT_CURSOR_HEADER: &str = "x-next-cursor";

fn wants_csv(parts: &RequestParts) -> bool {
    parts.headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()).is_some_and(|accept| accept.contains("text/csv"))
}

fn unavailable(error: impl std::fmt::Display) -> Response {
    tracing::error!(%error, "audit query failed");
    Problem::new(ErrorCode::AuditUnavailable, "the audit log cannot be read right now; retry shortly").into_response()
}

fn no_store(mut response: Response) -> Response {
    response.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

pub async fn list(State(state): State<AppState>, parts: RequestParts) -> Response {
    let query = &parts.query;
    let what = format!("GET /v1/issuances?{query}");
    if let Err(failure) = audit_read::authorize_read(&state.broker, &parts.input(), &what).await {
        return Problem::from(failure).into_response();
    }
    let filter = match IssuanceFilter::parse(form_urlencoded::parse(query.as_bytes()), OffsetDateTime::now_utc()) {
        Ok(filter) => filter,
        Err(error) => {
            return Problem::new(ErrorCode::InvalidRequest, error.to_string()).with_parameter(error.parameter).into_response();
        }
    };
    let page = match state.broker.audit.store().query_issuances(&filter).await {
        Ok(page) => page,
        Err(error) => return unavailable(error),
    };
    if wants_csv(&parts) {
        let mut response = csv::document(&page.items).into_response();
        response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/csv; charset=utf-8"));
        if let Some(value) = page.next_cursor.as_deref().and_then(|cursor| HeaderValue::from_str(cursor).ok()) {
            response.headers_mut().insert(NEXT_CURSOR_HEADER, value);
        }
        return no_store(response);
    }
    no_store(Json(page).into_response())
}

pub async fn one(State(state): State<AppState>, PathParam(issuance_id): PathParam, parts: RequestParts) -> Response {
    let what = format!("GET /v1/issuances/{issuance_id}");
    if let Err(failure) = audit_read::authorize_read(&state.broker, &parts.input(), &what).await {
        return Problem::from(failure).into_response();
    }
    let Ok(id) = Uuid::parse_str(&issuance_id) else {
        return Problem::new(ErrorCode::InvalidRequest, format!("id: {issuance_id:?} is not an issuance id (a UUID)"))
            .with_parameter("id")
            .into_response();
    };
    match state.broker.audit.store().issuance_lifecycle(id).await {
        Ok(Some(lifecycle)) => no_store(Json(lifecycle).into_response()),
        Ok(None) => Problem::new(ErrorCode::NotFound, format!("no audit record {id}")).into_response(),
        Err(error) => unavailable(error),
    }
}
