//! Sealing: the next rows below the horizon become one signed checkpoint.

use uuid::Uuid;

use super::{canonical_session, chain, chain_head, rows_after, CheckpointClaims, Key, SealError, SEAL_LOCK};
use crate::audit::PgAudit;
use crate::signing::SigningKey;

#[derive(Debug, Clone)]
pub struct Sealed {
    pub checkpoint: i64,
    pub rows: usize,
    pub root: String,
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
}
