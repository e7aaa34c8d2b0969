//! Postgres: the audit table, replay counters, and the queries the CLI runs.

use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::PgPool;
use time::OffsetDateTime;

use super::held::HeldConnections;
use super::record::{self, AuditRecord, SELECT_LIST};
use super::{AuditError, AuditEvent};

/// A lazy pool: the broker starts serving health checks even if Postgres is briefly away, and
/// once it comes back new connections are made without a restart. Acquiring fails after
/// `acquire_timeout`, which is what turns an outage into a prompt `audit_unavailable`.
pub fn connect(url: &SecretString, max_connections: u32, acquire_timeout: Duration) -> Result<PgPool, AuditError> {
    connect_with(url, max_connections, acquire_timeout, Durability::WaitForFlush, Plans::PerExecution)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Durability {
    WaitForFlush,
    /// `synchronous_commit = off`: the commit is visible (and unique keys enforced) at once,
    /// but returns before its WAL record reaches disk.
    Deferred,
}

/// How Postgres plans a prepared statement on the pool's connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Plans {
    /// Postgres' own choice: reads, whose filters (a prefix, a time window) want a plan made
    /// for their values.
    PerExecution,
    /// One generic plan per statement and connection (`plan_cache_mode = force_generic_plan`):
    /// the hot path's statements, whose shape never changes. Left to choose, Postgres replanned
    /// the claim-and-record statement at every execution of a batch of one (a plan made for one
    /// row always looks cheaper than the generic one), and planning cost more than running it:
    /// about 0.3 ms of the 0.47 ms a lone exchange spent in Postgres (bench/README.md).
    Generic,
}

fn connect_with(
    url: &SecretString,
    max_connections: u32,
    acquire_timeout: Duration,
    durability: Durability,
    plans: Plans,
) -> Result<PgPool, AuditError> {
    let options: PgConnectOptions = url.expose_secret().parse()?;
    let synchronous_commit = match durability {
        Durability::WaitForFlush => "on",
        Durability::Deferred => "off",
    };
    let plan_cache_mode = match plans {
        Plans::PerExecution => "auto",
        Plans::Generic => "force_generic_plan",
    };
    let options = options.application_name("credbroker").options([
        ("statement_timeout", "10s"),
        ("synchronous_commit", synchronous_commit),
        ("plan_cache_mode", plan_cache_mode),
    ]);
    Ok(PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(acquire_timeout)
        .test_before_acquire(true)
        .connect_lazy_with(options))
}

pub async fn migrate(pool: &PgPool) -> Result<(), AuditError> {
    sqlx::migrate!("./migrations").run(pool).await?;
    Ok(())
}

#[derive(Clone)]
pub struct PgAudit {
    pool: PgPool,
    /// The claims' pool. Token-use claims commit without waiting for the disk. That is safe because a claim only
    /// matters once a credential is issued, and the issued row's own synchronous commit flushes
    /// the WAL up to and including every earlier commit, the claim's among them. If Postgres
    /// crashes before that, the claim may be lost, but then no credential left the broker and
    /// the token was never really used. It saves one disk flush (milliseconds) per exchange.
    /// (A claim written with its issued row commits durably, with the row: `claims.rs`.)
    claiming: HeldConnections,
    /// The audit batches' connections (durable commits), kept between statements.
    writing: HeldConnections,
}

impl PgAudit {
    /// Three lazy pools on one database, each of at most `max_connections`: `pool` (reads and
    /// the occasional write), and the hot path's two, which plan their statements once
    /// ([`Plans::Generic`]): `writing` (audit rows, claims with their rows) and `claiming`.
    pub fn connect(url: &SecretString, max_connections: u32, acquire_timeout: Duration) -> Result<Self, AuditError> {
        let pool = connect(url, max_connections, acquire_timeout)?;
        let hot_path = |durability| connect_with(url, max_connections, acquire_timeout, durability, Plans::Generic);
        Ok(Self {
            writing: HeldConnections::new(hot_path(Durability::WaitForFlush)?),
            claiming: HeldConnections::new(hot_path(Durability::Deferred)?),
            pool,
        })
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    pub(super) fn claiming(&self) -> &HeldConnections {
        &self.claiming
    }

    pub(super) fn writing(&self) -> &HeldConnections {
        &self.writing
    }

    pub async fn ping(&self) -> Result<(), AuditError> {
        sqlx::query("select 1").execute(&self.pool).await?;
        Ok(())
    }

    /// The latest rows, newest first in the log's order (`audit tail`), as the API lists them.
    pub async fn tail(&self, limit: i64) -> Result<Vec<AuditRecord>, AuditError> {
        let rows = sqlx::query_as::<_, AuditRecord>(&format!(
            "select {}, null::jsonb as claims from audit_events a order by a.tx desc, a.id desc limit $1",
            *SELECT_LIST
        ))
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows)
    }
}

impl PgAudit {
    /// Deletes the use counts of tokens that expired before `expired_before`, `batch`
    /// rows per statement so no statement holds many locks or runs long; returns how many.
    /// Only tokens that can no longer verify (past `exp` plus the clock skew) may be forgotten:
    /// their uses can never be counted again.
    pub async fn purge_token_uses(&self, expired_before: OffsetDateTime, batch: i64) -> Result<u64, AuditError> {
        let mut purged = 0;
        loop {
            let deleted = sqlx::query(
                "delete from token_use_counts where ctid = any(array(
                     select ctid from token_use_counts where token_expires_at < $1 limit $2))",
            )
            .bind(expired_before)
            .bind(batch)
            .execute(&self.pool)
            .await?
            .rows_affected();
            purged += deleted;
            if deleted < batch as u64 {
                return Ok(purged);
            }
        }
    }
}

impl PgAudit {
    /// One row, one INSERT, one commit: what `audit_group_commit = false` does per request.
    /// Autocommit: the INSERT returns only once the row is durable (synchronous_commit).
    #[tracing::instrument(level = "debug", skip_all, fields(issuance_id = %event.id, decision = event.decision.as_str()))]
    pub async fn write(&self, event: &AuditEvent) -> Result<(), AuditError> {
        self.write_batch(std::slice::from_ref(event)).await
    }

    /// Many rows in one INSERT and one commit: all of them are durable, or none is.
    pub async fn write_batch(&self, events: &[AuditEvent]) -> Result<(), AuditError> {
        let mut held = self.writing.take().await?;
        record::insert(events).execute(held.connection()).await?;
        held.keep();
        Ok(())
    }
}
