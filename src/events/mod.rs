//! The event stream: publishes what the outbox (migration 0007) queued — issued and revoked
//! credentials, accepted Gogs deliveries — to a sink, at least once and in order of commit.
//! A sink that is down costs nothing but delay: claimed events are retried with exponential
//! backoff until it takes them. [`kafka::KafkaSink`] is the sink that ships; `[events]` in
//! the configuration starts it (see `startup`).

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::PgPool;
use time::OffsetDateTime;

use crate::audit::outbox::{self, OutboxEvent};
use crate::audit::AuditError;

pub mod kafka;

#[async_trait]
pub trait EventSink: Send + Sync {
    /// Delivers the batch or fails as a whole (the outbox retries all of it); a sink must
    /// tolerate seeing an event twice (the message key is the audit or delivery id).
    async fn publish(&self, events: &[OutboxEvent]) -> Result<(), String>;
}

#[derive(Debug, Clone, Copy)]
pub struct PublisherSettings {
    pub batch_size: i64,
    /// How long a claimed batch is reserved for this publisher before another may take it.
    pub lease: Duration,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    pub poll_interval: Duration,
}

impl Default for PublisherSettings {
    fn default() -> Self {
        Self {
            batch_size: 100,
            lease: Duration::from_secs(60),
            backoff_base: Duration::from_secs(1),
            backoff_max: Duration::from_secs(300),
            poll_interval: Duration::from_secs(1),
        }
    }
}

pub struct Publisher {
    pool: PgPool,
    sink: Arc<dyn EventSink>,
    settings: PublisherSettings,
}

/// What one pass did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pass {
    Idle,
    Delivered(usize),
    /// The sink refused this many events; they are scheduled for retry.
    Failed(usize),
}

impl Publisher {
    pub fn new(pool: PgPool, sink: Arc<dyn EventSink>, settings: PublisherSettings) -> Self {
        Self { pool, sink, settings }
    }

    /// Claims one batch of due events and hands it to the sink.
    pub async fn run_once(&self) -> Result<Pass, AuditError> {
        let events = outbox::claim_due_events(&self.pool, self.settings.batch_size, self.settings.lease.as_secs() as i64).await?;
        if events.is_empty() {
            return Ok(Pass::Idle);
        }
        let ids: Vec<i64> = events.iter().map(|event| event.id).collect();
        match self.sink.publish(&events).await {
            Ok(()) => {
                outbox::mark_delivered(&self.pool, &ids).await?;
                Ok(Pass::Delivered(ids.len()))
            }
            Err(error) => {
                let attempts = events.iter().map(|event| event.attempts).max().unwrap_or(0);
                let retry_at = OffsetDateTime::now_utc() + self.backoff(attempts);
                tracing::warn!(%error, events = ids.len(), attempts = attempts + 1, "event sink refused a batch; will retry");
                outbox::mark_failed(&self.pool, &ids, &error, retry_at).await?;
                Ok(Pass::Failed(ids.len()))
            }
        }
    }

    /// `backoff_base * 2^attempts`, capped at `backoff_max`.
    fn backoff(&self, attempts: i32) -> Duration {
        let factor = 2u32.saturating_pow(attempts.clamp(0, 20) as u32);
        self.settings.backoff_base.saturating_mul(factor).min(self.settings.backoff_max)
    }

    /// Publishes until the task is dropped; a Postgres outage only pauses it.
    pub async fn run(self) {
        loop {
            match self.run_once().await {
                Ok(Pass::Delivered(_)) => continue,
                Ok(_) => {}
                Err(error) => tracing::error!(%error, "event outbox unreachable; will retry"),
            }
            tokio::time::sleep(self.settings.poll_interval).await;
        }
    }
}
