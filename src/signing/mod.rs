//! Keys the broker signs with (Kafka tokens, Gogs delivery tokens, the dev issuer, Snowflake
//! key-pair JWTs), parsed once and used through aws-lc-rs, and `p256`'s constant-time scalar
//! arithmetic where an ES256 signature is finished from a prepared nonce: the `rsa` crate's
//! private-key operations are not constant-time (RUSTSEC-2023-0071), so no secret key ever
//! reaches it.
//! aws-lc-rs rather than ring because it is what checks the job token's RSA signature
//! (`oidc/rsa_verify.rs`), and because its ES256 signature, one per Kafka token, costs about
//! 0.94× ring's (`cargo bench --bench es256_sign`). Most ES256 signatures are finished from a
//! nonce prepared ahead instead ([`es256`]), which takes their cost off the request's path.
//! The private half never leaves these structs; the public half is what `/.well-known/jwks.json` serves.
//! [`Signer`] hides where a key lives: a local PEM file ([`LocalSigner`]) or a Vault transit
//! key (`TransitSigner` in the Vault module), so every broker-signed JWT can use either.

pub mod es256;

use std::path::Path;

use async_trait::async_trait;
use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{EcdsaKeyPair, KeyPair, RsaKeyPair};
use jsonwebtoken::jwk::{Jwk, KeyAlgorithm, PublicKeyUse, ThumbprintHash};
use jsonwebtoken::{Algorithm, Header};
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
    /// A signer outside this process (Vault transit) failed; the message is safe to show.
    #[error("{0}")]
    Remote(String),
}

/// A JWT's claims as the JSON a signer encodes, serialised once, straight from the struct the
/// caller built.
pub struct JwtClaims(Vec<u8>);

impl JwtClaims {
    /// Claims are structs and string-keyed maps, which always serialise.
    pub fn new(claims: &impl Serialize) -> Self {
        Self(serde_json::to_vec(claims).expect("JWT claims serialise"))
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

/// A compact JWS and the `kid` its header names.
pub struct SignedToken {
    pub token: String,
    pub kid: String,
}

#[async_trait]
pub trait Signer: Send + Sync {
    /// Signs `claims` as a JWT (`typ` JWT, `kid` of the signing key).
    async fn sign(&self, claims: &JwtClaims) -> Result<SignedToken, SigningKeyError>;
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
    async fn sign(&self, claims: &JwtClaims) -> Result<SignedToken, SigningKeyError> {
        Ok(SignedToken { token: self.current.sign_claims(claims)?, kid: self.current.kid().to_owned() })
    }

    fn published_keys(&self) -> Vec<Jwk> {
        std::iter::once(&self.current).chain(&self.retired).map(|key| key.public_jwk().clone()).collect()
    }
}

/// A public JWK for a key held elsewhere, with its RFC 7638 thumbprint as `kid` (the same rule
/// local keys follow). Accepts SPKI PEM (`BEGIN PUBLIC KEY`) for RSA and EC P-256.
pub fn public_jwk_from_pem(pem: &str) -> Option<(Jwk, Algorithm)> {
    use p256::pkcs8::DecodePublicKey;
    use spki::der::{Decode, Document};
    if let Ok(key) = p256::PublicKey::from_public_key_pem(pem) {
        return Some(published_jwk(ec_jwk(&key)?, Algorithm::ES256));
    }
    let (label, document) = Document::from_pem(pem).ok()?;
    let info = spki::SubjectPublicKeyInfoRef::from_der(document.as_bytes()).ok().filter(|_| label == "PUBLIC KEY")?;
    if info.algorithm.oid != pkcs1::ALGORITHM_OID {
        return None;
    }
    let key = pkcs1::RsaPublicKey::from_der(info.subject_public_key.as_bytes()?).ok()?;
    Some(published_jwk(rsa_jwk(key.modulus.as_bytes(), key.public_exponent.as_bytes())?, Algorithm::RS256))
}

/// `n` and `e`: big-endian, without leading zeros (RFC 7518 section 6.3.1).
fn rsa_jwk(modulus: &[u8], exponent: &[u8]) -> Option<Jwk> {
    let jwk = serde_json::json!({ "kty": "RSA", "n": URL_SAFE_NO_PAD.encode(modulus), "e": URL_SAFE_NO_PAD.encode(exponent) });
    serde_json::from_value(jwk).ok()
}

fn ec_jwk(key: &p256::PublicKey) -> Option<Jwk> {
    use p256::elliptic_curve::sec1::ToEncodedPoint;
    let point = key.to_encoded_point(false);
    let jwk = serde_json::json!({
        "kty": "EC",
        "crv": "P-256",
        "x": URL_SAFE_NO_PAD.encode(point.x()?),
        "y": URL_SAFE_NO_PAD.encode(point.y()?),
    });
    serde_json::from_value(jwk).ok()
}

/// The JWK as the JWKS serves it: `kid` is its RFC 7638 thumbprint, so the same key always
/// gets the same `kid`, wherever it is held.
fn published_jwk(mut jwk: Jwk, algorithm: Algorithm) -> (Jwk, Algorithm) {
    jwk.common.key_id = Some(jwk.thumbprint(ThumbprintHash::SHA256));
    jwk.common.public_key_use = Some(PublicKeyUse::Signature);
    jwk.common.key_algorithm = Some(match algorithm {
        Algorithm::ES256 => KeyAlgorithm::ES256,
        _ => KeyAlgorithm::RS256,
    });
    (jwk, algorithm)
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

    /// Loads the key, generating one at `path` first when it is missing and `generate` is set
    /// (dev mode only: production keys are provisioned, never conjured).
    pub fn load_or_generate(path: &Path, generate: bool) -> Result<Self, SigningKeyError> {
        if generate && !path.exists() {
            write_new_key(path)?;
        }
        Self::from_pem_file(path)
    }

    /// A PKCS#8 (`BEGIN PRIVATE KEY`, RSA or EC P-256), PKCS#1 (`BEGIN RSA PRIVATE KEY`) or
    /// SEC1 (`BEGIN EC PRIVATE KEY`) PEM key.
    pub fn from_pem(pem: &[u8]) -> Option<Self> {
        let private = PrivateKey::from_pem(std::str::from_utf8(pem).ok()?).ok()?;
        let (public_jwk, algorithm) = published_jwk(private.public_jwk()?, private.algorithm());
        let kid = public_jwk.common.key_id.clone()?;
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
        self.sign_claims(&JwtClaims::new(claims))
    }

    pub fn sign_claims(&self, claims: &JwtClaims) -> Result<String, SigningKeyError> {
        compact_jws(&self.header_prefix, claims, |message| self.private.sign(message))
    }
}

/// `header_prefix` (`base64url(header) + "."`), the claims, and the signature over both.
fn compact_jws(
    header_prefix: &str,
    claims: &JwtClaims,
    sign: impl FnOnce(&[u8]) -> Result<Vec<u8>, SigningKeyError>,
) -> Result<String, SigningKeyError> {
    let claims = claims.as_bytes();
    let mut token = String::with_capacity(header_prefix.len() + claims.len() * 4 / 3 + 400);
    token.push_str(header_prefix);
    URL_SAFE_NO_PAD.encode_string(claims, &mut token);
    let signature = sign(token.as_bytes())?;
    token.push('.');
    URL_SAFE_NO_PAD.encode_string(signature, &mut token);
    Ok(token)
}

/// An RSA private key that signs RS256 (RSASSA-PKCS1-v1_5 with SHA-256), for
/// JWTs whose header a peer prescribes (Snowflake's key-pair JWT has no `kid`).
pub struct RsaSigningKey {
    key: RsaKeyPair,
    header_prefix: String,
}

impl RsaSigningKey {
    /// A PKCS#8 (`BEGIN PRIVATE KEY`) or PKCS#1 (`BEGIN RSA PRIVATE KEY`) PEM RSA key; the
    /// error says what the PEM is instead ("is not a PEM file").
    pub fn from_pem(pem: &str) -> Result<Self, String> {
        let PrivateKey::Rsa(key) = PrivateKey::from_pem(pem)? else { return Err("is an EC key, not an RSA key".into()) };
        let header = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&Header::new(Algorithm::RS256)).map_err(|e| e.to_string())?);
        Ok(Self { key, header_prefix: format!("{header}.") })
    }

    /// The public key as a DER SubjectPublicKeyInfo (what `openssl rsa -pubout -outform DER` prints).
    pub fn public_key_der(&self) -> Option<Vec<u8>> {
        use spki::der::Encode;
        let info = spki::SubjectPublicKeyInfoRef {
            algorithm: pkcs1::ALGORITHM_ID,
            subject_public_key: spki::der::asn1::BitStringRef::from_bytes(self.key.public_key().as_ref()).ok()?,
        };
        info.to_der().ok()
    }

    /// A JWT with header `{"typ":"JWT","alg":"RS256"}`.
    pub fn sign<T: Serialize>(&self, claims: &T) -> Result<String, SigningKeyError> {
        compact_jws(&self.header_prefix, &JwtClaims::new(claims), |message| sign_rs256(&self.key, message))
    }
}

/// PKCS#1 v1.5 padding is deterministic: the same key and message always give the same signature.
fn sign_rs256(key: &RsaKeyPair, message: &[u8]) -> Result<Vec<u8>, SigningKeyError> {
    let mut signature = vec![0; key.public_modulus_len()];
    key.sign(&aws_lc_rs::signature::RSA_PKCS1_SHA256, &SystemRandom::new(), message, &mut signature)
        .map_err(|_| SigningKeyError::Remote("the signing key refused to sign".into()))?;
    Ok(signature)
}

enum PrivateKey {
    /// The same P-256 key twice: aws-lc-rs's, to sign whole, and `p256`'s scalar, to finish a
    /// presignature ([`es256`]). `SecretKey` wipes itself when dropped.
    Ecdsa(EcdsaKeyPair, p256::SecretKey),
    Rsa(RsaKeyPair),
}

impl PrivateKey {
    /// Parsed by aws-lc-rs (RSA) and `p256` (EC); the PEM armour by `der`, into memory that
    /// is wiped when dropped. The error says what the PEM is instead.
    fn from_pem(text: &str) -> Result<Self, String> {
        use p256::pkcs8::DecodePrivateKey;
        let (label, document) = spki::der::SecretDocument::from_pem(text).map_err(|_| "is not a PEM file".to_owned())?;
        let der = document.as_bytes();
        let unusable = |rejected: String| format!("is not a key this broker signs with ({rejected}): RSA of 2048 to 4096 bits, or EC P-256");
        match label {
            "PRIVATE KEY" => match p256::SecretKey::from_pkcs8_der(der) {
                Ok(key) => Self::ecdsa(&key).map_err(unusable),
                Err(_) => Self::rsa(RsaKeyPair::from_pkcs8(der)).map_err(unusable),
            },
            "RSA PRIVATE KEY" => Self::rsa(RsaKeyPair::from_der(der)).map_err(unusable),
            "EC PRIVATE KEY" => {
                Self::ecdsa(&p256::SecretKey::from_sec1_der(der).map_err(|_| "is not an EC P-256 key".to_owned())?).map_err(unusable)
            }
            other => Err(format!("holds a {other:?}, not a private key")),
        }
    }

    fn ecdsa(key: &p256::SecretKey) -> Result<Self, String> {
        use p256::elliptic_curve::sec1::ToEncodedPoint;
        let public = key.public_key().to_encoded_point(false);
        EcdsaKeyPair::from_private_key_and_public_key(&aws_lc_rs::signature::ECDSA_P256_SHA256_FIXED_SIGNING, &key.to_bytes(), public.as_bytes())
            .map(|pair| PrivateKey::Ecdsa(pair, key.clone()))
            .map_err(|rejected| rejected.to_string())
    }

    /// aws-lc-rs takes RSA keys of up to 8192 bits; the broker keeps to what it documents
    /// (README, "Snowflake key-pair"), which every JWT verifier it signs for accepts.
    fn rsa(parsed: Result<RsaKeyPair, aws_lc_rs::error::KeyRejected>) -> Result<Self, String> {
        let key = parsed.map_err(|rejected| rejected.to_string())?;
        match key.public_modulus_len() * 8 {
            2048..=4096 => Ok(PrivateKey::Rsa(key)),
            bits => Err(format!("a {bits}-bit RSA key")),
        }
    }

    fn algorithm(&self) -> Algorithm {
        match self {
            PrivateKey::Ecdsa(..) => Algorithm::ES256,
            PrivateKey::Rsa(_) => Algorithm::RS256,
        }
    }

    fn public_jwk(&self) -> Option<Jwk> {
        match self {
            PrivateKey::Ecdsa(key, _) => ec_jwk(&p256::PublicKey::from_sec1_bytes(key.public_key().as_ref()).ok()?),
            PrivateKey::Rsa(key) => {
                use pkcs1::der::Decode;
                // aws-lc-rs gives the public key as a PKCS#1 RSAPublicKey.
                let public = pkcs1::RsaPublicKey::from_der(key.public_key().as_ref()).ok()?;
                rsa_jwk(public.modulus.as_bytes(), public.public_exponent.as_bytes())
            }
        }
    }

    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, SigningKeyError> {
        match self {
            PrivateKey::Ecdsa(key, scalar) => sign_es256(key, scalar, es256::POOL.take(), message),
            PrivateKey::Rsa(key) => sign_rs256(key, message),
        }
    }
}

/// ES256 from a presignature when one is ready ([`es256`]), else made whole by aws-lc-rs.
fn sign_es256(key: &EcdsaKeyPair, scalar: &p256::SecretKey, presignature: Option<es256::Presignature>, message: &[u8]) -> Result<Vec<u8>, SigningKeyError> {
    let prepared = presignature.and_then(|presignature| presignature.finish(&scalar.to_nonzero_scalar(), message));
    crate::metrics::count_es256_signature(prepared.is_some());
    match prepared {
        Some(signature) => Ok(signature.to_vec()),
        None => Ok(key
            .sign(&SystemRandom::new(), message)
            .map_err(|_| SigningKeyError::Remote("the signing key refused to sign".into()))?
            .as_ref()
            .to_vec()),
    }
}

/// An EC P-256 key (ES256): nothing in dev mode needs RSA, and an EC key is generated at once.
fn write_new_key(path: &Path) -> Result<(), SigningKeyError> {
    use p256::pkcs8::{EncodePrivateKey, LineEnding};
    let key = p256::SecretKey::random(&mut rand::rngs::OsRng);
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

#[cfg(test)]
mod tests {
    use jsonwebtoken::jwk::ThumbprintHash;
    use jsonwebtoken::EncodingKey;

    use super::*;

    /// What jsonwebtoken makes of the same private key, as the JWKS showed it before keys were
    /// parsed without the `rsa` crate: a key keeps its `kid` across the change.
    fn jsonwebtoken_kid(pem: &str, algorithm: Algorithm) -> String {
        let encoding = match algorithm {
            Algorithm::ES256 => EncodingKey::from_ec_pem(pem.as_bytes()).unwrap(),
            _ => EncodingKey::from_rsa_pem(pem.as_bytes()).unwrap(),
        };
        Jwk::from_encoding_key(&encoding, algorithm).unwrap().thumbprint(ThumbprintHash::SHA256)
    }

    #[test]
    fn every_key_format_keeps_its_kid_and_its_public_pem_gives_the_same_jwk() {
        use rsa::pkcs1::EncodeRsaPrivateKey;
        use rsa::pkcs8::{EncodePrivateKey, EncodePublicKey, LineEnding};
        crate::oidc::install_crypto_provider();
        let rsa_key = rsa::RsaPrivateKey::new(&mut rand::thread_rng(), 2048).unwrap();
        let rsa_public = rsa_key.to_public_key().to_public_key_pem(LineEnding::LF).unwrap();
        let ec_key = p256::SecretKey::random(&mut rand::rngs::OsRng);
        let ec_public = ec_key.public_key().to_public_key_pem(LineEnding::LF).unwrap();
        let ec_sec1 = ec_key.to_sec1_pem(LineEnding::LF).unwrap();
        let rsa_pkcs8 = rsa_key.to_pkcs8_pem(LineEnding::LF).unwrap().to_string();
        let ec_pkcs8 = ec_key.to_pkcs8_pem(LineEnding::LF).unwrap().to_string();
        let (rsa_kid, ec_kid) = (jsonwebtoken_kid(&rsa_pkcs8, Algorithm::RS256), jsonwebtoken_kid(&ec_pkcs8, Algorithm::ES256));
        let cases = [
            (rsa_pkcs8.clone(), Algorithm::RS256, &rsa_kid, &rsa_public),
            (rsa_key.to_pkcs1_pem(LineEnding::LF).unwrap().to_string(), Algorithm::RS256, &rsa_kid, &rsa_public),
            (ec_pkcs8.clone(), Algorithm::ES256, &ec_kid, &ec_public),
            (ec_sec1.to_string(), Algorithm::ES256, &ec_kid, &ec_public),
        ];
        for (pem, algorithm, kid, public_pem) in cases {
            let key = SigningKey::from_pem(pem.as_bytes()).unwrap();
            assert_eq!(key.algorithm(), algorithm);
            assert_eq!(key.kid(), kid, "{pem}");
            let (from_public, public_algorithm) = public_jwk_from_pem(public_pem).unwrap();
            assert_eq!((&from_public, public_algorithm), (key.public_jwk(), algorithm));
            // Signed by aws-lc-rs, checked by jsonwebtoken against the published JWK.
            let token = key.sign(&serde_json::json!({"sub": "job", "exp": 4_000_000_000u64})).unwrap();
            let mut validation = jsonwebtoken::Validation::new(algorithm);
            validation.validate_aud = false;
            let decoding = jsonwebtoken::DecodingKey::from_jwk(key.public_jwk()).unwrap();
            jsonwebtoken::decode::<serde_json::Value>(&token, &decoding, &validation).unwrap();
        }
    }

    #[test]
    fn es256_signs_alike_from_a_prepared_nonce_and_at_once() {
        let secret = p256::SecretKey::random(&mut rand::rngs::OsRng);
        let PrivateKey::Ecdsa(key, scalar) = PrivateKey::ecdsa(&secret).unwrap() else { unreachable!() };
        let public = key.public_key().as_ref().to_vec();
        for presignature in [es256::prepare(1).pop(), None] {
            let prepared = presignature.is_some();
            let message = b"eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJqb2IifQ";
            let signature = sign_es256(&key, &scalar, presignature, message).unwrap();
            assert_eq!(signature.len(), 64, "r and s, 32 bytes each (RFC 7518 section 3.4)");
            // ring: a verifier the broker does not sign with.
            ring::signature::UnparsedPublicKey::new(&ring::signature::ECDSA_P256_SHA256_FIXED, &public)
                .verify(message, &signature)
                .unwrap_or_else(|_| panic!("prepared: {prepared}"));
            let text = crate::metrics::Metrics::default().render();
            let nonce = if prepared { "prepared" } else { "at_once" };
            assert!(text.contains(&format!("credbroker_es256_signatures_total{{nonce=\"{nonce}\"}} 1")), "{text}");
        }
    }

    #[test]
    fn what_is_not_a_usable_private_key_is_refused() {
        use rsa::pkcs8::{EncodePrivateKey, EncodePublicKey, LineEnding};
        let small = rsa::RsaPrivateKey::new(&mut rand::thread_rng(), 1024).unwrap();
        let public = small.to_public_key().to_public_key_pem(LineEnding::LF).unwrap();
        for pem in [small.to_pkcs8_pem(LineEnding::LF).unwrap().to_string(), public, "garbage".into(), String::new()] {
            assert!(SigningKey::from_pem(pem.as_bytes()).is_none(), "{pem}");
        }
        assert!(public_jwk_from_pem("-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n").is_none());
    }

    /// aws-lc-rs would sign with it; the documented range (README, "Snowflake key-pair") ends at 4096.
    #[test]
    fn an_rsa_key_over_4096_bits_is_refused_with_its_size() {
        use rsa::pkcs8::{EncodePrivateKey, LineEnding};
        let large = rsa::RsaPrivateKey::new(&mut rand::thread_rng(), 4160).unwrap();
        let pem = large.to_pkcs8_pem(LineEnding::LF).unwrap();
        assert!(SigningKey::from_pem(pem.as_bytes()).is_none());
        let refused = RsaSigningKey::from_pem(&pem).err().unwrap();
        assert!(refused.contains("a 4160-bit RSA key") && refused.contains("2048 to 4096 bits"), "{refused}");
    }

    #[test]
    fn generated_dev_keys_are_private_p256_keys() {
        let dir = std::env::temp_dir().join(format!("credbroker-signing-{}", uuid::Uuid::new_v4().simple()));
        let path = dir.join("keys/dev.pem");
        let key = SigningKey::load_or_generate(&path, true).unwrap();
        assert_eq!(key.algorithm(), Algorithm::ES256);
        assert_eq!(SigningKey::load_or_generate(&path, true).unwrap().kid(), key.kid(), "generated once, then loaded");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        }
        std::fs::remove_dir_all(dir).unwrap();
    }
}
