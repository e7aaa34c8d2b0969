//! JWT signing with a Vault transit key: the broker builds header and claims, Vault signs the
//! signing input (`transit/sign/{key}`), the private key never leaves Vault. The key's public
//! versions (`transit/keys/{key}`) are cached and published in the broker's JWKS; an old version
//! stays published until every token it can have signed has expired.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock, Weak};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
use base64::Engine;
use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::Algorithm;
use rustify::enums::RequestMethod;
use serde_json::json;
use time::OffsetDateTime;

use super::{Vault, VaultError};
use crate::signing::{public_jwk_from_pem, JwtClaims, SignedToken, Signer, SigningKeyError};
use crate::config::ConfigError;

pub struct TransitSigner {
    inner: Arc<Inner>,
}

struct Inner {
    vault: Vault,
    mount: String,
    key: String,
    /// How long a version stays published after its successor appeared: the longest token
    /// lifetime plus clock skew.
    retain_for: time::Duration,
    refresh_every: Duration,
    state: RwLock<KeyState>,
}

#[derive(Default)]
struct KeyState {
    versions: BTreeMap<u64, KeyVersion>,
    refreshed_at: Option<Instant>,
}

#[derive(Clone)]
struct KeyVersion {
    jwk: Jwk,
    kid: String,
    algorithm: Algorithm,
    created: OffsetDateTime,
}

impl TransitSigner {
    pub fn new(vault: Vault, mount: String, key: String, retain_for: Duration, refresh_every: Duration) -> Self {
        let retain_for = time::Duration::try_from(retain_for).unwrap_or(time::Duration::DAY);
        Self { inner: Arc::new(Inner { vault, mount, key, retain_for, refresh_every, state: RwLock::default() }) }
    }

    pub fn key_name(&self) -> &str {
        &self.inner.key
    }
}

const DEFAULT_TRANSIT_MOUNT: &str = "transit";
const DEFAULT_KEY_REFRESH_SECONDS: i64 = 60;

/// Parses `signing = { vault_transit = "credbroker-kafka", mount = "transit", refresh_seconds = 60 }`,
/// the one form every broker-signed JWT accepts (Kafka tokens, Gogs delivery tokens), so the
/// rules and messages cannot drift apart. `error(key, message)` names `key` (`signing`,
/// `signing.mount`, ...) inside the caller's table. `retain_for`: how long a version stays
/// published after its successor appeared (the caller's longest token plus clock skew).
pub fn signer_from_config(
    signing: &toml::Value,
    vault: Option<&Vault>,
    retain_for: Duration,
    error: &dyn Fn(&str, &str) -> ConfigError,
) -> Result<Arc<dyn Signer>, ConfigError> {
    let toml::Value::Table(signing) = signing else {
        return Err(error("signing", "must be a table like { vault_transit = \"credbroker-kafka\" }"));
    };
    if let Some(unknown) = signing.keys().find(|k| !["vault_transit", "mount", "refresh_seconds"].contains(&k.as_str())) {
        return Err(error(&format!("signing.{unknown}"), "unknown key; expected vault_transit, mount, refresh_seconds"));
    }
    let string = |key: &str| match signing.get(key) {
        None => Ok(None),
        Some(toml::Value::String(value)) if !value.trim().is_empty() && !value.contains('/') => Ok(Some(value.clone())),
        Some(_) => Err(error(&format!("signing.{key}"), "must be a non-empty name without '/'")),
    };
    let key = string("vault_transit")?.ok_or_else(|| error("signing.vault_transit", "is required: the transit key's name"))?;
    let mount = string("mount")?.unwrap_or_else(|| DEFAULT_TRANSIT_MOUNT.to_owned());
    let refresh_seconds = match signing.get("refresh_seconds") {
        None => DEFAULT_KEY_REFRESH_SECONDS,
        Some(toml::Value::Integer(seconds)) if (1..=3600).contains(seconds) => *seconds,
        Some(_) => return Err(error("signing.refresh_seconds", "must be an integer from 1 to 3600")),
    };
    let vault = vault.ok_or_else(|| error("signing.vault_transit", "needs a [vault] section"))?;
    let refresh_every = Duration::from_secs(refresh_seconds as u64);
    Ok(Arc::new(TransitSigner::new(vault.clone(), mount, key, retain_for, refresh_every)))
}

impl Inner {
    fn operation_error(&self, message: impl Into<String>) -> SigningKeyError {
        SigningKeyError::Remote(format!("transit key {}/{}: {}", self.mount, self.key, message.into()))
    }

    /// Reads the key's public versions and merges them into the cache. Versions Vault no
    /// longer lists (trimmed) stay until their retention ends.
    async fn refresh(&self) -> Result<(), SigningKeyError> {
        let path = format!("{}/keys/{}", self.mount, self.key);
        let envelope = self.vault.request(RequestMethod::GET, &path, None).await.map_err(remote)?;
        let data = envelope.data.unwrap_or_default();
        let key_type = data["type"].as_str().unwrap_or_default();
        if !matches!(key_type, "rsa-2048" | "rsa-3072" | "rsa-4096" | "ecdsa-p256") {
            return Err(self.operation_error(format!(
                "type {key_type:?} cannot sign JWTs verifiers accept here; use rsa-2048, rsa-3072, rsa-4096 (RS256) or ecdsa-p256 (ES256)"
            )));
        }
        let listed = data["keys"].as_object().ok_or_else(|| self.operation_error("no public keys in the answer"))?;
        let mut fresh = BTreeMap::new();
        for (version, entry) in listed {
            let version: u64 = version.parse().map_err(|_| self.operation_error(format!("version {version:?} is not a number")))?;
            let pem = entry["public_key"].as_str().unwrap_or_default();
            let (jwk, algorithm) = public_jwk_from_pem(pem)
                .ok_or_else(|| self.operation_error(format!("version {version} has no usable public key")))?;
            let created = entry["creation_time"]
                .as_str()
                .and_then(|t| OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339).ok())
                .unwrap_or_else(OffsetDateTime::now_utc);
            let kid = jwk.common.key_id.clone().unwrap_or_default();
            fresh.insert(version, KeyVersion { jwk, kid, algorithm, created });
        }
        let mut state = self.state.write().expect("key state lock");
        let previous_latest = state.versions.keys().next_back().copied();
        state.versions.extend(fresh);
        state.refreshed_at = Some(Instant::now());
        let latest = state.versions.keys().next_back().copied();
        if previous_latest.is_some() && previous_latest != latest {
            tracing::info!(key = self.key, ?previous_latest, ?latest, "transit key rotated; publishing the new version");
        }
        Ok(())
    }

    fn stale(&self) -> bool {
        let state = self.state.read().expect("key state lock");
        state.versions.is_empty() || state.refreshed_at.is_none_or(|at| at.elapsed() >= self.refresh_every)
    }

    fn latest(&self) -> Option<(u64, KeyVersion)> {
        let state = self.state.read().expect("key state lock");
        state.versions.iter().next_back().map(|(version, key)| (*version, key.clone()))
    }

    fn published(&self, now: OffsetDateTime) -> Vec<Jwk> {
        let state = self.state.read().expect("key state lock");
        let versions: Vec<(&u64, &KeyVersion)> = state.versions.iter().collect();
        versions
            .iter()
            .enumerate()
            .filter(|(index, _)| match versions.get(index + 1) {
                // The latest version signs now; an older one signed until its successor appeared.
                None => true,
                Some((_, successor)) => successor.created + self.retain_for > now,
            })
            .map(|(_, (_, key))| key.jwk.clone())
            .collect()
    }
}

fn remote(error: VaultError) -> SigningKeyError {
    SigningKeyError::Remote(error.to_string())
}

#[async_trait]
impl Signer for TransitSigner {
    #[tracing::instrument(skip_all, fields(key = %self.inner.key))]
    async fn sign(&self, claims: &JwtClaims) -> Result<SignedToken, SigningKeyError> {
        let inner = &self.inner;
        if inner.stale() {
            // A failed refresh is fine while a known version exists: Vault refuses the
            // signature itself if it cannot serve it.
            if let Err(error) = inner.refresh().await {
                if inner.latest().is_none() {
                    return Err(error);
                }
                tracing::warn!(%error, "could not refresh the transit key list; signing with the cached latest version");
            }
        }
        let (version, key) = inner.latest().ok_or_else(|| inner.operation_error("has no versions"))?;
        let alg = match key.algorithm {
            Algorithm::ES256 => "ES256",
            _ => "RS256",
        };
        let header = json!({ "alg": alg, "typ": "JWT", "kid": key.kid });
        let signing_input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.as_bytes())
        );
        let mut body = json!({
            "input": STANDARD.encode(&signing_input),
            "key_version": version,
            "hash_algorithm": "sha2-256",
        });
        match key.algorithm {
            // JWS wants raw r||s, not ASN.1 DER.
            Algorithm::ES256 => body["marshaling_algorithm"] = json!("jws"),
            _ => body["signature_algorithm"] = json!("pkcs1v15"),
        }
        let path = format!("{}/sign/{}", inner.mount, inner.key);
        let envelope = inner.vault.request(RequestMethod::POST, &path, Some(&body)).await.map_err(remote)?;
        let signature = envelope.data.as_ref().and_then(|data| data["signature"].as_str()).unwrap_or_default();
        let signature = parse_vault_signature(signature, version).map_err(|m| inner.operation_error(m))?;
        Ok(SignedToken { token: format!("{signing_input}.{}", URL_SAFE_NO_PAD.encode(signature)), kid: key.kid })
    }

    fn published_keys(&self) -> Vec<Jwk> {
        self.inner.published(OffsetDateTime::now_utc())
    }

    /// Loads the key list now and keeps it fresh, so a rotation in Vault reaches the JWKS
    /// within `refresh_every` (signing also refreshes a stale list before use).
    async fn start(&self) {
        if let Err(error) = self.inner.refresh().await {
            tracing::warn!(%error, "transit key list not loaded at startup; retrying in the background");
        }
        tokio::spawn(refresh_periodically(Arc::downgrade(&self.inner)));
    }
}

async fn refresh_periodically(inner: Weak<Inner>) {
    loop {
        let Some(every) = inner.upgrade().map(|inner| inner.refresh_every) else { return };
        tokio::time::sleep(every).await;
        let Some(strong) = inner.upgrade() else { return };
        if let Err(error) = strong.refresh().await {
            tracing::warn!(%error, "refreshing the transit key list failed");
        }
    }
}

/// `vault:v3:<signature>`: checks the version is the one asked for and decodes the signature,
/// which Vault sends as standard base64 (RSA, ECDSA asn1) or base64url (ECDSA jws).
fn parse_vault_signature(signature: &str, expected_version: u64) -> Result<Vec<u8>, String> {
    let mut parts = signature.splitn(3, ':');
    let (Some("vault"), Some(version), Some(encoded)) = (parts.next(), parts.next(), parts.next()) else {
        return Err("the signature is not in Vault's vault:vN:... form".into());
    };
    let version: u64 = version.strip_prefix('v').and_then(|v| v.parse().ok()).ok_or("the signature has no key version")?;
    if version != expected_version {
        return Err(format!("Vault signed with version {version}, not the requested {expected_version}"));
    }
    [&STANDARD, &STANDARD_NO_PAD, &URL_SAFE, &URL_SAFE_NO_PAD]
        .iter()
        .find_map(|engine| engine.decode(encoded).ok())
        .ok_or_else(|| "the signature is not base64".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vault_signatures_decode_in_both_alphabets_and_check_the_version() {
        let bytes = vec![0xfb, 0xff, 0x01, 0x02];
        assert_eq!(parse_vault_signature(&format!("vault:v2:{}", STANDARD.encode(&bytes)), 2).unwrap(), bytes);
        assert_eq!(parse_vault_signature(&format!("vault:v2:{}", URL_SAFE_NO_PAD.encode(&bytes)), 2).unwrap(), bytes);
        assert!(parse_vault_signature(&format!("vault:v1:{}", STANDARD.encode(&bytes)), 2).unwrap_err().contains("version 1"));
        assert!(parse_vault_signature("v2:abcd", 2).is_err());
        assert!(parse_vault_signature("vault:v2:***", 2).is_err());
    }
}
