//! `[gogs]` and `[gogs.hooks.<name>]`: parsed once at startup, every error naming the key.
//!
//! ```toml
//! [gogs]
//! signing_key_file = "keys/gogs.pem"   # signs delivery tokens; published in the JWKS
//! # or, instead: signing = { vault_transit = "credbroker-gogs", mount = "transit" }
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

use crate::signing::{LocalSigner, Signer, SigningKey};
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
        let known = ["signing_key_file", "signing", "token_lifetime", "max_payload_bytes", "forward_timeout_seconds", "hooks"];
        if let Some(unknown) = table.keys().find(|k| !known.contains(&k.as_str())) {
            return Err(error(unknown, format!("unknown key; expected one of {known:?}")));
        }
        if config.issuers.iter().any(|issuer| issuer.name.as_str() == super::GOGS_ISSUER_NAME) {
            return Err(ConfigError::new(&file, "issuers", "the issuer name \"gogs\" is reserved for Gogs delivery tokens when [gogs] is configured"));
        }
        let token_lifetime = match table.get("token_lifetime") {
            None => Ttl::from_seconds(DEFAULT_TOKEN_LIFETIME_SECONDS).expect("default is valid"),
            Some(toml::Value::String(raw)) => Ttl::parse(raw).map_err(|m| error("token_lifetime", m))?,
            Some(toml::Value::Integer(seconds)) if *seconds > 0 => Ttl::from_seconds(*seconds as u64).map_err(|m| error("token_lifetime", m))?,
            Some(_) => return Err(error("token_lifetime", "must be a duration like \"15m\" or a number of seconds".into())),
        };
        let signer: Arc<dyn Signer> = match (table.get("signing_key_file"), table.get("signing")) {
            (Some(_), Some(_)) => return Err(error("signing", "set either signing_key_file or signing, not both".into())),
            (None, None) => {
                return Err(error(
                    "signing_key_file",
                    "is required: the PEM key that signs delivery tokens (or signing = { vault_transit = \"<key>\" })".into(),
                ))
            }
            (Some(toml::Value::String(path)), None) if !path.trim().is_empty() => {
                let key_file = config.resolve(&PathBuf::from(path));
                let may_generate = dev_state_dir.is_some_and(|dir| key_file.starts_with(dir));
                let current = SigningKey::load_or_generate(&key_file, may_generate).map_err(|e| error("signing_key_file", e.to_string()))?;
                Arc::new(LocalSigner { current, retired: Vec::new() })
            }
            (Some(_), None) => return Err(error("signing_key_file", "must be a path".into())),
            (None, Some(signing)) => {
                // A rotated-out version stays published while a token it signed can still be
                // presented: the token's lifetime plus the verifier's leeway.
                let retain_for = std::time::Duration::from_secs(u64::from(token_lifetime.seconds()) + config.clock_skew_seconds);
                crate::vault::transit::signer_from_config(signing, vault, retain_for, &|key, message| error(key, message.to_owned()))?
            }
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
            signer,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_gogs(gogs: &str) -> Result<GogsConfig, ConfigError> {
        let text = format!(
            "listen = \"127.0.0.1:0\"\npublic_url = \"http://127.0.0.1:1\"\naudience = \"credbroker\"\n\
             database_url = \"postgres://127.0.0.1:1/none\"\npolicy_dir = \"policies\"\n\
             [gogs]\n{gogs}\n[gogs.hooks.warehouse]\nsecret = {{ env = \"GOGS_HOOK_SECRET\" }}\nrepositories = [\"data/warehouse\"]\n"
        );
        let config = Config::parse(&text, Path::new("/etc/credbroker/credbroker.toml"), std::iter::empty()).unwrap();
        GogsConfig::parse(config.gogs.as_ref().unwrap(), &config, None, None)
    }

    fn error_of(gogs: &str) -> String {
        match parse_gogs(gogs) {
            Ok(_) => panic!("{gogs:?} was accepted"),
            Err(error) => error.to_string(),
        }
    }

    #[test]
    fn exactly_one_signing_source_and_errors_name_the_key() {
        let cases = [
            ("token_lifetime = \"15m\"", "gogs.signing_key_file", "or signing = { vault_transit"),
            ("signing_key_file = \"k.pem\"\nsigning = { vault_transit = \"credbroker-gogs\" }", "gogs.signing", "not both"),
            ("signing_key_file = 7", "gogs.signing_key_file", "must be a path"),
            ("signing = \"credbroker-gogs\"", "gogs.signing", "must be a table"),
            ("signing = { vault_transit = \"credbroker-gogs\" }", "gogs.signing.vault_transit", "needs a [vault] section"),
            ("signing = { mount = \"transit\" }", "gogs.signing.vault_transit", "is required"),
            ("signing = { vault_transit = \"a/b\" }", "gogs.signing.vault_transit", "without '/'"),
            ("signing = { vault_transit = \"k\", colour = \"blue\" }", "gogs.signing.colour", "unknown key"),
            ("signing = { vault_transit = \"k\", refresh_seconds = 0 }", "gogs.signing.refresh_seconds", "from 1 to 3600"),
        ];
        for (gogs, key, message) in cases {
            let error = error_of(gogs);
            assert!(error.contains(&format!("key `{key}`")), "{gogs:?}: expected key {key} in: {error}");
            assert!(error.contains(message), "{gogs:?}: expected {message:?} in: {error}");
        }
    }
}
