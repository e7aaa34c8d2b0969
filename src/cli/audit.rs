//! `credbroker audit query`, `audit verify` and `audit archive`: the security team's questions from a terminal,
//! straight from the database (`--database-url`, or the configuration's) or through the
//! broker's API (`--url` with the caller's OIDC token; needs `[auditors]`, and the read is audited).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;
use time::OffsetDateTime;

use super::exchange::{http_client, read_token, ClientTls};
use super::server::load_config;
use crate::audit::csv;
use crate::audit::query::{IssuanceFilter, IssuancePage};
use crate::audit::AuditRecord;
use crate::audit::PgAudit;
use crate::signing::SigningKey;
use crate::types::rfc3339;

#[derive(Args)]
pub struct QueryArgs {
    /// Rows at or after this RFC 3339 time, or this long ago (90m, 2h, 7d, 2w).
    #[arg(long)]
    since: Option<String>,
    /// Rows before this RFC 3339 time, or this long ago.
    #[arg(long)]
    until: Option<String>,
    /// issued, denied, failed, revoked, revoke_failed, admin_request, audit_read (comma-separated).
    #[arg(long)]
    decision: Option<String>,
    /// Problem code of a refusal (e.g. access_denied, ttl_not_satisfiable).
    #[arg(long)]
    code: Option<String>,
    #[arg(long)]
    role: Option<String>,
    #[arg(long)]
    target: Option<String>,
    #[arg(long)]
    backend: Option<String>,
    #[arg(long)]
    issuer: Option<String>,
    /// The token's `sub` claim.
    #[arg(long)]
    subject: Option<String>,
    /// Exact path, or a glob: `*` within one segment, `**` across (`platform/**`).
    #[arg(long)]
    project_path: Option<String>,
    #[arg(long)]
    namespace_path: Option<String>,
    #[arg(long)]
    pipeline_id: Option<String>,
    #[arg(long)]
    job_id: Option<String>,
    /// A commit id, or a prefix of at least 7 hex digits.
    #[arg(long)]
    sha: Option<String>,
    #[arg(long)]
    user_login: Option<String>,
    /// The SHA-256 fingerprint of an issued credential.
    #[arg(long)]
    credential_sha256: Option<String>,
    /// Rows per page (1 to 1000).
    #[arg(long, default_value_t = 100)]
    limit: u32,
    /// Continue after a previous page (its `next_cursor`).
    #[arg(long)]
    cursor: Option<String>,
    /// Follow every page instead of printing one.
    #[arg(long)]
    all: bool,
    /// One JSON object per line.
    #[arg(long, conflicts_with = "csv")]
    json: bool,
    /// CSV with a header row (cells that a spreadsheet would run as formulas are neutralised).
    #[arg(long)]
    csv: bool,
    /// Postgres URL; by default the configuration's `database_url`.
    #[arg(long, env = "CREDBROKER_DATABASE_URL", hide_env_values = true)]
    database_url: Option<String>,
    /// Ask the broker at this URL instead of the database (wins over --database-url, which
    /// may come from the environment).
    #[arg(long)]
    url: Option<String>,
    /// With --url: how to speak TLS to the broker.
    #[command(flatten)]
    tls: ClientTls,
    /// With --url: environment variable holding the caller's OIDC token.
    #[arg(long, default_value = "CREDBROKER_ID_TOKEN", conflicts_with = "token_file")]
    token_env: String,
    /// With --url: file holding the caller's OIDC token.
    #[arg(long)]
    token_file: Option<PathBuf>,
}

impl QueryArgs {
    /// The filters as the API's query parameters.
    fn pairs(&self) -> Vec<(&'static str, String)> {
        let optional = [
            ("since", &self.since),
            ("until", &self.until),
            ("decision", &self.decision),
            ("code", &self.code),
            ("role", &self.role),
            ("target", &self.target),
            ("backend", &self.backend),
            ("issuer", &self.issuer),
            ("subject", &self.subject),
            ("project_path", &self.project_path),
            ("namespace_path", &self.namespace_path),
            ("pipeline_id", &self.pipeline_id),
            ("job_id", &self.job_id),
            ("sha", &self.sha),
            ("user_login", &self.user_login),
            ("credential_sha256", &self.credential_sha256),
        ];
        let mut pairs: Vec<(&'static str, String)> =
            optional.into_iter().filter_map(|(name, value)| value.clone().map(|value| (name, value))).collect();
        pairs.push(("limit", self.limit.to_string()));
        pairs
    }
}

enum Source {
    Database(PgAudit),
    Api { url: String, token: String, client: reqwest::Client },
}

impl Source {
    async fn page(&self, pairs: &[(&'static str, String)], cursor: Option<&str>) -> anyhow::Result<IssuancePage> {
        let mut pairs = pairs.to_vec();
        if let Some(cursor) = cursor {
            pairs.push(("cursor", cursor.to_owned()));
        }
        match self {
            Source::Database(store) => {
                let filter = IssuanceFilter::parse(pairs.iter().map(|(k, v)| (*k, v.as_str())), OffsetDateTime::now_utc())
                    .map_err(|error| anyhow::anyhow!("--{}: {}", error.parameter.replace('_', "-"), error.message))?;
                Ok(store.query_issuances(&filter).await?)
            }
            Source::Api { url, token, client } => {
                let endpoint = format!("{}/v1/issuances", url.trim_end_matches('/'));
                let response =
                    client.get(&endpoint).query(&pairs).bearer_auth(token).send().await.with_context(|| format!("cannot reach {endpoint}"))?;
                let status = response.status();
                let body: serde_json::Value = response.json().await.with_context(|| format!("{endpoint} answered {status} without JSON"))?;
                if !status.is_success() {
                    bail!("{}: {}", body["code"].as_str().unwrap_or("error"), body["detail"].as_str().unwrap_or(""));
                }
                let items: Vec<AuditRecord> = serde_json::from_value(body["items"].clone()).context("unexpected answer")?;
                Ok(IssuancePage { items, next_cursor: body["next_cursor"].as_str().map(str::to_owned) })
            }
        }
    }
}

fn database(url: Option<String>, config_path: Option<&Path>) -> anyhow::Result<PgAudit> {
    let url = match url {
        Some(url) => secrecy::SecretString::from(url),
        None => load_config(config_path)?.database_url,
    };
    Ok(PgAudit::connect(&url, 1, Duration::from_secs(10))?)
}

/// Reading the log straight from the database is recorded like a read through the broker
/// (migration 0012); a read that cannot be recorded does not happen.
pub(crate) async fn record_direct_read(store: &PgAudit, what: &str) -> anyhow::Result<()> {
    store.record_direct_read(what).await.map(drop).map_err(|error| {
        anyhow::anyhow!(
            "refusing to read: this read cannot be recorded in the audit log ({error}). \
             Connect as a role in credbroker_auditor (or the owner), and run `credbroker migrate` if record_audit_read is missing"
        )
    })
}

fn table_line(record: &AuditRecord) -> String {
    let dash = |value: &Option<String>| value.clone().unwrap_or_else(|| "-".into());
    format!(
        "{}  {:<13} {:<20} {:<20} {:<28} {:<10} {:<10} {:<8} ttl={:<6} {}",
        rfc3339(record.occurred_at),
        record.decision,
        dash(&record.code),
        dash(&record.role),
        dash(&record.project_path),
        dash(&record.pipeline_id),
        dash(&record.job_id),
        record.sha.as_deref().map(|sha| &sha[..sha.len().min(8)]).unwrap_or("-"),
        record.granted_ttl_seconds.map(|t| t.to_string()).unwrap_or_else(|| "-".into()),
        record.id,
    )
}

pub async fn query(args: QueryArgs, config_path: Option<&Path>) -> anyhow::Result<()> {
    let source = match &args.url {
        Some(url) => {
            let token = read_token(&args.token_env, args.token_file.as_deref()).map_err(|(_, message)| anyhow::anyhow!(message))?;
            let client = http_client(&args.tls, concat!("credbroker-audit/", env!("CARGO_PKG_VERSION"))).map_err(anyhow::Error::msg)?;
            Source::Api { url: url.clone(), token, client }
        }
        None => Source::Database(database(args.database_url.clone(), config_path)?),
    };
    let pairs = args.pairs();
    if let Source::Database(store) = &source {
        let filters: Vec<String> = pairs.iter().map(|(name, value)| format!("{name}={value}")).collect();
        record_direct_read(store, &format!("audit query {}", filters.join(" "))).await?;
    }
    let mut cursor = args.cursor.clone();
    if args.csv {
        print!("{}", csv::header());
    } else if !args.json {
        println!(
            "{:<25}  {:<13} {:<20} {:<20} {:<28} {:<10} {:<10} {:<8} {:<10} id",
            "occurred_at", "decision", "code", "role", "project_path", "pipeline", "job", "sha", "ttl"
        );
    }
    loop {
        let page = source.page(&pairs, cursor.as_deref()).await?;
        for record in &page.items {
            if args.json {
                println!("{}", serde_json::to_string(record)?);
            } else if args.csv {
                print!("{}", csv::record(record));
            } else {
                println!("{}", table_line(record));
            }
        }
        match page.next_cursor {
            Some(next) if args.all => cursor = Some(next),
            Some(next) => {
                if !args.json && !args.csv {
                    eprintln!("more rows: --cursor {next} (or --all)");
                } else {
                    eprintln!("next cursor: {next}");
                }
                return Ok(());
            }
            None => return Ok(()),
        }
    }
}

#[derive(Args)]
pub struct VerifyArgs {
    /// Check only checkpoints with rows at or after this RFC 3339 time, or this long ago (7d).
    #[arg(long)]
    since: Option<String>,
    /// The seal key (PEM); by default the configuration's `audit_seal_key_file`.
    #[arg(long)]
    key: Option<PathBuf>,
    /// Postgres URL; by default the configuration's `database_url`.
    #[arg(long, env = "CREDBROKER_DATABASE_URL", hide_env_values = true)]
    database_url: Option<String>,
    /// Print the whole report as JSON.
    #[arg(long)]
    json: bool,
    /// Check an archive file (`audit archive --out`) on its own instead of the database.
    // Not in conflict with --database-url, which may come from the environment.
    #[arg(long, conflicts_with = "since")]
    archive: Option<PathBuf>,
}

fn seal_key(key: Option<PathBuf>, config_path: Option<&Path>) -> anyhow::Result<SigningKey> {
    let key_path = match key {
        Some(path) => path,
        None => {
            load_config(config_path)?.audit_seal_key_file.context("no seal key: pass --key FILE or set audit_seal_key_file in the configuration")?
        }
    };
    SigningKey::from_pem_file(&key_path).with_context(|| format!("--key {}", key_path.display()))
}

/// Exit status 0: every checked row is as sealed. 1: tampering found (or an error).
pub async fn verify(args: VerifyArgs, config_path: Option<&Path>) -> anyhow::Result<bool> {
    let key = seal_key(args.key, config_path)?;
    if let Some(path) = &args.archive {
        let (report, previous_root) =
            crate::audit::checkpoints::verify_archive(&key, path).with_context(|| format!("--archive {}", path.display()))?;
        if args.json {
            println!("{}", serde_json::to_string_pretty(&serde_json::json!({ "report": report, "previous_root": previous_root }))?);
        } else {
            match report.findings.first() {
                None => println!(
                    "intact: archive of checkpoints {} to {}, {} rows verified; checkpoint {} links to root {previous_root} of checkpoint {}",
                    report.archived_through.map_or(0, |n| n + 1),
                    report.last_checkpoint.unwrap_or(0),
                    report.rows_checked,
                    report.archived_through.map_or(0, |n| n + 1),
                    report.archived_through.unwrap_or(0),
                ),
                Some(first) => {
                    println!("TAMPERED: {}", first.message);
                    for finding in &report.findings[1..] {
                        println!("  also: {}", finding.message);
                    }
                }
            }
        }
        return Ok(report.intact());
    }
    let since = args
        .since
        .as_deref()
        .map(|raw| crate::audit::query::parse_time(raw, OffsetDateTime::now_utc()).map_err(|m| anyhow::anyhow!("--since: {m}")))
        .transpose()?;
    let store = database(args.database_url, config_path)?;
    let report = store.verify_seals(&key, since).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        match report.findings.first() {
            None => println!(
                "intact: {} checkpoints, {} rows verified (last checkpoint {}){}",
                report.checkpoints,
                report.rows_checked,
                report.last_checkpoint.map(|n| n.to_string()).unwrap_or_else(|| "none".into()),
                report
                    .archived_through
                    .map(|n| format!("; checkpoints 1 to {n} archived, the chain continues from the archive record"))
                    .unwrap_or_default()
            ),
            Some(first) => {
                println!("TAMPERED: {}", first.message);
                for finding in &report.findings[1..] {
                    println!("  also: {}", finding.message);
                }
            }
        }
        if report.unsealed_rows > 0 {
            let oldest = report.oldest_unsealed.map(rfc3339).unwrap_or_default();
            println!("{} rows are not sealed yet (oldest {oldest}); rows unsealed long after the seal interval mean the sealer is not running or checkpoints were removed", report.unsealed_rows);
        }
    }
    Ok(report.intact())
}

#[derive(Args)]
pub struct ArchiveArgs {
    /// Archive whole checkpoints whose rows all occurred before this RFC 3339 time, or this
    /// long ago (90d).
    #[arg(long)]
    before: String,
    /// The archive file to create (JSON lines; refused if it exists).
    #[arg(long)]
    out: PathBuf,
    /// The seal key (PEM), to check the rows before they leave; by default the configuration's
    /// `audit_seal_key_file`.
    #[arg(long)]
    key: Option<PathBuf>,
    /// Postgres URL of the owner of the audit tables (the migrating role); by default the
    /// configuration's `database_url`.
    #[arg(long, env = "CREDBROKER_DATABASE_URL", hide_env_values = true)]
    database_url: Option<String>,
}

pub async fn archive(args: ArchiveArgs, config_path: Option<&Path>) -> anyhow::Result<()> {
    let key = seal_key(args.key, config_path)?;
    let before = crate::audit::query::parse_time(&args.before, OffsetDateTime::now_utc()).map_err(|m| anyhow::anyhow!("--before: {m}"))?;
    let store = database(args.database_url, config_path)?;
    let summary = store.archive(&key, before, &args.out).await.with_context(|| format!("archive to {}", args.out.display()))?;
    println!(
        "archived checkpoints {} to {} ({} rows) to {} (sha256 {})",
        summary.first_checkpoint,
        summary.through_checkpoint,
        summary.rows,
        args.out.display(),
        summary.sha256
    );
    if let Some(next) = summary.straddling {
        println!("checkpoint {next} also holds rows older than the cut; they stay until a later cut takes the whole checkpoint");
    }
    Ok(())
}
