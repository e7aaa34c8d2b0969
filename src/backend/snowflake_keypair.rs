//! Snowflake key-pair JWTs: the broker holds the service users' RSA private keys (a file, an
//! environment variable or Vault KV) and signs the JWT Snowflake's key-pair authentication
//! validates, so the job never sees a private key. Minting is local: nothing half-made can
//! leak, and the JWT's `exp` is the only bound, which Snowflake caps at one hour after `iat`.
//!
//! What Snowflake checks (key-pair authentication, SQL API "Generate a JWT"): RS256;
//! `iss` = `ACCOUNT.USER.SHA256:<base64 SHA-256 of the public key's DER SubjectPublicKeyInfo>`,
//! `sub` = `ACCOUNT.USER`, both upper-cased, ACCOUNT without region or cloud segments; `iat`;
//! `exp` at most one hour after `iat`. The fingerprint must match RSA_PUBLIC_KEY or
//! RSA_PUBLIC_KEY_2 of the user, which is how keys rotate without downtime.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use base64::Engine;
use secrecy::{ExposeSecret, SecretString};
use serde::Serialize;

use crate::signing::RsaSigningKey;
use super::{table_string, Backend, BackendError, BuildContext, Credential, EnvValue, MintRequest};
use crate::config::ConfigError;
use crate::policy::{Param, ParamSchema, ParamShape, PolicyError, Role};
use crate::types::{sha256_hex, Ttl};
use crate::vault::secret_source::{self, SecretSource};

pub const PARAMS: ParamSchema = ParamSchema {
    kind: "snowflake_keypair",
    required: &["user"],
    optional: &["warehouse", "database", "schema", "role"],
    ttl_note: "broker-signed Snowflake key-pair JWT: Snowflake rejects an exp more than 1 h after iat, so the \
               TTL is capped at 1h (and never past the job deadline); it cannot be revoked early; a job running \
               longer asks again before exp",
    shapes: &[("user", ParamShape::Literal)],
    ..ParamSchema::PLAIN
};

/// Snowflake refuses key-pair JWTs whose `exp` is more than an hour after `iat`.
const SNOWFLAKE_MAX_JWT_SECONDS: u64 = 3600;

const TTL_RULE: &str = "Snowflake key-pair JWT: exp = min(granted TTL, 1 h after iat), never past the job \
                        deadline; not revocable; a longer job requests a new one";

pub struct SnowflakeKeypair {
    name: String,
    /// As configured: what connectors need to find the account (may include region segments).
    account: String,
    /// The account as it appears in `iss` and `sub`.
    account_identifier: String,
    url: String,
    max_ttl: Ttl,
    /// By upper-cased user name.
    users: BTreeMap<String, ServiceUser>,
}

struct ServiceUser {
    /// Index 0 matches the user's RSA_PUBLIC_KEY, index 1 RSA_PUBLIC_KEY_2.
    keys: [Option<KeySlot>; 2],
    active: usize,
}

struct KeySlot {
    config_key: &'static str,
    source: Arc<dyn SecretSource>,
    /// Parsing an RSA key is not free; reparsed only when the PEM changes (Vault KV rotation).
    parsed: Mutex<Option<(String, Arc<ParsedKey>)>>,
}

struct ParsedKey {
    /// Signs through aws-lc-rs, never the `rsa` crate (RUSTSEC-2023-0071).
    signer: RsaSigningKey,
    /// `SHA256:<base64>` exactly as Snowflake shows it in DESCRIBE USER (RSA_PUBLIC_KEY_FP).
    fingerprint: String,
}

#[derive(Serialize)]
struct Claims<'a> {
    iss: &'a str,
    sub: &'a str,
    iat: i64,
    exp: i64,
}

const USER_KEYS: &[&str] = &["private_key", "private_key_2", "active_key"];

pub fn build(table: &toml::Table, context: &BuildContext<'_>) -> Result<Arc<dyn Backend>, ConfigError> {
    context.reject_unknown_keys(table, &["account", "url", "max_ttl", "users"])?;
    let account = table_string(table, context, "account")?
        .map(str::trim)
        .filter(|a| !a.is_empty())
        .ok_or_else(|| context.error("account", "is required: the Snowflake account identifier, e.g. \"myorg-analytics\""))?
        .to_owned();
    let account_identifier = jwt_account(&account).map_err(|m| context.error("account", m))?;
    let url = match table_string(table, context, "url")? {
        Some(raw) => crate::config::parse_http_url(raw).map_err(|m| context.error("url", m))?.trim_end_matches('/').to_owned(),
        None => format!("https://{}.snowflakecomputing.com", url_account(&account)),
    };
    let ceiling = Ttl::from_seconds(SNOWFLAKE_MAX_JWT_SECONDS).expect("one hour is a valid TTL");
    let max_ttl = match table_string(table, context, "max_ttl")? {
        Some(raw) => {
            let ttl = Ttl::parse(raw).map_err(|m| context.error("max_ttl", m))?;
            if ttl > ceiling {
                return Err(context.error("max_ttl", format!("{ttl} exceeds 1h: Snowflake rejects key-pair JWTs that live longer")));
            }
            ttl
        }
        None => ceiling,
    };
    let users_table = match table.get("users") {
        Some(toml::Value::Table(users)) if !users.is_empty() => users,
        Some(_) | None => {
            return Err(context.error(
                "users",
                "is required: one table per Snowflake service user, e.g. [backends.NAME.users.CI_LOADER] with private_key = { file = \"...\" }",
            ))
        }
    };
    let base_dir = context.config.resolve(Path::new(""));
    let mut users = BTreeMap::new();
    for (user, value) in users_table {
        let key = format!("users.{user}");
        let toml::Value::Table(user_table) = value else { return Err(context.error(&key, "must be a table")) };
        if let Some(unknown) = user_table.keys().find(|k| !USER_KEYS.contains(&k.as_str())) {
            return Err(context.error(&format!("{key}.{unknown}"), format!("unknown key; expected one of {USER_KEYS:?}")));
        }
        if user.trim().is_empty() || user.chars().any(char::is_whitespace) || user.contains('"') {
            return Err(context.error(&key, "is not a Snowflake user name Snowflake's key-pair login accepts (no spaces or quotes)"));
        }
        let mut keys: [Option<KeySlot>; 2] = [None, None];
        for (index, config_key) in ["private_key", "private_key_2"].into_iter().enumerate() {
            if let Some(source) = user_table.get(config_key) {
                let full_key = format!("backends.{}.{key}.{config_key}", context.name);
                let source = secret_source::parse(source, &context.config.source_name(), &full_key, &base_dir, context.vault)?;
                keys[index] = Some(KeySlot { config_key, source, parsed: Mutex::new(None) });
            }
        }
        let active = match user_table.get("active_key") {
            None => 1,
            Some(toml::Value::Integer(n @ (1 | 2))) => *n as usize,
            Some(_) => {
                return Err(context.error(
                    &format!("{key}.active_key"),
                    "must be 1 (private_key, matching RSA_PUBLIC_KEY) or 2 (private_key_2, matching RSA_PUBLIC_KEY_2)",
                ))
            }
        } - 1;
        if keys[active].is_none() {
            let missing = ["private_key", "private_key_2"][active];
            return Err(context.error(&format!("{key}.{missing}"), format!("is required: active_key = {} signs with it", active + 1)));
        }
        if users.insert(user.to_uppercase(), ServiceUser { keys, active }).is_some() {
            return Err(context.error(&key, "is configured twice (user names are case-insensitive in Snowflake)"));
        }
    }
    Ok(Arc::new(SnowflakeKeypair { name: context.name.to_string(), account, account_identifier, url, max_ttl, users }))
}

/// Cloud and connectivity segments that follow a locator, never an account name.
const LOCATOR_SUFFIXES: &[&str] = &["aws", "azure", "gcp", "privatelink", "global"];

/// The account as Snowflake wants it in `iss` and `sub`, from any form an admin may paste:
/// - `myorg-analytics` (organization and account name, the preferred form) stays as it is;
/// - `myorg.analytics` (the SQL form) becomes `MYORG-ANALYTICS`: Snowflake rejects a period in
///   the JWT's account and expects the hyphen;
/// - `xy12345.us-east-2.aws`, `xy12345.eu-west-1.privatelink`, `xy12345.us-east-1` (an account
///   locator with region and cloud) become `XY12345`: region information is excluded;
/// - `myaccount-abc123.global` (a global URL) becomes `MYACCOUNT`, as Snowflake's connectors do;
/// - a pasted host (`….snowflakecomputing.com`) loses that suffix first.
///
/// Everything is upper-cased. Anything but letters, digits, `_`, `-` and `.` is refused.
pub fn jwt_account(raw: &str) -> Result<String, String> {
    let lowered = raw.trim().to_lowercase();
    let host = lowered.strip_prefix("https://").unwrap_or(&lowered).trim_end_matches('/');
    let account = host.strip_suffix(".snowflakecomputing.com").unwrap_or(host);
    if account.is_empty() || !account.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.')) {
        return Err(format!("{raw:?} is not a Snowflake account identifier (letters, digits, _ - .)"));
    }
    let segments: Vec<&str> = account.split('.').collect();
    if segments.iter().any(|s| s.is_empty()) {
        return Err(format!("{raw:?} has an empty segment"));
    }
    let identifier = if segments.last() == Some(&"global") {
        segments[0].split('-').next().unwrap_or_default().to_owned()
    } else if segments.len() == 2 && !segments[1].contains('-') && !LOCATOR_SUFFIXES.contains(&segments[1]) {
        // Organization names are letters and digits only, account names add `_`: a second
        // segment without a hyphen is an account name, never a region (regions all have one).
        format!("{}-{}", segments[0], segments[1])
    } else {
        segments[0].to_owned()
    };
    if identifier.is_empty() {
        return Err(format!("{raw:?} has no account part"));
    }
    Ok(identifier.to_uppercase())
}

/// The account as it appears in `https://<this>.snowflakecomputing.com`.
pub(super) fn url_account(raw: &str) -> String {
    let lowered = raw.trim().to_lowercase();
    let segments: Vec<&str> = lowered.split('.').collect();
    if segments.len() == 2 && !segments[1].contains('-') && !LOCATOR_SUFFIXES.contains(&segments[1]) {
        format!("{}-{}", segments[0], segments[1])
    } else {
        lowered
    }
}

/// `SHA256:<base64 of the SHA-256 of the DER SubjectPublicKeyInfo>`, as Snowflake computes it.
fn public_key_fingerprint(spki_der: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    format!("SHA256:{}", base64::engine::general_purpose::STANDARD.encode(Sha256::digest(spki_der)))
}

fn parse_private_key(pem: &str) -> Result<ParsedKey, String> {
    if pem.contains("ENCRYPTED PRIVATE KEY") {
        return Err("is an encrypted PEM key; store it unencrypted where only the broker can read it (Vault KV or a 0600 file)".into());
    }
    let signer = RsaSigningKey::from_pem(pem).map_err(|problem| {
        format!("{problem}: expected a PEM RSA private key (PKCS#8 \"BEGIN PRIVATE KEY\" or PKCS#1 \"BEGIN RSA PRIVATE KEY\")")
    })?;
    let fingerprint = public_key_fingerprint(&signer.public_key_der().ok_or("its public key cannot be encoded")?);
    Ok(ParsedKey { signer, fingerprint })
}

impl KeySlot {
    async fn key(&self) -> Result<Arc<ParsedKey>, String> {
        let pem = self.source.read().await.map_err(|e| e.to_string())?;
        let pem_sha256 = sha256_hex(pem.expose_secret().as_bytes());
        if let Some((seen, parsed)) = self.parsed.lock().expect("key cache lock").as_ref() {
            if *seen == pem_sha256 {
                return Ok(parsed.clone());
            }
        }
        let parsed = Arc::new(parse_private_key(pem.expose_secret()).map_err(|m| format!("{} {m}", self.config_key))?);
        *self.parsed.lock().expect("key cache lock") = Some((pem_sha256, parsed.clone()));
        Ok(parsed)
    }
}

impl SnowflakeKeypair {
    fn failed(&self, detail: impl Into<String>) -> BackendError {
        BackendError::Failed { backend: self.name.clone(), detail: detail.into() }
    }
}

#[async_trait]
impl Backend for SnowflakeKeypair {
    fn kind(&self) -> &'static str {
        PARAMS.kind
    }

    fn mints_without_side_effects(&self) -> bool {
        true
    }

    fn default_target(&self) -> &'static str {
        "snowflake"
    }

    fn max_ttl(&self) -> Option<Ttl> {
        Some(self.max_ttl)
    }

    /// A literal `user` must be one this backend holds a key for, so a typo fails at load.
    fn check_role(&self, role: &Role) -> Result<(), PolicyError> {
        let Some(user) = role.params.get("user").and_then(Param::as_template) else { return Ok(()) };
        if user.placeholders().next().is_none() && !self.users.contains_key(&user.as_str().to_uppercase()) {
            return Err(PolicyError {
                file: role.file.clone(),
                role: Some(role.name.to_string()),
                key: Some("user".into()),
                message: format!(
                    "backend {} holds no key for Snowflake user {:?}; configured: {:?}",
                    role.backend,
                    user.as_str(),
                    self.users.keys().collect::<Vec<_>>()
                ),
            });
        }
        Ok(())
    }

    #[tracing::instrument(skip_all, fields(backend = %self.name, role = %request.role))]
    async fn mint(&self, request: MintRequest<'_>) -> Result<Credential, BackendError> {
        let param = |key: &str| request.params.get(key).map(String::as_str).filter(|v| !v.is_empty());
        let user = param("user").unwrap_or_default().to_uppercase();
        let Some(service_user) = self.users.get(&user) else {
            return Err(self.failed(format!("no key is configured for Snowflake user {user:?}")));
        };
        let slot = service_user.keys[service_user.active].as_ref().expect("the active key is checked at load");
        let key = slot.key().await.map_err(|m| self.failed(format!("Snowflake user {user}: {m}")))?;

        let qualified_user = format!("{}.{user}", self.account_identifier);
        let issuer = format!("{qualified_user}.{}", key.fingerprint);
        let iat = request.issued_at.unix_timestamp();
        // The grant is already capped by max_ttl(); the hour is Snowflake's own rule, so it is
        // enforced here too rather than trusted to the policy layer.
        let exp = request.expires_at.unix_timestamp().min(iat + SNOWFLAKE_MAX_JWT_SECONDS as i64);
        let claims = Claims { iss: &issuer, sub: &qualified_user, iat, exp };
        let token = key.signer.sign(&claims).map_err(|e| self.failed(format!("signing the JWT for {user} failed: {e}")))?;

        let host = url::Url::parse(&self.url).ok().and_then(|u| u.host_str().map(str::to_owned)).unwrap_or_default();
        let mut credential = Credential::new("token", SecretString::from(token))
            .with_public("token_type", "KEYPAIR_JWT")
            .with_public("authenticator", "SNOWFLAKE_JWT")
            .with_public("account", self.account.as_str())
            .with_public("account_identifier", self.account_identifier.as_str())
            .with_public("user", user.as_str())
            .with_public("public_key_fingerprint", key.fingerprint.as_str())
            .with_public("key_slot", if service_user.active == 0 { "RSA_PUBLIC_KEY" } else { "RSA_PUBLIC_KEY_2" })
            .with_public("url", self.url.as_str())
            .with_public("sql_api_headers", serde_json::json!({ "X-Snowflake-Authorization-Token-Type": "KEYPAIR_JWT" }))
            .with_public("ttl_rule", TTL_RULE)
            .with_env("SNOWFLAKE_ACCOUNT", EnvValue::Public(self.account.clone()))
            .with_env("SNOWFLAKE_USER", EnvValue::Public(user.clone()))
            .with_env("SNOWFLAKE_HOST", EnvValue::Public(host))
            .with_env("SNOWFLAKE_URL", EnvValue::Public(self.url.clone()))
            .with_env("SNOWFLAKE_AUTHENTICATOR", EnvValue::Public("SNOWFLAKE_JWT".into()))
            .with_env("SNOWFLAKE_JWT", EnvValue::Secret("token"))
            .with_env("SNOWFLAKE_AUTHORIZATION_TOKEN_TYPE", EnvValue::Public("KEYPAIR_JWT".into()))
            // The key's identity, not a secret: which of the user's two keys signed it.
            .with_handle(issuer.clone());
        for (hint, variable) in [
            ("warehouse", "SNOWFLAKE_WAREHOUSE"),
            ("database", "SNOWFLAKE_DATABASE"),
            ("schema", "SNOWFLAKE_SCHEMA"),
            ("role", "SNOWFLAKE_ROLE"),
        ] {
            if let Some(value) = param(hint) {
                credential = credential.with_public(hint, value).with_env(variable, EnvValue::Public(value.to_owned()));
            }
        }
        if exp < request.expires_at.unix_timestamp() {
            credential = credential.with_expires_at(time::OffsetDateTime::from_unix_timestamp(exp).expect("exp is a valid time"));
        }
        Ok(credential)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn account_identifiers_follow_snowflakes_jwt_rules() {
        for (raw, expected) in [
            ("myorg-analytics", "MYORG-ANALYTICS"),
            ("MyOrg-Analytics_EU", "MYORG-ANALYTICS_EU"),
            ("myorg.analytics", "MYORG-ANALYTICS"),
            ("myorg.analytics_eu", "MYORG-ANALYTICS_EU"),
            ("xy12345", "XY12345"),
            ("xy12345.us-east-2.aws", "XY12345"),
            ("xy12345.us-east-1", "XY12345"),
            ("xy12345.us-central1.gcp", "XY12345"),
            ("xy12345.west-europe.azure", "XY12345"),
            ("xy12345.eu-west-1.privatelink", "XY12345"),
            ("xy12345.aws", "XY12345"),
            ("myaccount-abc123.global", "MYACCOUNT"),
            ("myorg-analytics.snowflakecomputing.com", "MYORG-ANALYTICS"),
            ("https://xy12345.us-east-2.aws.snowflakecomputing.com/", "XY12345"),
            (" acme-prod ", "ACME-PROD"),
        ] {
            assert_eq!(jwt_account(raw).as_deref(), Ok(expected), "{raw:?}");
        }
        for bad in ["", "  ", "acme prod", "acme/prod", "acme..prod", ".acme", "acme.", "acmé", "\"acme\""] {
            assert!(jwt_account(bad).is_err(), "{bad:?} accepted");
        }
    }

    /// The JWT is what the `rsa` crate (through jsonwebtoken, as before) would sign, byte for
    /// byte: RSASSA-PKCS1-v1_5 is deterministic, so aws-lc-rs's signature must equal it exactly; the
    /// `rsa` crate also verifies it against the public key alone, and the fingerprint is the
    /// SHA-256 of the public key's DER SubjectPublicKeyInfo as `rsa` encodes it.
    #[test]
    fn jwts_are_signed_exactly_as_pkcs1_v1_5_prescribes() {
        use rsa::pkcs1::EncodeRsaPrivateKey;
        use rsa::pkcs8::{EncodePrivateKey, EncodePublicKey, LineEnding};
        use rsa::sha2::{Digest, Sha256};
        crate::oidc::install_crypto_provider();
        let private = rsa::RsaPrivateKey::new(&mut rand::thread_rng(), 2048).unwrap();
        let pkcs8 = private.to_pkcs8_pem(LineEnding::LF).unwrap();
        let pkcs1 = private.to_pkcs1_pem(LineEnding::LF).unwrap();
        let key = parse_private_key(&pkcs8).unwrap();
        let issuer = format!("MYORG-ANALYTICS.CI_LOADER.{}", key.fingerprint);
        let claims = Claims { iss: &issuer, sub: "MYORG-ANALYTICS.CI_LOADER", iat: 1_700_000_000, exp: 1_700_003_600 };

        let token = key.signer.sign(&claims).unwrap();
        assert_eq!(token, key.signer.sign(&claims).unwrap(), "the same claims give the same JWT");
        assert_eq!(token, parse_private_key(&pkcs1).unwrap().signer.sign(&claims).unwrap(), "PKCS#1 and PKCS#8 files sign alike");
        let reference = jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256),
            &claims,
            &jsonwebtoken::EncodingKey::from_rsa_pem(pkcs8.as_bytes()).unwrap(),
        )
        .unwrap();
        assert_eq!(token, reference);

        let (signing_input, signature) = token.rsplit_once('.').unwrap();
        let header = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(signing_input.split('.').next().unwrap()).unwrap();
        assert_eq!(header, br#"{"typ":"JWT","alg":"RS256"}"#);
        let signature = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(signature).unwrap();
        let public = private.to_public_key();
        public.verify(rsa::Pkcs1v15Sign::new::<Sha256>(), &Sha256::digest(signing_input.as_bytes()), &signature).unwrap();

        let der = public.to_public_key_der().unwrap();
        assert_eq!(key.fingerprint, format!("SHA256:{}", base64::engine::general_purpose::STANDARD.encode(Sha256::digest(der.as_bytes()))));
    }

    #[test]
    fn keys_that_are_not_rsa_private_keys_are_refused_saying_what_they_are() {
        let ec = p256::SecretKey::random(&mut rand::rngs::OsRng);
        let ec_pem = p256::pkcs8::EncodePrivateKey::to_pkcs8_pem(&ec, p256::pkcs8::LineEnding::LF).unwrap();
        for (pem, says) in [(ec_pem.as_str(), "is an EC key"), ("not a key", "is not a PEM file"), ("-----BEGIN ENCRYPTED PRIVATE KEY-----", "encrypted")] {
            let error = parse_private_key(pem).err().unwrap();
            assert!(error.contains(says), "{error}");
        }
    }

    #[test]
    fn urls_use_the_hyphenated_org_form_and_keep_locator_regions() {
        assert_eq!(url_account("MyOrg.Analytics"), "myorg-analytics");
        assert_eq!(url_account("xy12345.us-east-2.aws"), "xy12345.us-east-2.aws");
        assert_eq!(url_account("myorg-analytics"), "myorg-analytics");
    }
}
