//! Secrets a revocation needs, sealed for the schedule. Ending a Looker session takes the
//! session token itself, so the schedule has to keep it until the deadline; it keeps it only
//! AES-256-GCM encrypted under `revocation_secret_key` (never in the broker's memory across a
//! restart, never in clear in Postgres). Each value gets a random 96-bit nonce, and the
//! issuance id is the associated data: a ciphertext copied onto another row does not open.
//!
//! Stored form: nonce (12 bytes) followed by ciphertext and 16-byte tag.
//!
//! Or, with `revocation_secret_key = { vault_transit = "key", mount = "transit" }`, the key
//! never leaves Vault: `transit/encrypt/{key}` with the issuance id as `associated_data`
//! (an `aes256-gcm96` key, Vault 1.13+), and the stored form is Vault's `vault:vN:...`
//! ciphertext as text.

use std::path::Path;

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Key, Nonce};
use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use rand::RngCore;
use rustify::enums::RequestMethod;
use secrecy::{ExposeSecret, SecretString};
use serde_json::json;
use uuid::Uuid;

use crate::config::{Config, ConfigError};
use crate::vault::Vault;

const KEY_NAME: &str = "revocation_secret_key";
const NONCE_BYTES: usize = 12;

#[derive(Debug, thiserror::Error)]
pub enum SealError {
    #[error("the stored secret does not open with revocation_secret_key (was the key changed, or the row tampered with?)")]
    DoesNotOpen,
    #[error("Vault transit key {key}: {message}")]
    Transit { key: String, message: String },
}

/// The key from `revocation_secret_key`.
pub enum RevocationKey {
    /// Boxed: the expanded AES key schedule is about a kilobyte.
    Local(Box<Aes256Gcm>),
    Transit { vault: Vault, mount: String, key: String },
}

const DEFAULT_TRANSIT_MOUNT: &str = "transit";

impl RevocationKey {
    /// Reads the configured key once at startup: 32 bytes, base64 (e.g. `openssl rand -base64 32`),
    /// or names a Vault transit key. `Ok(None)` when the key is not configured.
    pub async fn load(config: &Config, vault: Option<&Vault>) -> Result<Option<Self>, ConfigError> {
        let Some(value) = &config.revocation_secret_key else { return Ok(None) };
        let source_name = config.source_name();
        if let Some(table) = value.as_table().filter(|table| table.contains_key("vault_transit")) {
            return Self::transit(table, &source_name, vault).map(Some);
        }
        let source = crate::vault::secret_source::parse(value, &source_name, KEY_NAME, &config.resolve(Path::new("")), vault)?;
        let text = source.read().await.map_err(|e| ConfigError::new(&source_name, KEY_NAME, e.to_string()))?;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(text.expose_secret().trim())
            .map_err(|_| ConfigError::new(&source_name, KEY_NAME, format!("{} is not base64", source.describe())))?;
        let key: [u8; 32] = bytes.try_into().map_err(|bytes: Vec<u8>| {
            ConfigError::new(
                &source_name,
                KEY_NAME,
                format!("{} holds {} bytes; AES-256 needs exactly 32 (openssl rand -base64 32)", source.describe(), bytes.len()),
            )
        })?;
        Ok(Some(Self::from_bytes(&key)))
    }

    fn transit(table: &toml::Table, source_name: &str, vault: Option<&Vault>) -> Result<Self, ConfigError> {
        let error = |key: &str, message: &str| ConfigError::new(source_name, format!("{KEY_NAME}.{key}"), message);
        if let Some(unknown) = table.keys().find(|key| !matches!(key.as_str(), "vault_transit" | "mount")) {
            return Err(error(unknown, "unknown key; expected vault_transit and optionally mount"));
        }
        let string = |key: &str| match table.get(key) {
            None => Ok(None),
            Some(toml::Value::String(value)) if !value.trim().is_empty() => Ok(Some(value.trim_matches('/').to_owned())),
            Some(_) => Err(error(key, "must be a non-empty string")),
        };
        let key = string("vault_transit")?.ok_or_else(|| error("vault_transit", "must name the transit key"))?;
        let mount = string("mount")?.unwrap_or_else(|| DEFAULT_TRANSIT_MOUNT.into());
        let vault = vault.ok_or_else(|| error("vault_transit", "needs a [vault] section to reach Vault"))?;
        Ok(Self::Transit { vault: vault.clone(), mount, key })
    }

    pub fn from_bytes(key: &[u8; 32]) -> Self {
        Self::Local(Box::new(Aes256Gcm::new(&Key::<Aes256Gcm>::from(*key))))
    }

    pub async fn seal(&self, issuance_id: Uuid, secret: &SecretString) -> Result<Vec<u8>, SealError> {
        match self {
            Self::Local(cipher) => {
                let mut nonce = [0u8; NONCE_BYTES];
                rand::rngs::OsRng.fill_bytes(&mut nonce);
                let payload = Payload { msg: secret.expose_secret().as_bytes(), aad: issuance_id.as_bytes() };
                let ciphertext = cipher.encrypt(&Nonce::from(nonce), payload).expect("AES-GCM encryption of a short secret cannot fail");
                let mut sealed = nonce.to_vec();
                sealed.extend_from_slice(&ciphertext);
                Ok(sealed)
            }
            Self::Transit { .. } => {
                let body = json!({ "plaintext": STANDARD.encode(secret.expose_secret()), "associated_data": STANDARD.encode(issuance_id.as_bytes()) });
                let data = self.transit_call("encrypt", &body).await?;
                let ciphertext = data["ciphertext"].as_str().ok_or_else(|| self.transit_error("no ciphertext in Vault's answer"))?;
                Ok(ciphertext.as_bytes().to_vec())
            }
        }
    }

    pub async fn open(&self, issuance_id: Uuid, sealed: &[u8]) -> Result<SecretString, SealError> {
        let plain = match self {
            Self::Local(cipher) => {
                let (nonce, ciphertext) = sealed.split_at_checked(NONCE_BYTES).ok_or(SealError::DoesNotOpen)?;
                let nonce: [u8; NONCE_BYTES] = nonce.try_into().map_err(|_| SealError::DoesNotOpen)?;
                cipher.decrypt(&Nonce::from(nonce), Payload { msg: ciphertext, aad: issuance_id.as_bytes() }).map_err(|_| SealError::DoesNotOpen)?
            }
            Self::Transit { .. } => {
                let ciphertext = std::str::from_utf8(sealed).ok().filter(|text| text.starts_with("vault:v")).ok_or(SealError::DoesNotOpen)?;
                let body = json!({ "ciphertext": ciphertext, "associated_data": STANDARD.encode(issuance_id.as_bytes()) });
                let data = self.transit_call("decrypt", &body).await?;
                data["plaintext"].as_str().and_then(|text| STANDARD.decode(text).ok()).ok_or(SealError::DoesNotOpen)?
            }
        };
        String::from_utf8(plain).map(SecretString::from).map_err(|_| SealError::DoesNotOpen)
    }

    async fn transit_call(&self, operation: &str, body: &serde_json::Value) -> Result<serde_json::Value, SealError> {
        let Self::Transit { vault, mount, key } = self else { unreachable!("only transit keys call Vault") };
        let envelope = vault
            .request(RequestMethod::POST, &format!("{mount}/{operation}/{key}"), Some(body))
            .await
            .map_err(|e| self.transit_error(&e.to_string()))?;
        Ok(envelope.data.unwrap_or_default())
    }

    fn transit_error(&self, message: &str) -> SealError {
        let key = match self {
            Self::Transit { mount, key, .. } => format!("{mount}/{key}"),
            Self::Local(_) => String::new(),
        };
        SealError::Transit { key, message: message.to_owned() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_sealed_secret_opens_only_for_its_own_issuance_and_key() {
        let key = RevocationKey::from_bytes(&[7; 32]);
        let issuance = Uuid::new_v4();
        let secret = SecretString::from("looker-session-token");
        let sealed = key.seal(issuance, &secret).await.unwrap();
        assert!(!sealed.windows(b"looker".len()).any(|w| w == b"looker"));
        assert_eq!(key.open(issuance, &sealed).await.unwrap().expose_secret(), "looker-session-token");
        // A fresh nonce every time.
        assert_ne!(key.seal(issuance, &secret).await.unwrap(), sealed);
        assert!(key.open(Uuid::new_v4(), &sealed).await.is_err(), "moved to another row");
        assert!(RevocationKey::from_bytes(&[8; 32]).open(issuance, &sealed).await.is_err(), "another key");
        let mut tampered = sealed.clone();
        *tampered.last_mut().unwrap() ^= 1;
        assert!(key.open(issuance, &tampered).await.is_err());
        assert!(key.open(issuance, &sealed[..5]).await.is_err());
    }
}
