//! Budget for denials nobody can be held to. Full rows up to `per_minute` per client address
//! each minute; the rest become one aggregated row per (address, code) with `occurrences = N`.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use time::OffsetDateTime;

use super::{AuditEvent, Decision};

const WINDOW: Duration = Duration::from_secs(60);
/// Bounds memory under a flood from many addresses; beyond it addresses are pooled as unknown.
const MAX_TRACKED_ADDRESSES: usize = 10_000;

pub struct UnattributedLimiter {
    per_minute: u32,
    state: Mutex<State>,
}

struct State {
    window_started: Instant,
    admitted: HashMap<Option<String>, u32>,
    suppressed: HashMap<(Option<String>, String), Suppressed>,
}

struct Suppressed {
    count: u32,
    first_at: OffsetDateTime,
}

const RATE_LIMITED: &str = "rate_limited";

impl State {
    fn suppress(&mut self, address: Option<String>, event: &AuditEvent) {
        let code = event.code.clone().unwrap_or_default();
        let address = if self.suppressed.len() < MAX_TRACKED_ADDRESSES || self.suppressed.contains_key(&(address.clone(), code.clone())) {
            address
        } else {
            None
        };
        let entry = self.suppressed.entry((address, code)).or_insert(Suppressed { count: 0, first_at: event.occurred_at });
        entry.count += 1;
    }
}

impl UnattributedLimiter {
    pub fn new(per_minute: u32) -> Self {
        Self {
            per_minute,
            state: Mutex::new(State {
                window_started: Instant::now(),
                admitted: HashMap::new(),
                suppressed: HashMap::new(),
            }),
        }
    }

    /// True when this event should be written in full now.
    pub fn admit(&self, event: &AuditEvent) -> bool {
        let mut state = self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if state.window_started.elapsed() >= WINDOW {
            state.window_started = Instant::now();
            state.admitted.clear();
        }
        let address = if state.admitted.len() < MAX_TRACKED_ADDRESSES || state.admitted.contains_key(&event.client_addr) {
            event.client_addr.clone()
        } else {
            None
        };
        let admitted = state.admitted.entry(address.clone()).or_default();
        if *admitted < self.per_minute {
            *admitted += 1;
            return true;
        }
        state.suppress(address, event);
        false
    }

    /// Counts an exchange refused because the audit queue was full: it cannot have a row of
    /// its own now, so it joins the aggregated rows of the next drain.
    pub fn count_refused(&self, event: &AuditEvent) {
        let mut state = self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        state.suppress(event.client_addr.clone(), event);
    }

    /// Aggregated rows for everything suppressed since the last drain.
    pub fn drain(&self) -> Vec<AuditEvent> {
        let mut state = self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let per_minute = self.per_minute;
        state
            .suppressed
            .drain()
            .map(|((address, code), suppressed)| {
                let mut event = AuditEvent::new(super::new_row_id(), Decision::Denied, suppressed.first_at, "aggregated");
                event.detail = Some(if code == RATE_LIMITED {
                    format!("{} exchanges refused unanswered while the audit queue was full", suppressed.count)
                } else {
                    format!(
                        "{} unattributed denials aggregated: over the budget of {per_minute} full rows per client address per minute",
                        suppressed.count
                    )
                });
                event.code = Some(code).filter(|c| !c.is_empty());
                event.client_addr = address;
                event.occurrences = suppressed.count;
                event
            })
            .collect()
    }

    /// Returns an aggregated row that could not be written, so its count is not lost.
    pub fn restore(&self, event: AuditEvent) {
        let mut state = self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let key = (event.client_addr, event.code.unwrap_or_default());
        let entry = state.suppressed.entry(key).or_insert(Suppressed { count: 0, first_at: event.occurred_at });
        entry.count += event.occurrences;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn denial(address: &str, code: &str) -> AuditEvent {
        let mut event = AuditEvent::new(crate::audit::new_row_id(), Decision::Denied, OffsetDateTime::now_utc(), "r");
        event.client_addr = Some(address.into());
        event.code = Some(code.into());
        event
    }

    #[test]
    fn budget_is_per_address_and_overflow_is_counted_per_code() {
        let limiter = UnattributedLimiter::new(2);
        assert!(limiter.admit(&denial("10.0.0.1", "invalid_token")));
        assert!(limiter.admit(&denial("10.0.0.1", "invalid_token")));
        assert!(!limiter.admit(&denial("10.0.0.1", "invalid_token")));
        assert!(!limiter.admit(&denial("10.0.0.1", "invalid_token")));
        assert!(!limiter.admit(&denial("10.0.0.1", "untrusted_issuer")));
        assert!(limiter.admit(&denial("10.0.0.2", "invalid_token")), "another address has its own budget");

        let mut rows = limiter.drain();
        rows.sort_by_key(|row| row.occurrences);
        assert_eq!(rows.len(), 2);
        assert_eq!((rows[0].code.as_deref(), rows[0].occurrences), (Some("untrusted_issuer"), 1));
        assert_eq!((rows[1].code.as_deref(), rows[1].occurrences), (Some("invalid_token"), 2));
        assert!(limiter.drain().is_empty(), "drain empties the counters");
    }

    #[test]
    fn restored_rows_are_drained_again() {
        let limiter = UnattributedLimiter::new(0);
        assert!(!limiter.admit(&denial("10.0.0.1", "invalid_token")));
        let rows = limiter.drain();
        limiter.restore(rows[0].clone());
        assert!(!limiter.admit(&denial("10.0.0.1", "invalid_token")));
        assert_eq!(limiter.drain()[0].occurrences, 2);
    }
}
