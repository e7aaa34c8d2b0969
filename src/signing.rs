//! Keys the broker signs with (Kafka tokens, the dev issuer), parsed once at startup.
//! The private half never leaves this struct; the public half is what `/.well-known/jwks.json` serves.
//! [`Signer`] hides where a key lives: a local PEM file ([`LocalSigner`]) or a Vault transit
//! key (`TransitSigner` in the Vault module), so every broker-signed JWT (Kafka tokens today,
//! Snowflake key-pair JWTs and Gogs delivery tokens later) can use either.

use std::path::Path;

use async_trait::async_trait;
use jsonwebtoken::jwk::{Jwk, KeyAlgorithm, PublicKeyUse, ThumbprintHash};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use serde::Serialize;

#[derive(Debug, thiserror::Error)]
pub enum SigningKeyError {
    #[error("cannot read {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("{path} is not a PKCS#8 PEM RSA or EC P-256 private key")]
    Unsupported { path: String },
    #[error("cannot write {path}: {source}")]
    Write { path: String, source: std::io::Error },
    #[error("cannot generate a key: {0}")]
    Generate(String),
    #[error("signing failed: {0}")]
    Sign(#[from] jsonwebtoken::errors::Error),
    /// A signer outside this process (Vault transit) failed; the message is safe to show.
    #[error("{0}")]
    Remote(String),
}

/// A compact JWS and the `kid` its header names.
pub struct SignedToken {
    pub token: String,
    pub kid: String,
}

#[async_trait]
pub trait Signer: Send + Sync {
    /// Signs `claims` as a JWT (`typ` JWT, `kid` of the signing key).
    async fn sign(&self, claims: &serde_json::Value) -> Result<SignedToken, SigningKeyError>;
    /// Every public key a verifier may still meet, current and retired.
    fn published_keys(&self) -> Vec<Jwk>;
    /// Background work (a remote key list to keep fresh); local keys need none.
    async fn start(&self) {}
}

/// A key from a PEM file, plus retired keys published until their tokens have expired.
pub struct LocalSigner {
    pub current: SigningKey,
    pub retired: Vec<SigningKey>,
}

#[async_trait]
impl Signer for LocalSigner {
    async fn sign(&self, claims: &serde_json::Value) -> Result<SignedToken, SigningKeyError> {
        Ok(SignedToken { token: self.current.sign(claims)?, kid: self.current.kid().to_owned() })
    }

    fn published_keys(&self) -> Vec<Jwk> {
        std::iter::once(&self.current).chain(&self.retired).map(|key| key.public_jwk().clone()).collect()
    }
}

/// A public JWK for a key held elsewhere, with its RFC 7638 thumbprint as `kid` (the same rule
/// local keys follow). Accepts SPKI PEM (`BEGIN PUBLIC KEY`) for RSA and EC P-256.
pub fn public_jwk_from_pem(pem: &str) -> Option<(Jwk, Algorithm)> {
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use base64::Engine;
    use rsa::pkcs8::DecodePublicKey;
    use rsa::traits::PublicKeyParts;
    let (mut jwk, algorithm) = if let Ok(key) = rsa::RsaPublicKey::from_public_key_pem(pem) {
        let jwk = serde_json::json!({
            "kty": "RSA",
            "n": URL_SAFE_NO_PAD.encode(key.n().to_bytes_be()),
            "e": URL_SAFE_NO_PAD.encode(key.e().to_bytes_be()),
        });
        (serde_json::from_value::<Jwk>(jwk).ok()?, Algorithm::RS256)
    } else {
        use p256::elliptic_curve::sec1::ToEncodedPoint;
        let key = p256::PublicKey::from_public_key_pem(pem).ok()?;
        let point = key.to_encoded_point(false);
        let jwk = serde_json::json!({
            "kty": "EC",
            "crv": "P-256",
            "x": URL_SAFE_NO_PAD.encode(point.x()?),
            "y": URL_SAFE_NO_PAD.encode(point.y()?),
        });
        (serde_json::from_value::<Jwk>(jwk).ok()?, Algorithm::ES256)
    };
    let kid = jwk.thumbprint(ThumbprintHash::SHA256);
    jwk.common.key_id = Some(kid);
    jwk.common.public_key_use = Some(PublicKeyUse::Signature);
    jwk.common.key_algorithm = Some(match algorithm {
        Algorithm::ES256 => KeyAlgorithm::ES256,
        _ => KeyAlgorithm::RS256,
    });
    Some((jwk, algorithm))
}

pub struct SigningKey {
    /// Parsed once: `jsonwebtoken::encode` would re-parse the key on every signature, which
    /// costs more than the signature itself for EC keys (see bench/README.md).
    private: PrivateKey,
    /// `base64url(header) + "."`, the same for every token this key signs.
    header_prefix: String,
    algorithm: Algorithm,
    /// RFC 7638 thumbprint, so the same key always gets the same `kid`.
    kid: String,
    public_jwk: Jwk,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKey").field("kid", &self.kid).field("algorithm", &self.algorithm).finish()
    }
}

impl SigningKey {
    pub fn from_pem_file(path: &Path) -> Result<Self, SigningKeyError> {
        let pem = std::fs::read(path).map_err(|source| SigningKeyError::Read { path: path.display().to_string(), source })?;
        Self::from_pem(&pem).ok_or_else(|| SigningKeyError::Unsupported { path: path.display().to_string() })
    }

    /// Loads the key, generating an RSA key at `path` first when it is missing and `generate` is
    /// set (dev mode only: production keys are provisioned, never conjured).
    pub fn load_or_generate(path: &Path, generate: bool) -> Result<Self, SigningKeyError> {
        if generate && !path.exists() {
            write_new_rsa_key(path)?;
        }
        Self::from_pem_file(path)
    }

    pub fn from_pem(pem: &[u8]) -> Option<Self> {
        let text = std::str::from_utf8(pem).ok()?;
        let (encoding, algorithm) = if let Ok(key) = EncodingKey::from_rsa_pem(pem) {
            (key, Algorithm::RS256)
        } else if text.contains("BEGIN PRIVATE KEY") || text.contains("BEGIN EC PRIVATE KEY") {
            (EncodingKey::from_ec_pem(pem).ok()?, Algorithm::ES256)
        } else {
            return None;
        };
        let private = PrivateKey::from_pem(text, algorithm)?;
        let mut public_jwk = Jwk::from_encoding_key(&encoding, algorithm).ok()?;
        let kid = public_jwk.thumbprint(ThumbprintHash::SHA256);
        public_jwk.common.key_id = Some(kid.clone());
        public_jwk.common.public_key_use = Some(PublicKeyUse::Signature);
        public_jwk.common.key_algorithm = Some(match algorithm {
            Algorithm::ES256 => KeyAlgorithm::ES256,
            _ => KeyAlgorithm::RS256,
        });
        let mut header = Header::new(algorithm);
        header.kid = Some(kid.clone());
        header.typ = Some("JWT".into());
        let header_prefix = format!("{}.", URL_SAFE_NO_PAD.encode(serde_json::to_vec(&header).ok()?));
        Some(Self { private, header_prefix, algorithm, kid, public_jwk })
    }

    pub fn kid(&self) -> &str {
        &self.kid
    }

    pub fn algorithm(&self) -> Algorithm {
        self.algorithm
    }

    pub fn public_jwk(&self) -> &Jwk {
        &self.public_jwk
    }

    pub fn sign<T: Serialize>(&self, claims: &T) -> Result<String, SigningKeyError> {
        let claims = serde_json::to_vec(claims).map_err(|e| SigningKeyError::Remote(format!("claims: {e}")))?;
        let mut token = String::with_capacity(self.header_prefix.len() + claims.len() * 4 / 3 + 400);
        token.push_str(&self.header_prefix);
        URL_SAFE_NO_PAD.encode_string(&claims, &mut token);
        let signature = self.private.sign(token.as_bytes())?;
        token.push('.');
        URL_SAFE_NO_PAD.encode_string(signature, &mut token);
        Ok(token)
    }
}

enum PrivateKey {
    Ecdsa(ring::signature::EcdsaKeyPair),
    Rsa(ring::signature::RsaKeyPair),
}

impl PrivateKey {
    fn from_pem(text: &str, algorithm: Algorithm) -> Option<Self> {
        let random = ring::rand::SystemRandom::new();
        match algorithm {
            Algorithm::ES256 => {
                use p256::elliptic_curve::sec1::ToEncodedPoint;
                use p256::pkcs8::DecodePrivateKey;
                let key = p256::SecretKey::from_pkcs8_pem(text).or_else(|_| p256::SecretKey::from_sec1_pem(text)).ok()?;
                let public = key.public_key().to_encoded_point(false);
                ring::signature::EcdsaKeyPair::from_private_key_and_public_key(
                    &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
                    &key.to_bytes(),
                    public.as_bytes(),
                    &random,
                )
                .ok()
                .map(PrivateKey::Ecdsa)
            }
            _ => {
                use rsa::pkcs1::{DecodeRsaPrivateKey, EncodeRsaPrivateKey};
                use rsa::pkcs8::DecodePrivateKey;
                let key = rsa::RsaPrivateKey::from_pkcs8_pem(text).or_else(|_| rsa::RsaPrivateKey::from_pkcs1_pem(text)).ok()?;
                let der = key.to_pkcs1_der().ok()?;
                ring::signature::RsaKeyPair::from_der(der.as_bytes()).ok().map(PrivateKey::Rsa)
            }
        }
    }

    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, SigningKeyError> {
        let random = ring::rand::SystemRandom::new();
        let failed = |_| SigningKeyError::Remote("the signing key refused to sign".into());
        match self {
            PrivateKey::Ecdsa(key) => Ok(key.sign(&random, message).map_err(failed)?.as_ref().to_vec()),
            PrivateKey::Rsa(key) => {
                let mut signature = vec![0; key.public().modulus_len()];
                key.sign(&ring::signature::RSA_PKCS1_SHA256, &random, message, &mut signature).map_err(failed)?;
                Ok(signature)
            }
        }
    }
}

fn write_new_rsa_key(path: &Path) -> Result<(), SigningKeyError> {
    use rsa::pkcs8::{EncodePrivateKey, LineEnding};
    let key = rsa::RsaPrivateKey::new(&mut rand::thread_rng(), 2048).map_err(|e| SigningKeyError::Generate(e.to_string()))?;
    let pem = key.to_pkcs8_pem(LineEnding::LF).map_err(|e| SigningKeyError::Generate(e.to_string()))?;
    let write_error = |source| SigningKeyError::Write { path: path.display().to_string(), source };
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(write_error)?;
    }
    write_private_file(path, pem.as_bytes()).map_err(write_error)
}

/// Private keys are created readable by their owner only.
fn write_private_file(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    options.open(path)?.write_all(contents)
}
