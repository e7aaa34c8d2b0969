//! RS256/384/512 signature checks with `ring`. GitLab signs job tokens RS256, so this check runs
//! on every exchange; `ring` does it several times faster than the pure-Rust `rsa` crate that
//! jsonwebtoken's default provider uses (see bench/README.md). Claims validation and other
//! algorithms stay with jsonwebtoken's own provider; the broker never signs through it
//! (`signing` signs with `ring`).

use std::sync::OnceLock;

use jsonwebtoken::crypto::{rust_crypto, CryptoProvider, JwtVerifier};
use jsonwebtoken::errors::Result;
use jsonwebtoken::signature::{Error as SignatureError, Verifier};
use jsonwebtoken::{Algorithm, DecodingKey, DecodingKeyKind};
use ring::signature::{RsaParameters, RsaPublicKeyComponents, UnparsedPublicKey};

/// Makes this the process's jsonwebtoken provider. Idempotent; if something used jsonwebtoken
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

fn new_verifier(algorithm: &Algorithm, key: &DecodingKey) -> Result<Box<dyn JwtVerifier>> {
    let parameters: &'static RsaParameters = match algorithm {
        Algorithm::RS256 => &ring::signature::RSA_PKCS1_2048_8192_SHA256,
        Algorithm::RS384 => &ring::signature::RSA_PKCS1_2048_8192_SHA384,
        Algorithm::RS512 => &ring::signature::RSA_PKCS1_2048_8192_SHA512,
        _ => return (rust_crypto::DEFAULT_PROVIDER.verifier_factory)(algorithm, key),
    };
    let key = match key.kind() {
        DecodingKeyKind::RsaModulusExponent { n, e } => RsaKey::Components { n: n.clone(), e: e.clone() },
        DecodingKeyKind::SecretOrDer(der) => RsaKey::Pkcs1Der(der.clone()),
    };
    Ok(Box::new(RsaVerifier { algorithm: *algorithm, parameters, key }))
}

enum RsaKey {
    Components { n: Vec<u8>, e: Vec<u8> },
    Pkcs1Der(Vec<u8>),
}

struct RsaVerifier {
    algorithm: Algorithm,
    parameters: &'static RsaParameters,
    key: RsaKey,
}

impl Verifier<Vec<u8>> for RsaVerifier {
    fn verify(&self, message: &[u8], signature: &Vec<u8>) -> std::result::Result<(), SignatureError> {
        let checked = match &self.key {
            RsaKey::Components { n, e } => RsaPublicKeyComponents { n, e }.verify(self.parameters, message, signature),
            RsaKey::Pkcs1Der(der) => UnparsedPublicKey::new(self.parameters, der).verify(message, signature),
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
}
