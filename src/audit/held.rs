//! Connections the hot path keeps between statements. Through the pool, every statement would
//! cost two more round trips than its own: sqlx pings a connection when it is taken
//! (`test_before_acquire`, which the rest of the broker keeps for its recovery) and again when
//! it is given back. The audit batches and token-use claims run on these instead.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sqlx::pool::PoolConnection;
use sqlx::{Connection, PgConnection, PgPool, Postgres};

use super::AuditError;

/// A connection idle this long is pinged before its next statement: one that died while the
/// broker was quiet (Postgres restarted) is replaced then, instead of failing a request.
const PING_WHEN_IDLE_FOR: Duration = Duration::from_secs(1);

/// More than the writers ever run at once; beyond it a connection goes back to the pool.
const KEEP_AT_MOST: usize = 16;

type Idle = Vec<(PoolConnection<Postgres>, Instant)>;

#[derive(Clone)]
pub(super) struct HeldConnections {
    pool: PgPool,
    idle: Arc<Mutex<Idle>>,
    /// Kept connections stay checked out of the pool: half of it at most, so work beyond what
    /// is kept (a burst of lone claims) still finds connections.
    keep_at_most: usize,
}

impl HeldConnections {
    pub fn new(pool: PgPool) -> Self {
        let keep_at_most = KEEP_AT_MOST.min(pool.options().get_max_connections() as usize / 2);
        Self { pool, idle: Arc::default(), keep_at_most }
    }

    /// A kept connection, or one from the pool.
    pub async fn take(&self) -> Result<Held, AuditError> {
        loop {
            let kept = self.idle.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).pop();
            let Some((mut connection, since)) = kept else {
                return Ok(Held { connection: self.pool.acquire().await?, home: self.idle.clone(), keep_at_most: self.keep_at_most });
            };
            // A dead one is dropped: the pool tests it on return and closes it.
            if since.elapsed() < PING_WHEN_IDLE_FOR || connection.ping().await.is_ok() {
                return Ok(Held { connection, home: self.idle.clone(), keep_at_most: self.keep_at_most });
            }
        }
    }
}

/// A connection taken for one statement. [`Held::keep`] it once the statement succeeded;
/// dropped instead (a failure, a cancelled request), it goes back to the pool, which tests it.
pub(super) struct Held {
    connection: PoolConnection<Postgres>,
    home: Arc<Mutex<Idle>>,
    keep_at_most: usize,
}

impl Held {
    pub fn connection(&mut self) -> &mut PgConnection {
        &mut self.connection
    }

    pub fn keep(self) {
        let mut idle = self.home.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if idle.len() < self.keep_at_most {
            idle.push((self.connection, Instant::now()));
        }
    }
}
