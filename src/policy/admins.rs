//! `[admins]`: which OIDC identities may revoke, freeze and unfreeze. Bound with the same
//! claim rules as roles (`issuer` plus `[admins.claims]`), default deny: with no `[admins]`
//! section anywhere, nobody may.
//!
//! ```toml
//! [admins]
//! issuer = "gitlab"
//! [admins.claims]
//! project_path = "security/credbroker-admin"
//! ref_protected = "true"
//! ```
//!
//! A file may also hold several, as `[[admins]]`; an identity matching any one is an admin.

use std::path::{Path, PathBuf};

use super::{first_failed_binding, CompileContext, Denial, Matcher, PolicyError};
use crate::types::{ClaimLookup, IssuerName};

#[derive(Debug, Clone)]
pub struct AdminBinding {
    pub file: PathBuf,
    pub issuer: IssuerName,
    pub bindings: Vec<(String, Matcher)>,
}

impl AdminBinding {
    /// The first binding that fails, for the audit log.
    fn first_mismatch(&self, section: Section, issuer: &IssuerName, claims: &dyn ClaimLookup) -> Option<String> {
        if &self.issuer != issuer {
            return Some(format!("{} in {} trust issuer {}, token is from {issuer}", section.name, self.file.display(), self.issuer));
        }
        first_failed_binding(&self.bindings, claims)
    }
}

/// Whether any `[admins]` entry accepts this identity; the denial lists why each did not.
pub fn authorize<'a>(admins: &'a [AdminBinding], issuer: &IssuerName, claims: &dyn ClaimLookup) -> Result<&'a AdminBinding, Denial> {
    authorize_in(Section::ADMINS, admins, issuer, claims)
}

/// A policy section that binds identities to a power with role-style claim rules: `[admins]`
/// (revoke, freeze) and `[auditors]` (read the audit log) share everything but their name.
#[derive(Debug, Clone, Copy)]
pub struct Section {
    pub name: &'static str,
    /// What the bound identities may do, for denials ("revoke, freeze or unfreeze").
    pub power: &'static str,
    /// What a caller not bound is not ("an admin").
    pub member: &'static str,
}

impl Section {
    pub const ADMINS: Section = Section { name: "admins", power: "revoke, freeze or unfreeze", member: "an admin" };
    pub const AUDITORS: Section = Section { name: "auditors", power: "read the audit log", member: "an auditor" };
}

pub fn authorize_in<'a>(
    section: Section,
    bindings: &'a [AdminBinding],
    issuer: &IssuerName,
    claims: &dyn ClaimLookup,
) -> Result<&'a AdminBinding, Denial> {
    if bindings.is_empty() {
        return Err(Denial(format!("no [{}] section in any policy file: nobody may {}", section.name, section.power)));
    }
    let mut reasons = Vec::new();
    for binding in bindings {
        match binding.first_mismatch(section, issuer, claims) {
            None => return Ok(binding),
            Some(reason) => reasons.push(reason),
        }
    }
    Err(Denial(format!("not {}: {}", section.member, reasons.join("; "))))
}

/// `[admins]` (a table) or `[[admins]]` (a list of tables) of one policy file.
pub fn compile(file: &Path, raw: &toml::Value, context: &CompileContext<'_>) -> Result<Vec<AdminBinding>, PolicyError> {
    compile_section(Section::ADMINS, file, raw, context)
}

/// `[NAME]` or `[[NAME]]` of one policy file, for the section `section`.
pub fn compile_section(section: Section, file: &Path, raw: &toml::Value, context: &CompileContext<'_>) -> Result<Vec<AdminBinding>, PolicyError> {
    let name = section.name;
    let error = |key: &str, message: String| PolicyError { file: file.to_path_buf(), role: None, key: Some(key.to_owned()), message };
    let tables: Vec<&toml::Table> = match raw {
        toml::Value::Table(table) => vec![table],
        toml::Value::Array(items) => items
            .iter()
            .map(|item| item.as_table().ok_or_else(|| error(name, "must be a table or a list of tables".into())))
            .collect::<Result<_, _>>()?,
        _ => return Err(error(name, "must be a table or a list of tables".into())),
    };
    let mut admins = Vec::new();
    for table in tables {
        if let Some(key) = table.keys().find(|key| !matches!(key.as_str(), "issuer" | "claims" | "description")) {
            return Err(error(&format!("{name}.{key}"), "unknown key; expected issuer, claims, description".into()));
        }
        let issuer = table
            .get("issuer")
            .and_then(toml::Value::as_str)
            .ok_or_else(|| error(&format!("{name}.issuer"), "is required (a string)".into()))?;
        let issuer = IssuerName::parse(issuer).map_err(|m| error(&format!("{name}.issuer"), m))?;
        if let Some(known) = context.issuers {
            if !known.contains(&issuer) {
                return Err(error(&format!("{name}.issuer"), format!("issuer {issuer} is not configured")));
            }
        }
        let Some(toml::Value::Table(claims)) = table.get("claims") else {
            return Err(error(&format!("{name}.claims"), "is required: a table binding claims, as for roles".into()));
        };
        let mut bindings = Vec::new();
        for (claim, value) in claims {
            let matcher = Matcher::parse(value).map_err(|m| error(&format!("{name}.claims.{claim}"), m))?;
            bindings.push((claim.clone(), matcher));
        }
        // Rights for every identity of an issuer would be an accident, never a policy.
        if !bindings.iter().any(|(_, matcher)| matcher.pins_scope()) {
            return Err(error(
                &format!("{name}.claims"),
                "must bind at least one claim to a value that is not only wildcards (e.g. project_path or user_login)".into(),
            ));
        }
        admins.push(AdminBinding { file: file.to_path_buf(), issuer, bindings });
    }
    Ok(admins)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn compile_text(text: &str) -> Result<Vec<AdminBinding>, PolicyError> {
        let value: toml::Table = toml::from_str(text).unwrap();
        let issuers = [IssuerName::parse("gitlab").unwrap()];
        let context = CompileContext { issuers: Some(&issuers), backends: None, all_schemas: &[] };
        compile(Path::new("admins.toml"), &value["admins"], &context)
    }

    #[test]
    fn admins_bind_claims_like_roles() {
        let admins = compile_text(
            "[[admins]]\nissuer = \"gitlab\"\nclaims = { project_path = \"security/*\", ref_protected = \"true\" }\n\
             [[admins]]\nissuer = \"gitlab\"\nclaims = { user_login = [\"alice\", \"bob\"] }",
        )
        .unwrap();
        let gitlab = IssuerName::parse("gitlab").unwrap();
        let claims = |value: serde_json::Value| value.as_object().unwrap().clone();
        assert!(authorize(&admins, &gitlab, &claims(json!({"project_path": "security/admin", "ref_protected": "true"}))).is_ok());
        assert!(authorize(&admins, &gitlab, &claims(json!({"user_login": "bob"}))).is_ok());
        let denial = authorize(&admins, &gitlab, &claims(json!({"project_path": "security/admin", "ref_protected": "false"}))).unwrap_err();
        assert!(denial.0.contains("claim ref_protected"), "{denial}");
        assert!(authorize(&[], &gitlab, &claims(json!({}))).unwrap_err().0.contains("no [admins]"));
    }

    #[test]
    fn admins_that_would_admit_anyone_are_refused_naming_the_key() {
        for (text, key) in [
            ("[admins]\nissuer = \"gitlab\"", "admins.claims"),
            ("[admins]\nissuer = \"gitlab\"\nclaims = { user_login = \"*\" }", "admins.claims"),
            ("[admins]\nissuer = \"gitlab\"\nsubject = \"x\"\nclaims = { user_login = \"a\" }", "admins.subject"),
            ("[admins]\nissuer = \"github\"\nclaims = { user_login = \"a\" }", "admins.issuer"),
            ("[admins]\nclaims = { user_login = \"a\" }", "admins.issuer"),
        ] {
            let error = compile_text(text).unwrap_err();
            assert_eq!(error.key.as_deref(), Some(key), "{text}: {error}");
        }
    }
}
