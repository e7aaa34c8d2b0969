//! AWS STS `AssumeRole`: session credentials bounded by the job's deadline and attributable
//! to the job in CloudTrail (session name, source identity, session tags).
//!
//! STS enforces its limits itself, but a broker that relies on that would learn about a bad
//! policy from a failed exchange, and test doubles (moto) accept requests STS refuses. So
//! every limit is checked here: at policy load where the policy alone decides it, and again
//! on the rendered values of every exchange, before the call.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_config::{BehaviorVersion, Region};
use aws_sdk_sts::config::http::HttpResponse;
use aws_sdk_sts::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_sts::operation::assume_role::AssumeRoleError;
use aws_sdk_sts::primitives::DateTimeFormat;
use aws_sdk_sts::types::Tag;
use aws_smithy_http_client::tls::{rustls_provider::CryptoMode, Provider};
use secrecy::SecretString;
use serde_json::{Map, Value};
use tokio::sync::OnceCell;

use super::{table_string, Backend, BackendError, BuildContext, Credential, EnvValue, MintRequest};
use crate::config::ConfigError;
use crate::policy::{Param, ParamProblem, ParamSchema, ParamShape, RenderedParams, Template, POLICY_STRING_MAX_CHARS};
use crate::types::{sha256_hex, ClaimLookup, Ttl};

pub const PARAMS: ParamSchema = ParamSchema {
    kind: "aws_sts",
    required: &["role_arn"],
    optional: &["session_policy", "session_tags", "source_identity", "role_session_name"],
    ttl_note: "STS sessions last 900 s to the role's MaxSessionDuration (1-12 h; 1 h when the broker itself \
               runs on an assumed role) and cannot be revoked one by one: the emergency switch is a role-wide \
               deny on aws:TokenIssueTime; shorter grants are raised to 900 s, and a job with less than 900 s \
               left is refused unless the role sets on_short_deadline = \"allow_overshoot\"",
    shapes: &[
        ("role_arn", ParamShape::Literal),
        ("session_policy", ParamShape::Json),
        ("session_tags", ParamShape::Table),
    ],
    check: Some(check_params),
    finish: Some(finish_params),
};

/// STS limits (AssumeRole API reference).
const MIN_SESSION_SECONDS: u32 = 900;
const MAX_SESSION_SECONDS: u32 = 12 * 3600;
const MAX_POLICY_CHARS: usize = 2048;
const MAX_TAGS: usize = 50;
const MAX_TAG_KEY_CHARS: usize = 128;
const MAX_TAG_VALUE_CHARS: usize = 256;
const NAME_CHARS: (usize, usize) = (2, 64);

const DEFAULT_SESSION_NAME: &str = "ci-{job_id}";
const DEFAULT_SOURCE_IDENTITY_CLAIM: &str = "user_login";

pub struct AwsSts {
    name: String,
    region: String,
    endpoint_url: Option<String>,
    max_ttl: Ttl,
    /// Built on first use: loading the SDK's credential chain is async, and `policy check`
    /// builds backends without ever calling them.
    client: OnceCell<aws_sdk_sts::Client>,
}

pub fn build(table: &toml::Table, context: &BuildContext<'_>) -> Result<Arc<dyn Backend>, ConfigError> {
    context.reject_unknown_keys(table, &["region", "endpoint_url", "max_session_seconds"])?;
    let region = table_string(table, context, "region")?
        .filter(|region| !region.is_empty())
        .ok_or_else(|| context.error("region", "is required (e.g. \"eu-west-1\")"))?;
    if !region.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-') {
        return Err(context.error("region", format!("{region:?} is not a region name like \"eu-west-1\"")));
    }
    let endpoint_url = table_string(table, context, "endpoint_url")?
        .map(|raw| match url::Url::parse(raw) {
            Ok(url) if matches!(url.scheme(), "http" | "https") && url.host().is_some() => Ok(raw.trim_end_matches('/').to_owned()),
            _ => Err(context.error("endpoint_url", format!("{raw:?} is not an http(s) URL"))),
        })
        .transpose()?;
    let max_seconds = match table.get("max_session_seconds") {
        None => MAX_SESSION_SECONDS,
        Some(toml::Value::Integer(seconds)) if (i64::from(MIN_SESSION_SECONDS)..=i64::from(MAX_SESSION_SECONDS)).contains(seconds) => {
            *seconds as u32
        }
        Some(_) => {
            return Err(context.error(
                "max_session_seconds",
                format!("must be an integer from {MIN_SESSION_SECONDS} to {MAX_SESSION_SECONDS} (STS's limits)"),
            ))
        }
    };
    Ok(Arc::new(AwsSts {
        name: context.name.to_string(),
        region: region.to_owned(),
        endpoint_url,
        max_ttl: Ttl::from_seconds(u64::from(max_seconds)).expect("within Ttl's range"),
        client: OnceCell::new(),
    }))
}

impl AwsSts {
    async fn client(&self) -> &aws_sdk_sts::Client {
        self.client
            .get_or_init(|| async {
                // rustls with ring, the provider of every other TLS client in the broker (sqlx,
                // the Kafka and Vault clients): one TLS stack to configure and audit.
                let http_client = aws_smithy_http_client::Builder::new()
                    .tls_provider(Provider::Rustls(CryptoMode::Ring))
                    .build_https();
                // The broker's own identity: the SDK's standard chain (environment, profile,
                // web identity, ECS container, EC2 instance metadata).
                let shared = aws_config::defaults(BehaviorVersion::latest())
                    .region(Region::new(self.region.clone()))
                    .http_client(http_client)
                    .timeout_config(
                        TimeoutConfig::builder()
                            .connect_timeout(Duration::from_secs(3))
                            .operation_attempt_timeout(Duration::from_secs(8))
                            .operation_timeout(Duration::from_secs(20))
                            .build(),
                    )
                    .retry_config(RetryConfig::standard().with_max_attempts(3))
                    .load()
                    .await;
                let mut config = aws_sdk_sts::config::Builder::from(&shared);
                if let Some(url) = &self.endpoint_url {
                    config = config.endpoint_url(url);
                }
                aws_sdk_sts::Client::from_conf(config.build())
            })
            .await
    }

    fn failed(&self, detail: impl Into<String>) -> BackendError {
        BackendError::Failed { backend: self.name.clone(), detail: detail.into() }
    }
}

#[async_trait]
impl Backend for AwsSts {
    fn kind(&self) -> &'static str {
        PARAMS.kind
    }

    fn default_target(&self) -> &'static str {
        "aws"
    }

    fn max_ttl(&self) -> Option<Ttl> {
        Some(self.max_ttl)
    }

    fn min_ttl(&self) -> Option<Ttl> {
        Some(Ttl::from_seconds(u64::from(MIN_SESSION_SECONDS)).expect("valid TTL"))
    }

    #[tracing::instrument(skip_all, fields(backend = %self.name, role = %request.role))]
    async fn mint(&self, request: MintRequest<'_>) -> Result<Credential, BackendError> {
        let param = |key: &str| request.params.get(key).cloned();
        // finish_params has rendered, sanitised and checked all of these; a gap here is a bug,
        // and it must not turn into a call STS would refuse.
        let (Some(role_arn), Some(session_name)) = (param("role_arn"), param("role_session_name")) else {
            return Err(self.failed("internal error: role parameters were not prepared"));
        };
        let duration = request.ttl.seconds();
        if !(MIN_SESSION_SECONDS..=self.max_ttl.seconds()).contains(&duration) {
            return Err(self.failed(format!("internal error: {duration} s is outside 900..={} s", self.max_ttl.seconds())));
        }
        let tags = request
            .tables
            .get("session_tags")
            .into_iter()
            .flatten()
            .map(|(key, value)| Tag::builder().key(key).value(value).build())
            .collect::<Result<Vec<Tag>, _>>()
            .map_err(|e| self.failed(format!("internal error: {e}")))?;

        let output = self
            .client()
            .await
            .assume_role()
            .role_arn(&role_arn)
            .role_session_name(&session_name)
            .duration_seconds(duration as i32)
            .set_policy(param("session_policy"))
            .set_source_identity(param("source_identity"))
            .set_tags((!tags.is_empty()).then_some(tags))
            .send()
            .await
            .map_err(|error| self.failed(describe_error(&error)))?;

        let credentials = output.credentials().ok_or_else(|| self.failed("STS answered without credentials"))?;
        let assumed_role_arn = output.assumed_role_user().map(|user| user.arn().to_owned()).unwrap_or_default();
        let expiration = credentials
            .expiration()
            .fmt(DateTimeFormat::DateTime)
            .map_err(|e| self.failed(format!("STS answered an unusable expiration: {e}")))?;
        let access_key_id = credentials.access_key_id().to_owned();
        tracing::info!(%access_key_id, %assumed_role_arn, duration, "STS session issued");
        Ok(Credential::new("secret_access_key", SecretString::from(credentials.secret_access_key().to_owned()))
            .with_secret("session_token", SecretString::from(credentials.session_token().to_owned()))
            .with_public("access_key_id", access_key_id.clone())
            .with_public("expiration", expiration.clone())
            .with_public("assumed_role_arn", assumed_role_arn.clone())
            .with_public("role_session_name", session_name)
            .with_public("region", self.region.as_str())
            .with_env("AWS_ACCESS_KEY_ID", EnvValue::Public(access_key_id.clone()))
            .with_env("AWS_SECRET_ACCESS_KEY", EnvValue::Secret("secret_access_key"))
            .with_env("AWS_SESSION_TOKEN", EnvValue::Secret("session_token"))
            // The SDKs and CLI need a region; the expiration lets tools that cache
            // credentials (Terraform, the CLI's own cache) know when to stop using them.
            .with_env("AWS_REGION", EnvValue::Public(self.region.clone()))
            .with_env("AWS_CREDENTIAL_EXPIRATION", EnvValue::Public(expiration.clone()))
            // What CloudTrail shows for every call made with the session.
            .with_handle(format!("{access_key_id} {assumed_role_arn}")))
    }
}

/// The STS error code first (`AccessDenied`, `RegionDisabledException`, `ExpiredTokenException`,
/// `Throttling`, ...), then STS's message. Neither the SDK's errors nor STS's messages carry
/// the broker's keys; they are cut short all the same so nothing unbounded reaches a client.
fn describe_error(error: &SdkError<AssumeRoleError, HttpResponse>) -> String {
    let (code, message) = match error {
        SdkError::ServiceError(service) => {
            let inner = service.err();
            let request_id = inner.meta().extra("aws_request_id").map(|id| format!(" (request id {id})")).unwrap_or_default();
            let raw = service.raw();
            // An error body the SDK cannot place (a proxy's, or moto's EC2-style
            // <Errors><Error>) still names its code: read it rather than say "unknown".
            let body = raw.body().bytes().map(String::from_utf8_lossy).unwrap_or_default();
            let element = |name: &str| {
                let start = body.find(&format!("<{name}>"))? + name.len() + 2;
                let end = start + body[start..].find(&format!("</{name}>"))?;
                Some(body[start..end].to_owned())
            };
            let code = inner.code().map(str::to_owned).or_else(|| element("Code"));
            let message = inner.message().map(str::to_owned).or_else(|| element("Message")).unwrap_or_default();
            let status = raw.status().as_u16();
            (code.unwrap_or_else(|| format!("HTTP{status}")), format!("{message}{request_id}"))
        }
        SdkError::TimeoutError(_) => ("Timeout".to_owned(), "STS did not answer in time".to_owned()),
        SdkError::DispatchFailure(failure) if failure.is_timeout() => {
            ("Timeout".to_owned(), DisplayErrorContext(error).to_string())
        }
        SdkError::DispatchFailure(failure) if failure.is_io() => ("Unreachable".to_owned(), DisplayErrorContext(error).to_string()),
        SdkError::DispatchFailure(_) => ("DispatchFailure".to_owned(), DisplayErrorContext(error).to_string()),
        SdkError::ResponseError(_) => ("InvalidResponse".to_owned(), DisplayErrorContext(error).to_string()),
        // Most often: the broker's own credentials could not be found or refreshed.
        _ => ("RequestNotSent".to_owned(), DisplayErrorContext(error).to_string()),
    };
    let message: String = message.chars().take(400).collect();
    format!("STS AssumeRole failed: {code}: {message}")
}

// ---------------------------------------------------------------- parameters

fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || "_+=,.@-".contains(c)
}

/// Letters, numbers and separators of any script, and `_.:/=+-@` (STS's `[\p{L}\p{Z}\p{N}_.:/=+\-@]`).
fn is_tag_char(c: char) -> bool {
    !c.is_control() && (c.is_alphanumeric() || c.is_whitespace() || "_.:/=+-@".contains(c))
}

/// At load: everything the policy alone decides.
fn check_params(params: &BTreeMap<String, Param>) -> Result<(), ParamProblem> {
    if let Some(Param::Literal(template)) = params.get("role_arn") {
        // Placeholders (allowed only with allow_claims_in) render as one identifier segment.
        let claims: Map<String, Value> =
            template.placeholders().map(|name| (name.to_owned(), Value::String("x".into()))).collect();
        let sample = template.render(&claims).map_err(|e| ParamProblem::new("role_arn", e))?;
        check_role_arn(&sample).map_err(|e| ParamProblem::new("role_arn", e))?;
    }
    if let Some(Param::Json(policy)) = params.get("session_policy") {
        let placeholders = policy.placeholders().len();
        let worst = policy.max_rendered_chars();
        if worst > MAX_POLICY_CHARS {
            let how = if placeholders == 0 {
                format!("is {worst} characters as compact JSON")
            } else {
                format!(
                    "can reach {worst} characters as compact JSON ({placeholders} placeholder(s) at up to \
                     {POLICY_STRING_MAX_CHARS} characters each)"
                )
            };
            return Err(ParamProblem::new("session_policy", format!("{how}; STS accepts at most {MAX_POLICY_CHARS}")));
        }
        let document: Value = serde_json::from_str(policy.as_str()).unwrap_or_default();
        if document.get("Statement").is_none() {
            return Err(ParamProblem::new("session_policy", "must be an IAM policy document: a JSON object with a Statement"));
        }
    }
    if let Some(Param::Table(tags)) = params.get("session_tags") {
        if tags.len() > MAX_TAGS {
            return Err(ParamProblem::new("session_tags", format!("has {} tags; STS accepts at most {MAX_TAGS}", tags.len())));
        }
        let mut seen: BTreeMap<String, &str> = BTreeMap::new();
        for (key, template) in tags {
            let at = format!("session_tags.{key}");
            let length = key.chars().count();
            if length == 0 || length > MAX_TAG_KEY_CHARS {
                return Err(ParamProblem::new(at, format!("tag keys are 1 to {MAX_TAG_KEY_CHARS} characters, this one {length}")));
            }
            if let Some(bad) = key.chars().find(|c| !is_tag_char(*c)) {
                return Err(ParamProblem::new(at, format!("tag keys may not contain {bad:?}")));
            }
            if key.to_ascii_lowercase().starts_with("aws:") {
                return Err(ParamProblem::new(at, "tag keys starting with aws: are reserved by AWS"));
            }
            // STS treats tag keys case-insensitively: two that differ only in case collide.
            if let Some(other) = seen.insert(key.to_lowercase(), key) {
                return Err(ParamProblem::new(at, format!("collides with tag {other:?}: STS compares tag keys ignoring case")));
            }
            check_literal_part(&at, template, is_tag_char, MAX_TAG_VALUE_CHARS)?;
        }
    }
    for key in ["role_session_name", "source_identity"] {
        if let Some(Param::Text(template)) = params.get(key) {
            check_literal_part(key, template, is_name_char, NAME_CHARS.1)?;
            let literal_only = template.placeholders().next().is_none();
            let length = template.as_str().chars().count();
            let omitted = key == "source_identity" && length == 0;
            if literal_only && !omitted && length < NAME_CHARS.0 {
                return Err(ParamProblem::new(key, format!("must be {} to {} characters", NAME_CHARS.0, NAME_CHARS.1)));
            }
        }
    }
    Ok(())
}

/// The fixed text of a template must already be valid: only claim values are sanitised.
fn check_literal_part(key: &str, template: &Template, allowed: fn(char) -> bool, max: usize) -> Result<(), ParamProblem> {
    let literal = template.literal_text();
    if let Some(bad) = literal.chars().find(|c| !allowed(*c)) {
        return Err(ParamProblem::new(key, format!("contains {bad:?}, which STS does not accept here")));
    }
    if literal.chars().count() > max {
        return Err(ParamProblem::new(key, format!("is longer than {max} characters, STS's limit here")));
    }
    Ok(())
}

/// `arn:<partition>:iam::<12-digit account>:role/<optional/path/>name`.
fn check_role_arn(arn: &str) -> Result<(), String> {
    let shape = "must look like arn:aws:iam::123456789012:role/name (optionally role/path/name)";
    let parts: Vec<&str> = arn.splitn(6, ':').collect();
    let [prefix, partition, service, region, account, resource] = parts[..] else {
        return Err(format!("{arn:?} {shape}"));
    };
    let partition_ok = partition.starts_with("aws") && partition.chars().all(|c| c.is_ascii_lowercase() || c == '-');
    let account_ok = account.len() == 12 && account.chars().all(|c| c.is_ascii_digit());
    let Some(path) = resource.strip_prefix("role/") else {
        return Err(format!("{arn:?} {shape}"));
    };
    let segments: Vec<&str> = path.split('/').collect();
    let name = segments.last().copied().unwrap_or_default();
    let segments_ok = segments.iter().all(|segment| !segment.is_empty() && segment.chars().all(is_name_char));
    if prefix != "arn" || !partition_ok || service != "iam" || !region.is_empty() || !account_ok || !segments_ok {
        return Err(format!("{arn:?} {shape}"));
    }
    if name.len() > 64 || path.len() > 512 {
        return Err(format!("{arn:?}: role names are at most 64 characters and paths at most 512"));
    }
    Ok(())
}

/// At every exchange, on the rendered values: defaults, sanitising, and the limits that
/// depend on claims. Anything it cannot make safe is refused (`access_denied`).
fn finish_params(params: &mut RenderedParams, claims: &dyn ClaimLookup) -> Result<(), ParamProblem> {
    if let Some(arn) = params.text.get("role_arn") {
        check_role_arn(arn).map_err(|e| ParamProblem::new("role_arn", e))?;
    }
    if let Some(policy) = params.text.get("session_policy") {
        let length = policy.chars().count();
        if length > MAX_POLICY_CHARS {
            return Err(ParamProblem::new(
                "session_policy",
                format!("renders to {length} characters; STS accepts at most {MAX_POLICY_CHARS}"),
            ));
        }
    }

    let session_name = match params.text.get("role_session_name") {
        Some(name) => name.clone(),
        None => Template::parse(DEFAULT_SESSION_NAME)
            .expect("valid template")
            .render(claims)
            .map_err(|e| ParamProblem::new("role_session_name", format!("the default {DEFAULT_SESSION_NAME:?}: {e}")))?,
    };
    let session_name = sanitise(&session_name, is_name_char, NAME_CHARS.1);
    if session_name.chars().count() < NAME_CHARS.0 {
        return Err(ParamProblem::new("role_session_name", format!("renders to {session_name:?}; STS needs 2 to 64 characters")));
    }
    params.text.insert("role_session_name".into(), session_name);

    // Default: the GitLab user who ran the job. A token without user_login gets no source
    // identity rather than none at all; an empty rendering omits it too.
    let source_identity = match params.text.remove("source_identity") {
        Some(identity) => identity,
        None => match claims.claim(DEFAULT_SOURCE_IDENTITY_CLAIM) {
            Some(Value::String(login)) => login.clone(),
            _ => String::new(),
        },
    };
    if !source_identity.is_empty() {
        let identity = sanitise(&source_identity, is_name_char, NAME_CHARS.1);
        if identity.chars().count() < NAME_CHARS.0 {
            return Err(ParamProblem::new("source_identity", format!("renders to {identity:?}; STS needs 2 to 64 characters")));
        }
        params.text.insert("source_identity".into(), identity);
    }

    if let Some(tags) = params.tables.get_mut("session_tags") {
        for value in tags.values_mut() {
            *value = sanitise(value, is_tag_char, MAX_TAG_VALUE_CHARS);
        }
    }
    Ok(())
}

/// Makes a claim-derived name fit STS: characters outside the set become `_`, and a value
/// that had to change (replaced characters or cut to length) ends in `-` plus the first
/// 8 hex digits of the original's SHA-256, so two different claims cannot come out as the
/// same name. Values that already fit are left exactly as they are.
fn sanitise(value: &str, allowed: fn(char) -> bool, max_chars: usize) -> String {
    let replaced: String = value.chars().map(|c| if allowed(c) { c } else { '_' }).collect();
    if replaced == value && value.chars().count() <= max_chars {
        return replaced;
    }
    let suffix = format!("-{}", &sha256_hex(value.as_bytes())[..8]);
    let kept: String = replaced.chars().take(max_chars - suffix.len()).collect();
    format!("{kept}{suffix}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn sanitise_keeps_valid_values_and_marks_changed_ones() {
        assert_eq!(sanitise("ci-123456", is_name_char, 64), "ci-123456");
        let spaced = sanitise("feature/ä b", is_name_char, 64);
        assert!(spaced.starts_with("feature___b-") && spaced.len() == "feature___b-".len() + 8, "{spaced}");
        assert_ne!(sanitise("a/b", is_name_char, 64), sanitise("a_b", is_name_char, 64), "no collision with a real name");
        let long = sanitise(&"r".repeat(300), is_tag_char, 256);
        assert_eq!(long.chars().count(), 256);
        assert_eq!(sanitise("Zürich team", is_tag_char, 256), "Zürich team", "unicode letters and spaces are valid in tags");
        assert!(sanitise("rocket 🚀", is_tag_char, 256).starts_with("rocket _-"));
    }

    #[test]
    fn role_arn_shapes() {
        for good in ["arn:aws:iam::123456789012:role/ci", "arn:aws-cn:iam::123456789012:role/path/to/ci-deploy@x"] {
            assert!(check_role_arn(good).is_ok(), "{good}");
        }
        for bad in [
            "arn:aws:iam::12345678901:role/ci",
            "arn:aws:iam::123456789012:user/ci",
            "arn:aws:sts::123456789012:role/ci",
            "arn:aws:iam:eu-west-1:123456789012:role/ci",
            "arn:aws:iam::123456789012:role/",
            "arn:aws:iam::123456789012:role/a//b",
            "arn:aws:iam::123456789012:role/a*",
            &format!("arn:aws:iam::123456789012:role/{}", "n".repeat(65)),
            "role/ci",
        ] {
            assert!(check_role_arn(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn finish_fills_defaults_from_claims() {
        let claims = json!({"job_id": "77", "user_login": "alice"});
        let mut params = RenderedParams::default();
        params.text.insert("role_arn".into(), "arn:aws:iam::123456789012:role/ci".into());
        finish_params(&mut params, claims.as_object().unwrap()).unwrap();
        assert_eq!(params.text["role_session_name"], "ci-77");
        assert_eq!(params.text["source_identity"], "alice");

        let mut without = RenderedParams::default();
        let error = finish_params(&mut without, json!({}).as_object().unwrap()).unwrap_err();
        assert_eq!(error.key, "role_session_name");
        assert!(error.message.contains("job_id"), "{error:?}");
    }
}
