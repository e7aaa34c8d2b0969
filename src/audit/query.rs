//! The security team's questions: filtered, paged reads of the audit log (`GET /v1/issuances`,
//! `credbroker audit query`) and the lifecycle of one issuance.
//!
//! Paging is newest first in `(tx, id)` order and only over rows below the transaction
//! horizon (migration 0009): every row that can ever appear there has committed already, so a
//! cursor never steps over a row whose transaction committed late (the group-commit writers of
//! several replicas commit in any order). The price: a row becomes visible here once its own
//! transaction and every transaction that started before it have finished, normally within
//! milliseconds; a long-running writing transaction elsewhere on the cluster holds it back.

use serde::Serialize;
use sqlx::{Postgres, QueryBuilder, Row};
use time::OffsetDateTime;
use uuid::Uuid;

pub use super::filter::{parse_time, Cursor, FilterError, IssuanceFilter, DECISIONS, DEFAULT_LIMIT, FILTERS, MAX_LIMIT};
use super::filter::ProjectPath;
use super::record::{CLAIMS, SELECT_LIST};
use super::{AuditError, AuditRecord, PgAudit};

impl IssuanceFilter {
    fn push_conditions(&self, query: &mut QueryBuilder<'_, Postgres>) {
        // A scalar subquery, so the horizon is computed once per query, not once per candidate row.
        query.push(" where a.tx < (select pg_snapshot_xmin(pg_current_snapshot()))");
        if let Some(since) = self.since {
            query.push(" and a.occurred_at >= ").push_bind(since);
        }
        if let Some(until) = self.until {
            query.push(" and a.occurred_at < ").push_bind(until);
        }
        if !self.decisions.is_empty() {
            query.push(" and a.decision = any(").push_bind(self.decisions.clone()).push(")");
        }
        for (column, value) in &self.exact {
            // Column names come from FILTERS, never from the caller.
            query.push(format_args!(" and a.{column} = ")).push_bind(value.clone());
        }
        match &self.project_path {
            None => {}
            Some(ProjectPath::Exact(path)) => {
                query.push(" and a.project_path = ").push_bind(path.clone());
            }
            Some(ProjectPath::Glob { like_prefix, regex }) => {
                query.push(" and a.project_path like ").push_bind(like_prefix.clone());
                if let Some(regex) = regex {
                    query.push(" and a.project_path ~ ").push_bind(regex.clone());
                }
            }
        }
        match &self.sha {
            Some(sha) if sha.len() == 40 || sha.len() == 64 => {
                query.push(" and a.sha = ").push_bind(sha.clone());
            }
            Some(prefix) => {
                query.push(" and a.sha like ").push_bind(format!("{prefix}%"));
            }
            None => {}
        }
        if let Some(cursor) = &self.cursor {
            query.push(" and (a.tx, a.id) < (").push_bind(cursor.tx.to_string()).push("::xid8, ").push_bind(cursor.id).push(")");
        }
    }
}

impl IssuanceFilter {
    /// Whether the rollup (migration 0018) holds the chart's answer: it keeps time, target and
    /// decision, nothing else.
    fn rollup_serves(&self) -> bool {
        self.project_path.is_none() && self.sha.is_none() && self.exact.iter().all(|(column, _)| *column == "target")
    }

    /// The chart from the rollup `audit_timeline` (migration 0018), which counts the rows whose
    /// tx is below `counted_below` (migration 0022), plus the rows from there on, read from the
    /// log: both in one snapshot, so every row is counted once. Its rows in the window are summed
    /// into buckets counted from `since` (both ends on the grain).
    ///
    /// The log's rows are found by tx alone, materialized, and filtered afterwards: they are a
    /// second's worth, and given the window too, Postgres would rather intersect them with the
    /// window's hundreds of thousands of rows from `audit_events_occurred_at`.
    fn rollup_timeline(&self, since: OffsetDateTime, until: OffsetDateTime, bucket: i64, counted_below: String) -> QueryBuilder<'static, Postgres> {
        let mut query = QueryBuilder::new("with uncounted as materialized (select a.occurred_at, coalesce(a.target, '') as target, a.decision, a.occurrences");
        query.push(" from audit_events a where a.tx >= ").push_bind(counted_below).push("::xid8 and a.decision in ('issued', 'denied'))");
        query.push(" select date_bin(make_interval(secs => ").push_bind(bucket as f64).push("), s.bucket_start, ").push_bind(since);
        query.push(") as start, s.target, s.decision, sum(s.events)::bigint as events from (");
        query.push("select t.bucket_start, t.target, t.decision, t.events from audit_timeline t");
        query.push(" where t.bucket_start >= ").push_bind(since).push(" and t.bucket_start < ").push_bind(until);
        self.push_rollup_conditions(&mut query, "t");
        query.push(" union all select u.occurred_at, u.target, u.decision, u.occurrences from uncounted u");
        query.push(" where u.occurred_at >= ").push_bind(since).push(" and u.occurred_at < ").push_bind(until);
        self.push_rollup_conditions(&mut query, "u");
        query.push(") s group by 1, 2, 3 order by 1, 2, 3");
        query
    }

    /// The filters the rollup keeps besides time, on `table`'s `decision` and `target` ('' for
    /// none).
    fn push_rollup_conditions(&self, query: &mut QueryBuilder<'static, Postgres>, table: &str) {
        if !self.decisions.is_empty() {
            query.push(format_args!(" and {table}.decision = any(")).push_bind(self.decisions.clone()).push(")");
        }
        for (_, target) in &self.exact {
            query.push(format_args!(" and {table}.target = ")).push_bind(target.clone());
        }
    }

    /// The chart from the matching rows themselves (below the horizon, as every paged read).
    fn rows_timeline(&self, since: OffsetDateTime, bucket: i64) -> QueryBuilder<'static, Postgres> {
        let mut query = QueryBuilder::new("select date_bin(make_interval(secs => ");
        query.push_bind(bucket as f64).push("), a.occurred_at, ").push_bind(since);
        query.push(") as start, coalesce(a.target, '') as target, a.decision, sum(a.occurrences)::bigint as events from audit_events a");
        self.push_conditions(&mut query);
        query.push(" and a.decision in ('issued', 'denied') group by 1, 2, 3 order by 1, 2, 3");
        query
    }
}

/// One page, and where the next begins (None: this was the last).
#[derive(Debug, Clone, Serialize)]
pub struct IssuancePage {
    pub items: Vec<AuditRecord>,
    pub next_cursor: Option<String>,
}

/// Issued and denied events per target over a window, for the `/audit` page's chart.
#[derive(Debug, Clone, Serialize)]
pub struct Timeline {
    /// The window the points count: the filter's, widened to whole [`TIMELINE_GRAIN`]s.
    #[serde(with = "time::serde::rfc3339")]
    pub since: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub until: OffsetDateTime,
    pub bucket_seconds: i64,
    /// Oldest bucket first; buckets without events are absent.
    pub points: Vec<TimelinePoint>,
}

#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct TimelinePoint {
    #[serde(with = "time::serde::rfc3339")]
    pub start: OffsetDateTime,
    /// Empty for rows with no target (a refusal before the role was known).
    pub target: String,
    /// `issued` or `denied`.
    pub decision: String,
    pub events: i64,
}

/// The chart's window when the filter sets no `since`.
pub const DEFAULT_TIMELINE_SPAN: time::Duration = time::Duration::days(7);

/// The rollup's 10 minutes (migration 0018): the chart's window is widened to start and end on
/// a multiple of it since the Unix epoch, and every bucket width is a multiple of it.
pub const TIMELINE_GRAIN: time::Duration = time::Duration::minutes(10);

fn grain_floor(at: OffsetDateTime) -> OffsetDateTime {
    let grain = TIMELINE_GRAIN.whole_seconds();
    OffsetDateTime::from_unix_timestamp(at.unix_timestamp().div_euclid(grain) * grain).unwrap_or(at)
}

fn grain_ceil(at: OffsetDateTime) -> OffsetDateTime {
    let floor = grain_floor(at);
    if floor == at {
        floor
    } else {
        floor.checked_add(TIMELINE_GRAIN).unwrap_or(at)
    }
}

/// At most about 60 bars whatever the window, in widths people read easily.
fn bucket_seconds(span: time::Duration) -> i64 {
    match span.whole_hours() {
        ..=6 => 600,
        7..=48 => 3600,
        49..=336 => 6 * 3600,
        337..=1488 => 86_400,
        _ => 7 * 86_400,
    }
}

/// One issuance and what happened to it afterwards.
#[derive(Debug, Clone, Serialize)]
pub struct IssuanceHistory {
    pub issuance: AuditRecord,
    /// The issuance this one renews (`credbroker exec`), if it is a renewal.
    pub renews: Option<Uuid>,
    /// issued, renewed, revoked, revoke_failed: oldest first.
    pub lifecycle: Vec<LifecycleStep>,
    /// The broker's own revocation schedule for it, if any.
    pub revocation: Option<RevocationState>,
}

#[derive(Debug, Clone, Serialize)]
pub struct LifecycleStep {
    pub event: String,
    pub id: Uuid,
    /// The issuance of the chain the step is about: the first one, or one of its renewals.
    pub about: Uuid,
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339::option")]
    pub expires_at: Option<OffsetDateTime>,
    pub detail: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct RevocationState {
    pub state: String,
    pub reason: String,
    #[serde(with = "time::serde::rfc3339")]
    pub due_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339::option")]
    pub revoked_at: Option<OffsetDateTime>,
    pub requested_by: Option<String>,
    pub attempts: i32,
    pub last_error: Option<String>,
}

impl PgAudit {
    /// Records a read made straight against the database (`audit query --database-url`,
    /// `audit tail`) as an `audit_read` row naming the logged-in database role (migration
    /// 0012). Callers read nothing when this fails: an unrecorded read is not allowed.
    pub async fn record_direct_read(&self, what: &str) -> Result<Uuid, AuditError> {
        Ok(sqlx::query_scalar("select record_audit_read($1)").bind(what).fetch_one(self.pool()).await?)
    }

    /// One page of rows matching the filter, newest first.
    ///
    /// Two steps in one statement (bench/audit_scale measures why): the inner select finds the
    /// page's ids from the columns the filter and the order need, which migration 0013's
    /// covering index holds for the project and time filters, so a big match (a group's month,
    /// 100,000 rows) is sorted from the index without reading those rows; only the page's rows
    /// are then read, by primary key. The inner `a` is the inner select's own alias.
    ///
    /// Unnamed statement (`persistent(false)`): planned with the values each time. A named one
    /// is switched by Postgres to a generic plan after five runs, and a generic plan cannot use
    /// a LIKE prefix (`project_path=group/**`, `sha=0123abc`) or a partial index, so a broker
    /// that had answered a question five times would answer it the sixth time by scanning.
    pub async fn query_issuances(&self, filter: &IssuanceFilter) -> Result<IssuancePage, AuditError> {
        let mut query = QueryBuilder::new(format!(
            "select {}, null::jsonb as claims, a.tx::text as tx from audit_events a
             where a.id = any(array(select a.id from audit_events a",
            *SELECT_LIST
        ));
        filter.push_conditions(&mut query);
        query.push(" order by a.tx desc, a.id desc limit ").push_bind(i64::from(filter.limit) + 1);
        query.push(")) order by a.tx desc, a.id desc");
        let rows = query.build().persistent(false).fetch_all(self.pool()).await?;
        let mut items = Vec::with_capacity(rows.len());
        let mut last = None;
        for row in rows.iter().take(filter.limit as usize) {
            let record = <AuditRecord as sqlx::FromRow<_>>::from_row(row)?;
            let tx: String = row.try_get("tx")?;
            last = Some(Cursor { tx: tx.parse().map_err(|e| sqlx::Error::Decode(Box::new(e)))?, id: record.id });
            items.push(record);
        }
        let next_cursor = (rows.len() > filter.limit as usize).then(|| last.map(|cursor| cursor.encode())).flatten();
        Ok(IssuancePage { items, next_cursor })
    }

    /// Issued and denied events per target in buckets over the filter's window (`since`, by
    /// default [`DEFAULT_TIMELINE_SPAN`] back from `now`, to `until` or `now`), widened to whole
    /// [`TIMELINE_GRAIN`]s, under the same filters as [`PgAudit::query_issuances`] but not its
    /// paging, and likewise planned with the values each time (unnamed statement).
    ///
    /// Filtered by nothing but time, decision and target (the page's default view), it sums
    /// migration 0018's rollup `audit_timeline` and the rows it has not counted yet (migration
    /// 0022); otherwise it aggregates the matching rows. Both answer the same for the same rows.
    /// Every bucket width is a multiple of the grain and the window starts on one, so each
    /// 10-minute rollup row falls inside exactly one bucket. The rollup's chart counts every
    /// committed row, while the row aggregate, like the paged reads, counts only rows below the
    /// transaction horizon: while a transaction runs long elsewhere on the cluster, the
    /// unfiltered chart can count rows that the table does not list yet.
    pub async fn issuance_timeline(&self, filter: &IssuanceFilter, now: OffsetDateTime) -> Result<Timeline, AuditError> {
        let until = filter.until.unwrap_or(now);
        let since = filter.since.unwrap_or(until - DEFAULT_TIMELINE_SPAN);
        let bucket = bucket_seconds(until - since);
        let (since, until) = (grain_floor(since), grain_ceil(until));
        let window = IssuanceFilter { since: Some(since), until: Some(until), cursor: None, ..filter.clone() };
        if !window.rollup_serves() {
            let points = window.rows_timeline(since, bucket).build_query_as::<TimelinePoint>().persistent(false).fetch_all(self.pool()).await?;
            return Ok(Timeline { since, until, bucket_seconds: bucket, points });
        }
        // One snapshot for where the rollup stops and for the rows after it. The value is bound
        // rather than read in the same statement, so that Postgres plans the log's part for the
        // few rows it has (an index scan on tx) instead of for an unknown share of the table.
        // Without JIT: compiling the plan took longer than running it (bench/README.md).
        let mut transaction = self.pool().begin().await?;
        for setting in ["set transaction isolation level repeatable read, read only", "set local jit = off"] {
            sqlx::query(setting).execute(&mut *transaction).await?;
        }
        let counted_below: String =
            sqlx::query_scalar("select counted_below::text from audit_timeline_progress").fetch_one(&mut *transaction).await?;
        let points = window
            .rollup_timeline(since, until, bucket, counted_below)
            .build_query_as::<TimelinePoint>()
            .persistent(false)
            .fetch_all(&mut *transaction)
            .await?;
        transaction.commit().await?;
        Ok(Timeline { since, until, bucket_seconds: bucket, points })
    }

    /// Counts the log's rows that got below the transaction horizon into the chart's rollup
    /// (migration 0022). One broker at a time does it, the others get 0. Returns how many
    /// rollup rows were added to.
    pub async fn catch_up_timeline(&self) -> Result<i64, AuditError> {
        Ok(sqlx::query_scalar("select audit_timeline_catch_up()").fetch_one(self.pool()).await?)
    }

    /// Any row by id, with claims; for an issued row also its renewals, and the revocations
    /// and releases of it and of its renewals, found through the typed lineage columns.
    pub async fn issuance_lifecycle(&self, id: Uuid) -> Result<Option<IssuanceHistory>, AuditError> {
        let row = sqlx::query_as::<_, AuditRecord>(&format!("select {}, {CLAIMS} as claims from audit_events a where a.id = $1", *SELECT_LIST))
            .bind(id)
            .fetch_optional(self.pool())
            .await?;
        let Some(issuance) = row else { return Ok(None) };
        let renews = issuance.renews_issuance_id;
        let mut lifecycle = Vec::new();
        let mut revocation = None;
        if issuance.decision == "issued" {
            lifecycle.push(LifecycleStep {
                event: "issued".into(),
                id: issuance.id,
                about: issuance.id,
                at: issuance.occurred_at,
                expires_at: issuance.expires_at,
                detail: issuance.detail.clone(),
            });
            // Rows before migration 0014 keep their links in audit_lineage_backfill.
            let later = sqlx::query(
                "with chain as (
                     select $1::uuid as id
                     union select id from audit_events where renews_issuance_id = $1
                     union select id from audit_lineage_backfill where renews_issuance_id = $1
                 )
                 select a.id, coalesce(a.about_issuance_id, b.about_issuance_id, a.id) as about,
                        a.occurred_at, a.expires_at, a.detail, a.decision
                 from audit_events a left join audit_lineage_backfill b on b.id = a.id
                 where a.id in (
                     select id from chain where id <> $1
                     union select id from audit_events where about_issuance_id in (select id from chain)
                     union select id from audit_lineage_backfill where about_issuance_id in (select id from chain)
                 )
                 order by a.occurred_at, a.id",
            )
            .bind(id)
            .fetch_all(self.pool())
            .await?;
            for row in later {
                let decision: String = row.try_get("decision")?;
                lifecycle.push(LifecycleStep {
                    event: match decision.as_str() {
                        "issued" => "renewed".into(),
                        "admin_request" => "release_requested".into(),
                        _ => decision,
                    },
                    id: row.try_get("id")?,
                    about: row.try_get("about")?,
                    at: row.try_get("occurred_at")?,
                    expires_at: row.try_get("expires_at")?,
                    detail: row.try_get("detail")?,
                });
            }
            revocation = sqlx::query(
                "select state, reason, due_at, revoked_at, requested_by, attempts, last_error from revocations where issuance_id = $1",
            )
            .bind(id)
            .fetch_optional(self.pool())
            .await?
            .map(|row| -> Result<RevocationState, sqlx::Error> {
                Ok(RevocationState {
                    state: row.try_get("state")?,
                    reason: row.try_get("reason")?,
                    due_at: row.try_get("due_at")?,
                    revoked_at: row.try_get("revoked_at")?,
                    requested_by: row.try_get("requested_by")?,
                    attempts: row.try_get("attempts")?,
                    last_error: row.try_get("last_error")?,
                })
            })
            .transpose()?;
        }
        Ok(Some(IssuanceHistory { issuance, renews, lifecycle, revocation }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeline_buckets_keep_the_bar_count_readable() {
        assert_eq!(bucket_seconds(time::Duration::hours(1)), 600);
        assert_eq!(bucket_seconds(time::Duration::days(1)), 3600);
        assert_eq!(bucket_seconds(DEFAULT_TIMELINE_SPAN), 6 * 3600);
        assert_eq!(bucket_seconds(time::Duration::days(30)), 86_400);
        assert_eq!(bucket_seconds(time::Duration::days(365)), 7 * 86_400);
    }

    #[test]
    fn the_window_widens_to_whole_rollup_grains() {
        use time::macros::datetime;
        assert_eq!(grain_floor(datetime!(2026-12-01 10:17:59.5 UTC)), datetime!(2026-12-01 10:10 UTC));
        assert_eq!(grain_ceil(datetime!(2026-12-01 10:17:59.5 UTC)), datetime!(2026-12-01 10:20 UTC));
        assert_eq!(grain_floor(datetime!(2026-12-01 10:20 UTC)), datetime!(2026-12-01 10:20 UTC));
        assert_eq!(grain_ceil(datetime!(2026-12-01 10:20 UTC)), datetime!(2026-12-01 10:20 UTC));
        assert_eq!(grain_ceil(datetime!(2026-12-01 10:20:00.000001 UTC)), datetime!(2026-12-01 10:30 UTC));
        // Another offset names the same instant.
        assert_eq!(grain_floor(datetime!(2026-12-01 11:47 +01:30)), datetime!(2026-12-01 10:10 UTC));
        assert_eq!(grain_floor(datetime!(1969-12-31 23:55 UTC)), datetime!(1969-12-31 23:50 UTC));
        // Every bucket is whole grains, so rollup rows sum into buckets exactly.
        for hours in [1, 6, 7, 48, 49, 336, 337, 1488, 5000] {
            assert_eq!(bucket_seconds(time::Duration::hours(hours)) % TIMELINE_GRAIN.whole_seconds(), 0);
        }
    }
}
