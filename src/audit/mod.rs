//! The record of every decision, and the only module that speaks SQL. Callers use one async
//! call, [`Audit::record`], which returns once the row is durably committed; how rows reach
//! Postgres (one INSERT each today) can change behind the [`AuditWriter`] trait.

mod postgres;
mod unattributed;

use std::sync::Arc;

use async_trait::async_trait;
use serde_json::{Map, Value};
use time::OffsetDateTime;
use uuid::Uuid;

pub use postgres::{connect, migrate, AuditRow, PgAudit};
pub use unattributed::UnattributedLimiter;

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("audit store unavailable: {0}")]
    Unavailable(#[from] sqlx::Error),
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Issued,
    Denied,
    Failed,
    Revoked,
}

impl Decision {
    pub fn as_str(self) -> &'static str {
        match self {
            Decision::Issued => "issued",
            Decision::Denied => "denied",
            Decision::Failed => "failed",
            Decision::Revoked => "revoked",
        }
    }
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
    pub claims: Option<Map<String, Value>>,
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
        }
    }

    /// A claim as text for the identity columns: strings as they are, numbers in decimal.
    pub fn claim_text(&self, name: &str) -> Option<String> {
        match self.claims.as_ref()?.get(name)? {
            Value::String(value) => Some(value.clone()),
            Value::Number(value) => Some(value.to_string()),
            Value::Bool(value) => Some(value.to_string()),
            _ => None,
        }
    }
}

/// How rows reach durable storage. `write` returns only after the commit.
#[async_trait]
pub trait AuditWriter: Send + Sync {
    async fn write(&self, event: &AuditEvent) -> Result<(), AuditError>;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenUse {
    /// This exchange is use number N of the token for the role.
    Claimed(u32),
    /// Every permitted use is taken.
    Exhausted,
}

#[derive(Clone)]
pub struct Audit {
    store: PgAudit,
    writer: Arc<dyn AuditWriter>,
    unattributed: Arc<UnattributedLimiter>,
}

impl Audit {
    pub fn new(store: PgAudit, unattributed_per_minute: u32) -> Self {
        Self {
            writer: Arc::new(store.clone()),
            store,
            unattributed: Arc::new(UnattributedLimiter::new(unattributed_per_minute)),
        }
    }

    /// Returns once the row is durably committed.
    pub async fn record(&self, event: AuditEvent) -> Result<(), AuditError> {
        self.writer.write(&event).await
    }

    /// Denials that cannot be tied to a verified identity (garbage, forged or expired tokens)
    /// are written in full up to a per-client-address budget each minute; beyond it they are
    /// counted and written as one aggregated row per address and code by
    /// [`Audit::flush_unattributed`]. A flood cannot fill the disk, and nothing goes uncounted.
    pub async fn record_unattributed(&self, event: AuditEvent) -> Result<(), AuditError> {
        if self.unattributed.admit(&event) {
            self.record(event).await
        } else {
            Ok(())
        }
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

    pub async fn claim_token_use(
        &self,
        issuer: &str,
        jti: &str,
        role: &str,
        max_uses: u32,
        token_expires_at: OffsetDateTime,
    ) -> Result<TokenUse, AuditError> {
        self.store.claim_token_use(issuer, jti, role, max_uses, token_expires_at).await
    }

    pub async fn ping(&self) -> Result<(), AuditError> {
        self.store.ping().await
    }

    pub fn store(&self) -> &PgAudit {
        &self.store
    }
}
