//! Gogs deliveries: the record of each accepted webhook, which is also its replay guard: the
//! delivery id is the primary key, and a payload is accepted once per hook
//! (`gogs_delivery_payloads`, migration 0015), whatever delivery id it comes with.

use sqlx::PgPool;
use time::OffsetDateTime;
use uuid::Uuid;

use super::AuditError;

/// One accepted (signature-checked) delivery as it is stored. No secret: the delivery token
/// appears only as its SHA-256 fingerprint.
#[derive(Debug, Clone)]
pub struct DeliveryRecord {
    pub delivery_id: String,
    /// The id of the delivery's row in `audit_events`.
    pub audit_id: Uuid,
    pub hook: String,
    pub event: String,
    /// False for events the broker records but does not act on.
    pub acted_on: bool,
    pub repository: Option<String>,
    pub git_ref: Option<String>,
    pub ref_type: Option<String>,
    pub before_sha: Option<String>,
    pub after_sha: Option<String>,
    pub pusher: Option<String>,
    pub payload_sha256: String,
    pub received_at: OffsetDateTime,
    pub token_sha256: Option<String>,
    pub token_expires_at: Option<OffsetDateTime>,
    pub forward_url: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Recorded {
    New,
    /// A delivery with this id was recorded before: a replay.
    DuplicateDelivery,
    /// This hook accepted the same payload before, as delivery `first_delivery_id`: a replay
    /// under a fresh delivery id.
    DuplicatePayload { first_delivery_id: String },
}

/// Records the delivery and claims its payload in one transaction. Of concurrent deliveries
/// with one id or one payload, exactly one commits; the others wait on its key and then find
/// it taken.
#[tracing::instrument(skip_all, fields(delivery_id = %record.delivery_id))]
pub async fn record_delivery(pool: &PgPool, record: &DeliveryRecord) -> Result<Recorded, AuditError> {
    let mut transaction = pool.begin().await?;
    let inserted = sqlx::query(
        "insert into gogs_deliveries (delivery_id, hook, event, outcome, repository, ref, ref_type, before_sha,
             after_sha, pusher, payload_sha256, received_at, token_sha256, token_expires_at, forward_url, audit_id)
         values ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16)
         on conflict (delivery_id) do nothing",
    )
    .bind(&record.delivery_id)
    .bind(&record.hook)
    .bind(&record.event)
    .bind(if record.acted_on { "accepted" } else { "ignored" })
    .bind(&record.repository)
    .bind(&record.git_ref)
    .bind(&record.ref_type)
    .bind(&record.before_sha)
    .bind(&record.after_sha)
    .bind(&record.pusher)
    .bind(&record.payload_sha256)
    .bind(record.received_at)
    .bind(&record.token_sha256)
    .bind(record.token_expires_at)
    .bind(&record.forward_url)
    .bind(record.audit_id)
    .execute(&mut *transaction)
    .await?
    .rows_affected();
    if inserted == 0 {
        return Ok(Recorded::DuplicateDelivery);
    }
    let claimed = sqlx::query(
        "insert into gogs_delivery_payloads (hook, payload_sha256, delivery_id) values ($1, $2, $3)
         on conflict do nothing",
    )
    .bind(&record.hook)
    .bind(&record.payload_sha256)
    .bind(&record.delivery_id)
    .execute(&mut *transaction)
    .await?
    .rows_affected();
    if claimed == 0 {
        transaction.rollback().await?;
        let first_delivery_id: Option<String> =
            sqlx::query_scalar("select delivery_id from gogs_delivery_payloads where hook = $1 and payload_sha256 = $2")
                .bind(&record.hook)
                .bind(&record.payload_sha256)
                .fetch_optional(pool)
                .await?;
        return Ok(Recorded::DuplicatePayload { first_delivery_id: first_delivery_id.unwrap_or_default() });
    }
    transaction.commit().await?;
    Ok(Recorded::New)
}

/// Undoes [`record_delivery`] when the delivery's audit row could not be written: nothing was
/// handed out, so Gogs may redeliver it. Its queued stream event goes too, unless already sent.
pub async fn withdraw_delivery(pool: &PgPool, delivery_id: &str) -> Result<(), AuditError> {
    let mut transaction = pool.begin().await?;
    sqlx::query("delete from event_outbox where kind = 'gogs.delivery' and event_key = $1 and delivered_at is null")
        .bind(delivery_id)
        .execute(&mut *transaction)
        .await?;
    // The payload's claim goes with it (on delete cascade).
    sqlx::query("delete from gogs_deliveries where delivery_id = $1").bind(delivery_id).execute(&mut *transaction).await?;
    transaction.commit().await?;
    Ok(())
}

/// How forwarding the delivery to the automation went (`"200"`, `"503"`, `"error: ..."`).
pub async fn record_forward_status(pool: &PgPool, delivery_id: &str, status: &str) -> Result<(), AuditError> {
    sqlx::query("update gogs_deliveries set forward_status = $2 where delivery_id = $1")
        .bind(delivery_id)
        .bind(status)
        .execute(pool)
        .await?;
    Ok(())
}
