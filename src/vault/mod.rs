//! The broker's own Vault identity, shared by every Vault-backed backend: one `vaultrs` client,
//! one login (AppRole, Kubernetes, JWT or a dev token), renewed before it expires and replaced
//! by a fresh login when renewal fails. Calls `vaultrs` has no typed function for (leases, or
//! responses whose `lease_id` `vaultrs` strips) go through the same client and middleware as a
//! raw endpoint, so the token, namespace and TLS settings are identical on every path.

pub mod secret_source;
pub mod transit;

use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::{Duration, Instant};

use rustify::endpoint::Endpoint;
use rustify::enums::{RequestMethod, RequestType, ResponseType};
use secrecy::ExposeSecret;
use serde::Deserialize;
use serde_json::Value;
use time::OffsetDateTime;
use vaultrs::api::EndpointMiddleware;
use vaultrs::client::{Client, VaultClient, VaultClientSettings, VaultClientSettingsBuilder};

pub use crate::config::vault::{SecretInput, VaultAuth, VaultConfig};

#[derive(Debug, Clone, thiserror::Error)]
pub enum VaultError {
    #[error("Vault at {address} is unreachable: {message}")]
    Unreachable { address: String, message: String },
    /// Vault answered with an error status; `errors` is Vault's own `{"errors": [...]}`.
    #[error("Vault answered {status} to {operation}: {}", describe_errors(*status, errors))]
    Api { operation: String, status: u16, errors: Vec<String> },
    #[error("Vault login ({method}) failed: {message}")]
    Login { method: &'static str, message: String },
    #[error("unexpected answer from Vault to {operation}: {message}")]
    Malformed { operation: String, message: String },
}

fn describe_errors(status: u16, errors: &[String]) -> String {
    if errors.is_empty() {
        return match status {
            403 => "permission denied".into(),
            404 => "not found".into(),
            503 => "unavailable (sealed or in maintenance)".into(),
            _ => "no error message".into(),
        };
    }
    errors.join("; ")
}

impl VaultError {
    fn is_permission_denied(&self) -> bool {
        matches!(self, VaultError::Api { status: 403, .. })
    }
}

/// Vault's response envelope (every logical response carries it). Fields default so a
/// response without `data` or `auth` (renew, revoke) parses too.
#[derive(Debug, Default, Deserialize)]
pub struct Envelope {
    #[serde(default)]
    pub request_id: String,
    #[serde(default)]
    pub lease_id: String,
    #[serde(default)]
    pub lease_duration: u64,
    #[serde(default)]
    pub renewable: bool,
    #[serde(default)]
    pub data: Option<Value>,
    #[serde(default)]
    pub warnings: Option<Vec<String>>,
}

/// A lease's state after a renewal.
#[derive(Debug, Clone, Copy)]
pub struct Lease {
    pub duration: Duration,
    pub renewable: bool,
}

#[derive(Clone)]
pub struct Vault {
    inner: Arc<Inner>,
}

struct Inner {
    config: VaultConfig,
    /// The client without a token; logins derive authenticated clients from it, sharing its
    /// connection pool and TLS settings.
    base: VaultClient,
    client: RwLock<Arc<VaultClient>>,
    session: Mutex<Session>,
    /// One login at a time: concurrent requests that find the token dead wait for the same login.
    login: tokio::sync::Mutex<()>,
}

#[derive(Debug, Clone)]
struct Session {
    state: SessionState,
    /// Counts logins, so requests that all found the token too short log in once between them.
    generation: u64,
    logged_in_at: Instant,
    /// When the current token was obtained or last renewed, and the TTL Vault gave it then.
    refreshed_at: Instant,
    ttl: Duration,
    /// The TTL of the first login: a renewal that grants much less means the token is
    /// reaching its max TTL and a fresh login is due.
    login_ttl: Duration,
    renewable: bool,
    /// A periodic token (`token_period`) has no max TTL: it lives as long as it is renewed.
    periodic: bool,
    /// When the token dies whatever the broker does (its max TTL), once Vault has said so by
    /// granting a renewal less than was asked for, or by an explicit max TTL.
    dies_at: Option<Instant>,
    /// The latest end of a lease this token created: renewals keep the token alive until
    /// then, so the leases outlive a broker that stops renewing.
    leases_until: Option<Instant>,
    consecutive_failures: u32,
}

#[derive(Debug, Clone, PartialEq)]
enum SessionState {
    Unauthenticated(String),
    Authenticated,
}

impl Session {
    fn new(state: SessionState) -> Self {
        let now = Instant::now();
        Self {
            state,
            generation: 0,
            logged_in_at: now,
            refreshed_at: now,
            ttl: Duration::ZERO,
            login_ttl: Duration::ZERO,
            renewable: false,
            periodic: false,
            dies_at: None,
            leases_until: None,
            consecutive_failures: 0,
        }
    }

    fn expires_at(&self) -> Instant {
        self.refreshed_at + self.ttl
    }

    /// A token that never expires (a dev root token) or lives for as long as it is renewed.
    fn outlives_any_lease(&self) -> bool {
        self.ttl.is_zero() || (self.periodic && self.dies_at.is_none())
    }

    /// A token with a TTL of 0 never expires (root tokens in dev).
    fn usable(&self) -> bool {
        self.state == SessionState::Authenticated && (self.ttl.is_zero() || Instant::now() < self.expires_at())
    }
}

/// What `/readyz` reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Health {
    Ready,
    Unreachable(String),
    Unauthenticated(String),
}

impl Vault {
    /// Builds the client; nothing is contacted until [`Vault::start`] or the first request.
    pub fn new(config: VaultConfig) -> Result<Self, VaultError> {
        let base = build_client(&config)?;
        let unauthenticated = with_token(&base, "");
        Ok(Self {
            inner: Arc::new(Inner {
                config,
                base,
                client: RwLock::new(Arc::new(unauthenticated)),
                session: Mutex::new(Session::new(SessionState::Unauthenticated("not logged in yet".into()))),
                login: tokio::sync::Mutex::new(()),
            }),
        })
    }

    pub fn config(&self) -> &VaultConfig {
        &self.inner.config
    }

    /// Logs in (a failure is logged, not fatal: Vault may come up after the broker, and
    /// `/readyz` says so meanwhile) and keeps the token alive in the background.
    pub async fn start(&self) {
        if let Err(error) = self.login().await {
            tracing::warn!(%error, "Vault login at startup failed; retrying in the background");
        }
        tokio::spawn(maintain_token(Arc::downgrade(&self.inner)));
    }

    /// Authenticates with the configured method and installs the new token.
    #[tracing::instrument(skip(self), fields(method = self.inner.config.auth.method()))]
    pub async fn login(&self) -> Result<(), VaultError> {
        let _guard = self.inner.login.lock().await;
        self.login_locked().await
    }

    async fn login_locked(&self) -> Result<(), VaultError> {
        let result = match self.login_now().await {
            Ok((ttl, renewable)) => {
                // Without lookup-self the token is taken as non-periodic: its grants are then
                // bounded by its max TTL as renewals reveal it, which is safe, only shorter.
                let (periodic, explicit_max) = self.lookup_lifetime().await.unwrap_or_else(|error| {
                    tracing::warn!(%error, "cannot look up the broker's own Vault token (grant it auth/token/lookup-self); treating it as not periodic");
                    (false, None)
                });
                Ok((ttl, renewable, periodic, explicit_max))
            }
            Err(error) => Err(error),
        };
        let mut session = self.inner.session.lock().expect("session lock");
        match &result {
            Ok((token_ttl, renewable, periodic, explicit_max)) => {
                let now = Instant::now();
                *session = Session {
                    state: SessionState::Authenticated,
                    generation: session.generation + 1,
                    logged_in_at: now,
                    refreshed_at: now,
                    ttl: *token_ttl,
                    login_ttl: *token_ttl,
                    renewable: *renewable,
                    periodic: *periodic,
                    dies_at: explicit_max.map(|max| now + max),
                    leases_until: None,
                    consecutive_failures: 0,
                };
                tracing::info!(ttl_seconds = token_ttl.as_secs(), renewable, periodic, "logged in to Vault");
            }
            Err(error) => {
                session.state = SessionState::Unauthenticated(error.to_string());
                session.consecutive_failures += 1;
            }
        }
        result.map(|_| ())
    }

    async fn login_now(&self) -> Result<(Duration, bool), VaultError> {
        let config = &self.inner.config;
        let method = config.auth.method();
        let read = |input: &SecretInput| input.read().map_err(|message| VaultError::Login { method, message });
        let file = |path: &std::path::Path| {
            read(&SecretInput::File(path.to_path_buf()))
        };
        let base = &self.inner.base;
        let auth = match &config.auth {
            VaultAuth::AppRole { mount, role_id, secret_id } => {
                let (role_id, secret_id) = (read(role_id)?, read(secret_id)?);
                vaultrs::auth::approle::login(base, mount, role_id.expose_secret(), secret_id.expose_secret()).await
            }
            VaultAuth::Kubernetes { mount, role, token_file } => {
                let jwt = file(token_file)?;
                vaultrs::auth::kubernetes::login(base, mount, role, jwt.expose_secret()).await
            }
            VaultAuth::Jwt { mount, role, token_file } => {
                let jwt = file(token_file)?;
                vaultrs::auth::oidc::login(base, mount, jwt.expose_secret(), Some(role.clone())).await
            }
            VaultAuth::Token { token, .. } => {
                let token = read(token)?;
                let client = with_token(base, token.expose_secret());
                let lookup = vaultrs::token::lookup_self(&client).await.map_err(|e| login_error(method, &config.address, e))?;
                *self.inner.client.write().expect("client lock") = Arc::new(client);
                return Ok((Duration::from_secs(lookup.ttl), lookup.renewable));
            }
        }
        .map_err(|e| login_error(method, &config.address, e))?;
        *self.inner.client.write().expect("client lock") = Arc::new(with_token(base, &auth.client_token));
        Ok((Duration::from_secs(auth.lease_duration), auth.renewable))
    }

    /// Whether the new token is periodic, and its explicit max TTL (`auth/token/lookup-self`;
    /// `vaultrs`'s typed lookup drops `period`).
    async fn lookup_lifetime(&self) -> Result<(bool, Option<Duration>), VaultError> {
        let lookup = self.send(&self.current_client(), RequestMethod::GET, "auth/token/lookup-self", None).await?;
        let data = lookup.data.unwrap_or_default();
        let seconds = |field: &str| data.get(field).and_then(Value::as_u64).unwrap_or(0);
        Ok((seconds("period") > 0, Some(seconds("explicit_max_ttl")).filter(|&s| s > 0).map(Duration::from_secs)))
    }

    /// Renews the broker's own token (`auth/token/renew-self`) for `increment`, or for the
    /// login TTL; Vault grants less once the token nears its max TTL, and that is remembered
    /// as the token's end.
    async fn renew_token(&self, increment: Option<Duration>) -> Result<Duration, VaultError> {
        let client = self.current_client();
        let asked = increment.map(|i| format!("{}s", i.as_secs()));
        let auth = vaultrs::token::renew_self(client.as_ref(), asked.as_deref())
            .await
            .map_err(|e| map_client_error("auth/token/renew-self", &self.inner.config.address, e))?;
        let granted = Duration::from_secs(auth.lease_duration);
        let mut session = self.inner.session.lock().expect("session lock");
        let now = Instant::now();
        session.refreshed_at = now;
        session.ttl = granted;
        session.renewable = auth.renewable;
        session.consecutive_failures = 0;
        if increment.is_some_and(|asked| granted < asked) && !session.periodic {
            session.dies_at = Some(now + granted);
        }
        tracing::debug!(ttl_seconds = auth.lease_duration, "renewed the Vault token");
        Ok(granted)
    }

    /// A client whose token lives until `until`, and, when no token can, when the one
    /// returned dies. Vault revokes every lease a token created when the token expires or is
    /// revoked, so whatever this token creates must end by then. A token about to die is
    /// renewed for as long as needed; one that cannot live that long is replaced by a fresh
    /// login when that gains enough (never more than about twice per max TTL).
    async fn client_lasting_until(&self, until: OffsetDateTime) -> Result<(Arc<VaultClient>, Option<OffsetDateTime>), VaultError> {
        let mut logged_in_again = false;
        loop {
            let client = self.client().await?;
            let session = self.session();
            let now = Instant::now();
            let wanted = Duration::from_secs((until - OffsetDateTime::now_utc()).whole_seconds().max(1) as u64);
            let lasting = |session: &Session| {
                session.outlives_any_lease() || (session.expires_at() >= now + wanted && session.dies_at.is_none_or(|end| end >= now + wanted))
            };
            if lasting(&session) {
                return Ok((client, None));
            }
            let dies_at = match session.dies_at {
                Some(end) if end < now + wanted => end,
                _ if session.renewable => match self.renew_token(Some(wanted)).await {
                    Ok(granted) if granted >= wanted || self.session().outlives_any_lease() => return Ok((client, None)),
                    Ok(granted) => now + granted,
                    // Revoked, or expired early: the next round logs in again.
                    Err(error) if error.is_permission_denied() && !logged_in_again => {
                        tracing::info!("the Vault token is no longer valid; logging in again");
                        self.mark_unauthenticated("token rejected by Vault");
                        logged_in_again = true;
                        continue;
                    }
                    Err(error) => return Err(error),
                },
                _ => session.expires_at(),
            };
            let remaining = dies_at.saturating_duration_since(now);
            let fresh_life = dies_at.saturating_duration_since(session.logged_in_at);
            if !logged_in_again && (fresh_life >= wanted || remaining < fresh_life / 2) {
                let _guard = self.inner.login.lock().await;
                // Others that found the token short at the same moment log in only once.
                if self.session().generation == session.generation {
                    tracing::info!(remaining_seconds = remaining.as_secs(), "the Vault token dies before the credential would; logging in again");
                    self.login_locked().await?;
                }
                logged_in_again = true;
                continue;
            }
            tracing::warn!(
                remaining_seconds = remaining.as_secs(),
                wanted_seconds = wanted.as_secs(),
                "the broker's Vault token dies before the credential would end; the credential ends with it (raise token_max_ttl or use token_period)"
            );
            return Ok((client, Some(OffsetDateTime::now_utc() + remaining)));
        }
    }

    /// Creates a lease (`GET {path}`, e.g. `database/creds/ROLE`) with a token that lives
    /// until `until` where it can; the second value is when the lease dies with the token
    /// otherwise. Renewals then keep the token alive until the lease's end.
    #[tracing::instrument(skip(self))]
    pub async fn create_lease(&self, path: &str, until: OffsetDateTime) -> Result<(Envelope, Option<OffsetDateTime>), VaultError> {
        let (client, token_end) = self.client_lasting_until(until).await?;
        let envelope = match self.send(&client, RequestMethod::GET, path, None).await {
            Err(error) if error.is_permission_denied() && !self.token_alive(&client).await => {
                tracing::info!("the Vault token is no longer valid; logging in again");
                self.mark_unauthenticated("token rejected by Vault");
                self.login().await?;
                return Box::pin(self.create_lease(path, until)).await;
            }
            other => other?,
        };
        let lease_end = Instant::now() + Duration::from_secs((until - OffsetDateTime::now_utc()).whole_seconds().max(0) as u64);
        let mut session = self.inner.session.lock().expect("session lock");
        session.leases_until = session.leases_until.max(Some(lease_end));
        Ok((envelope, token_end))
    }

    fn current_client(&self) -> Arc<VaultClient> {
        self.inner.client.read().expect("client lock").clone()
    }

    fn session(&self) -> Session {
        self.inner.session.lock().expect("session lock").clone()
    }

    /// A client with a live token, logging in first when there is none.
    async fn client(&self) -> Result<Arc<VaultClient>, VaultError> {
        if !self.session().usable() {
            let _guard = self.inner.login.lock().await;
            // Another request may have logged in while this one waited.
            if !self.session().usable() {
                self.login_locked().await?;
            }
        }
        Ok(self.current_client())
    }

    /// One call to Vault's HTTP API (`path` without `/v1/`). A 403 whose cause is a dead
    /// token (revoked, expired early) triggers one fresh login and one retry; a 403 that
    /// persists is Vault's policy speaking and is returned as it is.
    #[tracing::instrument(skip(self, body), fields(path = %path))]
    pub async fn request(&self, method: RequestMethod, path: &str, body: Option<&Value>) -> Result<Envelope, VaultError> {
        let client = self.client().await?;
        match self.send(&client, method.clone(), path, body).await {
            Err(error) if error.is_permission_denied() && !self.token_alive(&client).await => {
                tracing::info!("the Vault token is no longer valid; logging in again");
                self.mark_unauthenticated("token rejected by Vault");
                self.login().await?;
                self.send(&self.current_client(), method, path, body).await
            }
            other => other,
        }
    }

    async fn send(&self, client: &VaultClient, method: RequestMethod, path: &str, body: Option<&Value>) -> Result<Envelope, VaultError> {
        let operation = format!("{} {path}", method_name(&method));
        let endpoint = RawEndpoint {
            method,
            path: path.to_owned(),
            body: body.map(|b| serde_json::to_vec(b).expect("JSON values serialise")),
        };
        let response = endpoint
            .with_middleware(client.middle())
            .exec(client.http())
            .await
            .map_err(|e| map_rest_error(&operation, &self.inner.config.address, e))?;
        let bytes = response.response.body();
        if bytes.is_empty() {
            return Ok(Envelope::default());
        }
        let envelope: Envelope = serde_json::from_slice(bytes)
            .map_err(|e| VaultError::Malformed { operation: operation.clone(), message: e.to_string() })?;
        if let Some(warnings) = envelope.warnings.as_ref().filter(|w| !w.is_empty()) {
            tracing::warn!(operation, ?warnings, request_id = envelope.request_id, "Vault returned warnings");
        }
        Ok(envelope)
    }

    async fn token_alive(&self, client: &VaultClient) -> bool {
        !matches!(vaultrs::token::lookup_self(client).await, Err(vaultrs::error::ClientError::APIError { code: 403, .. }))
    }

    fn mark_unauthenticated(&self, reason: &str) {
        self.inner.session.lock().expect("session lock").state = SessionState::Unauthenticated(reason.into());
    }

    /// Sets a lease to end `increment` from now (`sys/leases/renew`; Vault counts the
    /// increment from now, so this can shorten a lease). Vault may answer with a different
    /// TTL (capped by the role's max TTL) or refuse (not renewable): the caller checks.
    pub async fn renew_lease(&self, lease_id: &str, increment: Duration) -> Result<Lease, VaultError> {
        let body = serde_json::json!({ "lease_id": lease_id, "increment": increment.as_secs() });
        let envelope = self.request(RequestMethod::PUT, "sys/leases/renew", Some(&body)).await?;
        Ok(Lease { duration: Duration::from_secs(envelope.lease_duration), renewable: envelope.renewable })
    }

    /// Revokes a lease now (`sys/leases/revoke`): the database user is dropped.
    #[tracing::instrument(skip(self))]
    pub async fn revoke_lease(&self, lease_id: &str) -> Result<(), VaultError> {
        let body = serde_json::json!({ "lease_id": lease_id });
        self.request(RequestMethod::PUT, "sys/leases/revoke", Some(&body)).await.map(|_| ())
    }

    /// Reachable (`sys/health`, unauthenticated) and holding a live token. `sys/health` is
    /// answered only in the root namespace ("operation unavailable in namespaces"), so it is
    /// asked without the namespace header.
    pub async fn health(&self) -> Health {
        let mut root = with_token(&self.inner.base, "");
        root.middle.namespace = None;
        let health = self.send(&root, RequestMethod::GET, "sys/health", None).await;
        match health {
            // 429: unsealed standby, 473: performance standby: both forward or serve requests.
            Ok(_) | Err(VaultError::Api { status: 429 | 473, .. }) => {}
            Err(error @ VaultError::Unreachable { .. }) => return Health::Unreachable(error.to_string()),
            Err(VaultError::Api { status, errors, .. }) => {
                let detail = describe_errors(status, &errors);
                return Health::Unreachable(format!("Vault at {} answered {status}: {detail}", self.inner.config.address));
            }
            Err(error) => return Health::Unreachable(error.to_string()),
        }
        let session = self.session();
        match session.state {
            SessionState::Authenticated if session.usable() => Health::Ready,
            SessionState::Authenticated => Health::Unauthenticated("the Vault token expired; logging in again".into()),
            SessionState::Unauthenticated(reason) => Health::Unauthenticated(reason),
        }
    }
}

/// Renews the token at two thirds of its TTL, for at least the login TTL and until the end of
/// the last lease it created (so those leases survive a broker that stops renewing); logs in
/// again when renewal fails, when the token is not renewable, or when Vault grants less than
/// half the original TTL (the token is near its max TTL). While Vault is down, retries with a
/// capped backoff. A fresh login never revokes the old token: its leases live on until it dies.
async fn maintain_token(inner: Weak<Inner>) {
    loop {
        let Some(strong) = inner.upgrade() else { return };
        let vault = Vault { inner: strong };
        let session = vault.session();
        let wait = match session.state {
            SessionState::Authenticated if session.ttl.is_zero() => Duration::from_secs(300),
            SessionState::Authenticated => (session.refreshed_at + session.ttl * 2 / 3).saturating_duration_since(Instant::now()),
            SessionState::Unauthenticated(_) => Duration::from_secs(1 << session.consecutive_failures.min(5)),
        };
        drop(vault);
        tokio::time::sleep(wait.max(Duration::from_millis(200))).await;
        let Some(strong) = inner.upgrade() else { return };
        let vault = Vault { inner: strong };
        let session = vault.session();
        let renewed = match session.state {
            SessionState::Authenticated if session.ttl.is_zero() => continue,
            SessionState::Authenticated if session.renewable => {
                let until_leases_end = session.leases_until.map(|end| end.saturating_duration_since(Instant::now()));
                match vault.renew_token(Some(until_leases_end.unwrap_or_default().max(session.login_ttl))).await {
                    Ok(granted) => granted * 2 >= session.login_ttl,
                    Err(error) => {
                        tracing::warn!(%error, "renewing the Vault token failed; logging in again");
                        false
                    }
                }
            }
            _ => false,
        };
        if !renewed {
            if let Err(error) = vault.login().await {
                tracing::error!(%error, "Vault login failed; retrying");
            }
        }
    }
}

fn build_client(config: &VaultConfig) -> Result<VaultClient, VaultError> {
    let mut builder = VaultClientSettingsBuilder::default();
    // Every setting explicit: the builder's defaults read VAULT_* variables, and the broker's
    // identity must come from its configuration alone.
    builder
        .address(&config.address)
        .token("")
        .verify(true)
        .identity(None)
        .timeout(Some(config.request_timeout))
        .namespace(config.namespace.clone())
        .ca_certs(config.ca_file.iter().map(|path| path.display().to_string()).collect());
    let settings = builder
        .build()
        .map_err(|e| VaultError::Malformed { operation: "client settings".into(), message: e.to_string() })?;
    VaultClient::new(settings).map_err(|e| VaultError::Malformed { operation: "client setup".into(), message: e.to_string() })
}

/// A client sharing `base`'s HTTP connection pool, with `token` installed.
fn with_token(base: &VaultClient, token: &str) -> VaultClient {
    let settings = VaultClientSettings { token: token.to_owned(), ..base.settings.clone() };
    VaultClient {
        http: rustify::clients::reqwest::Client { http: base.http.http.clone(), base: base.http.base.clone() },
        middle: EndpointMiddleware { token: token.to_owned(), ..base.middle.clone() },
        settings,
    }
}

fn login_error(method: &'static str, address: &str, error: vaultrs::error::ClientError) -> VaultError {
    match map_client_error(&format!("{method} login"), address, error) {
        unreachable @ VaultError::Unreachable { .. } => unreachable,
        other => VaultError::Login { method, message: other.to_string() },
    }
}

fn map_client_error(operation: &str, address: &str, error: vaultrs::error::ClientError) -> VaultError {
    use vaultrs::error::ClientError;
    match error {
        ClientError::APIError { code, errors } => VaultError::Api { operation: operation.to_owned(), status: code, errors },
        ClientError::RestClientError { source } => map_rest_error(operation, address, source),
        other => VaultError::Malformed { operation: operation.to_owned(), message: other.to_string() },
    }
}

fn map_rest_error(operation: &str, address: &str, error: rustify::errors::ClientError) -> VaultError {
    use rustify::errors::ClientError;
    match error {
        ClientError::ServerResponseError { code, content } => {
            let errors = content
                .as_deref()
                .and_then(|body| serde_json::from_str::<vaultrs::api::EndpointError>(body).ok())
                .map(|parsed| parsed.errors)
                .unwrap_or_default();
            VaultError::Api { operation: operation.to_owned(), status: code, errors }
        }
        ClientError::RequestError { source, .. } | ClientError::ResponseError { source } => {
            VaultError::Unreachable { address: address.to_owned(), message: format!("{source:#}") }
        }
        other => VaultError::Malformed { operation: operation.to_owned(), message: other.to_string() },
    }
}

fn method_name(method: &RequestMethod) -> &'static str {
    match method {
        RequestMethod::GET => "GET",
        RequestMethod::POST => "POST",
        RequestMethod::PUT => "PUT",
        RequestMethod::DELETE => "DELETE",
        RequestMethod::LIST => "LIST",
        _ => "HEAD",
    }
}

/// A Vault call `vaultrs` has no typed endpoint for, executed through its client and
/// middleware (token, namespace, `/v1` prefix) like every typed call.
struct RawEndpoint {
    method: RequestMethod,
    path: String,
    body: Option<Vec<u8>>,
}

impl Endpoint for RawEndpoint {
    type Response = Value;
    const REQUEST_BODY_TYPE: RequestType = RequestType::JSON;
    const RESPONSE_BODY_TYPE: ResponseType = ResponseType::JSON;

    fn path(&self) -> String {
        self.path.clone()
    }

    fn method(&self) -> RequestMethod {
        self.method.clone()
    }

    fn body(&self) -> Result<Option<Vec<u8>>, rustify::errors::ClientError> {
        Ok(self.body.clone())
    }
}
