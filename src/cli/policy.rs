//! `policy check` and `policy explain`: the policy author's tools, offline.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::Subcommand;
use serde_json::{json, Map, Value};

use crate::backend::{self, Backends};
use crate::config::Config;
use crate::policy::{CompileContext, PolicyError, PolicySet};
use crate::startup::load_policies;
use crate::types::ClaimLookup;

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum CheckFormat {
    Text,
    Codequality,
}

#[derive(Subcommand)]
pub enum PolicyCommand {
    /// Validate every policy file; with --config also against the configured issuers and backends.
    Check {
        /// Policy directory (default: the configuration's `policy_dir`).
        dir: Option<PathBuf>,
        /// `text`, or `codequality`: GitLab's Code Quality report (a JSON array) on stdout, so
        /// a broken policy shows in the merge request.
        #[arg(long, value_enum, default_value_t = CheckFormat::Text)]
        format: CheckFormat,
    },
    /// Show, condition by condition, whether a token's claims would get a role.
    Explain {
        /// JSON file with the token's claims (a decoded job token payload).
        #[arg(long)]
        claims: PathBuf,
        /// The role to explain.
        #[arg(long)]
        role: String,
        /// Policy directory (default: the configuration's `policy_dir`).
        #[arg(long)]
        policy_dir: Option<PathBuf>,
    },
}

pub fn run(command: PolicyCommand, config_path: Option<&Path>) -> anyhow::Result<()> {
    match command {
        PolicyCommand::Check { dir, format: CheckFormat::Codequality } => {
            let loaded = load(config_path, dir.as_deref());
            let report = match &loaded {
                Ok(_) => Vec::new(),
                Err(error) => vec![code_quality_issue(error)],
            };
            println!("{}", serde_json::to_string_pretty(&report)?);
            loaded.map(drop)
        }
        PolicyCommand::Check { dir, format: CheckFormat::Text } => {
            let policies = load(config_path, dir.as_deref())?;
            let mode = if config_path.is_some() { "against the configuration" } else { "offline (no --config)" };
            println!("ok: {} roles valid, checked {mode}", policies.len());
            println!("policy version {}", policies.version());
            for role in policies.roles() {
                println!("  {} ({}): backend {}, issuer {}", role.name, role.file.display(), role.backend, role.issuer);
            }
            Ok(())
        }
        PolicyCommand::Explain { claims, role, policy_dir } => {
            let policies = load(config_path, policy_dir.as_deref())?;
            let text = std::fs::read_to_string(&claims).with_context(|| format!("cannot read {}", claims.display()))?;
            let claims: Map<String, Value> =
                serde_json::from_str(&text).with_context(|| format!("{} is not a JSON object of claims", claims.display()))?;
            let config = config_path.map(Config::load).transpose()?;
            print!("{}", explain(&policies, &role, &claims, config.as_ref()));
            Ok(())
        }
    }
}

/// One entry of GitLab's Code Quality report for a failed check: where (the policy file
/// relative to the working directory, and the line of the offending key, or 1) and why.
fn code_quality_issue(error: &anyhow::Error) -> Value {
    let policy = error.downcast_ref::<PolicyError>();
    let path = match policy {
        Some(policy) => {
            let cwd = std::env::current_dir().unwrap_or_default();
            policy.file.strip_prefix(&cwd).unwrap_or(&policy.file).display().to_string()
        }
        None => "credbroker.toml".to_owned(),
    };
    let line = policy.map_or(1, offending_line);
    let description = format!("{error:#}");
    json!({
        "description": description,
        "check_name": "credbroker-policy",
        "fingerprint": crate::types::sha256_hex(format!("{path}\0{description}").as_bytes()),
        "severity": "major",
        "location": { "path": path, "lines": { "begin": line } },
    })
}

/// The line of the error's key inside its role's block (or anywhere, without a role), 1 when
/// the file or key cannot be found.
fn offending_line(error: &PolicyError) -> usize {
    let Ok(text) = std::fs::read_to_string(&error.file) else { return 1 };
    let lines: Vec<&str> = text.lines().collect();
    let role_start = match &error.role {
        Some(role) => {
            let named = |line: &&str| {
                line.trim().strip_prefix("name").map(|rest| rest.trim_start().trim_start_matches('=').trim()) == Some(&format!("\"{role}\""))
            };
            match lines.iter().position(named) {
                Some(index) => index,
                None => return 1,
            }
        }
        None => 0,
    };
    let Some(key) = error.key.as_deref().and_then(|key| key.rsplit('.').next()) else { return role_start + 1 };
    let block_end = lines.iter().skip(role_start + 1).position(|line| line.trim() == "[[role]]").map_or(lines.len(), |end| role_start + 1 + end);
    lines[role_start..block_end]
        .iter()
        .position(|line| line.trim_start().strip_prefix(key).is_some_and(|rest| rest.trim_start().starts_with('=')))
        .map_or(role_start + 1, |offset| role_start + offset + 1)
}

fn load(config_path: Option<&Path>, dir: Option<&Path>) -> anyhow::Result<PolicySet> {
    match config_path {
        Some(path) => {
            let mut config = Config::load(path)?;
            if let Some(dir) = dir {
                config.policy_dir = dir.to_path_buf();
            }
            // Backends are built for their parameter schemas only; nothing is contacted.
            let backends = Backends::build(&config, config.dev.as_ref().map(|dev| dev.state_dir.as_path()))?;
            load_policies(&config, &backends, config.dev.is_some())
        }
        None => {
            let Some(dir) = dir else { bail!("pass a policy directory or --config") };
            let all_schemas = backend::all_param_schemas();
            let context = CompileContext { issuers: None, backends: None, all_schemas: &all_schemas };
            Ok(PolicySet::load_dir(dir, &context)?)
        }
    }
}

/// The explanation as text, one line per condition, ending in the decision.
pub fn explain(policies: &PolicySet, role_name: &str, claims: &dyn ClaimLookup, config: Option<&Config>) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let Some(role) = policies.role(role_name) else {
        let _ = writeln!(out, "DENY: no role named {role_name:?} in the loaded policies");
        return out;
    };
    let _ = writeln!(out, "role {} ({})", role.name, role.file.display());
    if let Some(description) = &role.description {
        let _ = writeln!(out, "  {description}");
    }
    let mut allowed = true;
    let iss = claims.claim_str("iss");
    match (config, iss) {
        (Some(config), Some(iss)) => {
            let issuer = config.issuers.iter().find(|issuer| issuer.issuer == iss);
            let passed = issuer.is_some_and(|issuer| issuer.name == role.issuer);
            allowed &= passed;
            let got = issuer.map(|issuer| issuer.name.to_string()).unwrap_or_else(|| format!("unconfigured iss {iss:?}"));
            let _ = writeln!(out, "  {} issuer is {}: token is from {got}", mark(passed), role.issuer);
        }
        _ => {
            let _ = writeln!(out, "  ???? issuer is {}: not checked (needs --config and an `iss` claim)", role.issuer);
        }
    }
    for condition in role.conditions(claims) {
        allowed &= condition.passed;
        let _ = writeln!(out, "  {} {}: {}", mark(condition.passed), condition.condition, condition.reason);
    }
    let _ = writeln!(
        out,
        "  ttl: default {}, max {}, min {}; never past the token's exp (the job deadline)",
        role.default_ttl,
        role.max_ttl,
        role.min_ttl.map(|t| t.to_string()).unwrap_or_else(|| "none".into())
    );
    if let Some(schema) = role.schema {
        let _ = writeln!(out, "  backend {} ({}): {}", role.backend, schema.kind, schema.ttl_note);
    }
    match role.render_params(claims) {
        Ok(params) => {
            for (key, value) in params.text {
                let _ = writeln!(out, "  param {key} = {value:?}");
            }
            for (key, table) in params.tables {
                for (name, value) in table {
                    let _ = writeln!(out, "  param {key}.{name} = {value:?}");
                }
            }
        }
        Err(error) => {
            allowed = false;
            let _ = writeln!(out, "  FAIL params: {error}");
        }
    }
    let _ = writeln!(out, "{}", if allowed { "ALLOW" } else { "DENY" });
    out
}

fn mark(passed: bool) -> &'static str {
    if passed {
        "PASS"
    } else {
        "FAIL"
    }
}
