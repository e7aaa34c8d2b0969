//! Postgres: the audit table, replay counters, and the queries the CLI runs.

use std::time::Duration;

use async_trait::async_trait;
use secrecy::{ExposeSecret, SecretString};
use serde::Serialize;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{PgPool, Row};
use time::OffsetDateTime;
use uuid::Uuid;

use super::{AuditError, AuditEvent, AuditWriter, TokenUse};

/// A lazy pool: the broker starts serving health checks even if Postgres is briefly away, and
/// once it comes back new connections are made without a restart. Acquiring fails after
/// `acquire_timeout`, which is what turns an outage into a prompt `audit_unavailable`.
pub fn connect(url: &SecretString, max_connections: u32, acquire_timeout: Duration) -> Result<PgPool, AuditError> {
    let options: PgConnectOptions = url.expose_secret().parse()?;
    let options = options.application_name("credbroker").options([("statement_timeout", "10s")]);
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
    pub fn new(pool: PgPool) -> Self {
        Self { pool }
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
        let used: i32 = sqlx::query_scalar(
            "select coalesce(max(use_number), 0) from token_uses where issuer = $1 and jti = $2 and role = $3",
        )
        .bind(issuer)
        .bind(jti)
        .bind(role)
        .fetch_one(&self.pool)
        .await?;
        // A concurrent exchange may take the number we try; the primary key decides, and we
        // move on to the next number until the permitted uses run out.
        for use_number in (used.max(0) as u32 + 1)..=max_uses {
            let inserted = sqlx::query(
                "insert into token_uses (issuer, jti, role, use_number, token_expires_at)
                 values ($1, $2, $3, $4, $5)
                 on conflict do nothing",
            )
            .bind(issuer)
            .bind(jti)
            .bind(role)
            .bind(use_number as i32)
            .bind(token_expires_at)
            .execute(&self.pool)
            .await?
            .rows_affected();
            if inserted == 1 {
                return Ok(TokenUse::Claimed(use_number));
            }
        }
        Ok(TokenUse::Exhausted)
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

#[async_trait]
impl AuditWriter for PgAudit {
    #[tracing::instrument(skip_all, fields(issuance_id = %event.id, decision = event.decision.as_str()))]
    async fn write(&self, event: &AuditEvent) -> Result<(), AuditError> {
        let runner_id: Option<i64> = event.claims.as_ref().and_then(|claims| match claims.get("runner_id")? {
            serde_json::Value::Number(n) => n.as_i64(),
            serde_json::Value::String(s) => s.parse().ok(),
            _ => None,
        });
        // Autocommit: the INSERT has returned only once the row is durable (synchronous_commit).
        sqlx::query(
            "insert into audit_events (
                id, occurred_at, request_id, decision, code, detail, issuer, subject, job_token_sha256,
                project_path, job_project_path, namespace_path, pipeline_id, job_id, ref, ref_type, sha,
                user_login, environment, runner_id, claims, role, target, backend,
                requested_ttl_seconds, granted_ttl_seconds, expires_at, job_deadline,
                client_addr, user_agent, credential_sha256, credential_handle, occurrences, overshoot_seconds
             ) values (
                $1, $2, $3, $4, $5, $6, $7, $8, $9,
                $10, $11, $12, $13, $14, $15, $16, $17,
                $18, $19, $20, $21, $22, $23, $24,
                $25, $26, $27, $28,
                $29, $30, $31, $32, $33, $34
             )",
        )
        .bind(event.id)
        .bind(event.occurred_at)
        .bind(&event.request_id)
        .bind(event.decision.as_str())
        .bind(&event.code)
        .bind(&event.detail)
        .bind(&event.issuer)
        .bind(&event.subject)
        .bind(&event.job_token_sha256)
        .bind(event.claim_text("project_path"))
        .bind(event.claim_text("job_project_path"))
        .bind(event.claim_text("namespace_path"))
        .bind(event.claim_text("pipeline_id"))
        .bind(event.claim_text("job_id"))
        .bind(event.claim_text("ref"))
        .bind(event.claim_text("ref_type"))
        .bind(event.claim_text("sha"))
        .bind(event.claim_text("user_login"))
        .bind(event.claim_text("environment"))
        .bind(runner_id)
        .bind(event.claims.clone().map(serde_json::Value::Object))
        .bind(&event.role)
        .bind(&event.target)
        .bind(&event.backend)
        .bind(event.requested_ttl_seconds.map(|s| s as i32))
        .bind(event.granted_ttl_seconds.map(|s| s as i32))
        .bind(event.expires_at)
        .bind(event.job_deadline)
        .bind(&event.client_addr)
        .bind(&event.user_agent)
        .bind(&event.credential_sha256)
        .bind(&event.credential_handle)
        .bind(event.occurrences as i32)
        .bind(event.overshoot_seconds.map(|s| s as i32))
        .execute(&self.pool)
        .await?;
        Ok(())
    }
}
