//! Gogs deliveries: the record of each accepted webhook, which is also its replay guard (the
//! delivery id is the primary key).

use sqlx::PgPool;
use time::OffsetDateTime;

use super::AuditError;

/// One accepted (signature-checked) delivery as it is stored. No secret: the delivery token
/// appears only as its SHA-256 fingerprint.
#[derive(Debug, Clone)]
pub struct DeliveryRecord {
    pub delivery_id: String,
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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recorded {
    New,
    /// A delivery with this id was recorded before: a replay.
    Duplicate,
}

#[tracing::instrument(skip_all, fields(delivery_id = %record.delivery_id))]
pub async fn record_delivery(pool: &PgPool, record: &DeliveryRecord) -> Result<Recorded, AuditError> {
    let inserted = sqlx::query(
        "insert into gogs_deliveries (delivery_id, hook, event, outcome, repository, ref, ref_type, before_sha,
             after_sha, pusher, payload_sha256, received_at, token_sha256, token_expires_at, forward_url)
         values ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15)
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
    .execute(pool)
    .await?
    .rows_affected();
    Ok(if inserted == 1 { Recorded::New } else { Recorded::Duplicate })
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
