//! RS256/384/512 signature checks with aws-lc-rs. GitLab signs job tokens RS256, so this check
//! runs on every exchange. An issuer's keys are parsed once, when its key set is fetched
//! ([`RsaKey`]): ring, which the broker used before, parses the key again at every check, and
//! aws-lc-rs checks a parsed key in about three quarters of ring's time (bench/README.md, tenth
//! session). Both are several times faster than the pure-Rust `rsa` crate that jsonwebtoken's
//! default provider uses. Claims validation and other algorithms stay with jsonwebtoken's own
//! provider; the broker never signs through it (`signing` signs with aws-lc-rs too).

use std::sync::OnceLock;

use aws_lc_rs::signature::{ParsedPublicKey, RsaParameters, RsaPublicKeyComponents, UnparsedPublicKey};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use jsonwebtoken::crypto::{rust_crypto, CryptoProvider, JwtVerifier};
use jsonwebtoken::errors::Result;
use jsonwebtoken::jwk::{AlgorithmParameters, Jwk};
use jsonwebtoken::signature::{Error as SignatureError, Verifier};
use jsonwebtoken::{Algorithm, DecodingKey, DecodingKeyKind};

/// Makes this the process's jsonwebtoken provider, for RSA checks outside the job-token path
/// (the Gogs delivery tokens, audit checkpoints). Idempotent; if something used jsonwebtoken
/// before, its default stays (correct, only slower), and we say so.
pub fn install() {
    static PROVIDER: OnceLock<CryptoProvider> = OnceLock::new();
    let provider = PROVIDER.get_or_init(|| CryptoProvider {
        signer_factory: rust_crypto::DEFAULT_PROVIDER.signer_factory,
        verifier_factory: new_verifier,
        jwk_utils: rust_crypto::DEFAULT_PROVIDER.jwk_utils.clone(),
    });
    if let Err(installed) = provider.install_default() {
        if !std::ptr::eq(installed, provider) {
            tracing::debug!("jsonwebtoken's crypto provider was chosen before ours; RSA checks use it");
        }
    }
}

fn parameters(algorithm: Algorithm) -> Option<&'static RsaParameters> {
    match algorithm {
        Algorithm::RS256 => Some(&aws_lc_rs::signature::RSA_PKCS1_2048_8192_SHA256),
        Algorithm::RS384 => Some(&aws_lc_rs::signature::RSA_PKCS1_2048_8192_SHA384),
        Algorithm::RS512 => Some(&aws_lc_rs::signature::RSA_PKCS1_2048_8192_SHA512),
        _ => None,
    }
}

/// An issuer's RSA key, parsed once for each RS algorithm it may verify.
pub struct RsaKey {
    parsed: Vec<(Algorithm, ParsedPublicKey)>,
}

impl RsaKey {
    /// None for a key that is not RSA or that aws-lc cannot parse: jsonwebtoken then checks it
    /// as before. A key under 2048 bits parses, but verifies nothing (RSA_PKCS1_2048_8192).
    pub fn from_jwk(jwk: &Jwk, algorithms: &[Algorithm]) -> Option<Self> {
        let AlgorithmParameters::RSA(rsa) = &jwk.algorithm else { return None };
        let modulus = URL_SAFE_NO_PAD.decode(&rsa.n).ok()?;
        let exponent = URL_SAFE_NO_PAD.decode(&rsa.e).ok()?;
        let der = pkcs1_der(&modulus, &exponent)?;
        let parsed = algorithms
            .iter()
            .filter_map(|algorithm| Some((*algorithm, ParsedPublicKey::new(parameters(*algorithm)?, &der).ok()?)))
            .collect::<Vec<_>>();
        (!parsed.is_empty()).then_some(Self { parsed })
    }

    /// Checks `signature` (base64url, as in the token) over `message`, as
    /// `jsonwebtoken::crypto::verify` does; None if this key was not parsed for `algorithm`.
    pub fn verify(&self, algorithm: Algorithm, message: &[u8], signature: &str) -> Option<Result<bool>> {
        let (_, key) = self.parsed.iter().find(|(parsed_for, _)| *parsed_for == algorithm)?;
        Some(URL_SAFE_NO_PAD.decode(signature).map_err(Into::into).map(|signature| key.verify_sig(message, &signature).is_ok()))
    }
}

/// The RSAPublicKey structure (RFC 8017 appendix A.1.1) that aws-lc parses.
fn pkcs1_der(modulus: &[u8], exponent: &[u8]) -> Option<Vec<u8>> {
    use pkcs1::der::Encode;
    let key = pkcs1::RsaPublicKey {
        modulus: pkcs1::UintRef::new(modulus).ok()?,
        public_exponent: pkcs1::UintRef::new(exponent).ok()?,
    };
    key.to_der().ok()
}

fn new_verifier(algorithm: &Algorithm, key: &DecodingKey) -> Result<Box<dyn JwtVerifier>> {
    let Some(parameters) = parameters(*algorithm) else {
        return (rust_crypto::DEFAULT_PROVIDER.verifier_factory)(algorithm, key);
    };
    let key = match key.kind() {
        DecodingKeyKind::RsaModulusExponent { n, e } => Key::Components { n: n.clone(), e: e.clone() },
        DecodingKeyKind::SecretOrDer(der) => Key::Pkcs1Der(der.clone()),
    };
    Ok(Box::new(RsaVerifier { algorithm: *algorithm, parameters, key }))
}

enum Key {
    Components { n: Vec<u8>, e: Vec<u8> },
    Pkcs1Der(Vec<u8>),
}

struct RsaVerifier {
    algorithm: Algorithm,
    parameters: &'static RsaParameters,
    key: Key,
}

impl Verifier<Vec<u8>> for RsaVerifier {
    fn verify(&self, message: &[u8], signature: &Vec<u8>) -> std::result::Result<(), SignatureError> {
        let checked = match &self.key {
            Key::Components { n, e } => RsaPublicKeyComponents { n, e }.verify(self.parameters, message, signature),
            Key::Pkcs1Der(der) => UnparsedPublicKey::new(self.parameters, der).verify(message, signature),
        };
        checked.map_err(|_| SignatureError::new())
    }
}

impl JwtVerifier for RsaVerifier {
    fn algorithm(&self) -> Algorithm {
        self.algorithm
    }
}

#[cfg(test)]
mod tests {
    use jsonwebtoken::{encode, EncodingKey, Header, Validation};
    use rsa::pkcs8::{EncodePrivateKey, EncodePublicKey, LineEnding};

    #[test]
    fn accepts_genuine_rs256_signatures_and_rejects_tampered_ones() {
        super::install();
        let private = rsa::RsaPrivateKey::new(&mut rand::thread_rng(), 2048).unwrap();
        let private_pem = private.to_pkcs8_pem(LineEnding::LF).unwrap();
        let public_pem = private.to_public_key().to_public_key_pem(LineEnding::LF).unwrap();
        let claims = serde_json::json!({"sub": "job", "exp": 4_000_000_000u64});
        let token = encode(&Header::new(jsonwebtoken::Algorithm::RS256), &claims, &EncodingKey::from_rsa_pem(private_pem.as_bytes()).unwrap()).unwrap();
        let mut validation = Validation::new(jsonwebtoken::Algorithm::RS256);
        validation.validate_aud = false;
        let from_pem = jsonwebtoken::DecodingKey::from_rsa_pem(public_pem.as_bytes()).unwrap();
        assert!(jsonwebtoken::decode::<serde_json::Value>(&token, &from_pem, &validation).is_ok());
        let jwk = jsonwebtoken::jwk::Jwk::from_encoding_key(&EncodingKey::from_rsa_pem(private_pem.as_bytes()).unwrap(), jsonwebtoken::Algorithm::RS256).unwrap();
        let from_jwk = jsonwebtoken::DecodingKey::from_jwk(&jwk).unwrap();
        assert!(jsonwebtoken::decode::<serde_json::Value>(&token, &from_jwk, &validation).is_ok());

        let (body, signature) = token.rsplit_once('.').unwrap();
        let flipped = if signature.starts_with('A') { "B" } else { "A" };
        let tampered = format!("{body}.{flipped}{}", &signature[1..]);
        let error = jsonwebtoken::decode::<serde_json::Value>(&tampered, &from_jwk, &validation).unwrap_err();
        assert_eq!(error.kind(), &jsonwebtoken::errors::ErrorKind::InvalidSignature);
    }

    /// The parsed key checks exactly what jsonwebtoken's path checks: a genuine signature
    /// passes, a changed message or signature fails, a signature that is not base64url is an
    /// error, and an algorithm it was not parsed for is left to jsonwebtoken.
    #[test]
    fn a_key_parsed_once_verifies_like_jsonwebtoken() {
        super::install();
        let jwk_of = |private: &rsa::RsaPrivateKey| {
            let pem = private.to_pkcs8_pem(LineEnding::LF).unwrap();
            jsonwebtoken::jwk::Jwk::from_encoding_key(&EncodingKey::from_rsa_pem(pem.as_bytes()).unwrap(), jsonwebtoken::Algorithm::RS256).unwrap()
        };
        let private = rsa::RsaPrivateKey::new(&mut rand::thread_rng(), 2048).unwrap();
        let jwk = jwk_of(&private);
        let key = super::RsaKey::from_jwk(&jwk, &[jsonwebtoken::Algorithm::RS256, jsonwebtoken::Algorithm::PS256]).unwrap();
        let encoding = EncodingKey::from_rsa_pem(private.to_pkcs8_pem(LineEnding::LF).unwrap().as_bytes()).unwrap();
        let token = encode(&Header::new(jsonwebtoken::Algorithm::RS256), &serde_json::json!({"sub": "job"}), &encoding).unwrap();
        let (signed, signature) = token.rsplit_once('.').unwrap();
        let decoding = jsonwebtoken::DecodingKey::from_jwk(&jwk).unwrap();
        let both = |message: &str, signature: &str| {
            let parsed = key.verify(jsonwebtoken::Algorithm::RS256, message.as_bytes(), signature).unwrap().map_err(|e| e.into_kind());
            let unparsed = jsonwebtoken::crypto::verify(signature, message.as_bytes(), &decoding, jsonwebtoken::Algorithm::RS256).map_err(|e| e.into_kind());
            assert_eq!(format!("{parsed:?}"), format!("{unparsed:?}"), "{message:.20} / {signature:.20}");
            parsed
        };
        assert_eq!(both(signed, signature), Ok(true));
        assert_eq!(both(&signed.replacen('e', "f", 1), signature), Ok(false));
        let flipped = if signature.starts_with('A') { "B" } else { "A" };
        assert_eq!(both(signed, &format!("{flipped}{}", &signature[1..])), Ok(false));
        assert!(matches!(both(signed, "not*base64"), Err(jsonwebtoken::errors::ErrorKind::Base64(_))));
        assert!(key.verify(jsonwebtoken::Algorithm::PS256, signed.as_bytes(), signature).is_none(), "PS256 stays with jsonwebtoken");
        assert!(key.verify(jsonwebtoken::Algorithm::RS384, signed.as_bytes(), signature).is_none(), "not parsed for RS384");

        // Under 2048 bits a key parses, but none of its signatures passes, on either path.
        let short = rsa::RsaPrivateKey::new(&mut rand::thread_rng(), 1024).unwrap();
        let short_key = super::RsaKey::from_jwk(&jwk_of(&short), &[jsonwebtoken::Algorithm::RS256]).unwrap();
        let short_encoding = EncodingKey::from_rsa_pem(short.to_pkcs8_pem(LineEnding::LF).unwrap().as_bytes()).unwrap();
        let short_token = encode(&Header::new(jsonwebtoken::Algorithm::RS256), &serde_json::json!({"sub": "job"}), &short_encoding).unwrap();
        let (signed, signature) = short_token.rsplit_once('.').unwrap();
        assert!(matches!(short_key.verify(jsonwebtoken::Algorithm::RS256, signed.as_bytes(), signature), Some(Ok(false))));
        let short_decoding = jsonwebtoken::DecodingKey::from_jwk(&jwk_of(&short)).unwrap();
        assert!(matches!(jsonwebtoken::crypto::verify(signature, signed.as_bytes(), &short_decoding, jsonwebtoken::Algorithm::RS256), Ok(false)));
    }
}
