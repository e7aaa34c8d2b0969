//! Archiving by time: whole sealed checkpoints, oldest first, move to a JSON-lines file and
//! then leave the database through `audit_archive()` (migration 0013).

use std::collections::HashSet;
use std::io::Write;
use std::path::Path;

use serde::Serialize;
use serde_json::Value;
use sha2::{Digest, Sha256};
use time::OffsetDateTime;
use uuid::Uuid;

use super::verify::{check_anchor, check_checkpoint, compare_sealed, moved_rows, Finding};
use super::{canonical_session, decoding, hashed, latest_anchor, parse_checkpoint, Key, Link, SealError, StoredCheckpoint, SEAL_LOCK};
use crate::audit::PgAudit;
use crate::signing::SigningKey;
use crate::types::rfc3339;

impl PgAudit {
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

pub(super) const ARCHIVE_FORMAT: &str = "credbroker-audit-archive/1";

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

fn refuse_if_tampered(findings: &[Finding]) -> Result<(), SealError> {
    match findings.first() {
        None => Ok(()),
        Some(first) => Err(SealError::Refused(format!("not archived: {}; run audit verify", first.message))),
    }
}
