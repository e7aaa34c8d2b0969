//! `[gogs]` and `[gogs.hooks.<name>]`: parsed once at startup, every error naming the key.
//!
//! ```toml
//! [gogs]
//! signing_key_file = "keys/gogs.pem"   # signs delivery tokens; published in the JWKS
//! token_lifetime = "15m"               # default 15m
//! max_payload_bytes = 1048576          # default 1 MiB
//! forward_timeout_seconds = 10         # default 10
//!
//! [gogs.hooks.warehouse]
//! secret = { env = "GOGS_HOOK_SECRET" }          # or { file = "..." } / { vault_kv = ... }
//! repositories = ["data/warehouse", "data/*"]
//! forward_url = "https://loader.internal/gogs"   # optional: POST delivery + token there
//! respond_with_token = false                     # optional: token in the webhook response
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::backend::signing::{LocalSigner, Signer, SigningKey};
use crate::config::{Config, ConfigError};
use crate::policy::Glob;
use crate::types::Ttl;
use crate::vault::secret_source::{self, SecretSource};
use crate::vault::Vault;

const DEFAULT_TOKEN_LIFETIME_SECONDS: u64 = 15 * 60;
const DEFAULT_MAX_PAYLOAD_BYTES: i64 = 1024 * 1024;
const MAX_MAX_PAYLOAD_BYTES: i64 = 25 * 1024 * 1024;
const DEFAULT_FORWARD_TIMEOUT_SECONDS: i64 = 10;

pub struct GogsConfig {
    pub hooks: BTreeMap<String, HookConfig>,
    pub token_lifetime: Ttl,
    pub max_payload_bytes: usize,
    pub forward_timeout_seconds: u64,
    pub signer: Arc<dyn Signer>,
}

pub struct HookConfig {
    pub secret: Arc<dyn SecretSource>,
    pub repositories: Vec<Glob>,
    pub forward_url: Option<url::Url>,
    pub respond_with_token: bool,
}

impl GogsConfig {
    /// `dev_state_dir`: in dev mode a missing signing key inside it is generated.
    pub fn parse(table: &toml::Table, config: &Config, vault: Option<&Vault>, dev_state_dir: Option<&Path>) -> Result<Self, ConfigError> {
        let file = config.source_name();
        let error = |key: &str, message: String| ConfigError::new(&file, format!("gogs.{key}"), message);
        let known = ["signing_key_file", "token_lifetime", "max_payload_bytes", "forward_timeout_seconds", "hooks"];
        if let Some(unknown) = table.keys().find(|k| !known.contains(&k.as_str())) {
            return Err(error(unknown, format!("unknown key; expected one of {known:?}")));
        }
        if config.issuers.iter().any(|issuer| issuer.name.as_str() == super::GOGS_ISSUER_NAME) {
            return Err(ConfigError::new(&file, "issuers", "the issuer name \"gogs\" is reserved for Gogs delivery tokens when [gogs] is configured"));
        }
        let key_file = match table.get("signing_key_file") {
            Some(toml::Value::String(path)) if !path.trim().is_empty() => config.resolve(&PathBuf::from(path)),
            Some(_) => return Err(error("signing_key_file", "must be a path".into())),
            None => return Err(error("signing_key_file", "is required: the PEM key that signs delivery tokens".into())),
        };
        let may_generate = dev_state_dir.is_some_and(|dir| key_file.starts_with(dir));
        let current = SigningKey::load_or_generate(&key_file, may_generate).map_err(|e| error("signing_key_file", e.to_string()))?;
        let token_lifetime = match table.get("token_lifetime") {
            None => Ttl::from_seconds(DEFAULT_TOKEN_LIFETIME_SECONDS).expect("default is valid"),
            Some(toml::Value::String(raw)) => Ttl::parse(raw).map_err(|m| error("token_lifetime", m))?,
            Some(toml::Value::Integer(seconds)) if *seconds > 0 => Ttl::from_seconds(*seconds as u64).map_err(|m| error("token_lifetime", m))?,
            Some(_) => return Err(error("token_lifetime", "must be a duration like \"15m\" or a number of seconds".into())),
        };
        let integer = |key: &str, default: i64, range: std::ops::RangeInclusive<i64>| match table.get(key) {
            None => Ok(default),
            Some(toml::Value::Integer(value)) if range.contains(value) => Ok(*value),
            Some(_) => Err(error(key, format!("must be an integer from {} to {}", range.start(), range.end()))),
        };
        let max_payload_bytes = integer("max_payload_bytes", DEFAULT_MAX_PAYLOAD_BYTES, 1024..=MAX_MAX_PAYLOAD_BYTES)? as usize;
        let forward_timeout_seconds = integer("forward_timeout_seconds", DEFAULT_FORWARD_TIMEOUT_SECONDS, 1..=60)? as u64;

        let mut hooks = BTreeMap::new();
        let raw_hooks = match table.get("hooks") {
            Some(toml::Value::Table(hooks)) if !hooks.is_empty() => hooks,
            _ => return Err(error("hooks", "at least one [gogs.hooks.<name>] table is required".into())),
        };
        for (name, value) in raw_hooks {
            let key = |field: &str| format!("hooks.{name}.{field}");
            if name.is_empty() || name.len() > 64 || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') {
                return Err(error(&format!("hooks.{name}"), "hook names are letters, digits, '-' and '_' (they appear in the URL)".into()));
            }
            let toml::Value::Table(hook) = value else {
                return Err(error(&format!("hooks.{name}"), "must be a table".into()));
            };
            let known = ["secret", "repositories", "forward_url", "respond_with_token"];
            if let Some(unknown) = hook.keys().find(|k| !known.contains(&k.as_str())) {
                return Err(error(&key(unknown), format!("unknown key; expected one of {known:?}")));
            }
            let secret_value = hook.get("secret").ok_or_else(|| error(&key("secret"), "is required: { file = \"...\" } or { env = \"...\" }".into()))?;
            let secret = secret_source::parse(secret_value, &file, &format!("gogs.{}", key("secret")), &config.base_dir, vault)?;
            let repositories = match hook.get("repositories") {
                Some(toml::Value::Array(items)) if !items.is_empty() => items
                    .iter()
                    .map(|item| {
                        let pattern = item.as_str().ok_or_else(|| "must list \"owner/name\" patterns".to_owned())?;
                        let glob = Glob::parse(pattern)?;
                        if glob.has_literal() { Ok(glob) } else { Err(format!("{pattern:?} is only wildcards: name the owner at least")) }
                    })
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|m| error(&key("repositories"), m))?,
                _ => return Err(error(&key("repositories"), "is required: a non-empty list of \"owner/name\" patterns".into())),
            };
            let forward_url = match hook.get("forward_url") {
                None => None,
                Some(toml::Value::String(raw)) => {
                    crate::config::parse_http_url(raw).map_err(|m| error(&key("forward_url"), m))?;
                    Some(url::Url::parse(raw).map_err(|e| error(&key("forward_url"), e.to_string()))?)
                }
                Some(_) => return Err(error(&key("forward_url"), "must be a URL".into())),
            };
            let respond_with_token = match hook.get("respond_with_token") {
                None => false,
                Some(toml::Value::Boolean(flag)) => *flag,
                Some(_) => return Err(error(&key("respond_with_token"), "must be true or false".into())),
            };
            hooks.insert(name.clone(), HookConfig { secret, repositories, forward_url, respond_with_token });
        }
        Ok(Self {
            hooks,
            token_lifetime,
            max_payload_bytes,
            forward_timeout_seconds,
            signer: Arc::new(LocalSigner { current, retired: Vec::new() }),
        })
    }
}
