//! Group commit: many decisions, one INSERT, one commit, and still no request answered before
//! its own row is durable.
//!
//! Requests queue their event with a oneshot to wait on. A collector task takes whatever has
//! queued (up to `batch_max`), waits for a free writer slot (while it waits, more rows
//! queue, so batches grow exactly when the database is the bottleneck), tops the batch up
//! and hands it to a writer task, which commits it and then answers every waiter with the
//! commit's outcome. A failed commit fails every request in the batch.
//!
//! The queue is bounded. A request reserves its slot when it arrives ([`GroupCommit::reserve`]),
//! before any work is done, so an overloaded broker refuses early with `rate_limited` rather
//! than minting a credential it then cannot record.

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::metrics::histogram::Histogram;
use tokio::sync::{mpsc, oneshot, Semaphore};

use super::{AuditError, AuditEvent, PgAudit};
use crate::config::AuditWriterConfig;

struct Pending {
    event: AuditEvent,
    committed: oneshot::Sender<Result<(), AuditError>>,
}

#[derive(Clone)]
pub struct GroupCommit {
    queue: mpsc::Sender<Pending>,
    capacity: usize,
}

/// A place in the queue, held from the start of an exchange until its row is handed over.
pub struct QueueSlot(mpsc::OwnedPermit<Pending>);

impl GroupCommit {
    /// Starts the collector; it stops once every handle (and slot) is dropped and the queue is drained.
    pub fn start(store: PgAudit, config: AuditWriterConfig, batch_rows: Histogram) -> Self {
        let capacity = config.queue_capacity as usize;
        let (queue, receiver) = mpsc::channel(capacity);
        tokio::spawn(collect(store, receiver, config, batch_rows));
        Self { queue, capacity }
    }

    /// Places taken in the queue: reserved by a request in progress, or waiting to commit.
    pub fn depth(&self) -> usize {
        self.capacity - self.queue.capacity()
    }

    pub fn reserve(&self) -> Result<QueueSlot, AuditError> {
        match self.queue.clone().try_reserve_owned() {
            Ok(permit) => Ok(QueueSlot(permit)),
            Err(mpsc::error::TrySendError::Full(_)) => Err(AuditError::Overloaded { capacity: self.capacity }),
            Err(mpsc::error::TrySendError::Closed(_)) => Err(AuditError::WriterStopped),
        }
    }

    /// For background work (aggregated rows, revocations): waits for room instead of refusing.
    pub async fn reserve_waiting(&self) -> Result<QueueSlot, AuditError> {
        self.queue.clone().reserve_owned().await.map(QueueSlot).map_err(|_| AuditError::WriterStopped)
    }

    /// Returns once the event's row is committed, or with the error that failed its batch.
    pub async fn write(slot: QueueSlot, event: AuditEvent) -> Result<(), AuditError> {
        let (committed, outcome) = oneshot::channel();
        slot.0.send(Pending { event, committed });
        outcome.await.unwrap_or(Err(AuditError::WriterStopped))
    }
}

async fn collect(store: PgAudit, mut receiver: mpsc::Receiver<Pending>, config: AuditWriterConfig, batch_rows: Histogram) {
    let batch_max = config.batch_max as usize;
    let writers = Arc::new(Semaphore::new(config.writers as usize));
    while let Some(first) = receiver.recv().await {
        let mut batch = Vec::with_capacity(batch_max.min(64));
        batch.push(first);
        if !config.batch_wait.is_zero() {
            fill_for(&mut receiver, &mut batch, batch_max, config.batch_wait).await;
        }
        let Ok(writer) = writers.clone().acquire_owned().await else { return };
        // Everything that queued while all writers were busy joins this batch.
        while batch.len() < batch_max {
            match receiver.try_recv() {
                Ok(pending) => batch.push(pending),
                Err(_) => break,
            }
        }
        batch_rows.observe(batch.len() as f64);
        let store = store.clone();
        tokio::spawn(async move {
            commit(&store, batch).await;
            drop(writer);
        });
    }
}

async fn fill_for(receiver: &mut mpsc::Receiver<Pending>, batch: &mut Vec<Pending>, batch_max: usize, wait: Duration) {
    let deadline = tokio::time::Instant::now() + wait;
    while batch.len() < batch_max {
        match tokio::time::timeout_at(deadline, receiver.recv()).await {
            Ok(Some(pending)) => batch.push(pending),
            Ok(None) | Err(_) => break,
        }
    }
}

async fn commit(store: &PgAudit, batch: Vec<Pending>) {
    let outcome = store.write_batch(batch.iter().map(|pending| &pending.event)).await;
    if let Err(error) = &outcome {
        tracing::error!(rows = batch.len(), %error, "audit batch not committed; failing every request in it");
    }
    let shared = outcome.map_err(Arc::new);
    for pending in batch {
        // The waiter may be gone (request timed out); its row is committed all the same.
        let _ = pending.committed.send(shared.clone().map_err(AuditError::BatchFailed));
    }
}
