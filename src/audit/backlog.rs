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
    /// Age of the oldest row the `/audit` chart's rollup has not counted yet (migration 0022),
    /// 0 when it has counted them all. About a second while brokers run: each counts the rows
    /// below the transaction horizon every second. More means a transaction that has written
    /// something stays open somewhere on the cluster (or no broker runs), and every chart reads
    /// the rows since then itself: the page slows as they pile up.
    pub timeline_lag_seconds: f64,
}

impl PgAudit {
    pub async fn backlog(&self) -> Result<Backlog, AuditError> {
        let row = sqlx::query(
            "select
                 (select count(*) from revocations where state = 'pending' and due_at <= now()) as revocations_due,
                 count(*) as outbox_events,
                 coalesce(extract(epoch from clock_timestamp() - min(created_at)), 0)::float8 as outbox_oldest_age_seconds,
                 -- The first uncounted row in the order the rollup counts (an index's first entry),
                 -- not min(occurred_at), which would read every uncounted row. A replica whose
                 -- clock runs ahead can stamp a row in this one's future: that is no lag.
                 greatest(coalesce((select extract(epoch from clock_timestamp() - a.occurred_at) from audit_events a
                                    where a.tx >= (select counted_below from audit_timeline_progress)
                                    order by a.tx, a.id limit 1), 0), 0)::float8 as timeline_lag_seconds
             from event_outbox
             where delivered_at is null",
        )
        .fetch_one(self.pool())
        .await?;
        Ok(Backlog {
            revocations_due: row.try_get("revocations_due")?,
            outbox_events: row.try_get("outbox_events")?,
            outbox_oldest_age_seconds: row.try_get("outbox_oldest_age_seconds")?,
            timeline_lag_seconds: row.try_get("timeline_lag_seconds")?,
        })
    }
}
