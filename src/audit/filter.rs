//! The security team's filters, as `GET /v1/issuances` and `credbroker audit query` take them:
//! parsed from query parameters into an [`IssuanceFilter`], every bad value refused naming
//! its parameter. `query.rs` turns a filter into SQL.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;
use uuid::Uuid;

use crate::types::parse_duration;

/// Every filter, as the API's query parameters (the CLI spells them `--project-path` etc.).
pub const FILTERS: &[&str] = &[
    "since",
    "until",
    "decision",
    "code",
    "role",
    "target",
    "backend",
    "issuer",
    "subject",
    "project_path",
    "namespace_path",
    "pipeline_id",
    "job_id",
    "sha",
    "user_login",
    "credential_sha256",
];

pub const DEFAULT_LIMIT: u32 = 100;
pub const MAX_LIMIT: u32 = 1000;
const MAX_VALUE_CHARS: usize = 512;
/// Every decision a row can hold: the `decision` filter's choices, in the API and on the page.
pub const DECISIONS: &[&str] = &["issued", "denied", "failed", "revoked", "revoke_failed", "admin_request", "audit_read", "recorded"];

/// A bad filter: `parameter` is what the caller must fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{parameter}: {message}")]
pub struct FilterError {
    pub parameter: String,
    pub message: String,
}

fn bad(parameter: &str, message: impl Into<String>) -> FilterError {
    FilterError { parameter: parameter.to_owned(), message: message.into() }
}

/// Where the previous page ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cursor {
    pub(super) tx: u64,
    pub(super) id: Uuid,
}

impl Cursor {
    pub fn encode(&self) -> String {
        URL_SAFE_NO_PAD.encode(format!("{}.{}", self.tx, self.id))
    }

    fn decode(raw: &str) -> Option<Self> {
        let text = String::from_utf8(URL_SAFE_NO_PAD.decode(raw).ok()?).ok()?;
        let (tx, id) = text.split_once('.')?;
        Some(Self { tx: tx.parse().ok()?, id: Uuid::parse_str(id).ok()? })
    }
}

/// `project_path`: exact, or a glob as in policies (`*` within one `/` segment, `**` across).
/// The LIKE prefix lets the index find the candidates; the regex decides, unless the glob is a
/// literal prefix followed by a final `**`, which the LIKE alone matches exactly (the common
/// `group/**`: at 10M rows, a regex per candidate row costs tens of milliseconds).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum ProjectPath {
    Exact(String),
    Glob { like_prefix: String, regex: Option<String> },
}

impl ProjectPath {
    fn parse(raw: &str) -> Self {
        if !raw.contains('*') {
            return Self::Exact(raw.to_owned());
        }
        let literal = &raw[..raw.find('*').unwrap_or(raw.len())];
        let mut like_prefix: String = literal
            .chars()
            .flat_map(|c| match c {
                '%' | '_' | '\\' => vec!['\\', c],
                c => vec![c],
            })
            .collect();
        like_prefix.push('%');
        let mut regex = String::from("^");
        let mut chars = raw.chars().peekable();
        while let Some(c) = chars.next() {
            if c == '*' {
                if chars.peek() == Some(&'*') {
                    chars.next();
                    regex.push_str(".*");
                } else {
                    regex.push_str("[^/]*");
                }
            } else if c.is_ascii_alphanumeric() || c == '/' || c == '-' || c == '_' {
                regex.push(c);
            } else {
                regex.push('\\');
                regex.push(c);
            }
        }
        regex.push('$');
        let prefix_only = raw.strip_suffix("**").is_some_and(|head| !head.contains('*'));
        Self::Glob { like_prefix, regex: (!prefix_only).then_some(regex) }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IssuanceFilter {
    pub since: Option<OffsetDateTime>,
    pub until: Option<OffsetDateTime>,
    pub(super) decisions: Vec<String>,
    /// Exact-match text columns, by column name.
    pub(super) exact: Vec<(&'static str, String)>,
    pub(super) project_path: Option<ProjectPath>,
    /// Full SHA-1/SHA-256 commit ids match exactly, shorter hex prefixes as a prefix.
    pub(super) sha: Option<String>,
    pub limit: u32,
    pub(super) cursor: Option<Cursor>,
}

impl IssuanceFilter {
    /// From query parameters (`name=value` pairs). Unknown or repeated parameters, empty values
    /// and values of the wrong shape are refused naming the parameter.
    pub fn parse<K: AsRef<str>, V: AsRef<str>>(pairs: impl IntoIterator<Item = (K, V)>, now: OffsetDateTime) -> Result<Self, FilterError> {
        let mut filter = Self { limit: DEFAULT_LIMIT, ..Self::default() };
        let mut seen: Vec<String> = Vec::new();
        for (name, value) in pairs {
            let (name, value) = (name.as_ref(), value.as_ref().trim());
            if seen.iter().any(|s| s == name) {
                return Err(bad(name, "given more than once"));
            }
            seen.push(name.to_owned());
            if !FILTERS.contains(&name) && name != "limit" && name != "cursor" {
                return Err(bad(name, format!("unknown parameter; filters are {}, plus limit and cursor", FILTERS.join(", "))));
            }
            if value.is_empty() {
                return Err(bad(name, "must not be empty"));
            }
            if value.chars().count() > MAX_VALUE_CHARS || value.chars().any(char::is_control) {
                return Err(bad(name, format!("must be at most {MAX_VALUE_CHARS} printable characters")));
            }
            match name {
                "since" => filter.since = Some(parse_time(value, now).map_err(|m| bad(name, m))?),
                "until" => filter.until = Some(parse_time(value, now).map_err(|m| bad(name, m))?),
                "decision" => {
                    for decision in value.split(',').map(str::trim) {
                        if !DECISIONS.contains(&decision) {
                            return Err(bad(name, format!("{decision:?} is not one of {}", DECISIONS.join(", "))));
                        }
                        filter.decisions.push(decision.to_owned());
                    }
                }
                "project_path" => {
                    if value.contains("***") {
                        return Err(bad(name, "`***` is not a pattern; use `*` (one segment) or `**` (any depth)"));
                    }
                    filter.project_path = Some(ProjectPath::parse(value));
                }
                "sha" => {
                    if !(7..=64).contains(&value.len()) || !value.bytes().all(|b| b.is_ascii_hexdigit()) {
                        return Err(bad(name, "must be a commit id or a prefix of one: 7 to 64 hexadecimal digits"));
                    }
                    filter.sha = Some(value.to_ascii_lowercase());
                }
                "pipeline_id" | "job_id" if !value.bytes().all(|b| b.is_ascii_digit()) => {
                    return Err(bad(name, "must be a number"));
                }
                "credential_sha256" if value.len() != 64 || !value.bytes().all(|b| b.is_ascii_hexdigit()) => {
                    return Err(bad(name, "must be a SHA-256 fingerprint: 64 hexadecimal digits"));
                }
                "limit" => {
                    filter.limit = value
                        .parse()
                        .ok()
                        .filter(|limit| (1..=MAX_LIMIT).contains(limit))
                        .ok_or_else(|| bad(name, format!("must be a whole number from 1 to {MAX_LIMIT}")))?;
                }
                "cursor" => {
                    filter.cursor = Some(Cursor::decode(value).ok_or_else(|| bad(name, "is not a cursor this broker returned"))?);
                }
                _ => {
                    let column = FILTERS.iter().find(|filter| **filter == name).expect("checked above");
                    let value = if name == "credential_sha256" { value.to_ascii_lowercase() } else { value.to_owned() };
                    filter.exact.push((column, value));
                }
            }
        }
        if let (Some(since), Some(until)) = (filter.since, filter.until) {
            if until <= since {
                return Err(bad("until", "must be later than since"));
            }
        }
        Ok(filter)
    }
}

/// An RFC 3339 time, or a span counted back from now in the crate's duration syntax
/// ([`parse_duration`]: `90s`, `15m`, `2h`, `7d`, `2w`, `1d12h`).
pub fn parse_time(raw: &str, now: OffsetDateTime) -> Result<OffsetDateTime, String> {
    if let Ok(at) = OffsetDateTime::parse(raw, &Rfc3339) {
        return Ok(at);
    }
    let fail = || format!("{raw:?} is neither an RFC 3339 time (2024-05-01T00:00:00Z) nor a span back from now (90m, 2h, 7d, 2w)");
    let seconds = parse_duration(raw).map_err(|_| fail())?;
    // Ten years back is further than any audit log goes; beyond it is a typo.
    if seconds > 10 * 366 * 86_400 {
        return Err(fail());
    }
    Ok(now - time::Duration::seconds(seconds as i64))
}

#[cfg(test)]
mod tests {
    use time::macros::datetime;

    use super::*;

    const NOW: OffsetDateTime = datetime!(2024-05-10 12:00 UTC);

    fn parse(pairs: &[(&str, &str)]) -> Result<IssuanceFilter, FilterError> {
        IssuanceFilter::parse(pairs.iter().copied(), NOW)
    }

    #[test]
    fn bad_filters_name_the_parameter() {
        for (pairs, parameter) in [
            (vec![("since", "yesterday")], "since"),
            (vec![("until", "5x")], "until"),
            (vec![("decision", "granted")], "decision"),
            (vec![("limit", "1001")], "limit"),
            (vec![("limit", "0")], "limit"),
            (vec![("cursor", "garbage")], "cursor"),
            (vec![("sha", "xyz")], "sha"),
            (vec![("sha", "abc")], "sha"),
            (vec![("pipeline_id", "12a")], "pipeline_id"),
            (vec![("job_id", "1 or 1=1")], "job_id"),
            (vec![("credential_sha256", "abc")], "credential_sha256"),
            (vec![("project", "x")], "project"),
            (vec![("role", "")], "role"),
            (vec![("role", "a"), ("role", "b")], "role"),
            (vec![("since", "2h"), ("until", "3h")], "until"),
            (vec![("project_path", "a/***")], "project_path"),
        ] {
            let error = parse(&pairs).unwrap_err();
            assert_eq!(error.parameter, parameter, "{pairs:?}: {error}");
        }
    }

    #[test]
    fn times_are_rfc3339_or_spans_back_from_now() {
        assert_eq!(parse_time("7d", NOW).unwrap(), datetime!(2024-05-03 12:00 UTC));
        assert_eq!(parse_time("1d12h", NOW).unwrap(), datetime!(2024-05-09 00:00 UTC));
        assert_eq!(parse_time("2w", NOW).unwrap(), datetime!(2024-04-26 12:00 UTC));
        assert_eq!(parse_time("2024-05-01T00:00:00Z", NOW).unwrap(), datetime!(2024-05-01 00:00 UTC));
        // Plain seconds, as everywhere durations are read.
        assert_eq!(parse_time("90", NOW).unwrap(), datetime!(2024-05-10 11:58:30 UTC));
        assert!(parse_time("7x", NOW).is_err());
        assert!(parse_time("0h", NOW).is_err());
    }

    #[test]
    fn project_globs_follow_policy_rules() {
        assert_eq!(ProjectPath::parse("platform/orders"), ProjectPath::Exact("platform/orders".into()));
        assert_eq!(
            ProjectPath::parse("plat_form/*"),
            ProjectPath::Glob { like_prefix: "plat\\_form/%".into(), regex: Some("^plat_form/[^/]*$".into()) }
        );
        // A literal prefix and a final `**`: the LIKE alone is exact.
        assert_eq!(ProjectPath::parse("a.b/**"), ProjectPath::Glob { like_prefix: "a.b/%".into(), regex: None });
        assert_eq!(
            ProjectPath::parse("a/**/c"),
            ProjectPath::Glob { like_prefix: "a/%".into(), regex: Some("^a/.*/c$".into()) }
        );
        assert_eq!(ProjectPath::parse("*"), ProjectPath::Glob { like_prefix: "%".into(), regex: Some("^[^/]*$".into()) });
        assert_eq!(ProjectPath::parse("a/*/**"), ProjectPath::Glob { like_prefix: "a/%".into(), regex: Some("^a/[^/]*/.*$".into()) });
    }

    #[test]
    fn cursors_round_trip() {
        let cursor = Cursor { tx: 12345, id: Uuid::new_v4() };
        assert_eq!(Cursor::decode(&cursor.encode()), Some(cursor));
    }
}
