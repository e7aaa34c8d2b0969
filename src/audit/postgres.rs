//! Postgres: the audit table, replay counters, and the queries the CLI runs.

use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use serde::Serialize;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{PgPool, Row};
use time::OffsetDateTime;
use uuid::Uuid;

use super::{AuditError, AuditEvent, TokenUse};

/// A lazy pool: the broker starts serving health checks even if Postgres is briefly away, and
/// once it comes back new connections are made without a restart. Acquiring fails after
/// `acquire_timeout`, which is what turns an outage into a prompt `audit_unavailable`.
pub fn connect(url: &SecretString, max_connections: u32, acquire_timeout: Duration) -> Result<PgPool, AuditError> {
    connect_with(url, max_connections, acquire_timeout, Durability::WaitForFlush)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Durability {
    WaitForFlush,
    /// `synchronous_commit = off`: the commit is visible (and unique keys enforced) at once,
    /// but returns before its WAL record reaches disk.
    Deferred,
}

fn connect_with(
    url: &SecretString,
    max_connections: u32,
    acquire_timeout: Duration,
    durability: Durability,
) -> Result<PgPool, AuditError> {
    let options: PgConnectOptions = url.expose_secret().parse()?;
    let synchronous_commit = match durability {
        Durability::WaitForFlush => "on",
        Durability::Deferred => "off",
    };
    let options = options
        .application_name("credbroker")
        .options([("statement_timeout", "10s"), ("synchronous_commit", synchronous_commit)]);
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
    /// Token-use claims commit without waiting for the disk. That is safe because a claim only
    /// matters once a credential is issued, and the issued row's own synchronous commit flushes
    /// the WAL up to and including every earlier commit, the claim's among them. If Postgres
    /// crashes before that, the claim may be lost, but then no credential left the broker and
    /// the token was never really used. It saves one disk flush (milliseconds) per exchange.
    claims: PgPool,
}

/// What `audit tail` prints.
#[derive(Debug, Serialize)]
pub struct AuditRow {
    pub issuance_id: Uuid,
    #[serde(with = "time::serde::rfc3339")]
    pub occurred_at: OffsetDateTime,
    pub decision: String,
    pub code: Option<String>,
    pub detail: Option<String>,
    pub issuer: Option<String>,
    pub role: Option<String>,
    pub target: Option<String>,
    pub backend: Option<String>,
    pub subject: Option<String>,
    pub project_path: Option<String>,
    pub pipeline_id: Option<String>,
    pub job_id: Option<String>,
    pub requested_ttl_seconds: Option<i32>,
    pub ttl_seconds: Option<i32>,
    #[serde(with = "time::serde::rfc3339::option")]
    pub expires_at: Option<OffsetDateTime>,
    #[serde(with = "time::serde::rfc3339::option")]
    pub job_deadline: Option<OffsetDateTime>,
    pub credential_sha256: Option<String>,
    pub credential_handle: Option<String>,
    pub client_addr: Option<String>,
    pub occurrences: i32,
    pub overshoot_seconds: Option<i32>,
}

impl PgAudit {
    /// Two lazy pools on one database: `pool` (durable commits, reads) and one for claims.
    pub fn connect(url: &SecretString, max_connections: u32, acquire_timeout: Duration) -> Result<Self, AuditError> {
        Ok(Self {
            pool: connect(url, max_connections, acquire_timeout)?,
            claims: connect_with(url, max_connections, acquire_timeout, Durability::Deferred)?,
        })
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    pub async fn ping(&self) -> Result<(), AuditError> {
        sqlx::query("select 1").execute(&self.pool).await?;
        Ok(())
    }

    #[tracing::instrument(skip(self, token_expires_at))]
    pub async fn claim_token_use(
        &self,
        issuer: &str,
        jti: &str,
        role: &str,
        max_uses: u32,
        token_expires_at: OffsetDateTime,
    ) -> Result<TokenUse, AuditError> {
        // One round trip takes the next use number if any is left. No row back means either
        // every use is taken or a concurrent exchange took the same number (the primary key
        // decides); a count tells which, and only a lost race tries again.
        loop {
            let claimed: Option<i32> = sqlx::query_scalar(
                "insert into token_uses (issuer, jti, role, use_number, token_expires_at)
                 select $1, $2, $3, coalesce(max(use_number), 0) + 1, $5
                 from token_uses
                 where issuer = $1 and jti = $2 and role = $3
                 having coalesce(max(use_number), 0) < $4
                 on conflict do nothing
                 returning use_number",
            )
            .bind(issuer)
            .bind(jti)
            .bind(role)
            .bind(max_uses as i32)
            .bind(token_expires_at)
            .fetch_optional(&self.claims)
            .await?;
            if let Some(use_number) = claimed {
                return Ok(TokenUse::Claimed(use_number as u32));
            }
            let used: i64 =
                sqlx::query_scalar("select count(*) from token_uses where issuer = $1 and jti = $2 and role = $3")
                    .bind(issuer)
                    .bind(jti)
                    .bind(role)
                    .fetch_one(&self.claims)
                    .await?;
            if used >= i64::from(max_uses) {
                return Ok(TokenUse::Exhausted);
            }
        }
    }

    pub async fn tail(&self, limit: i64) -> Result<Vec<AuditRow>, AuditError> {
        let rows = sqlx::query(
            "select id, occurred_at, decision, code, detail, issuer, role, target, backend, subject,
                    project_path, pipeline_id, job_id, requested_ttl_seconds, granted_ttl_seconds,
                    expires_at, job_deadline, credential_sha256, credential_handle, client_addr, occurrences,
                    overshoot_seconds
             from audit_events
             order by recorded_at desc, id
             limit $1",
        )
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter()
            .map(|row| {
                Ok(AuditRow {
                    issuance_id: row.try_get("id")?,
                    occurred_at: row.try_get("occurred_at")?,
                    decision: row.try_get("decision")?,
                    code: row.try_get("code")?,
                    detail: row.try_get("detail")?,
                    issuer: row.try_get("issuer")?,
                    role: row.try_get("role")?,
                    target: row.try_get("target")?,
                    backend: row.try_get("backend")?,
                    subject: row.try_get("subject")?,
                    project_path: row.try_get("project_path")?,
                    pipeline_id: row.try_get("pipeline_id")?,
                    job_id: row.try_get("job_id")?,
                    requested_ttl_seconds: row.try_get("requested_ttl_seconds")?,
                    ttl_seconds: row.try_get("granted_ttl_seconds")?,
                    expires_at: row.try_get("expires_at")?,
                    job_deadline: row.try_get("job_deadline")?,
                    credential_sha256: row.try_get("credential_sha256")?,
                    credential_handle: row.try_get("credential_handle")?,
                    client_addr: row.try_get("client_addr")?,
                    occurrences: row.try_get("occurrences")?,
                    overshoot_seconds: row.try_get("overshoot_seconds")?,
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(AuditError::from)
    }
}

const INSERT_COLUMNS: &str = "id, occurred_at, request_id, decision, code, detail, issuer, subject, job_token_sha256,
    project_path, job_project_path, namespace_path, pipeline_id, job_id, ref, ref_type, sha,
    user_login, environment, runner_id, claims, role, target, backend,
    requested_ttl_seconds, granted_ttl_seconds, expires_at, job_deadline,
    client_addr, user_agent, credential_sha256, credential_handle, occurrences, overshoot_seconds";

/// One event as the values of its columns, in `INSERT_COLUMNS` order.
struct Columns {
    id: Uuid,
    occurred_at: OffsetDateTime,
    request_id: String,
    decision: &'static str,
    code: Option<String>,
    detail: Option<String>,
    issuer: Option<String>,
    subject: Option<String>,
    job_token_sha256: Option<String>,
    project_path: Option<String>,
    job_project_path: Option<String>,
    namespace_path: Option<String>,
    pipeline_id: Option<String>,
    job_id: Option<String>,
    git_ref: Option<String>,
    ref_type: Option<String>,
    sha: Option<String>,
    user_login: Option<String>,
    environment: Option<String>,
    runner_id: Option<i64>,
    claims: Option<serde_json::Value>,
    role: Option<String>,
    target: Option<String>,
    backend: Option<String>,
    requested_ttl_seconds: Option<i32>,
    granted_ttl_seconds: Option<i32>,
    expires_at: Option<OffsetDateTime>,
    job_deadline: Option<OffsetDateTime>,
    client_addr: Option<String>,
    user_agent: Option<String>,
    credential_sha256: Option<String>,
    credential_handle: Option<String>,
    occurrences: i32,
    overshoot_seconds: Option<i32>,
}

impl Columns {
    fn of(event: &AuditEvent) -> Self {
        let runner_id = event.claims.as_ref().and_then(|claims| match claims.get("runner_id")? {
            serde_json::Value::Number(n) => n.as_i64(),
            serde_json::Value::String(s) => s.parse().ok(),
            _ => None,
        });
        Self {
            id: event.id,
            occurred_at: event.occurred_at,
            request_id: event.request_id.clone(),
            decision: event.decision.as_str(),
            code: event.code.clone(),
            detail: event.detail.clone(),
            issuer: event.issuer.clone(),
            subject: event.subject.clone(),
            job_token_sha256: event.job_token_sha256.clone(),
            project_path: event.claim_text("project_path"),
            job_project_path: event.claim_text("job_project_path"),
            namespace_path: event.claim_text("namespace_path"),
            pipeline_id: event.claim_text("pipeline_id"),
            job_id: event.claim_text("job_id"),
            git_ref: event.claim_text("ref"),
            ref_type: event.claim_text("ref_type"),
            sha: event.claim_text("sha"),
            user_login: event.claim_text("user_login"),
            environment: event.claim_text("environment"),
            runner_id,
            claims: event.claims.clone().map(serde_json::Value::Object),
            role: event.role.clone(),
            target: event.target.clone(),
            backend: event.backend.clone(),
            requested_ttl_seconds: event.requested_ttl_seconds.map(|s| s as i32),
            granted_ttl_seconds: event.granted_ttl_seconds.map(|s| s as i32),
            expires_at: event.expires_at,
            job_deadline: event.job_deadline,
            client_addr: event.client_addr.clone(),
            user_agent: event.user_agent.clone(),
            credential_sha256: event.credential_sha256.clone(),
            credential_handle: event.credential_handle.clone(),
            occurrences: event.occurrences as i32,
            overshoot_seconds: event.overshoot_seconds.map(|s| s as i32),
        }
    }
}

/// The same columns for many events, one array each: a batch of any size is then one
/// statement with a fixed shape, which Postgres plans once per connection.
#[derive(Default)]
struct ColumnArrays {
    id: Vec<Uuid>,
    occurred_at: Vec<OffsetDateTime>,
    request_id: Vec<String>,
    decision: Vec<&'static str>,
    code: Vec<Option<String>>,
    detail: Vec<Option<String>>,
    issuer: Vec<Option<String>>,
    subject: Vec<Option<String>>,
    job_token_sha256: Vec<Option<String>>,
    project_path: Vec<Option<String>>,
    job_project_path: Vec<Option<String>>,
    namespace_path: Vec<Option<String>>,
    pipeline_id: Vec<Option<String>>,
    job_id: Vec<Option<String>>,
    git_ref: Vec<Option<String>>,
    ref_type: Vec<Option<String>>,
    sha: Vec<Option<String>>,
    user_login: Vec<Option<String>>,
    environment: Vec<Option<String>>,
    runner_id: Vec<Option<i64>>,
    claims: Vec<Option<serde_json::Value>>,
    role: Vec<Option<String>>,
    target: Vec<Option<String>>,
    backend: Vec<Option<String>>,
    requested_ttl_seconds: Vec<Option<i32>>,
    granted_ttl_seconds: Vec<Option<i32>>,
    expires_at: Vec<Option<OffsetDateTime>>,
    job_deadline: Vec<Option<OffsetDateTime>>,
    client_addr: Vec<Option<String>>,
    user_agent: Vec<Option<String>>,
    credential_sha256: Vec<Option<String>>,
    credential_handle: Vec<Option<String>>,
    occurrences: Vec<i32>,
    overshoot_seconds: Vec<Option<i32>>,
}

impl ColumnArrays {
    fn push(&mut self, row: Columns) {
        self.id.push(row.id);
        self.occurred_at.push(row.occurred_at);
        self.request_id.push(row.request_id);
        self.decision.push(row.decision);
        self.code.push(row.code);
        self.detail.push(row.detail);
        self.issuer.push(row.issuer);
        self.subject.push(row.subject);
        self.job_token_sha256.push(row.job_token_sha256);
        self.project_path.push(row.project_path);
        self.job_project_path.push(row.job_project_path);
        self.namespace_path.push(row.namespace_path);
        self.pipeline_id.push(row.pipeline_id);
        self.job_id.push(row.job_id);
        self.git_ref.push(row.git_ref);
        self.ref_type.push(row.ref_type);
        self.sha.push(row.sha);
        self.user_login.push(row.user_login);
        self.environment.push(row.environment);
        self.runner_id.push(row.runner_id);
        self.claims.push(row.claims);
        self.role.push(row.role);
        self.target.push(row.target);
        self.backend.push(row.backend);
        self.requested_ttl_seconds.push(row.requested_ttl_seconds);
        self.granted_ttl_seconds.push(row.granted_ttl_seconds);
        self.expires_at.push(row.expires_at);
        self.job_deadline.push(row.job_deadline);
        self.client_addr.push(row.client_addr);
        self.user_agent.push(row.user_agent);
        self.credential_sha256.push(row.credential_sha256);
        self.credential_handle.push(row.credential_handle);
        self.occurrences.push(row.occurrences);
        self.overshoot_seconds.push(row.overshoot_seconds);
    }
}

impl PgAudit {
    /// One row, one INSERT, one commit: what `audit_group_commit = false` does per request.
    /// Autocommit: the INSERT returns only once the row is durable (synchronous_commit).
    #[tracing::instrument(skip_all, fields(issuance_id = %event.id, decision = event.decision.as_str()))]
    pub async fn write(&self, event: &AuditEvent) -> Result<(), AuditError> {
        let row = Columns::of(event);
        sqlx::query(&format!(
            "insert into audit_events ({INSERT_COLUMNS}) values (
                $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17,
                $18, $19, $20, $21, $22, $23, $24, $25, $26, $27, $28, $29, $30, $31, $32, $33, $34
             )"
        ))
        .bind(row.id)
        .bind(row.occurred_at)
        .bind(row.request_id)
        .bind(row.decision)
        .bind(row.code)
        .bind(row.detail)
        .bind(row.issuer)
        .bind(row.subject)
        .bind(row.job_token_sha256)
        .bind(row.project_path)
        .bind(row.job_project_path)
        .bind(row.namespace_path)
        .bind(row.pipeline_id)
        .bind(row.job_id)
        .bind(row.git_ref)
        .bind(row.ref_type)
        .bind(row.sha)
        .bind(row.user_login)
        .bind(row.environment)
        .bind(row.runner_id)
        .bind(row.claims)
        .bind(row.role)
        .bind(row.target)
        .bind(row.backend)
        .bind(row.requested_ttl_seconds)
        .bind(row.granted_ttl_seconds)
        .bind(row.expires_at)
        .bind(row.job_deadline)
        .bind(row.client_addr)
        .bind(row.user_agent)
        .bind(row.credential_sha256)
        .bind(row.credential_handle)
        .bind(row.occurrences)
        .bind(row.overshoot_seconds)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Many rows in one INSERT and one commit: all of them are durable, or none is.
    pub async fn write_batch(&self, events: impl Iterator<Item = &AuditEvent>) -> Result<(), AuditError> {
        let mut columns = ColumnArrays::default();
        for event in events {
            columns.push(Columns::of(event));
        }
        sqlx::query(&format!(
            "insert into audit_events ({INSERT_COLUMNS})
             select * from unnest(
                $1::uuid[], $2::timestamptz[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[],
                $8::text[], $9::text[], $10::text[], $11::text[], $12::text[], $13::text[], $14::text[],
                $15::text[], $16::text[], $17::text[], $18::text[], $19::text[], $20::bigint[], $21::jsonb[],
                $22::text[], $23::text[], $24::text[], $25::integer[], $26::integer[], $27::timestamptz[],
                $28::timestamptz[], $29::text[], $30::text[], $31::text[], $32::text[], $33::integer[], $34::integer[]
             )"
        ))
        .bind(columns.id)
        .bind(columns.occurred_at)
        .bind(columns.request_id)
        .bind(columns.decision)
        .bind(columns.code)
        .bind(columns.detail)
        .bind(columns.issuer)
        .bind(columns.subject)
        .bind(columns.job_token_sha256)
        .bind(columns.project_path)
        .bind(columns.job_project_path)
        .bind(columns.namespace_path)
        .bind(columns.pipeline_id)
        .bind(columns.job_id)
        .bind(columns.git_ref)
        .bind(columns.ref_type)
        .bind(columns.sha)
        .bind(columns.user_login)
        .bind(columns.environment)
        .bind(columns.runner_id)
        .bind(columns.claims)
        .bind(columns.role)
        .bind(columns.target)
        .bind(columns.backend)
        .bind(columns.requested_ttl_seconds)
        .bind(columns.granted_ttl_seconds)
        .bind(columns.expires_at)
        .bind(columns.job_deadline)
        .bind(columns.client_addr)
        .bind(columns.user_agent)
        .bind(columns.credential_sha256)
        .bind(columns.credential_handle)
        .bind(columns.occurrences)
        .bind(columns.overshoot_seconds)
        .execute(&self.pool)
        .await?;
        Ok(())
    }
}
