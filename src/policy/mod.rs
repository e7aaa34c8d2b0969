//! Trust policies: plain TOML data compiled once at load (`compile`: patterns anchored,
//! templates parsed, every error naming file, role and key) into the types here, which
//! [`PolicySet::decide`] then consults without I/O. Default deny.

pub mod admins;
mod compile;
mod glob;
pub mod template;
pub mod ttl;

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;

use serde_json::Value;

pub use compile::{CompileContext, PolicyError, SCOPING_CLAIMS};
pub use glob::Glob;
pub use template::{ClaimValues, JsonTemplate, Template, POLICY_STRING_MAX_CHARS};
pub use ttl::{grant, GrantedTtl, OnShortDeadline, TtlLimits, TtlNotSatisfiable, TtlRequest};

use crate::types::{BackendName, ClaimLookup, IssuerName, RoleName, Ttl};

/// What a backend kind accepts as role parameters, so policies can be checked without I/O.
#[derive(Debug, Clone, Copy)]
pub struct ParamSchema {
    pub kind: &'static str,
    pub required: &'static [&'static str],
    pub optional: &'static [&'static str],
    /// Stated in `policy explain`: the backend's own lifetime rules.
    pub ttl_note: &'static str,
    /// Keys that are not plain text templates ([`ParamShape::Text`] is the default).
    pub shapes: &'static [(&'static str, ParamShape)],
    /// The backend's own rules on the compiled parameters (sizes, counts, formats), checked
    /// once at load so a policy that could only ever fail is refused up front.
    pub check: Option<CheckParams>,
    /// Applied to the rendered parameters of every exchange, before anything is minted:
    /// defaults drawn from claims, sanitising, limits that depend on claim values. An error
    /// is an `access_denied` naming the parameter.
    pub finish: Option<FinishParams>,
}

pub type CheckParams = fn(&BTreeMap<String, Param>) -> Result<(), ParamProblem>;
pub type FinishParams = fn(&mut RenderedParams, &dyn ClaimLookup) -> Result<(), ParamProblem>;

impl ParamSchema {
    /// For `..ParamSchema::PLAIN` in a schema whose parameters are all plain text templates.
    pub const PLAIN: ParamSchema =
        ParamSchema { kind: "", required: &[], optional: &[], ttl_note: "", shapes: &[], check: None, finish: None };

    fn knows(&self, key: &str) -> bool {
        self.required.contains(&key) || self.optional.contains(&key)
    }

    pub fn shape(&self, key: &str) -> ParamShape {
        self.shapes.iter().find(|(name, _)| *name == key).map(|(_, shape)| *shape).unwrap_or(ParamShape::Text)
    }
}

/// How a role parameter is written and rendered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParamShape {
    /// `key = "text {claim}"`; claim values substituted as they are.
    Text,
    /// A string that names something fixed (an ARN, a mount path). It may read claims only
    /// when the role opts in with `allow_claims_in = ["key"]`, and then each claim value is
    /// held to [`ClaimValues::Identifier`], so a claim cannot add a path segment or wildcard.
    Literal,
    /// A table of text templates: `[role.key]` with one `name = "template"` per entry.
    Table,
    /// A JSON document as a string, whose string values are templates ([`JsonTemplate`]).
    Json,
}

/// A compiled role parameter.
#[derive(Debug, Clone)]
pub enum Param {
    Text(Template),
    Literal(Template),
    Table(BTreeMap<String, Template>),
    Json(JsonTemplate),
}

impl Param {
    /// The template of a text or literal parameter.
    pub fn as_template(&self) -> Option<&Template> {
        match self {
            Param::Text(template) | Param::Literal(template) => Some(template),
            Param::Table(_) | Param::Json(_) => None,
        }
    }
}

/// The parameters of one exchange, rendered from the verified claims.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RenderedParams {
    /// Text, literal and JSON parameters.
    pub text: BTreeMap<String, String>,
    pub tables: BTreeMap<String, BTreeMap<String, String>>,
}

/// A parameter a backend refuses, by key (`session_tags.team` for a table entry).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParamProblem {
    pub key: String,
    pub message: String,
}

impl ParamProblem {
    pub fn new(key: impl Into<String>, message: impl Into<String>) -> Self {
        Self { key: key.into(), message: message.into() }
    }
}

#[derive(Debug, Clone)]
pub enum Matcher {
    Pattern(Glob),
    Integer(i64),
    Boolean(bool),
    AnyOf(Vec<Matcher>),
}

impl Matcher {
    /// Values compare by JSON type: a string pattern never matches a number and vice versa.
    pub fn matches(&self, claim: &Value) -> bool {
        match (self, claim) {
            (_, Value::String(value)) => self.matches_str(value),
            (Matcher::Integer(expected), Value::Number(value)) => value.as_i64() == Some(*expected),
            (Matcher::Boolean(expected), Value::Bool(value)) => value == expected,
            (Matcher::AnyOf(options), claim) => options.iter().any(|option| option.matches(claim)),
            _ => false,
        }
    }

    /// [`Matcher::matches`] for a claim that is a JSON string.
    pub fn matches_str(&self, claim: &str) -> bool {
        match self {
            Matcher::Pattern(glob) => glob.matches(claim),
            Matcher::AnyOf(options) => options.iter().any(|option| option.matches_str(claim)),
            Matcher::Integer(_) | Matcher::Boolean(_) => false,
        }
    }

    /// Whether the claims have `name` and it matches; a string claim is read in place.
    fn holds_for(&self, claims: &dyn ClaimLookup, name: &str) -> bool {
        match claims.claim_str(name) {
            Some(text) => self.matches_str(text),
            None => claims.claim(name).is_some_and(|value| self.matches(value)),
        }
    }
}

impl fmt::Display for Matcher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Matcher::Pattern(glob) => write!(f, "{:?}", glob.as_str()),
            Matcher::Integer(number) => write!(f, "{number}"),
            Matcher::Boolean(flag) => write!(f, "{flag}"),
            Matcher::AnyOf(options) => {
                let rendered: Vec<String> = options.iter().map(ToString::to_string).collect();
                write!(f, "any of [{}]", rendered.join(", "))
            }
        }
    }
}

#[derive(Debug, Clone)]
pub struct Role {
    pub name: RoleName,
    pub file: PathBuf,
    pub description: Option<String>,
    pub backend: BackendName,
    pub issuer: IssuerName,
    pub target: Option<String>,
    pub bindings: Vec<(String, Matcher)>,
    pub default_ttl: Ttl,
    pub max_ttl: Ttl,
    pub min_ttl: Option<Ttl>,
    pub max_uses_per_token: Option<u32>,
    /// What to do when the backend's minimum lifetime reaches past the job's deadline.
    pub on_short_deadline: OnShortDeadline,
    pub params: BTreeMap<String, Param>,
    /// The backend kind's parameter rules: the configured backend's, or offline the one kind
    /// whose keys the role uses.
    pub schema: Option<ParamSchema>,
    /// `[role.delivery]`: the role also needs a Gogs delivery token (header
    /// `X-Credbroker-Delivery`) next to the caller's own identity token.
    pub delivery: Option<DeliveryRequirement>,
}

/// A role's demands on the Gogs delivery token that must accompany the identity token.
#[derive(Debug, Clone)]
pub struct DeliveryRequirement {
    /// Delivery-token claims (`repository`, `ref`, ...) and what they must match.
    pub bindings: Vec<(String, Matcher)>,
    /// Exchanges one delivery token may take part in for this role (default 1).
    pub max_uses: u32,
}

impl DeliveryRequirement {
    /// The first delivery binding that fails, for the audit log.
    pub fn first_mismatch(&self, claims: &dyn ClaimLookup) -> Option<String> {
        first_failed_binding(&self.bindings, claims).map(|failed| format!("delivery {failed}"))
    }
}

impl Role {
    /// The first binding that fails, as a reason fit for the audit log (not for the client).
    fn first_mismatch(&self, claims: &dyn ClaimLookup) -> Option<String> {
        first_failed_binding(&self.bindings, claims)
    }

    pub fn conditions(&self, claims: &dyn ClaimLookup) -> Vec<Condition> {
        binding_conditions(&self.bindings, claims)
    }

    pub fn render_params(&self, claims: &dyn ClaimLookup) -> Result<RenderedParams, String> {
        let mut rendered = RenderedParams::default();
        for (key, param) in &self.params {
            let failed = |e: String| format!("{key}: {e}");
            match param {
                Param::Text(template) => {
                    rendered.text.insert(key.clone(), template.render(claims).map_err(failed)?);
                }
                Param::Literal(template) => {
                    let value = template.render_checked(claims, ClaimValues::Identifier).map_err(failed)?;
                    rendered.text.insert(key.clone(), value);
                }
                Param::Json(template) => {
                    rendered.text.insert(key.clone(), template.render(claims).map_err(failed)?);
                }
                Param::Table(entries) => {
                    let mut table = BTreeMap::new();
                    for (name, template) in entries {
                        let value = template.render(claims).map_err(|e| format!("{key}.{name}: {e}"))?;
                        table.insert(name.clone(), value);
                    }
                    rendered.tables.insert(key.clone(), table);
                }
            }
        }
        if let Some(finish) = self.schema.and_then(|schema| schema.finish) {
            finish(&mut rendered, claims).map_err(|problem| format!("{}: {}", problem.key, problem.message))?;
        }
        Ok(rendered)
    }

    pub fn ttl_limits(&self, backend_max: Option<Ttl>) -> TtlLimits {
        TtlLimits {
            default_ttl: self.default_ttl,
            max_ttl: self.max_ttl,
            min_ttl: self.min_ttl,
            backend_max,
            backend_min: None,
            on_short_deadline: self.on_short_deadline,
        }
    }
}

/// Each claim binding checked against the claims, with a reason either way.
fn binding_conditions(bindings: &[(String, Matcher)], claims: &dyn ClaimLookup) -> Vec<Condition> {
    bindings.iter().map(|(claim, matcher)| binding_condition(claim, matcher, claims)).collect()
}

/// The first binding the claims fail, as `condition: reason`. Every exchange asks this, so a
/// binding that holds costs a match and no formatting.
pub(crate) fn first_failed_binding(bindings: &[(String, Matcher)], claims: &dyn ClaimLookup) -> Option<String> {
    let (claim, matcher) = bindings.iter().find(|(claim, matcher)| !matcher.holds_for(claims, claim))?;
    let failed = binding_condition(claim, matcher, claims);
    Some(format!("{}: {}", failed.condition, failed.reason))
}

fn binding_condition(claim: &str, matcher: &Matcher, claims: &dyn ClaimLookup) -> Condition {
    let condition = format!("claim {claim} = {matcher}");
    match claims.claim(claim) {
        None => Condition { condition, passed: false, reason: "claim is missing from the token".into() },
        Some(value) if matcher.matches(value) => Condition { condition, passed: true, reason: format!("token has {value}") },
        Some(value) => Condition {
            condition,
            passed: false,
            reason: format!("token has {value} ({}), which does not match", json_type(value)),
        },
    }
}

#[derive(Debug, Clone)]
pub struct Condition {
    pub condition: String,
    pub passed: bool,
    pub reason: String,
}

/// Why a role was not granted. Only for the audit log and `policy explain`: the client
/// always hears the same thing, so nobody can probe which roles exist.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct Denial(pub String);

#[derive(Debug, Clone, Default)]
pub struct PolicySet {
    roles: BTreeMap<RoleName, Role>,
    admins: Vec<admins::AdminBinding>,
    auditors: Vec<admins::AdminBinding>,
    /// See [`PolicySet::version`].
    version: String,
}

impl PolicySet {
    /// Lowercase hex SHA-256 over the set's files, by file name (not path, so `policy check`
    /// on a checkout and the server on its deployed copy agree) in name order, each as
    /// `name NUL content NUL`. Every audit row records it: "granted by the policy at commit X".
    pub fn version(&self) -> &str {
        &self.version
    }

    pub fn len(&self) -> usize {
        self.roles.len()
    }

    pub fn is_empty(&self) -> bool {
        self.roles.is_empty()
    }

    pub fn roles(&self) -> impl Iterator<Item = &Role> {
        self.roles.values()
    }

    pub fn role(&self, name: &str) -> Option<&Role> {
        RoleName::parse(name).ok().and_then(|name| self.roles.get(&name))
    }

    /// Whether this verified identity may revoke, freeze and unfreeze (`[admins]`).
    pub fn authorize_admin(&self, issuer: &IssuerName, claims: &dyn ClaimLookup) -> Result<&admins::AdminBinding, Denial> {
        admins::authorize(&self.admins, issuer, claims)
    }

    /// Whether this verified identity may read the audit log (`[auditors]`).
    pub fn authorize_auditor(&self, issuer: &IssuerName, claims: &dyn ClaimLookup) -> Result<&admins::AdminBinding, Denial> {
        admins::authorize_in(admins::Section::AUDITORS, &self.auditors, issuer, claims)
    }

    /// Default deny: the role must exist, trust this issuer, and every binding must match.
    pub fn decide(&self, role: &str, issuer: &IssuerName, claims: &dyn ClaimLookup) -> Result<&Role, Denial> {
        let role = self.role(role).ok_or_else(|| Denial(format!("no role named {role:?}")))?;
        if &role.issuer != issuer {
            return Err(Denial(format!("role trusts issuer {}, token is from {issuer}", role.issuer)));
        }
        match role.first_mismatch(claims) {
            Some(reason) => Err(Denial(reason)),
            None => Ok(role),
        }
    }
}

fn json_type(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests;
