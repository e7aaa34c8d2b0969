//! Development mode: a built-in issuer that mints GitLab-shaped job tokens, so the whole
//! exchange runs on a laptop with no GitLab and no cloud account. Only `serve --dev` trusts it.

use std::path::{Path, PathBuf};

use serde_json::{json, Map, Value};
use time::OffsetDateTime;
use uuid::Uuid;

use crate::signing::{SigningKey, SigningKeyError};
use crate::config::{Config, DevConfig, IssuerConfig, DEV_ISSUER_NAME};
use crate::types::IssuerName;

pub struct DevIssuer {
    pub issuer_url: String,
    key: SigningKey,
}

impl DevIssuer {
    pub fn state_dir(config: &Config) -> PathBuf {
        config.dev.as_ref().map(|dev: &DevConfig| dev.state_dir.clone()).unwrap_or_else(|| config.resolve(Path::new(".credbroker-dev")))
    }

    /// The key lives in the state dir and is created on first use, by `serve --dev` or `dev token`.
    pub fn load_or_create(config: &Config) -> Result<Self, SigningKeyError> {
        let key = SigningKey::load_or_generate(&Self::state_dir(config).join("dev-issuer.pem"), true)?;
        Ok(Self { issuer_url: format!("{}/dev", config.public_url), key })
    }

    pub fn issuer_config(&self) -> IssuerConfig {
        IssuerConfig {
            name: IssuerName::parse(DEV_ISSUER_NAME).expect("reserved name is valid"),
            issuer: self.issuer_url.clone(),
            jwks_uri: None,
            algorithms: None,
            require_nbf: true,
        }
    }

    pub fn discovery_document(&self) -> Value {
        json!({
            "issuer": self.issuer_url,
            "jwks_uri": format!("{}/jwks.json", self.issuer_url),
            "authorization_endpoint": format!("{}/authorize", self.issuer_url),
            "response_types_supported": ["id_token"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": [self.key.algorithm()],
        })
    }

    pub fn jwks(&self) -> Value {
        json!({ "keys": [self.key.public_jwk()] })
    }

    /// A token shaped like a GitLab CI `id_tokens` entry: the same claims, string-typed where
    /// GitLab sends strings, `runner_id` an integer, `exp` = job start + job timeout.
    pub fn mint(&self, audience: &str, job_timeout_seconds: i64, overrides: Map<String, Value>) -> Result<String, SigningKeyError> {
        let now = OffsetDateTime::now_utc().unix_timestamp();
        let job_id = (Uuid::new_v4().as_u128() % 9_000_000 + 1_000_000).to_string();
        let mut claims = json!({
            "namespace_id": "1",
            "namespace_path": "demo",
            "project_id": "42",
            "project_path": "demo/app",
            "user_id": "1",
            "user_login": "dev",
            "user_email": "dev@example.com",
            "user_access_level": "developer",
            "pipeline_id": "1000",
            "pipeline_source": "push",
            "job_id": job_id,
            "ref": "main",
            "ref_type": "branch",
            "ref_path": "refs/heads/main",
            "ref_protected": "true",
            "runner_id": 1,
            "runner_environment": "self-hosted",
            "sha": "0123456789abcdef0123456789abcdef01234567",
            "project_visibility": "private",
            "ci_config_ref_uri": "gitlab.example.com/demo/app//.gitlab-ci.yml@refs/heads/main",
            "ci_config_sha": "0123456789abcdef0123456789abcdef01234567",
            "job_project_id": "42",
            "job_project_path": "demo/app",
            "job_namespace_id": "1",
            "job_namespace_path": "demo",
            "jti": Uuid::new_v4().to_string(),
            "iss": self.issuer_url,
            "aud": audience,
            "iat": now,
            "nbf": now - 5,
            "exp": now + job_timeout_seconds,
        });
        let object = claims.as_object_mut().expect("literal object");
        let sub_overridden = overrides.contains_key("sub");
        object.extend(overrides);
        if !sub_overridden {
            let text = |name: &str| object.get(name).and_then(Value::as_str).unwrap_or_default().to_owned();
            let sub = format!("project_path:{}:ref_type:{}:ref:{}", text("project_path"), text("ref_type"), text("ref"));
            object.insert("sub".into(), Value::String(sub));
        }
        self.key.sign(&claims)
    }
}

/// `--claim k=v` sets a string (as GitLab sends most claims); `--claim k:=json` sets any JSON value.
pub fn parse_claim_override(raw: &str) -> Result<(String, Value), String> {
    if let Some((name, json)) = raw.split_once(":=") {
        let value = serde_json::from_str(json).map_err(|e| format!("--claim {raw}: value is not JSON: {e}"))?;
        return Ok((name.to_owned(), value));
    }
    let (name, value) = raw.split_once('=').ok_or_else(|| format!("--claim {raw}: expected NAME=VALUE or NAME:=JSON"))?;
    Ok((name.to_owned(), Value::String(value.to_owned())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claim_overrides_keep_gitlab_types() {
        assert_eq!(parse_claim_override("ref_protected=false").unwrap(), ("ref_protected".into(), json!("false")));
        assert_eq!(parse_claim_override("runner_id:=7").unwrap(), ("runner_id".into(), json!(7)));
        assert_eq!(parse_claim_override("a=b=c").unwrap(), ("a".into(), json!("b=c")));
        assert!(parse_claim_override("novalue").is_err());
        assert!(parse_claim_override("x:={").is_err());
    }
}
