//! Prometheus metrics (`GET /metrics`), one registry per broker. Every label value comes from
//! the configuration or from a fixed set (decisions, problem codes, outcomes), never from a
//! request, so an attacker cannot create series: a role no policy declares is `unknown`.
//! Gauges that describe the database (revocations due, the outbox) are read when scraped.

use std::sync::atomic::AtomicU64;
use std::sync::LazyLock;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};

/// The role label of a request for a role that no policy declares.
pub const UNKNOWN_ROLE: &str = "unknown";
/// The backend or code label where there is none (denied before a backend was chosen; issued).
pub const NONE: &str = "none";

/// What OpenMetrics text is served as (Prometheus asks for it by name).
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ExchangeLabels {
    pub role: String,
    pub backend: String,
    pub decision: &'static str,
    pub code: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DecisionLabel {
    pub decision: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BackendLabel {
    pub backend: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct IssuerOutcomeLabels {
    pub issuer: String,
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct NonceLabel {
    pub nonce: &'static str,
}

/// ES256 signatures by how their nonce was made (`src/signing/es256.rs`). The one count kept
/// for the whole process rather than per broker: one pool of nonces serves every key in it.
static ES256_SIGNATURES: LazyLock<Family<NonceLabel, Counter>> = LazyLock::new(Family::default);

/// Counts an ES256 signature: finished from a nonce prepared ahead, or made whole because none was ready.
pub fn count_es256_signature(prepared: bool) {
    ES256_SIGNATURES.get_or_create(&NonceLabel { nonce: if prepared { "prepared" } else { "at_once" } }).inc();
}

type Histograms<Labels> = Family<Labels, Histogram, fn() -> Histogram>;
pub type Outcomes = Family<OutcomeLabel, Counter>;
pub type JwksFetches = Family<IssuerOutcomeLabels, Counter>;

pub struct Metrics {
    registry: Registry,
    pub exchanges: Family<ExchangeLabels, Counter>,
    pub exchange_duration: Histograms<DecisionLabel>,
    pub mint_duration: Histograms<BackendLabel>,
    pub audit_queue_depth: Gauge,
    pub audit_batch_rows: Histogram,
    pub token_claim_batch_size: Histogram,
    /// Rows that did not commit; their requests were refused.
    pub audit_write_failures: Counter,
    pub revocations_due: Gauge,
    /// `done` or `failed` (a failed attempt is retried later).
    pub revocations: Outcomes,
    /// `ok` or `failed`, per configured issuer.
    pub jwks_fetches: JwksFetches,
    pub outbox_backlog: Gauge,
    pub outbox_oldest_age: Gauge<f64, AtomicU64>,
    pub audit_timeline_lag: Gauge<f64, AtomicU64>,
    pub token_uses_purged: Counter,
    /// `accepted`, `ignored` or the problem code that rejected it.
    pub gogs_deliveries: Outcomes,
    /// `ok` or `failed`.
    pub policy_reloads: Outcomes,
}

fn latency_histogram() -> Histogram {
    // 1 ms to about 16 s: an exchange is milliseconds, a Vault or STS mint can take seconds.
    Histogram::new(exponential_buckets(0.001, 2.0, 15))
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("credbroker");
        let exchanges = Family::<ExchangeLabels, Counter>::default();
        registry.register("exchanges", "Exchanges of job tokens for credentials, by role, backend, audit decision and problem code", exchanges.clone());
        let exchange_duration: Histograms<DecisionLabel> = Family::new_with_constructor(latency_histogram);
        registry.register_with_unit(
            "exchange_duration",
            "Time from an exchange's arrival to its recorded decision",
            Unit::Seconds,
            exchange_duration.clone(),
        );
        let mint_duration: Histograms<BackendLabel> = Family::new_with_constructor(latency_histogram);
        registry.register_with_unit("mint_duration", "Time a backend took to mint a credential", Unit::Seconds, mint_duration.clone());
        let audit_queue_depth = Gauge::default();
        registry.register("audit_queue_depth", "Decisions waiting for the audit writer", audit_queue_depth.clone());
        let audit_batch_rows = Histogram::new(exponential_buckets(1.0, 2.0, 12));
        registry.register("audit_batch_rows", "Rows per audit commit", audit_batch_rows.clone());
        let token_claim_batch_size = Histogram::new(exponential_buckets(1.0, 2.0, 12));
        registry.register("token_claim_batch_size", "Token-use claims per claim statement", token_claim_batch_size.clone());
        let audit_write_failures = Counter::default();
        registry.register("audit_write_failures", "Audit rows whose write failed (their requests were refused)", audit_write_failures.clone());
        let revocations_due = Gauge::default();
        registry.register("revocations_due", "Scheduled revocations whose time has come and that are not done", revocations_due.clone());
        let revocations = Outcomes::default();
        registry.register("revocations", "Revocation attempts by outcome (done, failed)", revocations.clone());
        let jwks_fetches = JwksFetches::default();
        registry.register("jwks_fetches", "JWKS fetches per issuer by outcome (ok, failed)", jwks_fetches.clone());
        let outbox_backlog = Gauge::default();
        registry.register("outbox_backlog", "Events in the outbox not yet published", outbox_backlog.clone());
        let outbox_oldest_age = Gauge::<f64, AtomicU64>::default();
        registry.register_with_unit("outbox_oldest_event_age", "Age of the oldest unpublished event", Unit::Seconds, outbox_oldest_age.clone());
        let audit_timeline_lag = Gauge::<f64, AtomicU64>::default();
        registry.register_with_unit(
            "audit_timeline_lag",
            "Age of the oldest audit row the /audit chart's rollup has not counted yet",
            Unit::Seconds,
            audit_timeline_lag.clone(),
        );
        let token_uses_purged = Counter::default();
        registry.register("token_uses_purged", "Use counts of expired job tokens purged", token_uses_purged.clone());
        let gogs_deliveries = Outcomes::default();
        registry.register("gogs_deliveries", "Gogs webhook deliveries by outcome", gogs_deliveries.clone());
        let policy_reloads = Outcomes::default();
        registry.register("policy_reloads", "Policy reloads by outcome (ok, failed)", policy_reloads.clone());
        registry.register(
            "es256_signatures",
            "ES256 signatures made by this process, by nonce: prepared ahead, or at_once when none was ready",
            ES256_SIGNATURES.clone(),
        );
        Self {
            registry,
            exchanges,
            exchange_duration,
            mint_duration,
            audit_queue_depth,
            audit_batch_rows,
            token_claim_batch_size,
            audit_write_failures,
            revocations_due,
            revocations,
            jwks_fetches,
            outbox_backlog,
            outbox_oldest_age,
            audit_timeline_lag,
            token_uses_purged,
            gogs_deliveries,
            policy_reloads,
        }
    }
}

impl Metrics {
    /// The OpenMetrics text of every metric.
    pub fn render(&self) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry).expect("writing to a String cannot fail");
        text
    }

    pub fn count(outcomes: &Outcomes, outcome: &'static str) {
        outcomes.get_or_create(&OutcomeLabel { outcome }).inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_carry_the_prefix_and_counters_end_in_total() {
        let metrics = Metrics::default();
        metrics
            .exchanges
            .get_or_create(&ExchangeLabels { role: "deploy".into(), backend: "aws".into(), decision: "issued", code: NONE })
            .inc();
        metrics.exchange_duration.get_or_create(&DecisionLabel { decision: "issued" }).observe(0.003);
        let text = metrics.render();
        assert!(text.contains(r#"credbroker_exchanges_total{role="deploy",backend="aws",decision="issued",code="none"} 1"#), "{text}");
        assert!(text.contains(r#"credbroker_exchange_duration_seconds_bucket{le="0.004",decision="issued"} 1"#), "{text}");
        assert!(text.contains("# TYPE credbroker_exchange_duration_seconds histogram"), "{text}");
        assert!(text.ends_with("# EOF\n"));
    }
}
