//! The event outbox (migration 0007): triggers queue events in the same transaction as the
//! audit row or delivery they describe; these queries hand them to a publisher.

use serde_json::Value;
use sqlx::{PgPool, Row};
use time::OffsetDateTime;

use super::AuditError;

#[derive(Debug, Clone)]
pub struct OutboxEvent {
    pub id: i64,
    /// `credential.issued`, `credential.revoked` or `gogs.delivery`.
    pub kind: String,
    /// The audit id or delivery id: the message key, so consumers can deduplicate.
    pub key: String,
    pub payload: Value,
    pub attempts: i32,
}

/// Turns queueing on or off for every broker on this database: off, the triggers skip the
/// outbox entirely (the audit log's is disabled, so inserts do not even run it), and a
/// deployment without a publisher accumulates nothing.
pub async fn set_outbox_enabled(pool: &PgPool, enabled: bool) -> Result<(), AuditError> {
    sqlx::query("select event_outbox_set_enabled($1)").bind(enabled).execute(pool).await?;
    Ok(())
}

/// Takes up to `limit` due events and leases them for `lease_seconds`: until then no other
/// publisher (another replica) claims them. A publisher that dies mid-send loses only its
/// lease; the events come due again.
pub async fn claim_due_events(pool: &PgPool, limit: i64, lease_seconds: i64) -> Result<Vec<OutboxEvent>, AuditError> {
    let rows = sqlx::query(
        "update event_outbox set next_attempt_at = clock_timestamp() + make_interval(secs => $2)
         where id in (
             select id from event_outbox
             where delivered_at is null and next_attempt_at <= clock_timestamp()
             order by id
             limit $1
             for update skip locked)
         returning id, kind, event_key, payload, attempts",
    )
    .bind(limit)
    .bind(lease_seconds as f64)
    .fetch_all(pool)
    .await?;
    let mut events: Vec<OutboxEvent> = rows
        .into_iter()
        .map(|row| OutboxEvent {
            id: row.get("id"),
            kind: row.get("kind"),
            key: row.get("event_key"),
            payload: row.get("payload"),
            attempts: row.get("attempts"),
        })
        .collect();
    // `returning` does not keep the subquery's order; consumers see events in commit order.
    events.sort_by_key(|event| event.id);
    Ok(events)
}

pub async fn mark_delivered(pool: &PgPool, ids: &[i64]) -> Result<(), AuditError> {
    sqlx::query("update event_outbox set delivered_at = clock_timestamp(), last_error = null where id = any($1)")
        .bind(ids)
        .execute(pool)
        .await?;
    Ok(())
}

/// Counts the failed attempt and schedules the next one at `retry_at`.
pub async fn mark_failed(pool: &PgPool, ids: &[i64], error: &str, retry_at: OffsetDateTime) -> Result<(), AuditError> {
    sqlx::query(
        "update event_outbox set attempts = attempts + 1, last_error = $2, next_attempt_at = $3 where id = any($1)",
    )
    .bind(ids)
    .bind(error.chars().take(1000).collect::<String>())
    .bind(retry_at)
    .execute(pool)
    .await?;
    Ok(())
}
