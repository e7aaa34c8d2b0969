//! Root material for backends that mint from a long-lived secret (a Looker admin API key, a
//! Snowflake service user's private key): read from a file, an environment variable, or a
//! Vault KV secret (a v2 mount by default, or v1 with `kv_version = 1`). The broker uses these to mint short-lived credentials; it never hands
//! one to a job (the `vault_kv` backend kind exists only to refuse that at load).
//!
//! In a backend's table:
//! ```toml
//! admin_client_secret = { file = "/run/secrets/looker" }
//! admin_client_secret = { env = "LOOKER_CLIENT_SECRET" }
//! admin_client_secret = { vault_kv = "credbroker/looker/admin", key = "client_secret", mount = "secret", cache_seconds = 300 }
//! admin_client_secret = { vault_kv = "credbroker/looker/admin", key = "client_secret", mount = "kv", kv_version = 1 }
//! ```

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use rustify::enums::RequestMethod;
use secrecy::SecretString;

use super::Vault;
use crate::config::ConfigError;

#[derive(Debug, Clone, thiserror::Error)]
#[error("secret {source_description}: {message}")]
pub struct SecretSourceError {
    pub source_description: String,
    pub message: String,
}

#[async_trait]
pub trait SecretSource: Send + Sync {
    /// The current value (possibly cached).
    async fn read(&self) -> Result<SecretString, SecretSourceError>;
    /// Drops any cached value so the next read fetches it again: call it when the target
    /// rejected the secret (it was probably rotated).
    fn invalidate(&self) {}
    /// Where the secret comes from, for errors and logs (never the value).
    fn describe(&self) -> String;
}

pub struct FileSecret(pub PathBuf);
pub struct EnvSecret(pub String);

#[async_trait]
impl SecretSource for FileSecret {
    async fn read(&self) -> Result<SecretString, SecretSourceError> {
        let text = tokio::fs::read_to_string(&self.0).await.map_err(|e| failure(self, e.to_string()))?;
        non_empty(text.trim_end_matches(['\r', '\n']).to_owned()).ok_or_else(|| failure(self, "is empty"))
    }

    fn describe(&self) -> String {
        format!("file {}", self.0.display())
    }
}

#[async_trait]
impl SecretSource for EnvSecret {
    async fn read(&self) -> Result<SecretString, SecretSourceError> {
        let value = std::env::var(&self.0).map_err(|_| failure(self, "is not set"))?;
        non_empty(value).ok_or_else(|| failure(self, "is empty"))
    }

    fn describe(&self) -> String {
        format!("environment variable {}", self.0)
    }
}

/// The two KV engines answer on different paths with differently nested data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvVersion {
    /// `GET {mount}/{path}` → `data[key]`; no versions.
    V1,
    /// `GET {mount}/data/{path}` → `data.data[key]`, `data.metadata.version`.
    V2,
}

/// One key of a KV secret, cached for `cache_for`. A new KV v2 version seen on re-read is
/// logged as a rotation.
pub struct VaultKvSecret {
    vault: Vault,
    kv_version: KvVersion,
    mount: String,
    path: String,
    key: String,
    cache_for: Duration,
    cached: Mutex<Option<Cached>>,
}

struct Cached {
    value: SecretString,
    version: Option<u64>,
    fetched_at: Instant,
}

impl VaultKvSecret {
    pub fn new(vault: Vault, kv_version: KvVersion, mount: &str, path: &str, key: &str, cache_for: Duration) -> Self {
        Self {
            vault,
            kv_version,
            mount: mount.trim_matches('/').to_owned(),
            path: path.trim_matches('/').to_owned(),
            key: key.to_owned(),
            cache_for,
            cached: Mutex::new(None),
        }
    }

    /// The KV version of the value last read, if any.
    pub fn cached_version(&self) -> Option<u64> {
        self.cached.lock().expect("cache lock").as_ref().and_then(|cached| cached.version)
    }
}

#[async_trait]
impl SecretSource for VaultKvSecret {
    async fn read(&self) -> Result<SecretString, SecretSourceError> {
        if let Some(cached) = self.cached.lock().expect("cache lock").as_ref() {
            if cached.fetched_at.elapsed() < self.cache_for {
                return Ok(cached.value.clone());
            }
        }
        let path = match self.kv_version {
            KvVersion::V1 => format!("{}/{}", self.mount, self.path),
            KvVersion::V2 => format!("{}/data/{}", self.mount, self.path),
        };
        let envelope = self.vault.request(RequestMethod::GET, &path, None).await.map_err(|e| failure(self, e.to_string()))?;
        let data = envelope.data.unwrap_or_default();
        let fields = match self.kv_version {
            KvVersion::V1 => &data,
            KvVersion::V2 => &data["data"],
        };
        let value = fields[&self.key]
            .as_str()
            .map(str::to_owned)
            .and_then(non_empty)
            .ok_or_else(|| failure(self, format!("has no non-empty string field {:?} (deleted, or a different key?)", self.key)))?;
        let version = data["metadata"]["version"].as_u64();
        let mut cached = self.cached.lock().expect("cache lock");
        let previous = cached.as_ref().and_then(|c| c.version);
        if previous.is_some() && previous != version {
            tracing::info!(secret = self.describe(), ?previous, ?version, "KV secret rotated; using the new version");
        }
        *cached = Some(Cached { value: value.clone(), version, fetched_at: Instant::now() });
        Ok(value)
    }

    fn invalidate(&self) {
        *self.cached.lock().expect("cache lock") = None;
    }

    fn describe(&self) -> String {
        format!("vault kv {}/{}#{}", self.mount, self.path, self.key)
    }
}

fn failure(source: &impl SecretSource, message: impl Into<String>) -> SecretSourceError {
    SecretSourceError { source_description: source.describe(), message: message.into() }
}

fn non_empty(value: String) -> Option<SecretString> {
    (!value.trim().is_empty()).then(|| SecretString::from(value))
}

const DEFAULT_KV_MOUNT: &str = "secret";
const DEFAULT_CACHE_SECONDS: i64 = 300;

/// Parses a secret-source table (see the module docs). `key` names the backend key for
/// errors, e.g. `backends.looker.admin_client_secret`; `base_dir` resolves relative files.
pub fn parse(
    value: &toml::Value,
    source_name: &str,
    key: &str,
    base_dir: &std::path::Path,
    vault: Option<&Vault>,
) -> Result<Arc<dyn SecretSource>, ConfigError> {
    let error = |suffix: &str, message: String| {
        let key = if suffix.is_empty() { key.to_owned() } else { format!("{key}.{suffix}") };
        ConfigError::new(source_name, key, message)
    };
    let shape = "must be a table: { file = \"...\" }, { env = \"...\" } or { vault_kv = \"path\", key = \"field\" }";
    let toml::Value::Table(table) = value else { return Err(error("", shape.into())) };
    let string = |name: &str| match table.get(name) {
        None => Ok(None),
        Some(toml::Value::String(value)) if !value.trim().is_empty() => Ok(Some(value.clone())),
        Some(_) => Err(error(name, "must be a non-empty string".into())),
    };
    let allow_only = |known: &[&str]| match table.keys().find(|k| !known.contains(&k.as_str())) {
        Some(unknown) => Err(error(unknown, format!("unknown key; expected one of {known:?}"))),
        None => Ok(()),
    };
    if let Some(path) = string("file")? {
        allow_only(&["file"])?;
        return Ok(Arc::new(FileSecret(base_dir.join(path))));
    }
    if let Some(name) = string("env")? {
        allow_only(&["env"])?;
        return Ok(Arc::new(EnvSecret(name)));
    }
    if let Some(path) = string("vault_kv")? {
        allow_only(&["vault_kv", "key", "mount", "kv_version", "cache_seconds"])?;
        let field = string("key")?.ok_or_else(|| error("key", "is required: the field of the KV secret to use".into()))?;
        let mount = string("mount")?.unwrap_or_else(|| DEFAULT_KV_MOUNT.into());
        let cache_seconds = match table.get("cache_seconds") {
            None => DEFAULT_CACHE_SECONDS,
            Some(toml::Value::Integer(seconds)) if *seconds >= 0 => *seconds,
            Some(_) => return Err(error("cache_seconds", "must be a whole number of seconds (0 = read every time)".into())),
        };
        let kv_version = match table.get("kv_version") {
            None | Some(toml::Value::Integer(2)) => KvVersion::V2,
            Some(toml::Value::Integer(1)) => KvVersion::V1,
            Some(_) => return Err(error("kv_version", "must be 1 or 2 (the KV engine version of the mount; default 2)".into())),
        };
        let vault = vault.ok_or_else(|| error("vault_kv", "needs a [vault] section to reach Vault".into()))?;
        return Ok(Arc::new(VaultKvSecret::new(vault.clone(), kv_version, &mount, &path, &field, Duration::from_secs(cache_seconds as u64))));
    }
    Err(error("", shape.into()))
}
