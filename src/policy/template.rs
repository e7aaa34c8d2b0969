//! `"ci:{project_path}"`-style templates rendered from verified claims. Parsed at load so a
//! typo is a load error, not a surprise at exchange time.

use serde_json::{Map, Value};

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

    /// The claims the template reads; empty for a literal.
    pub fn claims(&self) -> impl Iterator<Item = &str> {
        self.parts.iter().filter_map(|part| match part {
            Part::Claim(name) => Some(name.as_str()),
            Part::Literal(_) => None,
        })
    }

    /// Strings render as they are, integers in decimal; anything else (missing, bool, object)
    /// is refused rather than guessed at.
    pub fn render(&self, claims: &Map<String, Value>) -> Result<String, String> {
        let mut out = String::new();
        for part in &self.parts {
            match part {
                Part::Literal(text) => out.push_str(text),
                Part::Claim(name) => match claims.get(name) {
                    Some(Value::String(value)) => out.push_str(value),
                    Some(Value::Number(value)) if value.is_i64() || value.is_u64() => out.push_str(&value.to_string()),
                    Some(_) => return Err(format!("claim `{name}` is not a string or integer")),
                    None => return Err(format!("claim `{name}` is missing")),
                },
            }
        }
        if out.chars().any(char::is_control) {
            return Err(format!("template {:?} rendered a control character", self.source));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::Template;
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
}
