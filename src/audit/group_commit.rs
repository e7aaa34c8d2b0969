//! Group commit: many requests, one statement, one commit, and still no request answered before
//! its own work is committed. Two kinds of work go this way ([`Batch`]): audit rows
//! ([`AuditRows`]) and token-use claims (`TokenClaims`, in `claims.rs`).
//!
//! Requests queue their job with a oneshot to wait on. Writer tasks take turns at the queue:
//! the one holding it takes whatever has queued (up to `batch_max`), lets go and runs the batch,
//! then answers every waiter with its own outcome and its job back (a refused claim's row is
//! written again as a refusal, without a copy kept); while it runs, more jobs queue for the next
//! writer, so batches grow exactly when the database is the bottleneck. A failed statement
//! fails every request in the batch. A job that arrives while no batch runs runs at once in its
//! own task ([`GroupCommit::submit`]): with nothing to share, there is nothing to wait for.
//!
//! The queue is bounded. An exchange reserves its audit slot when it arrives
//! ([`GroupCommit::reserve`]), before any work is done, so an overloaded broker refuses early
//! with `rate_limited` rather than minting a credential it then cannot record.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::metrics::histogram::Histogram;
use tokio::sync::{mpsc, oneshot, Mutex};

use super::{AuditError, AuditEvent, PgAudit};
use crate::config::AuditWriterConfig;

/// Work that is cheaper done many at a time: one statement for the whole batch.
pub(super) trait Batch: Send + Sync + 'static {
    type Job: Send + 'static;
    type Answer: Send + 'static;
    /// One answer per job, in the jobs' order; an error fails every job of the batch.
    fn run(&self, jobs: &[Self::Job]) -> impl Future<Output = Result<Vec<Self::Answer>, AuditError>> + Send;
}

/// Audit rows: one multi-row INSERT and one durable commit per batch.
pub(super) struct AuditRows(pub PgAudit);

impl Batch for AuditRows {
    type Job = AuditEvent;
    type Answer = ();

    async fn run(&self, events: &[AuditEvent]) -> Result<Vec<()>, AuditError> {
        self.0.write_batch(events).await?;
        Ok(vec![(); events.len()])
    }
}

/// A job's answer, with the job handed back.
pub(super) type Answered<B> = (<B as Batch>::Answer, <B as Batch>::Job);

struct Pending<B: Batch> {
    job: B::Job,
    answer: oneshot::Sender<Result<Answered<B>, AuditError>>,
}

pub(super) struct GroupCommit<B: Batch> {
    queue: mpsc::Sender<Pending<B>>,
    capacity: usize,
    work: Arc<B>,
    /// Batches running now, the writers' and a lone job's (see [`GroupCommit::submit`]).
    running: Arc<AtomicUsize>,
    batch_sizes: BatchSizes,
}

/// The histograms each batch's size goes into: a batch of claims with their rows is both a
/// claim statement and an audit commit.
pub(super) type BatchSizes = Arc<[Histogram]>;

fn observe(batch_sizes: &[Histogram], size: usize) {
    for histogram in batch_sizes {
        histogram.observe(size as f64);
    }
}

impl<B: Batch> Clone for GroupCommit<B> {
    fn clone(&self) -> Self {
        Self {
            queue: self.queue.clone(),
            capacity: self.capacity,
            work: self.work.clone(),
            running: self.running.clone(),
            batch_sizes: self.batch_sizes.clone(),
        }
    }
}

/// A place in the queue, held from the start of an exchange until its job is handed over.
pub(super) struct QueueSlot<B: Batch>(mpsc::OwnedPermit<Pending<B>>);

/// How a batcher runs: `writers` batches at once, up to `batch_max` jobs each, waiting up to
/// `batch_wait` for a batch to fill, with room for `queue_capacity` jobs.
pub(super) struct Shape {
    pub writers: u32,
    pub batch_max: u32,
    pub batch_wait: Duration,
    pub queue_capacity: u32,
}

impl From<&AuditWriterConfig> for Shape {
    fn from(config: &AuditWriterConfig) -> Self {
        Self { writers: config.writers, batch_max: config.batch_max, batch_wait: config.batch_wait, queue_capacity: config.queue_capacity }
    }
}

impl<B: Batch> GroupCommit<B> {
    /// Starts the writers; they stop once every handle (and slot) is dropped and the queue is drained.
    pub fn start(work: B, shape: Shape, batch_sizes: BatchSizes) -> Self {
        let capacity = shape.queue_capacity as usize;
        let (queue, receiver) = mpsc::channel(capacity);
        let (work, receiver, shape) = (Arc::new(work), Arc::new(Mutex::new(receiver)), Arc::new(shape));
        let running = Arc::new(AtomicUsize::new(0));
        for _ in 0..shape.writers.max(1) {
            tokio::spawn(write_batches(work.clone(), receiver.clone(), shape.clone(), running.clone(), batch_sizes.clone()));
        }
        Self { queue, capacity, work, running, batch_sizes }
    }

    /// Places taken in the queue: reserved by a request in progress, or waiting to run.
    pub fn depth(&self) -> usize {
        self.capacity - self.queue.capacity()
    }

    pub fn reserve(&self) -> Result<QueueSlot<B>, AuditError> {
        match self.queue.clone().try_reserve_owned() {
            Ok(permit) => Ok(QueueSlot(permit)),
            Err(mpsc::error::TrySendError::Full(_)) => Err(AuditError::Overloaded { capacity: self.capacity }),
            Err(mpsc::error::TrySendError::Closed(_)) => Err(AuditError::WriterStopped),
        }
    }

    /// For work that must not be refused: waits for room instead.
    pub async fn reserve_waiting(&self) -> Result<QueueSlot<B>, AuditError> {
        self.queue.clone().reserve_owned().await.map(QueueSlot).map_err(|_| AuditError::WriterStopped)
    }

    /// Returns once the job's batch has run, with the job's answer and the job itself, or the
    /// error that failed the batch.
    ///
    /// When no batch is running there is nothing to wait for and nobody to share a statement
    /// with: the job then runs at once in the caller's task, a batch of one, as it would with
    /// `audit_group_commit = false` (same statement, same commit, same answer), and skips the
    /// hand-offs to a writer task and back, which are most of a lone exchange's wait on a busy
    /// machine. Jobs that arrive meanwhile queue for the writers as usual.
    pub async fn submit(&self, slot: QueueSlot<B>, job: B::Job) -> Result<Answered<B>, AuditError> {
        if self.running.compare_exchange(0, 1, Ordering::AcqRel, Ordering::Acquire).is_ok() {
            // Counted down even when the caller is dropped mid-statement (a request timed out).
            let _running = Running(&self.running);
            drop(slot);
            observe(&self.batch_sizes, 1);
            // Boxed: the statement's future is large, and every exchange's future would carry
            // it, even one that queues for a writer instead.
            let answer = Box::pin(self.work.run(std::slice::from_ref(&job))).await?.pop().ok_or(AuditError::WriterStopped)?;
            return Ok((answer, job));
        }
        let (answer, outcome) = oneshot::channel();
        slot.0.send(Pending { job, answer });
        outcome.await.unwrap_or(Err(AuditError::WriterStopped))
    }
}

/// One batch running, counted from its start until it is done or dropped.
struct Running<'a>(&'a AtomicUsize);

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// One writer: takes the queue, waits for a first job, takes whatever else has queued (up to
/// `batch_max`), lets go of the queue and runs the batch. While it runs, the next writer holds
/// the queue and its batch gathers, so batches grow exactly when the database is the
/// bottleneck, and a lone exchange waits for no task but its writer.
async fn write_batches<B: Batch>(
    work: Arc<B>,
    queue: Arc<Mutex<mpsc::Receiver<Pending<B>>>>,
    shape: Arc<Shape>,
    running: Arc<AtomicUsize>,
    batch_sizes: BatchSizes,
) {
    let batch_max = shape.batch_max as usize;
    loop {
        let batch = {
            let mut receiver = queue.lock().await;
            let Some(first) = receiver.recv().await else { return };
            let mut batch = Vec::with_capacity(batch_max.min(64));
            batch.push(first);
            if !shape.batch_wait.is_zero() {
                fill_for(&mut receiver, &mut batch, batch_max, shape.batch_wait).await;
            }
            while batch.len() < batch_max {
                match receiver.try_recv() {
                    Ok(pending) => batch.push(pending),
                    Err(_) => break,
                }
            }
            batch
        };
        observe(&batch_sizes, batch.len());
        running.fetch_add(1, Ordering::AcqRel);
        let _running = Running(&running);
        run(&*work, batch).await;
    }
}

async fn fill_for<B: Batch>(receiver: &mut mpsc::Receiver<Pending<B>>, batch: &mut Vec<Pending<B>>, batch_max: usize, wait: Duration) {
    let deadline = tokio::time::Instant::now() + wait;
    while batch.len() < batch_max {
        match tokio::time::timeout_at(deadline, receiver.recv()).await {
            Ok(Some(pending)) => batch.push(pending),
            Ok(None) | Err(_) => break,
        }
    }
}

async fn run<B: Batch>(work: &B, batch: Vec<Pending<B>>) {
    let (jobs, waiters): (Vec<B::Job>, Vec<_>) = batch.into_iter().map(|pending| (pending.job, pending.answer)).unzip();
    match work.run(&jobs).await {
        Ok(answers) => {
            debug_assert_eq!(answers.len(), waiters.len());
            for ((waiter, answer), job) in waiters.into_iter().zip(answers).zip(jobs) {
                // The waiter may be gone (request timed out); its work is done all the same.
                let _ = waiter.send(Ok((answer, job)));
            }
        }
        Err(error) => {
            tracing::error!(jobs = waiters.len(), %error, "batch not committed; failing every request in it");
            let shared = Arc::new(error);
            for waiter in waiters {
                let _ = waiter.send(Err(AuditError::BatchFailed(shared.clone())));
            }
        }
    }
}
