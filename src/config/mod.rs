//! One TOML file, top-level scalars overridable by `CREDBROKER_<KEY>` environment variables.
//! Every error names the file (or variable) and the key, so a broken deploy says what to fix.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use jsonwebtoken::Algorithm;
use secrecy::SecretString;
use serde::Deserialize;
use url::Url;

use crate::types::{BackendName, IssuerName, GOGS_ISSUER_NAME};
use vault::VaultConfig;

#[derive(Debug, thiserror::Error)]
#[error("{source_name}: {}{message}", key.as_ref().map(|k| format!("key `{k}`: ")).unwrap_or_default())]
pub struct ConfigError {
    pub source_name: String,
    pub key: Option<String>,
    pub message: String,
}

impl ConfigError {
    pub fn new(source_name: impl Into<String>, key: impl Into<String>, message: impl Into<String>) -> Self {
        Self { source_name: source_name.into(), key: Some(key.into()), message: message.into() }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Json,
    Text,
}

#[derive(Debug)]
pub struct Config {
    /// The file this came from, for error messages.
    pub source: PathBuf,
    /// Relative paths in the file resolve against the file's own directory.
    pub base_dir: PathBuf,
    pub listen: SocketAddr,
    /// The broker's own issuer URL, without a trailing slash.
    pub public_url: String,
    pub audience: String,
    pub database_url: SecretString,
    pub policy_dir: PathBuf,
    pub clock_skew_seconds: u64,
    pub request_timeout_seconds: u64,
    pub database_max_connections: u32,
    pub database_acquire_timeout_seconds: u64,
    pub unattributed_denials_per_minute: u32,
    pub jwks_max_age_seconds: u64,
    pub jwks_min_refetch_seconds: u64,
    pub max_uses_per_token: u32,
    /// Proxies whose `X-Forwarded-For` names the client (`trusted_proxies`); nobody else's counts.
    pub trusted_proxies: Vec<crate::types::IpNetwork>,
    /// `[tls]`: the listener speaks TLS with these files (read at startup and on SIGHUP).
    pub tls: Option<TlsConfig>,
    /// Plain HTTP on a non-loopback `listen` is refused unless this says a TLS-terminating
    /// proxy sits in front.
    pub allow_plaintext: bool,
    /// Where `GET /metrics` is served instead of on `listen`, to keep it off the public port.
    pub metrics_listen: Option<SocketAddr>,
    pub log_format: LogFormat,
    pub audit_writer: AuditWriterConfig,
    pub revocation_poll_seconds: u64,
    /// The key checkpoints of the audit log are signed with (PEM, RSA or EC P-256); without
    /// it nothing is sealed and `audit verify` has nothing to check.
    pub audit_seal_key_file: Option<PathBuf>,
    /// How often a replica tries to seal new audit rows.
    pub audit_seal_interval_seconds: u64,
    /// `serve` applies migrations at start; false when it runs as `credbroker_broker`, which
    /// may not create tables (migrate with `credbroker migrate` as the owner instead).
    pub migrate_on_start: bool,
    /// `revocation_secret_key = { file = ".." }` (or `env`, `vault_kv`): the AES-256 key that
    /// seals secrets a revocation needs (a Looker session token); parsed at startup by
    /// `revocation::secret_encryption::RevocationKey::load` (it may need the Vault connection).
    pub revocation_secret_key: Option<toml::Value>,
    pub issuers: Vec<IssuerConfig>,
    /// Each backend's table is parsed by the backend itself (`backend::build`).
    pub backends: Vec<(BackendName, toml::Table)>,
    /// The broker's own Vault connection, for Vault-backed backends and signing.
    pub vault: Option<VaultConfig>,
    /// `[gogs]`, parsed at startup by `gogs::GogsConfig::parse` (it needs the Vault connection).
    pub gogs: Option<toml::Table>,
    /// `[audit_page]`, parsed at startup by `GitLinks::parse`: where the `/audit` page links a
    /// record's commit, pipeline and user on the Git server.
    pub audit_page: Option<toml::Table>,
    /// `[events]`, the event stream's Kafka sink and publisher, parsed at startup by
    /// `events::kafka::EventsConfig::parse` (its password may come from Vault).
    pub events: Option<toml::Table>,
    pub dev: Option<DevConfig>,
}

/// `[tls]`, paths resolved against the configuration file's directory.
#[derive(Debug, Clone)]
pub struct TlsConfig {
    /// PEM certificate chain, leaf first.
    pub cert_file: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key_file: PathBuf,
    /// PEM CA certificates; when set, every connection must present a client certificate
    /// they issued (mTLS).
    pub client_ca_file: Option<PathBuf>,
}

#[derive(Debug, Clone)]
pub struct IssuerConfig {
    pub name: IssuerName,
    /// The exact `iss` value tokens carry.
    pub issuer: String,
    pub jwks_uri: Option<Url>,
    /// Restricts accepted algorithms further than what the issuer's keys declare.
    pub algorithms: Option<Vec<Algorithm>>,
    /// Tokens without `nbf` are refused (GitLab always sends it); false for identity providers
    /// that omit it, whose `nbf` is then still checked when present.
    pub require_nbf: bool,
}

/// How decisions reach Postgres (see `audit::group_commit`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuditWriterConfig {
    /// Queue decisions and commit them in batches; false writes one INSERT per request.
    pub group_commit: bool,
    /// Writer tasks, each committing one batch at a time on its own connection.
    pub writers: u32,
    /// Most rows in one INSERT.
    pub batch_max: u32,
    /// How long a writer waits for a batch to fill once it has one row; zero writes at once.
    pub batch_wait: std::time::Duration,
    /// Decisions waiting for a writer; beyond it new exchanges get `rate_limited`.
    pub queue_capacity: u32,
}

#[derive(Debug, Clone)]
pub struct DevConfig {
    pub state_dir: PathBuf,
}

#[derive(Clone, Copy)]
enum ScalarType {
    Text,
    Integer,
    Boolean,
}

/// Keys the environment may override, with the type of their value.
/// Overrides `[vault] address` when the file has a `[vault]` table.
const VAULT_ADDRESS_VARIABLE: &str = "CREDBROKER_VAULT_ADDRESS";

const SCALAR_KEYS: &[(&str, ScalarType)] = &[
    ("listen", ScalarType::Text),
    ("public_url", ScalarType::Text),
    ("audience", ScalarType::Text),
    ("database_url", ScalarType::Text),
    ("policy_dir", ScalarType::Text),
    ("clock_skew_seconds", ScalarType::Integer),
    ("request_timeout_seconds", ScalarType::Integer),
    ("database_max_connections", ScalarType::Integer),
    ("database_acquire_timeout_seconds", ScalarType::Integer),
    ("unattributed_denials_per_minute", ScalarType::Integer),
    ("jwks_max_age_seconds", ScalarType::Integer),
    ("jwks_min_refetch_seconds", ScalarType::Integer),
    ("max_uses_per_token", ScalarType::Integer),
    ("log_format", ScalarType::Text),
    ("audit_group_commit", ScalarType::Boolean),
    ("audit_writers", ScalarType::Integer),
    ("audit_batch_max", ScalarType::Integer),
    ("audit_batch_wait_micros", ScalarType::Integer),
    ("audit_queue_capacity", ScalarType::Integer),
    ("revocation_poll_seconds", ScalarType::Integer),
    ("audit_seal_key_file", ScalarType::Text),
    ("audit_seal_interval_seconds", ScalarType::Integer),
    ("migrate_on_start", ScalarType::Boolean),
    ("allow_plaintext", ScalarType::Boolean),
    ("metrics_listen", ScalarType::Text),
];

/// The name a dev-mode issuer is registered under; reserved so no real config can claim it.
pub const DEV_ISSUER_NAME: &str = "dev";
pub const MAX_CLOCK_SKEW_SECONDS: u64 = 60;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    listen: String,
    public_url: String,
    audience: String,
    database_url: String,
    policy_dir: PathBuf,
    #[serde(default = "defaults::clock_skew_seconds")]
    clock_skew_seconds: u64,
    #[serde(default = "defaults::request_timeout_seconds")]
    request_timeout_seconds: u64,
    #[serde(default = "defaults::database_max_connections")]
    database_max_connections: u32,
    #[serde(default = "defaults::database_acquire_timeout_seconds")]
    database_acquire_timeout_seconds: u64,
    #[serde(default = "defaults::unattributed_denials_per_minute")]
    unattributed_denials_per_minute: u32,
    #[serde(default = "defaults::jwks_max_age_seconds")]
    jwks_max_age_seconds: u64,
    #[serde(default = "defaults::jwks_min_refetch_seconds")]
    jwks_min_refetch_seconds: u64,
    #[serde(default = "defaults::max_uses_per_token")]
    max_uses_per_token: u32,
    #[serde(default)]
    trusted_proxies: Vec<String>,
    #[serde(default)]
    allow_plaintext: bool,
    metrics_listen: Option<String>,
    tls: Option<RawTls>,
    #[serde(default = "defaults::log_format")]
    log_format: LogFormat,
    #[serde(default = "defaults::audit_group_commit")]
    audit_group_commit: bool,
    #[serde(default = "defaults::audit_writers")]
    audit_writers: u32,
    #[serde(default = "defaults::audit_batch_max")]
    audit_batch_max: u32,
    #[serde(default)]
    audit_batch_wait_micros: u64,
    #[serde(default = "defaults::audit_queue_capacity")]
    audit_queue_capacity: u32,
    #[serde(default = "defaults::revocation_poll_seconds")]
    revocation_poll_seconds: u64,
    audit_seal_key_file: Option<PathBuf>,
    #[serde(default = "defaults::audit_seal_interval_seconds")]
    audit_seal_interval_seconds: u64,
    #[serde(default = "defaults::migrate_on_start")]
    migrate_on_start: bool,
    revocation_secret_key: Option<toml::Value>,
    #[serde(default)]
    issuers: Vec<RawIssuer>,
    #[serde(default)]
    backends: toml::Table,
    vault: Option<toml::Table>,
    gogs: Option<toml::Table>,
    audit_page: Option<toml::Table>,
    events: Option<toml::Table>,
    dev: Option<RawDev>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawIssuer {
    name: String,
    issuer: String,
    jwks_uri: Option<String>,
    algorithms: Option<Vec<String>>,
    #[serde(default = "defaults::require_nbf")]
    require_nbf: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    cert_file: PathBuf,
    key_file: PathBuf,
    client_ca_file: Option<PathBuf>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDev {
    state_dir: Option<PathBuf>,
}

pub mod vault;

mod defaults {
    use super::LogFormat;
    pub fn clock_skew_seconds() -> u64 {
        30
    }
    pub fn request_timeout_seconds() -> u64 {
        30
    }
    pub fn database_max_connections() -> u32 {
        16
    }
    pub fn database_acquire_timeout_seconds() -> u64 {
        3
    }
    pub fn unattributed_denials_per_minute() -> u32 {
        60
    }
    pub fn jwks_max_age_seconds() -> u64 {
        900
    }
    pub fn jwks_min_refetch_seconds() -> u64 {
        30
    }
    pub fn require_nbf() -> bool {
        true
    }
    pub fn max_uses_per_token() -> u32 {
        1
    }
    pub fn log_format() -> LogFormat {
        LogFormat::Json
    }
    pub fn audit_group_commit() -> bool {
        true
    }
    // One: the next batch gathers while it commits, and a lone exchange still runs at once
    // beside it (`GroupCommit::submit`). A second writer halved every batch, and Postgres'
    // cost per statement outweighed the commit it overlapped (bench/README.md, 2026-12-05
    // sixth session: about 20% more issuances a second at 16 connections, 8% at 64).
    pub fn audit_writers() -> u32 {
        1
    }
    pub fn audit_batch_max() -> u32 {
        256
    }
    /// How often each replica looks for due revocations (it is also woken at once by
    /// on-demand and undelivered revocations).
    pub fn revocation_poll_seconds() -> u64 {
        5
    }
    pub fn migrate_on_start() -> bool {
        true
    }
    pub fn audit_seal_interval_seconds() -> u64 {
        30
    }
    pub fn audit_queue_capacity() -> u32 {
        4096
    }
}

impl Config {
    /// Every issuer name a policy or the `/audit` page may refer to, the reserved ones included.
    pub fn issuer_names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.issuers.iter().map(|issuer| issuer.name.as_str()).collect();
        if self.gogs.is_some() {
            names.push(GOGS_ISSUER_NAME);
        }
        if self.dev.is_some() {
            names.push(DEV_ISSUER_NAME);
        }
        names
    }

    /// Reads the file and applies `CREDBROKER_<KEY>` overrides (and `CREDBROKER_VAULT_ADDRESS`
    /// for `[vault] address`) from the process environment.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError { source_name: path.display().to_string(), key: None, message: format!("cannot read: {e}") })?;
        Self::parse(&text, path, std::env::vars())
    }

    pub fn parse(
        text: &str,
        path: &Path,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let file = path.display().to_string();
        let mut table: toml::Table = text
            .parse()
            .map_err(|e: toml::de::Error| ConfigError { source_name: file.clone(), key: None, message: e.to_string() })?;
        let env: std::collections::HashMap<String, String> = env.into_iter().collect();
        for (key, scalar_type) in SCALAR_KEYS {
            let variable = format!("CREDBROKER_{}", key.to_uppercase());
            let Some(value) = env.get(&variable) else { continue };
            let invalid = |expected: &str| ConfigError::new(format!("environment variable {variable}"), *key, expected);
            let value = match scalar_type {
                ScalarType::Text => toml::Value::String(value.clone()),
                ScalarType::Integer => {
                    toml::Value::Integer(value.trim().parse().map_err(|_| invalid("must be an integer"))?)
                }
                ScalarType::Boolean => {
                    toml::Value::Boolean(value.trim().parse().map_err(|_| invalid("must be true or false"))?)
                }
            };
            table.insert((*key).to_owned(), value);
        }
        // The one nested key that differs between otherwise identical deployments (a compose
        // network's service name versus loopback).
        if let (Some(address), Some(toml::Value::Table(vault))) = (env.get(VAULT_ADDRESS_VARIABLE), table.get_mut("vault")) {
            vault.insert("address".into(), toml::Value::String(address.clone()));
        }
        let raw: RawConfig = table
            .try_into()
            .map_err(|e: toml::de::Error| ConfigError { source_name: file.clone(), key: None, message: e.message().trim().to_owned() })?;
        let base_dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
        Self::validate(raw, &file, path, base_dir)
    }

    fn validate(raw: RawConfig, file: &str, path: &Path, base_dir: PathBuf) -> Result<Self, ConfigError> {
        let err = |key: &str, message: String| ConfigError::new(file, key, message);
        let listen = raw
            .listen
            .parse()
            .map_err(|_| err("listen", format!("{:?} is not an address like 127.0.0.1:8080", raw.listen)))?;
        let public_url = parse_http_url(&raw.public_url).map_err(|m| err("public_url", m))?;
        if raw.audience.trim().is_empty() {
            return Err(err("audience", "must not be empty".into()));
        }
        if !raw.database_url.starts_with("postgres://") && !raw.database_url.starts_with("postgresql://") {
            return Err(err("database_url", "must be a postgres:// URL".into()));
        }
        if raw.clock_skew_seconds > MAX_CLOCK_SKEW_SECONDS {
            return Err(err("clock_skew_seconds", format!("at most {MAX_CLOCK_SKEW_SECONDS} seconds")));
        }
        for (key, value) in [
            ("request_timeout_seconds", raw.request_timeout_seconds),
            ("database_acquire_timeout_seconds", raw.database_acquire_timeout_seconds),
            ("jwks_max_age_seconds", raw.jwks_max_age_seconds),
            ("jwks_min_refetch_seconds", raw.jwks_min_refetch_seconds),
            ("database_max_connections", u64::from(raw.database_max_connections)),
            ("unattributed_denials_per_minute", u64::from(raw.unattributed_denials_per_minute)),
            ("max_uses_per_token", u64::from(raw.max_uses_per_token)),
            ("audit_writers", u64::from(raw.audit_writers)),
            ("audit_batch_max", u64::from(raw.audit_batch_max)),
            ("audit_queue_capacity", u64::from(raw.audit_queue_capacity)),
            ("revocation_poll_seconds", raw.revocation_poll_seconds),
            ("audit_seal_interval_seconds", raw.audit_seal_interval_seconds),
        ] {
            if value == 0 {
                return Err(err(key, "must be greater than zero".into()));
            }
        }
        if raw.audit_writers > raw.database_max_connections {
            return Err(err(
                "audit_writers",
                format!(
                    "at most database_max_connections ({}): each writer holds a pooled connection while it commits",
                    raw.database_max_connections
                ),
            ));
        }
        if raw.audit_batch_wait_micros > 100_000 {
            return Err(err("audit_batch_wait_micros", "at most 100000 (0.1 s): every exchange waits this long at worst".into()));
        }
        let audit_writer = AuditWriterConfig {
            group_commit: raw.audit_group_commit,
            writers: raw.audit_writers,
            batch_max: raw.audit_batch_max,
            batch_wait: std::time::Duration::from_micros(raw.audit_batch_wait_micros),
            queue_capacity: raw.audit_queue_capacity,
        };
        let mut issuers: Vec<IssuerConfig> = Vec::new();
        for (index, issuer) in raw.issuers.into_iter().enumerate() {
            let key = |field: &str| format!("issuers[{index}].{field}");
            let name = IssuerName::parse(&issuer.name).map_err(|m| err(&key("name"), m))?;
            if name.as_str() == DEV_ISSUER_NAME {
                return Err(err(&key("name"), format!("{DEV_ISSUER_NAME:?} is reserved for `serve --dev`")));
            }
            if issuers.iter().any(|other| other.name == name) {
                return Err(err(&key("name"), format!("issuer {name} is declared twice")));
            }
            parse_http_url(&issuer.issuer).map_err(|m| err(&key("issuer"), m))?;
            if issuers.iter().any(|other| other.issuer == issuer.issuer) {
                return Err(err(&key("issuer"), format!("{} is declared twice", issuer.issuer)));
            }
            let jwks_uri = issuer
                .jwks_uri
                .as_deref()
                .map(|raw| parse_http_url(raw).and_then(|_| Url::parse(raw).map_err(|e| e.to_string())))
                .transpose()
                .map_err(|m| err(&key("jwks_uri"), m))?;
            let algorithms = issuer
                .algorithms
                .map(|names| names.iter().map(|n| parse_asymmetric_algorithm(n)).collect::<Result<Vec<_>, _>>())
                .transpose()
                .map_err(|m| err(&key("algorithms"), m))?;
            issuers.push(IssuerConfig { name, issuer: issuer.issuer, jwks_uri, algorithms, require_nbf: issuer.require_nbf });
        }
        let mut backends = Vec::new();
        for (name, value) in raw.backends {
            let backend_name = BackendName::parse(&name).map_err(|m| err(&format!("backends.{name}"), m))?;
            let toml::Value::Table(table) = value else {
                return Err(err(&format!("backends.{name}"), "must be a table".into()));
            };
            backends.push((backend_name, table));
        }
        let vault = raw.vault.map(|table| VaultConfig::parse(&table, file, &base_dir, raw.dev.is_some())).transpose()?;
        let trusted_proxies = raw
            .trusted_proxies
            .iter()
            .map(|network| crate::types::IpNetwork::parse(network))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|message| err("trusted_proxies", message))?;
        let metrics_listen = raw
            .metrics_listen
            .map(|address| address.parse().map_err(|_| err("metrics_listen", format!("{address:?} is not an address like 127.0.0.1:9090"))))
            .transpose()?;
        let tls = raw.tls.map(|tls| TlsConfig {
            cert_file: base_dir.join(tls.cert_file),
            key_file: base_dir.join(tls.key_file),
            client_ca_file: tls.client_ca_file.map(|file| base_dir.join(file)),
        });
        let dev = raw.dev.map(|dev| DevConfig {
            state_dir: base_dir.join(dev.state_dir.unwrap_or_else(|| PathBuf::from(".credbroker-dev"))),
        });
        Ok(Config {
            source: path.to_path_buf(),
            listen,
            public_url,
            audience: raw.audience,
            database_url: SecretString::from(raw.database_url),
            policy_dir: base_dir.join(raw.policy_dir),
            clock_skew_seconds: raw.clock_skew_seconds,
            request_timeout_seconds: raw.request_timeout_seconds,
            database_max_connections: raw.database_max_connections,
            database_acquire_timeout_seconds: raw.database_acquire_timeout_seconds,
            unattributed_denials_per_minute: raw.unattributed_denials_per_minute,
            jwks_max_age_seconds: raw.jwks_max_age_seconds,
            jwks_min_refetch_seconds: raw.jwks_min_refetch_seconds,
            max_uses_per_token: raw.max_uses_per_token,
            trusted_proxies,
            tls,
            allow_plaintext: raw.allow_plaintext,
            metrics_listen,
            log_format: raw.log_format,
            audit_writer,
            revocation_poll_seconds: raw.revocation_poll_seconds,
            audit_seal_key_file: raw.audit_seal_key_file.map(|file| base_dir.join(file)),
            audit_seal_interval_seconds: raw.audit_seal_interval_seconds,
            migrate_on_start: raw.migrate_on_start,
            revocation_secret_key: raw.revocation_secret_key,
            issuers,
            backends,
            vault,
            gogs: raw.gogs,
            audit_page: raw.audit_page,
            events: raw.events,
            dev,
            base_dir,
        })
    }

    pub fn source_name(&self) -> String {
        self.source.display().to_string()
    }

    /// Resolves a path from the file relative to the file's directory.
    pub fn resolve(&self, path: &Path) -> PathBuf {
        self.base_dir.join(path)
    }
}

/// Issuer and public URLs must be https, except on loopback where tests and dev mode live.
pub fn parse_http_url(raw: &str) -> Result<String, String> {
    let url = Url::parse(raw).map_err(|e| format!("{raw:?} is not a URL: {e}"))?;
    let loopback = matches!(url.host_str(), Some("127.0.0.1" | "localhost" | "[::1]" | "::1"));
    match url.scheme() {
        "https" => {}
        "http" if loopback => {}
        _ => return Err(format!("{raw:?} must be an https URL (plain http is allowed only on loopback)")),
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(format!("{raw:?} must not carry a query or fragment"));
    }
    Ok(raw.trim_end_matches('/').to_owned())
}

/// Job tokens are signed by the issuer's private key; a shared-secret or unsigned algorithm
/// would let anyone holding the public key (or nothing) forge them.
pub fn parse_asymmetric_algorithm(name: &str) -> Result<Algorithm, String> {
    let algorithm: Algorithm = name.parse().map_err(|_| format!("unknown algorithm {name:?}"))?;
    if matches!(algorithm, Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512) {
        return Err(format!("{name} is a shared-secret algorithm; only asymmetric algorithms are accepted"));
    }
    Ok(algorithm)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
        listen = "127.0.0.1:8080"
        public_url = "http://127.0.0.1:8080/"
        audience = "credbroker"
        database_url = "postgres://localhost/credbroker"
        policy_dir = "policies"

        [[issuers]]
        name = "gitlab"
        issuer = "https://gitlab.example.com"

        [backends.kafka]
        type = "kafka_oauthbearer"
        audience = "kafka-prod"
        signing_key_file = "keys/kafka.pem"
    "#;

    fn parse(text: &str, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let env = env.iter().map(|(k, v)| (k.to_string(), v.to_string()));
        Config::parse(text, Path::new("/etc/credbroker/credbroker.toml"), env)
    }

    #[test]
    fn minimal_contract_shape_loads_with_documented_defaults() {
        let config = parse(MINIMAL, &[]).unwrap();
        assert_eq!(config.public_url, "http://127.0.0.1:8080");
        assert_eq!(config.policy_dir, Path::new("/etc/credbroker/policies"));
        assert_eq!(config.clock_skew_seconds, 30);
        assert_eq!(config.max_uses_per_token, 1);
        assert_eq!(config.issuers[0].name.as_str(), "gitlab");
        assert_eq!(config.backends[0].0.as_str(), "kafka");
        assert!(config.dev.is_none());
    }

    #[test]
    fn environment_overrides_top_level_scalars() {
        let config = parse(
            MINIMAL,
            &[("CREDBROKER_DATABASE_URL", "postgres://other/db"), ("CREDBROKER_CLOCK_SKEW_SECONDS", "10")],
        )
        .unwrap();
        use secrecy::ExposeSecret;
        assert_eq!(config.database_url.expose_secret(), "postgres://other/db");
        assert_eq!(config.clock_skew_seconds, 10);
    }

    #[test]
    fn environment_overrides_the_vault_address_only_where_there_is_a_vault() {
        let with_vault = format!("{MINIMAL}\n[vault]\naddress = \"http://127.0.0.1:8200\"\n[vault.approle]\nrole_id = \"r\"\nsecret_id_env = \"S\"\n");
        let override_address = [("CREDBROKER_VAULT_ADDRESS", "https://vault.internal:8200")];
        let config = parse(&with_vault, &override_address).unwrap();
        assert_eq!(config.vault.unwrap().address, "https://vault.internal:8200");
        // Plain http beyond loopback only in a dev configuration (docker-compose.yml's OpenBao).
        let compose = [("CREDBROKER_VAULT_ADDRESS", "http://openbao:8200")];
        let error = parse(&with_vault, &compose).unwrap_err().to_string();
        assert!(error.contains("vault.address") && error.contains("https"), "{error}");
        let dev = format!("{with_vault}\n[dev]\n");
        assert_eq!(parse(&dev, &compose).unwrap().vault.unwrap().address, "http://openbao:8200");
        assert!(parse(MINIMAL, &override_address).unwrap().vault.is_none(), "no [vault] table is made up");
    }

    #[test]
    fn bad_environment_override_names_the_variable() {
        let error = parse(MINIMAL, &[("CREDBROKER_CLOCK_SKEW_SECONDS", "soon")]).unwrap_err().to_string();
        assert!(error.contains("CREDBROKER_CLOCK_SKEW_SECONDS"), "{error}");
    }

    #[test]
    fn errors_name_the_file_and_key() {
        let cases = [
            (MINIMAL.replace("127.0.0.1:8080\"\n", "nowhere\"\n"), "listen"),
            (MINIMAL.replace("https://gitlab.example.com", "http://gitlab.example.com"), "issuers[0].issuer"),
            (MINIMAL.replace("name = \"gitlab\"", "name = \"dev\""), "issuers[0].name"),
            (format!("clock_skew_seconds = 120\n{MINIMAL}"), "clock_skew_seconds"),
            (MINIMAL.replace("issuer = \"https://gitlab.example.com\"", "issuer = \"https://gitlab.example.com\"\nalgorithms = [\"HS256\"]"), "issuers[0].algorithms"),
        ];
        for (text, key) in cases {
            let error = parse(&text, &[]).unwrap_err().to_string();
            assert!(error.starts_with("/etc/credbroker/credbroker.toml"), "{error}");
            assert!(error.contains(&format!("`{key}`")), "expected key {key} in: {error}");
        }
    }

    #[test]
    fn unknown_and_missing_keys_are_rejected() {
        let error = parse(&format!("colour = \"blue\"\n{MINIMAL}"), &[]).unwrap_err().to_string();
        assert!(error.contains("colour"), "{error}");
        let error = parse(&MINIMAL.replace("audience = \"credbroker\"", ""), &[]).unwrap_err().to_string();
        assert!(error.contains("audience"), "{error}");
    }
}
