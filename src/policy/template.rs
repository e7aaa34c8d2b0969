//! `"ci:{project_path}"`-style templates rendered from verified claims. Parsed at load so a
//! typo is a load error, not a surprise at exchange time.

use serde_json::{Map, Value};

use crate::types::ClaimLookup;

#[derive(Debug, Clone)]
enum Part {
    Literal(String),
    Claim(String),
}

#[derive(Debug, Clone)]
pub struct Template {
    source: String,
    parts: Vec<Part>,
}

impl Template {
    pub fn parse(source: &str) -> Result<Self, String> {
        let mut parts = Vec::new();
        let mut literal = String::new();
        let mut chars = source.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '{' if chars.peek() == Some(&'{') => {
                    chars.next();
                    literal.push('{');
                }
                '}' if chars.peek() == Some(&'}') => {
                    chars.next();
                    literal.push('}');
                }
                '{' => {
                    let mut name = String::new();
                    loop {
                        match chars.next() {
                            Some('}') => break,
                            Some(c) if c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' => name.push(c),
                            _ => return Err(format!("template {source:?}: placeholders look like {{claim_name}}")),
                        }
                    }
                    if name.is_empty() {
                        return Err(format!("template {source:?} has an empty placeholder"));
                    }
                    if !literal.is_empty() {
                        parts.push(Part::Literal(std::mem::take(&mut literal)));
                    }
                    parts.push(Part::Claim(name));
                }
                '}' => return Err(format!("template {source:?} has an unmatched '}}' (write '}}}}')")),
                c => literal.push(c),
            }
        }
        if !literal.is_empty() {
            parts.push(Part::Literal(literal));
        }
        Ok(Self { source: source.to_owned(), parts })
    }

    pub fn as_str(&self) -> &str {
        &self.source
    }

    /// The claims the template reads, in order of appearance.
    pub fn placeholders(&self) -> impl Iterator<Item = &str> {
        self.parts.iter().filter_map(|part| match part {
            Part::Claim(name) => Some(name.as_str()),
            Part::Literal(_) => None,
        })
    }

    /// The template's fixed text, placeholders left out.
    pub fn literal_text(&self) -> String {
        self.parts
            .iter()
            .filter_map(|part| match part {
                Part::Literal(text) => Some(text.as_str()),
                Part::Claim(_) => None,
            })
            .collect()
    }

    /// Strings render as they are, integers in decimal; anything else (missing, bool, object)
    /// is refused rather than guessed at.
    pub fn render(&self, claims: &dyn ClaimLookup) -> Result<String, String> {
        self.render_checked(claims, ClaimValues::Any)
    }

    /// Like [`Template::render`], with every substituted claim value held to `allowed`.
    pub fn render_checked(&self, claims: &dyn ClaimLookup, allowed: ClaimValues) -> Result<String, String> {
        self.render_with(claims, |name, value| {
            allowed.check(&value).map_err(|why| format!("claim `{name}` {why}"))?;
            Ok(value)
        })
    }

    /// For a URL: every substituted value is percent-encoded except `/`, so a claim can add
    /// path segments (`group/project`) but never a query, fragment, host or scheme.
    pub fn render_url(&self, claims: &dyn ClaimLookup) -> Result<String, String> {
        self.render_with(claims, |_, value| {
            Ok(value
                .bytes()
                .map(|b| match b {
                    b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' | b'/' => (b as char).to_string(),
                    b => format!("%{b:02X}"),
                })
                .collect())
        })
    }

    fn render_with(&self, claims: &dyn ClaimLookup, substitute: impl Fn(&str, String) -> Result<String, String>) -> Result<String, String> {
        let mut out = String::new();
        for part in &self.parts {
            match part {
                Part::Literal(text) => out.push_str(text),
                Part::Claim(name) => {
                    let value = match claims.claim_str(name) {
                        Some(text) => text.to_owned(),
                        None => match claims.claim(name) {
                            Some(Value::Number(value)) if value.is_i64() || value.is_u64() => value.to_string(),
                            Some(_) => return Err(format!("claim `{name}` is not a string or integer")),
                            None => return Err(format!("claim `{name}` is missing")),
                        },
                    };
                    out.push_str(&substitute(name, value)?);
                }
            }
        }
        if out.chars().any(char::is_control) {
            return Err(format!("template {:?} rendered a control character", self.source));
        }
        Ok(out)
    }
}

/// What a claim may contain where it is substituted. Structured parameters (identifiers,
/// policy documents) restrict it, because there a separator or wildcard from a claim would
/// change what the parameter names or grants, which no sanitising can make safe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClaimValues {
    /// Anything but control characters (checked on the whole rendered text).
    Any,
    /// One identifier segment: ASCII letters, digits and `_+=,.@-`, 1-64 characters.
    Identifier,
    /// A string inside a JSON document such as a policy: ASCII letters, digits and
    /// `_+=,.@:/-`, 1-128 characters; no quotes, spaces, wildcards (`*`, `?`) or `$`.
    PolicyString,
}

/// The longest claim value substituted into a JSON parameter; also the worst case assumed
/// when the size of a JSON parameter is bounded at load.
pub const POLICY_STRING_MAX_CHARS: usize = 128;

impl ClaimValues {
    fn check(self, value: &str) -> Result<(), String> {
        let (max, extra): (usize, &str) = match self {
            ClaimValues::Any => return Ok(()),
            ClaimValues::Identifier => (64, "_+=,.@-"),
            ClaimValues::PolicyString => (POLICY_STRING_MAX_CHARS, "_+=,.@:/-"),
        };
        if value.is_empty() {
            return Err("is empty".into());
        }
        if value.chars().count() > max {
            return Err(format!("is longer than {max} characters"));
        }
        match value.chars().find(|c| !(c.is_ascii_alphanumeric() || extra.contains(*c))) {
            Some(bad) => Err(format!("contains {bad:?}; only ASCII letters, digits and {extra} may be substituted here")),
            None => Ok(()),
        }
    }
}

/// A JSON document (e.g. an inline policy) whose string values are templates. Parsed as
/// JSON at load, so placeholders can only sit inside strings, and rendered by building the
/// value and serialising it: a claim can never break out of its string.
#[derive(Debug, Clone)]
pub struct JsonTemplate {
    source: String,
    root: JsonNode,
}

#[derive(Debug, Clone)]
enum JsonNode {
    Scalar(Value),
    Text(Template),
    Array(Vec<JsonNode>),
    Object(Vec<(String, JsonNode)>),
}

impl JsonTemplate {
    pub fn parse(source: &str) -> Result<Self, String> {
        let value: Value = serde_json::from_str(source).map_err(|e| format!("is not valid JSON: {e}"))?;
        Ok(Self { source: source.to_owned(), root: JsonNode::compile(value)? })
    }

    pub fn as_str(&self) -> &str {
        &self.source
    }

    pub fn placeholders(&self) -> Vec<&str> {
        let mut names = Vec::new();
        self.root.placeholders(&mut names);
        names
    }

    /// Compact JSON; substituted claim values are held to [`ClaimValues::PolicyString`].
    pub fn render(&self, claims: &dyn ClaimLookup) -> Result<String, String> {
        Ok(self.root.render(&|template| template.render_checked(claims, ClaimValues::PolicyString))?.to_string())
    }

    /// The longest the compact rendering can be: every placeholder at its maximum length.
    pub fn max_rendered_chars(&self) -> usize {
        let worst = "x".repeat(POLICY_STRING_MAX_CHARS);
        let rendered = self.root.render(&|template| {
            let claims: Map<String, Value> =
                template.placeholders().map(|name| (name.to_owned(), Value::String(worst.clone()))).collect();
            template.render(&claims)
        });
        rendered.map(|value| value.to_string().chars().count()).unwrap_or(usize::MAX)
    }
}

impl JsonNode {
    fn compile(value: Value) -> Result<Self, String> {
        Ok(match value {
            Value::String(text) => JsonNode::Text(Template::parse(&text)?),
            Value::Array(items) => JsonNode::Array(items.into_iter().map(JsonNode::compile).collect::<Result<_, _>>()?),
            Value::Object(fields) => JsonNode::Object(
                fields.into_iter().map(|(key, value)| Ok((key, JsonNode::compile(value)?))).collect::<Result<_, String>>()?,
            ),
            scalar => JsonNode::Scalar(scalar),
        })
    }

    fn placeholders<'a>(&'a self, names: &mut Vec<&'a str>) {
        match self {
            JsonNode::Scalar(_) => {}
            JsonNode::Text(template) => names.extend(template.placeholders()),
            JsonNode::Array(items) => items.iter().for_each(|item| item.placeholders(names)),
            JsonNode::Object(fields) => fields.iter().for_each(|(_, value)| value.placeholders(names)),
        }
    }

    fn render(&self, text: &dyn Fn(&Template) -> Result<String, String>) -> Result<Value, String> {
        Ok(match self {
            JsonNode::Scalar(value) => value.clone(),
            JsonNode::Text(template) => Value::String(text(template)?),
            JsonNode::Array(items) => Value::Array(items.iter().map(|item| item.render(text)).collect::<Result<_, _>>()?),
            JsonNode::Object(fields) => Value::Object(
                fields.iter().map(|(key, value)| Ok((key.clone(), value.render(text)?))).collect::<Result<_, String>>()?,
            ),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::{ClaimValues, JsonTemplate, Template};
    use serde_json::json;

    fn claims() -> serde_json::Map<String, serde_json::Value> {
        json!({"project_path": "group/app", "runner_id": 7, "ref_protected": true, "evil": "a\nb"})
            .as_object()
            .unwrap()
            .clone()
    }

    #[test]
    fn renders_strings_integers_and_escapes() {
        let template = Template::parse("ci:{project_path}:{runner_id}:{{x}}").unwrap();
        assert_eq!(template.render(&claims()).unwrap(), "ci:group/app:7:{x}");
    }

    #[test]
    fn refuses_missing_non_scalar_and_control_characters() {
        assert!(Template::parse("{nope}").unwrap().render(&claims()).unwrap_err().contains("missing"));
        assert!(Template::parse("{ref_protected}").unwrap().render(&claims()).is_err());
        assert!(Template::parse("{evil}").unwrap().render(&claims()).is_err());
    }

    #[test]
    fn rejects_malformed_templates() {
        for bad in ["{", "{}", "a}", "{Project}", "{a-b}"] {
            assert!(Template::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn restricted_claim_values_refuse_separators_and_wildcards() {
        let claims = json!({"id": "42", "path": "group/app", "star": "a*", "quote": "a\"b", "long": "x".repeat(200)});
        let claims = claims.as_object().unwrap();
        let template = |source: &str| Template::parse(source).unwrap();
        assert_eq!(template("role/ci-{id}").render_checked(claims, ClaimValues::Identifier).unwrap(), "role/ci-42");
        assert!(template("role/ci-{path}").render_checked(claims, ClaimValues::Identifier).is_err());
        assert!(template("{path}").render_checked(claims, ClaimValues::PolicyString).is_ok());
        for name in ["star", "quote", "long"] {
            let error = template(&format!("{{{name}}}")).render_checked(claims, ClaimValues::PolicyString).unwrap_err();
            assert!(error.contains(name), "{error}");
        }
    }

    #[test]
    fn json_templates_render_compact_and_bound_their_size() {
        let source = r#"{ "Statement": [ { "Effect": "Allow", "Resource": "arn:aws:s3:::b/{path}/*", "N": 1 } ] }"#;
        let policy = JsonTemplate::parse(source).unwrap();
        assert_eq!(policy.placeholders(), ["path"]);
        let claims = json!({"path": "group/app"});
        let rendered = policy.render(claims.as_object().unwrap()).unwrap();
        assert_eq!(rendered, r#"{"Statement":[{"Effect":"Allow","N":1,"Resource":"arn:aws:s3:::b/group/app/*"}]}"#);
        assert_eq!(policy.max_rendered_chars(), rendered.len() - "group/app".len() + super::POLICY_STRING_MAX_CHARS);
        assert!(JsonTemplate::parse("{not json").unwrap_err().contains("not valid JSON"));
        assert!(JsonTemplate::parse(r#"{"a": "{Bad}"}"#).is_err());
        let hostile = json!({"path": "x\",\"Effect\":\"Allow"});
        assert!(policy.render(hostile.as_object().unwrap()).is_err(), "a quote cannot end the string");
    }
}
