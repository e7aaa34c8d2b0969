//! Building the application from configuration, separate from running it, so tests start the
//! real thing on port 0.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use axum::body::Bytes;
use serde_json::json;
use tokio::net::TcpListener;

use crate::audit::{self, Audit, PgAudit};
use crate::signing::SigningKey;
use crate::backend::{self, Backends};
use crate::broker::Broker;
use crate::config::{Config, ConfigError, DEV_ISSUER_NAME};
use crate::dev::DevIssuer;
use crate::events::kafka::{EventsConfig, KafkaSink};
use crate::events::Publisher;
use crate::gogs::{Gogs, GogsConfig};
use crate::http::audit_page::git_links::GitLinks;
use crate::http::tls::Tls;
use crate::http::{self, AppState, DevIssuerDocuments};
use crate::metrics::Metrics;
use crate::revocation::secret_encryption::RevocationKey;
use crate::revocation::Revoker;
use crate::oidc::Verifier;
use crate::broker::policies::Policies;
use crate::policy::{CompileContext, PolicySet};
use crate::types::IssuerName;

#[derive(Debug, Clone, Copy, Default)]
pub struct ServeOptions {
    pub dev: bool,
}

pub struct Application {
    listener: TcpListener,
    /// `[tls]`: the listener speaks TLS with these certificates (re-read on SIGHUP).
    tls: Option<Arc<Tls>>,
    /// `metrics_listen`: `/metrics` is served here instead of on the listener.
    metrics_listener: Option<TcpListener>,
    state: AppState,
    sealer: Option<Sealer>,
    /// The event stream's publisher, when `[events]` is configured.
    publisher: Option<EventPublisher>,
    /// How far past its expiry a token still verifies (`clock_skew_seconds`).
    clock_skew: Duration,
}

struct EventPublisher {
    publisher: Publisher,
    pool: sqlx::PgPool,
    /// Whether the outbox switch was turned on at build time.
    enabled: bool,
}

/// Seals audit rows into signed checkpoints every `interval` (audit::seal).
struct Sealer {
    key: Arc<SigningKey>,
    interval: Duration,
}

/// Everything checked at load: policies against the configured issuers and backends.
/// In dev mode the built-in issuer counts as configured.
pub fn load_policies(config: &Config, backends: &Backends, dev: bool) -> anyhow::Result<PolicySet> {
    PolicyLoader::new(config, backends, dev).load()
}

/// What compiling the policy directory needs from the configuration, kept so a reload
/// compiles against exactly what startup did.
struct PolicyLoader {
    policy_dir: std::path::PathBuf,
    issuers: Vec<IssuerName>,
    backends: Backends,
}

impl PolicyLoader {
    fn new(config: &Config, backends: &Backends, dev: bool) -> Self {
        let mut issuers: Vec<IssuerName> = config.issuers.iter().map(|issuer| issuer.name.clone()).collect();
        if dev {
            issuers.push(IssuerName::parse(DEV_ISSUER_NAME).expect("reserved name is valid"));
        }
        if config.gogs.is_some() {
            issuers.push(IssuerName::parse(crate::gogs::GOGS_ISSUER_NAME).expect("reserved name is valid"));
        }
        Self { policy_dir: config.policy_dir.clone(), issuers, backends: backends.clone() }
    }

    fn load(&self) -> anyhow::Result<PolicySet> {
        let schemas = self.backends.schemas();
        let all_schemas = backend::all_param_schemas();
        let context = CompileContext { issuers: Some(&self.issuers), backends: Some(&schemas), all_schemas: &all_schemas };
        let policies = PolicySet::load_dir(&self.policy_dir, &context)?;
        self.backends.check_roles(policies.roles())?;
        Ok(policies)
    }
}

impl Application {
    pub async fn build(config: Config, options: ServeOptions) -> anyhow::Result<Self> {
        let listener = TcpListener::bind(config.listen).await.with_context(|| format!("cannot listen on {}", config.listen))?;
        Self::build_on(listener, config, options).await
    }

    pub async fn build_on(listener: TcpListener, mut config: Config, options: ServeOptions) -> anyhow::Result<Self> {
        if !options.dev && config.dev.is_some() {
            bail!(
                "{}: key `dev`: development settings are present; remove the [dev] section or run `serve --dev`",
                config.source_name()
            );
        }
        let tls = config.tls.clone().map(|files| Tls::load(files, config.source_name())).transpose()?.map(Arc::new);
        let address = listener.local_addr().context("the listener has no address")?;
        if tls.is_none() && !address.ip().is_loopback() && !config.allow_plaintext {
            bail!(
                "{}: key `listen`: {address} is not a loopback address and there is no [tls] section, so credentials would cross \
                 the network in plain text; add [tls] with cert_file and key_file, or set allow_plaintext = true if a \
                 TLS-terminating proxy sits in front of the broker",
                config.source_name()
            );
        }
        let metrics_listener = match config.metrics_listen {
            Some(address) => Some(TcpListener::bind(address).await.with_context(|| format!("{}: key `metrics_listen`: cannot listen on {address}", config.source_name()))?),
            None => None,
        };
        let metrics = Arc::new(Metrics::default());
        let dev_issuer = if options.dev {
            tracing::warn!("development mode: trusting the built-in dev issuer; never use this in production");
            Some(DevIssuer::load_or_create(&config).context("cannot prepare the dev issuer")?)
        } else {
            None
        };
        config.issuers.extend(dev_issuer.as_ref().map(DevIssuer::issuer_config));

        if let Some(vault) = &config.vault {
            vault.check_auth_allowed(options.dev).map_err(|message| anyhow::anyhow!("{}: key `vault.token`: {message}", config.source_name()))?;
        }
        let dev_state_dir = options.dev.then(|| DevIssuer::state_dir(&config));
        let backends = Backends::build(&config, dev_state_dir.as_deref())?;
        let policy_loader = PolicyLoader::new(&config, &backends, false);
        let policies = policy_loader.load()?;
        let revocation_key = RevocationKey::load(&config, backends.vault()).await?;
        if let (None, Some(first)) = (&revocation_key, backends.needing_revocation_key().first()) {
            bail!(
                "{}: key `revocation_secret_key`: is required because backend {first} ends its credentials with a secret the \
                 revocation schedule must keep encrypted (e.g. revocation_secret_key = {{ file = \"/run/secrets/credbroker-revocation-key\" }}, \
                 32 random bytes in base64: openssl rand -base64 32)",
                config.source_name()
            );
        }
        tracing::info!(roles = policies.len(), dir = %config.policy_dir.display(), "policies loaded");

        // Parsed before anything connects, so a broken [events] fails the start with its key.
        let events = config.events.as_ref().map(|table| EventsConfig::parse(table, &config, backends.vault())).transpose()?;

        let store = PgAudit::connect(
            &config.database_url,
            config.database_max_connections,
            Duration::from_secs(config.database_acquire_timeout_seconds),
        )?;
        if config.migrate_on_start {
            audit::migrate(store.pool()).await.context("cannot migrate the audit database")?;
        }
        let publisher = match events {
            Some(events) => {
                tracing::info!(topic = %events.sink.topic, servers = %events.sink.bootstrap_servers.join(","), "event stream enabled");
                // Queueing is a database-wide switch the triggers read; it stays on once a
                // publisher ran, so events keep queueing through this replica's restarts. Set
                // here, before the first request, when Postgres answers; otherwise the publisher
                // task keeps trying (nothing can be issued, so nothing is missed, meanwhile).
                let enabled = match audit::outbox::set_outbox_enabled(store.pool(), true).await {
                    Ok(()) => true,
                    Err(error) => {
                        tracing::error!(%error, "cannot enable the event outbox yet; will retry");
                        false
                    }
                };
                let publisher = Publisher::new(store.pool().clone(), Arc::new(KafkaSink::new(events.sink)), events.publisher);
                Some(EventPublisher { publisher, pool: store.pool().clone(), enabled })
            }
            None => None,
        };
        let audit = Audit::new(store, config.audit_writer, config.unattributed_denials_per_minute, metrics.clone());
        let sealer = match &config.audit_seal_key_file {
            Some(path) => Some(Sealer {
                key: Arc::new(SigningKey::from_pem_file(path).with_context(|| format!("{}: key `audit_seal_key_file`", config.source_name()))?),
                interval: Duration::from_secs(config.audit_seal_interval_seconds),
            }),
            None => {
                tracing::warn!("audit_seal_key_file is not set: audit rows are not sealed and `audit verify` cannot prove the log intact");
                None
            }
        };

        let verifier = Verifier::new(
            &config.issuers,
            config.audience.clone(),
            config.clock_skew_seconds,
            Duration::from_secs(config.jwks_max_age_seconds),
            Duration::from_secs(config.jwks_min_refetch_seconds),
            metrics.jwks_fetches.clone(),
        )?;
        let audit_links = GitLinks::parse(config.audit_page.as_ref(), &config.issuer_names())
            .map_err(|error| ConfigError::new(config.source_name(), &error.key, error.message))?;
        let gogs = match &config.gogs {
            Some(table) => {
                let gogs_config = GogsConfig::parse(table, &config, backends.vault(), dev_state_dir.as_deref())?;
                Some(Arc::new(Gogs::new(gogs_config, &config.public_url, &config.audience, config.clock_skew_seconds)?))
            }
            None => None,
        };
        backends.start().await;
        if let Some(gogs) = &gogs {
            gogs.start().await;
        }
        let openid_configuration = json!({
            "issuer": config.public_url,
            "jwks_uri": format!("{}/.well-known/jwks.json", config.public_url),
            "response_types_supported": ["id_token"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": ["RS256", "ES256"],
            "token_endpoint": format!("{}/oauth/token", config.public_url),
            "grant_types_supported": http::oauth::GRANT_TYPES,
            // client_credentials authenticates with the job token as a JWT client assertion.
            "token_endpoint_auth_methods_supported": ["private_key_jwt"],
        });
        let broker = Broker {
            verifier,
            policies: Policies::new(
                policies,
                Box::new(move || policy_loader.load().map_err(|error| format!("{error:#}"))),
                metrics.policy_reloads.clone(),
            ),
            backends,
            audit,
            max_uses_per_token: config.max_uses_per_token,
            revoker: Revoker::new(Duration::from_secs(config.revocation_poll_seconds), revocation_key, metrics.revocations.clone()),
            gogs,
            metrics,
        };
        let state = AppState {
            broker: Arc::new(broker),
            openid_configuration: Bytes::from(openid_configuration.to_string()),
            dev_issuer: dev_issuer.map(|dev| DevIssuerDocuments {
                openid_configuration: Bytes::from(dev.discovery_document().to_string()),
                jwks: Bytes::from(dev.jwks().to_string()),
            }),
            request_timeout: Duration::from_secs(config.request_timeout_seconds),
            audit_links: Arc::new(audit_links),
            secure_cookies: config.public_url.starts_with("https://"),
            trusted_proxies: Arc::new(config.trusted_proxies.clone()),
            metrics_on_listener: metrics_listener.is_none(),
        };
        Ok(Self { listener, tls, metrics_listener, state, sealer, publisher, clock_skew: Duration::from_secs(config.clock_skew_seconds) })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener.local_addr().expect("a bound listener has an address")
    }

    pub fn state(&self) -> &AppState {
        &self.state
    }

    pub async fn run_until_stopped(self) -> anyhow::Result<()> {
        let audit = self.state.broker.audit.clone();
        let flusher = tokio::spawn(flush_unattributed_periodically(audit.clone()));
        // Due revocations, including those that fell due while no broker was running.
        let revoker = tokio::spawn(self.state.broker.revoker.clone().run_worker(audit.clone(), self.state.broker.backends.clone()));
        let sealer = self.sealer.map(|sealer| tokio::spawn(seal_periodically(audit.store().clone(), sealer)));
        let publisher = self.publisher.map(|events| tokio::spawn(publish_events(events)));
        let reloader = tokio::spawn(reload_on_sighup(self.state.broker.clone(), self.tls.clone()));
        let purger = tokio::spawn(purge_token_uses_periodically(audit.store().clone(), self.clock_skew, self.state.broker.metrics.clone()));
        let timeline_counter = tokio::spawn(catch_up_timeline_periodically(audit.store().clone()));
        let metrics_server = self.metrics_listener.map(|listener| {
            tracing::info!(address = %listener.local_addr().expect("a bound listener has an address"), "serving /metrics");
            tokio::spawn(std::future::IntoFuture::into_future(axum::serve(listener, http::metrics_app(self.state.clone()))))
        });
        let router = http::app(self.state);
        tracing::info!(address = %self.listener.local_addr()?, tls = self.tls.is_some(), "credbroker listening");
        match self.tls {
            None => http::serve(self.listener, router, shutdown_signal()).await,
            Some(tls) => http::serve(tls.listen(self.listener), router, shutdown_signal()).await,
        }
        if let Some(metrics_server) = metrics_server {
            metrics_server.abort();
        }
        flusher.abort();
        revoker.abort();
        reloader.abort();
        purger.abort();
        timeline_counter.abort();
        if let Some(sealer) = sealer {
            sealer.abort();
        }
        // An event in flight stays leased and comes due again: at least once, never lost.
        if let Some(publisher) = publisher {
            publisher.abort();
        }
        if let Err(error) = audit.flush_unattributed().await {
            tracing::error!(%error, "could not write aggregated denials at shutdown");
        }
        Ok(())
    }
}

/// `SIGHUP` recompiles the policy directory and swaps the set in whole; a set that does not
/// compile leaves the serving one in place, and says why in the log and in `/readyz`. It also
/// re-reads the TLS certificate and key, for connections accepted from then on.
async fn reload_on_sighup(broker: Arc<Broker>, tls: Option<Arc<Tls>>) {
    let Ok(mut hangups) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) else {
        tracing::warn!("cannot listen for SIGHUP; reload policies with POST /v1/policies/reload");
        return;
    };
    while hangups.recv().await.is_some() {
        match broker.policies.reload() {
            Ok(version) => tracing::info!(policy_version = version, roles = broker.policies.current().len(), "policies reloaded on SIGHUP"),
            Err(error) => tracing::error!(%error, "policy reload on SIGHUP failed; the previous policy set keeps serving"),
        }
        match tls.as_deref().map(Tls::reload) {
            None => {}
            Some(Ok(())) => tracing::info!("TLS certificate reloaded on SIGHUP"),
            Some(Err(error)) => tracing::error!(%error, "TLS reload on SIGHUP failed; the previous certificate keeps serving"),
        }
    }
}

async fn publish_events(events: EventPublisher) {
    if !events.enabled {
        while let Err(error) = audit::outbox::set_outbox_enabled(&events.pool, true).await {
            tracing::error!(%error, "cannot enable the event outbox; will retry");
            tokio::time::sleep(Duration::from_secs(5)).await;
        }
        tracing::info!("event outbox enabled");
    }
    events.publisher.run().await;
}

async fn flush_unattributed_periodically(audit: Audit) {
    let mut interval = tokio::time::interval(Duration::from_secs(60));
    interval.tick().await;
    loop {
        interval.tick().await;
        if let Err(error) = audit.flush_unattributed().await {
            tracing::error!(%error, "could not write aggregated denials; will retry");
        }
    }
}

/// How often, and in batches of how many rows, the single-use records of expired tokens go.
const TOKEN_USE_PURGE_INTERVAL: Duration = Duration::from_secs(600);
const TOKEN_USE_PURGE_BATCH: i64 = 1000;

/// `token_use_counts` would grow by a row per job token forever; a token past its expiry (and the
/// clock skew verification allows) can never be presented again, so its rows can go.
async fn purge_token_uses_periodically(store: PgAudit, clock_skew: Duration, metrics: Arc<Metrics>) {
    let mut interval = tokio::time::interval(TOKEN_USE_PURGE_INTERVAL);
    loop {
        interval.tick().await;
        let expired_before = time::OffsetDateTime::now_utc() - clock_skew;
        match store.purge_token_uses(expired_before, TOKEN_USE_PURGE_BATCH).await {
            Ok(0) => {}
            Ok(purged) => {
                metrics.token_uses_purged.inc_by(purged);
                tracing::info!(purged, "purged the single-use records of expired tokens");
            }
            Err(error) => tracing::warn!(%error, "could not purge expired token uses; will retry"),
        }
    }
}

/// How often the `/audit` chart's rollup counts the rows that got below the transaction
/// horizon (migration 0022). The chart adds the rows not counted yet itself, so this bounds
/// only how many of them it reads: about a second's worth.
const TIMELINE_CATCH_UP_INTERVAL: Duration = Duration::from_secs(1);

async fn catch_up_timeline_periodically(store: PgAudit) {
    let mut interval = tokio::time::interval(TIMELINE_CATCH_UP_INTERVAL);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Warned once per outage, not every second of it.
    let mut failing = false;
    loop {
        interval.tick().await;
        match store.catch_up_timeline().await {
            Ok(_) if failing => {
                failing = false;
                tracing::info!("counting the audit chart's rollup again");
            }
            Ok(_) => {}
            Err(error) if !failing => {
                failing = true;
                tracing::warn!(%error, "could not count new audit rows into the chart's rollup; the chart counts them itself meanwhile");
            }
            Err(_) => {}
        }
    }
}

async fn seal_periodically(store: PgAudit, sealer: Sealer) {
    let sealed_by = format!("credbroker pid {}", std::process::id());
    let mut interval = tokio::time::interval(sealer.interval);
    loop {
        interval.tick().await;
        // Catch up in checkpoints of bounded size; stop when there is nothing (more) to seal
        // or another replica holds the seal lock.
        loop {
            match store.seal_next(&sealer.key, &sealed_by, audit::checkpoints::DEFAULT_ROWS_PER_CHECKPOINT).await {
                Ok(Some(sealed)) if sealed.rows as i64 == audit::checkpoints::DEFAULT_ROWS_PER_CHECKPOINT => continue,
                Ok(_) => break,
                Err(error) => {
                    tracing::error!(%error, "could not seal audit rows; will retry");
                    break;
                }
            }
        }
    }
}

async fn shutdown_signal() {
    let interrupt = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        if let Ok(mut signal) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            signal.recv().await;
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = interrupt => {},
        () = terminate => {},
    }
}

