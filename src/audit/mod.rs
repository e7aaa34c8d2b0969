//! The record of every decision, and the only module that speaks SQL. Callers reserve a place
//! ([`Audit::reserve`]) when a request arrives and record into it ([`Audit::record_in`]),
//! which returns once the row is durably committed. Rows reach Postgres through the
//! group-commit writer (many per commit) or, with `audit_group_commit = false`, one INSERT each.

pub mod backlog;
mod claims;
pub mod csv;
pub mod deliveries;
mod filter;
mod group_commit;
mod held;
mod revocations;
pub mod outbox;
mod postgres;
pub mod query;
mod record;
pub mod checkpoints;
mod unattributed;

use std::sync::Arc;

use time::OffsetDateTime;
use uuid::Uuid;

use crate::config::AuditWriterConfig;
use crate::metrics::Metrics;

use group_commit::{AuditRows, GroupCommit, QueueSlot, Shape};
use claims::{ClaimedRows, TokenClaims};
pub use claims::{ClaimedRow, TokenUse, UseClaim};
pub use revocations::{project_identities, ClaimedRevocation, Freeze, IssuanceSelector, IssuedCredential, RevocationReason, PROJECT_IDENTITY_CLAIMS, SELECTOR_LIMIT};
pub use postgres::{connect, migrate, PgAudit};
pub use record::{AuditRecord, RECORD_FIELDS};
pub use unattributed::UnattributedLimiter;

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("audit store unavailable: {0}")]
    Unavailable(#[from] sqlx::Error),
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// The batch this row was in did not commit; every request in it shares the cause.
    #[error("audit batch not committed: {0}")]
    BatchFailed(#[source] Arc<AuditError>),
    #[error("audit queue is full ({capacity} decisions waiting to be written)")]
    Overloaded { capacity: usize },
    #[error("audit writer has stopped")]
    WriterStopped,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Issued,
    Denied,
    Failed,
    Revoked,
    /// An attempt to revoke failed (it is retried until it succeeds or gives up).
    RevokeFailed,
    /// An authorised request to revoke, freeze or unfreeze, or a job's release of its own
    /// credential: who asked, and for what.
    AdminRequest,
    /// A read of the audit log through the broker: who, and with which filters.
    AuditRead,
    /// A signed Gogs delivery stored without a delivery token (an event not acted on, or a
    /// hook that neither forwards nor returns tokens).
    Recorded,
}

impl Decision {
    pub fn as_str(self) -> &'static str {
        match self {
            Decision::Issued => "issued",
            Decision::Denied => "denied",
            Decision::Failed => "failed",
            Decision::Revoked => "revoked",
            Decision::RevokeFailed => "revoke_failed",
            Decision::AdminRequest => "admin_request",
            Decision::AuditRead => "audit_read",
            Decision::Recorded => "recorded",
        }
    }
}

/// A new audit row's id: a UUIDv7 (RFC 9562). Ids in time order put each INSERT at the right
/// edge of the primary-key index; random ones land on random pages of it, which at tens of
/// millions of rows no longer stay in memory. 74 random bits from the thread's CSPRNG (no
/// system call per id) keep ids unguessable; the time they give away is the row's `occurred_at`.
pub fn new_row_id() -> Uuid {
    let millis = (OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as u64;
    uuid::Builder::from_unix_timestamp_millis(millis, &rand::random()).into_uuid()
}

/// One decision as it is stored. Never holds a secret: credentials and job tokens appear
/// only as SHA-256 fingerprints.
#[derive(Debug, Clone)]
pub struct AuditEvent {
    pub id: Uuid,
    pub occurred_at: OffsetDateTime,
    pub request_id: String,
    pub decision: Decision,
    pub code: Option<String>,
    pub detail: Option<String>,
    pub issuer: Option<String>,
    pub subject: Option<String>,
    pub job_token_sha256: Option<String>,
    /// Shared with the verified token it came from: copied only if a delivery adds to it.
    pub claims: Option<std::sync::Arc<crate::types::Claims>>,
    pub role: Option<String>,
    pub target: Option<String>,
    pub backend: Option<String>,
    pub requested_ttl_seconds: Option<u32>,
    pub granted_ttl_seconds: Option<u32>,
    pub expires_at: Option<OffsetDateTime>,
    pub job_deadline: Option<OffsetDateTime>,
    pub client_addr: Option<String>,
    pub user_agent: Option<String>,
    pub credential_sha256: Option<String>,
    pub credential_handle: Option<String>,
    pub occurrences: u32,
    /// Seconds an issued credential lives past the job's deadline (a role's `allow_overshoot`).
    pub overshoot_seconds: Option<u32>,
    /// On an issued renewal: the first issuance of the chain it continues, checked to be the
    /// same job's.
    pub renews_issuance: Option<Uuid>,
    /// On a revocation, release or other row about one issuance: that issuance, set only from
    /// what the broker verified (its own schedule, the holder's token).
    pub about_issuance: Option<Uuid>,
    /// On a credential request: the door it came through (`credentials`, `oauth_token`).
    pub endpoint: Option<&'static str>,
    /// [`crate::policy::PolicySet::version`] of the set that decided the request.
    pub policy_version: Option<String>,
}

impl AuditEvent {
    pub fn new(id: Uuid, decision: Decision, occurred_at: OffsetDateTime, request_id: &str) -> Self {
        Self {
            id,
            occurred_at,
            request_id: request_id.to_owned(),
            decision,
            code: None,
            detail: None,
            issuer: None,
            subject: None,
            job_token_sha256: None,
            claims: None,
            role: None,
            target: None,
            backend: None,
            requested_ttl_seconds: None,
            granted_ttl_seconds: None,
            expires_at: None,
            job_deadline: None,
            client_addr: None,
            user_agent: None,
            credential_sha256: None,
            credential_handle: None,
            occurrences: 1,
            overshoot_seconds: None,
            renews_issuance: None,
            about_issuance: None,
            endpoint: None,
            policy_version: None,
        }
    }

    /// A claim as text for the identity columns: strings as they are, numbers in decimal.
    pub fn claim_text(&self, name: &str) -> Option<std::borrow::Cow<'_, str>> {
        self.claims.as_ref()?.text(name)
    }
}

/// The last resort for a row that could not be written: the error log, so it is not lost.
pub fn log_unrecorded(event: &AuditEvent, error: &AuditError) {
    tracing::error!(
        issuance_id = %event.id,
        decision = event.decision.as_str(),
        code = event.code.as_deref().unwrap_or_default(),
        detail = event.detail.as_deref().unwrap_or_default(),
        issuer = event.issuer.as_deref().unwrap_or_default(),
        subject = event.subject.as_deref().unwrap_or_default(),
        role = event.role.as_deref().unwrap_or_default(),
        client_addr = event.client_addr.as_deref().unwrap_or_default(),
        error = %error,
        "audit row could not be written"
    );
}

#[derive(Clone)]
pub struct Audit {
    store: PgAudit,
    writer: Writer,
    unattributed: Arc<UnattributedLimiter>,
    metrics: Arc<Metrics>,
}

#[derive(Clone)]
enum Writer {
    PerRequest,
    /// Audit rows and token-use claims, each batched, and claims with their rows
    /// ([`Audit::claim_and_record`]) in shards by token.
    GroupCommit { rows: GroupCommit<AuditRows>, claims: GroupCommit<TokenClaims>, claimed_rows: Arc<[GroupCommit<ClaimedRows>]> },
}

/// A reserved place for one row (see [`Audit::reserve`]).
pub struct AuditSlot(Option<QueueSlot<AuditRows>>);

impl Audit {
    /// Starts the group-commit writer when configured, so call it inside the runtime.
    pub fn new(store: PgAudit, writer: AuditWriterConfig, unattributed_per_minute: u32, metrics: Arc<Metrics>) -> Self {
        let writer = if writer.group_commit {
            // One claim writer: its batches never wait on each other for a token's counter
            // (each sees the one before it), and without a disk flush per commit (see
            // `PgAudit`) one keeps up.
            let claim_shape = || Shape { writers: 1, ..Shape::from(&writer) };
            // `audit_writers` shards, each with its one writer, and a token always in the same
            // shard, so two of a replica's batches never wait on each other for one token's
            // counter.
            let claimed_rows = (0..writer.writers.max(1))
                .map(|_| {
                    let sizes = Arc::from([metrics.audit_batch_rows.clone(), metrics.token_claim_batch_size.clone()]);
                    GroupCommit::start(ClaimedRows(store.clone()), claim_shape(), sizes)
                })
                .collect();
            Writer::GroupCommit {
                rows: GroupCommit::start(AuditRows(store.clone()), Shape::from(&writer), Arc::from([metrics.audit_batch_rows.clone()])),
                claims: GroupCommit::start(TokenClaims(store.clone()), claim_shape(), Arc::from([metrics.token_claim_batch_size.clone()])),
                claimed_rows,
            }
        } else {
            Writer::PerRequest
        };
        Self { store, writer, unattributed: Arc::new(UnattributedLimiter::new(unattributed_per_minute)), metrics }
    }

    /// Rows reserved or queued and not yet committed.
    pub fn queue_depth(&self) -> usize {
        match &self.writer {
            Writer::PerRequest => 0,
            Writer::GroupCommit { rows, .. } => rows.depth(),
        }
    }

    /// Reserves the place of a request's row before any work is done for it. Fails with
    /// [`AuditError::Overloaded`] when the queue is full: the caller should refuse the request
    /// and account for it with [`Audit::count_refused`].
    pub fn reserve(&self) -> Result<AuditSlot, AuditError> {
        match &self.writer {
            Writer::PerRequest => Ok(AuditSlot(None)),
            Writer::GroupCommit { rows, .. } => rows.reserve().map(|slot| AuditSlot(Some(slot))),
        }
    }

    /// Returns once the row is durably committed.
    pub async fn record_in(&self, slot: AuditSlot, event: AuditEvent) -> Result<(), AuditError> {
        let written = match (&self.writer, slot.0) {
            (Writer::GroupCommit { rows, .. }, Some(slot)) => rows.submit(slot, event).await.map(|((), _)| ()),
            _ => {
                self.metrics.audit_batch_rows.observe(1.0);
                // Boxed here and below: the writer off the default, kept out of the size of
                // every exchange's future.
                Box::pin(self.store.write(&event)).await
            }
        };
        if written.is_err() {
            self.metrics.audit_write_failures.inc();
        }
        written
    }

    /// For work no client waits on: waits for room in the queue rather than refusing.
    pub async fn record(&self, event: AuditEvent) -> Result<(), AuditError> {
        let slot = match &self.writer {
            Writer::PerRequest => AuditSlot(None),
            Writer::GroupCommit { rows, .. } => AuditSlot(Some(rows.reserve_waiting().await?)),
        };
        self.record_in(slot, event).await
    }

    /// Denials that cannot be tied to a verified identity (garbage, forged or expired tokens)
    /// are written in full up to a per-client-address budget each minute; beyond it they are
    /// counted and written as one aggregated row per address and code by
    /// [`Audit::flush_unattributed`]. A flood cannot fill the disk, and nothing goes uncounted.
    pub async fn record_unattributed(&self, slot: AuditSlot, event: AuditEvent) -> Result<(), AuditError> {
        if self.unattributed.admit(&event) {
            self.record_in(slot, event).await
        } else {
            Ok(())
        }
    }

    /// An exchange refused because no row could be reserved for it; written, aggregated, by
    /// the next [`Audit::flush_unattributed`].
    pub fn count_refused(&self, event: &AuditEvent) {
        self.unattributed.count_refused(event);
    }

    pub async fn flush_unattributed(&self) -> Result<(), AuditError> {
        for event in self.unattributed.drain() {
            if let Err(error) = self.record(event.clone()).await {
                // Put the counts back so the next flush tries again.
                self.unattributed.restore(event);
                return Err(error);
            }
        }
        Ok(())
    }

    /// Claims one use, in the next batch of claims with group commit. Every exchange in
    /// flight holds an audit slot, so the claim queue (as large as the audit queue) has room.
    pub async fn claim_token_use(&self, claim: UseClaim) -> Result<TokenUse, AuditError> {
        match &self.writer {
            Writer::PerRequest => {
                self.metrics.token_claim_batch_size.observe(1.0);
                self.store.claim_token_use(&claim).await
            }
            Writer::GroupCommit { claims, .. } => claims.submit(claims.reserve_waiting().await?, claim).await.map(|(answer, _)| answer),
        }
    }

    /// Claims one use and, in the same statement and durable commit, writes the issued row
    /// that stands only if the claim is taken: the row is written exactly when the answer is
    /// [`TokenUse::Claimed`]. For a credential minted before its claim, which nobody has seen
    /// until this returns (see `Backend::mints_without_side_effects`).
    /// The row comes back with the answer, for a refusal to be recorded in its place.
    pub async fn claim_and_record(&self, claim: UseClaim, row: AuditEvent) -> Result<(TokenUse, AuditEvent), AuditError> {
        let answer = match &self.writer {
            Writer::PerRequest => {
                self.metrics.audit_batch_rows.observe(1.0);
                self.metrics.token_claim_batch_size.observe(1.0);
                Box::pin(self.store.claim_token_uses_and_record(&[&claim], &[&row])).await.map(|mut answers| (answers.remove(0), row))
            }
            Writer::GroupCommit { claimed_rows, .. } => {
                let shard = &claimed_rows[shard_of(&claim, claimed_rows.len())];
                shard.submit(shard.reserve_waiting().await?, ClaimedRow { claim, row }).await.map(|(answer, job)| (answer, job.row))
            }
        };
        if answer.is_err() {
            self.metrics.audit_write_failures.inc();
        }
        answer
    }

    pub async fn ping(&self) -> Result<(), AuditError> {
        self.store.ping().await
    }

    pub fn store(&self) -> &PgAudit {
        &self.store
    }
}

/// The claim shard of a token (its issuer, id and role): the same for every use of it.
fn shard_of(claim: &UseClaim, shards: usize) -> usize {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::hash::DefaultHasher::new();
    (&claim.issuer, &claim.jti, &claim.role).hash(&mut hasher);
    (hasher.finish() % shards as u64) as usize
}

#[cfg(test)]
mod tests {
    #[test]
    fn row_ids_are_version_7_and_follow_the_clock() {
        let first = super::new_row_id();
        std::thread::sleep(std::time::Duration::from_millis(2));
        let second = super::new_row_id();
        assert_eq!(first.get_version(), Some(uuid::Version::SortRand));
        assert!(second > first, "{second} was made after {first}");
        // Within one millisecond the order is random, but ids never repeat.
        let many: std::collections::HashSet<_> = (0..10_000).map(|_| super::new_row_id()).collect();
        assert_eq!(many.len(), 10_000);
    }
}
