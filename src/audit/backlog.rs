//! Work the database holds that has not happened yet, read when `/metrics` is scraped: the
//! numbers an operator alerts on when a worker stalls.

use sqlx::Row;

use super::{AuditError, PgAudit};

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backlog {
    /// Pending revocations whose time has come.
    pub revocations_due: i64,
    /// Events in the outbox not yet delivered to the stream.
    pub outbox_events: i64,
    /// Age of the oldest of those, 0 when there is none.
    pub outbox_oldest_age_seconds: f64,
}

impl PgAudit {
    pub async fn backlog(&self) -> Result<Backlog, AuditError> {
        let row = sqlx::query(
            "select
                 (select count(*) from revocations where state = 'pending' and due_at <= now()) as revocations_due,
                 count(*) as outbox_events,
                 coalesce(extract(epoch from clock_timestamp() - min(created_at)), 0)::float8 as outbox_oldest_age_seconds
             from event_outbox
             where delivered_at is null",
        )
        .fetch_one(self.pool())
        .await?;
        Ok(Backlog {
            revocations_due: row.try_get("revocations_due")?,
            outbox_events: row.try_get("outbox_events")?,
            outbox_oldest_age_seconds: row.try_get("outbox_oldest_age_seconds")?,
        })
    }
}
