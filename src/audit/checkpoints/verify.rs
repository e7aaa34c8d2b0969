//! Verifying: every checkpoint's signature and chain link, and the rows now in its range
//! against what was sealed; also an archive file on its own.

use std::collections::{HashMap, HashSet};
use std::io::BufRead;
use std::path::Path;

use jsonwebtoken::{DecodingKey, Validation};
use serde::Serialize;
use serde_json::Value;
use sqlx::{Postgres, Row, Transaction};
use time::OffsetDateTime;
use uuid::Uuid;

use super::archive::ARCHIVE_FORMAT;
use super::{
    canonical_session, chain, chain_head, checkpoint_from_row, decoding, hashed, latest_anchor, parse_checkpoint, rows_after, sealed_rows,
    Anchor, CheckpointClaims, CurrentRow, Key, Link, SealError, StoredCheckpoint, CHECKPOINT_COLUMNS,
};
use crate::audit::PgAudit;
use crate::signing::SigningKey;

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
}

/// The archive record's JWS must be the seal key's, over the place and root it records.
pub(super) fn check_anchor(anchor: &Anchor, decoding: &DecodingKey, validation: &Validation, findings: &mut Vec<Finding>) {
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
pub(super) fn check_checkpoint(
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
pub(super) async fn moved_rows(transaction: &mut Transaction<'_, Postgres>, missing: &[Uuid]) -> Result<HashSet<Uuid>, SealError> {
    if missing.is_empty() {
        return Ok(HashSet::new());
    }
    Ok(sqlx::query_scalar::<_, Uuid>("select id from audit_events where id = any($1)").bind(missing).fetch_all(&mut **transaction).await?.into_iter().collect())
}

/// The comparison itself, for rows from the table or from an archive file: `rows` are the
/// (id, hash) pairs now in the checkpoint's range in (tx, id) order; `moved` the sealed rows
/// missing from it that exist elsewhere.
pub(super) fn compare_sealed(
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
