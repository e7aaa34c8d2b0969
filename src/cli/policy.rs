//! `policy check` and `policy explain`: the policy author's tools, offline.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::Subcommand;
use serde_json::{Map, Value};

use crate::backend::{self, Backends};
use crate::config::Config;
use crate::policy::{CompileContext, PolicySet};
use crate::startup::load_policies;

#[derive(Subcommand)]
pub enum PolicyCommand {
    /// Validate every policy file; with --config also against the configured issuers and backends.
    Check {
        /// Policy directory (default: the configuration's `policy_dir`).
        dir: Option<PathBuf>,
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
        PolicyCommand::Check { dir } => {
            let policies = load(config_path, dir.as_deref())?;
            let mode = if config_path.is_some() { "against the configuration" } else { "offline (no --config)" };
            println!("ok: {} roles valid, checked {mode}", policies.len());
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
pub fn explain(policies: &PolicySet, role_name: &str, claims: &Map<String, Value>, config: Option<&Config>) -> String {
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
    let iss = claims.get("iss").and_then(Value::as_str);
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
