//! Tamper evidence without a lock on the hot path: rows are written as before, and a sealing
//! task (any replica; `pg_try_advisory_xact_lock` lets one seal at a time, the others skip)
//! periodically takes the rows after the last checkpoint, in `(tx, id)` order and only below
//! the horizon of finished transactions (so no row can later appear inside a sealed range
//! unless someone forges it), and writes a checkpoint: each row's id and SHA-256 over its
//! canonical content, a hash chain over them that starts from the previous checkpoint's root,
//! and a JWS over all of it made with the broker's seal key.
//!
//! `audit verify` walks the checkpoints, checks each signature and chain link, and compares the
//! rows now in each checkpoint's range with what was sealed, naming the first row altered,
//! deleted, moved or inserted out of order.
//!
//! Archiving (`credbroker audit archive`, migration 0013): whole checkpoints, oldest first,
//! with the rows they sealed, go to a JSON-lines file and then leave the database through
//! `audit_archive()`, which records the last archived checkpoint's place, root and JWS in
//! `audit_archives`. Verification and sealing continue from that record: the first remaining
//! checkpoint must chain to its root, and the JWS proves the seal key made it. The file
//! verifies on its own (`audit verify --archive FILE`).
//!
//! Canonical content of a row: `to_jsonb(row)` read with the session time zone set to UTC,
//! without `tx` (the row's place, which the checkpoint's order covers) and without keys whose
//! value is null (so a nullable column added later does not change the hashes of old rows),
//! serialised as JSON with object keys sorted and no whitespace.

mod archive;
mod seal;
mod verify;

use jsonwebtoken::{DecodingKey, Validation};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};
use sqlx::{Postgres, Row, Transaction};
use time::OffsetDateTime;
use uuid::Uuid;

pub use archive::ArchiveSummary;
pub use seal::Sealed;
pub use verify::{verify_archive, Finding, FindingKind, VerifyReport};

use super::AuditError;
use crate::signing::{SigningKey, SigningKeyError};

/// The advisory lock replicas take to seal; any constant other code does not use.
const SEAL_LOCK: i64 = 0x6372_6564_5f73_6561;

/// Rows per checkpoint at most: bounds the memory of sealing and verifying one checkpoint.
pub const DEFAULT_ROWS_PER_CHECKPOINT: i64 = 10_000;

#[derive(Debug, thiserror::Error)]
pub enum SealError {
    #[error(transparent)]
    Audit(#[from] AuditError),
    #[error("cannot sign the checkpoint: {0}")]
    Sign(#[from] SigningKeyError),
    #[error("unreadable row or checkpoint: {0}")]
    Corrupt(String),
    /// An archive that must not be made (nothing whole to take, a split checkpoint, tampering).
    #[error("{0}")]
    Refused(String),
    #[error("archive file: {0}")]
    Io(#[from] std::io::Error),
}

impl From<sqlx::Error> for SealError {
    fn from(error: sqlx::Error) -> Self {
        SealError::Audit(AuditError::from(error))
    }
}

/// What a seal's JWS says; verification compares it with the checkpoint row.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct CheckpointClaims {
    checkpoint: i64,
    first_tx: String,
    first_id: Uuid,
    last_tx: String,
    last_id: Uuid,
    rows: i64,
    previous_root: String,
    root: String,
}

/// SHA-256 of a row's canonical content (module docs).
pub fn row_hash(content: &Value) -> [u8; 32] {
    let canonical = match content {
        Value::Object(map) => {
            Value::Object(map.iter().filter(|(key, value)| !value.is_null() && key.as_str() != "tx").map(|(k, v)| (k.clone(), v.clone())).collect())
        }
        other => other.clone(),
    };
    // serde_json's Map is ordered by key (no `preserve_order`), so this is canonical.
    Sha256::digest(serde_json::to_vec(&canonical).expect("a JSON value serialises")).into()
}

fn chain(previous_root: &[u8], rows: &[(Uuid, [u8; 32])]) -> [u8; 32] {
    let mut head: [u8; 32] = previous_root.try_into().unwrap_or([0; 32]);
    for (id, hash) in rows {
        let mut hasher = Sha256::new();
        hasher.update(head);
        hasher.update(id.as_bytes());
        hasher.update(hash);
        head = hasher.finalize().into();
    }
    head
}

/// A row's place in the sealed order.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Key {
    tx: String,
    id: Uuid,
}

impl Key {
    fn before_everything() -> Self {
        Self { tx: "0".into(), id: Uuid::nil() }
    }
}

struct CurrentRow {
    id: Uuid,
    tx: String,
    occurred_at: OffsetDateTime,
    hash: [u8; 32],
}

/// Rows after `after` (exclusive) up to `through` (inclusive), or up to the horizon and `limit`.
async fn rows_after(
    transaction: &mut Transaction<'_, Postgres>,
    after: &Key,
    through: Option<&Key>,
    limit: i64,
) -> Result<Vec<CurrentRow>, SealError> {
    let rows = sqlx::query(
        "select a.id, a.tx::text as tx, a.occurred_at, to_jsonb(a) as content from audit_events a
         where (a.tx, a.id) > ($1::xid8, $2)
           and case when $3::text is null then a.tx < pg_snapshot_xmin(pg_current_snapshot())
                    else (a.tx, a.id) <= ($3::xid8, $4) end
         order by a.tx, a.id
         limit $5",
    )
    .bind(&after.tx)
    .bind(after.id)
    .bind(through.map(|key| key.tx.clone()))
    .bind(through.map(|key| key.id))
    .bind(limit)
    .fetch_all(&mut **transaction)
    .await?;
    rows.iter()
        .map(|row| {
            let content: Value = row.try_get("content")?;
            Ok(CurrentRow { id: row.try_get("id")?, tx: row.try_get("tx")?, occurred_at: row.try_get("occurred_at")?, hash: row_hash(&content) })
        })
        .collect()
}

async fn canonical_session(pool: &sqlx::PgPool) -> Result<Transaction<'static, Postgres>, SealError> {
    let mut transaction = pool.begin().await?;
    // to_jsonb renders timestamps in the session's time zone: fix it so hashes do not depend on it.
    sqlx::query("set local timezone = 'UTC'").execute(&mut *transaction).await?;
    Ok(transaction)
}

/// Where the chain continues: a checkpoint in the table, or the last one an archive removed.
#[derive(Debug, Clone)]
struct Link {
    number: i64,
    last: Key,
    root: Vec<u8>,
}

#[derive(Debug, Clone)]
struct StoredCheckpoint {
    number: i64,
    first: Key,
    last: Key,
    row_count: i64,
    event_ids: Vec<Uuid>,
    row_hashes: Vec<u8>,
    previous_root: Vec<u8>,
    root: Vec<u8>,
    signature: String,
}

/// A checkpoint row as `to_jsonb` gives it (in archive files).
#[derive(Deserialize)]
struct CheckpointJson {
    number: i64,
    first_tx: String,
    first_id: Uuid,
    last_tx: String,
    last_id: Uuid,
    row_count: i64,
    event_ids: Vec<Uuid>,
    #[serde(deserialize_with = "bytea_hex")]
    row_hashes: Vec<u8>,
    #[serde(deserialize_with = "bytea_hex")]
    previous_root: Vec<u8>,
    #[serde(deserialize_with = "bytea_hex")]
    root: Vec<u8>,
    signature: String,
}

impl StoredCheckpoint {
    fn link(&self) -> Link {
        Link { number: self.number, last: self.last.clone(), root: self.root.clone() }
    }
}

/// bytea as `to_jsonb` writes it: `\x` and hex.
fn bytea_hex<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Vec<u8>, D::Error> {
    let text = String::deserialize(deserializer)?;
    hex::decode(text.strip_prefix("\\x").unwrap_or(&text)).map_err(serde::de::Error::custom)
}

/// The newest archive record (migration 0013), if any rows were ever archived.
struct Anchor {
    link: Link,
    signature: String,
}

async fn latest_anchor(transaction: &mut Transaction<'_, Postgres>) -> Result<Option<Anchor>, SealError> {
    let row = sqlx::query(
        "select through_checkpoint, last_tx::text as last_tx, last_id, root, signature from audit_archives
         order by through_checkpoint desc limit 1",
    )
    .fetch_optional(&mut **transaction)
    .await?;
    row.map(|row| -> Result<Anchor, sqlx::Error> {
        Ok(Anchor {
            link: Link {
                number: row.try_get("through_checkpoint")?,
                last: Key { tx: row.try_get("last_tx")?, id: row.try_get("last_id")? },
                root: row.try_get("root")?,
            },
            signature: row.try_get("signature")?,
        })
    })
    .transpose()
    .map_err(SealError::from)
}

/// The link new checkpoints continue from: the newest checkpoint, else the newest archive.
async fn chain_head(transaction: &mut Transaction<'_, Postgres>) -> Result<Option<Link>, SealError> {
    let newest = sqlx::query(&format!("select {CHECKPOINT_COLUMNS} from audit_checkpoints order by number desc limit 1"))
        .fetch_optional(&mut **transaction)
        .await?
        .map(|row| checkpoint_from_row(&row))
        .transpose()?;
    Ok(match newest {
        Some(checkpoint) => Some(checkpoint.link()),
        None => latest_anchor(transaction).await?.map(|anchor| anchor.link),
    })
}

const CHECKPOINT_COLUMNS: &str = "number, first_tx::text as first_tx, first_id, last_tx::text as last_tx, last_id, row_count,
    event_ids, row_hashes, previous_root, root, signature";

fn checkpoint_from_row(row: &sqlx::postgres::PgRow) -> Result<StoredCheckpoint, sqlx::Error> {
    Ok(StoredCheckpoint {
        number: row.try_get("number")?,
        first: Key { tx: row.try_get("first_tx")?, id: row.try_get("first_id")? },
        last: Key { tx: row.try_get("last_tx")?, id: row.try_get("last_id")? },
        row_count: i64::from(row.try_get::<i32, _>("row_count")?),
        event_ids: row.try_get("event_ids")?,
        row_hashes: row.try_get("row_hashes")?,
        previous_root: row.try_get("previous_root")?,
        root: row.try_get("root")?,
        signature: row.try_get("signature")?,
    })
}

fn decoding(key: &SigningKey) -> Result<(DecodingKey, Validation), SealError> {
    let decoding = DecodingKey::from_jwk(key.public_jwk()).map_err(|e| SealError::Corrupt(format!("seal key: {e}")))?;
    let mut validation = Validation::new(key.algorithm());
    validation.required_spec_claims.clear();
    validation.validate_exp = false;
    Ok((decoding, validation))
}

fn parse_checkpoint(json: &Value) -> Result<StoredCheckpoint, SealError> {
    let c: CheckpointJson = serde_json::from_value(json.clone()).map_err(|e| SealError::Corrupt(format!("checkpoint: {e}")))?;
    Ok(StoredCheckpoint {
        number: c.number,
        first: Key { tx: c.first_tx, id: c.first_id },
        last: Key { tx: c.last_tx, id: c.last_id },
        row_count: c.row_count,
        event_ids: c.event_ids,
        row_hashes: c.row_hashes,
        previous_root: c.previous_root,
        root: c.root,
        signature: c.signature,
    })
}

fn hashed(contents: &[Value]) -> Result<Vec<(Uuid, [u8; 32])>, SealError> {
    contents
        .iter()
        .map(|content| {
            let id = content["id"].as_str().and_then(|id| Uuid::parse_str(id).ok()).ok_or_else(|| SealError::Corrupt("a row without an id".into()))?;
            Ok((id, row_hash(content)))
        })
        .collect()
}

fn sealed_rows(checkpoint: &StoredCheckpoint) -> Vec<(Uuid, [u8; 32])> {
    checkpoint
        .event_ids
        .iter()
        .zip(checkpoint.row_hashes.chunks(32))
        .map(|(id, hash)| (*id, hash.try_into().unwrap_or([0; 32])))
        .collect()
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn canonical_content_ignores_key_order_nulls_and_place() {
        let a = json!({"id": "1", "detail": null, "claims": {"b": 1, "a": [1, 2]}, "tx": "5"});
        let b = json!({"claims": {"a": [1, 2], "b": 1}, "id": "1", "tx": "9", "added_later": null});
        assert_eq!(row_hash(&a), row_hash(&b));
        assert_ne!(row_hash(&a), row_hash(&json!({"id": "1", "claims": {"a": [2, 1], "b": 1}})));
    }

    #[test]
    fn the_chain_depends_on_order_and_the_previous_root() {
        let (x, y) = ((Uuid::new_v4(), [1; 32]), (Uuid::new_v4(), [2; 32]));
        assert_ne!(chain(&[0; 32], &[x, y]), chain(&[0; 32], &[y, x]));
        assert_ne!(chain(&[0; 32], &[x, y]), chain(&[7; 32], &[x, y]));
    }
}
