//! Verifies job tokens: only configured issuers, only asymmetric algorithms their keys
//! declare, no critical header extensions, `iss`/`aud`/`exp`/`nbf`/`iat` checked with bounded
//! leeway. No network call happens before the claimed issuer is known to be one of ours.

mod fetch;
mod keys;
mod rsa_verify;

pub use rsa_verify::install as install_crypto_provider;

use std::collections::HashMap;
use std::time::Duration;

use base64::Engine;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::Algorithm;
use serde_json::Value;
use time::OffsetDateTime;

use fetch::DiscoveryClient;
use keys::IssuerKeys;

use crate::config::IssuerConfig;
use crate::types::{sha256_hex, Claims, IssuerName};

/// GitLab tokens are around 1-2 KiB; anything this large is not a job token.
pub const MAX_TOKEN_BYTES: usize = 16 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("token is larger than {MAX_TOKEN_BYTES} bytes")]
    TooLarge,
    #[error("token is malformed: {0}")]
    Malformed(String),
    #[error("issuer {0:?} is not trusted by this broker")]
    UntrustedIssuer(String),
    #[error("algorithm {0:?} is not accepted for this issuer")]
    DisallowedAlgorithm(String),
    #[error("signing key {0:?} is not published by the issuer")]
    UnknownKey(String),
    #[error("issuer keys unavailable: {0}")]
    IssuerUnavailable(String),
    #[error("signature is invalid")]
    BadSignature,
    #[error("token has expired")]
    Expired,
    #[error("token is not valid yet (nbf)")]
    NotYetValid,
    #[error("token was issued in the future (iat)")]
    IssuedInFuture,
    #[error("token audience does not include {0:?}")]
    WrongAudience(String),
    #[error("token lacks required claim `{0}`")]
    MissingClaim(String),
    #[error("token is invalid: {0}")]
    Invalid(String),
}

/// A job token whose signature and time claims have been checked.
#[derive(Debug, Clone)]
pub struct VerifiedToken {
    pub issuer: IssuerName,
    pub subject: String,
    pub jti: String,
    /// The token's `exp`: for a GitLab job, job start plus the job's timeout.
    pub job_deadline: OffsetDateTime,
    pub claims: std::sync::Arc<Claims>,
    /// Lets the audit log tie a decision to a token without storing the token.
    pub token_sha256: String,
}

/// A configured issuer: its keys and what its tokens must carry.
struct TrustedIssuer {
    keys: IssuerKeys,
    require_nbf: bool,
}

pub struct Verifier {
    by_issuer_url: HashMap<String, TrustedIssuer>,
    audience: String,
    leeway_seconds: u64,
}

impl Verifier {
    pub fn new(
        issuers: &[IssuerConfig],
        audience: String,
        leeway_seconds: u64,
        jwks_max_age: Duration,
        jwks_min_refetch: Duration,
        jwks_fetches: crate::metrics::JwksFetches,
    ) -> Result<Self, reqwest::Error> {
        rsa_verify::install();
        let client = DiscoveryClient::new()?;
        let by_issuer_url = issuers
            .iter()
            .map(|issuer| {
                let keys = IssuerKeys::new(issuer, jwks_max_age, jwks_min_refetch, client.clone(), jwks_fetches.clone());
                (issuer.issuer.clone(), TrustedIssuer { keys, require_nbf: issuer.require_nbf })
            })
            .collect();
        Ok(Self { by_issuer_url, audience, leeway_seconds })
    }

    /// The claimed `iss` of a token, read without verification: only to pick the issuer, and
    /// to name an untrusted one in the audit log.
    pub fn claimed_issuer(token: &str) -> Option<String> {
        unverified_claims(token).ok()?.get_str("iss").map(|iss| iss.chars().take(256).collect())
    }

    // Debug level: it runs on every exchange, whose request span names it at info already.
    #[tracing::instrument(level = "debug", skip_all, fields(issuer))]
    pub async fn verify(&self, token: &str, now: OffsetDateTime) -> Result<VerifiedToken, VerifyError> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(VerifyError::TooLarge);
        }
        if token.split('.').count() != 3 {
            return Err(VerifyError::Malformed("a JWT has three parts separated by dots".into()));
        }
        let header = decode_header(token)?;
        let claims = unverified_claims(token)?;
        let claimed_issuer = claims.get_str("iss").ok_or_else(|| VerifyError::MissingClaim("iss".into()))?;
        let trusted = self
            .by_issuer_url
            .get(claimed_issuer)
            .ok_or_else(|| VerifyError::UntrustedIssuer(claimed_issuer.chars().take(256).collect()))?;
        let issuer = &trusted.keys;
        tracing::Span::current().record("issuer", issuer.name.as_str());
        if matches!(header.alg, Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512) {
            return Err(VerifyError::DisallowedAlgorithm(format!("{:?}", header.alg)));
        }
        let kid = header.kid.ok_or_else(|| VerifyError::Malformed("header has no `kid`".into()))?;
        let key = match issuer.lookup(&kid).await {
            keys::Lookup::Found(key) => key,
            keys::Lookup::UnknownKid => return Err(VerifyError::UnknownKey(kid.chars().take(128).collect())),
            keys::Lookup::Unavailable(reason) => return Err(VerifyError::IssuerUnavailable(reason)),
        };
        if !key.algorithms.contains(&header.alg) {
            return Err(VerifyError::DisallowedAlgorithm(format!("{:?}", header.alg)));
        }
        let (signed, signature) = token.rsplit_once('.').ok_or_else(|| VerifyError::Malformed("not a JWT".into()))?;
        // The payload was parsed once, above; only the signature is left, checked on the key
        // parsed when it was fetched if it is RSA, else by jsonwebtoken.
        let checked = match key.rsa.as_ref().and_then(|rsa| rsa.verify(header.alg, signed.as_bytes(), signature)) {
            Some(checked) => checked,
            None => jsonwebtoken::crypto::verify(signature, signed.as_bytes(), &key.key, header.alg),
        };
        match checked {
            Ok(true) => {}
            Ok(false) => return Err(VerifyError::BadSignature),
            Err(error) => return Err(self.map_error(error.into_kind())),
        }
        self.check_registered_claims(&claims, &issuer.issuer, trusted.require_nbf, now)?;

        let issued_at = claims.get("iat").and_then(Value::as_i64).ok_or_else(|| VerifyError::MissingClaim("iat".into()))?;
        if issued_at > now.unix_timestamp() + self.leeway_seconds as i64 {
            return Err(VerifyError::IssuedInFuture);
        }
        let expires_at = claims.get("exp").and_then(Value::as_i64).ok_or_else(|| VerifyError::MissingClaim("exp".into()))?;
        let job_deadline =
            OffsetDateTime::from_unix_timestamp(expires_at).map_err(|_| VerifyError::Invalid("`exp` is out of range".into()))?;
        let subject = non_empty_string(&claims, "sub", 1024)?;
        // Replay protection keys on `jti`; a token without one cannot be bounded.
        let jti = non_empty_string(&claims, "jti", 256)?;
        Ok(VerifiedToken {
            issuer: issuer.name.clone(),
            subject,
            jti,
            job_deadline,
            claims: claims.into(),
            token_sha256: sha256_hex(token.as_bytes()),
        })
    }

    /// RFC 7519 section 4.1, as jsonwebtoken's `Validation` checks it, on the claims the
    /// caller parsed once: `iss`, `aud`, `exp` and `sub` (and `nbf` when the issuer must send
    /// it) present and well-formed, `exp` not past and `nbf` not ahead by more than the leeway,
    /// `iss` the issuer's and `aud` naming this broker.
    fn check_registered_claims(&self, claims: &Claims, issuer: &str, require_nbf: bool, now: OffsetDateTime) -> Result<(), VerifyError> {
        let leeway = self.leeway_seconds as i64;
        let now = now.unix_timestamp();
        // A NumericDate jsonwebtoken would not parse (negative, fractional, not a number) is
        // malformed; one that is absent is missing.
        let numeric_date = |name: &str| match claims.get(name) {
            None => Ok(None),
            Some(value) => value
                .as_u64()
                .and_then(|seconds| i64::try_from(seconds).ok())
                .map(Some)
                .ok_or_else(|| VerifyError::Invalid(format!("`{name}` is not a NumericDate"))),
        };
        let audience = match claims.get_str("aud") {
            Some(audience) => Some(audience == self.audience),
            None => match claims.get("aud") {
                Some(Value::Array(audiences)) if audiences.iter().all(Value::is_string) => {
                    Some(audiences.iter().any(|audience| audience.as_str() == Some(self.audience.as_str())))
                }
                _ => None,
            },
        };
        let issuer_matches = claims.get_str("iss").map(|claimed| claimed == issuer);
        let subject = claims.get_str("sub");
        let (expires, not_before) = (numeric_date("exp"), numeric_date("nbf"));
        for (name, present) in [
            ("iss", issuer_matches.is_some()),
            ("aud", audience.is_some()),
            ("exp", matches!(expires, Ok(Some(_)))),
            ("sub", subject.is_some()),
            ("nbf", !require_nbf || matches!(not_before, Ok(Some(_)))),
        ] {
            if !present {
                return Err(VerifyError::MissingClaim(name.into()));
            }
        }
        if expires?.is_some_and(|exp| exp < now - leeway) {
            return Err(VerifyError::Expired);
        }
        if not_before?.is_some_and(|nbf| nbf > now + leeway) {
            return Err(VerifyError::NotYetValid);
        }
        if issuer_matches != Some(true) {
            return Err(VerifyError::Invalid("issuer mismatch".into()));
        }
        if audience != Some(true) {
            return Err(VerifyError::WrongAudience(self.audience.clone()));
        }
        Ok(())
    }

    fn map_error(&self, kind: ErrorKind) -> VerifyError {
        match kind {
            ErrorKind::InvalidSignature => VerifyError::BadSignature,
            ErrorKind::ExpiredSignature => VerifyError::Expired,
            ErrorKind::ImmatureSignature => VerifyError::NotYetValid,
            ErrorKind::InvalidAudience => VerifyError::WrongAudience(self.audience.clone()),
            ErrorKind::InvalidIssuer => VerifyError::Invalid("issuer mismatch".into()),
            ErrorKind::MissingRequiredClaim(claim) => VerifyError::MissingClaim(claim),
            ErrorKind::InvalidAlgorithm => VerifyError::DisallowedAlgorithm("mismatch".into()),
            other => VerifyError::Invalid(format!("{other:?}")),
        }
    }
}

/// What the broker reads of a JWS header (RFC 7515 section 4.1): the algorithm, the key id, and
/// `crit`. Any other parameter is ignored, as section 4.1 asks of parameters a recipient does
/// not understand, unless `crit` names them (then the token is refused, below).
#[derive(serde::Deserialize)]
pub struct JoseHeader {
    pub alg: Algorithm,
    pub kid: Option<String>,
    /// Present, even as `null` (which is not a list, so refused).
    #[serde(default, deserialize_with = "present")]
    crit: Option<Value>,
}

fn present<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Option<Value>, D::Error> {
    serde::Deserialize::deserialize(deserializer).map(Some)
}

/// The token's header, read once. RFC 7515 section 4.1.11: a `crit` header lists extensions
/// the recipient must understand or reject the token, and is never empty. This broker
/// understands none, so any `crit` is refused. Also for the broker's own tokens (Gogs delivery
/// tokens).
pub fn decode_header(token: &str) -> Result<JoseHeader, VerifyError> {
    let header = token.split('.').next().unwrap_or_default();
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(header)
        .map_err(|_| VerifyError::Malformed("header is not base64url".into()))?;
    let header: JoseHeader = serde_json::from_slice(&bytes).map_err(|error| VerifyError::Malformed(format!("header: {error}")))?;
    match &header.crit {
        None => Ok(header),
        Some(Value::Array(names)) if !names.is_empty() && names.iter().all(Value::is_string) => {
            let mut listed = Value::Array(names.clone()).to_string();
            if listed.len() > 256 {
                listed = format!("{}…", listed.chars().take(256).collect::<String>());
            }
            Err(VerifyError::Invalid(format!(
                "header parameter `crit` marks extensions {listed} critical; this broker understands none (RFC 7515 section 4.1.11)"
            )))
        }
        Some(_) => Err(VerifyError::Invalid(
            "header parameter `crit` must be a non-empty list of extension names (RFC 7515 section 4.1.11)".into(),
        )),
    }
}

fn unverified_claims(token: &str) -> Result<Claims, VerifyError> {
    let payload = token.split('.').nth(1).ok_or_else(|| VerifyError::Malformed("not a JWT".into()))?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .map_err(|_| VerifyError::Malformed("payload is not base64url".into()))?;
    Claims::parse(bytes).map_err(|_| VerifyError::Malformed("payload is not a JSON object".into()))
}

fn non_empty_string(claims: &Claims, name: &str, max_len: usize) -> Result<String, VerifyError> {
    match claims.get_str(name) {
        Some(value) if !value.is_empty() && value.len() <= max_len => Ok(value.to_owned()),
        _ => Err(VerifyError::MissingClaim(name.into())),
    }
}
