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

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, Write};
use std::path::Path;

use jsonwebtoken::{DecodingKey, Validation};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};
use sqlx::{Postgres, Row, Transaction};
use time::OffsetDateTime;
use uuid::Uuid;

use super::{AuditError, PgAudit};
use crate::backend::signing::{SigningKey, SigningKeyError};

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

#[derive(Debug, Clone)]
pub struct Sealed {
    pub checkpoint: i64,
    pub rows: usize,
    pub root: String,
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

/// What a verification found wrong, in log order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FindingKind {
    /// The row's content differs from what was sealed.
    Altered,
    /// A sealed row is gone.
    Deleted,
    /// A sealed row still exists but no longer sits where it was sealed.
    Reordered,
    /// A row sits inside a sealed range but was never sealed there.
    InsertedOutOfOrder,
    /// The checkpoint itself is missing, unsigned, badly signed or does not chain.
    CheckpointInvalid,
}

#[derive(Debug, Clone, Serialize)]
pub struct Finding {
    pub kind: FindingKind,
    pub checkpoint: i64,
    pub event_id: Option<Uuid>,
    pub message: String,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct VerifyReport {
    pub checkpoints: usize,
    pub rows_checked: usize,
    pub last_checkpoint: Option<i64>,
    /// Checkpoints up to this one were archived (`audit archive`); the chain continues from it.
    pub archived_through: Option<i64>,
    /// Rows after the last checkpoint (not yet sealed, or sealed by a checkpoint that is gone).
    pub unsealed_rows: i64,
    #[serde(with = "time::serde::rfc3339::option")]
    pub oldest_unsealed: Option<OffsetDateTime>,
    pub findings: Vec<Finding>,
}

impl VerifyReport {
    pub fn intact(&self) -> bool {
        self.findings.is_empty()
    }
}

impl PgAudit {
    /// Seals the next rows into one checkpoint; None when another replica is sealing or there
    /// is nothing new below the horizon.
    #[tracing::instrument(skip(self, key))]
    pub async fn seal_next(&self, key: &SigningKey, sealed_by: &str, max_rows: i64) -> Result<Option<Sealed>, SealError> {
        let mut transaction = canonical_session(self.pool()).await?;
        let locked: bool = sqlx::query_scalar("select pg_try_advisory_xact_lock($1)").bind(SEAL_LOCK).fetch_one(&mut *transaction).await?;
        if !locked {
            return Ok(None);
        }
        let previous = chain_head(&mut transaction).await?;
        let (number, after, previous_root) = match &previous {
            Some(previous) => (previous.number + 1, previous.last.clone(), previous.root.clone()),
            None => (1, Key::before_everything(), vec![0; 32]),
        };
        let rows = rows_after(&mut transaction, &after, None, max_rows).await?;
        let (Some(first), Some(last)) = (rows.first(), rows.last()) else {
            return Ok(None);
        };
        let pairs: Vec<(Uuid, [u8; 32])> = rows.iter().map(|row| (row.id, row.hash)).collect();
        let root = chain(&previous_root, &pairs);
        let claims = CheckpointClaims {
            checkpoint: number,
            first_tx: first.tx.clone(),
            first_id: first.id,
            last_tx: last.tx.clone(),
            last_id: last.id,
            rows: rows.len() as i64,
            previous_root: hex::encode(&previous_root),
            root: hex::encode(root),
        };
        let signature = key.sign(&claims)?;
        let hashes: Vec<u8> = rows.iter().flat_map(|row| row.hash).collect();
        let ids: Vec<Uuid> = rows.iter().map(|row| row.id).collect();
        sqlx::query(
            "insert into audit_checkpoints (number, first_tx, first_id, last_tx, last_id, row_count, first_occurred_at,
                 last_occurred_at, event_ids, row_hashes, previous_root, root, key_id, signature, sealed_by)
             values ($1, $2::xid8, $3, $4::xid8, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15)",
        )
        .bind(number)
        .bind(&first.tx)
        .bind(first.id)
        .bind(&last.tx)
        .bind(last.id)
        .bind(rows.len() as i32)
        .bind(rows.iter().map(|row| row.occurred_at).min())
        .bind(rows.iter().map(|row| row.occurred_at).max())
        .bind(&ids)
        .bind(&hashes)
        .bind(&previous_root)
        .bind(root.as_slice())
        .bind(key.kid())
        .bind(&signature)
        .bind(sealed_by)
        .execute(&mut *transaction)
        .await?;
        transaction.commit().await?;
        let root = hex::encode(root);
        tracing::info!(checkpoint = number, rows = rows.len(), root = %root, "audit rows sealed");
        Ok(Some(Sealed { checkpoint: number, rows: rows.len(), root }))
    }

    /// Checks every checkpoint whose rows reach `since` or later (all when None) against the
    /// seal key and the rows now in the table. After an archive, the oldest remaining
    /// checkpoint must chain to the archive record's signed root, and no row may sit in the
    /// archived range.
    pub async fn verify_seals(&self, key: &SigningKey, since: Option<OffsetDateTime>) -> Result<VerifyReport, SealError> {
        let mut transaction = canonical_session(self.pool()).await?;
        let numbers: Vec<i64> = sqlx::query_scalar(
            "select number from audit_checkpoints where $1::timestamptz is null or last_occurred_at >= $1 order by number",
        )
        .bind(since)
        .fetch_all(&mut *transaction)
        .await?;
        let mut report = VerifyReport::default();
        let (decoding, validation) = decoding(key)?;
        let anchor = latest_anchor(&mut transaction).await?;
        if let Some(anchor) = &anchor {
            report.archived_through = Some(anchor.link.number);
            check_anchor(anchor, &decoding, &validation, &mut report.findings);
            // Nothing may remain at or before the archived range's end: those rows are gone.
            let stragglers: Vec<Uuid> = sqlx::query_scalar(
                "select id from audit_events a where (a.tx, a.id) <= ($1::xid8, $2) order by a.tx, a.id limit 100",
            )
            .bind(&anchor.link.last.tx)
            .bind(anchor.link.last.id)
            .fetch_all(&mut *transaction)
            .await?;
            for id in stragglers {
                report.findings.push(Finding {
                    kind: FindingKind::InsertedOutOfOrder,
                    checkpoint: anchor.link.number,
                    event_id: Some(id),
                    message: format!("row {id} sits in the range archived through checkpoint {}: inserted out of order", anchor.link.number),
                });
            }
        }
        let mut previous: Option<Link> = match numbers.first() {
            Some(&first) if first > 1 => {
                let found = match load_checkpoint(&mut transaction, first - 1).await? {
                    Some(checkpoint) => Some(checkpoint.link()),
                    None => anchor.as_ref().filter(|anchor| anchor.link.number == first - 1).map(|anchor| anchor.link.clone()),
                };
                if found.is_none() {
                    report.findings.push(invalid(first, format!("checkpoint {} before it is missing", first - 1)));
                }
                found
            }
            _ => None,
        };
        for number in numbers {
            let Some(checkpoint) = load_checkpoint(&mut transaction, number).await? else { continue };
            if let Some(before) = &previous {
                if before.number + 1 != checkpoint.number {
                    report.findings.push(invalid(number, format!("checkpoints {} to {} are missing", before.number + 1, number - 1)));
                }
            }
            let after = previous.as_ref().map(|before| before.last.clone()).unwrap_or_else(Key::before_everything);
            check_checkpoint(&checkpoint, previous.as_ref(), &decoding, &validation, &mut report.findings);
            let rows = rows_after(&mut transaction, &after, Some(&checkpoint.last), i64::MAX).await?;
            report.rows_checked += rows.len();
            compare_rows(&mut transaction, &checkpoint, &rows, &mut report.findings).await?;
            report.checkpoints += 1;
            report.last_checkpoint = Some(number);
            previous = Some(checkpoint.link());
        }
        if report.last_checkpoint.is_none() {
            // Nothing selected: the tail after the newest checkpoint is what remains to report.
            previous = chain_head(&mut transaction).await?;
        }
        let after = previous.map(|last| last.last).unwrap_or_else(Key::before_everything);
        let tail = sqlx::query("select count(*) as rows, min(occurred_at) as oldest from audit_events a where (a.tx, a.id) > ($1::xid8, $2)")
            .bind(&after.tx)
            .bind(after.id)
            .fetch_one(&mut *transaction)
            .await?;
        report.unsealed_rows = tail.try_get("rows")?;
        report.oldest_unsealed = tail.try_get("oldest")?;
        Ok(report)
    }

    /// Moves whole checkpoints, oldest first, whose rows all occurred before `before`, into a
    /// new file at `out` (JSON lines: a header, then each checkpoint followed by its rows in
    /// sealed order, as `to_jsonb` gives them), then removes them from the database through
    /// `audit_archive()` (migration 0013), in one transaction. The rows are checked against
    /// their seals first: tampered rows are never archived. On any failure nothing is removed
    /// and the file is deleted.
    pub async fn archive(&self, key: &SigningKey, before: OffsetDateTime, out: &Path) -> Result<ArchiveSummary, SealError> {
        let file = std::fs::OpenOptions::new().write(true).create_new(true).open(out)?;
        let result = self.archive_into(key, before, &file).await;
        if result.is_err() {
            drop(file);
            let _ = std::fs::remove_file(out);
        }
        result
    }

    async fn archive_into(&self, key: &SigningKey, before: OffsetDateTime, file: &std::fs::File) -> Result<ArchiveSummary, SealError> {
        let mut transaction = canonical_session(self.pool()).await?;
        // No checkpoint is written while we work (the sealer skips; audit_archive() waits).
        sqlx::query("select pg_advisory_xact_lock($1)").bind(SEAL_LOCK).execute(&mut *transaction).await?;
        let spans: Vec<(i64, OffsetDateTime, OffsetDateTime)> =
            sqlx::query_as("select number, first_occurred_at, last_occurred_at from audit_checkpoints order by number")
                .fetch_all(&mut *transaction)
                .await?;
        let Some(&(first, first_at, first_last_at)) = spans.first() else {
            return Err(SealError::Refused("nothing to archive: no sealed checkpoint remains".into()));
        };
        let whole = spans.iter().take_while(|(_, _, last_at)| *last_at < before).count();
        if whole == 0 {
            return Err(SealError::Refused(format!(
                "the cut would split checkpoint {first} (rows from {} to {}): only whole checkpoints whose rows all occurred before the cut are archived; nothing archived",
                rfc3339(first_at),
                rfc3339(first_last_at)
            )));
        }
        let through = spans[whole - 1].0;
        let (decoding, validation) = decoding(key)?;
        let mut previous = match first {
            1 => None,
            _ => match latest_anchor(&mut transaction).await? {
                Some(anchor) if anchor.link.number == first - 1 => {
                    let mut findings = Vec::new();
                    check_anchor(&anchor, &decoding, &validation, &mut findings);
                    refuse_if_tampered(&findings)?;
                    Some(anchor.link)
                }
                _ => return Err(SealError::Refused(format!("checkpoint {} before checkpoint {first} is neither present nor archived; run audit verify", first - 1))),
            },
        };

        let mut writer = HashingWriter { inner: std::io::BufWriter::new(file.try_clone()?), hasher: Sha256::new() };
        let header = serde_json::json!({
            "format": ARCHIVE_FORMAT, "first_checkpoint": first, "through_checkpoint": through,
            "cut": rfc3339(before), "archived_at": rfc3339(OffsetDateTime::now_utc()),
        });
        writeln!(writer, "{header}")?;
        let mut rows_written: i64 = 0;
        for number in first..=through {
            let checkpoint_json: Value = sqlx::query_scalar("select to_jsonb(c) from audit_checkpoints c where number = $1")
                .bind(number)
                .fetch_one(&mut *transaction)
                .await?;
            let checkpoint: StoredCheckpoint = parse_checkpoint(&checkpoint_json)?;
            let after = previous.as_ref().map(|before: &Link| before.last.clone()).unwrap_or_else(Key::before_everything);
            let mut findings = Vec::new();
            check_checkpoint(&checkpoint, previous.as_ref(), &decoding, &validation, &mut findings);
            let contents: Vec<Value> = sqlx::query_scalar(
                "select to_jsonb(a) from audit_events a where (a.tx, a.id) > ($1::xid8, $2) and (a.tx, a.id) <= ($3::xid8, $4) order by a.tx, a.id",
            )
            .bind(&after.tx)
            .bind(after.id)
            .bind(&checkpoint.last.tx)
            .bind(checkpoint.last.id)
            .fetch_all(&mut *transaction)
            .await?;
            let rows = hashed(&contents)?;
            let sealed_ids: HashSet<Uuid> = checkpoint.event_ids.iter().copied().collect();
            let present: HashSet<Uuid> = rows.iter().map(|row| row.0).collect();
            let missing: Vec<Uuid> = checkpoint.event_ids.iter().copied().filter(|id| !present.contains(id)).collect();
            let moved = moved_rows(&mut transaction, &missing).await?;
            compare_sealed(&checkpoint, &rows, &sealed_ids, &moved, &mut findings);
            refuse_if_tampered(&findings)?;
            writeln!(writer, "{}", serde_json::json!({ "checkpoint": checkpoint_json }))?;
            for content in &contents {
                writeln!(writer, "{}", serde_json::json!({ "row": content }))?;
            }
            rows_written += contents.len() as i64;
            previous = Some(checkpoint.link());
        }
        let HashingWriter { inner, hasher } = writer;
        inner.into_inner().map_err(|error| error.into_error())?;
        file.sync_all()?;
        let sha256 = hex::encode(hasher.finalize());
        let removed: i64 = sqlx::query_scalar("select audit_archive($1, $2, $3)")
            .bind(through)
            .bind(before)
            .bind(&sha256)
            .fetch_one(&mut *transaction)
            .await
            .map_err(|error| match error {
                sqlx::Error::Database(db) => SealError::Refused(db.message().to_owned()),
                other => SealError::from(other),
            })?;
        if removed != rows_written {
            return Err(SealError::Refused(format!("wrote {rows_written} rows but the database would remove {removed}; nothing removed")));
        }
        transaction.commit().await?;
        let straddling = spans.get(whole).filter(|(_, first_at, _)| *first_at < before).map(|(number, _, _)| *number);
        tracing::info!(first, through, rows = removed, "audit checkpoints archived");
        Ok(ArchiveSummary { first_checkpoint: first, through_checkpoint: through, rows: removed, sha256, straddling })
    }
}

/// What `PgAudit::archive` moved out.
#[derive(Debug, Clone, Serialize)]
pub struct ArchiveSummary {
    pub first_checkpoint: i64,
    pub through_checkpoint: i64,
    pub rows: i64,
    /// SHA-256 of the file, also kept in `audit_archives`.
    pub sha256: String,
    /// The next checkpoint, if it also holds rows older than the cut: those stay until a later
    /// cut takes the whole checkpoint.
    pub straddling: Option<i64>,
}

const ARCHIVE_FORMAT: &str = "credbroker-audit-archive/1";

struct HashingWriter<W: Write> {
    inner: W,
    hasher: Sha256,
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let written = self.inner.write(buf)?;
        self.hasher.update(&buf[..written]);
        Ok(written)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

fn rfc3339(at: OffsetDateTime) -> String {
    at.format(&time::format_description::well_known::Rfc3339).unwrap_or_default()
}

fn decoding(key: &SigningKey) -> Result<(DecodingKey, Validation), SealError> {
    let decoding = DecodingKey::from_jwk(key.public_jwk()).map_err(|e| SealError::Corrupt(format!("seal key: {e}")))?;
    let mut validation = Validation::new(key.algorithm());
    validation.required_spec_claims.clear();
    validation.validate_exp = false;
    Ok((decoding, validation))
}

fn refuse_if_tampered(findings: &[Finding]) -> Result<(), SealError> {
    match findings.first() {
        None => Ok(()),
        Some(first) => Err(SealError::Refused(format!("not archived: {}; run audit verify", first.message))),
    }
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

/// The archive record's JWS must be the seal key's, over the place and root it records.
fn check_anchor(anchor: &Anchor, decoding: &DecodingKey, validation: &Validation, findings: &mut Vec<Finding>) {
    let number = anchor.link.number;
    let ok = match jsonwebtoken::decode::<CheckpointClaims>(&anchor.signature, decoding, validation) {
        Ok(signed) => {
            let claims = signed.claims;
            claims.checkpoint == number
                && claims.last_tx == anchor.link.last.tx
                && claims.last_id == anchor.link.last.id
                && claims.root == hex::encode(&anchor.link.root)
        }
        Err(_) => false,
    };
    if !ok {
        findings.push(invalid(number, format!("the archive record of checkpoints through {number} is not what the seal key signed")));
    }
}

/// Checks an archive file on its own: every checkpoint's signature, root and chain link within
/// the file, and every row against what was sealed. `archived_through` and `last_checkpoint`
/// give the range; the first checkpoint's link to its predecessor is in its signed
/// `previous_root`, which the database's archive record (or the previous file) must match.
pub fn verify_archive(key: &SigningKey, path: &Path) -> Result<(VerifyReport, String), SealError> {
    let file = std::io::BufReader::new(std::fs::File::open(path)?);
    let (decoding, validation) = decoding(key)?;
    let mut report = VerifyReport::default();
    let mut lines = file.lines();
    let header: Value = serde_json::from_str(&lines.next().transpose()?.unwrap_or_default()).map_err(|e| SealError::Corrupt(format!("header: {e}")))?;
    if header["format"] != ARCHIVE_FORMAT {
        return Err(SealError::Corrupt(format!("not a {ARCHIVE_FORMAT} file")));
    }
    let mut previous: Option<Link> = None;
    let mut current: Option<(StoredCheckpoint, Vec<Value>)> = None;
    let mut first_previous_root = String::new();
    let finish = |current: Option<(StoredCheckpoint, Vec<Value>)>, previous: &mut Option<Link>, report: &mut VerifyReport| -> Result<(), SealError> {
        let Some((checkpoint, contents)) = current else { return Ok(()) };
        if let Some(before) = previous.as_ref() {
            if before.number + 1 != checkpoint.number {
                report.findings.push(invalid(checkpoint.number, format!("checkpoints {} to {} are missing from the archive", before.number + 1, checkpoint.number - 1)));
            }
        }
        check_checkpoint(&checkpoint, previous.as_ref(), &decoding, &validation, &mut report.findings);
        let rows = hashed(&contents)?;
        let sealed_ids: HashSet<Uuid> = checkpoint.event_ids.iter().copied().collect();
        compare_sealed(&checkpoint, &rows, &sealed_ids, &HashSet::new(), &mut report.findings);
        report.rows_checked += rows.len();
        report.checkpoints += 1;
        report.last_checkpoint = Some(checkpoint.number);
        *previous = Some(checkpoint.link());
        Ok(())
    };
    for line in lines {
        let line = line?;
        let mut entry: Value = serde_json::from_str(&line).map_err(|e| SealError::Corrupt(format!("archive line: {e}")))?;
        if let Some(checkpoint) = entry.get("checkpoint") {
            let checkpoint = parse_checkpoint(checkpoint)?;
            if current.is_none() && previous.is_none() {
                report.archived_through = Some(checkpoint.number - 1);
                first_previous_root = hex::encode(&checkpoint.previous_root);
            }
            finish(current.take(), &mut previous, &mut report)?;
            current = Some((checkpoint, Vec::new()));
        } else if let Some(row) = entry.get_mut("row") {
            match current.as_mut() {
                Some((_, rows)) => rows.push(row.take()),
                None => return Err(SealError::Corrupt("a row before any checkpoint".into())),
            }
        } else {
            return Err(SealError::Corrupt("an archive line that is neither a checkpoint nor a row".into()));
        }
    }
    finish(current.take(), &mut previous, &mut report)?;
    if report.last_checkpoint.and_then(|n| header["through_checkpoint"].as_i64().map(|through| through != n)).unwrap_or(true) {
        report.findings.push(invalid(header["through_checkpoint"].as_i64().unwrap_or(0), "the archive ends before the checkpoint its header names".into()));
    }
    Ok((report, first_previous_root))
}

fn invalid(checkpoint: i64, message: String) -> Finding {
    Finding { kind: FindingKind::CheckpointInvalid, checkpoint, event_id: None, message }
}

async fn load_checkpoint(transaction: &mut Transaction<'_, Postgres>, number: i64) -> Result<Option<StoredCheckpoint>, SealError> {
    Ok(sqlx::query(&format!("select {CHECKPOINT_COLUMNS} from audit_checkpoints where number = $1"))
        .bind(number)
        .fetch_optional(&mut **transaction)
        .await?
        .map(|row| checkpoint_from_row(&row))
        .transpose()?)
}

/// The checkpoint on its own: signature, claims, chain link, root over its sealed list.
fn check_checkpoint(
    checkpoint: &StoredCheckpoint,
    previous: Option<&Link>,
    decoding: &DecodingKey,
    validation: &Validation,
    findings: &mut Vec<Finding>,
) {
    let number = checkpoint.number;
    let sealed = sealed_rows(checkpoint);
    let root = chain(&checkpoint.previous_root, &sealed);
    let expected = CheckpointClaims {
        checkpoint: number,
        first_tx: checkpoint.first.tx.clone(),
        first_id: checkpoint.first.id,
        last_tx: checkpoint.last.tx.clone(),
        last_id: checkpoint.last.id,
        rows: checkpoint.row_count,
        previous_root: hex::encode(&checkpoint.previous_root),
        root: hex::encode(&checkpoint.root),
    };
    match jsonwebtoken::decode::<CheckpointClaims>(&checkpoint.signature, decoding, validation) {
        Ok(signed) if signed.claims == expected => {}
        Ok(_) => findings.push(invalid(number, format!("checkpoint {number} does not match what its signature covers"))),
        Err(error) => findings.push(invalid(number, format!("checkpoint {number}'s signature is not valid for the seal key: {error}"))),
    }
    if root.as_slice() != checkpoint.root.as_slice() || sealed.len() as i64 != checkpoint.row_count {
        findings.push(invalid(number, format!("checkpoint {number}'s list of sealed rows does not hash to its root")));
    }
    let expected_previous = previous.map(|before| before.root.clone()).unwrap_or_else(|| vec![0; 32]);
    if (previous.is_some() || number == 1) && checkpoint.previous_root != expected_previous {
        findings.push(invalid(number, format!("checkpoint {number} does not chain to checkpoint {}", number - 1)));
    }
}

fn sealed_rows(checkpoint: &StoredCheckpoint) -> Vec<(Uuid, [u8; 32])> {
    checkpoint
        .event_ids
        .iter()
        .zip(checkpoint.row_hashes.chunks(32))
        .map(|(id, hash)| (*id, hash.try_into().unwrap_or([0; 32])))
        .collect()
}

/// What was sealed against the rows now in the checkpoint's range, in sealed order.
async fn compare_rows(
    transaction: &mut Transaction<'_, Postgres>,
    checkpoint: &StoredCheckpoint,
    rows: &[CurrentRow],
    findings: &mut Vec<Finding>,
) -> Result<(), SealError> {
    let sealed_ids: HashSet<Uuid> = checkpoint.event_ids.iter().copied().collect();
    let current: HashSet<Uuid> = rows.iter().map(|row| row.id).collect();
    let missing: Vec<Uuid> = checkpoint.event_ids.iter().copied().filter(|id| !current.contains(id)).collect();
    let moved = moved_rows(transaction, &missing).await?;
    let pairs: Vec<(Uuid, [u8; 32])> = rows.iter().map(|row| (row.id, row.hash)).collect();
    compare_sealed(checkpoint, &pairs, &sealed_ids, &moved, findings);
    Ok(())
}

/// Which of the sealed rows missing from their range still exist elsewhere in the table.
async fn moved_rows(transaction: &mut Transaction<'_, Postgres>, missing: &[Uuid]) -> Result<HashSet<Uuid>, SealError> {
    if missing.is_empty() {
        return Ok(HashSet::new());
    }
    Ok(sqlx::query_scalar::<_, Uuid>("select id from audit_events where id = any($1)").bind(missing).fetch_all(&mut **transaction).await?.into_iter().collect())
}

/// The comparison itself, for rows from the table or from an archive file: `rows` are the
/// (id, hash) pairs now in the checkpoint's range in (tx, id) order; `moved` the sealed rows
/// missing from it that exist elsewhere.
fn compare_sealed(
    checkpoint: &StoredCheckpoint,
    rows: &[(Uuid, [u8; 32])],
    sealed_ids: &HashSet<Uuid>,
    moved: &HashSet<Uuid>,
    findings: &mut Vec<Finding>,
) {
    let number = checkpoint.number;
    let sealed = sealed_rows(checkpoint);
    let current: HashMap<Uuid, [u8; 32]> = rows.iter().copied().collect();
    // Both orders restricted to the rows they share: where they first differ, a row moved.
    let mut current_order = rows.iter().map(|row| row.0).filter(|id| sealed_ids.contains(id));
    let mut out_of_order_reported = false;
    for (position, (id, hash)) in sealed.iter().enumerate() {
        let finding = |kind, message: String| Finding { kind, checkpoint: number, event_id: Some(*id), message };
        match current.get(id) {
            None if moved.contains(id) => findings.push(finding(
                FindingKind::Reordered,
                format!("row {id} (checkpoint {number}, position {position}) was moved out of its sealed place"),
            )),
            None => findings.push(finding(FindingKind::Deleted, format!("row {id} (checkpoint {number}, position {position}) was deleted"))),
            Some(now) => {
                if now != hash {
                    findings.push(finding(FindingKind::Altered, format!("row {id} (checkpoint {number}, position {position}) was altered")));
                }
                if current_order.next() != Some(*id) && !out_of_order_reported {
                    out_of_order_reported = true;
                    findings.push(finding(
                        FindingKind::Reordered,
                        format!("row {id} (checkpoint {number}, position {position}) is no longer in its sealed order"),
                    ));
                }
            }
        }
    }
    for (id, _) in rows.iter().filter(|row| !sealed_ids.contains(&row.0)) {
        findings.push(Finding {
            kind: FindingKind::InsertedOutOfOrder,
            checkpoint: number,
            event_id: Some(*id),
            message: format!("row {id} sits inside checkpoint {number}'s sealed range but was never sealed: inserted out of order"),
        });
    }
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
