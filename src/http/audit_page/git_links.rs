//! Links from an audit record back to the Git server, for the `/audit` page:
//!
//! ```toml
//! [audit_page.links.gitlab]      # per issuer name
//! commit = "https://gitlab.example.com/{project_path}/-/commit/{sha}"
//! pipeline = "https://gitlab.example.com/{project_path}/-/pipelines/{pipeline_id}"
//! user = "https://gitlab.example.com/{user_login}"
//! ```
//!
//! Placeholders name claims of the record. Templates are checked at load: each must be an
//! http(s) URL whose scheme and host are fixed text, so a claim value (percent-encoded, `/`
//! kept) can only add path segments, never send the auditor to another host or a
//! `javascript:` URL.

use serde_json::Value;

use crate::policy::template::Template;

pub const LINK_KINDS: &[&str] = &["commit", "pipeline", "user"];

#[derive(Debug, Clone, Default)]
pub struct GitLinks {
    by_issuer: Vec<(String, Vec<(&'static str, Template)>)>,
}

/// A link for one record: `kind` is one of [`LINK_KINDS`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub kind: &'static str,
    pub href: String,
}

/// A bad `[audit_page]` entry: `key` is the dotted key at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{key}: {message}")]
pub struct LinksError {
    pub key: String,
    pub message: String,
}

impl GitLinks {
    /// `[audit_page]`'s `links` table; `issuers`: the issuer names records can carry.
    pub fn parse(audit_page: Option<&toml::Table>, issuers: &[&str]) -> Result<Self, LinksError> {
        let error = |key: String, message: String| LinksError { key, message };
        let Some(section) = audit_page else { return Ok(Self::default()) };
        if let Some(unknown) = section.keys().find(|key| *key != "links") {
            return Err(error(format!("audit_page.{unknown}"), "unknown key; expected links".into()));
        }
        let Some(links) = section.get("links") else { return Ok(Self::default()) };
        let links = links.as_table().ok_or_else(|| error("audit_page.links".into(), "must be a table of issuers".into()))?;
        let mut by_issuer = Vec::new();
        for (issuer, templates) in links {
            let prefix = format!("audit_page.links.{issuer}");
            if !issuers.contains(&issuer.as_str()) {
                return Err(error(prefix, format!("is not a configured issuer (known: {})", issuers.join(", "))));
            }
            let templates = templates.as_table().ok_or_else(|| error(prefix.clone(), "must be a table".into()))?;
            let mut compiled = Vec::new();
            for (kind, source) in templates {
                let key = format!("{prefix}.{kind}");
                let kind = *LINK_KINDS
                    .iter()
                    .find(|known| **known == kind.as_str())
                    .ok_or_else(|| error(key.clone(), format!("unknown link; expected {}", LINK_KINDS.join(", "))))?;
                let source = source.as_str().ok_or_else(|| error(key.clone(), "must be a URL template string".into()))?;
                compiled.push((kind, parse_url_template(source).map_err(|message| error(key.clone(), message))?));
            }
            by_issuer.push((issuer.clone(), compiled));
        }
        Ok(Self { by_issuer })
    }

    /// The links a record's issuer has templates for; a template whose claims the record
    /// lacks is left out rather than rendered half-filled.
    pub fn for_record(&self, issuer: Option<&str>, claims: Option<&Value>) -> Vec<Link> {
        let (Some(issuer), Some(Value::Object(claims))) = (issuer, claims) else { return Vec::new() };
        let Some((_, templates)) = self.by_issuer.iter().find(|(name, _)| name == issuer) else { return Vec::new() };
        templates.iter().filter_map(|(kind, template)| template.render_url(claims).ok().map(|href| Link { kind, href })).collect()
    }
}

fn parse_url_template(source: &str) -> Result<Template, String> {
    let template = Template::parse(source)?;
    let fixed = source.split('{').next().unwrap_or_default();
    let after_scheme = fixed.strip_prefix("https://").or_else(|| fixed.strip_prefix("http://"));
    match after_scheme {
        Some(rest) if rest.find('/').is_some_and(|slash| slash > 0) => Ok(template),
        _ => Err(format!("{source:?} must start with http:// or https://, a host and a `/` before any placeholder")),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn links(text: &str) -> Result<GitLinks, LinksError> {
        let table: toml::Table = toml::from_str(text).unwrap();
        GitLinks::parse(table.get("audit_page").and_then(|v| v.as_table()), &["gitlab", "gogs"])
    }

    #[test]
    fn claims_fill_paths_but_cannot_leave_the_host() {
        let links = links(
            "[audit_page.links.gitlab]\ncommit = \"https://git.example.com/{project_path}/-/commit/{sha}\"\nuser = \"https://git.example.com/{user_login}\"",
        )
        .unwrap();
        let claims = json!({"project_path": "platform/orders", "sha": "abc123", "user_login": "x?y#z\"><script>"});
        let rendered = links.for_record(Some("gitlab"), Some(&claims));
        assert_eq!(rendered[0], Link { kind: "commit", href: "https://git.example.com/platform/orders/-/commit/abc123".into() });
        assert_eq!(rendered[1].href, "https://git.example.com/x%3Fy%23z%22%3E%3Cscript%3E");
        assert!(links.for_record(Some("gogs"), Some(&claims)).is_empty());
        let partial = links.for_record(Some("gitlab"), Some(&json!({"sha": "abc", "user_login": "bob"})));
        assert_eq!(partial.iter().map(|link| link.kind).collect::<Vec<_>>(), ["user"], "no commit link without project_path");
    }

    #[test]
    fn bad_entries_name_their_key() {
        for (text, key) in [
            ("[audit_page.links.gitlab]\ncommit = \"{base}/commit\"", "audit_page.links.gitlab.commit"),
            ("[audit_page.links.gitlab]\ncommit = \"javascript:alert(1)//{sha}\"", "audit_page.links.gitlab.commit"),
            ("[audit_page.links.gitlab]\ncommit = \"https://{host}/x\"", "audit_page.links.gitlab.commit"),
            ("[audit_page.links.gitlab]\nbranch = \"https://x/{ref}\"", "audit_page.links.gitlab.branch"),
            ("[audit_page.links.github]\ncommit = \"https://x/{sha}\"", "audit_page.links.github"),
            ("[audit_page]\ncolour = 1", "audit_page.colour"),
        ] {
            assert_eq!(links(text).unwrap_err().key, key, "{text}");
        }
    }
}
