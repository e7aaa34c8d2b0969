//! `credbroker revoke`, `freeze`, `unfreeze`: the security team's side of the lifecycle. Each
//! sends the caller's OIDC token to the broker, which checks it against `[admins]` and audits
//! the request.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{ArgGroup, Args};
use serde_json::{json, Map, Value};

use super::exchange::{call, finish, read_token, BrokerEndpoint};

#[derive(Args)]
pub struct Connection {
    #[command(flatten)]
    broker: BrokerEndpoint,
    /// Environment variable holding the caller's OIDC token.
    #[arg(long, default_value = "CREDBROKER_ID_TOKEN", conflicts_with = "token_file")]
    token_env: String,
    /// File holding the caller's OIDC token.
    #[arg(long)]
    token_file: Option<PathBuf>,
}

#[derive(Args)]
#[command(group(ArgGroup::new("selector").required(true).args(["issuance", "job", "pipeline", "project", "subject", "issued_since"])))]
pub struct RevokeArgs {
    #[command(flatten)]
    connection: Connection,
    /// One issuance (the `issuance_id` of the exchange).
    #[arg(long)]
    issuance: Option<String>,
    /// Everything issued to this CI job id.
    #[arg(long)]
    job: Option<String>,
    /// Everything issued to this pipeline id.
    #[arg(long)]
    pipeline: Option<String>,
    /// Everything issued to this project path (`project_path` claim).
    #[arg(long)]
    project: Option<String>,
    /// Everything issued to this token subject (`sub` claim).
    #[arg(long)]
    subject: Option<String>,
    /// Everything issued since this RFC 3339 time, or this long ago (e.g. 2h).
    #[arg(long)]
    issued_since: Option<String>,
    /// Only credentials of this role (with any selector).
    #[arg(long)]
    role: Option<String>,
    /// List what would be affected; change nothing.
    #[arg(long)]
    dry_run: bool,
    /// Print the broker's whole JSON report.
    #[arg(long)]
    json: bool,
}

/// Exactly one of project, role, all.
#[derive(Args)]
#[group(required = true, multiple = false)]
pub struct Scope {
    /// This project path (the `project_path` claim).
    #[arg(long)]
    project: Option<String>,
    /// This role.
    #[arg(long)]
    role: Option<String>,
    /// Everything.
    #[arg(long)]
    all: bool,
}

#[derive(Args)]
pub struct FreezeArgs {
    #[command(flatten)]
    connection: Connection,
    #[command(flatten)]
    scope: Scope,
    /// Freeze until this RFC 3339 time, or for this long (e.g. 2h); default until unfrozen.
    #[arg(long)]
    until: Option<String>,
}

#[derive(Args)]
pub struct UnfreezeArgs {
    #[command(flatten)]
    connection: Connection,
    #[command(flatten)]
    scope: Scope,
}

fn insert(body: &mut Map<String, Value>, key: &str, value: &Option<String>) {
    if let Some(value) = value {
        body.insert(key.to_owned(), json!(value));
    }
}

pub async fn revoke(args: RevokeArgs) -> ExitCode {
    finish(revoke_inner(&args).await)
}

async fn revoke_inner(args: &RevokeArgs) -> Result<String, (u8, String)> {
    let token = read_token(&args.connection.token_env, args.connection.token_file.as_deref())?;
    let mut body = Map::new();
    for (key, value) in [
        ("issuance", &args.issuance),
        ("job", &args.job),
        ("pipeline", &args.pipeline),
        ("project", &args.project),
        ("subject", &args.subject),
        ("issued_since", &args.issued_since),
        ("role", &args.role),
    ] {
        insert(&mut body, key, value);
    }
    body.insert("dry_run".into(), json!(args.dry_run));
    let report = call(reqwest::Method::POST, &args.connection.broker, "/v1/revocations", &token, &Value::Object(body)).await?;
    if args.json {
        return Ok(format!("{report:#}\n"));
    }
    Ok(render_report(&report))
}

/// One line per credential, then what stays valid and until when, so nobody is misled.
fn render_report(report: &Value) -> String {
    let mut out = String::new();
    let verb = if report["dry_run"] == true { "would affect" } else { "matched" };
    out.push_str(&format!("{verb} {} live credential(s)\n", report["matched"]));
    for credential in report["credentials"].as_array().into_iter().flatten() {
        let text = |key: &str| credential[key].as_str().unwrap_or("-").to_owned();
        out.push_str(&format!(
            "{:<16} {}  role={} backend={} project={} job={} valid_until={}{}\n",
            text("outcome"),
            text("issuance_id"),
            text("role"),
            text("backend"),
            text("project_path"),
            text("job_id"),
            text("valid_until"),
            credential["detail"].as_str().map(|d| format!("  ({d})")).unwrap_or_default(),
        ));
    }
    if let Some(until) = report["remains_valid_until"].as_str() {
        out.push_str(&format!("some matched credentials stay valid until {until} at the latest (see above)\n"));
    }
    out
}

pub async fn freeze(args: FreezeArgs) -> ExitCode {
    let Scope { project, role, all } = args.scope;
    let body = json!({ "project": project, "role": role, "all": all, "until": args.until });
    finish(send_freeze(&args.connection, reqwest::Method::POST, body).await)
}

pub async fn unfreeze(args: UnfreezeArgs) -> ExitCode {
    let Scope { project, role, all } = args.scope;
    let body = json!({ "project": project, "role": role, "all": all });
    finish(send_freeze(&args.connection, reqwest::Method::DELETE, body).await)
}

async fn send_freeze(connection: &Connection, method: reqwest::Method, body: Value) -> Result<String, (u8, String)> {
    let token = read_token(&connection.token_env, connection.token_file.as_deref())?;
    // The broker's freeze body has no nulls: absent means absent.
    let body: Map<String, Value> =
        body.as_object().into_iter().flatten().filter(|(_, v)| !v.is_null() && **v != json!(false)).map(|(k, v)| (k.clone(), v.clone())).collect();
    let reply = call(method, &connection.broker, "/v1/freezes", &token, &Value::Object(body)).await?;
    Ok(format!("{reply:#}\n"))
}
