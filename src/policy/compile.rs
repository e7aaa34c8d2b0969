//! Compiling policy files: TOML text in, a [`PolicySet`] out, every pattern anchored and every
//! template parsed once; every error names the file, the role and the key.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::{
    admins, DeliveryRequirement, Glob, JsonTemplate, Matcher, OnShortDeadline, Param, ParamSchema, ParamShape, PolicySet, Role, Template,
};
use crate::types::{BackendName, IssuerName, RoleName, Ttl};

/// Claims that pin a role to a project or namespace. A role must bind at least one of them:
/// otherwise every project on the issuer could use it.
pub const SCOPING_CLAIMS: &[&str] = &[
    "project_path",
    "project_id",
    "namespace_path",
    "namespace_id",
    "job_project_path",
    "job_project_id",
    "job_namespace_path",
    "job_namespace_id",
    "repository",
];

#[derive(Debug, thiserror::Error)]
#[error("{}{}{}: {message}", file.display(), role.as_ref().map(|r| format!(": role {r}")).unwrap_or_default(), key.as_ref().map(|k| format!(": key `{k}`")).unwrap_or_default())]
pub struct PolicyError {
    pub file: PathBuf,
    pub role: Option<String>,
    pub key: Option<String>,
    pub message: String,
}

/// What the configuration says exists. Without it (`policy check` offline) names of issuers
/// and backends are not checked, and parameters are checked against every backend kind.
pub struct CompileContext<'a> {
    pub issuers: Option<&'a [IssuerName]>,
    pub backends: Option<&'a HashMap<BackendName, ParamSchema>>,
    pub all_schemas: &'a [ParamSchema],
}

impl Matcher {
    pub(crate) fn parse(value: &toml::Value) -> Result<Self, String> {
        match value {
            toml::Value::String(pattern) => Glob::parse(pattern).map(Matcher::Pattern),
            toml::Value::Integer(number) => Ok(Matcher::Integer(*number)),
            toml::Value::Boolean(flag) => Ok(Matcher::Boolean(*flag)),
            toml::Value::Array(items) if !items.is_empty() => items
                .iter()
                .map(|item| match item {
                    toml::Value::Array(_) => Err("lists cannot be nested".to_owned()),
                    item => Matcher::parse(item),
                })
                .collect::<Result<_, _>>()
                .map(Matcher::AnyOf),
            toml::Value::Array(_) => Err("an empty list matches nothing".into()),
            _ => Err("must be a string pattern, an integer, a boolean or a list of those".into()),
        }
    }

    pub(crate) fn pins_scope(&self) -> bool {
        match self {
            Matcher::Pattern(glob) => glob.has_literal(),
            Matcher::Integer(_) => true,
            Matcher::Boolean(_) => false,
            Matcher::AnyOf(options) => options.iter().all(Matcher::pins_scope),
        }
    }
}

impl PolicySet {
    pub fn load_dir(dir: &Path, context: &CompileContext<'_>) -> Result<Self, PolicyError> {
        let dir_error = |message: String| PolicyError { file: dir.to_path_buf(), role: None, key: None, message };
        let entries = std::fs::read_dir(dir).map_err(|e| dir_error(format!("cannot read policy directory: {e}")))?;
        let mut files: Vec<PathBuf> = entries
            .filter_map(|entry| entry.ok().map(|e| e.path()))
            .filter(|path| path.extension().is_some_and(|ext| ext == "toml"))
            .collect();
        files.sort();
        let mut sources = Vec::new();
        for file in files {
            let text = std::fs::read_to_string(&file)
                .map_err(|e| PolicyError { file: file.clone(), role: None, key: None, message: format!("cannot read: {e}") })?;
            sources.push((file, text));
        }
        Self::compile(&sources, context)
    }

    pub fn compile(sources: &[(PathBuf, String)], context: &CompileContext<'_>) -> Result<Self, PolicyError> {
        let mut roles: BTreeMap<RoleName, Role> = BTreeMap::new();
        let mut admin_bindings = Vec::new();
        let mut auditor_bindings = Vec::new();
        for (file, text) in sources {
            let raw: RawFile = toml::from_str(text)
                .map_err(|e| PolicyError { file: file.clone(), role: None, key: None, message: e.to_string() })?;
            for raw_role in raw.role {
                let role = compile_role(file, raw_role, context)?;
                if let Some(existing) = roles.get(&role.name) {
                    return Err(PolicyError {
                        file: file.clone(),
                        role: Some(role.name.to_string()),
                        key: Some("name".into()),
                        message: format!("role is already defined in {}", existing.file.display()),
                    });
                }
                roles.insert(role.name.clone(), role);
            }
            if let Some(raw_admins) = &raw.admins {
                admin_bindings.extend(admins::compile(file, raw_admins, context)?);
            }
            if let Some(raw_auditors) = &raw.auditors {
                auditor_bindings.extend(admins::compile_section(admins::Section::AUDITORS, file, raw_auditors, context)?);
            }
        }
        Ok(Self { roles, admins: admin_bindings, auditors: auditor_bindings, version: version_of(sources) })
    }
}

/// [`PolicySet::version`] of these files.
fn version_of(sources: &[(PathBuf, String)]) -> String {
    use sha2::{Digest, Sha256};
    let mut named: Vec<(String, &str)> =
        sources.iter().map(|(file, text)| (file.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(), text.as_str())).collect();
    named.sort();
    let mut hash = Sha256::new();
    for (name, text) in named {
        hash.update(name.as_bytes());
        hash.update([0]);
        hash.update(text.as_bytes());
        hash.update([0]);
    }
    hex::encode(hash.finalize())
}

/// Keys a role has besides its backend parameters.
const ROLE_KEYS: &[&str] = &[
    "name",
    "description",
    "backend",
    "issuer",
    "target",
    "claims",
    "default_ttl",
    "max_ttl",
    "min_ttl",
    "max_uses_per_token",
    "on_short_deadline",
    "allow_claims_in",
    "delivery",
];

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    role: Vec<toml::Table>,
    admins: Option<toml::Value>,
    /// `[auditors]`: who may read the audit log, bound like `[admins]`.
    auditors: Option<toml::Value>,
}

fn compile_role(file: &Path, raw: toml::Table, context: &CompileContext<'_>) -> Result<Role, PolicyError> {
    let role_label = raw.get("name").and_then(toml::Value::as_str).map(str::to_owned);
    let error = |key: &str, message: String| PolicyError {
        file: file.to_path_buf(),
        role: role_label.clone(),
        key: Some(key.to_owned()),
        message,
    };
    let string = |key: &str| -> Result<Option<String>, PolicyError> {
        match raw.get(key) {
            None => Ok(None),
            Some(toml::Value::String(value)) => Ok(Some(value.clone())),
            Some(_) => Err(error(key, "must be a string".into())),
        }
    };
    let required = |key: &str| string(key)?.ok_or_else(|| error(key, "is required".into()));
    let ttl = |key: &str| -> Result<Option<Ttl>, PolicyError> {
        match raw.get(key) {
            None => Ok(None),
            Some(toml::Value::String(value)) => Ttl::parse(value).map(Some).map_err(|m| error(key, m)),
            Some(toml::Value::Integer(value)) if *value > 0 => {
                Ttl::from_seconds(*value as u64).map(Some).map_err(|m| error(key, m))
            }
            Some(_) => Err(error(key, "must be a duration like \"15m\" or a number of seconds".into())),
        }
    };

    let name = RoleName::parse(&required("name")?).map_err(|m| error("name", m))?;
    let issuer = IssuerName::parse(&required("issuer")?).map_err(|m| error("issuer", m))?;
    if let Some(known) = context.issuers {
        if !known.contains(&issuer) {
            return Err(error("issuer", format!("issuer {issuer} is not configured")));
        }
    }
    let backend = BackendName::parse(&required("backend")?).map_err(|m| error("backend", m))?;
    let schema = match context.backends {
        Some(backends) => Some(
            *backends.get(&backend).ok_or_else(|| error("backend", format!("backend {backend} is not configured")))?,
        ),
        None => None,
    };

    let default_ttl = ttl("default_ttl")?.ok_or_else(|| error("default_ttl", "is required".into()))?;
    let max_ttl = ttl("max_ttl")?.ok_or_else(|| error("max_ttl", "is required".into()))?;
    let min_ttl = ttl("min_ttl")?;
    if default_ttl > max_ttl {
        return Err(error("default_ttl", format!("{default_ttl} exceeds max_ttl {max_ttl}")));
    }
    if let Some(min_ttl) = min_ttl.filter(|min| *min > max_ttl) {
        return Err(error("min_ttl", format!("{min_ttl} exceeds max_ttl {max_ttl}")));
    }
    let max_uses_per_token = match raw.get("max_uses_per_token") {
        None => None,
        Some(toml::Value::Integer(uses)) if (1..=1000).contains(uses) => Some(*uses as u32),
        Some(_) => return Err(error("max_uses_per_token", "must be an integer from 1 to 1000".into())),
    };

    let claims = match raw.get("claims") {
        Some(toml::Value::Table(claims)) => claims.clone(),
        Some(_) => return Err(error("claims", "must be a table".into())),
        None => toml::Table::new(),
    };
    let mut bindings = Vec::new();
    for (claim, value) in &claims {
        let matcher = Matcher::parse(value).map_err(|m| error(&format!("claims.{claim}"), m))?;
        bindings.push((claim.clone(), matcher));
    }
    let delivery = match raw.get("delivery") {
        None => None,
        Some(toml::Value::Table(table)) => Some(compile_delivery(table, &issuer).map_err(|(key, m)| error(&key, m))?),
        Some(_) => return Err(error("delivery", "must be a table of delivery-token claim bindings".into())),
    };
    let binds = |claim: &str| bindings.iter().any(|(name, matcher)| name == claim && matcher.pins_scope());
    // An identity token from a general IdP (a Kubernetes service account, Okta) has no project
    // claim; the delivery's repository scopes the role instead, and `sub` must name the caller.
    let scoped = SCOPING_CLAIMS.iter().any(|claim| binds(claim)) || (delivery.is_some() && binds("sub"));
    if delivery.is_some() && !scoped {
        return Err(error("claims", "a role with [role.delivery] must bind `sub` (the automation's identity) to a value that is not only wildcards".into()));
    }
    if !scoped {
        return Err(error(
            "claims",
            format!(
                "the role must bind a project or namespace claim ({}) to a value that is not only wildcards",
                SCOPING_CLAIMS.join(", ")
            ),
        ));
    }

    let on_short_deadline = match string("on_short_deadline")?.as_deref() {
        None | Some("refuse") => OnShortDeadline::Refuse,
        Some("allow_overshoot") => OnShortDeadline::AllowOvershoot,
        Some(other) => return Err(error("on_short_deadline", format!("{other:?}: expected \"refuse\" or \"allow_overshoot\""))),
    };

    let param_keys: Vec<&str> = raw.keys().map(String::as_str).filter(|key| !ROLE_KEYS.contains(key)).collect();
    for key in &param_keys {
        let known = match schema {
            Some(schema) => schema.knows(key),
            None => context.all_schemas.iter().any(|schema| schema.knows(key)),
        };
        if !known {
            let expected = match schema {
                Some(schema) => format!("backend kind {} accepts {:?}", schema.kind, [schema.required, schema.optional].concat()),
                None => "no backend kind accepts it".to_owned(),
            };
            return Err(error(key, format!("unknown key: {expected}")));
        }
    }
    // Offline the backend's kind is unknown: it is the kind whose keys the role uses.
    let schema = match schema {
        Some(schema) => Some(schema),
        None => Some(
            *context
                .all_schemas
                .iter()
                .find(|schema| {
                    param_keys.iter().all(|key| schema.knows(key)) && schema.required.iter().all(|key| param_keys.contains(key))
                })
                .ok_or_else(|| {
                    error("backend", format!("no backend kind accepts this combination of parameters: {param_keys:?}"))
                })?,
        ),
    };
    let schema_rules = schema.expect("resolved above");

    let allow_claims_in: Vec<String> = match raw.get("allow_claims_in") {
        None => Vec::new(),
        Some(toml::Value::Array(items)) => items
            .iter()
            .map(|item| item.as_str().map(str::to_owned).ok_or_else(|| error("allow_claims_in", "must be a list of parameter names".into())))
            .collect::<Result<_, _>>()?,
        Some(_) => return Err(error("allow_claims_in", "must be a list of parameter names".into())),
    };
    if let Some(key) = allow_claims_in.iter().find(|key| schema_rules.shape(key) != ParamShape::Literal) {
        return Err(error(
            "allow_claims_in",
            format!("{key:?} is not a parameter of backend kind {} that is fixed unless opted in", schema_rules.kind),
        ));
    }

    let mut params = BTreeMap::new();
    for key in param_keys {
        let value = &raw[key];
        let text = || value.as_str().ok_or_else(|| error(key, "must be a string template".into()));
        let param = match schema_rules.shape(key) {
            ParamShape::Text => Param::Text(Template::parse(text()?).map_err(|m| error(key, m))?),
            ParamShape::Literal => {
                let template = Template::parse(text()?).map_err(|m| error(key, m))?;
                if template.placeholders().next().is_some() && !allow_claims_in.iter().any(|allowed| allowed == key) {
                    return Err(error(
                        key,
                        format!("reads claims, which this key may only do if the role says so: add allow_claims_in = [{key:?}]"),
                    ));
                }
                Param::Literal(template)
            }
            ParamShape::Json => Param::Json(JsonTemplate::parse(text()?).map_err(|m| error(key, m))?),
            ParamShape::Table => {
                let toml::Value::Table(entries) = value else {
                    return Err(error(key, "must be a table of string templates".into()));
                };
                let mut table = BTreeMap::new();
                for (name, entry) in entries {
                    let entry_key = format!("{key}.{name}");
                    let source = entry.as_str().ok_or_else(|| error(&entry_key, "must be a string template".into()))?;
                    table.insert(name.clone(), Template::parse(source).map_err(|m| error(&entry_key, m))?);
                }
                Param::Table(table)
            }
        };
        params.insert(key.to_owned(), param);
    }
    if let Some(missing) = schema_rules.required.iter().find(|key| !params.contains_key(**key)) {
        return Err(error(missing, format!("is required by backend kind {}", schema_rules.kind)));
    }
    if let Some(check) = schema_rules.check {
        check(&params).map_err(|problem| error(&problem.key, problem.message))?;
    }

    Ok(Role {
        name,
        file: file.to_path_buf(),
        description: string("description")?,
        backend,
        issuer,
        target: string("target")?,
        bindings,
        default_ttl,
        max_ttl,
        min_ttl,
        max_uses_per_token,
        on_short_deadline,
        params,
        schema,
        delivery,
    })
}

/// Compiles `[role.delivery]`: bindings on delivery-token claims plus `max_uses`. The
/// repository must be pinned, or any push to any repository could unlock the role.
fn compile_delivery(table: &toml::Table, issuer: &IssuerName) -> Result<DeliveryRequirement, (String, String)> {
    if issuer.as_str() == crate::types::GOGS_ISSUER_NAME {
        return Err((
            "delivery".into(),
            "a role whose issuer is gogs binds the delivery token's claims in [role.claims]; [role.delivery] is for roles whose caller presents its own identity token".into(),
        ));
    }
    let mut bindings = Vec::new();
    let mut max_uses = 1;
    for (key, value) in table {
        let key_name = format!("delivery.{key}");
        if key == "max_uses" {
            max_uses = match value {
                toml::Value::Integer(uses) if (1..=1000).contains(uses) => *uses as u32,
                _ => return Err((key_name, "must be an integer from 1 to 1000".into())),
            };
            continue;
        }
        if !crate::types::DELIVERY_CLAIMS.contains(&key.as_str()) {
            return Err((key_name, format!("not a delivery-token claim; expected one of {:?} or max_uses", crate::types::DELIVERY_CLAIMS)));
        }
        bindings.push((key.clone(), Matcher::parse(value).map_err(|m| (key_name, m))?));
    }
    if !bindings.iter().any(|(claim, matcher)| claim == "repository" && matcher.pins_scope()) {
        return Err(("delivery.repository".into(), "is required: the repository (\"owner/name\") whose deliveries this role accepts".into()));
    }
    Ok(DeliveryRequirement { bindings, max_uses })
}
