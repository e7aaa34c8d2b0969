//! `credbroker exchange`: the CI job's side. Reads the job token, asks the broker, prints the
//! credential as shell exports (default), a dotenv file, JSON, or the AWS CLI's
//! `credential_process` document. Problems go to stderr with
//! their code, and each code has its own exit status so a job script can branch on it.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, ValueEnum};
use serde_json::{json, Value};

use crate::types::{error_chain, Ttl};

/// Where the broker is, and how to speak TLS to it.
#[derive(Args)]
pub struct BrokerEndpoint {
    /// The broker's URL.
    #[arg(long, env = "CREDBROKER_URL")]
    pub url: String,
    #[command(flatten)]
    pub tls: ClientTls,
}

/// Whom to trust for the broker's TLS certificate, and what to show a broker that requires
/// client certificates (`[tls] client_ca_file`).
#[derive(Args)]
pub struct ClientTls {
    /// PEM file of the CA certificate(s) that issued the broker's TLS certificate, trusted
    /// besides the system's roots (for a broker behind a private CA).
    #[arg(long, env = "CREDBROKER_CA_FILE", value_name = "FILE")]
    pub ca_file: Option<PathBuf>,
    /// PEM file holding this client's certificate (chain) and its private key, for a broker
    /// that requires client certificates (mTLS).
    #[arg(long, env = "CREDBROKER_CLIENT_CERT", value_name = "FILE")]
    pub client_cert: Option<PathBuf>,
}

#[derive(Args)]
pub struct ExchangeArgs {
    #[command(flatten)]
    broker: BrokerEndpoint,
    /// The role to request.
    #[arg(long)]
    role: String,
    /// Requested lifetime (e.g. 30m); the broker caps it at the job's deadline.
    #[arg(long)]
    ttl: Option<String>,
    /// Fail unless the credential lives at least this long (e.g. 10m).
    #[arg(long)]
    min_ttl: Option<String>,
    /// Environment variable holding the job token.
    #[arg(long, default_value = "CREDBROKER_ID_TOKEN", conflicts_with = "token_file")]
    token_env: String,
    /// File holding the job token.
    #[arg(long)]
    token_file: Option<PathBuf>,
    #[arg(long, value_enum, default_value_t = Format::Env)]
    format: Format,
    /// Also write the credential in the files its standard client reads (Kafka token file and
    /// client properties, AWS shared credentials, Snowflake connections.toml, Looker ini and
    /// token), mode 0600; DIR is created (0700) when missing.
    #[arg(long, value_name = "DIR")]
    out_dir: Option<PathBuf>,
}

#[derive(Clone, Copy, ValueEnum)]
enum Format {
    /// `export NAME='value'` lines for `eval`.
    Env,
    /// `NAME=value` lines, e.g. for a GitLab dotenv artifact.
    Dotenv,
    /// The broker's whole response.
    Json,
    /// For an AWS credential: the JSON the AWS CLI and SDKs expect from a `credential_process`.
    AwsCredentialProcess,
}

/// Documented in README ("Exit codes"): 0 success, 2 usage, 3 broker unreachable or
/// answered nonsense, 4 no job token, then one status per problem code.
pub fn exit_code_for(code: &str) -> u8 {
    match code {
        "invalid_request" => 10,
        "invalid_token" => 11,
        "untrusted_issuer" => 12,
        "access_denied" => 13,
        "token_replayed" => 14,
        "ttl_not_satisfiable" => 15,
        "rate_limited" => 16,
        "backend_failed" => 17,
        "audit_unavailable" => 18,
        "issuer_unavailable" => 19,
        _ => 20,
    }
}

pub async fn run(args: ExchangeArgs) -> ExitCode {
    finish(exchange(&args).await)
}

/// Prints a client command's output, or its message with the exit status it chose.
pub(super) fn finish(outcome: Result<String, (u8, String)>) -> ExitCode {
    match outcome {
        Ok(output) => {
            print!("{output}");
            ExitCode::SUCCESS
        }
        Err((status, message)) => {
            eprintln!("credbroker: {message}");
            ExitCode::from(status)
        }
    }
}

async fn exchange(args: &ExchangeArgs) -> Result<String, (u8, String)> {
    let token = read_token(&args.token_env, args.token_file.as_deref())?;
    let seconds = |flag: &str, raw: &Option<String>| {
        raw.as_deref().map(|raw| Ttl::parse(raw).map(Ttl::seconds).map_err(|m| (2, format!("--{flag}: {m}")))).transpose()
    };
    let mut body = json!({ "role": args.role });
    if let Some(ttl) = seconds("ttl", &args.ttl)? {
        body["ttl_seconds"] = json!(ttl);
    }
    if let Some(min_ttl) = seconds("min-ttl", &args.min_ttl)? {
        body["min_ttl_seconds"] = json!(min_ttl);
    }

    let reply = call(reqwest::Method::POST, &args.broker, "/v1/credentials", &token, &body).await?;
    if let Some(dir) = &args.out_dir {
        write_native_files(dir, &args.role, &reply, &args.broker.url, &token)?;
    }
    render(&reply, args.format)
}

/// `--out-dir`: the credential's native client files; a credential without any is said so on
/// stderr, and the exchange still succeeds.
pub(super) fn write_native_files(dir: &std::path::Path, role: &str, reply: &Value, broker_url: &str, job_token: &str) -> Result<(), (u8, String)> {
    let failed = |e: std::io::Error| (5, format!("--out-dir {}: {e}", dir.display()));
    let dir = super::native::prepare_dir(dir).map_err(failed)?;
    let files = super::native::files(&super::native::Context { dir: &dir, role, broker_url, job_token }, reply);
    if files.is_empty() {
        let target = reply["target"].as_str().unwrap_or("unknown");
        eprintln!("credbroker: --out-dir: no standard client reads a {target} credential of role {role} from files; use its variables");
    }
    super::native::write(&dir, &files).map_err(failed)
}

/// The job (or admin) token from a file or an environment variable.
pub(super) fn read_token(token_env: &str, token_file: Option<&std::path::Path>) -> Result<String, (u8, String)> {
    let token = match token_file {
        Some(path) => std::fs::read_to_string(path).map_err(|e| (4, format!("cannot read {}: {e}", path.display())))?,
        None => std::env::var(token_env).map_err(|_| (4, format!("no job token in ${token_env} (declare it under id_tokens: in .gitlab-ci.yml)")))?,
    };
    let token = token.trim();
    if token.is_empty() {
        return Err((4, "the job token is empty".into()));
    }
    Ok(token.to_owned())
}

/// One JSON request to the broker; a problem answer becomes its exit status and message.
pub(super) async fn call(method: reqwest::Method, broker: &BrokerEndpoint, path: &str, token: &str, body: &Value) -> Result<Value, (u8, String)> {
    let client = http_client(&broker.tls, concat!("credbroker-exchange/", env!("CARGO_PKG_VERSION"))).map_err(|message| (3, message))?;
    let url = format!("{}{path}", broker.url.trim_end_matches('/'));
    let response = client
        .request(method, &url)
        .bearer_auth(token)
        .json(body)
        .send()
        .await
        .map_err(|e| (3, format!("cannot reach {url}: {}", error_chain(&e))))?;
    let status = response.status();
    let text = response.text().await.map_err(|e| (3, format!("cannot read the response: {e}")))?;
    let reply: Value = serde_json::from_str(&text).map_err(|_| (3, format!("{url} answered {status} with a body that is not JSON")))?;
    if !status.is_success() {
        let code = reply["code"].as_str().unwrap_or("unknown");
        let detail = reply["detail"].as_str().unwrap_or("");
        let id = reply["issuance_id"].as_str().map(|id| format!(" (issuance {id})")).unwrap_or_default();
        return Err((exit_code_for(code), format!("{code}: {detail}{id}")));
    }
    Ok(reply)
}

/// The client every command talks to the broker with; `--ca-file` is trusted besides the
/// system's roots.
pub(super) fn http_client(tls: &ClientTls, user_agent: &'static str) -> Result<reqwest::Client, String> {
    let mut builder = reqwest::Client::builder().timeout(Duration::from_secs(60)).user_agent(user_agent);
    if let Some(path) = &tls.client_cert {
        let pem = std::fs::read(path).map_err(|e| format!("--client-cert {}: {e}", path.display()))?;
        let identity = reqwest::Identity::from_pem(&pem)
            .map_err(|e| format!("--client-cert {}: not a PEM certificate with its private key: {}", path.display(), error_chain(&e)))?;
        builder = builder.identity(identity);
    }
    if let Some(path) = &tls.ca_file {
        let pem = std::fs::read(path).map_err(|e| format!("--ca-file {}: {e}", path.display()))?;
        let certificates = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| format!("--ca-file {}: {e}", path.display()))?;
        if certificates.is_empty() {
            return Err(format!("--ca-file {}: holds no PEM certificate", path.display()));
        }
        for certificate in certificates {
            builder = builder.add_root_certificate(certificate);
        }
    }
    builder.build().map_err(|e| e.to_string())
}

fn render(reply: &Value, format: Format) -> Result<String, (u8, String)> {
    match format {
        Format::Json => Ok(format!("{reply:#}\n")),
        Format::AwsCredentialProcess => credential_process(reply),
        Format::Env | Format::Dotenv => Ok(render_variables(reply, format)),
    }
}

/// <https://docs.aws.amazon.com/cli/latest/topic/config-vars.html#sourcing-credentials-from-external-processes>:
/// `Version` 1, the three keys, and `Expiration` (RFC 3339) so the SDK asks again before it ends.
fn credential_process(reply: &Value) -> Result<String, (u8, String)> {
    let credential = &reply["credential"];
    let field = |name: &str| {
        credential[name].as_str().map(str::to_owned).ok_or_else(|| {
            let target = reply["target"].as_str().unwrap_or("unknown");
            (2, format!("--format aws-credential-process needs an AWS credential, but the role gave a {target} credential without `{name}`"))
        })
    };
    let document = json!({
        "Version": 1,
        "AccessKeyId": field("access_key_id")?,
        "SecretAccessKey": field("secret_access_key")?,
        "SessionToken": field("session_token")?,
        "Expiration": field("expiration")?,
    });
    Ok(format!("{document}\n"))
}

fn render_variables(reply: &Value, format: Format) -> String {
    let mut variables: Vec<(String, String)> =
        reply["env"].as_object().into_iter().flatten().filter_map(|(name, value)| Some((name.clone(), value.as_str()?.to_owned()))).collect();
    for (name, field) in
        [("CREDBROKER_ISSUANCE_ID", "issuance_id"), ("CREDBROKER_EXPIRES_AT", "expires_at"), ("CREDBROKER_JOB_DEADLINE", "job_deadline")]
    {
        if let Some(value) = reply[field].as_str() {
            variables.push((name.into(), value.into()));
        }
    }
    variables
        .into_iter()
        .map(|(name, value)| match format {
            Format::Env => format!("export {name}={}\n", shell_quote(&value)),
            _ => format!("{name}={value}\n"),
        })
        .collect()
}

/// Single-quoted for POSIX shells: nothing inside is expanded.
fn shell_quote(value: &str) -> String {
    format!("'{}'", value.replace('\'', r#"'\''"#))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_output_is_quoted_for_eval() {
        let reply = json!({"env": {"KAFKA_PRINCIPAL": "ci:it's"}, "issuance_id": "abc"});
        let out = render(&reply, Format::Env).unwrap();
        assert!(out.contains("export KAFKA_PRINCIPAL='ci:it'\\''s'\n"), "{out}");
        assert!(out.contains("export CREDBROKER_ISSUANCE_ID='abc'\n"), "{out}");
        assert!(render(&reply, Format::Dotenv).unwrap().contains("KAFKA_PRINCIPAL=ci:it's\n"));
    }

    #[test]
    fn credential_process_output_is_exactly_the_documented_document() {
        let reply = json!({"target": "aws", "credential": {
            "access_key_id": "ASIAX", "secret_access_key": "s", "session_token": "t",
            "expiration": "2026-01-01T00:15:00Z", "assumed_role_arn": "arn:aws:sts::123456789012:assumed-role/r/ci-1",
        }});
        let out = render(&reply, Format::AwsCredentialProcess).unwrap();
        let document: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(
            document,
            json!({"Version": 1, "AccessKeyId": "ASIAX", "SecretAccessKey": "s", "SessionToken": "t", "Expiration": "2026-01-01T00:15:00Z"})
        );
        let kafka = json!({"target": "kafka", "credential": {"token": "x"}});
        let (status, message) = render(&kafka, Format::AwsCredentialProcess).unwrap_err();
        assert_eq!(status, 2);
        assert!(message.contains("kafka credential"), "{message}");
    }

    #[test]
    fn every_problem_code_has_its_own_exit_status() {
        let codes = [
            "invalid_request",
            "invalid_token",
            "untrusted_issuer",
            "access_denied",
            "token_replayed",
            "ttl_not_satisfiable",
            "rate_limited",
            "backend_failed",
            "audit_unavailable",
            "issuer_unavailable",
        ];
        let mut statuses: Vec<u8> = codes.iter().map(|c| exit_code_for(c)).collect();
        statuses.sort();
        statuses.dedup();
        assert_eq!(statuses.len(), codes.len());
    }
}
