//! The life of a credential after it is minted: the durable revocation schedule and its
//! worker, the guard that revokes what was minted but never handed over, and (in [`admin`])
//! on-demand revocation and freezes.
//!
//! The schedule is the `revocations` table, so it survives restarts and is shared by every
//! replica: each one's worker claims due rows with `for update skip locked` (see
//! `PgAudit::claim_due_revocations`), so a row is attempted by one replica at a time, and
//! every attempt writes a `revoked` or `revoke_failed` audit row.

pub mod secret_encryption;

use std::sync::Arc;
use std::time::Duration;

use secrecy::SecretString;
use time::OffsetDateTime;
use tokio::sync::Notify;
use uuid::Uuid;

use crate::audit::{Audit, AuditError, AuditEvent, ClaimedRevocation, Decision, RevocationReason};
use crate::backend::{Backend, Backends, Credential};
use crate::metrics::{Metrics, Outcomes};
use crate::types::BackendName;
use secret_encryption::RevocationKey;

/// After this many failed attempts a revocation is given up (a final `revoke_failed` row
/// says so): with the backoff below that is about 8 minutes of trying.
pub const MAX_ATTEMPTS: u32 = 8;
/// How long a claimed row is hidden from other replicas while one attempts it; longer than
/// any backend call may take (Vault requests time out well before).
const CLAIM_FOR: Duration = Duration::from_secs(60);
const BATCH: i64 = 32;

/// The worker's settings and its doorbell, shared by everything that schedules.
#[derive(Clone)]
pub struct Revoker {
    wake: Arc<Notify>,
    pub poll_interval: Duration,
    /// Seals and opens the secrets revocations need (`revocation_secret_key`).
    key: Option<Arc<RevocationKey>>,
    /// Attempts by outcome, for `credbroker_revocations_total`.
    outcomes: Outcomes,
}

/// The outcome of one attempt, for an on-demand request's report.
#[derive(Debug, Clone)]
pub struct Attempt {
    pub issuance_id: Uuid,
    pub result: Result<(), String>,
    pub will_retry: bool,
}

impl Revoker {
    pub fn new(poll_interval: Duration, key: Option<RevocationKey>, outcomes: Outcomes) -> Self {
        Self { wake: Arc::new(Notify::new()), poll_interval, key: key.map(Arc::new), outcomes }
    }

    /// Seals a credential's revocation secret for the schedule. Err when no key is configured
    /// (startup refuses that for backends that need one, so this is a last line of defence).
    pub async fn seal(&self, issuance_id: Uuid, credential: &Credential) -> Result<Option<Vec<u8>>, String> {
        match (&credential.revocation_secret, &self.key) {
            (None, _) => Ok(None),
            (Some(secret), Some(key)) => key.seal(issuance_id, secret).await.map(Some).map_err(|e| format!("cannot seal the credential for its revocation: {e}")),
            (Some(_), None) => Err("the credential needs revocation_secret_key to be revocable, and none is configured".into()),
        }
    }

    /// Claims due revocations (all, or only those in `only`) and attempts each once.
    pub async fn revoke_due(&self, audit: &Audit, backends: &Backends, only: Option<&[Uuid]>) -> Result<Vec<Attempt>, AuditError> {
        let claimed = audit.store().claim_due_revocations(BATCH, CLAIM_FOR, only).await?;
        let mut attempts = Vec::with_capacity(claimed.len());
        for revocation in claimed {
            attempts.push(self.attempt(audit, backends, revocation).await);
        }
        Ok(attempts)
    }

    async fn attempt(&self, audit: &Audit, backends: &Backends, revocation: ClaimedRevocation) -> Attempt {
        let backend = BackendName::parse(&revocation.backend).ok().and_then(|name| backends.get(&name).cloned());
        let secret = match (&revocation.sealed_secret, &self.key) {
            (None, _) => Ok(None),
            (Some(sealed), Some(key)) => key.open(revocation.issuance_id, sealed).await.map(Some).map_err(|e| e.to_string()),
            (Some(_), None) => Err("the stored secret needs revocation_secret_key, which this broker does not have".to_owned()),
        };
        let result = match (backend, secret) {
            (Some(backend), Ok(secret)) => backend.revoke(&revocation.handle, secret.as_ref()).await.map_err(|e| e.to_string()),
            (None, _) => Err(format!("backend {} is not configured on this broker", revocation.backend)),
            (_, Err(error)) => Err(error),
        };
        Metrics::count(&self.outcomes, if result.is_ok() { "done" } else { "failed" });
        let retry_in = (revocation.attempts < MAX_ATTEMPTS).then(|| backoff(revocation.attempts));
        let stored = match &result {
            Ok(()) => audit.store().revocation_succeeded(revocation.issuance_id).await,
            Err(error) => audit.store().revocation_failed(revocation.issuance_id, error, retry_in).await,
        };
        if let Err(error) = stored {
            // The claim lapses and the attempt is repeated; revoking twice is harmless.
            tracing::error!(issuance_id = %revocation.issuance_id, %error, "revocation outcome not stored; it will be attempted again");
        }
        record_attempt(audit, &revocation, &result, retry_in).await;
        let will_retry = result.is_err() && retry_in.is_some();
        Attempt { issuance_id: revocation.issuance_id, result, will_retry }
    }

    /// Makes the worker look for due rows now rather than at its next poll.
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// Runs until the process ends: wakes every `poll_interval` (or when woken) and works
    /// through every due row.
    pub async fn run_worker(self, audit: Audit, backends: Backends) {
        loop {
            loop {
                match self.revoke_due(&audit, &backends, None).await {
                    Ok(attempts) if attempts.len() as i64 == BATCH => continue,
                    Ok(_) => break,
                    Err(error) => {
                        tracing::error!(%error, "cannot read the revocation schedule; will retry");
                        break;
                    }
                }
            }
            tokio::select! {
                () = tokio::time::sleep(self.poll_interval) => {}
                () = self.wake.notified() => {}
            }
        }
    }

    /// Guards a freshly minted credential until [`Undelivered::delivered`]: dropped before
    /// that (the issued row could not be written, or the request was cancelled), it has the
    /// credential revoked. Inert for credentials the backend cannot revoke.
    pub fn guard_undelivered(&self, audit: &Audit, backend: &Arc<dyn Backend>, backend_name: &BackendName, issuance_id: Uuid, credential: &Credential) -> Undelivered {
        let pending = match &credential.handle {
            Some(handle) if backend.can_revoke() => Some(UndeliveredCredential {
                audit: audit.clone(),
                backend: backend.clone(),
                backend_name: backend_name.to_string(),
                handle: handle.clone(),
                secret: credential.revocation_secret.clone(),
                issuance_id,
                revoker: self.clone(),
            }),
            _ => None,
        };
        Undelivered(pending)
    }
}

fn backoff(attempts: u32) -> Duration {
    Duration::from_secs(2u64.saturating_pow(attempts).min(300))
}

/// One `revoked` / `revoke_failed` row, carrying the identity of the issued row so the
/// security team finds it with the same filters (project, job, subject).
async fn record_attempt(audit: &Audit, revocation: &ClaimedRevocation, result: &Result<(), String>, retry_in: Option<Duration>) {
    let decision = if result.is_ok() { Decision::Revoked } else { Decision::RevokeFailed };
    let id = crate::audit::new_row_id();
    // No client request behind the worker's rows: the row's own id is its correlation id.
    let mut event = AuditEvent::new(id, decision, OffsetDateTime::now_utc(), &id.to_string());
    event.about_issuance = Some(revocation.issuance_id);
    match audit.store().issued_credential(revocation.issuance_id).await {
        Ok(Some(issued)) => {
            let record = issued.record;
            event.issuer = record.issuer;
            event.subject = record.subject;
            event.claims = record.claims.and_then(|claims| match claims {
                serde_json::Value::Object(map) => Some(std::sync::Arc::new(map.into())),
                _ => None,
            });
            event.role = record.role;
            event.target = record.target;
            event.expires_at = Some(issued.expires_at);
            event.job_deadline = record.job_deadline;
            event.credential_sha256 = record.credential_sha256;
        }
        Ok(None) => {}
        Err(error) => tracing::warn!(%error, "issued row not readable; the revocation row carries no identity"),
    }
    event.backend = Some(revocation.backend.clone());
    event.credential_handle = Some(revocation.handle.clone());
    let by = revocation.requested_by.as_deref().map(|by| format!(", requested by {by}")).unwrap_or_default();
    let head = format!("issuance {} ({}{by}), attempt {}", revocation.issuance_id, revocation.reason, revocation.attempts);
    event.detail = Some(match (result, retry_in) {
        (Ok(()), _) => format!("revoked {head}"),
        (Err(error), Some(wait)) => format!("revoking {head} failed: {error}; retrying in {} s", wait.as_secs()),
        (Err(error), None) => {
            format!("revoking {head} failed: {error}; gave up after {MAX_ATTEMPTS} attempts: revoke handle {} by hand", revocation.handle)
        }
    });
    if let Err(error) = audit.record(event.clone()).await {
        tracing::error!(issuance_id = %revocation.issuance_id, decision = decision.as_str(), detail = event.detail.as_deref().unwrap_or_default(), %error, "revocation audit row not written");
    }
}

/// See [`Revoker::guard_undelivered`].
#[must_use = "a dropped guard revokes the credential"]
pub struct Undelivered(Option<UndeliveredCredential>);

struct UndeliveredCredential {
    audit: Audit,
    backend: Arc<dyn Backend>,
    backend_name: String,
    handle: String,
    secret: Option<SecretString>,
    issuance_id: Uuid,
    revoker: Revoker,
}

impl Undelivered {
    /// The credential reached the client's response: nothing to undo.
    pub fn delivered(mut self) {
        self.0 = None;
    }
}

impl Drop for Undelivered {
    fn drop(&mut self) {
        let Some(pending) = self.0.take() else { return };
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(pending.revoke());
            }
            Err(_) => tracing::error!(issuance_id = %pending.issuance_id, handle = pending.handle, "undelivered credential not revoked: no runtime; revoke it by hand"),
        }
    }
}

impl UndeliveredCredential {
    /// Through the durable schedule when Postgres takes it (retries, audit rows, restarts);
    /// when it does not (the likely reason the issued row failed), straight at the backend.
    async fn revoke(self) {
        let now = OffsetDateTime::now_utc();
        let store = self.audit.store();
        let sealed = match (&self.secret, &self.revoker.key) {
            (Some(secret), Some(key)) => match key.seal(self.issuance_id, secret).await {
                Ok(sealed) => Some(sealed),
                // Without its secret the schedule could not end it: end it now, while we hold it.
                Err(error) => return self.revoke_directly(&error.to_string()).await,
            },
            _ => None,
        };
        let scheduled = store
            .schedule_revocation(self.issuance_id, &self.backend_name, &self.handle, now, RevocationReason::NotDelivered, None, sealed.as_deref())
            .await;
        match scheduled {
            Ok(()) => {
                tracing::warn!(issuance_id = %self.issuance_id, "credential minted but not delivered; revoking it");
                self.revoker.wake();
            }
            Err(error) => self.revoke_directly(&error.to_string()).await,
        }
    }

    /// `why`: the reason the schedule cannot take it.
    async fn revoke_directly(self, why: &str) {
        match self.backend.revoke(&self.handle, self.secret.as_ref()).await {
            Ok(()) => tracing::warn!(issuance_id = %self.issuance_id, handle = self.handle, error = why, "credential minted but not delivered; revoked it directly (the schedule is unavailable)"),
            Err(revoke_error) => tracing::error!(
                issuance_id = %self.issuance_id,
                handle = self.handle,
                error = why,
                %revoke_error,
                "credential minted but not delivered, and neither scheduled nor revoked: revoke it by hand"
            ),
        }
    }
}
