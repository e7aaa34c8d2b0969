//! One issuer's verification keys: fetched through OIDC discovery (or a pinned `jwks_uri`),
//! cached behind an `ArcSwap` so the hot path never locks, refetched at most once per
//! `min_refetch` (30 s by default) however many unknown `kid`s arrive.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey};
use openidconnect::core::{CoreJsonWebKeySet, CoreProviderMetadata};
use openidconnect::{IssuerUrl, JsonWebKeySetUrl};
use tokio::sync::Mutex;
use url::Url;

use super::fetch::DiscoveryClient;
use super::rsa_verify::RsaKey;
use crate::config::IssuerConfig;
use crate::metrics::{IssuerOutcomeLabels, JwksFetches};
use crate::types::error_chain;
use crate::types::IssuerName;

pub struct VerificationKey {
    pub key: DecodingKey,
    pub algorithms: Vec<Algorithm>,
    /// The same key parsed once for RS256/384/512, the job tokens' usual algorithms.
    pub rsa: Option<RsaKey>,
}

#[derive(Default)]
struct KeySet {
    keys: HashMap<String, Arc<VerificationKey>>,
    fetched_at: Option<Instant>,
}

pub struct IssuerKeys {
    pub name: IssuerName,
    pub issuer: String,
    jwks_uri: Option<Url>,
    configured_algorithms: Option<Vec<Algorithm>>,
    max_age: Duration,
    /// A flood of tokens with made-up `kid`s must not turn into a flood of requests to the issuer.
    min_refetch: Duration,
    current: ArcSwap<KeySet>,
    /// Serialises refetches and remembers when the last one was attempted.
    last_attempt: Mutex<Option<Instant>>,
    client: DiscoveryClient,
    fetches: JwksFetches,
}

pub enum Lookup {
    Found(Arc<VerificationKey>),
    UnknownKid,
    /// No keys could ever be fetched: the issuer is unreachable or misconfigured.
    Unavailable(String),
}

impl IssuerKeys {
    pub fn new(issuer: &IssuerConfig, max_age: Duration, min_refetch: Duration, client: DiscoveryClient, fetches: JwksFetches) -> Self {
        Self {
            name: issuer.name.clone(),
            issuer: issuer.issuer.clone(),
            jwks_uri: issuer.jwks_uri.clone(),
            configured_algorithms: issuer.algorithms.clone(),
            max_age,
            min_refetch,
            current: ArcSwap::from_pointee(KeySet::default()),
            last_attempt: Mutex::new(None),
            client,
            fetches,
        }
    }

    pub async fn lookup(&self, kid: &str) -> Lookup {
        let snapshot = self.current.load();
        let stale = snapshot.fetched_at.is_none_or(|at| at.elapsed() > self.max_age);
        if !stale {
            if let Some(key) = snapshot.keys.get(kid) {
                return Lookup::Found(key.clone());
            }
        }
        let refresh_error = self.refresh().await.err();
        let snapshot = self.current.load();
        match snapshot.keys.get(kid) {
            Some(key) => Lookup::Found(key.clone()),
            None if snapshot.fetched_at.is_none() => {
                Lookup::Unavailable(refresh_error.unwrap_or_else(|| "keys not fetched yet".into()))
            }
            None => Lookup::UnknownKid,
        }
    }

    /// Fetches the key set unless another fetch was attempted within `min_refetch`.
    /// A failed fetch keeps the previous keys: an issuer outage should not stop verification.
    async fn refresh(&self) -> Result<(), String> {
        let mut last_attempt = self.last_attempt.lock().await;
        if last_attempt.is_some_and(|at| at.elapsed() < self.min_refetch) {
            return Ok(());
        }
        *last_attempt = Some(Instant::now());
        let fetched = self.fetch().await;
        let outcome = if fetched.is_ok() { "ok" } else { "failed" };
        self.fetches.get_or_create(&IssuerOutcomeLabels { issuer: self.name.to_string(), outcome }).inc();
        match fetched {
            Ok(keys) => {
                tracing::info!(issuer = %self.name, keys = keys.len(), "fetched issuer keys");
                self.current.store(Arc::new(KeySet { keys, fetched_at: Some(Instant::now()) }));
                Ok(())
            }
            Err(error) => {
                tracing::warn!(issuer = %self.name, %error, "could not fetch issuer keys");
                Err(error)
            }
        }
    }

    #[tracing::instrument(skip(self), fields(issuer = %self.name))]
    async fn fetch(&self) -> Result<HashMap<String, Arc<VerificationKey>>, String> {
        let http = self.client.as_openidconnect();
        let (jwks, advertised) = match &self.jwks_uri {
            Some(uri) => {
                let url = JsonWebKeySetUrl::from_url(uri.clone());
                let jwks = CoreJsonWebKeySet::fetch_async(&url, &http).await.map_err(|e| error_chain(&e))?;
                (jwks, None)
            }
            None => {
                let issuer = IssuerUrl::new(self.issuer.clone()).map_err(|e| e.to_string())?;
                // openidconnect checks that the document's `issuer` equals ours exactly.
                let metadata =
                    CoreProviderMetadata::discover_async(issuer, &http).await.map_err(|e| error_chain(&e))?;
                let advertised: Vec<Algorithm> = metadata
                    .id_token_signing_alg_values_supported()
                    .iter()
                    .filter_map(|alg| serde_json::to_value(alg).ok())
                    .filter_map(|alg| alg.as_str().and_then(|a| crate::config::parse_asymmetric_algorithm(a).ok()))
                    .collect();
                (metadata.jwks().clone(), Some(advertised))
            }
        };
        let document = serde_json::to_value(&jwks).map_err(|e| e.to_string())?;
        Ok(self.usable_keys(&document, advertised.as_deref()))
    }

    fn usable_keys(
        &self,
        document: &serde_json::Value,
        advertised: Option<&[Algorithm]>,
    ) -> HashMap<String, Arc<VerificationKey>> {
        let mut keys = HashMap::new();
        for raw in document["keys"].as_array().into_iter().flatten() {
            let Ok(jwk) = serde_json::from_value::<Jwk>(raw.clone()) else {
                tracing::debug!(issuer = %self.name, "skipping a key of an unsupported type");
                continue;
            };
            let Some(kid) = jwk.common.key_id.clone() else { continue };
            if matches!(jwk.common.public_key_use, Some(PublicKeyUse::Encryption)) {
                continue;
            }
            let mut algorithms = algorithms_for(&jwk);
            if let Some(allowed) = &self.configured_algorithms {
                algorithms.retain(|a| allowed.contains(a));
            }
            if let Some(allowed) = advertised.filter(|list| !list.is_empty()) {
                algorithms.retain(|a| allowed.contains(a));
            }
            if algorithms.is_empty() {
                continue;
            }
            let Ok(key) = DecodingKey::from_jwk(&jwk) else { continue };
            let rsa = RsaKey::from_jwk(&jwk, &algorithms);
            keys.insert(kid, Arc::new(VerificationKey { key, algorithms, rsa }));
        }
        keys
    }
}

/// The asymmetric algorithms a key can verify: its declared `alg` if any, else what its type allows.
fn algorithms_for(jwk: &Jwk) -> Vec<Algorithm> {
    let by_type = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => vec![
            Algorithm::RS256,
            Algorithm::RS384,
            Algorithm::RS512,
            Algorithm::PS256,
            Algorithm::PS384,
            Algorithm::PS512,
        ],
        AlgorithmParameters::EllipticCurve(ec) => match ec.curve {
            EllipticCurve::P256 => vec![Algorithm::ES256],
            EllipticCurve::P384 => vec![Algorithm::ES384],
            _ => vec![],
        },
        AlgorithmParameters::OctetKeyPair(_) => vec![Algorithm::EdDSA],
        // Symmetric keys in a JWKS are never trusted for job tokens.
        AlgorithmParameters::OctetKey(_) => vec![],
    };
    match jwk.common.key_algorithm {
        None => by_type,
        Some(declared) => match serde_json::to_value(declared).ok().and_then(|v| v.as_str()?.parse::<Algorithm>().ok()) {
            Some(declared) if by_type.contains(&declared) => vec![declared],
            _ => vec![],
        },
    }
}
