//! SQL of what happens to a credential after it is issued: the durable revocation schedule, the issued rows an
//! on-demand revocation selects, and freezes.

use std::time::Duration;

use sqlx::Row;
use time::OffsetDateTime;
use uuid::Uuid;

use super::record::{claim_text, CLAIMS, SELECT_LIST};
use super::{AuditError, AuditEvent, AuditRecord, PgAudit};

/// Why a revocation was scheduled (the `reason` column).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RevocationReason {
    /// The credential would outlive its job (or its grant).
    Deadline,
    /// The security team asked (`POST /v1/revocations`).
    OnDemand,
    /// Minted but never handed over: the issued row was not written or the request was cancelled.
    NotDelivered,
    /// `credbroker exec` is done with it.
    ExecExit,
    /// `credbroker exec` renewed it: the new credential replaced it in the files.
    Superseded,
}

impl RevocationReason {
    pub fn as_str(self) -> &'static str {
        match self {
            RevocationReason::Deadline => "deadline",
            RevocationReason::OnDemand => "on_demand",
            RevocationReason::NotDelivered => "not_delivered",
            RevocationReason::ExecExit => "exec_exit",
            RevocationReason::Superseded => "superseded",
        }
    }
}

/// A revocation a replica has claimed and now owns until `claimed_until`.
#[derive(Debug, Clone)]
pub struct ClaimedRevocation {
    pub issuance_id: Uuid,
    pub backend: String,
    pub handle: String,
    pub reason: String,
    pub requested_by: Option<String>,
    /// Including this one.
    pub attempts: u32,
    /// The secret the revocation needs, sealed (see `revocation::secret_encryption`).
    pub sealed_secret: Option<Vec<u8>>,
}

/// An issued row, with what the lifecycle knows about it.
#[derive(Debug, Clone)]
pub struct IssuedCredential {
    /// With its claims.
    pub record: AuditRecord,
    /// Every issued row has one (a check constraint of migration 0001).
    pub expires_at: OffsetDateTime,
    /// `pending`, `revoked` or `failed` when a revocation is scheduled.
    pub revocation_state: Option<String>,
}

impl IssuedCredential {
    pub fn issuance_id(&self) -> Uuid {
        self.record.id
    }
}

/// The claims that name a token's project or namespace, by path or by id. A freeze or a
/// revocation by project matches a token carrying the value in any of them: a fork's merge
/// request pipeline names the upstream project only in `job_project_path`, and generic issuers
/// may send no `project_path` at all.
pub const PROJECT_IDENTITY_CLAIMS: &[&str] = &[
    "project_path",
    "job_project_path",
    "namespace_path",
    "job_namespace_path",
    "project_id",
    "job_project_id",
    "namespace_id",
    "job_namespace_id",
];

/// The values of [`PROJECT_IDENTITY_CLAIMS`] a token carries, as text.
pub fn project_identities(event: &AuditEvent) -> Vec<String> {
    PROJECT_IDENTITY_CLAIMS.iter().filter_map(|claim| event.claim_text(claim).map(String::from)).collect()
}

/// Which issued credentials an on-demand revocation is about. Every set field must match.
#[derive(Debug, Clone, Default)]
pub struct IssuanceSelector {
    pub issuance: Option<Uuid>,
    pub job: Option<String>,
    pub pipeline: Option<String>,
    pub project: Option<String>,
    pub subject: Option<String>,
    pub issued_since: Option<OffsetDateTime>,
    pub role: Option<String>,
}

/// The condition on a `freezes` row that it is in force now and covers the role `role` or one
/// of the project identities in the array `identities` (SQL expressions). The token-use claims
/// refuse on it in the same statement.
pub(super) fn freeze_covers(role: &str, identities: &str) -> String {
    format!(
        "lifted_at is null and (until is null or until > now())
         and (scope = 'all' or (scope = 'role' and value = {role}) or (scope = 'project' and value = any({identities})))"
    )
}

pub(super) fn freeze_from_row(row: &sqlx::postgres::PgRow) -> Result<Freeze, sqlx::Error> {
    Ok(Freeze {
        scope: row.try_get("scope")?,
        value: row.try_get("value")?,
        frozen_by: row.try_get("frozen_by")?,
        frozen_at: row.try_get("frozen_at")?,
        until: row.try_get("until")?,
    })
}

/// An active freeze.
#[derive(Debug, Clone)]
pub struct Freeze {
    pub scope: String,
    pub value: String,
    pub frozen_by: String,
    pub frozen_at: OffsetDateTime,
    pub until: Option<OffsetDateTime>,
}

/// Most credentials one selector may touch: a larger match is refused, not truncated.
pub const SELECTOR_LIMIT: i64 = 10_000;

fn issued_from_row(row: &sqlx::postgres::PgRow) -> Result<IssuedCredential, sqlx::Error> {
    let record = <AuditRecord as sqlx::FromRow<_>>::from_row(row)?;
    Ok(IssuedCredential {
        expires_at: record.expires_at.ok_or_else(|| sqlx::Error::ColumnNotFound("expires_at".into()))?,
        revocation_state: row.try_get("revocation_state")?,
        record,
    })
}

/// `project` of a selector against every project identity an issued row's token carried.
fn project_condition(parameter: &str) -> String {
    let claims: Vec<String> = PROJECT_IDENTITY_CLAIMS.iter().map(|&claim| claim_text(claim)).collect();
    format!("{parameter} in ({})", claims.join(", "))
}

impl PgAudit {
    /// Schedules (or brings forward) the revocation of one credential. A revocation already
    /// done stays done; an earlier due time wins, with its reason. `sealed_secret` is stored
    /// with the first schedule; a later one (on demand) keeps it.
    #[tracing::instrument(skip(self, sealed_secret))]
    #[allow(clippy::too_many_arguments)]
    pub async fn schedule_revocation(
        &self,
        issuance_id: Uuid,
        backend: &str,
        handle: &str,
        due_at: OffsetDateTime,
        reason: RevocationReason,
        requested_by: Option<&str>,
        sealed_secret: Option<&[u8]>,
    ) -> Result<(), AuditError> {
        sqlx::query(
            "insert into revocations (issuance_id, backend, handle, due_at, next_attempt_at, reason, requested_by, sealed_secret)
             values ($1, $2, $3, $4, $4, $5, $6, $7)
             on conflict (issuance_id) do update set
                 due_at = least(revocations.due_at, excluded.due_at),
                 next_attempt_at = least(revocations.next_attempt_at, excluded.due_at),
                 reason = case when excluded.due_at < revocations.due_at then excluded.reason else revocations.reason end,
                 requested_by = coalesce(excluded.requested_by, revocations.requested_by),
                 sealed_secret = coalesce(revocations.sealed_secret, excluded.sealed_secret),
                 state = case when revocations.state = 'failed' then 'pending' else revocations.state end
             where revocations.state <> 'revoked'",
        )
        .bind(issuance_id)
        .bind(backend)
        .bind(handle)
        .bind(due_at)
        .bind(reason.as_str())
        .bind(requested_by)
        .bind(sealed_secret)
        .execute(self.pool())
        .await?;
        Ok(())
    }

    /// Claims up to `limit` due revocations (all due ones, or only those in `only`). Rows another
    /// replica is claiming right now are skipped, not waited for; a claimed row is hidden from
    /// everyone for `claim_for`, so a replica that dies mid-attempt hands it on after that.
    pub async fn claim_due_revocations(
        &self,
        limit: i64,
        claim_for: Duration,
        only: Option<&[Uuid]>,
    ) -> Result<Vec<ClaimedRevocation>, AuditError> {
        let rows = sqlx::query(
            "update revocations set attempts = attempts + 1, next_attempt_at = now() + make_interval(secs => $2)
             where issuance_id in (
                 select issuance_id from revocations
                 where state = 'pending' and next_attempt_at <= now()
                   and ($3::uuid[] is null or issuance_id = any($3))
                 order by next_attempt_at
                 limit $1
                 for update skip locked
             )
             returning issuance_id, backend, handle, reason, requested_by, attempts, sealed_secret",
        )
        .bind(limit)
        .bind(claim_for.as_secs_f64())
        .bind(only)
        .fetch_all(self.pool())
        .await?;
        rows.iter()
            .map(|row| {
                Ok(ClaimedRevocation {
                    issuance_id: row.try_get("issuance_id")?,
                    backend: row.try_get("backend")?,
                    handle: row.try_get("handle")?,
                    reason: row.try_get("reason")?,
                    requested_by: row.try_get("requested_by")?,
                    attempts: row.try_get::<i32, _>("attempts")? as u32,
                    sealed_secret: row.try_get("sealed_secret")?,
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(AuditError::from)
    }

    /// Marks a revocation done and drops its sealed secret: it is of no further use.
    pub async fn revocation_succeeded(&self, issuance_id: Uuid) -> Result<(), AuditError> {
        sqlx::query("update revocations set state = 'revoked', revoked_at = now(), last_error = null, sealed_secret = null where issuance_id = $1")
            .bind(issuance_id)
            .execute(self.pool())
            .await?;
        Ok(())
    }

    /// Records a failed attempt: tried again after `retry_in`, or (None) given up, which also
    /// drops the sealed secret (nothing will use it).
    pub async fn revocation_failed(&self, issuance_id: Uuid, error: &str, retry_in: Option<Duration>) -> Result<(), AuditError> {
        sqlx::query(
            "update revocations set last_error = $2,
                 state = case when $3::float8 is null then 'failed' else 'pending' end,
                 sealed_secret = case when $3::float8 is null then null else sealed_secret end,
                 next_attempt_at = case when $3::float8 is null then next_attempt_at else now() + make_interval(secs => $3) end
             where issuance_id = $1",
        )
        .bind(issuance_id)
        .bind(error)
        .bind(retry_in.map(|wait| wait.as_secs_f64()))
        .execute(self.pool())
        .await?;
        Ok(())
    }

    /// The issued row of one issuance, if it was written.
    pub async fn issued_credential(&self, issuance_id: Uuid) -> Result<Option<IssuedCredential>, AuditError> {
        let row = sqlx::query(&format!(
            "select {}, {CLAIMS} as claims, r.state as revocation_state from audit_events a left join revocations r on r.issuance_id = a.id
             where a.id = $1 and a.decision = 'issued'",
            *SELECT_LIST
        ))
        .bind(issuance_id)
        .fetch_optional(self.pool())
        .await?;
        Ok(row.as_ref().map(issued_from_row).transpose()?)
    }

    /// Issued credentials matching the selector that have not expired yet, oldest first; at
    /// most [`SELECTOR_LIMIT`] + 1 rows, so the caller can tell the limit was passed.
    pub async fn select_live_issued(&self, selector: &IssuanceSelector) -> Result<Vec<IssuedCredential>, AuditError> {
        let rows = sqlx::query(&format!(
            "select {}, {CLAIMS} as claims, r.state as revocation_state from audit_events a left join revocations r on r.issuance_id = a.id
             where a.decision = 'issued' and a.expires_at > now()
               and ($1::uuid is null or a.id = $1)
               and ($2::text is null or a.job_id = $2)
               and ($3::text is null or a.pipeline_id = $3)
               and ($4::text is null or {})
               and ($5::text is null or a.subject = $5)
               and ($6::timestamptz is null or a.occurred_at >= $6)
               and ($7::text is null or a.role = $7)
             order by a.occurred_at, a.id
             limit $8",
            *SELECT_LIST,
            project_condition("$4")
        ))
        .bind(selector.issuance)
        .bind(&selector.job)
        .bind(&selector.pipeline)
        .bind(&selector.project)
        .bind(&selector.subject)
        .bind(selector.issued_since)
        .bind(&selector.role)
        .bind(SELECTOR_LIMIT + 1)
        .fetch_all(self.pool())
        .await?;
        rows.iter().map(issued_from_row).collect::<Result<_, sqlx::Error>>().map_err(AuditError::from)
    }

    /// Whether the security team revoked (`on_demand`) the issuance `first` or any renewal
    /// that continues it. Renewals written before migration 0014 are found through the backfill.
    pub async fn chain_revoked_on_demand(&self, first: Uuid) -> Result<bool, AuditError> {
        Ok(sqlx::query_scalar(
            "select exists (
                 select from revocations r
                 where r.reason = 'on_demand'
                   and r.issuance_id in (
                       select $1
                       union select id from audit_events where renews_issuance_id = $1
                       union select id from audit_lineage_backfill where renews_issuance_id = $1
                   )
             )",
        )
        .bind(first)
        .fetch_one(self.pool())
        .await?)
    }

    pub async fn freeze(&self, scope: &str, value: &str, frozen_by: &str, until: Option<OffsetDateTime>) -> Result<(), AuditError> {
        sqlx::query("insert into freezes (id, scope, value, frozen_by, until) values ($1, $2, $3, $4, $5)")
            .bind(Uuid::new_v4())
            .bind(scope)
            .bind(value)
            .bind(frozen_by)
            .bind(until)
            .execute(self.pool())
            .await?;
        Ok(())
    }

    /// Lifts every active freeze of this scope and value; returns how many there were.
    pub async fn unfreeze(&self, scope: &str, value: &str, lifted_by: &str) -> Result<u64, AuditError> {
        let done = sqlx::query(
            "update freezes set lifted_by = $3, lifted_at = now()
             where scope = $1 and value = $2 and lifted_at is null and (until is null or until > now())",
        )
        .bind(scope)
        .bind(value)
        .bind(lifted_by)
        .execute(self.pool())
        .await?;
        Ok(done.rows_affected())
    }

    /// The freeze that stops an exchange for this role or any of the token's project
    /// identities ([`project_identities`]), if any (the earliest).
    pub async fn active_freeze(&self, role: &str, project_identities: &[String]) -> Result<Option<Freeze>, AuditError> {
        active_freeze_on(self.pool(), role, project_identities).await
    }
}

/// [`PgAudit::active_freeze`] on a connection the caller holds.
pub(super) async fn active_freeze_on<'c>(executor: impl sqlx::PgExecutor<'c>, role: &str, project_identities: &[String]) -> Result<Option<Freeze>, AuditError> {
    let row = sqlx::query(&format!(
        "select scope, value, frozen_by, frozen_at, until from freezes where {} order by frozen_at limit 1",
        freeze_covers("$1", "$2")
    ))
    .bind(role)
    .bind(project_identities)
    .fetch_optional(executor)
    .await?;
    Ok(row.as_ref().map(freeze_from_row).transpose()?)
}
