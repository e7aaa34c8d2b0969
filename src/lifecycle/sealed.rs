//! Secrets a revocation needs, sealed for the schedule. Ending a Looker session takes the
//! session token itself, so the schedule has to keep it until the deadline; it keeps it only
//! AES-256-GCM encrypted under `revocation_secret_key` (never in the broker's memory across a
//! restart, never in clear in Postgres). Each value gets a random 96-bit nonce, and the
//! issuance id is the associated data: a ciphertext copied onto another row does not open.
//!
//! Stored form: nonce (12 bytes) followed by ciphertext and 16-byte tag.

use std::path::Path;

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Key, Nonce};
use base64::Engine;
use rand::RngCore;
use secrecy::{ExposeSecret, SecretString};
use uuid::Uuid;

use crate::config::{Config, ConfigError};
use crate::vault::Vault;

const KEY_NAME: &str = "revocation_secret_key";
const NONCE_BYTES: usize = 12;

#[derive(Debug, thiserror::Error)]
pub enum SealError {
    #[error("the stored secret does not open with revocation_secret_key (was the key changed, or the row tampered with?)")]
    DoesNotOpen,
}

/// The key from `revocation_secret_key`.
pub struct RevocationKey(Aes256Gcm);

impl RevocationKey {
    /// Reads the configured key once at startup: 32 bytes, base64 (e.g. `openssl rand -base64 32`).
    /// `Ok(None)` when the key is not configured.
    pub async fn load(config: &Config, vault: Option<&Vault>) -> Result<Option<Self>, ConfigError> {
        let Some(value) = &config.revocation_secret_key else { return Ok(None) };
        let source_name = config.source_name();
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

    pub fn from_bytes(key: &[u8; 32]) -> Self {
        Self(Aes256Gcm::new(&Key::<Aes256Gcm>::from(*key)))
    }

    pub fn seal(&self, issuance_id: Uuid, secret: &SecretString) -> Vec<u8> {
        let mut nonce = [0u8; NONCE_BYTES];
        rand::rngs::OsRng.fill_bytes(&mut nonce);
        let payload = Payload { msg: secret.expose_secret().as_bytes(), aad: issuance_id.as_bytes() };
        let ciphertext = self.0.encrypt(&Nonce::from(nonce), payload).expect("AES-GCM encryption of a short secret cannot fail");
        let mut sealed = nonce.to_vec();
        sealed.extend_from_slice(&ciphertext);
        sealed
    }

    pub fn open(&self, issuance_id: Uuid, sealed: &[u8]) -> Result<SecretString, SealError> {
        let (nonce, ciphertext) = sealed.split_at_checked(NONCE_BYTES).ok_or(SealError::DoesNotOpen)?;
        let nonce: [u8; NONCE_BYTES] = nonce.try_into().map_err(|_| SealError::DoesNotOpen)?;
        let plain = self
            .0
            .decrypt(&Nonce::from(nonce), Payload { msg: ciphertext, aad: issuance_id.as_bytes() })
            .map_err(|_| SealError::DoesNotOpen)?;
        String::from_utf8(plain).map(SecretString::from).map_err(|_| SealError::DoesNotOpen)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sealed_secret_opens_only_for_its_own_issuance_and_key() {
        let key = RevocationKey::from_bytes(&[7; 32]);
        let issuance = Uuid::new_v4();
        let secret = SecretString::from("looker-session-token");
        let sealed = key.seal(issuance, &secret);
        assert!(!sealed.windows(b"looker".len()).any(|w| w == b"looker"));
        assert_eq!(key.open(issuance, &sealed).unwrap().expose_secret(), "looker-session-token");
        // A fresh nonce every time.
        assert_ne!(key.seal(issuance, &secret), sealed);
        assert!(key.open(Uuid::new_v4(), &sealed).is_err(), "moved to another row");
        assert!(RevocationKey::from_bytes(&[8; 32]).open(issuance, &sealed).is_err(), "another key");
        let mut tampered = sealed.clone();
        *tampered.last_mut().unwrap() ^= 1;
        assert!(key.open(issuance, &tampered).is_err());
        assert!(key.open(issuance, &sealed[..5]).is_err());
    }
}
