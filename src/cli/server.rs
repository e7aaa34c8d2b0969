//! The subcommands of the broker itself (`serve`, `migrate`, `policy`, `audit`, `dev`): built
//! with the `server` feature only; the job-image client (`--features client`) leaves them out.

use std::path::Path;

use anyhow::{bail, Context};
use clap::{Args, Subcommand};

use super::{audit, policy};
use crate::config::{Config, LogFormat};
use crate::dev::{parse_claim_override, DevIssuer};
use crate::startup::{Application, ServeOptions};
use crate::types::Ttl;

#[derive(Subcommand)]
pub enum ServerCommand {
    /// Run the broker.
    Serve {
        /// Trust the built-in development issuer (never in production).
        #[arg(long)]
        dev: bool,
    },
    /// Check or explain trust policies.
    #[command(subcommand)]
    Policy(policy::PolicyCommand),
    /// Read the audit log.
    #[command(subcommand)]
    Audit(AuditCommand),
    /// Apply database migrations and exit.
    Migrate,
    /// Development helpers.
    #[command(subcommand)]
    Dev(DevCommand),
}

#[derive(Subcommand)]
pub enum AuditCommand {
    /// Print the latest decisions, newest first.
    Tail(TailArgs),
    /// Search the log: who got which credential, what was denied (filters as in GET /v1/issuances).
    Query(Box<audit::QueryArgs>),
    /// Check the signed checkpoints: report the first row altered, deleted or out of order.
    Verify(audit::VerifyArgs),
    /// Move whole sealed checkpoints older than a time to a file and out of the database.
    Archive(audit::ArchiveArgs),
}

#[derive(Args)]
pub struct TailArgs {
    /// How many rows.
    #[arg(short = 'n', long = "lines", default_value_t = 20)]
    lines: i64,
    /// One JSON object per line.
    #[arg(long)]
    json: bool,
    /// Postgres URL, instead of the configuration's `database_url`.
    #[arg(long, env = "CREDBROKER_DATABASE_URL", hide_env_values = true)]
    database_url: Option<String>,
}

#[derive(Subcommand)]
pub enum DevCommand {
    /// Mint a GitLab-shaped job token from the dev issuer (trusted only by `serve --dev`).
    Token {
        /// Override a claim: NAME=VALUE sets a string, NAME:=JSON any JSON value.
        #[arg(long = "claim", value_name = "NAME=VALUE")]
        claims: Vec<String>,
        /// Job timeout: the token's `exp` is now plus this.
        #[arg(long, default_value = "1h")]
        job_timeout: String,
        /// The token's `aud`; defaults to the configured audience.
        #[arg(long)]
        audience: Option<String>,
    },
}

pub async fn run(command: ServerCommand, config_path: Option<&Path>) -> anyhow::Result<()> {
    match command {
        ServerCommand::Serve { dev } => {
            let config = load_config(config_path)?;
            crate::logging::init(if dev { LogFormat::Text } else { config.log_format });
            let application = Application::build(config, ServeOptions { dev }).await?;
            application.run_until_stopped().await
        }
        ServerCommand::Migrate => {
            let config = load_config(config_path)?;
            let pool = crate::audit::connect(&config.database_url, 1, std::time::Duration::from_secs(10))?;
            crate::audit::migrate(&pool).await?;
            println!("migrations applied");
            Ok(())
        }
        ServerCommand::Policy(command) => policy::run(command, config_path),
        ServerCommand::Audit(AuditCommand::Tail(args)) => tail(args, config_path).await,
        ServerCommand::Audit(AuditCommand::Query(args)) => audit::query(*args, config_path).await,
        ServerCommand::Audit(AuditCommand::Verify(args)) => {
            if audit::verify(args, config_path).await? {
                Ok(())
            } else {
                bail!("the audit log does not match its checkpoints")
            }
        }
        ServerCommand::Audit(AuditCommand::Archive(args)) => audit::archive(args, config_path).await,
        ServerCommand::Dev(DevCommand::Token { claims, job_timeout, audience }) => {
            let config = load_config(config_path)?;
            let overrides = claims.iter().map(|raw| parse_claim_override(raw)).collect::<Result<_, _>>().map_err(anyhow::Error::msg)?;
            let job_timeout = Ttl::parse(&job_timeout).map_err(anyhow::Error::msg).context("--job-timeout")?;
            let issuer = DevIssuer::load_or_create(&config)?;
            let token = issuer.mint(audience.as_deref().unwrap_or(&config.audience), i64::from(job_timeout.seconds()), overrides)?;
            println!("{token}");
            Ok(())
        }
    }
}

pub(super) fn load_config(path: Option<&Path>) -> anyhow::Result<Config> {
    let path = path.context("no configuration: pass --config FILE or set CREDBROKER_CONFIG")?;
    Ok(Config::load(path)?)
}

async fn tail(args: TailArgs, config_path: Option<&Path>) -> anyhow::Result<()> {
    let url = match args.database_url {
        Some(url) => secrecy::SecretString::from(url),
        None => load_config(config_path)?.database_url,
    };
    let store = crate::audit::PgAudit::connect(&url, 1, std::time::Duration::from_secs(10))?;
    let lines = args.lines.clamp(1, 10_000);
    audit::record_direct_read(&store, &format!("audit tail -n {lines}")).await?;
    let rows = store.tail(lines).await?;
    for row in rows {
        if args.json {
            // `issuance_id` and `ttl_seconds` are the names `audit tail --json` has always used.
            let mut json = serde_json::to_value(&row)?;
            json["issuance_id"] = json["id"].clone();
            json["ttl_seconds"] = json["granted_ttl_seconds"].clone();
            println!("{json}");
        } else {
            println!(
                "{}  {:<7} {:<20} {:<24} {:<24} ttl={:<6} {}",
                row.occurred_at.format(&time::format_description::well_known::Rfc3339)?,
                row.decision,
                row.code.as_deref().unwrap_or("-"),
                row.role.as_deref().unwrap_or("-"),
                row.project_path.as_deref().unwrap_or("-"),
                row.granted_ttl_seconds.map(|t| t.to_string()).unwrap_or_else(|| "-".into()),
                row.id,
            );
        }
    }
    Ok(())
}
