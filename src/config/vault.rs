//! The `[vault]` section: where Vault is and how the broker proves who it is. Parsed once at
//! load; every error names the file and the key. Credentials are never in the file itself,
//! only where to find them (a file or an environment variable), and are read at each login
//! so a rotated secret-id file or a re-projected service-account token is picked up.

use std::path::PathBuf;
use std::time::Duration;

use secrecy::SecretString;

use url::Url;

use crate::config::{parse_http_url, ConfigError};

#[derive(Debug, Clone)]
pub struct VaultConfig {
    /// `https://vault.internal:8200`, without `/v1`.
    pub address: String,
    /// PEM bundle of the CA that signed Vault's certificate, when it is not a public CA.
    pub ca_file: Option<PathBuf>,
    /// Vault Enterprise namespace (`X-Vault-Namespace`).
    pub namespace: Option<String>,
    pub request_timeout: Duration,
    pub auth: VaultAuth,
}

#[derive(Debug, Clone)]
pub enum VaultAuth {
    AppRole { mount: String, role_id: SecretInput, secret_id: SecretInput },
    Kubernetes { mount: String, role: String, token_file: PathBuf },
    Jwt { mount: String, role: String, token_file: PathBuf },
    /// A pre-issued token: development only, unless `allow_outside_dev`.
    Token { token: SecretInput, allow_outside_dev: bool },
}

impl VaultAuth {
    pub fn method(&self) -> &'static str {
        match self {
            VaultAuth::AppRole { .. } => "approle",
            VaultAuth::Kubernetes { .. } => "kubernetes",
            VaultAuth::Jwt { .. } => "jwt",
            VaultAuth::Token { .. } => "token",
        }
    }
}

/// Where a login credential comes from.
#[derive(Debug, Clone)]
pub enum SecretInput {
    /// Only for values that are identifiers rather than secrets (an AppRole role_id).
    Literal(String),
    File(PathBuf),
    Env(String),
}

impl SecretInput {
    /// Reads the value now; files are re-read on every call.
    pub fn read(&self) -> Result<SecretString, String> {
        let value = match self {
            SecretInput::Literal(value) => value.clone(),
            SecretInput::File(path) => {
                std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?
            }
            SecretInput::Env(name) => {
                std::env::var(name).map_err(|_| format!("environment variable {name} is not set"))?
            }
        };
        let value = value.trim();
        if value.is_empty() {
            return Err(format!("{} is empty", self.describe()));
        }
        Ok(SecretString::from(value.to_owned()))
    }

    pub fn describe(&self) -> String {
        match self {
            SecretInput::Literal(_) => "the configured value".into(),
            SecretInput::File(path) => path.display().to_string(),
            SecretInput::Env(name) => format!("${name}"),
        }
    }
}

const METHODS: &[&str] = &["approle", "kubernetes", "jwt", "token"];
const DEFAULT_KUBERNETES_TOKEN_FILE: &str = "/var/run/secrets/kubernetes.io/serviceaccount/token";
const DEFAULT_REQUEST_TIMEOUT_SECONDS: u64 = 10;

impl VaultConfig {
    /// `base_dir` resolves relative paths against the configuration file's directory. A dev
    /// configuration (`[dev]`, usable only with `serve --dev`) may reach Vault over plain http
    /// on any host: the dev OpenBao of docker-compose.yml is another container.
    pub fn parse(table: &toml::Table, source_name: &str, base_dir: &std::path::Path, dev: bool) -> Result<Self, ConfigError> {
        let section = Section { table, source_name, prefix: "vault".into() };
        section.reject_unknown(&["address", "ca_file", "namespace", "request_timeout_seconds", "approle", "kubernetes", "jwt", "token"])?;
        let address = section.required_string("address")?;
        let address = match Url::parse(&address) {
            Ok(url) if dev && url.scheme() == "http" => address.trim_end_matches('/').to_owned(),
            _ => parse_http_url(&address).map_err(|m| section.error("address", m))?,
        };
        let ca_file = section.string("ca_file")?.map(|path| base_dir.join(path));
        let namespace = section.string("namespace")?.filter(|ns| !ns.trim().is_empty());
        let request_timeout = match table.get("request_timeout_seconds") {
            None => Duration::from_secs(DEFAULT_REQUEST_TIMEOUT_SECONDS),
            Some(toml::Value::Integer(seconds)) if (1..=300).contains(seconds) => Duration::from_secs(*seconds as u64),
            Some(_) => return Err(section.error("request_timeout_seconds", "must be an integer from 1 to 300")),
        };

        let present: Vec<&str> = METHODS.iter().copied().filter(|method| table.contains_key(*method)).collect();
        let method = match present.as_slice() {
            [one] => *one,
            [] => {
                return Err(section.error(
                    "approle",
                    format!("one auth method is required: a [vault.<method>] table, one of {METHODS:?}"),
                ))
            }
            many => return Err(section.error(many[1], format!("only one auth method may be configured, found {many:?}"))),
        };
        let auth_table = match table.get(method) {
            Some(toml::Value::Table(inner)) => inner,
            _ => return Err(section.error(method, "must be a table")),
        };
        let auth = Section { table: auth_table, source_name, prefix: format!("vault.{method}") };
        let mount = |default: &str| -> Result<String, ConfigError> {
            let mount = auth.string("mount")?.unwrap_or_else(|| default.to_owned());
            let mount = mount.trim_matches('/').to_owned();
            if mount.is_empty() {
                return Err(auth.error("mount", "must not be empty"));
            }
            Ok(mount)
        };
        let auth = match method {
            "approle" => {
                auth.reject_unknown(&["mount", "role_id", "role_id_file", "role_id_env", "secret_id_file", "secret_id_env"])?;
                let role_id = auth.input(&[("role_id", InputKind::Literal), ("role_id_file", InputKind::File), ("role_id_env", InputKind::Env)], base_dir)?;
                let secret_id = auth.input(&[("secret_id_file", InputKind::File), ("secret_id_env", InputKind::Env)], base_dir)?;
                VaultAuth::AppRole { mount: mount("approle")?, role_id, secret_id }
            }
            "kubernetes" => {
                auth.reject_unknown(&["mount", "role", "token_file"])?;
                let token_file = auth.string("token_file")?.unwrap_or_else(|| DEFAULT_KUBERNETES_TOKEN_FILE.to_owned());
                VaultAuth::Kubernetes { mount: mount("kubernetes")?, role: auth.required_string("role")?, token_file: base_dir.join(token_file) }
            }
            "jwt" => {
                auth.reject_unknown(&["mount", "role", "token_file"])?;
                VaultAuth::Jwt {
                    mount: mount("jwt")?,
                    role: auth.required_string("role")?,
                    token_file: base_dir.join(auth.required_string("token_file")?),
                }
            }
            _ => {
                auth.reject_unknown(&["token_file", "token_env", "allow_outside_dev"])?;
                let token = auth.input(&[("token_file", InputKind::File), ("token_env", InputKind::Env)], base_dir)?;
                let allow_outside_dev = match auth_table.get("allow_outside_dev") {
                    None => false,
                    Some(toml::Value::Boolean(flag)) => *flag,
                    Some(_) => return Err(auth.error("allow_outside_dev", "must be true or false")),
                };
                VaultAuth::Token { token, allow_outside_dev }
            }
        };
        Ok(Self { address, ca_file, namespace, request_timeout, auth })
    }
}

impl VaultConfig {
    /// A static token is for development: outside `serve --dev` it needs the explicit
    /// `allow_outside_dev = true`, because nothing renews or replaces it once it expires.
    pub fn check_auth_allowed(&self, dev: bool) -> Result<(), String> {
        match self.auth {
            VaultAuth::Token { allow_outside_dev: false, .. } if !dev => Err(
                "a static Vault token is for `serve --dev` only; use approle, kubernetes or jwt, \
                 or set allow_outside_dev = true if you really mean it"
                    .into(),
            ),
            _ => Ok(()),
        }
    }
}

#[derive(Clone, Copy)]
enum InputKind {
    Literal,
    File,
    Env,
}

struct Section<'a> {
    table: &'a toml::Table,
    source_name: &'a str,
    prefix: String,
}

impl Section<'_> {
    fn error(&self, key: &str, message: impl Into<String>) -> ConfigError {
        ConfigError::new(self.source_name, format!("{}.{key}", self.prefix), message)
    }

    fn reject_unknown(&self, known: &[&str]) -> Result<(), ConfigError> {
        match self.table.keys().find(|key| !known.contains(&key.as_str())) {
            Some(key) => Err(self.error(key, format!("unknown key; expected one of {known:?}"))),
            None => Ok(()),
        }
    }

    fn string(&self, key: &str) -> Result<Option<String>, ConfigError> {
        match self.table.get(key) {
            None => Ok(None),
            Some(toml::Value::String(value)) => Ok(Some(value.clone())),
            Some(_) => Err(self.error(key, "must be a string")),
        }
    }

    fn required_string(&self, key: &str) -> Result<String, ConfigError> {
        self.string(key)?.filter(|value| !value.trim().is_empty()).ok_or_else(|| self.error(key, "is required"))
    }

    /// Exactly one of the alternative keys.
    fn input(&self, choices: &[(&str, InputKind)], base_dir: &std::path::Path) -> Result<SecretInput, ConfigError> {
        let names: Vec<&str> = choices.iter().map(|(name, _)| *name).collect();
        let mut found = None;
        for (name, kind) in choices {
            if let Some(value) = self.string(name)? {
                if found.is_some() {
                    return Err(self.error(name, format!("set only one of {names:?}")));
                }
                found = Some(match kind {
                    InputKind::Literal => SecretInput::Literal(value),
                    InputKind::File => SecretInput::File(base_dir.join(value)),
                    InputKind::Env => SecretInput::Env(value),
                });
            }
        }
        found.ok_or_else(|| self.error(names[0], format!("one of {names:?} is required")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<VaultConfig, String> {
        let table: toml::Table = text.parse().unwrap();
        VaultConfig::parse(&table, "/etc/credbroker.toml", std::path::Path::new("/etc"), false).map_err(|e| e.to_string())
    }

    #[test]
    fn approle_with_files_and_defaults() {
        let config = parse(
            r#"
            address = "https://vault.example.com:8200/"
            [approle]
            role_id = "0b9a-role"
            secret_id_file = "secrets/vault-secret-id"
            "#,
        )
        .unwrap();
        assert_eq!(config.address, "https://vault.example.com:8200");
        assert_eq!(config.request_timeout, Duration::from_secs(10));
        let VaultAuth::AppRole { mount, role_id, secret_id } = config.auth else { panic!("approle expected") };
        assert_eq!(mount, "approle");
        assert!(matches!(role_id, SecretInput::Literal(ref id) if id == "0b9a-role"));
        assert!(matches!(secret_id, SecretInput::File(ref path) if path == std::path::Path::new("/etc/secrets/vault-secret-id")));
    }

    #[test]
    fn errors_name_the_key() {
        let cases = [
            ("address = \"http://vault.example.com\"\n[approle]\nrole_id=\"r\"\nsecret_id_env=\"S\"", "vault.address"),
            ("address = \"https://v\"", "vault.approle"),
            ("address = \"https://v\"\n[approle]\nrole_id=\"r\"", "vault.approle.secret_id_file"),
            ("address = \"https://v\"\n[approle]\nrole_id=\"r\"\nsecret_id=\"inline\"", "vault.approle.secret_id"),
            ("address = \"https://v\"\n[approle]\nrole_id=\"r\"\nsecret_id_env=\"S\"\n[token]\ntoken_env=\"T\"", "vault.token"),
            ("address = \"https://v\"\n[kubernetes]\ntoken_file=\"t\"", "vault.kubernetes.role"),
            ("address = \"https://v\"\ncolour = 1\n[jwt]\nrole=\"r\"\ntoken_file=\"t\"", "vault.colour"),
            ("address = \"https://v\"\n[token]\ntoken_env=\"T\"\nallow_outside_dev=\"yes\"", "vault.token.allow_outside_dev"),
        ];
        for (text, key) in cases {
            let error = parse(text).unwrap_err();
            assert!(error.starts_with("/etc/credbroker.toml: key `"), "{error}");
            assert!(error.contains(&format!("`{key}`")), "expected {key} in {error}");
        }
    }

    #[test]
    fn secret_inputs_read_files_and_environment_at_call_time() {
        let dir = std::env::temp_dir().join(format!("credbroker-vault-config-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("secret-id");
        std::fs::write(&file, "first\n").unwrap();
        let input = SecretInput::File(file.clone());
        use secrecy::ExposeSecret;
        assert_eq!(input.read().unwrap().expose_secret(), "first");
        std::fs::write(&file, "rotated").unwrap();
        assert_eq!(input.read().unwrap().expose_secret(), "rotated");
        std::fs::write(&file, "  \n").unwrap();
        assert!(input.read().unwrap_err().contains("empty"));
        assert!(SecretInput::Env("CREDBROKER_TEST_SURELY_UNSET".into()).read().unwrap_err().contains("not set"));
        let _ = std::fs::remove_dir_all(dir);
    }
}
